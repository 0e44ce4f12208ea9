"""Export checks merged weights against the logits recorded at save time.

Checkpoints record fp32 logits computed on the CPU from the weights the export merges
(``reference_logits``): like for like with the export, whatever the engine computed in, and
fine enough that a weight rounded once to bf16, a swapped layer or a lost partition fails.
Older checkpoints hold the engine's logits in its dtype: a bf16 (or fp16) engine runs its module
in that dtype while ZeRO keeps fp32 master weights, and the same weights cast to bf16 reproduce
them. Here a cast copy fakes such an engine's probe (``tests/e2e/test_bf16_zero3.py`` trains
one under ZeRO-3 on 2 ranks and checks the recorded reference).
"""

import copy
from collections.abc import Mapping

import pytest
import torch

from mtrain.exported.logits_agreement import FP32_RELATIVE, fp32_tolerance
from mtrain.exported.verification import (
    probe_check,
    probe_tolerance,
    verify_against_probe,
)
from mtrain.model import GPT, GPTConfig
from mtrain.runs.run_dir import CheckpointDir
from mtrain.training.checkpointer import reference_logits

NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def trained_like_model(seed: int = 0, n_layer: int = 2, d_model: int = 64) -> GPT:
    """A tiny GPT with weights of a trained model's scale (logits of a few units)."""
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=97, n_layer=n_layer, n_head=2, d_model=d_model, max_seq_len=64)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(6.0)
    return model.eval()


def engine_probe(model: GPT, dtype: torch.dtype, with_dtype: bool = True) -> dict:
    """What an older checkpoint's probe holds: an engine's own logits, computed in ``dtype``."""
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
    assert check.dtype == "float32" and check.tolerance == fp32_tolerance(probe["logits"])
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
    # What failed before the dtype was recorded: fp32 compared with half precision.
    assert before > fp32_tolerance(probe["logits"])
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


# ---- the reference checkpoints record ------------------------------------------------------
def recorded_probe(model: GPT) -> dict:
    """What probe_logits records from an engine whose weights (ZeRO's fp32 master weights, or
    ZeRO-0's parameters) are ``model``'s: fp32 logits of a CPU model built from them."""
    inputs = torch.randint(model.config.vocab_size, (2, 64), generator=torch.Generator())
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    logits = reference_logits(model.config, weights, inputs)
    return {"inputs": inputs, "logits": logits, "dtype": "float32"}


def merged(model: GPT, change) -> GPT:
    """A copy of ``model`` whose flattened weights went through ``change`` (a merge's fault)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        flat = torch.nn.utils.parameters_to_vector(other.parameters())
        torch.nn.utils.vector_to_parameters(change(flat.clone()), other.parameters())
    return other


def test_the_recorded_reference_is_what_the_export_computes_from_the_same_weights():
    model = trained_like_model()
    probe = recorded_probe(model)
    check = probe_check(copy.deepcopy(model), probe)
    assert check.dtype == "float32" and check.max_abs_diff == 0.0
    assert check.tolerance == max(1e-4, FP32_RELATIVE * probe["logits"].abs().max().item())


def test_the_recorded_reference_is_refused_for_a_model_of_other_parameters():
    model = trained_like_model()
    weights = {name: p.detach() for name, p in model.named_parameters()}
    weights.pop("ln_f.weight")
    with pytest.raises(RuntimeError, match=r"missing \['ln_f.weight'\]"):
        reference_logits(model.config, weights, torch.zeros(1, 4, dtype=torch.long))


class ReadOnce(Mapping):
    """Weights handed out as a gathering mapping does (``GatheredWeights``): each read at most
    once before its release, and the most held at a time counted."""

    def __init__(self, weights: dict):
        self.weights, self.held, self.most, self.released = weights, {}, 0, set()

    def __iter__(self):
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)

    def __getitem__(self, name: str) -> torch.Tensor:
        assert name not in self.released, f"{name} read after its release"
        self.held[name] = self.weights[name]
        self.most = max(self.most, sum(w.numel() for w in self.held.values()))
        return self.held[name]

    def release(self, name: str) -> None:
        self.released.add(name)
        self.held.pop(name)


def test_the_reference_read_layer_by_layer_is_the_same_and_holds_a_block_at_a_time():
    """The probe at save time reads weights as the forward pass reaches them and lets each go
    after its last use (the tied embedding after the head): the same logits bit for bit, with
    at most the embeddings and one block's weights held, not the model's."""
    model = trained_like_model(n_layer=4)
    inputs = torch.randint(model.config.vocab_size, (2, 64), generator=torch.Generator())
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    lazy = ReadOnce(weights)
    assert torch.equal(reference_logits(model.config, lazy, inputs),
                       reference_logits(model.config, weights, inputs))  # fmt: skip
    assert lazy.released == set(weights)
    block = sum(p.numel() for p in model.blocks[0].parameters())
    embeddings = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("blocks"))
    assert lazy.most <= embeddings + block < sum(p.numel() for p in model.parameters()) / 2


def test_weights_rounded_to_bf16_a_swapped_layer_or_a_lost_partition_fail_the_reference():
    """The fp32 reference is strict: the bf16 copy of the weights merged in place of the fp32
    master weights, two blocks' weights swapped, or the last of 4 ranks' partitions of the
    flattened weights lost (zeros), each lies far outside the tolerance."""
    model = trained_like_model()
    probe = recorded_probe(model)
    tolerance = probe_tolerance(torch.float32, probe["logits"])

    def swap_blocks(flat: torch.Tensor) -> torch.Tensor:
        block = sum(p.numel() for p in model.blocks[0].parameters())
        start = next(i for i, (n, _) in enumerate(model.named_parameters()) if "blocks.0" in n)
        offset = sum(p.numel() for p in list(model.parameters())[:start])
        first = flat[offset : offset + block].clone()
        flat[offset : offset + block] = flat[offset + block : offset + 2 * block]
        flat[offset + block : offset + 2 * block] = first
        return flat

    faults = {
        "bf16 copy": lambda flat: flat.to(torch.bfloat16).float(),
        "swapped blocks": swap_blocks,
        "lost partition": lambda flat: torch.cat(
            [flat[: 3 * len(flat) // 4], 0 * flat[3 * len(flat) // 4 :]]
        ),
    }
    for fault, change in faults.items():
        check = probe_check(merged(model, change), probe)
        print(f"{fault}: {check.max_abs_diff:.2e} (tolerance {tolerance:.2e})")
        assert check.max_abs_diff > 10 * tolerance, fault


def test_fp32_rounding_noise_of_a_deep_model_lies_far_inside_the_tolerance():
    """The tolerance's derivation measured: one fp32 forward of 24 blocks of weights at a
    trained model's scale against fp64, the exact answer: any two correct fp32 computations
    lie within twice that of each other."""
    model = trained_like_model(n_layer=24, d_model=128)
    probe = recorded_probe(model)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(probe["inputs"]).logits
    noise = (probe["logits"].double() - exact).abs().max().item()
    tolerance = fp32_tolerance(probe["logits"])
    print(f"fp32 vs fp64 over 24 blocks: {noise:.2e}, tolerance {tolerance:.2e}")
    assert 2 * noise < tolerance / 20
