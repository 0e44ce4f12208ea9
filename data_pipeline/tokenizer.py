"""The tokenizer artifact: the one contract between data_pipeline and mtrain.

A directory holding the MidiTok base tokenizer, the conditioning labels and, optionally, a
learned sentencepiece vocabulary, plus ``artifact.json`` with a content hash that every
dataset card records. Model ids are laid out as::

    [base specials: PAD BOS EOS MASK] [musical units] [infilling: FIM_PREFIX FIM_SUFFIX
    FIM_MIDDLE FIM_END] [labels: collection=bach ... and bar controls: ACBarNoteDensity_12 ...]

where the musical units are MidiTok's base tokens, or the learned pieces when a learned
vocabulary is configured. Shards always store base ids, so one set of shards serves any
learned vocabulary. The infilling tokens are always reserved in new artifacts, so a run can
change its infilling rate without changing the vocabulary; artifacts written before them have
none and load as they were (same ids, same hash). Bar controls (``data_pipeline.bar_controls``)
are label tokens a training run appends (``extended``), named as MidiTok names them (never
``key=value``): a model trained with them reads its dataset's ids unchanged.
"""

import functools
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import miditok
import numpy as np
import symusic

from data_pipeline import storage
from data_pipeline.config import TokenizerConfig
from data_pipeline.errors import InputError
from data_pipeline.learned_vocab import LearnedVocab

SPECIAL_TOKENS = ("PAD", "BOS", "EOS", "MASK")
# Fill-in-the-middle (MusicTokenizer.infill_document): model ids only, never base ids, so the base
# vocabulary and the shards stay as they were.
INFILL_TOKENS = ("FIM_PREFIX", "FIM_SUFFIX", "FIM_MIDDLE", "FIM_END")
# An infilling document's tokens besides its head and its music: one of each infilling token.
FRAME_TOKENS = len(INFILL_TOKENS)
ARTIFACT_FORMAT = 1


