"""New music from a trained GPT: prompts from labels and MIDI, batched sampling with the KV
cache, and generated tokens turned back into a valid MIDI score."""

import logging
from collections import Counter
from collections.abc import Sequence

import miditok
import numpy as np
import symusic
import torch

from data_pipeline import storage
from data_pipeline.midi_file import MidiFileError, read_score
from data_pipeline.tokenizer import SPECIAL_TOKENS, MusicTokenizer, label_token
from mtrain.data import document
from mtrain.model import GPT
from mtrain.sampling import SamplingConfig, disallow, next_token

log = logging.getLogger(__name__)
# MIDI's tempo before the first tempo change: 120 bpm, in microseconds per quarter note.
DEFAULT_MSPQ = 500_000

# ---- sampling loop -----------------------------------------------------------------------


@torch.inference_mode()
def generate(
    model: GPT,
    prompt_ids: Sequence[Sequence[int]] | torch.Tensor,
    sampling: SamplingConfig,
    stop_id: int | None,
    max_len: int | None = None,
    *,
    banned_ids: Sequence[int] = (),
    use_cache: bool = True,
) -> list[list[int]]:
    """The new tokens of each prompt (id lists, or a LongTensor [batch, time]); a row ends on
    drawing ``stop_id`` (kept as its last token), after ``sampling.max_new_tokens``, or when the
    whole sequence reaches ``max_len`` (the model's max_seq_len by default, and at most).
    ``banned_ids`` are never drawn. The model should be in eval mode.

    Prompts may differ in length, without padding (the model has no mask for it): the common
    length is prefilled in one forward pass, then the longer prompts' own tokens are fed where
    the others draw. With the KV cache each later step feeds one token; without it every step
    runs the model over the whole sequence again, the baseline the cache is measured against.
    """
    prompts = [[int(i) for i in row] for row in prompt_ids]
    limit = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
    if not prompts or min(map(len, prompts)) == 0:
        raise ValueError("generation needs one prompt or more, each of one token (BOS) or more")
    longest = max(map(len, prompts))
    if longest > limit:
        raise ValueError(
            f"a prompt of {longest} tokens is longer than the limit of {limit} positions "
            f"(model.max_seq_len={model.config.max_seq_len}): shorten it"
        )
    device = model.wte.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    total = min(limit, longest + sampling.max_new_tokens)
    tokens = torch.zeros(len(prompts), total, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(prompt, device=device)
    # Where each row's new tokens end (exclusive): moved forward when the row draws stop_id.
    ends = (lengths + sampling.max_new_tokens).clamp(max=total)
    cache = model.new_kv_cache(len(prompts), total) if use_cache else None
    generator = torch.Generator(device).manual_seed(sampling.seed)
    for t in range(int(lengths.min()), total):
        if bool((ends <= t).all()):
            break
        fed = cache.pos if cache is not None else 0
        logits = model(tokens[:, fed:t], kv_cache=cache).logits[:, -1]
        drawn = next_token(disallow(logits, banned_ids), tokens[:, :t], sampling, generator)
        in_prompt = t < lengths
        tokens[:, t] = torch.where(in_prompt, tokens[:, t], drawn)
        if stop_id is not None:
            stopped = ~in_prompt & (drawn == stop_id) & (t < ends)
            ends = torch.where(stopped, t + 1, ends)
    return [
        row[start:end]
        for row, start, end in zip(tokens.tolist(), lengths.tolist(), ends.tolist(), strict=True)
    ]


def generate_without_cache(
    model: GPT,
    prompt_ids: Sequence[Sequence[int]] | torch.Tensor,
    sampling: SamplingConfig,
    stop_id: int | None,
    **options,
) -> list[list[int]]:
    """``generate`` with a full forward pass over the sequence at every step: the same tokens,
    the baseline of the benchmark's KV-cache speed-up."""
    return generate(model, prompt_ids, sampling, stop_id, use_cache=False, **options)


# ---- prompts -----------------------------------------------------------------------------


def specials_but_eos(tokenizer: MusicTokenizer) -> list[int]:
    """PAD, BOS and MASK: never drawn, whatever the prompt (EOS ends a piece)."""
    return [i for i in range(len(SPECIAL_TOKENS)) if i != tokenizer.eos_id]


def continuation_banned_ids(tokenizer: MusicTokenizer) -> list[int]:
    """Ids a continuation must never draw: the specials but EOS, and the conditioning labels,
    which belong to the head of a piece only."""
    return specials_but_eos(tokenizer) + list(range(tokenizer.label_offset, tokenizer.vocab_size))


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
    """[BOS, label ids..., prompt tokens...]: a training document's head (mtrain.data.document)
    without its EOS, for the model to continue."""
    labels = labels or {}
    validate_labels(tokenizer, labels)
    base_ids = np.zeros(0, np.int64) if prompt_base_ids is None else prompt_base_ids
    return document(tokenizer, labels, base_ids)[:-1].tolist()


def prompt_from_midi(
    tokenizer: MusicTokenizer, path: str, bars: int | None = None, seconds: float | None = None
) -> np.ndarray:
    """Base ids of the first ``bars`` bars or ``seconds`` seconds of a MIDI file (a path or an
    fsspec URL); all of it when neither is given. Notes starting inside are kept whole."""
    if bars is not None and seconds is not None:
        raise ValueError("give the prompt's length in bars or in seconds, not both")
    if (bars is not None and bars < 1) or (seconds is not None and seconds <= 0):
        raise ValueError(f"a prompt needs a positive length, not bars={bars} seconds={seconds}")
    try:
        score = read_score(storage.read_bytes(str(path)))
    except (OSError, MidiFileError) as exc:
        raise ValueError(
            f"prompt={path} is not a readable MIDI file ({type(exc).__name__}: {exc})"
        ) from exc
    score = clip_score(score, bars, seconds)
    if score.note_num() == 0:
        raise ValueError(f"prompt {path} holds no notes (bars={bars}, seconds={seconds})")
    return tokenizer.midi_to_base_ids(score)


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
    """The tick where bar ``bars`` (0-based) starts, through the score's time signatures
    (4/4 before the first one, as in MIDI)."""
    tick, bar, ticks_per_bar = 0, 0, 4 * score.ticks_per_quarter
    for sig in sorted(score.time_signatures, key=lambda s: s.time):
        # A time signature takes effect at the next bar line at or after it.
        bars_before = -(-(sig.time - tick) // ticks_per_bar)
        if bar + bars_before >= bars:
            break
        tick, bar = tick + bars_before * ticks_per_bar, bar + bars_before
        ticks_per_bar = score.ticks_per_quarter * 4 * sig.numerator // sig.denominator
    return tick + (bars - bar) * ticks_per_bar


def tick_at_second(score: symusic.Score, seconds: float) -> int:
    """The tick ``seconds`` into ``score``, through its tempo changes."""
    tick, elapsed, mspq = 0, 0.0, DEFAULT_MSPQ
    for tempo in sorted(score.tempos, key=lambda t: t.time):
        span = (tempo.time - tick) * mspq / 1e6 / score.ticks_per_quarter
        if elapsed + span >= seconds:
            break
        tick, elapsed, mspq = tempo.time, elapsed + span, tempo.mspq
    return tick + round((seconds - elapsed) * 1e6 / mspq * score.ticks_per_quarter)


# ---- tokens to MIDI ----------------------------------------------------------------------

NOTE_KINDS = ("Program", "Pitch", "PitchDrum", "Velocity", "Duration")


class RemiRepair:
    """Rewrites any REMI token sequence into the grammar MidiTok's REMI encoder writes::

        (Bar TimeSig? (Position Tempo? note*)*)*    note = Program? Pitch Velocity Duration

    (TimeSig with use_time_signatures, Program with use_programs, PitchDrum for Pitch after
    Program_-1), counting each token dropped or inserted by rule. It covers the REMI token
    families data_pipeline's tokenizers use (Bar, TimeSig, Position, Tempo, Program, Pitch,
    PitchDrum, Velocity, Duration); any other family is dropped as ``unknown_token``. One
    instance reads one sequence: use ``repair``.
    """

    def __init__(self, base: miditok.REMI):
        cfg = base.config
        self.names = {i: tuple(name.split("_", 1)) for name, i in base.vocab.items()}
        parts = [("Program", cfg.use_programs), ("Pitch", True), ("Velocity", cfg.use_velocities)]
        parts.append(("Duration", cfg.using_note_duration_tokens))
        self.note_parts = [kind for kind, used in parts if used]
        # Drums are Program_-1 PitchDrum_x, every other program Pitch_x.
        self.drums_by_program = cfg.use_programs and cfg.use_pitchdrum_tokens
        self.positions_per_beat = cfg.max_num_pos_per_beat
        self.uses_time_signatures = cfg.use_time_signatures
        # The decoder's time signature until the first TimeSig token.
        self.time_signature = base.vocab.get("TimeSig_4/4")
        self.bar_length = 4 * self.positions_per_beat
        self.kept: list[int] = []
        self.repairs: Counter[str] = Counter()
        self.note: list[int] = []  # the note being read, written once complete
        self.position: tuple[int, int] | None = None  # (token, value) waiting for an event
        self.bar_position = -1  # the last position written in this bar
        self.needs_time_signature = False
        self.note_starts = self._next_kinds()

    def __call__(self, base_ids: list[int]) -> tuple[list[int], Counter[str]]:
        handlers = {
            "Bar": self._bar,
            "TimeSig": self._time_signature,
            "Position": self._position,
            "Tempo": self._tempo,
        }
        for token in base_ids:
            kind, value = self.names[token]
            if kind in NOTE_KINDS:
                self._note_token(token, kind)
                continue
            self._drop_note()
            if kind in handlers:
                handlers[kind](token, value)
            else:
                self.repairs["unknown_token"] += 1
        self._drop_note()
        self._drop_position()
        return self.kept, self.repairs

    def _next_kinds(self) -> tuple[str, ...]:
        """The kinds that may come next in the note being read, or start one."""
        part = self.note_parts[len(self.note)]
        if part != "Pitch":
            return (part,)
        if not self.drums_by_program:
            return ("Pitch", "PitchDrum")
        return ("PitchDrum",) if self.names[self.note[0]][1] == "-1" else ("Pitch",)

    def _note_token(self, token: int, kind: str) -> None:
        if self.note and kind in self._next_kinds():
            self.note.append(token)
        elif kind in self.note_starts:
            self._drop_note()
            self.note = [token]
        else:  # a Velocity or Duration without its Pitch, a Pitch without its Program
            self.repairs["stray_note_token"] += 1
            return
        if len(self.note) == len(self.note_parts):
            if self.position is None and self.bar_position < 0:
                # The decoder would put it on the downbeat, where the encoder writes Position_0.
                self.repairs["note_without_position"] += len(self.note)
            else:
                self._write(*self.note)
            self.note = []

    def _bar(self, token: int, _value: str) -> None:
        self._drop_position()
        self._write(token)
        self.bar_position = -1
        self.needs_time_signature = self.uses_time_signatures

    def _time_signature(self, token: int, value: str) -> None:
        if not self.needs_time_signature or self.position is not None:
            self.repairs["stray_time_signature"] += 1
            return
        self.needs_time_signature = False
        self._write(token)
        self.time_signature = token
        self.bar_length = int(value.split("/")[0]) * self.positions_per_beat

    def _position(self, token: int, value: str) -> None:
        if int(value) <= self.bar_position:
            self.repairs["position_backwards"] += 1
        elif int(value) >= self.bar_length:
            self.repairs["position_past_bar"] += 1
        else:
            self._drop_position()
            self.position = (token, int(value))

    def _tempo(self, token: int, _value: str) -> None:
        if self.position is None:
            self.repairs["stray_tempo"] += 1
        else:
            self._write(token)

    def _write(self, *tokens: int) -> None:
        """Appends ``tokens`` after the TimeSig their bar lacks and the Position they are at."""
        if self.needs_time_signature:
            self.kept.append(self.time_signature)
            self.repairs["missing_time_signature"] += 1
            self.needs_time_signature = False
        if self.position is not None:
            self.kept.append(self.position[0])
            self.bar_position = self.position[1]
            self.position = None
        self.kept.extend(tokens)

    def _drop_note(self) -> None:
        if self.note:
            self.repairs["incomplete_note"] += len(self.note)
            self.note = []

    def _drop_position(self) -> None:
        if self.position is not None:
            self.repairs["empty_position"] += 1
            self.position = None


def follow_type_graph(
    base: miditok.MusicTokenizer, base_ids: list[int]
) -> tuple[list[int], Counter[str]]:
    """The generic filter for tokenizers other than REMI: keeps each token whose type may follow
    the last kept one in MidiTok's own grammar (``tokens_types_graph``), drops the rest."""
    kinds = {i: name.split("_")[0] for name, i in base.vocab.items()}
    kept: list[int] = []
    for token in base_ids:
        if not kept or kinds[token] in base.tokens_types_graph.get(kinds[kept[-1]], ()):
            kept.append(token)
    return kept, Counter(type_out_of_order=len(base_ids) - len(kept))


def repair(tokenizer: MusicTokenizer, model_ids) -> tuple[list[int], Counter[str]]:
    """Base ids in an order MidiTok decodes as written, from any model ids, and the tokens
    dropped or inserted, by rule. Specials and labels are left out uncounted: not music."""
    base_ids = [int(i) for i in tokenizer.decode_base(model_ids)]
    if isinstance(tokenizer.base, miditok.REMI):
        return RemiRepair(tokenizer.base)(base_ids)
    return follow_type_graph(tokenizer.base, base_ids)


def to_midi(tokenizer: MusicTokenizer, model_ids) -> tuple[symusic.Score, int]:
    """A valid score from any model ids, and how many tokens were dropped or inserted to get
    it. REMI is repaired by its grammar; other tokenizers are filtered by MidiTok's type graph
    and, should MidiTok still fail to decode them, give an empty score with every token
    counted as repaired."""
    base_ids, repairs = repair(tokenizer, model_ids)
    empty = symusic.Score(tokenizer.base.time_division)
    if not base_ids:
        return empty, repairs.total()
    try:
        return tokenizer.base_ids_to_midi(base_ids), repairs.total()
    except Exception as exc:  # MidiTok's decoders assume well-formed input
        log.warning("MidiTok could not decode %d tokens (%r): empty score", len(base_ids), exc)
        return empty, repairs.total() + len(base_ids)
