"""Export checks merged weights against the training engine's logits in the engine's dtype.

A bf16 (or fp16) engine runs its module in that dtype while ZeRO keeps fp32 master weights;
the merged fp32 weights give logits about one bf16 ulp away from the engine's, the same
weights cast to bf16 reproduce them. Here a cast copy fakes the engine's probe
(``tests/e2e/test_bf16_zero3.py`` trains one under ZeRO-3 on 2 ranks).
"""

import copy

import pytest
import torch

from mtrain.exported.verification import (
    FP32_TOLERANCE,
    probe_check,
    probe_tolerance,
    verify_against_probe,
)
from mtrain.model import GPT, GPTConfig
from mtrain.runs.run_dir import CheckpointDir

NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def trained_like_model(seed: int = 0) -> GPT:
    """A tiny GPT with weights of a trained model's scale (logits of a few units)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=97, n_layer=2, n_head=2, d_model=64, max_seq_len=64))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(6.0)
    return model.eval()


def engine_probe(model: GPT, dtype: torch.dtype, with_dtype: bool = True) -> dict:
    """What probe_logits saves from an engine computing in ``dtype``."""
    inputs = torch.randint(model.config.vocab_size, (2, 64), generator=torch.Generator())
    engine_module = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        logits = engine_module(inputs).logits.float()
    probe = {"inputs": inputs, "logits": logits}
    return probe | {"dtype": NAMES[dtype]} if with_dtype else probe


def fp32_logits(model: GPT, probe: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(probe["inputs"]).logits


def test_old_probe_without_dtype_is_fp32_and_exact():
    model = trained_like_model()
    probe = engine_probe(model, torch.float32, with_dtype=False)
    check = probe_check(model, probe)
    assert check.dtype == "float32" and check.tolerance == FP32_TOLERANCE
    assert check.max_abs_diff < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_probe_is_reproduced_by_the_cast_weights(dtype):
    model = trained_like_model()
    probe = engine_probe(model, dtype)
    before = (fp32_logits(model, probe) - probe["logits"]).abs().max().item()
    check = probe_check(model, probe)
    scale = probe["logits"].abs().max().item()
    print(
        f"{dtype}: fp32 merge vs engine {before:.2e}, cast merge {check.max_abs_diff:.2e}, "
        f"tolerance {check.tolerance:.2e}, logit scale {scale:.2f}"
    )
    assert before > FP32_TOLERANCE  # what failed before: fp32 compared with half precision
    assert check.max_abs_diff == 0.0  # same weights, same dtype, same kernels on this CPU
    assert check.tolerance == pytest.approx(4 * torch.finfo(dtype).eps * scale)
    assert next(model.parameters()).dtype == torch.float32  # the exported model stays fp32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_perturbation_just_above_the_tolerance_fails(dtype, tmp_path):
    """Scaling the final norm's weight by (1 + r) scales the logits by (1 + r): a change of
    r * scale. Just above the tolerance it fails; well below it passes."""
    model = trained_like_model()
    probe = engine_probe(model, dtype)
    tolerance = probe_tolerance(dtype, probe["logits"])
    scale = probe["logits"].abs().max().item()
    ckpt = CheckpointDir(tmp_path / "step_00000001")
    ckpt.path.mkdir()
    torch.save(probe, ckpt.probe)

    def perturbed(r: float) -> GPT:
        bent = copy.deepcopy(model)
        with torch.no_grad():
            bent.ln_f.weight.mul_(1 + r)
        return bent

    assert verify_against_probe(perturbed(0.0), ckpt).max_abs_diff <= tolerance
    assert verify_against_probe(perturbed(0.2 * tolerance / scale), ckpt)
    r = 1.5 * tolerance / scale
    with pytest.raises(RuntimeError, match=f"computed in {NAMES[dtype]}.*damaged"):
        verify_against_probe(perturbed(r), ckpt)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_wrong_merge_or_shape_fails(dtype):
    model = trained_like_model()
    probe = engine_probe(model, dtype)
    swapped = copy.deepcopy(model)  # two ranks' partitions put back in the wrong order
    with torch.no_grad():
        a, b = swapped.blocks[0].mlp.up.weight, swapped.blocks[1].mlp.up.weight
        a_copy = a.clone()
        a.copy_(b)
        b.copy_(a_copy)
    check = probe_check(swapped, probe)
    assert check.max_abs_diff > 10 * check.tolerance
    other = trained_like_model()
    shorter = {**probe, "logits": probe["logits"][:, :32]}
    assert probe_check(other, shorter).max_abs_diff == float("inf")


def test_unknown_probe_dtype_is_refused():
    model = trained_like_model()
    probe = engine_probe(model, torch.float32) | {"dtype": "float8_e4m3fn"}
    with pytest.raises(RuntimeError, match="float8_e4m3fn"):
        probe_check(model, probe)
