"""Typed configs of the data pipeline, registered with Hydra's ConfigStore.

Every YAML file under ``conf/`` merges onto these dataclasses, so an unknown key or a value
of the wrong type is rejected by Hydra before any work starts, with the full key named.
"""

from dataclasses import dataclass, field
from enum import Enum

from data_pipeline.errors import ConfigError, require


class TokenizerKind(Enum):
    REMI = "REMI"
    TSD = "TSD"
    Structured = "Structured"
    MIDILike = "MIDILike"


class LearnedVocabKind(Enum):
    none = "none"
    bpe = "bpe"
    unigram = "unigram"


@dataclass
class LearnedVocabConfig:
    """A sentencepiece vocabulary learned over the base-token stream (one char per token)."""

    kind: LearnedVocabKind = LearnedVocabKind.none
    size: int = 1000
    # Pieces of the train split the vocabulary is learned from (those with the smallest content
    # hashes: a uniform sample, the same however the corpus was sliced); all of them when None.
    # The bound keeps the merge's memory and sentencepiece's time flat as the corpus grows:
    # None holds every train piece in memory at once.
    max_pieces: int | None = 20000
    # Sentencepiece splits input into sentences; bars keep each sentence musically whole.
    max_tokens_per_sentence: int = 512

    def __post_init__(self):
        require(
            self,
            "tokenizer.learned",
            [
                (
                    self.max_pieces is None or self.max_pieces >= 1,
                    "max_pieces",
                    "must be at least 1 (or null for every train piece)",
                ),
                (self.max_tokens_per_sentence >= 1, "max_tokens_per_sentence", "must be >= 1"),
            ],
        )


@dataclass
class TokenizerConfig:
    """MidiTok base vocabulary. Programs are kept in one stream so a multi-instrument
    piece (drums included) trains as one sequence."""

    kind: TokenizerKind = TokenizerKind.REMI
    pitch_range: list[int] = field(default_factory=lambda: [21, 109])
    # Positions per beat for notes starting in beats [0, 4) and [4, 12) of a duration.
    beat_resolution: int = 8
    num_velocities: int = 32
    use_tempos: bool = True
    num_tempos: int = 32
    use_time_signatures: bool = True
    use_programs: bool = True
    learned: LearnedVocabConfig = field(default_factory=LearnedVocabConfig)


@dataclass
class SplitConfig:
    """Fractions of pieces that go to val and test; the rest is train. Assignment is by
    content hash, so it is the same on every machine and every run."""

    val: float = 0.05
    test: float = 0.05

    def __post_init__(self):
        if min(self.val, self.test) < 0 or self.val + self.test >= 1:
            raise ConfigError(
                f"split.val={self.val} + split.test={self.test} must be >= 0 and < 1 (the rest "
                "is train)"
            )


@dataclass
class LimitsConfig:
    """Pieces outside these bounds are quarantined, not tokenized."""

    min_notes: int = 8
    max_notes: int = 100_000
    max_duration_s: float = 3600.0
    max_tracks: int = 64
    # A converted score (the built-in corpus) may play at most this many times the notes its
    # source writes: repeats, da capo and trills multiply them a few times; more means the
    # converter looped over the repeats.
    max_repeat_expansion: float = 6.0

    def __post_init__(self):
        require(
            self,
            "limits",
            [
                (self.max_repeat_expansion >= 1, "max_repeat_expansion", "must be at least 1"),
                (self.convert_cpu_s > 0, "convert_cpu_s", "must be positive"),
            ],
        )

    # A file that takes longer than this to parse and tokenize is quarantined (worker killed).
    timeout_s: float = 120.0
    # A built-in corpus score whose conversion to MIDI takes more CPU seconds than this is
    # quarantined (and remembered in the cache). CPU time, not wall time: a busy machine
    # converts the same scores as a quiet one.
    convert_cpu_s: float = 300.0
    # Built-in corpus scores that write more notes than this are not converted (whole string
    # quartets: their conversion costs grow with the square of their length).
    convert_max_notes: int = 10_000


