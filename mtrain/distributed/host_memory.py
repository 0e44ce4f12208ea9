"""Host memory of a run that trains on the CPU: one step's freed activations serve the next.

glibc gives large freed blocks back to the kernel: blocks over its mmap threshold (which it
raises as it sees blocks freed, up to 32 MiB) are unmapped at ``free``, and the heap's top is
trimmed once more than twice that lies free there. A training step allocates and frees the
same activations every step (small_20m's MLP ones are 32 MiB each), so the kernel maps them
afresh every step: 50-300k page faults a small_20m step on a CPU, zeroed pages each, and
in a virtual machine the hypervisor's work too (~8 us a fault measured on a 2-core VM: up to a
quarter of a step). Which step pays how many depends on the order of frees, so the cost
also comes and goes from one run to the next.

Served from the heap and never trimmed, a step's memory is the previous step's: no page
faults once the first steps have reached their peak, and a peak no higher (the trainer's
resident peak was 2.03 GB at small_20m either way). The price: memory freed for good (a
loaded checkpoint's buffers) stays with the process, reused by later allocations, not
returned; a run on a GPU keeps glibc's defaults (its activations are not host memory).
"""

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

# mallopt's parameters (malloc.h): -1 as the trim threshold turns trimming off.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Asks glibc to serve every allocation from its heap (no mmap) and never to trim it.
    False, and nothing changed, where the C library is not glibc (musl, macOS)."""
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
