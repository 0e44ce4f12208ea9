"""One MIDI file, in a worker: read, hash, check, measure and tokenize it into a shard sample.

Every way a file can be bad ends in a ``Rejection`` with a short reason code and the details;
only a crash of the process itself escapes, and the resilient pool catches that.
"""

from dataclasses import dataclass, field

import numpy as np

from data_pipeline import storage
from data_pipeline.config import LimitsConfig, TokenizerConfig
from data_pipeline.manifest import content_hash, slice_of
from data_pipeline.midi_file import MidiFileError, read_score
from data_pipeline.shards import sample_bytes
from data_pipeline.sources import SourceFile
from data_pipeline.tokenizer import base_tokenizer_of, score_base_ids


@dataclass
class Rejection:
    code: str
    detail: str
    hash: str | None = None


@dataclass
class TokenizedFile:
    """A MIDI file that passed every check: its content hash, measures, token count and the
    shard sample holding its base token ids (``shards.sample_bytes``)."""

    hash: str
    tokens: int
    notes: int
    duration_s: float
    tracks: int
    programs: list[int] = field(default_factory=list)
    sample: bytes = b""


@dataclass
class OtherSlice:
    """The file belongs to another slice; only its hash was computed."""

    hash: str


@dataclass(frozen=True)
class WorkerSetup:
    tokenizer: TokenizerConfig
    limits: LimitsConfig
    num_slices: int
    slice_index: int
    tokenizer_from: str | None = None


_state: dict = {}


def init_worker(setup: WorkerSetup) -> None:
    _state["setup"] = setup
    _state["tokenizer"] = base_tokenizer_of(setup.tokenizer, setup.tokenizer_from)


def process_file(file: SourceFile) -> TokenizedFile | Rejection | OtherSlice:
    setup: WorkerSetup = _state["setup"]
    try:
        data = storage.read_bytes(file.url)
    except Exception as exc:
        return Rejection("unreadable", f"{type(exc).__name__}: {exc}")
    digest = content_hash(data)
    if slice_of(digest, setup.num_slices) != setup.slice_index:
        return OtherSlice(digest)
    rejection = check_and_measure(data, setup.limits, file.written_notes)
    if isinstance(rejection, Rejection):
        rejection.hash = digest
        return rejection
    score, stats = rejection
    tokens = score_base_ids(_state["tokenizer"], score)
    if len(tokens) == 0:
        return Rejection("no_tokens", "the tokenizer produced no tokens", digest)
    dtype = np.uint16 if tokens.max() < np.iinfo(np.uint16).max else np.int32
    meta = {"hash": digest, "name": file.name, "labels": file.labels, **stats}
    sample = sample_bytes(digest, tokens.astype(dtype), meta)
    return TokenizedFile(digest, len(tokens), sample=sample, **stats)


def check_and_measure(
    data: bytes, limits: LimitsConfig, written_notes: int | None = None
) -> Rejection | tuple:
    """The score and its measures, or why it is rejected. ``written_notes`` (a converted
    score's source count) bounds how many notes playing out its repeats may give."""
    try:
        score = read_score(data)
    except MidiFileError as exc:
        return Rejection(exc.reason, str(exc))
    notes = score.note_num()
    tracks = sum(1 for t in score.tracks if t.note_num() > 0)
    duration_s = float(score.to("second").end())
    if notes == 0:
        return Rejection("no_notes", "the file holds no notes")
    checks = [
        (
            notes < limits.min_notes,
            "too_few_notes",
            f"{notes} notes < limits.min_notes={limits.min_notes}",
        ),
        (
            notes > limits.max_notes,
            "too_many_notes",
            f"{notes} notes > limits.max_notes={limits.max_notes}",
        ),
        (
            tracks > limits.max_tracks,
            "too_many_tracks",
            f"{tracks} tracks > limits.max_tracks={limits.max_tracks}",
        ),
        (
            duration_s > limits.max_duration_s,
            "too_long",
            f"{duration_s:.0f} s > limits.max_duration_s={limits.max_duration_s:g}",
        ),
        (
            bool(written_notes) and notes > limits.max_repeat_expansion * written_notes,
            "repeats_blow_up",
            f"{notes} notes played from {written_notes} written "
            f"(> limits.max_repeat_expansion={limits.max_repeat_expansion:g} times)",
        ),
    ]
    for failed, code, detail in checks:
        if failed:
            return Rejection(code, detail)
    programs = sorted({-1 if t.is_drum else int(t.program) for t in score.tracks if t.note_num()})
    stats = {
        "notes": notes,
        "duration_s": round(duration_s, 3),
        "tracks": tracks,
        "programs": programs,
    }
    return score, stats
