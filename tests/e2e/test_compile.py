"""A compiled training: the eager losses, and parameter names without a compile wrapper's."""

import json

import pytest
import torch
from safetensors import safe_open
from support.trainings import launch, losses, train_args

from mtrain.exported.writing import WEIGHTS, export
from mtrain.model import GPT, GPTConfig


def test_compiled_training_has_the_eager_losses_and_plain_parameter_names(bach_dataset, tmp_path):
    """trainer.compile=true: DeepSpeed's engine.compile() (inductor) gives the eager losses step
    by step, and its checkpoint and export name parameters as the model does, with no
    "_orig_mod." of a torch.compile wrapper; the Llama block exports as LlamaForCausalLM."""
    shape = ["model.block=llama", "deepspeed.zero_stage=0", "trainer.max_steps=3"]
    runs = {"eager": tmp_path / "eager", "compiled": tmp_path / "compiled"}
    for name, run_dir in runs.items():
        extra = ["trainer.compile=true"] if name == "compiled" else []
        # torchrun for one rank: a free port of its own, beside other trainings
        proc = launch(train_args(bach_dataset, run_dir, *shape, *extra), ranks=1, torchrun=True)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
    eager, compiled = losses(runs["eager"]), losses(runs["compiled"])
    assert sorted(compiled) == [1, 2, 3]
    for step, loss in eager.items():
        assert compiled[step] == pytest.approx(loss, rel=1e-5, abs=1e-5), step
    checkpoint = runs["compiled"] / "checkpoints" / "step_00000003"
    saved = torch.load(checkpoint / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    exported = export(runs["compiled"], tmp_path / "export")
    with safe_open(exported / WEIGHTS, "pt") as weights:
        names = set(weights.keys())
    meta = json.loads((exported / "config.json").read_text())
    # model=tiny with the Llama block: its two blocks' names, whatever the widths.
    llama = GPTConfig(vocab_size=97, n_layer=2, n_head=2, d_model=32, block="llama")
    plain = set(GPT(llama).state_dict())
    assert set(saved) == plain and names <= plain and "blocks.0.mlp.gate.weight" in names
    assert meta["hf_architecture"] == "LlamaForCausalLM"
