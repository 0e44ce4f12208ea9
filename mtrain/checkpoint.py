"""Checkpoints that are complete or absent.

Each one is a directory ``checkpoints/step_00001000/`` holding DeepSpeed's (partitioned) model
and optimizer state, one ``trainer_state_rank<r>.pt`` per rank (data position, RNG) and, written
last by rank 0 once every rank has finished, a ``COMPLETE`` marker. A directory without the
marker (a job killed mid-save) is never loaded; the newest complete one is.
"""

import json
import logging
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from mtrain import distributed

log = logging.getLogger(__name__)
MARKER = "COMPLETE"


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step_*") if p.is_dir())


def latest_complete(root: Path) -> Path | None:
    """The newest checkpoint with its marker; incomplete newer ones are named and skipped."""
    for path in reversed(checkpoint_dirs(root)):
        if (path / MARKER).exists():
            return path
        log.warning(
            "ignoring checkpoint %s: no %s marker (the run stopped while saving it)", path, MARKER
        )
    return None


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


PROBE = "probe.pt"


@torch.no_grad()
def probe_logits(engine, vocab_size: int, seq_len: int) -> dict:
    """The model's logits on a fixed batch (a forward on every rank, as ZeRO-3 needs): the
    reference export checks its consolidated weights against."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(vocab_size, (2, min(64, seq_len)), generator=generator)
    was_training = engine.training
    engine.eval()
    logits = engine(inputs.to(engine.device)).logits.float().cpu()
    engine.train(was_training)
    return {"inputs": inputs, "logits": logits}


def save(
    engine, root: Path, step: int, client_state: dict, rank_state: dict, keep_last: int, probe: dict
):
    """Saves on every rank (collective); returns the checkpoint directory."""
    tag = tag_of(step)
    path = root / tag
    start = time.monotonic()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
    if engine.global_rank == 0:
        torch.save(probe, path / PROBE)
    torch.save(
        {**rank_state, "rng": rng_state()}, path / f"trainer_state_rank{engine.global_rank}.pt"
    )
    distributed.barrier()  # every rank's files are on disk before the marker says so
    if engine.global_rank == 0:
        (path / MARKER).write_text(json.dumps({"step": step, "time": time.time()}))
        _prune(root, keep_last)
    distributed.barrier()
    log.info("saved checkpoint %s in %.1f s", path, time.monotonic() - start)
    return path


def _prune(root: Path, keep_last: int) -> None:
    complete = [p for p in checkpoint_dirs(root) if (p / MARKER).exists()]
    if not complete:
        return
    keep = set(complete[-keep_last:])
    newest = complete[-1]
    for path in checkpoint_dirs(root):
        if path not in keep and path.name < newest.name:
            shutil.rmtree(path, ignore_errors=True)


def load(engine, path: Path) -> tuple[dict, dict]:
    """Restores model, optimizer and scheduler into the engine; returns the client state and
    this rank's trainer state (RNG restored already)."""
    _, client_state = engine.load_checkpoint(
        str(path.parent),
        tag=path.name,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    rank_file = path / f"trainer_state_rank{engine.global_rank}.pt"
    if not rank_file.exists():
        raise RuntimeError(
            f"{rank_file} is missing: checkpoint {path} was saved by a run with a different "
            "number of ranks; resume with the same world size or start from an export "
            "(init_from=)"
        )
    rank_state = torch.load(rank_file, weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    return client_state or {}, rank_state
