"""A restart may switch how the model is computed, not what it is: a run resumed with
``trainer.activation_checkpointing=true`` finishes with the losses it would have had, and a
restart with another ``model.n_layer`` is still refused, naming the key."""

import shutil

import pytest
from support.apps import run_module
from support.trainings import losses, run, train_args

from data_pipeline.app import EXIT_INPUT

STEPS = 8


def test_a_restart_switches_activation_checkpointing_but_not_the_shape(bach_dataset, tmp_path):
    straight = tmp_path / "straight"
    half = STEPS // 2
    args = ["logger.mode=disabled", f"trainer.max_steps={STEPS}", f"trainer.save_every={half}"]
    code, out = run(train_args(bach_dataset, straight, *args), ranks=1)
    assert code == 0, out[-4000:]
    # The same run stopped after its middle checkpoint: its last one gone, as if killed.
    restarted = tmp_path / "restarted"
    shutil.copytree(straight, restarted)
    shutil.rmtree(restarted / "checkpoints" / f"step_{STEPS:08d}")

    checkpointed = [*args, "trainer.activation_checkpointing=true"]
    code, out = run(train_args(bach_dataset, restarted, *checkpointed), ranks=1)
    assert code == 0, out[-4000:]
    assert f"resumed from {restarted / 'checkpoints' / f'step_{half:08d}'}" in out, out[-4000:]
    assert "activation checkpointing on" in out
    expected, got = losses(straight), losses(restarted)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(half + 1, STEPS + 1):  # recomputed activations, the same numbers
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step

    reshaped = [*checkpointed, "model.n_layer=1"]
    code, out = run(train_args(bach_dataset, restarted, *reshaped), ranks=1)
    assert code == EXIT_INPUT and "model.n_layer: run 2, now 1" in out, out[-4000:]
    assert "init_distributed" not in out


def test_the_old_model_key_is_refused_naming_the_trainer_key(tmp_path):
    for old, new in [
        ("model.activation_checkpointing", "trainer.activation_checkpointing"),
        ("+model.compile", "trainer.compile"),
    ]:
        proc = run_module(
            "mtrain.train", "data.path=x", f"{old}=true", f"hydra.run.dir={tmp_path}", check=False
        )
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == EXIT_INPUT and len(lines) == 1, proc.stderr[-2000:]
        assert f"set {new} instead" in lines[0], lines
