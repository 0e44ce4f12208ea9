"""Writing a checkpoint while training goes on: DeepSpeed's files and the trainer's own written
by a thread, each made durable (fsync) before rank 0 writes the marker.

What a checkpoint holds (weights, fp32 master weights, Adam moments, the scheduler, the loss
scale) changes only at the optimizer's update. Staged, it is copied to host memory first
(``stage``: the time training waits), and the write may take as many steps as it needs; live,
nothing is copied: the thread writes the tensors themselves while the next step's forward and
backward passes run, and that step's update waits for the write to end (``wait``).
"""

import gc
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from mtrain.distributed import collectives
from mtrain.runs.checkpoint_files import crc32
from mtrain.runs.run_dir import CheckpointDir

log = logging.getLogger(__name__)


def storage_key(tensor: torch.Tensor) -> tuple:
    storage = tensor.untyped_storage()
    return storage.device, storage.data_ptr(), storage.nbytes()


def stage(state, storages: dict | None = None, spare: dict | None = None):
    """A copy of ``state`` (nested dicts, lists and tuples) with every tensor's storage copied
    once to host memory: tensors that shared a storage share its copy, at the same offsets,
    so that torch.save writes what it would have written of the originals. Other values are
    taken as they are (numbers, strings: nothing the update changes in place). A storage
    found in ``spare`` (by the original's key) is copied into the buffer there, mapped
    already, rather than into a new one."""
    storages = {} if storages is None else storages
    if isinstance(state, torch.Tensor):
        storage = state.untyped_storage()
        key = storage_key(state)
        if key not in storages:
            buffer = (spare or {}).pop(key, None)
            if buffer is not None:
                storages[key] = buffer.copy_(storage)
            elif storage.device.type != "cpu":
                storages[key] = storage.cpu()
            else:
                storages[key] = storage.clone()
        copy = torch.empty(0, dtype=state.dtype).set_(
            storages[key], state.storage_offset(), state.size(), state.stride()
        )
        if isinstance(state, torch.nn.Parameter):
            return torch.nn.Parameter(copy, requires_grad=state.requires_grad)
        return copy
    if isinstance(state, dict):
        return type(state)((k, stage(v, storages, spare)) for k, v in state.items())
    if isinstance(state, list | tuple) and not hasattr(state, "_fields"):
        return type(state)(stage(v, storages, spare) for v in state)
    return state


def storages_of(state) -> dict:
    """Every tensor storage in ``state`` (as ``stage`` walks it), by ``storage_key``."""
    found = {}
    if isinstance(state, torch.Tensor):
        found[storage_key(state)] = state.untyped_storage()
    elif isinstance(state, dict):
        for v in state.values():
            found |= storages_of(v)
    elif isinstance(state, list | tuple):
        for v in state:
            found |= storages_of(v)
    return found


class DeferredFiles(CheckpointEngine):
    """DeepSpeed's checkpoint engine with its writes deferred: ``save`` notes the state (a
    staged copy, when ``staged``) and its path; ``take`` hands them to the writer. Everything
    else is the engine it replaces (the same serialization, so the same bytes; loading
    unchanged)."""

    def __init__(self, inner: CheckpointEngine, staged: bool):
        super().__init__()
        self.inner, self.name, self.staged = inner, f"deferred {inner.name}", staged
        self.pending: list[tuple[Path, object]] = []
        self.storages: dict = {}  # this checkpoint's staged storages
        # The previous checkpoint's staged storages (its write has ended when the next save
        # stages), or buffers mapped ahead of the first save (``map_ahead``): a copy into
        # them costs no page faults, which cost more than the copy (bench/README.md).
        self.spare: dict = {}
        self._mapping: threading.Thread | None = None

    def map_ahead(self, state) -> None:
        """Maps and touches, in a thread, a buffer for each storage of ``state`` (the
        optimizer's, read between two updates): the first staged save copies into them."""

        def fill():
            for key, storage in storages_of(state).items():
                if key not in self.spare and key[0].type == "cpu":
                    self.spare[key] = torch.UntypedStorage(storage.nbytes()).fill_(0)

        self._mapping = threading.Thread(target=fill, name="checkpoint-staging", daemon=True)
        self._mapping.start()

    def create(self, info):
        return self.inner.create(info)

    def save(self, state_dict, path: str):
        if self._mapping is not None:
            self._mapping.join()
            self._mapping = None
        staged = stage(state_dict, self.storages, self.spare) if self.staged else state_dict
        self.pending.append((Path(path), staged))

    def load(self, path: str, map_location=None):
        return self.inner.load(path, map_location)

    def commit(self, info):
        return True  # the marker, written by the writer once every rank's files are durable

    def preserves_storage_sharing(self):
        return self.inner.preserves_storage_sharing()

    def write(self, state_dict, path: Path) -> None:
        self.inner.save(state_dict, str(path))

    def take(self) -> tuple[list[tuple[Path, object]], int]:
        """The files noted since the last ``take``, and the bytes staged for them."""
        held = sum(s.nbytes() for s in self.storages.values())
        # Kept for the next save, which waits for this write to end before it stages.
        pending, self.pending, self.spare, self.storages = self.pending, [], self.storages, {}
        return pending, held


def write_with_torch(state, path: Path) -> None:
    """mtrain's own files (trainer states, the probe), written as the synchronous save does."""
    torch.save(state, path)


