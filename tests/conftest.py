"""Shared fixtures and helpers: a small procedural MIDI corpus with bad files beside it, real
Bach shards, a tiny trained model, and trainings launched the way a user launches them."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import midi_factory
import numpy as np
import psutil
import pytest

from data_pipeline.reader import ShardReader, ShardShare, load_card, shard_shares

REPO = Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="session")
def midi_corpus(tmp_path_factory) -> Path:
    """40 good pieces in two collections, one exact duplicate, and every kind of bad file."""
    root = tmp_path_factory.mktemp("corpus")
    files = midi_factory.write_corpus(root, 40)
    shutil.copy(files[3], root / "jazz" / "copy_of_piece003.mid")
    midi_factory.write_bad_files(root / "bad")
    return root


@pytest.fixture(scope="session")
def bach_dataset(tmp_path_factory) -> Path:
    """Real music: 48 Bach chorales from the built-in corpus, converted from scratch."""
    root = tmp_path_factory.mktemp("bach")
    run_module(
        "data_pipeline.prepare",
        "source=music21:bach",
        "max_files=48",
        f"output={root / 'ds'}",
        f"cache_dir={root / 'cache'}",
        "shards.max_pieces=6",
        "split.val=0.1",
        "split.test=0.1",
        f"hydra.run.dir={root / 'hydra'}",
    )
    return root / "ds"


def shard_urls(output: str, split: str, card: dict | None = None) -> list[str]:
    """The URLs of a split's shards, in card order."""
    card = card or load_card(output)
    return [share.url for share in shard_shares(output, card["splits"][split]["shards"])]


def iter_pieces(urls: list[str]) -> Iterator[tuple[np.ndarray, dict]]:
    """(base token ids, metadata) of every piece in the shards, in order, read by the one
    shard reader (checked, but not against a card's piece counts)."""
    for piece in ShardReader().pieces(ShardShare(url) for url in urls):
        yield piece.tokens, piece.meta


def comparable(card: dict) -> dict:
    """What of a dataset card must not depend on how it was made (slices, workers, hosts):
    split counts with the pieces in shards added up, files, failures, labels, tokenizer."""
    splits = {
        name: {k: v for k, v in split.items() if k != "shards"}
        | {"shard_pieces": sum(s["pieces"] for s in split["shards"])}
        for name, split in card["splits"].items()
    }
    return {
        "splits": splits,
        "files": card["files"],
        "failures": card["failures"],
        "labels": card["labels"],
        "tokenizer": card["tokenizer"],
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> dict[str, Path]:
    """A tiny GPT trained briefly (1 process, ZeRO-0, CPU) on 60 procedural pieces in two
    styles (labels collection=band, collection=duo), exported: ``dataset``, ``run``,
    ``export`` directories. Enough training to tell the styles apart, not to make music."""
    root = tmp_path_factory.mktemp("tiny_model")
    midi_factory.write_two_styles(root / "midi", 60)
    prepare_train_export(root, val=0.1, test=0.2, steps=200)
    return {"dataset": root / "ds", "run": root / "run", "export": root / "export"}


def prepare_train_export(root: Path, val: float, test: float, steps: int, *extra: str) -> None:
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
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env["MASTER_PORT"] = str(free_port())  # one process, but torch.distributed all the same
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


# ---- real trainings (DeepSpeed on CPU, gloo), started the way a user starts them ----------

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
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, **CPU_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **popen,
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
