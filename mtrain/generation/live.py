"""Live call and response: a musician's bars are read as they are played (``hear``), and the
model answers each with a bar of its own (``answer``), yielding every note as soon as its last
token is drawn, so a player can sound it while the rest of the bar is still being decoded.

One sequence, one KV cache: a heard bar is prefilled in one forward pass, an answer costs
one forward pass per token, and nothing already read is read again until the context is full
(the window then slides as ``decoding.decode``'s does: the head, then the latest half of the
music, prefilled once). The sampling grammar holds every answer valid, as in ``compose``.
"""

import time
from collections.abc import Iterator
from dataclasses import dataclass

import miditok
import numpy as np
import torch

from data_pipeline.errors import ConfigError
from data_pipeline.tokenizer import MusicTokenizer
from mtrain.generation.few_rows import use_few_row_linears
from mtrain.generation.grammar import Cursor, RemiRules, piece_grammar
from mtrain.generation.prompts import continuation_banned_ids
from mtrain.generation.sampling import Sampler, SamplingConfig
from mtrain.model import GPT


@dataclass(frozen=True)
class LiveNote:
    """A note as it is decoded: onset and duration in quarter notes from the session's start,
    the bar it sounds in (from 1), and when it was ready (``time.perf_counter``)."""

    bar: int
    onset: float
    duration: float
    pitch: int
    velocity: int
    program: int
    ready_at: float


class RemiClock:
    """Reads REMI base tokens one by one and says when a note is whole, and where it sounds:
    Bar and TimeSig move the bar, Position the onset, a note's last part completes it."""

    def __init__(self, base: miditok.REMI):
        self.rules = RemiRules.of(base)
        self.bar, self.bar_start, self.bar_quarters = 0, 0.0, 4.0
        self.denominator, self.onset = 4, 0.0
        self.note: dict[str, str] = {}

    def read(self, base_id: int) -> dict | None:
        """The note ``base_id`` completes (its fields), or None."""
        kind, value = self.rules.names[base_id]
        if kind == "Bar":
            self.bar_start += self.bar_quarters if self.bar else 0.0
            self.bar, self.onset = self.bar + 1, 0.0
        elif kind == "TimeSig":
            numerator, denominator = (int(v) for v in value.split("/"))
            self.denominator, self.bar_quarters = denominator, numerator * 4 / denominator
        elif kind == "Position":
            per_quarter = self.rules.positions_per_beat * self.denominator / 4
            self.onset = int(value) / per_quarter
        elif kind in self.rules.note_parts or kind == "PitchDrum":
            self.note[kind] = value
            if kind == self.rules.note_parts[-1]:
                note, self.note = self.note, {}
                return note
        return None

    def note_of(self, parts: dict[str, str], ready_at: float) -> LiveNote:
        pitch = parts.get("Pitch", parts.get("PitchDrum", "0"))
        beats = [int(v) for v in parts.get("Duration", "1.0.1").split(".")]
        duration = (beats[0] + beats[1] / beats[2]) * 4 / self.denominator
        return LiveNote(
            bar=self.bar,
            onset=self.bar_start + self.onset,
            duration=duration,
            pitch=int(pitch),
            velocity=int(parts.get("Velocity", "64")),
            program=int(parts.get("Program", "0")),
            ready_at=ready_at,
        )


class LiveSession:
    """Call and response with one model: ``hear(bar)`` the musician's bar (REMI base ids, from
    its Bar token), then ``for note in answer(): ...`` the model's bar, note by note."""

    def __init__(
        self,
        model: GPT,
        tokenizer: MusicTokenizer,
        sampling: SamplingConfig,
        labels: dict[str, str] | None = None,
        max_bar_tokens: int = 256,
    ):
        if not isinstance(tokenizer.base, miditok.REMI) or tokenizer.bar_id is None:
            raise ConfigError(
                f"live sessions read and answer whole bars of REMI: the model's tokenizer is "
                f"{type(tokenizer.base).__name__}; train one on a dataset prepared with "
                "tokenizer=remi"
            )
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_bar_tokens = max_bar_tokens
        use_few_row_linears(model)
        self.head = tokenizer.head(labels or {})
        self.context = model.config.max_seq_len
        if len(self.head) + 2 * max_bar_tokens > self.context:
            max_bar_tokens = (self.context - len(self.head)) // 2
            self.max_bar_tokens = max_bar_tokens
        self.grammar = piece_grammar(tokenizer, model.device)
        self.cursor = Cursor(self.grammar, 1)
        self.clock = RemiClock(tokenizer.base)
        # EOS too: a live session ends when the musician stops, not when the model would.
        banned = [*continuation_banned_ids(tokenizer), tokenizer.eos_id]
        self.sampler = Sampler(sampling, banned, model.device)
        self.openers = set(self.grammar.bar_openers)
        self.bar_id = int(tokenizer.encode_base(np.array([tokenizer.bar_id]))[0])
        self.ids: list[int] = []  # every id of the session
        self.fed = 0  # of ``ids``, those the cache holds (from the window's start)
        self.window_start = len(self.head)  # the first music id the window holds
        self.cache = model.new_kv_cache(1, self.context)
        self._read(self.head)

    def hear(self, base_ids: np.ndarray) -> None:
        """A bar the musician played, as REMI base ids from its Bar token: read into the
        context now (one forward pass), so an answer starts from it at once."""
        base_ids = np.asarray(base_ids, dtype=np.int64)
        if not len(base_ids) or int(base_ids[0]) != self.tokenizer.bar_id:
            raise ValueError("hear() takes one bar of base ids, from its Bar token")
        self._read(self.tokenizer.encode_base(base_ids).tolist())
        self._forward()

    @torch.no_grad()  # not inference_mode: the grammar grows its tables in place outside it
    def answer(self) -> Iterator[LiveNote]:
        """The model's bar after what it heard: its notes, each yielded once its last token is
        drawn. The bar ends where the model opens another (that Bar is not kept: the
        musician's next bar brings its own) or after ``max_bar_tokens`` tokens."""
        self._read([self.bar_id])
        for _ in range(self.max_bar_tokens):
            logits = self.cursor.constrain(self._forward())
            token = int(self.sampler.draw(logits)[0])
            if token in self.openers:
                return
            yield from self._read([token])

    def _read(self, ids: list[int]) -> list[LiveNote]:
        notes = []
        for model_id in ids:
            self.ids.append(model_id)
            self.cursor.read(0, model_id)
            for base_id in self.tokenizer.decode_base(np.array([model_id])).tolist():
                parts = self.clock.read(base_id)
                if parts is not None:
                    notes.append(self.clock.note_of(parts, time.perf_counter()))
        return notes

    @torch.no_grad()  # not inference_mode: the grammar grows its tables in place outside it
    def _forward(self) -> torch.Tensor:
        """Feeds the ids the cache lacks; the logits [1, vocab] after the last one."""
        unfed = len(self.ids) - self.fed
        if self.cache.pos + unfed > self.context:
            # Slide: the head, then the latest half of the window's music, read afresh.
            keep = (self.context - len(self.head)) // 2
            self.window_start = max(len(self.head), len(self.ids) - keep)
            self.cache.pos, self.fed = 0, self.window_start
            window = self.head + self.ids[self.window_start :]
        else:
            window = self.ids[self.fed :]
        fed = torch.tensor([window], dtype=torch.long, device=self.model.device)
        self.fed = len(self.ids)
        return self.model(fed, kv_cache=self.cache).logits[:, -1]
