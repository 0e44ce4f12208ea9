"""Verifying an export: the merged weights must reproduce the reference logits recorded at save
time, within a tolerance for the dtype they were computed in."""

from typing import NamedTuple

import torch

from mtrain.exported.logits_agreement import fp32_tolerance, logits_gap
from mtrain.model import GPT
from mtrain.runs.run_dir import CheckpointDir

# The dtypes a probe's logits may have been computed in (probe.pt's "dtype"; absent: fp32).
# Checkpoints record fp32 logits computed on the CPU from the weights the export merges
# (mtrain.training.checkpointer.probe_logits); those of older versions hold the training
# engine's own logits, in its dtype, and keep being checked as such.
PROBE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# An engine's bf16/fp16 logits: a few units in the last place of the logits' scale. The same
# weights cast to bf16 reproduce a CPU engine's logits exactly; ~1 ulp is what fp32-vs-bf16
# differs by.
HALF_ULPS = 4


class ProbeCheck(NamedTuple):
    max_abs_diff: float
    dtype: str
    tolerance: float
    agrees: bool


def probe_tolerance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    """The largest logit difference a correct merge may show against ``reference`` logits
    computed in ``dtype``."""
    if dtype == torch.float32:
        return fp32_tolerance(reference)
    scale = reference.abs().max().item()
    return max(fp32_tolerance(reference), HALF_ULPS * torch.finfo(dtype).eps * scale)


@torch.no_grad()
def probe_check(model: GPT, probe: dict) -> ProbeCheck:
    """Recomputes the probe batch's logits with ``model`` in the dtype the saved ones were
    computed in (fp32; an older checkpoint's engine's bf16/fp16 through a cast copy, ``model``
    itself stays fp32) and compares them with the saved ones."""
    name = probe.get("dtype", "float32")  # probes saved before the dtype was recorded: fp32
    if name not in PROBE_DTYPES:
        raise RuntimeError(f"probe logits computed in {name}, expected one of {list(PROBE_DTYPES)}")
    dtype = PROBE_DTYPES[name]
    model.eval()
    if dtype == torch.float32:
        logits = model(probe["inputs"]).logits
    else:
        # Tied parameters appear once in named_parameters(); functional_call ties them again.
        cast = {
            key: t.to(dtype) if t.is_floating_point() else t
            for key, t in [*model.named_parameters(), *model.named_buffers()]
        }
        logits = torch.func.functional_call(model, cast, (probe["inputs"],)).logits.float()
    reference = probe["logits"].float()
    gap = logits_gap(logits, reference, probe_tolerance(dtype, reference))
    return ProbeCheck(gap.max_abs_diff, name, gap.tolerance, gap.agrees)


def verify_against_probe(model: GPT, ckpt: CheckpointDir) -> ProbeCheck:
    """The consolidated model must reproduce the logits recorded at save time on a fixed
    batch, computed in their dtype: within ``fp32_tolerance`` for fp32 (the reference
    checkpoints record), within a few ulps of the logits' scale for an older checkpoint's
    bf16/fp16 engine logits."""
    check = probe_check(model, torch.load(ckpt.probe, weights_only=True))
    if not check.agrees:
        raise RuntimeError(
            f"the weights merged from {ckpt.path} give logits {check.max_abs_diff:.2e} away "
            f"from those recorded at save time on the probe batch (computed in {check.dtype}, "
            f"tolerance {check.tolerance:.2e}): the checkpoint is damaged or was saved by "
            "another model shape"
        )
    return check
