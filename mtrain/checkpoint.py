"""Checkpoints that are complete or absent.

Each one is a directory ``checkpoints/step_00001000/`` (``run_dir.CheckpointDir``) holding
DeepSpeed's (partitioned) model and optimizer state, one trainer state per rank (data position,
RNG) and, written last by rank 0 once every rank has finished, a ``COMPLETE`` marker. A
directory without the marker (a job killed mid-save) is never loaded; the newest complete one is.
"""

import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from mtrain import distributed
from mtrain.run_dir import CheckpointDir, RunDir

if TYPE_CHECKING:
    from mtrain.config import TrainerConfig

log = logging.getLogger(__name__)


def latest_complete(run: RunDir) -> CheckpointDir | None:
    """The newest checkpoint with its marker; incomplete newer ones are named and skipped."""
    for ckpt in reversed(run.checkpoint_dirs()):
        if ckpt.complete:
            return ckpt
        log.warning(
            "ignoring checkpoint %s: no %s marker (the run stopped while saving it)",
            ckpt.path,
            ckpt.marker.name,
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


class Checkpointer:
    """Saves every ``trainer.save_every`` steps and at the last one (a step component, due at
    the same steps on every rank), and resumes a run from its newest complete checkpoint.

    ``state()`` gives what the trainer keeps besides the engine: the client state every rank
    shares (step, counters) and this rank's own (its data position).
    """

    def __init__(
        self,
        engine,
        run: RunDir,
        cfg: "TrainerConfig",
        probe_shape: tuple[int, int],
        state: Callable[[], tuple[dict, dict]],
    ):
        self.engine, self.run_dir, self.cfg = engine, run, cfg
        self.probe_shape, self.state = probe_shape, state

    def due(self, step: int) -> bool:
        return step % self.cfg.save_every == 0 or step == self.cfg.max_steps

    def run(self, step: int, metrics: dict) -> dict:
        self.save(step)
        return {}

    def save(self, step: int) -> CheckpointDir:
        """Saves on every rank (collective); returns the checkpoint directory."""
        engine, ckpt = self.engine, self.run_dir.checkpoint(step)
        client_state, rank_state = self.state()
        probe = probe_logits(engine, *self.probe_shape)
        start = time.monotonic()
        engine.save_checkpoint(
            str(self.run_dir.checkpoints), tag=ckpt.path.name, client_state=client_state
        )
        if engine.global_rank == 0:
            torch.save(probe, ckpt.probe)
        torch.save({**rank_state, "rng": rng_state()}, ckpt.trainer_state(engine.global_rank))
        distributed.barrier()  # every rank's files are on disk before the marker says so
        if engine.global_rank == 0:
            ckpt.marker.write_text(json.dumps({"step": step, "time": time.time()}))
            _prune(self.run_dir, self.cfg.keep_last)
        distributed.barrier()
        log.info("saved checkpoint %s in %.1f s", ckpt.path, time.monotonic() - start)
        return ckpt

    def resume(self) -> tuple[CheckpointDir, dict, dict] | None:
        """The newest complete checkpoint, loaded into the engine, with its client state and
        this rank's state; None when there is none."""
        ckpt = latest_complete(self.run_dir)
        if ckpt is None:
            return None
        return ckpt, *load(self.engine, ckpt)


def _prune(run: RunDir, keep_last: int) -> None:
    """Deletes all but the newest ``keep_last`` complete checkpoints; an incomplete one newer
    than the newest complete one is left alone (it may be being written)."""
    complete = [c.path for c in run.checkpoint_dirs() if c.complete]
    if not complete:
        return
    keep = set(complete[-keep_last:])
    newest = complete[-1]
    for ckpt in run.checkpoint_dirs():
        if ckpt.path not in keep and ckpt.path.name < newest.name:
            shutil.rmtree(ckpt.path, ignore_errors=True)


def load(engine, ckpt: CheckpointDir) -> tuple[dict, dict]:
    """Restores model, optimizer and scheduler into the engine; returns the client state and
    this rank's trainer state (RNG restored already)."""
    _, client_state = engine.load_checkpoint(
        str(ckpt.path.parent),
        tag=ckpt.path.name,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    rank_file = ckpt.trainer_state(engine.global_rank)
    if not rank_file.exists():
        raise RuntimeError(
            f"{rank_file} is missing: checkpoint {ckpt.path} was saved by a run with a different "
            "number of ranks; resume with the same world size or start from an export "
            "(init_from=)"
        )
    rank_state = torch.load(rank_file, weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    return client_state or {}, rank_state
