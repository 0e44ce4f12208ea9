"""Whether two computations of the same batch's logits agree within a tolerance: the one rule
behind the export's checks (merged weights against the logits recorded at save time, the
transformers copy and the PEFT adapter over the base against the model)."""

import math
from typing import NamedTuple

import torch

# Two fp32 computations of the same logits by the same math in another order (another
# machine's kernels, another implementation) differ by rounding noise. A logit ends a chain of
# roundings through every layer, each relative to the values it rounds, so the noise follows
# the logits' scale and grows with depth: 2^-13 of the largest logit, two thousand times
# fp32's unit roundoff, leaves room for it at the depth of the largest model shapes
# (tests/unit/exported/test_precision.py measures it against fp64), and is still 64
# times finer than bf16's machine epsilon: weights rounded once to bf16 (a bf16 copy in place
# of the fp32 master weights) fail it. Logits near zero keep an absolute floor.
FP32_RELATIVE = 2**-13
FP32_TOLERANCE = 1e-4


def fp32_tolerance(reference: torch.Tensor) -> float:
    """The largest difference from fp32 ``reference`` logits that another correct fp32
    computation of them may show."""
    return max(FP32_TOLERANCE, FP32_RELATIVE * reference.abs().max().item())


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


@torch.no_grad()
def check_hf_logits(
    model: torch.nn.Module,
    hf_model,
    inputs: torch.Tensor,
    what: str,
    reference: str,
    cause: str,
    tolerance: float | None = None,
) -> float:
    """How far ``hf_model``'s (a ``transformers`` model's) logits on ``inputs`` [batch, time]
    are from ``model``'s own, computed in eval mode (its training mode restored after); a
    RuntimeError naming ``what`` gave them, ``reference`` (whose logits they missed) and the
    likely ``cause`` beyond ``tolerance`` (by default ``fp32_tolerance`` of the model's
    logits: both compute in fp32, in their own order)."""
    was_training = model.training
    ours = model.eval()(inputs).logits
    model.train(was_training)
    theirs = hf_model(input_ids=inputs, attention_mask=torch.ones_like(inputs)).logits
    tolerance = fp32_tolerance(ours) if tolerance is None else tolerance
    gap = logits_gap(theirs, ours, tolerance)
    if not gap.agrees:
        raise RuntimeError(
            f"{what} gives logits {gap.max_abs_diff:.2e} away from {reference} (tolerance "
            f"{tolerance:.2e}): {cause}"
        )
    return gap.max_abs_diff
