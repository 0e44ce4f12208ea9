"""Checkpoints that are complete or absent, and intact or moved aside.

Each one is a directory ``checkpoints/step_00001000/`` (``run_dir.CheckpointDir``) holding
DeepSpeed's (partitioned) model and optimizer state, one trainer state per rank (data position,
RNG) and, written last by rank 0 once every rank has finished, a ``COMPLETE`` marker recording
every file's size and CRC-32. A directory without the marker (a job killed mid-save) is never
loaded; one whose files no longer match it is moved aside (``step_00001000.damaged``) and the one
before is loaded. CRC-32 because it is cheap (~4.9 GB/s here, against ~1.7 GB/s for SHA-256 and
~1 GB/s for BLAKE2b) and the threat is bit rot and truncation, not an adversary. After the save,
the files are shared out among the ranks by size to be checksummed (a shared file system is
assumed) and rank 0 gathers the sums: no rank reads the whole checkpoint.

A checkpoint resumes on another number of ranks too: its partitioned state is converted to
DeepSpeed's universal layout (one file per parameter and state, world-size-free) and loaded
from there, and the data loader deals anew what the old ranks' positions left of each epoch.
"""

import argparse
import contextlib
import errno
import gc
import io
import json
import logging
import shutil
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from data_pipeline.errors import InputError
from mtrain.distributed import collectives
from mtrain.runs.run_dir import CheckpointDir, RunDir, model_shape
from mtrain.training.config import TrainerConfig
from mtrain.training.rng_state import (
    PICKLED_RNG_TYPES,
    rng_state,
    seed_everything,
    set_rng_state,
)

log = logging.getLogger(__name__)


CHUNK = 8 << 20
# Steps after a resume during which a non-finite loss names the resumed checkpoint a suspect.
SUSPECT_STEPS = 10


class DiskFull(InputError):
    """A write that found no space left: said as one line, like a bad input."""


def complete_newest_first(run: RunDir, quiet: bool = False) -> Iterator[CheckpointDir]:
    """The checkpoints with their marker, newest first; incomplete ones met on the way are
    named (unless ``quiet``) and skipped."""
    for ckpt in reversed(run.checkpoint_dirs()):
        if ckpt.complete:
            yield ckpt
        elif not quiet:
            log.warning(
                "ignoring checkpoint %s: no %s marker (the run stopped while saving it)",
                ckpt.path,
                ckpt.marker.name,
            )


def latest_complete(run: RunDir, quiet: bool = False) -> CheckpointDir | None:
    """The newest checkpoint with its marker; incomplete newer ones are named and skipped."""
    return next(complete_newest_first(run, quiet), None)


def crc32(path: Path) -> str:
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            value = zlib.crc32(chunk, value)
    return f"{value:08x}"


def _my_share(names: list[str], sizes: list[int]) -> list[int]:
    """The indices of the files this rank checksums: the largest first, each to the rank with
    the fewest bytes so far (the same split on every rank)."""
    me, assigned = collectives.group_rank(), [0] * collectives.group_size()
    mine = []
    for i in sorted(range(len(names)), key=lambda i: (-sizes[i], names[i])):
        rank = assigned.index(min(assigned))
        assigned[rank] += sizes[i]
        if rank == me:
            mine.append(i)
    return mine


def checksums(ckpt: CheckpointDir) -> dict[str, dict]:
    """Size and CRC-32 of every file in the checkpoint (but the marker), by relative name;
    collective: each rank checksums its share."""
    files = sorted(p for p in ckpt.path.rglob("*") if p.is_file() and p != ckpt.marker)
    names = [p.relative_to(ckpt.path).as_posix() for p in files]
    sizes = [p.stat().st_size for p in files]
    part = {names[i]: {"size": sizes[i], "crc32": crc32(files[i])} for i in _my_share(names, sizes)}
    merged = {name: entry for p in collectives.gather_objects(part) for name, entry in p.items()}
    return dict(sorted(merged.items()))


def recorded(ckpt: CheckpointDir) -> dict[str, dict] | None:
    """The files the marker lists; None for a marker written before checksums were."""
    return json.loads(ckpt.marker.read_text()).get("files")


def damage(ckpt: CheckpointDir) -> list[str] | None:
    """What is wrong with a complete checkpoint's files ([] when intact; None when its marker
    has no checksums); collective: each rank checks its share, every rank gets the whole list."""
    files = recorded(ckpt)
    if files is None:
        return None
    names = sorted(files)
    problems = []
    for i in _my_share(names, [files[n]["size"] for n in names]):
        name, want = names[i], files[names[i]]
        path = ckpt.path / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif (size := path.stat().st_size) != want["size"]:
            problems.append(f"{name} has {size} bytes, the marker says {want['size']}")
        elif (got := crc32(path)) != want["crc32"]:
            problems.append(f"{name} has CRC-32 {got}, the marker says {want['crc32']}")
    return sorted(p for part in collectives.gather_objects(problems) for p in part)