def fsync(path: Path) -> None:
    """Flushes a file's (or a directory's entries') data to the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Written:
    """A background write's result, the same on every rank: the failures of every rank
    (``rank N: what``; space ones apart) and the time it took."""

    ckpt: CheckpointDir
    step: int
    out_of_space: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class WriteJob:
    """One checkpoint's files for this rank besides DeepSpeed's: (path, state or a function
    giving it)."""

    ckpt: CheckpointDir
    step: int
    files: list[tuple]
    # Run first on every rank, with the writer's process group (its collectives' own).
    before: Callable[[object], None] | None = None


class BackgroundWriter:
    """Writes each rank's files of a checkpoint in a thread; rank 0 writes the marker
    (``write_marker(ckpt, step, files)``) once every rank's files are durable. The threads
    of the ranks talk over a process group of their own, so that their collectives never
    interleave with training's. ``wait`` joins the write in flight (live: before the update
    that would change what it writes); ``outcome`` then says how it went, once."""

    def __init__(
        self,
        engine,
        staged: bool,
        write_marker: Callable[[CheckpointDir, int, dict], None],
        out_of_space: Callable[[BaseException, Path], bool],
    ):
        self.staged = staged
        self.deferred = DeferredFiles(engine.checkpoint_engine, staged)
        engine.checkpoint_engine = self.deferred
        self.write_marker, self.out_of_space = write_marker, out_of_space
        self.group = collectives.new_gloo_group()
        self.rank = collectives.group_rank()
        self._thread: threading.Thread | None = None
        self._result: Written | None = None
        self._error: BaseException | None = None
        self.blocked_s = 0.0  # training's wait for the write in flight, since the last save

    @property
    def reportable(self) -> bool:
        """A write has ended and is not reported yet."""
        ended = self._thread is None or not self._thread.is_alive()
        return ended and (self._result is not None or self._error is not None)

    def start(self, job: WriteJob) -> int:
        """Starts writing; returns the bytes staged for it."""
        files, held = self.deferred.take()
        # mtrain's first: the probe's logits free its gathered weights early.
        job.files = [(p, s, write_with_torch) for p, s in job.files] + [
            (p, s, self.deferred.write) for p, s in files
        ]
        self._thread = threading.Thread(
            target=self._run, args=(job,), name="checkpoint-writer", daemon=True
        )
        self._thread.start()
        return held

    def wait(self) -> None:
        """Returns once no write is in flight (at once when none is)."""
        if self._thread is None:
            return
        start = time.monotonic()
        self._thread.join()
        self._thread = None
        self.blocked_s += time.monotonic() - start

    def outcome(self) -> Written | None:
        """The finished write's result, once (None when there is none to report); a write
        that failed otherwise than on a file (a collective) raises its error here."""
        self.wait()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        result, self._result = self._result, None
        return result

    def _run(self, job: WriteJob) -> None:
        try:
            self._result = self._write(job)
        except BaseException as exc:  # a failed collective: said by the main thread at wait
            self._error = exc

    def _write(self, job: WriteJob) -> Written:
        start, ckpt = time.monotonic(), job.ckpt
        sums, failure = {}, None
        if job.before is not None:
            job.before(self.group)
        try:
            for i, (path, state, write) in enumerate(job.files):
                job.files[i] = None  # what it holds is freed once written
                write(state() if callable(state) else state, path)
                del state
                fsync(path)
                sums[path.relative_to(ckpt.path).as_posix()] = {
                    "size": path.stat().st_size,
                    "crc32": crc32(path),
                }
        except (OSError, RuntimeError) as exc:
            # Only the words: the traceback's frames hold the half-written file open.
            failure = ("space" if self.out_of_space(exc, ckpt.path) else "other", str(exc))
        parts = collectives.gather_objects((sums, failure), self.group)
        written = Written(ckpt, job.step, seconds=0.0)
        for rank, (_, fail) in enumerate(parts):
            if fail is not None:
                kind, what = fail
                (written.out_of_space if kind == "space" else written.failures).append(
                    f"rank {rank}: {what}"
                )
        marker_failure = None
        if self.rank == 0 and written.out_of_space:
            # Every rank has stopped writing: the partial checkpoint's space comes back now,
            # not at the report, so that training's other writes (metrics, logs) find room.
            gc.collect()  # the failed writes' file objects
            shutil.rmtree(ckpt.path, ignore_errors=True)
        if self.rank == 0 and not (written.out_of_space or written.failures):
            files = {name: entry for part, _ in parts for name, entry in part.items()}
            try:
                # Files written beside the deferred ones (DeepSpeed's recovery script).
                for path in sorted(p for p in ckpt.path.rglob("*") if p.is_file()):
                    name = path.relative_to(ckpt.path).as_posix()
                    if name not in files and path != ckpt.marker:
                        fsync(path)
                        files[name] = {"size": path.stat().st_size, "crc32": crc32(path)}
                for directory in {ckpt.path, *(p.parent for p in ckpt.path.rglob("*"))}:
                    fsync(directory)
                self.write_marker(ckpt, job.step, dict(sorted(files.items())))
            except (OSError, RuntimeError) as exc:
                kind = "space" if self.out_of_space(exc, ckpt.path) else "other"
                marker_failure = (kind, f"rank 0: {exc}")
        marker_failure = collectives.from_rank_0(marker_failure, self.group)
        if marker_failure is not None:
            kind, what = marker_failure
            (written.out_of_space if kind == "space" else written.failures).append(what)
        written.seconds = time.monotonic() - start
        return written
