"""Fine-tuning a model built already partitioned (deepspeed.zero_init=true under ZeRO-3): the
exported weights fill its empty placeholders, a gathered parameter at a time."""

import os

import torch
from safetensors.torch import load_file
from support.apps import run_module
from support.trainings import CPU_ENV, run, train_args


def test_init_from_fills_a_model_built_partitioned(bach_dataset, tmp_path):
    """2 ranks of ZeRO-3 start from an export with zero_init, at lr 0 (AdamW then changes no
    weight, weight decay included): the export of their checkpoint holds the same weights."""
    env = {**os.environ, **CPU_ENV}
    source = tmp_path / "source"
    code, out = run(train_args(bach_dataset, source, "trainer.max_steps=2"), ranks=1)
    assert code == 0, out[-4000:]
    run_module("mtrain.export", f"checkpoint={source}", f"output={tmp_path / 'a'}", env=env)
    tuned = tmp_path / "tuned"
    code, out = run(
        train_args(
            bach_dataset,
            tuned,
            "trainer.max_steps=2",
            "deepspeed.zero_init=true",
            f"init_from={tmp_path / 'a'}",
            "optim.lr=0",
        ),
        ranks=2,
    )
    assert code == 0, out[-4000:]
    log = (tuned / "train-rank0.log").read_text()
    share = float(log.split("parameter elements (")[1].split("%")[0])
    assert 40 <= share <= 60, share  # really partitioned over the 2 ranks
    run_module("mtrain.export", f"checkpoint={tuned}", f"output={tmp_path / 'b'}", env=env)
    want, got = (load_file(tmp_path / name / "model.safetensors") for name in ("a", "b"))
    # Not the tuned run's own initialisation: that is the source's before its 2 steps at a
    # learning rate above 0.
    assert want.keys() == got.keys()
    assert [name for name in want if not torch.equal(want[name], got[name])] == []