def latest_intact(run: RunDir, move_aside: bool) -> tuple[CheckpointDir | None, list[str]]:
    """The newest complete checkpoint whose files match its marker, and what was skipped on
    the way (``name: why``). ``move_aside``: rank 0 renames each damaged one
    (``step_*.damaged``), so a requeue does not meet it again; collective when there are ranks."""
    skipped = []
    for ckpt in complete_newest_first(run):
        problems = damage(ckpt)
        if problems is None:
            log.info("%s has no checksums (saved by an older mtrain): not verified", ckpt.path)
            return ckpt, skipped
        if not problems:
            return ckpt, skipped
        why = "; ".join(problems)
        if move_aside:
            if collectives.group_rank() == 0:
                aside = ckpt.damaged
                ckpt.path.rename(aside)
                log.error("checkpoint %s is damaged (%s): moved aside to %s", ckpt.path, why, aside)
            collectives.barrier()
        else:
            log.warning("skipping damaged checkpoint %s: %s", ckpt.path, why)
        skipped.append(f"{ckpt.path.name}: {why}")
    return None, skipped


def world_size_of(ckpt: CheckpointDir) -> int:
    """How many ranks saved the checkpoint: its trainer states (as the marker lists them)."""
    names = recorded(ckpt) or [p.name for p in ckpt.path.iterdir()]
    return sum(1 for n in names if n.startswith("trainer_state_rank"))


def size_of(ckpt: CheckpointDir) -> int:
    return sum(p.stat().st_size for p in ckpt.path.rglob("*") if p.is_file())


def load_trainer_state(path: Path) -> dict:
    """A rank's trainer state, unpickled only as plain data (numpy's RNG types allowed for
    checkpoints saved before the state was stored as lists)."""
    with torch.serialization.safe_globals(PICKLED_RNG_TYPES):
        return torch.load(path, weights_only=True)


