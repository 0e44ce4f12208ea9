"""Prompts for the model: a piece's head (BOS, labels), the first bars or seconds of a MIDI
file, and the ids a continuation must never draw."""

from itertools import islice

import numpy as np
import symusic

from data_pipeline import storage
from data_pipeline.midi_file import MidiFileError, barline_ticks, read_score
from data_pipeline.tokenizer import SPECIAL_TOKENS, MusicTokenizer, label_token

# MIDI's tempo before the first tempo change: 120 bpm, in microseconds per quarter note.
DEFAULT_MSPQ = 500_000


def specials_but_eos(tokenizer: MusicTokenizer) -> list[int]:
    """PAD, BOS, MASK and the infilling tokens: never drawn in a continuation, whatever the
    prompt (EOS ends a piece)."""
    infill = list(tokenizer.infill_ids or ())
    return [i for i in range(len(SPECIAL_TOKENS)) if i != tokenizer.eos_id] + infill


def continuation_banned_ids(tokenizer: MusicTokenizer) -> list[int]:
    """Ids a continuation must never draw: the specials but EOS, and the conditioning labels,
    which belong to the head of a piece only."""
    return specials_but_eos(tokenizer) + list(range(tokenizer.label_offset, tokenizer.vocab_size))


def banned_for(tokenizer: MusicTokenizer, prompt: list[int]) -> list[int]:
    """Ids a continuation of ``prompt`` must not draw: PAD, BOS and MASK always; while the
    prompt is still the head of a piece, the labels of the kinds it already names (the model
    completes the others, as training pieces carry all their kinds); once music has started,
    every label."""
    labels = range(tokenizer.label_offset, tokenizer.vocab_size)
    given = [i for i in prompt[1:] if i in labels]
    if len(prompt) > 1 + len(given):  # music in the prompt
        return continuation_banned_ids(tokenizer)

    def kind(label_id: int) -> str:
        return tokenizer.labels[label_id - tokenizer.label_offset].split("=")[0]

    named = {kind(i) for i in given}
    # Bar controls are drawn only where a plan places them (``compose`` lifts the ban there).
    controls = list(tokenizer.control_index.values())
    return specials_but_eos(tokenizer) + [i for i in labels if kind(i) in named] + controls


def parse_labels(text: str | None) -> dict[str, str]:
    """'collection:bach+composer:bach' -> {'collection': 'bach', 'composer': 'bach'}; the
    colon because '=' would end a Hydra override's key, '+' because ',' makes a sweep."""
    labels = {}
    for part in filter(None, (text or "").split("+")):
        kind, sep, value = part.replace("=", ":", 1).partition(":")
        if not sep or not kind or not value:
            raise ValueError(f"label={text}: write each label as kind:value, e.g. collection:bach")
        labels[kind.strip()] = value.strip()
    return labels


def validate_labels(tokenizer: MusicTokenizer, labels: dict[str, str]) -> None:
    """A label without a token would be silently left out of the prompt: refuse it instead."""
    unknown = [label_token(k, v) for k, v in sorted(labels.items())]
    unknown = [name for name in unknown if name not in tokenizer.labels]
    if unknown:
        raise ValueError(
            f"no conditioning token for {', '.join(unknown)}; this tokenizer knows: "
            f"{', '.join(tokenizer.labels) or 'no labels'}"
        )


def build_prompt(
    tokenizer: MusicTokenizer, labels: dict[str, str] | None, prompt_base_ids: np.ndarray | None
) -> list[int]:
    """[BOS, label ids..., prompt tokens...]: a piece as the model reads it, without its EOS,
    for the model to continue."""
    labels = labels or {}
    validate_labels(tokenizer, labels)
    base_ids = np.zeros(0, np.int64) if prompt_base_ids is None else prompt_base_ids
    return tokenizer.document(labels, base_ids, end=False).tolist()


def prompt_from_midi(
    tokenizer: MusicTokenizer, path: str, bars: int | None = None, seconds: float | None = None
) -> np.ndarray:
    """Base ids of the first ``bars`` bars or ``seconds`` seconds of a MIDI file (a path or an
    fsspec URL); all of it when neither is given. Notes starting inside are kept whole."""
    if bars is not None and seconds is not None:
        raise ValueError("give the prompt's length in bars or in seconds, not both")
    if (bars is not None and bars < 1) or (seconds is not None and seconds <= 0):
        raise ValueError(f"a prompt needs a positive length, not bars={bars} seconds={seconds}")
    score = clip_score(read_prompt(path), bars, seconds)
    if score.note_num() == 0:
        raise ValueError(f"prompt {path} holds no notes (bars={bars}, seconds={seconds})")
    return tokenizer.midi_to_base_ids(score)


def read_prompt(path: str) -> symusic.Score:
    """The score of a prompt MIDI file (a path or an fsspec URL), refused in one line when it
    cannot be read."""
    try:
        return read_score(storage.read_bytes(str(path)))
    except (OSError, MidiFileError) as exc:
        raise ValueError(
            f"prompt={path} is not a readable MIDI file ({type(exc).__name__}: {exc})"
        ) from exc


def clip_score(
    score: symusic.Score, bars: int | None = None, seconds: float | None = None
) -> symusic.Score:
    """The first ``bars`` bars or ``seconds`` seconds of ``score`` (whole when neither is
    given); notes starting inside are kept whole."""
    if bars is not None:
        return score.clip(0, tick_at_bar(score, bars))
    if seconds is not None:
        return score.clip(0, tick_at_second(score, seconds))
    return score


def tick_at_bar(score: symusic.Score, bars: int) -> int:
    """The tick where bar ``bars`` (0-based) starts, through the score's time signatures (as
    ``barline_ticks`` places them)."""
    return next(islice(barline_ticks(score), bars, None))


def tick_at_second(score: symusic.Score, seconds: float) -> int:
    """The tick ``seconds`` into ``score``, through its tempo changes."""
    tick, elapsed, mspq = 0, 0.0, DEFAULT_MSPQ
    for tempo in sorted(score.tempos, key=lambda t: t.time):
        span = (tempo.time - tick) * mspq / 1e6 / score.ticks_per_quarter
        if elapsed + span >= seconds:
            break
        tick, elapsed, mspq = tempo.time, elapsed + span, tempo.mspq
    return tick + round((seconds - elapsed) * 1e6 / mspq * score.ticks_per_quarter)
