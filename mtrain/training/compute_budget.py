"""A run's length from a compute budget: ``trainer.flops_budget`` over the FLOPs of a step
(``flops.flops_per_token`` times the tokens of a step) gives ``trainer.max_steps``, so that the
points of a scaling-law grid each train for the compute they are given.
"""

import logging
from dataclasses import dataclass

from data_pipeline.errors import ConfigError
from mtrain.model import GPTConfig
from mtrain.training.config import TrainConfig
from mtrain.training.flops import flops_per_token, matmul_params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComputePlan:
    """What a budget buys a model: whole steps of ``tokens_per_step`` tokens, the last one
    taken when at least half of it fits (so the FLOPs spent are within half a step of it)."""

    flops_budget: float
    flops_per_token: float
    tokens_per_step: int
    steps: int
    # N of the scaling law: the weights a token is multiplied by (flops.matmul_params), the
    # output projection included, the embedding lookups not.
    params: int

    @property
    def tokens(self) -> int:
        """D of the scaling law: the tokens trained on."""
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        """C of the scaling law: the FLOPs the run spends."""
        return self.tokens * self.flops_per_token


def plan(model: GPTConfig, flops_budget: float, tokens_per_step: int) -> ComputePlan:
    """The steps ``flops_budget`` buys ``model`` (its vocabulary known) at ``tokens_per_step``
    tokens a step; refuses a budget that buys less than one step."""
    per_token = flops_per_token(model, model.max_seq_len)
    per_step = per_token * tokens_per_step
    steps = round(flops_budget / per_step)
    if steps < 1:
        raise ConfigError(
            f"trainer.flops_budget={flops_budget:g} buys less than one step of this model "
            f"({per_step:.3g} FLOPs: {per_token:.3g} per token x {tokens_per_step} tokens): "
            f"raise it to {per_step:.3g} or more, or lower trainer.global_batch_tokens"
        )
    return ComputePlan(flops_budget, per_token, tokens_per_step, steps, matmul_params(model))


def apply_budget(cfg: TrainConfig) -> ComputePlan | None:
    """Sets ``trainer.max_steps`` from ``trainer.flops_budget`` (None without one) once the
    model's vocabulary is known, and checks the schedule against it."""
    budget = cfg.trainer.flops_budget
    if budget is None:
        return None
    # Tokens per optimizer step over all ranks, whatever their number (config.batch_sizes).
    found = plan(cfg.model, budget, cfg.trainer.global_batch_tokens)
    cfg.trainer.max_steps = found.steps
    cfg.check_schedule()
    log.info(
        "compute budget %.3g FLOPs: %d steps of %d tokens = %d tokens (D) for N = %d "
        "parameters (non-embedding plus the output projection) at %.4g FLOPs/token; "
        "%.4g FLOPs spent",
        budget,
        found.steps,
        found.tokens_per_step,
        found.tokens,
        found.params,
        found.flops_per_token,
        found.flops,
    )
    return found