@torch.no_grad()
def probe_logits(engine, vocab_size: int, seq_len: int) -> dict:
    """The model's logits on a fixed batch (a forward on every rank, as ZeRO-3 needs): the
    reference export checks its consolidated weights against, with the dtype the engine
    computed them in (bf16/fp16 engines run the module in that dtype; their fp32 master weights
    give logits about one bf16 ulp away, so export recomputes in the same dtype)."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(vocab_size, (2, min(64, seq_len)), generator=generator)
    was_training = engine.training
    engine.eval()
    logits = engine(inputs.to(engine.device)).logits.float().cpu()
    engine.train(was_training)
    # The dtype the forward ran in: DeepSpeed's precision switches, else the module's
    # parameters' (ZeRO-3 partitions keep the dtype of the whole parameter).
    if getattr(engine, "bfloat16_enabled", lambda: False)():
        dtype = torch.bfloat16
    elif getattr(engine, "fp16_enabled", lambda: False)():
        dtype = torch.float16
    else:
        dtype = next(engine.module.parameters()).dtype
    return {"inputs": inputs, "logits": logits, "dtype": str(dtype).removeprefix("torch.")}


class Checkpointer:
    """Saves every ``trainer.save_every`` steps and at the last one (a step component, due at
    the same steps on every rank), and resumes a run from its newest intact checkpoint.

    ``state()`` gives what the trainer keeps besides the engine: the client state every rank
    shares (step, counters) and this rank's own (its data position).
    """

    def __init__(
        self,
        engine,
        run: RunDir,
        cfg: TrainerConfig,
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
        """Saves on every rank (collective); returns the checkpoint directory. A full disk ends
        the run with ``DiskFull`` on every rank, the partial directory removed."""
        engine, ckpt = self.engine, self.run_dir.checkpoint(step)
        client_state, rank_state = self.state()
        probe = probe_logits(engine, *self.probe_shape)
        start = time.monotonic()
        main = engine.global_rank == 0

        def write_files():
            engine.save_checkpoint(
                str(self.run_dir.checkpoints), tag=ckpt.path.name, client_state=client_state
            )
            if main:
                torch.save(probe, ckpt.probe)
            torch.save({**rank_state, "rng": rng_state()}, ckpt.trainer_state(engine.global_rank))

        # Every rank's files are on disk (or one rank found no space) before they are summed.
        self._unless_disk_full(ckpt, write_files)
        files = checksums(ckpt)

        def write_marker():
            if main:
                partial = ckpt.marker.with_suffix(".partial")
                partial.write_text(json.dumps({"step": step, "time": time.time(), "files": files}))
                partial.replace(ckpt.marker)
                _prune(self.run_dir, self.cfg.keep_last)

        self._unless_disk_full(ckpt, write_marker)
        log.info("saved checkpoint %s in %.1f s", ckpt.path, time.monotonic() - start)
        return ckpt

    def _unless_disk_full(self, ckpt: CheckpointDir, write: Callable[[], None]) -> None:
        """Runs ``write`` on every rank; if it ran out of space on any, rank 0 removes the
        partial checkpoint and every rank raises ``DiskFull``. Collective."""
        failure = None
        try:
            write()
        except (OSError, RuntimeError) as exc:
            if not out_of_space(exc, ckpt.path):
                raise
            # Only the words: the traceback's frames hold the half-written file open, and its
            # space would not come back when the directory is removed.
            failure = str(exc)
        if failure is not None:
            gc.collect()  # the file objects of the failed write's frames, now unreferenced
        if not collectives.any_rank(failure is not None):
            return
        message = f"no space left to save {ckpt.path} (rank 0 says where and how much)"
        if self.engine.global_rank == 0:
            log.debug("saving %s failed: %s", ckpt.path, failure)
            shutil.rmtree(ckpt.path, ignore_errors=True)
            message = disk_full_message(self.run_dir, ckpt.path)
        raise DiskFull(message)

    def resume(self) -> "Resumed":
        """The newest intact checkpoint, loaded into the engine, with its client state and
        this rank's state (None and empty when there is none), and the damaged ones skipped."""
        ckpt, skipped = latest_intact(self.run_dir, move_aside=True)
        if ckpt is None:
            return Resumed(None, {}, [], skipped)
        saved_by = world_size_of(ckpt)
        if saved_by == collectives.group_size():
            client, rank_state = load(self.engine, ckpt)
            return Resumed(ckpt, client, [rank_state], skipped, saved_by)
        client, conversion = load_elsewhere(self.engine, ckpt)
        states = [load_trainer_state(ckpt.trainer_state(r)) for r in range(saved_by)]
        # The old ranks' RNG streams do not map onto the new ranks: each draws a fresh one,
        # from the seed, the step and its rank (the same on a second resume from here).
        fresh = np.random.SeedSequence([self.cfg.seed, client["step"], collectives.group_rank()])
        seed_everything(int(fresh.generate_state(1)[0]))
        states = [{k: v for k, v in s.items() if k != "rng"} for s in states]
        return Resumed(ckpt, client, states, skipped, saved_by, conversion)


class Resumed(NamedTuple):
    ckpt: CheckpointDir | None
    client: dict
    # This rank's trainer state; on another number of ranks, every old rank's (without RNG).
    rank_states: list[dict]
    skipped: list[str]
    # How many ranks saved the checkpoint, and what resuming on another number did (None:
    # the same number, an exact resume).
    saved_by: int = 0
    conversion: str | None = None


