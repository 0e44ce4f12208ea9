"""Speed and health of the run: tokens/s, MFU, step time, data wait, memory, ETA.

FLOPs per token are computed once from the model shape (6N + 12·L·H·Q·T); MFU divides the
achieved FLOP rate by the dense bf16 peak of the device (none on CPU, so MFU is null there).
"""

import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from mtrain.training import flops


@dataclass
class StepTimer:
    """Splits each optimizer step's wall time into waiting for data and the rest; what runs
    ``paused()`` (validation, samples, saving) counts in no step."""

    clock: Callable[[], float] = time.perf_counter
    data_wait: float = field(default=0.0, init=False)
    started: float = field(init=False)

    def __post_init__(self):
        self.started = self.clock()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        start = self.clock()
        try:
            yield
        finally:
            self.data_wait += self.clock() - start

    @contextmanager
    def paused(self) -> Iterator[None]:
        start = self.clock()
        try:
            yield
        finally:
            self.started += self.clock() - start

    def finish(self) -> tuple[float, float]:
        """(step seconds, seconds of it spent waiting for data); starts the next step."""
        now = self.clock()
        step_s, wait = now - self.started, self.data_wait
        self.started, self.data_wait = now, 0.0
        return step_s, wait


class ThroughputMonitor:
    def __init__(
        self, model_cfg, seq_len: int, tokens_per_step: int, world_size: int, device: torch.device
    ):
        self.flops_per_token = flops.flops_per_token(model_cfg, seq_len)
        self.tokens_per_step = tokens_per_step
        self.world_size = world_size
        self.device = device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        peak = flops.peak_flops(name)
        self.peak_total = None if peak is None else peak * world_size
        self._recent: list[float] = []

    def metrics(self, step_s: float, wait_s: float) -> dict:
        tokens_per_s = self.tokens_per_step / step_s
        self._recent = [*self._recent, step_s][-20:]
        return {
            "perf/step_time_s": step_s,
            "perf/tokens_per_s": tokens_per_s,
            "perf/tokens_per_s_per_device": tokens_per_s / self.world_size,
            "perf/mfu": flops.mfu(tokens_per_s, self.flops_per_token, self.peak_total),
            "perf/data_wait_share": wait_s / step_s,
            "perf/peak_memory_gb": self.peak_memory_gb(),
        }

    def eta_s(self, steps_left: int) -> float:
        if not self._recent:
            return float("nan")
        return steps_left * sum(self._recent) / len(self._recent)

    def peak_memory_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        # ru_maxrss is in KiB on Linux: the process's peak resident memory.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def format_eta(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"
