"""One owner per run directory: a ``LOCK`` file naming who trains in it, kept fresh by a
heartbeat, so that a second job on the same ``run_dir`` is refused instead of mixing the two.

Works on NFS (no fcntl/flock): the lock is created with ``O_CREAT|O_EXCL`` (atomic on NFSv3+)
and a stale one is taken over by renaming a fresh file over it after reading it again. The
heartbeat is the file's modification time, touched by a background thread (a step can be
longer than the stale limit's margin); a lock whose heartbeat is older than
``trainer.lock_stale_s``, or that our own Slurm job wrote (a requeue on another node), is taken
over with a warning.
"""

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from data_pipeline.errors import InputError
from mtrain.distributed import collectives

log = logging.getLogger(__name__)


class RunDirTaken(InputError):
    """Another job holds the run directory."""


def _slurm_job() -> str | None:
    return os.environ.get("SLURM_JOB_ID")


class RunLock:
    """The lock on one run directory (``RunDir.lock``), taken by rank 0 before anything is
    written there and released (deleted) when the run ends."""

    def __init__(self, path: Path, stale_s: float):
        self.path, self.stale_s = Path(path), stale_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def holder(self) -> dict:
        """Who holds the lock, as its file says, with ``age_s``: seconds since its heartbeat."""
        age = time.time() - self.path.stat().st_mtime
        try:
            held = json.loads(self.path.read_text())
        except (ValueError, OSError):  # being written, or written by something else
            held = {}
        return {**held, "age_s": age}

    def acquire(self) -> str | None:
        """Takes the lock; returns None, or why not (naming its live holder)."""
        mine = json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "slurm_job_id": _slurm_job(),
                "started": time.time(),
                "token": self.token,
            }
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # again if the holder released it between our two looks
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    refusal = self._take_over(mine)
                except FileNotFoundError:
                    continue
                if refusal is not None:
                    return refusal
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(mine)
            break
        self._beat = threading.Thread(target=self._heartbeat, name="run-lock", daemon=True)
        self._beat.start()
        return None

    def _take_over(self, mine: str) -> str | None:
        held = self.holder()
        why = _stale(held, self.stale_s)
        if why is None:
            return (
                f"run_dir {self.path.parent} is in use by {describe(held)} (lock file "
                f"{self.path}); wait for that run or give this one another run_dir= (the lock "
                f"is taken over once its heartbeat is older than "
                f"trainer.lock_stale_s={self.stale_s:g})"
            )
        log.warning("taking over the lock of %s from %s: %s", self.path.parent, describe(held), why)
        fresh = self.path.with_name(f"{self.path.name}.{self.token}")
        fresh.write_text(mine)
        # Read again just before the rename: a holder that came back (or another taker) wins.
        if self.holder().get("token") != held.get("token"):
            fresh.unlink()
            return self._lost_race()
        os.replace(fresh, self.path)
        if self.holder().get("token") != self.token:  # two takers renamed at once: the last won
            return self._lost_race()
        return None

    def _lost_race(self) -> str:
        return (
            f"run_dir {self.path.parent} was taken by {describe(self.holder())} while this run "
            "was taking over its stale lock; give this run another run_dir="
        )

    def _heartbeat(self) -> None:
        interval = max(0.5, min(30.0, self.stale_s / 10))
        while not self._stop.wait(interval):
            try:
                if json.loads(self.path.read_text()).get("token") != self.token:
                    log.error("the lock %s was taken over by another run", self.path)
                    return
                os.utime(self.path)
            except (OSError, ValueError) as exc:
                log.warning("could not refresh the lock %s: %s", self.path, exc)

    def release(self) -> None:
        """Stops the heartbeat and deletes the lock if it is still ours."""
        self._stop.set()
        if self._beat is None:
            return
        self._beat.join()
        self._beat = None
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
        except (OSError, ValueError):
            pass


def _stale(held: dict, stale_s: float) -> str | None:
    """Why a lock may be taken over, or None while its holder lives."""
    job = held.get("slurm_job_id")
    if job is not None and job == _slurm_job():
        return f"it is our own Slurm job {job} (a requeue)"
    if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
        try:
            os.kill(held["pid"], 0)
        except ProcessLookupError:
            return "its process is gone"
        except PermissionError:  # alive, another user's
            pass
    if held["age_s"] > stale_s:
        return f"its heartbeat is older than trainer.lock_stale_s={stale_s:g}"
    return None


def describe(held: dict) -> str:
    return (
        f"host {held.get('host', '?')} pid {held.get('pid', '?')} "
        f"(Slurm job {held.get('slurm_job_id')}), heartbeat {held['age_s']:.0f} s ago"
    )


def refuse_on_every_rank(refusal: str | None) -> None:
    """After the process group starts: every rank raises rank 0's refusal (only rank 0 takes
    the lock), so a refused job exits 2 on every rank instead of leaving some waiting."""
    refusal = collectives.from_rank_0(refusal)
    if refusal is not None:
        raise RunDirTaken(refusal)
