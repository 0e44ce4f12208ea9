"""Process hygiene: a rank dies with its launcher, a loader worker with its rank, and a pid's
state read from the kernel."""

import ctypes
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path

import psutil

_PR_SET_PDEATHSIG = 1
# What a scheduler sends every process of a job before it ends it: Slurm's --signal=USR1
# (slurm/train.sbatch), submitit's timeout warning USR2. A rank checkpoints on them; its loader
# workers ignore them.
PREEMPTION_WARNINGS = (signal.SIGUSR1, signal.SIGUSR2)


def process_state(pid: int) -> str:
    """'gone', 'stopped' (SIGSTOP/traced), 'zombie', 'dying' (a SIGKILL pending: an OOM kill
    tearing down gigabytes takes seconds) or 'running' for a pid on this host."""
    try:
        status = psutil.Process(pid).status()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    if _kill_pending(pid):
        return "dying"
    return {"stopped": "stopped", "tracing-stop": "stopped", "zombie": "zombie"}.get(
        status, "running"
    )


def _kill_pending(pid: int) -> bool:
    """Whether SIGKILL is pending for the process (its own or its thread group's mask)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return False
    bit = 1 << (signal.SIGKILL - 1)
    return any(
        int(line.split()[1], 16) & bit for line in lines if line.startswith(("SigPnd", "ShdPnd"))
    )


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Asks Linux to send ``sig`` to this process when the thread that started it exits
    (``prctl(PR_SET_PDEATHSIG)``); exits at once when that parent is already gone. False where
    unsupported (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    # The parent died between our start and the prctl: no signal will come. (A launcher may
    # itself be pid 1 in a container, so pid 1 alone proves nothing.)
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True


def watch_rank(rank_pid: int) -> None:
    """Kills this process (a loader worker) when process ``rank_pid`` exits.

    The worker's parent is the fork server, not the rank, so neither ``PR_SET_PDEATHSIG`` nor
    torch's own watchdog (which compares ``os.getppid()``) sees the rank die; and the fork
    server never exits by itself while a worker lives, since every forkserver child inherits
    the write end of the server's "alive" pipe. A daemon thread waits on a pidfd of the rank
    (the kernel wakes it at the rank's exit; no pid-reuse race) or, without pidfd, polls it.
    Once the workers are gone the fork server sees EOF on its pipe and exits too."""
    try:
        fd = os.pidfd_open(rank_pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):
        fd = None

    def wait() -> None:
        if fd is not None:
            select.select([fd], [], [])
        else:
            while True:
                try:
                    os.kill(rank_pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=wait, name=f"watch-rank-{rank_pid}", daemon=True).start()
