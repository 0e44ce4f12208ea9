"""The decoding loop: batched sampling from a GPT with its KV cache, one token per step, past
the model's context by sliding a window that keeps the piece's head."""

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from mtrain.generation.controls import Steering
from mtrain.generation.few_rows import use_few_row_linears
from mtrain.generation.grammar import Cursor, GrammarTable
from mtrain.generation.sampling import Sampler, SamplingConfig
from mtrain.model import GPT


class Stop(enum.StrEnum):
    """What ended a row of sampling."""

    stop_token = "stop_token"  # drew stop_id (EOS)
    max_new_tokens = "max_new_tokens"
    max_bars = "max_bars"
    max_seconds = "max_seconds"


class LengthMeter(Protocol):
    """Follows one row token by token (its prompt, then each drawn token) and says when the
    row has reached a length it measures (see ``timeline.Timeline``)."""

    def read(self, token: int) -> Stop | None: ...


@dataclass
class Continuation:
    """A row's new tokens (the one that stopped it last, kept) and what stopped it."""

    tokens: list[int]
    stop: Stop
    # The new tokens up to the last place the grammar let the music end (all without one):
    # a row cut by a length limit keeps these, whole events only.
    whole: int | None = None

    @property
    def complete(self) -> list[int]:
        """The tokens, cut back to whole events when a limit (not a stop token) ended them."""
        if self.stop == Stop.stop_token or self.whole is None:
            return self.tokens
        return self.tokens[: self.whole]