@dataclass
class ShardConfig:
    max_bytes: int = 256 * 1024 * 1024
    max_pieces: int = 1_000_000
    # Files whose order is mixed (seeded by `seed`) before they are tokenized, so that a shard
    # is not one collection after another: a source lists its files folder by folder, and the
    # loader's shuffle buffer (data.shuffle_buffer) mixes only neighbours. A window, not the
    # whole listing, so a prepare task still never holds a huge source's listing (its
    # entries are names, not music). 1 keeps the listing's order.
    shuffle_window: int = 100_000

    def __post_init__(self):
        require(
            self,
            "shards",
            [
                (self.max_bytes >= 1, "max_bytes", "must be at least 1"),
                (self.max_pieces >= 1, "max_pieces", "must be at least 1"),
                (self.shuffle_window >= 1, "shuffle_window", "must be at least 1 (1: no mixing)"),
            ],
        )


@dataclass
class LabelConfig:
    """Where conditioning labels come from for file sources: the i-th directory level below
    the source root names the i-th key (``[collection]`` maps ``jazz/x.mid`` to
    collection=jazz). The built-in corpus sets its own labels."""

    path_levels: list[str] = field(default_factory=lambda: ["collection"])
    # Label kinds that get conditioning tokens, beside the path levels' kinds. A piece's other
    # labels (the built-in corpus's meter, key, mode, region, ...) stay in its shard record and
    # the manifest, for probes and per-label reports, without tokens of their own.
    condition_on: list[str] = field(
        default_factory=lambda: ["collection", "composer", "genre", "tune_type"]
    )
    # A label value needs this many pieces to get its own conditioning token.
    min_count: int = 1

    def conditions(self, label: str) -> bool:
        """Whether the label ``kind=value`` may get a conditioning token."""
        kind = label.partition("=")[0]
        return kind in self.condition_on or kind in self.path_levels


@dataclass
class PrepareConfig:
    # What to read: a local directory, an fsspec URL (s3://bucket/prefix, file:///dir) or the
    # built-in corpus, music21:<collection>[+<collection>...] (music21:all for every one).
    source: str = "music21:bach"
    # Where to write shards, dataset card, manifest, failures and the tokenizer artifact:
    # a local directory or an fsspec URL.
    output: str = "data/bach"
    # Cache of the built-in corpus converted to MIDI (converted once, reused).
    cache_dir: str = "${oc.env:MTRAIN_CACHE,${oc.env:HOME}/.cache/mtrain}"
    workers: int = 2
    # Take only the first N files (in sorted order) of the source; all when None.
    max_files: int | None = None
    # Scale-out: this process handles the pieces whose content hash falls in slice
    # slice_index of num_slices; `python -m data_pipeline.merge` joins the slices.
    num_slices: int = 1
    slice_index: int = 0
    # With one slice the run merges itself; set false to leave merging to a later step.
    merge: bool = True
    seed: int = 0
    # Tokenize with the vocabulary of an exported model, a dataset or a tokenizer artifact
    # (its base config and learned vocabulary as stored), to fine-tune that model on this
    # source: label values it lacks become new label tokens after its ids.
    tokenizer_from: str | None = None
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)

    def __post_init__(self):
        require(
            self,
            "",
            [
                (self.workers >= 1, "workers", "must be at least 1"),
                (self.num_slices >= 1, "num_slices", "must be at least 1"),
                (
                    0 <= self.slice_index < self.num_slices,
                    "slice_index",
                    f"must be in [0, num_slices={self.num_slices})",
                ),
                (
                    self.tokenizer_from is None or self.tokenizer == TokenizerConfig(),
                    "tokenizer_from",
                    "brings its own tokenizer: drop the tokenizer.* overrides",
                ),
            ],
        )


@dataclass
class MergeConfig:
    """Joins the per-slice results found under ``output`` into one dataset."""

    output: str = "data/bach"
