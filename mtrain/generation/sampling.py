"""Choosing the next token from a model's logits: repetition penalty, temperature, top-k,
top-p and min-p, drawn from a seeded generator so that a seed always gives the same music."""

import dataclasses
import math
from dataclasses import dataclass

import torch

from data_pipeline.errors import require


@dataclass
class SamplingConfig:
    """How new tokens are drawn: the keys of conf/generate/*.yaml's ``sampling``."""

    # 0 takes the most likely token (greedy); above 1 flattens the distribution.
    temperature: float = 1.0
    # Draw among the k most likely tokens only; 0 keeps them all.
    top_k: int = 0
    # Nucleus: draw among the fewest tokens whose probabilities add up to top_p; 1 keeps all.
    top_p: float = 1.0
    # Draw among the tokens at least min_p times as likely as the most likely one; 0 keeps all.
    min_p: float = 0.0
    # CTRL's penalty on tokens already in the sequence; 1 turns it off.
    repetition_penalty: float = 1.0
    seed: int = 0
    max_new_tokens: int = 512
    # Mask, at every step, the tokens the tokenizer's grammar forbids there (a piece ends only
    # after its first note): samples decode as drawn. False samples from the bare model.
    grammar: bool = True

    def __post_init__(self):
        require(
            self,
            "sampling",
            [
                (self.temperature >= 0, "temperature", "must be >= 0"),
                (self.top_k >= 0, "top_k", "must be >= 0"),
                (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
                (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
                (self.repetition_penalty > 0, "repetition_penalty", "must be > 0"),
                (self.max_new_tokens >= 0, "max_new_tokens", "must be >= 0"),
            ],
        )


def seeded_batches(
    count: int, batch_size: int, sampling: SamplingConfig
) -> list[tuple[int, SamplingConfig]]:
    """The rows and the sampling of each batch that draws ``count`` pieces ``batch_size`` at a
    time: batch b draws with seed ``sampling.seed + b``, so that a seed and a batch size always
    give the same pieces."""
    if count < 1 or batch_size < 1:
        raise ValueError(f"num_samples={count} and batch_size={batch_size} must be >= 1")
    return [
        (min(batch_size, count - first), dataclasses.replace(sampling, seed=sampling.seed + batch))
        for batch, first in enumerate(range(0, count, batch_size))
    ]


class Sampler:
    """``next_token`` as a decoding loop calls it: the seeded generator and the banned ids
    made once, not at every step."""

    def __init__(self, cfg: SamplingConfig, banned_ids, device):
        self.cfg = cfg
        self.generator = torch.Generator(device).manual_seed(cfg.seed)
        self.banned = torch.tensor(sorted(set(banned_ids)), dtype=torch.long, device=device)
        # Whether ``draw`` reads the tokens seen so far (the repetition penalty does).
        self.reads_history = cfg.repetition_penalty != 1.0

    def draw(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """One token per row [batch] from ``logits`` [batch, vocab]; never a banned id."""
        if self.banned.numel():
            logits = logits.index_fill(1, self.banned, float("-inf"))
        return next_token(logits, seen, self.cfg, self.generator)


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL (Keskar et al. 2019): the logit of every token in ``seen`` [batch, time] is divided
    by ``penalty`` when positive and multiplied by it when negative, so it always loses
    probability (for penalty > 1) whatever its sign."""
    scores = logits.gather(1, seen)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(1, seen, scores)


def next_token(
    logits: torch.Tensor,
    seen: torch.Tensor | None,
    cfg: SamplingConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """One token per row [batch] from ``logits`` [batch, vocab], given the tokens ``seen`` so
    far [batch, time] (prompt included, as in CTRL; None without a repetition penalty).

    In order: the repetition penalty; the temperature (0: argmax, nothing is drawn); top-k;
    top-p, which always keeps the most likely token; min-p, relative to the most likely token
    after temperature; then one draw from what is left. Filters only ever remove tokens, so
    tokens at -inf (banned) are never drawn. The filters work on the candidates sorted by
    likelihood, the top k alone when top-k is set: a draw among 50 candidates, not a softmax
    and a mask over the whole vocabulary at every step.
    """
    logits = logits.float()
    if cfg.repetition_penalty != 1.0 and seen is not None and seen.numel():
        logits = penalize_repeats(logits, seen, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / cfg.temperature
    if not (cfg.top_k or cfg.top_p < 1.0 or cfg.min_p):
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
    k = min(cfg.top_k or logits.size(-1), logits.size(-1))
    candidates, order = logits.topk(k, dim=-1)  # sorted, most likely first
    if cfg.top_p < 1.0:
        probs = candidates.softmax(dim=-1)
        # A token goes when the more likely ones already reach top_p: the first one never does.
        candidates = candidates.masked_fill(probs.cumsum(dim=-1) - probs >= cfg.top_p, -math.inf)
    if cfg.min_p > 0:
        # p < min_p * p_max, in logits: the softmax's normalisation cancels out.
        floor = candidates[:, :1] + math.log(cfg.min_p)
        candidates = candidates.masked_fill(candidates < floor, -math.inf)
    drawn = torch.multinomial(candidates.softmax(dim=-1), 1, generator=generator)
    return order.gather(1, drawn).squeeze(-1)