def build_base_tokenizer(cfg: TokenizerConfig) -> miditok.MusicTokenizer:
    low, high = cfg.pitch_range
    config = miditok.TokenizerConfig(
        pitch_range=(low, high),
        beat_res={(0, 4): cfg.beat_resolution, (4, 12): max(1, cfg.beat_resolution // 2)},
        num_velocities=cfg.num_velocities,
        special_tokens=list(SPECIAL_TOKENS),
        use_tempos=cfg.use_tempos,
        num_tempos=cfg.num_tempos,
        use_time_signatures=cfg.use_time_signatures,
        use_programs=cfg.use_programs,
        one_token_stream_for_programs=True,
    )
    return getattr(miditok, cfg.kind.value)(config)


def base_tokenizer_of(cfg: TokenizerConfig, tokenizer_from: str | None) -> miditok.MusicTokenizer:
    """The base vocabulary a prepare run encodes with: the configured one, or the one stored in
    the artifact ``tokenizer_from`` names (its MidiTok config as saved, whatever the defaults)."""
    if tokenizer_from is None:
        return build_base_tokenizer(cfg)
    return MusicTokenizer.load(artifact_of(tokenizer_from)).base


def base_fingerprint(base: miditok.MusicTokenizer) -> str:
    """Hash of what fixes the base ids: the tokenizer class and its token -> id table."""
    payload = json.dumps(
        {"kind": type(base).__name__, "vocab": base.vocab}, sort_keys=True
    ).encode()
    return hashlib.sha256(payload).hexdigest()


def score_base_ids(base: miditok.MusicTokenizer, score: symusic.Score) -> np.ndarray:
    """A score's base ids: the one way a MIDI file becomes tokens, for the shards prepare writes
    and for a search query, an added file or a prompt alike, so one file is one token run."""
    return np.asarray(base.encode(score).ids, dtype=np.int64)


def label_token(key: str, value: str) -> str:
    return f"{key}={value}"


def is_control(name: str) -> bool:
    """Whether a label token is a bar control (MidiTok's name) rather than a label (k=v)."""
    return "=" not in name


def join_bars(bars: list[np.ndarray]) -> np.ndarray:
    """Bars of base ids (``MusicTokenizer.split_bars``) as one run of base ids."""
    return np.concatenate(bars) if bars else np.zeros(0, np.int64)


class InfillIds(NamedTuple):
    """The model ids of the infilling tokens: a piece as ``prefix`` ... ``suffix`` ...
    ``middle`` ... ``end``."""

    prefix: int
    suffix: int
    middle: int
    end: int


@dataclass
class MusicTokenizer:
    """Base tokenizer + labels + optional learned vocabulary, under one hash."""

    base: miditok.MusicTokenizer
    labels: list[str]
    learned: LearnedVocab | None = None
    # Whether the infilling tokens are reserved: always in new artifacts, never in older ones.
    infill: bool = True
    # Where the artifact comes from when it extends another (``extended``): the other's hash
    # and the label tokens added after its own. Recorded, not hashed: the ids are the content.
    lineage: dict | None = None

    # ---- id layout -------------------------------------------------------------------
    @property
    def num_specials(self) -> int:
        return len(SPECIAL_TOKENS)

    @property
    def num_units(self) -> int:
        if self.learned is None:
            return len(self.base) - self.num_specials
        return len(self.learned)

    @property
    def vocab_size(self) -> int:
        return self.label_offset + len(self.labels)

    pad_id, bos_id, eos_id = 0, 1, 2

    @property
    def infill_offset(self) -> int:
        """Where the infilling ids start: right after the musical units."""
        return self.num_specials + self.num_units

    @property
    def num_infill(self) -> int:
        return len(INFILL_TOKENS) if self.infill else 0

    @property
    def infill_ids(self) -> InfillIds | None:
        """The infilling ids, or None for an artifact written before they existed."""
        if not self.infill:
            return None
        return InfillIds(*range(self.infill_offset, self.infill_offset + len(INFILL_TOKENS)))

    @property
    def label_offset(self) -> int:
        return self.infill_offset + self.num_infill

    @property
    def bar_id(self) -> int | None:
        """The base id of the token that opens a bar; None for tokenizers without bars."""
        return self.base.vocab.get("Bar_None")

    @functools.cached_property
    def _label_index(self) -> dict[str, int]:
        # Built once, not per piece: a corpus may have thousands of labels (composers).
        return {name: self.label_offset + i for i, name in enumerate(self.labels)}

    @functools.cached_property
    def control_index(self) -> dict[str, int]:
        """Bar control token -> model id: empty for a model trained without controls."""
        return {name: i for name, i in self._label_index.items() if is_control(name)}

    @functools.cached_property
    def conditioning_ids(self) -> list[int]:
        """The ids of the labels proper, which only a piece's head holds (no bar control)."""
        return [i for name, i in self._label_index.items() if not is_control(name)]

    def label_ids(self, labels: dict[str, str]) -> list[int]:
        """Conditioning ids for a piece's labels; labels without a token are left out."""
        index = self._label_index
        names = (label_token(k, v) for k, v in sorted(labels.items()))
        return [index[n] for n in names if n in index]

    # ---- a piece as the model reads it ----------------------------------------------------
    def head(self, labels: dict[str, str]) -> list[int]:
        """[BOS, label ids...]: what comes before a piece's music."""
        return [self.bos_id, *self.label_ids(labels)]

    def document(
        self, labels: dict[str, str], base_ids: np.ndarray, *, end: bool = True
    ) -> np.ndarray:
        """[BOS, label ids..., model ids..., EOS]: one piece as the model reads it, in training,
        evaluation and embedding alike; without EOS (``end=False``) it is a prompt to continue."""
        tail = [self.eos_id] if end else []
        return np.concatenate(
            [
                np.array(self.head(labels), dtype=np.int64),
                self.encode_base(base_ids),
                np.array(tail, dtype=np.int64),
            ]
        )

    def controlled_document(
        self, labels: dict[str, str], bars: list[np.ndarray], controls: list[list[str]]
    ) -> np.ndarray:
        """A document whose bars (``split_bars``) each follow their control tokens: [BOS,
        labels..., controls of bar 1, bar 1, ..., EOS]. Controls come before the Bar token, so
        a learned vocabulary (whose pieces never cross a bar's start) encodes each bar as it
        encodes the whole piece."""
        index = self.control_index
        parts = [self.head(labels)]
        for bar, names in zip(bars, controls, strict=True):
            parts += [[index[n] for n in names], self.encode_base(bar)]
        parts.append([self.eos_id])
        return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])

    def split_bars(self, base_ids: np.ndarray) -> list[np.ndarray]:
        """A piece's base ids cut into its bars, each from its Bar token to the next (what
        precedes the first bar belongs to it); ``join_bars`` puts them back together."""
        base_ids = np.asarray(base_ids, dtype=np.int64)
        starts = np.flatnonzero(base_ids == self.bar_id)
        return np.split(base_ids, starts[1:]) if len(starts) else [base_ids]

    def infill_document(
        self,
        labels: dict[str, str],
        prefix: np.ndarray,
        suffix: np.ndarray,
        middle: np.ndarray | None = None,
    ) -> np.ndarray:
        """[BOS, labels..., FIM_PREFIX, prefix, FIM_SUFFIX, suffix, FIM_MIDDLE, middle, FIM_END]
        from base ids: a piece as the model reads it to fill bars from both sides (the PSM
        order of Bavarian et al. 2022); without ``middle``, the prompt a model fills it from."""
        fim = self.infill_ids
        parts = [self.head(labels), [fim.prefix], self.encode_base(prefix), [fim.suffix]]
        parts += [self.encode_base(suffix), [fim.middle]]
        if middle is not None:
            parts += [self.encode_base(middle), [fim.end]]
        return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])

    # ---- base ids <-> model ids --------------------------------------------------------
    def encode_base(self, base_ids: np.ndarray) -> np.ndarray:
        """Base ids (specials may appear) to model ids."""
        base_ids = np.asarray(base_ids, dtype=np.int64)
        if self.learned is None:
            return base_ids
        units = self.learned.encode(base_ids[base_ids >= self.num_specials], self.bar_id)
        return units + self.num_specials

    def decode_base(self, ids: np.ndarray) -> np.ndarray:
        """Model ids to base ids; specials, infilling tokens and labels are dropped."""
        ids = np.asarray(ids, dtype=np.int64)
        units = ids[(ids >= self.num_specials) & (ids < self.infill_offset)]
        if self.learned is None:
            return units
        return self.learned.decode(units - self.num_specials)

    # ---- MIDI <-> base ids ---------------------------------------------------------------
    def midi_to_base_ids(self, score: symusic.Score) -> np.ndarray:
        return score_base_ids(self.base, score)

    def base_ids_to_midi(self, base_ids: np.ndarray) -> symusic.Score:
        return self.base.decode([int(i) for i in base_ids])

    # ---- lineage: a fine-tuning corpus read with a trained model's ids ----------------------
    def extended(self, labels: list[str]) -> "MusicTokenizer":
        """This artifact with the label tokens of ``labels`` it lacks appended after its own
        (sorted), so that every id it has keeps its meaning; the lineage names this one."""
        added = sorted(set(labels) - set(self.labels))
        lineage = {"parent": self.hash, "added_labels": added}
        return MusicTokenizer(self.base, self.labels + added, self.learned, self.infill, lineage)

    def added_labels_over(self, parent: "MusicTokenizer") -> list[str] | None:
        """The label tokens this artifact appends to ``parent``'s ids (empty when it is the
        same artifact), or None when the two differ otherwise: another base vocabulary,
        learned vocabulary or infilling layout, or labels not appended at the end."""
        same_units = (
            base_fingerprint(self.base) == base_fingerprint(parent.base)
            and (self.learned is None) == (parent.learned is None)
            and (self.learned is None or self.learned.model == parent.learned.model)
            and self.infill == parent.infill
        )
        if not same_units or self.labels[: len(parent.labels)] != parent.labels:
            return None
        return self.labels[len(parent.labels) :]

    # ---- persistence ---------------------------------------------------------------------
    @property
    def hash(self) -> str:
        h = hashlib.sha256()
        h.update(base_fingerprint(self.base).encode())
        h.update(json.dumps(self.labels).encode())
        if self.learned is not None:
            h.update(self.learned.model)
        if self.infill:  # only then: an older artifact keeps the hash its datasets recorded
            h.update(json.dumps(INFILL_TOKENS).encode())
        return h.hexdigest()

    def describe(self) -> dict:
        return {
            "format": ARTIFACT_FORMAT,
            "hash": self.hash,
            "kind": type(self.base).__name__,
            "base_vocab_size": len(self.base),
            "learned_vocab_size": None if self.learned is None else len(self.learned),
            "vocab_size": self.vocab_size,
            "special_ids": {name: i for i, name in enumerate(SPECIAL_TOKENS)},
            "labels": {name: self.label_offset + i for i, name in enumerate(self.labels)},
            **({"infill_ids": self.infill_ids._asdict()} if self.infill else {}),
            **({"lineage": self.lineage} if self.lineage else {}),
        }

    def save(self, url: str) -> None:
        files = {"miditok.json": _base_params(self.base)}
        if self.learned is not None:
            files["learned.model"] = self.learned.model
        for name, data in files.items():
            storage.write_bytes(storage.join(url, name), data)
        # Written last: a directory without it is not a complete artifact.
        storage.write_bytes(
            storage.join(url, "artifact.json"), json.dumps(self.describe(), indent=2).encode()
        )

    @classmethod
    def load(cls, url: str) -> "MusicTokenizer":
        meta_url = storage.join(url, "artifact.json")
        if not storage.exists(meta_url):
            raise FileNotFoundError(
                f"{meta_url} not found: {url} is not a complete tokenizer artifact "
                "(run `python -m data_pipeline.prepare` to build one)"
            )
        meta = json.loads(storage.read_bytes(meta_url))
        params = json.loads(storage.read_bytes(storage.join(url, "miditok.json")))
        base = _base_from_params(meta["kind"], params)
        learned = None
        if meta["learned_vocab_size"] is not None:
            learned = LearnedVocab(storage.read_bytes(storage.join(url, "learned.model")))
        labels = sorted(meta["labels"], key=meta["labels"].get)
        tok = cls(base, labels, learned, infill="infill_ids" in meta, lineage=meta.get("lineage"))
        if tok.hash != meta["hash"]:
            raise ValueError(
                f"tokenizer artifact {url} is damaged: its files hash to {tok.hash[:12]} but "
                f"artifact.json records {meta['hash'][:12]}; rebuild it with prepare"
            )
        return tok


def artifact_of(path: str) -> str:
    """The tokenizer artifact an exported model, a dataset or an artifact directory holds (an
    export and a dataset both keep theirs in ``tokenizer/``); refused, naming what was looked
    for, when ``path`` is none of these."""
    for url in (path, storage.join(path, "tokenizer")):
        if storage.exists(storage.join(url, "artifact.json")):
            return url
    raise InputError(
        f"tokenizer_from={path} is not an exported model, a dataset or a tokenizer artifact: "
        f"neither {storage.join(path, 'tokenizer/artifact.json')} nor "
        f"{storage.join(path, 'artifact.json')} exists; give the directory `python -m "
        "mtrain.export` or `python -m data_pipeline.prepare` wrote"
    )


def _base_params(base: miditok.MusicTokenizer) -> bytes:
    # MidiTok saves and loads through paths only.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "miditok.json"
        base.save(path)
        return path.read_bytes()


def _base_from_params(kind: str, params: dict) -> miditok.MusicTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "miditok.json"
        path.write_text(json.dumps(params))
        return getattr(miditok, kind)(params=path)
