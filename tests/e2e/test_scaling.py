"""A micro scaling sweep through the real multirun (one process, Hydra's basic launcher) and the
fit: each point its own run directory and wandb run of the sweep's group, resumed by the same
command, and mtrain.scaling's law, held-out check and figures from it."""

import json
import os
from pathlib import Path

import pytest
from support.apps import REPO, run_module

# Two sizes of the depth family made tiny (16 channels per layer, context 64) at three budgets
# of a second or two each, and a fourth budget too small for one step of the larger size.
DEPTHS, BUDGETS, TOO_SMALL = (1, 2), (2.5e8, 5e8, 1e9), 3e7
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def sweep_args(dataset: Path, sweep: Path) -> list[str]:
    return [
        "-m",
        f"data.path={dataset}",
        f"run_dir={sweep}",
        "model=scaling",
        "model.aspect_ratio=16",
        "model.max_seq_len=64",
        f"model.depth={','.join(map(str, DEPTHS))}",
        f"trainer.flops_budget={','.join(map(str, (TOO_SMALL, *BUDGETS)))}",
        "deepspeed=cpu",
        "deepspeed.zero_stage=0",
        "trainer.micro_batch_size=4",
        "trainer.global_batch_tokens=256",
        "trainer.eval_batches=2",
        "trainer.log_every=1000",
        "optim.lr=3e-3",
        "optim.warmup_fraction=0.1",
        "data.num_workers=0",
        "data.shuffle_buffer=16",
    ]


@pytest.fixture(scope="module")
def sweep(tiny_model, tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("scaling")
    args = sweep_args(tiny_model["dataset"], root / "sweep")
    return root / "sweep", run_module("mtrain.train", *args, env=ENV, check=False)


def trained(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent for p in sweep_dir.glob("*/metrics.jsonl"))


def test_a_point_that_fails_is_said_in_one_line_and_the_sweep_goes_on(sweep):
    """Depth 2 at the smallest budget cannot take one step: refused, the other 7 points trained,
    the sweep's exit code that of the refusal."""
    sweep_dir, proc = sweep
    assert proc.returncode == 2, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(said) == 2, said
    assert said[0].startswith("error: point ") and "buys less than one step" in said[0]
    assert said[1].startswith("error: 1 point(s) of the sweep failed")
    assert len(trained(sweep_dir)) == len(DEPTHS) * len(BUDGETS) + 1


def test_each_point_trains_in_its_own_run_dir_for_its_budget(sweep):
    sweep_dir, _ = sweep
    steps = {}
    for run in trained(sweep_dir):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert "val/loss" in rows[-1]
        assert (run / "checkpoints").is_dir()
        shape = json.loads((run / "model_config.json").read_text())
        budget = float(yaml_value(run / "hydra" / "config.yaml", "flops_budget"))
        steps[shape["depth"], budget] = rows[-1]["step"]
    # The budget, not a step count, set each run's length: more FLOPs, more steps; a larger
    # model, fewer.
    for depth in DEPTHS:
        assert [steps[depth, c] for c in BUDGETS] == sorted(steps[depth, c] for c in BUDGETS)
    assert all(steps[1, c] > steps[2, c] for c in BUDGETS)


def yaml_value(path: Path, key: str) -> str:
    return next(
        line.split(":", 1)[1].strip()
        for line in path.read_text().splitlines()
        if line.strip().startswith(f"{key}:")
    )


def test_every_point_is_a_wandb_run_of_the_sweeps_group(sweep):
    sweep_dir, _ = sweep
    ids = {(run / "wandb_run_id").read_text() for run in trained(sweep_dir)}
    assert len(ids) == len(trained(sweep_dir))
    for run in trained(sweep_dir):
        (record,) = run.glob("wandb/offline-run-*/run-*.wandb")
        # The group is a string field of the run's first record (wandb's Go core writes it).
        assert f"{sweep_dir.name}-{run.name}".encode() in record.read_bytes()
        assert sweep_dir.name.encode() in record.read_bytes()


def test_the_same_command_resumes_instead_of_training_again(sweep, tiny_model):
    sweep_dir, _ = sweep
    before = {p: p.read_text() for p in sweep_dir.glob("*/metrics.jsonl")}
    args = sweep_args(tiny_model["dataset"], sweep_dir)
    run_module("mtrain.train", *args, env={**ENV, "WANDB_MODE": "disabled"}, check=False)
    assert {p: p.read_text() for p in sweep_dir.glob("*/metrics.jsonl")} == before


def test_the_law_and_its_held_out_check_come_from_the_sweep(sweep, tmp_path):
    sweep_dir, _ = sweep
    out = tmp_path / "law"
    args = (f"sweep_dir={sweep_dir}", f"output={out}", "starts=2")
    proc = run_module("mtrain.scaling", *args, env=ENV)
    law = json.loads((out / "law.json").read_text())
    assert len(law["points"]) == len(DEPTHS) * len(BUDGETS) + 1
    (aside,) = law["set_aside"]  # the point refused before it trained
    assert aside["reason"].startswith("unfinished: never started training")
    assert law["holdout"]["budget"] == max(BUDGETS)
    assert isinstance(law["holdout"]["rel_error"], float)
    assert {m["budget"] for m in law["isoflop"]["minima"]} == {TOO_SMALL, *BUDGETS}
    for name in ("loss_vs_flops", "isoflop", "predicted_vs_measured"):
        assert (out / f"{name}.png").stat().st_size > 10_000
    assert "held out" in proc.stdout
    assert (out / "law.md").read_text().startswith("# Scaling law of")
    # The fit is a wandb run of the sweep's group too, with its table and figures.
    (record,) = out.glob("wandb/offline-run-*/run-*.wandb")
    assert sweep_dir.name.encode() in record.read_bytes()
    media = next(out.glob("wandb/offline-run-*/files/media"))
    assert len(list(media.glob("images/**/*.png"))) == 3
    assert list(media.glob("table/**/*.table.json"))


def test_a_foreign_folder_is_refused_in_one_line(tmp_path):
    proc = run_module(
        "mtrain.scaling", f"sweep_dir={REPO / 'conf'}", f"output={tmp_path}", check=False
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: sweep_dir=") and "holds no training run" in line