def out_of_space(exc: BaseException, path: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC, or torch.save's RuntimeError (which
    hides the errno: "file write failed", "unexpected pos") on a file system now (nearly) full."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if not any(sign in str(exc) for sign in ("write failed", "unexpected pos", "StreamWriter")):
        return False
    usage = shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists()))
    return usage.free < max(64 << 20, usage.total // 100)


def disk_full_message(run: RunDir, path: Path) -> str:
    """Which path, the free space now and what the last complete checkpoint took."""
    free = shutil.disk_usage(run.root).free
    last = latest_complete(run, quiet=True)
    needed = (
        f"the last complete checkpoint {last.path.name} takes {size_of(last) / 2**20:.1f} MiB, "
        f"and the run resumes from it"
        if last is not None
        else "no checkpoint is complete yet"
    )
    return (
        f"no space left on the device writing {path}: {free / 2**20:.1f} MiB free now, {needed}; "
        "free space (or lower trainer.keep_last) and restart"
    )


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
    """Restores model, optimizer and scheduler into the engine from a checkpoint saved by as
    many ranks; returns the client state and this rank's trainer state (RNG restored
    already)."""
    _, client_state = engine.load_checkpoint(
        str(ckpt.path.parent),
        tag=ckpt.path.name,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    rank_state = load_trainer_state(ckpt.trainer_state(engine.global_rank))
    set_rng_state(rank_state.pop("rng"))
    return client_state or {}, rank_state


def load_elsewhere(engine, ckpt: CheckpointDir) -> tuple[dict, str]:
    """Restores, like ``load``, a checkpoint that another number of ranks saved; returns the
    client state and what was done, in words. Partitioned state (ZeRO-1/2/3, or ZeRO-0's bf16
    optimizer) is converted by rank 0 to DeepSpeed's universal layout (``ds_to_universal``,
    one parameter at a time: peak memory is one old rank's optimizer file plus one parameter)
    and every rank loads its new partition from there; ZeRO-0 without it saved the whole state
    once and loads as it is. Collective."""
    saved_by = world_size_of(ckpt)
    if not any(ckpt.path.glob("*optim_states.pt")):
        _, client_state = engine.load_checkpoint(
            str(ckpt.path.parent), tag=ckpt.path.name, load_lr_scheduler_states=True
        )
        return client_state or {}, f"whole ZeRO-0 state of {saved_by} rank(s), nothing to convert"
    universal, start = ckpt.universal, time.monotonic()
    failure = None
    if collectives.group_rank() == 0:
        failure = convert_to_universal(ckpt, universal)
    # Also the barrier: every rank waits here for rank 0's conversion.
    if (failure := collectives.from_rank_0(failure)) is not None:
        ranks = collectives.group_size()
        raise RuntimeError(f"cannot convert {ckpt.path} for {ranks} ranks: {failure}")
    converted_s = time.monotonic() - start
    # DeepSpeed reads this switch of its config at load time only; it is set for this one load.
    engine._config.load_universal_checkpoint = True
    try:
        _, client_state = engine.load_checkpoint(
            str(universal.parent),
            tag=universal.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
    finally:
        engine._config.load_universal_checkpoint = False
    collectives.barrier()
    if collectives.group_rank() == 0:
        shutil.rmtree(universal.parent, ignore_errors=True)
    stage = engine.zero_optimization_stage()
    return client_state or {}, (
        f"converted ZeRO-{stage} state of {saved_by} rank(s) to the universal layout in "
        f"{converted_s:.1f} s, loaded in {time.monotonic() - start - converted_s:.1f} s"
    )


def convert_to_universal(ckpt: CheckpointDir, universal: Path) -> str | None:
    """Runs DeepSpeed's converter in this process, its progress bars kept out of the logs;
    returns why it failed (None: it did not)."""
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(universal.parent, ignore_errors=True)  # a conversion cut short before
    args = argparse.Namespace(
        input_folder=str(ckpt.path),
        output_folder=str(universal),
        # One process: the rank's own (worker pools would fork a process holding the group).
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # ZeRO-1/2 checkpoints lack the (version-only, without tensor parallelism) universal
        # info the converter asks for; ZeRO-3's path does not read it.
        inject_missing_state=True,
    )
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            ds_to_universal.main(args)
    except Exception as exc:  # said on every rank, which all stop
        log.debug("ds_to_universal said:\n%s", said.getvalue())
        return f"{type(exc).__name__}: {exc}"
    return None


def check_resumable(run: RunDir, model: dict, tokenizer_hash: str) -> bool:
    """Whether ``run`` has a checkpoint to resume (False: a fresh run); refuses with an
    InputError, naming both values, a run saved with another model shape or tokenizer. Another
    number of ranks is no reason: ``Checkpointer.resume`` converts the state for them (and
    ``plan_batch`` has checked already that they keep the global batch). Reads only: nothing in
    the run directory changes."""
    ckpt = latest_complete(run, quiet=True)
    if ckpt is None:
        return False
    problems = []
    if run.model_config.exists():
        saved = model_shape(json.loads(run.model_config.read_text()))
        ours = json.loads(json.dumps(model))
        for key in sorted(set(saved) | set(ours)):
            if saved.get(key) != ours.get(key):
                problems.append(f"model.{key}: run {saved.get(key)!r}, now {ours.get(key)!r}")
    artifact = run.tokenizer / "artifact.json"
    if artifact.exists() and (saved := json.loads(artifact.read_text())["hash"]) != tokenizer_hash:
        problems.append(f"tokenizer: run {saved[:12]}, this dataset's {tokenizer_hash[:12]}")
    if problems:
        raise InputError(
            f"run_dir {run.root} cannot resume from {ckpt.path.name} with this config: "
            f"{'; '.join(problems)}; give a new run_dir=, or fine-tune from an export of this run "
            f"(python -m mtrain.export checkpoint={run.root} output=<dir>, then init_from=<dir>)"
        )
    return True
