"""Reading a sweep: finished points with their N, D and C, and every other run set aside with
its reason; an absent, empty or foreign folder refused in one line."""

import dataclasses
import json
import math
from pathlib import Path

import pytest

from data_pipeline.errors import InputError
from mtrain.model import GPTConfig
from mtrain.runs.run_dir import RunDir
from mtrain.scaling_laws.points import read_sweep
from mtrain.training.compute_budget import plan

MODEL = GPTConfig(depth=1, aspect_ratio=16, max_seq_len=64).with_vocab(200)
BATCH = 256
BUDGET = 2e9


def write_run(root: Path, losses: list[float] | None, val: float | None = 1.5, **trainer) -> Path:
    """A run directory as the trainer leaves it: its Hydra config, its model shape and one
    metrics row per step taken (``losses``: training losses; the last row carries ``val``)."""
    run = RunDir(root)
    run.train_config.parent.mkdir(parents=True)
    trainer = {"flops_budget": BUDGET, "global_batch_tokens": BATCH, **trainer}
    run.train_config.write_text(json.dumps({"run_dir": str(root), "trainer": trainer}))
    if losses is None:
        return root
    run.model_config.write_text(json.dumps(dataclasses.asdict(MODEL)))
    rows = [{"step": i + 1, "train/loss": loss} for i, loss in enumerate(losses)]
    if rows and val is not None:
        rows[-1]["val/loss"] = val
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def steps() -> int:
    return plan(MODEL, BUDGET, BATCH).steps


def test_a_finished_run_is_a_point_with_its_n_d_and_c(tmp_path):
    write_run(tmp_path / "0", [5.0] + [2.0] * (steps() - 1))
    (point,) = read_sweep(tmp_path).points
    found = plan(MODEL, BUDGET, BATCH)
    assert (point.params, point.tokens, point.flops) == (found.params, found.tokens, found.flops)
    assert point.loss == 1.5 and point.depth == 1 and point.budget == BUDGET
    assert abs(point.flops / BUDGET - 1) < 0.5 / found.steps + 1e-9  # within half a step


@pytest.mark.parametrize(
    ("losses", "val", "reason"),
    [
        (lambda n: [5.0, math.nan] + [2.0] * (n - 2), 1.5, "diverged: non-finite loss at step 2"),
        (lambda n: [5.0] + [1.0] * (n // 2) + [2.5] * (n - n // 2 - 1), 2.4, "diverged: final val"),
        (lambda n: [5.0] * n, 6.0, "diverged: final validation loss 6.000 is no lower"),
        (lambda n: [5.0] * (n - 3), 1.5, "unfinished: step"),
        (lambda n: [5.0] * n, None, "no validation loss at its last step"),
        (lambda n: None, None, "unfinished: never started training"),
    ],
)
def test_bad_runs_are_set_aside_with_the_reason(tmp_path, losses, val, reason):
    write_run(tmp_path / "good", [5.0] + [2.0] * (steps() - 1))
    write_run(tmp_path / "bad", losses(steps()), val)
    sweep = read_sweep(tmp_path)
    assert [Path(p.run_dir).name for p in sweep.points] == ["good"]
    (aside,) = sweep.set_aside
    assert Path(aside.run_dir).name == "bad"
    assert aside.reason.startswith(reason)


def test_a_spike_the_run_recovers_from_is_no_divergence(tmp_path):
    n = steps()
    spiked = [5.0] + [2.0] * (n // 2) + [9.0] * max(1, n // 20)
    write_run(tmp_path / "spiked", spiked + [1.8] * (n - len(spiked)))
    (point,) = read_sweep(tmp_path).points
    assert Path(point.run_dir).name == "spiked"


def test_a_run_without_a_budget_is_no_point(tmp_path):
    write_run(tmp_path / "plain", [5.0, 2.0], flops_budget=None, max_steps=2)
    (aside,) = read_sweep(tmp_path).set_aside
    assert aside.reason == "no trainer.flops_budget: not a point of a compute grid"


def test_another_apps_hydra_output_is_set_aside_not_a_crash(tmp_path):
    write_run(tmp_path / "other", [5.0], trainer_key_of_another_version=1)
    (aside,) = read_sweep(tmp_path).set_aside
    assert aside.reason.startswith("not a training config this mtrain reads")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "absent", "is not a directory"),
        (lambda p: p, "holds no training run: a run directory has hydra/config.yaml"),
    ],
)
def test_an_absent_empty_or_foreign_folder_is_refused_in_one_line(tmp_path, make, message):
    (tmp_path / "notes.txt").write_text("not a sweep")
    with pytest.raises(InputError) as error:
        read_sweep(make(tmp_path))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_point_of_too_few_steps_is_set_aside_when_asked(tmp_path):
    write_run(tmp_path / "0", [5.0] + [2.0] * (steps() - 1))
    assert read_sweep(tmp_path, min_steps=steps()).points
    sweep = read_sweep(tmp_path, min_steps=steps() + 1)
    assert not sweep.points
    assert sweep.set_aside[0].reason == f"{steps()} steps, fewer than min_steps={steps() + 1}"


def test_repeats_of_one_size_on_one_budget_are_one_point_at_their_mean(tmp_path):
    for seed, val in (("seed1", 1.4), ("seed2", 1.6), ("seed3", 1.8)):
        write_run(tmp_path / "d1" / seed, [5.0] + [2.0] * (steps() - 1), val=val)
    write_run(tmp_path / "other_budget", [5.0] + [2.0] * (steps() - 1), flops_budget=2 * BUDGET)
    sweep = read_sweep(tmp_path)
    assert len(sweep.points) == 1 and len(sweep.set_aside) == 1  # the other budget: unfinished
    (point,) = sweep.points
    assert point.runs == 3
    assert point.loss == pytest.approx(1.6)
    assert point.loss_std == pytest.approx(math.sqrt(((0.2**2) * 2) / 3))
    (single,) = read_sweep(tmp_path / "d1" / "seed1").points
    assert (single.runs, single.loss, single.loss_std) == (1, 1.4, 0.0)
