"""Real trainings (DeepSpeed on CPU, gloo) started the way a user starts them, killed with
everything below them, and read back from their metrics."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil

from support.apps import REPO

CPU_ENV = {
    "DS_ACCELERATOR": "cpu",
    "OMP_NUM_THREADS": "1",
    "WANDB_MODE": "offline",
    "PYTHONUNBUFFERED": "1",
}


def train_args(dataset: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "mtrain.train",
        f"data.path={dataset}",
        f"run_dir={run_dir}",
        "model=tiny",
        "deepspeed=cpu",
        "trainer.micro_batch_size=4",
        "trainer.global_batch_tokens=1024",
        "data.num_workers=1",
        "data.shuffle_buffer=16",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "optim.warmup_steps=2",
        *extra,
    ]


def launch(
    args: list[str], ranks: int = 2, torchrun: bool | None = None, **popen
) -> subprocess.Popen:
    """A training as a user starts it: plain python for one rank, torchrun for more (or when
    ``torchrun`` says so: a launcher to kill)."""
    if not (ranks > 1 if torchrun is None else torchrun):
        cmd = [sys.executable, *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={ranks}",
            *args,
        ]
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, **popen}
    return subprocess.Popen(
        cmd, cwd=REPO, env={**os.environ, **CPU_ENV}, text=True, start_new_session=True, **popen
    )


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and all its descendants (torchrun puts ranks in their own groups)."""
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def run(
    args: list[str], ranks: int = 2, timeout: float = 300, torchrun: bool | None = None
) -> tuple[int, str]:
    proc = launch(args, ranks, torchrun)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"training timed out:\n{out[-4000:]}") from None
    return proc.returncode, out


def losses(run_dir: Path) -> dict[int, float]:
    """Loss per step; a step logged twice (before a crash and after resume) keeps the last."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows}
