"""The host's memory: what is left (the cgroup's limit included), the kernel's OOM kills, and
glibc told to keep freed blocks for a CPU run's next step."""

import ctypes
import logging
import sys
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


def _read_counter(path: Path, name: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def oom_kills() -> int | None:
    """Processes the kernel's OOM killer has ended: this cgroup's count (v2 memory.events, v1
    memory.oom_control) plus the machine's (/proc/vmstat); None when neither is readable."""
    counts = [
        _read_counter(Path("/sys/fs/cgroup/memory.events"), "oom_kill"),
        _read_counter(Path("/sys/fs/cgroup/memory/memory.oom_control"), "oom_kill"),
        _read_counter(Path("/proc/vmstat"), "oom_kill"),
    ]
    known = [c for c in counts if c is not None]
    return sum(known) if known else None


def cgroup_memory_left() -> int | None:
    """Bytes this cgroup may still allocate (v2 or v1), or None without a limit."""
    for limit_file, used_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        root = Path("/sys/fs/cgroup")
        try:
            limit = (root / limit_file).read_text().strip()
            used = int((root / used_file).read_text())
        except (OSError, ValueError):
            continue
        if limit != "max" and int(limit) < 2**60:  # v1 writes "no limit" as a huge number
            return int(limit) - used
    return None


def memory_available() -> int:
    """Bytes the machine can still give (the cgroup's limit where lower)."""
    available = psutil.virtual_memory().available
    left = cgroup_memory_left()
    return available if left is None else min(available, left)


# mallopt's parameters (malloc.h): -1 as the trim threshold turns trimming off.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Asks glibc to serve every allocation from its heap (no mmap) and never to trim it.
    False, and nothing changed, where the C library is not glibc (musl, macOS).

    On a run that trains on the CPU, one step's freed activations serve the next.
    glibc gives large freed blocks back to the kernel: blocks over its mmap threshold (which it
    raises as it sees blocks freed, up to 32 MiB) are unmapped at ``free``, and the heap's top is
    trimmed once more than twice that lies free there. A training step allocates and frees the
    same activations every step (small_20m's MLP ones are 32 MiB each), so the kernel maps them
    afresh every step: tens of thousands of page faults a step, zeroed pages each, and in a
    virtual machine the hypervisor's work too (bench/README.md has the counts and their cost).
    Which step pays how many depends on the order of frees, so the cost also comes and goes
    from one run to the next.

    Served from the heap and never trimmed, a step's memory is the previous step's: no page
    faults once the first steps have reached their peak, and a resident peak no higher. The
    price: memory freed for good (a
    loaded checkpoint's buffers) stays with the process, reused by later allocations, not
    returned; a run on a GPU keeps glibc's defaults (its activations are not host memory).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; setting either turns glibc's moving thresholds off.
    applied = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
    if applied:
        log.info("host memory: freed blocks stay in the process for the next step (glibc)")
    return applied
