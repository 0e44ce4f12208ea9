"""Whether two computations of the same batch's logits agree within a tolerance: the one rule
behind the export's checks (merged weights against the training engine, the transformers copy
against the model)."""

import math
from typing import NamedTuple

import torch


class LogitsGap(NamedTuple):
    """How far one computation of a batch's logits lies from another, and how far it may."""

    max_abs_diff: float
    tolerance: float

    @property
    def agrees(self) -> bool:
        return self.max_abs_diff <= self.tolerance  # NaN fails too


def logits_gap(logits: torch.Tensor, reference: torch.Tensor, tolerance: float) -> LogitsGap:
    """The largest absolute difference of ``logits`` from ``reference`` (infinite when their
    shapes differ: another model shape computed them), held to ``tolerance``."""
    if logits.shape != reference.shape:
        return LogitsGap(math.inf, tolerance)
    return LogitsGap((logits - reference).abs().max().item(), tolerance)