@torch.inference_mode()
def decode(
    model: GPT,
    prompt_ids: Sequence[Sequence[int]] | torch.Tensor,
    sampling: SamplingConfig,
    stop_id: int | None = None,
    *,
    banned_ids: Sequence[int] = (),
    head: int = 1,
    meters: Sequence[LengthMeter] = (),
    use_cache: bool = True,
    grammar: GrammarTable | None = None,
    grammar_from: Sequence[int] | None = None,
    steering: Steering | None = None,
) -> list[Continuation]:
    """Continues each prompt (id lists, or a LongTensor [batch, time]) until it draws
    ``stop_id``, its meter (one per row, if given) reports a length reached, or it has
    ``sampling.max_new_tokens`` new tokens. ``banned_ids`` are never drawn, nor what
    ``grammar`` forbids after the tokens of each row from its ``grammar_from`` on (0 each:
    the whole prompt), narrowed by ``steering`` where bar controls are asked. The model should
    be in eval mode.

    Sequences may grow past ``model.config.max_seq_len``: the model then reads a window, the
    first ``head`` tokens (BOS and the labels: what the piece is) followed by the latest
    tokens. When the window is full it slides by half of its music part and is prefilled
    again, from position 0, so learned and rotary positions alike see what they saw in
    training: a run of positions from 0. Half trades context for speed: each token is drawn
    with at least half a window of music behind it, and the re-prefill (one forward pass over
    half a window, fast as it is one matrix product per layer) comes once per half window of
    tokens. While a sequence fits, nothing slides and the tokens are those of a plain KV-cache
    loop. The repetition penalty counts the tokens in the window.

    Prompts may differ in length, without padding (the model has no mask for it): the common
    length is prefilled in one forward pass, then the longer prompts' own tokens are fed where
    the others draw. Without the cache every step runs the model over the whole window again,
    the baseline the cache is measured against.
    """
    prompts = [[int(i) for i in row] for row in prompt_ids]
    context = model.config.max_seq_len
    if not prompts or min(map(len, prompts)) == 0:
        raise ValueError("generation needs one prompt or more, each of one token (BOS) or more")
    if not 0 <= head <= min(map(len, prompts)) or context - head < 2:
        raise ValueError(
            f"head={head} tokens must be in every prompt (shortest: "
            f"{min(map(len, prompts))}) and leave 2 or more of model.max_seq_len={context}"
        )
    if meters and len(meters) != len(prompts):
        raise ValueError(f"{len(meters)} length meters for {len(prompts)} prompts: give one each")
    lengths = [len(p) for p in prompts]
    ends = [n + sampling.max_new_tokens for n in lengths]  # exclusive; moved up by a stop
    stops = [Stop.max_new_tokens] * len(prompts)
    for row, meter in enumerate(meters):
        for token in prompts[row]:
            if reached := meter.read(token):  # the prompt alone is long enough
                ends[row], stops[row] = lengths[row], reached
                break
    use_few_row_linears(model)
    device = model.device
    tokens = torch.zeros(len(prompts), max(ends), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(prompt, device=device)
    window = Window(tokens, head, context)
    cache = model.new_kv_cache(len(prompts), min(context, max(ends))) if use_cache else None
    sampler = Sampler(sampling, banned_ids, device)
    cursor = None
    if grammar is not None:
        cursor = Cursor(grammar, len(prompts), steering=steering)
        reads_from = list(grammar_from) if grammar_from is not None else [0] * len(prompts)
        for row, prompt in enumerate(prompts):
            for token in prompt[reads_from[row] : min(lengths)]:
                cursor.read(row, token)
    watch = stop_id is not None or bool(meters)  # else no row ends before its budget
    longest = max(lengths)
    for t in range(min(lengths), max(ends)):
        if t >= max(ends):
            break
        if window.slide_for(t) and cache is not None:
            cache.pos = 0
        fed = window.tokens(t) if cache is None else window.unseen(t, cache.pos)
        logits = model(fed, kv_cache=cache).logits[:, -1]
        if cursor is not None:
            logits = cursor.constrain(logits)
        seen = window.tokens(t) if sampler.reads_history else None
        drawn = sampler.draw(logits, seen)
        if cursor is not None:
            drawn = cursor.settle(drawn)
        if t >= longest:
            tokens[:, t] = drawn
        else:  # rows still reading their prompt keep its token
            in_prompt = torch.tensor([t < n for n in lengths], device=device)
            tokens[:, t] = torch.where(in_prompt, tokens[:, t], drawn)
        if cursor is not None:
            written = tokens[:, t].tolist()
            for row, token in enumerate(written):
                if t >= ends[row]:
                    cursor.end(row)
                elif t >= reads_from[row]:
                    cursor.read(row, token)
        if watch:
            for row, token in enumerate(drawn.tolist()):
                if not lengths[row] <= t < ends[row]:
                    continue
                reached = Stop.stop_token if token == stop_id else None
                if reached is None and meters:
                    reached = meters[row].read(token)
                if reached:
                    ends[row], stops[row] = t + 1, reached
    rows = zip(tokens.tolist(), lengths, ends, stops, strict=True)
    continued = [Continuation(row[start:end], stop) for row, start, end, stop in rows]
    if cursor is not None:
        for row, new in enumerate(continued):
            # Tokens read that were the prompt's: the row's own from reads_from on.
            given = max(0, lengths[row] - reads_from[row])
            new.whole = min(len(new.tokens), max(0, cursor.whole[row] - given))
    return continued


class Window:
    """What the model reads of the sequences ``tokens`` [batch, time] at each step: the first
    ``head`` tokens, then those from ``start`` on, ``context`` positions at most."""

    def __init__(self, tokens: torch.Tensor, head: int, context: int):
        self.all, self.head, self.context = tokens, head, context
        self.start = head
        self.slide = (context - head) // 2

    def slide_for(self, t: int) -> bool:
        """Moves the window on, if tokens up to ``t`` (exclusive) no longer fit; whether it
        moved (the KV cache then holds other positions and must be refilled)."""
        if self.head + t - self.start <= self.context:
            return False
        self.start = t - (self.context - self.head) + self.slide
        return True

    def tokens(self, t: int) -> torch.Tensor:
        """The window up to ``t`` (exclusive)."""
        if self.start == self.head:
            return self.all[:, :t]
        return torch.cat([self.all[:, : self.head], self.all[:, self.start : t]], dim=1)

    def unseen(self, t: int, cached: int) -> torch.Tensor:
        """The window's tokens after its first ``cached``, which a KV cache already holds."""
        if cached == 0:
            return self.tokens(t)
        return self.all[:, self.start + cached - self.head : t]
