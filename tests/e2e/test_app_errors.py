"""Every entry point, run as a user runs it, turns a bad input into one line and exit code 2;
ranks other than 0 say nothing."""

import os

import pytest
import torch
from support.apps import run_module

from data_pipeline.app import EXIT_INPUT


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("module", "overrides", "says"),
    [
        # Hydra cannot compose it: an unknown key.
        ("mtrain.export", ["checkpoint=x", "output=y", "outptu=z"], "outptu"),
        # A mandatory key left out.
        ("mtrain.export", [], "checkpoint"),
        # The app's own input check (a directory that is not a run).
        ("mtrain.export", ["checkpoint=/nonexistent", "output=/tmp/x"], "/nonexistent"),
        # A dataclass's __post_init__.
        ("data_pipeline.prepare", ["workers=0"], "workers=0 must be at least 1"),
        # merge (an app that used to end in a Hydra traceback).
        ("data_pipeline.merge", ["output=/nonexistent/ds"], "no slice cards"),
        # A check across sections: the collective timeout within the storage retry budget.
        (
            "mtrain.train",
            ["data.path=s3://bucket/ds", "deepspeed=cpu"],
            "deepspeed.timeout_s=120 must exceed the storage retry budget",
        ),
    ],
)
def test_every_kind_of_bad_input_is_one_line_and_exit_2(tmp_path, module, overrides, says):
    proc = run_module(module, *overrides, f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == EXIT_INPUT, proc.stderr[-2000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines


def test_other_ranks_stay_quiet(tmp_path):
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2"}
    proc = run_module(
        "mtrain.export", "outptu=z", f"hydra.run.dir={tmp_path}", env=env, check=False
    )
    assert proc.returncode == EXIT_INPUT
    assert error_lines(proc.stderr) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch can use CUDA")
def test_training_on_the_cpu_of_a_gpu_allocation_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["SLURM_GPUS_ON_NODE"] = "8"
    proc = run_module(
        "mtrain.train", f"data.path={tmp_path}", f"hydra.run.dir={tmp_path}", env=env, check=False
    )
    assert proc.returncode == EXIT_INPUT, proc.stderr[-2000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "SLURM_GPUS_ON_NODE=8" in lines[0], lines
    assert "DS_ACCELERATOR=cpu" in lines[0] and "CUDA build of torch" in lines[0]
