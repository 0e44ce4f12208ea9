"""A memory-limited cgroup for a test's processes: cgroup v2 (``memory.max``) where its
hierarchy has the memory controller, else v1 (``memory.limit_in_bytes``). Root only; tests
skip with the reason where neither can be made.

Run as a script, it is the process torchrun starts for each rank: the rank named by
``MTRAIN_TEST_CGROUP_RANK`` first moves itself into the cgroup whose ``cgroup.procs`` file
``MTRAIN_TEST_CGROUP_PROCS`` names (so that all its memory counts there from the start),
then every rank runs ``python -m <module> <args>``:

    torchrun ... tests/support/memory_cgroup.py mtrain.train data.path=...
"""

import contextlib
import os
import runpy
import signal
import sys
import time
import uuid
from pathlib import Path

from mtrain.distributed.host_memory import MemoryCgroup, cgroup_mounts

PROCS_ENV, RANK_ENV = "MTRAIN_TEST_CGROUP_PROCS", "MTRAIN_TEST_CGROUP_RANK"


def make(prefix: str = "mtrain-test") -> tuple[MemoryCgroup | None, str]:
    """A new cgroup with the memory controller, or (None, why not)."""
    v2, v1 = cgroup_mounts()
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    tried = []
    if v2 is not None:
        try:
            controllers = (v2 / "cgroup.controllers").read_text().split()
        except OSError as exc:
            controllers = []
            tried.append(f"v2 at {v2}: {exc}")
        if "memory" in controllers:
            try:
                (v2 / "cgroup.subtree_control").write_text("+memory")
                (v2 / name).mkdir()
                return MemoryCgroup(v2 / name, 2), ""
            except OSError as exc:
                tried.append(f"v2 at {v2}: {exc}")
        else:
            tried.append(f"v2 at {v2} has no memory controller")
    if v1 is not None:
        try:
            (v1 / name).mkdir()
            return MemoryCgroup(v1 / name, 1), ""
        except OSError as exc:
            tried.append(f"v1 at {v1}: {exc}")
    return None, "no writable memory cgroup: " + ("; ".join(tried) or "none mounted")


def set_limit(cgroup: MemoryCgroup, limit: int) -> None:
    name = "memory.max" if cgroup.version == 2 else "memory.limit_in_bytes"
    (cgroup.path / name).write_text(str(limit))


def peak(cgroup: MemoryCgroup) -> int | None:
    """The most it has held (v1 max_usage_in_bytes, v2 memory.peak where the kernel has it)."""
    name = "memory.peak" if cgroup.version == 2 else "memory.max_usage_in_bytes"
    try:
        return int((cgroup.path / name).read_text())
    except (OSError, ValueError):
        return None


def procs_file(cgroup: MemoryCgroup) -> Path:
    return cgroup.path / "cgroup.procs"


def remove(cgroup: MemoryCgroup) -> None:
    """Kills what is left in it and removes it."""
    for _ in range(50):
        try:
            pids = [int(p) for p in procs_file(cgroup).read_text().split()]
        except OSError:
            return
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    with contextlib.suppress(OSError):
        cgroup.path.rmdir()


if __name__ == "__main__":
    if os.environ.get("RANK") == os.environ.get(RANK_ENV):
        Path(os.environ[PROCS_ENV]).write_text(str(os.getpid()))
    module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
