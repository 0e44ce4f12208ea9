"""The apps run the way a user runs them: ``python -m <app> <overrides>`` from the repository
root, one after another from MIDI files to an exported model."""

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_module(module: str, *overrides: str, env: dict | None = None, check: bool = True):
    """Runs a Hydra entry point the way a user does, with its logs kept out of the repo."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_env() -> dict:
    """One CPU training process: torch.distributed all the same, on a port of its own."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env["MASTER_PORT"] = str(free_port())
    return env


def prepare_train_export(
    root: Path, val: float, test: float, steps: int, *extra: str, prepare_extra: tuple = ()
) -> None:
    """The MIDI files under ``root/midi`` prepared (``root/ds``), a tiny model trained on them
    in one process for ``steps`` steps (``root/run``) and exported (``root/export``)."""
    run_module(
        "data_pipeline.prepare",
        f"source={root / 'midi'}",
        f"output={root / 'ds'}",
        "workers=1",
        f"split.val={val}",
        f"split.test={test}",
        f"hydra.run.dir={root / 'hydra'}",
        *prepare_extra,
    )
    env = train_env()
    run_module(
        "mtrain.train",
        f"data.path={root / 'ds'}",
        f"run_dir={root / 'run'}",
        "model=tiny",
        "deepspeed=cpu",
        "deepspeed.zero_stage=0",
        f"trainer.max_steps={steps}",
        f"trainer.save_every={steps}",
        "trainer.eval_every=0",
        "trainer.micro_batch_size=8",
        "trainer.global_batch_tokens=1024",
        "optim.lr=3e-3",
        "optim.warmup_steps=20",
        "logger.mode=disabled",
        *extra,
        env=env,
    )
    run_module("mtrain.export", f"checkpoint={root / 'run'}", f"output={root / 'export'}")
