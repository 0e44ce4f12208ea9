"""The wandb tracker in a process of its own: rows logged from the loop reach the run's file
in order, off the training step, even when the process ends without finish()."""

import os
import subprocess
import sys

import pytest
from support.wandb_records import history

# A run that logs 40 steps from its loop, changing its dict after each log as the trainer does,
# and exits without finish() (as a preempted or failed run does).
QUEUED_ROWS = """
import sys
from pathlib import Path
from mtrain.runs.run_dir import RunDir
from mtrain.runs.tracking import LoggerConfig, Tracker, WandbMode
tracker = Tracker(LoggerConfig(mode=WandbMode.offline), "rows", RunDir(Path(sys.argv[1])), {},
                  None, [])
for step in range(1, 41):
    metrics = {"train/loss": 1.0 / step, "perf/mfu": None}
    tracker.log(metrics, step)
    metrics["train/loss"] = -1.0  # too late: the tracker logged a copy
"""


def test_tracker_rows_reach_wandb_in_order_off_the_step_even_without_finish(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", QUEUED_ROWS, str(tmp_path)],
        env={**os.environ, "WANDB_SILENT": "true"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = history(tmp_path)
    assert [r["_step"] for r in rows] == list(range(1, 41))
    assert [r["train/loss"] for r in rows] == pytest.approx([1.0 / s for s in range(1, 41)])
    assert all("perf/mfu" not in r for r in rows)
