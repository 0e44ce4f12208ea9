"""The host's memory: what is left (the cgroup's limit included), the kernel's OOM kills, and
glibc told to keep freed blocks for a CPU run's next step, or to give them back."""

import ctypes
import logging
import sys
from dataclasses import dataclass
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


@dataclass(frozen=True)
class MemoryCgroup:
    """A cgroup's memory controller: v2 (``memory.max``) or v1 (``memory.limit_in_bytes``)."""

    path: Path
    version: int

    def _file(self, v2: str, v1: str) -> Path:
        return self.path / (v2 if self.version == 2 else v1)

    @property
    def limit(self) -> int | None:
        """Its limit in bytes; None without one (v2 "max", v1's huge number)."""
        try:
            text = self._file("memory.max", "memory.limit_in_bytes").read_text().strip()
        except OSError:
            return None
        return None if text == "max" or int(text) >= 2**60 else int(text)

    @property
    def usage(self) -> int | None:
        try:
            return int(self._file("memory.current", "memory.usage_in_bytes").read_text())
        except (OSError, ValueError):
            return None

    @property
    def oom_kills(self) -> int | None:
        """Processes the kernel's OOM killer ended in it: its own verdict, kept by the kernel
        (v2 memory.events, v1 memory.oom_control)."""
        return _read_counter(self._file("memory.events", "memory.oom_control"), "oom_kill")

    def parents(self) -> list["MemoryCgroup"]:
        """It and every cgroup above it up to the hierarchy's root (each may limit it)."""
        found, path = [self], self.path
        while (path.parent / "cgroup.procs").exists() and path.parent != path:
            path = path.parent
            found.append(MemoryCgroup(path, self.version))
        return found


def cgroup_mounts() -> tuple[Path | None, Path | None]:
    """(the cgroup v2 hierarchy's mount, the v1 memory controller's mount), where mounted."""
    v2 = v1 = None
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        fields = line.split()
        if len(fields) < 4:
            continue
        if fields[2] == "cgroup2":
            v2 = Path(fields[1])
        elif fields[2] == "cgroup" and "memory" in fields[3].split(","):
            v1 = Path(fields[1])
    return v2, v1


def memory_cgroup(pid: int | str = "self") -> MemoryCgroup | None:
    """The cgroup whose memory controller holds a process: v2 where that hierarchy has the
    memory controller, else v1's (a host may mount both, v2 without memory); None when
    neither is readable."""
    v2, v1 = cgroup_mounts()
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, _, where = line.split(":", 2)
        if hierarchy == "0" and v2 is not None and "memory" in _controllers(v2):
            return MemoryCgroup(v2 / where.lstrip("/"), 2)
    for line in lines:
        _, controllers, where = line.split(":", 2)
        if v1 is not None and "memory" in controllers.split(","):
            return MemoryCgroup(v1 / where.lstrip("/"), 1)
    return None


def _controllers(v2_root: Path) -> list[str]:
    try:
        return (v2_root / "cgroup.controllers").read_text().split()
    except OSError:
        return []


def oom_kills() -> int | None:
    """Processes the kernel's OOM killer has ended: the machine's count (/proc/vmstat, which
    counts kills in every cgroup), else this cgroup's; None when neither is readable."""
    counted = _read_counter(Path("/proc/vmstat"), "oom_kill")
    if counted is not None:
        return counted
    cgroup = memory_cgroup()
    return cgroup.oom_kills if cgroup is not None else None


def cgroup_memory_left() -> int | None:
    """Bytes this process's cgroup may still allocate, the tightest of it and the cgroups
    above it (v2 or v1), or None without a limit."""
    cgroup = memory_cgroup()
    if cgroup is None:
        return None
    left = [
        limit - (group.usage or 0)
        for group in cgroup.parents()
        if (limit := group.limit) is not None
    ]
    return min(left, default=None)


def cgroup_limit() -> tuple[str, int] | None:
    """(the cgroup, its limit in bytes) of the tightest limit on this process; None without."""
    cgroup = memory_cgroup()
    limits = [(g.limit, str(g.path)) for g in cgroup.parents() if g.limit] if cgroup else []
    if not limits:
        return None
    limit, path = min(limits)
    return path, limit


def memory_available() -> int:
    """Bytes the machine can still give (the cgroup's limit where lower)."""
    available = psutil.virtual_memory().available
    left = cgroup_memory_left()
    return available if left is None else min(available, left)


# mallopt's parameters (malloc.h): -1 as the trim threshold turns trimming off.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
# Blocks from this size up are mapped on their own and unmapped when freed: a tensor of any
# size a training frees goes back to the kernel.
RETURNED_FROM = 64 << 10
_returning = False  # return_freed_memory was applied: trim() gives the heap's top back too


def _glibc():
    """glibc, or None where the C library is another (musl, macOS)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def return_freed_memory() -> bool:
    """Asks glibc to give freed memory back to the kernel: every block from ``RETURNED_FROM``
    up mapped on its own (glibc's threshold then no longer rises as blocks are freed), and
    the heap trimmed now and at each ``trim()``. The price is the one ``keep_freed_memory``
    avoids: pages mapped afresh every step. False, nothing changed, where it is not glibc."""
    global _returning
    libc = _glibc()
    if libc is None:
        return False
    _returning = libc.mallopt(M_MMAP_THRESHOLD, RETURNED_FROM) == 1
    trim()
    return _returning


def trim() -> None:
    """Gives the heap's free memory back (malloc_trim) once a large transient is gone (a
    loaded checkpoint); only where ``return_freed_memory`` was chosen."""
    if _returning and (libc := _glibc()) is not None:
        libc.malloc_trim(0)


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
    libc = _glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success; setting either turns glibc's moving thresholds off.
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1
