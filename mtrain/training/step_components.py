"""What happens at a step boundary besides the optimizer step, one component each: the first
step's memory line, validation, reporting and preemption (checkpoints: ``checkpointer``,
samples: ``samples``). Each says itself when it is due; the loop runs it then.
"""

import errno
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Protocol

import torch

from mtrain.data.loader import StreamingData
from mtrain.distributed import collectives, processes
from mtrain.runs.run_dir import RunDir
from mtrain.runs.tracking import Tracker
from mtrain.training.checkpointer import Checkpointer, DiskFull, disk_full_message
from mtrain.training.config import TrainerConfig
from mtrain.training.engine import batch_loss, state_megabytes
from mtrain.training.monitor import ThroughputMonitor, format_eta

log = logging.getLogger(__name__)


class StepComponent(Protocol):
    def due(self, step: int) -> bool:
        """Whether to run after optimizer step ``step``; the same on every rank, since a
        component may take part in collectives."""
        ...

    def run(self, step: int, metrics: dict) -> dict:
        """Does its work given the step's metrics so far; returns the metrics it adds."""
        ...


class Preempted(Exception):
    """Raised at a step boundary once the checkpoint a preemption signal asked for is saved."""

    def __init__(self, exit_code: int):
        super().__init__(exit_code)
        self.exit_code = exit_code


class StateSizeReport:
    """Logs, once optimizer state exists (after the first step), what this rank holds."""

    def __init__(self, engine, rank: int):
        self.engine, self.rank = engine, rank

    def due(self, step: int) -> bool:
        return step == 1

    def run(self, step: int, metrics: dict) -> dict:
        log.info(
            "rank %d holds %.2f MB of parameters and optimizer state",
            self.rank,
            state_megabytes(self.engine),
        )
        return {}


class Validator:
    """Every ``eval_every`` steps and at the last: the mean loss over ``eval_batches`` val
    batches on every rank (each rank its own), averaged over ranks."""

    def __init__(self, cfg: TrainerConfig, engine, data: StreamingData, device: torch.device):
        self.cfg, self.engine, self.data, self.device = cfg, engine, data, device

    def due(self, step: int) -> bool:
        every = self.cfg.eval_every
        return bool(every) and (step % every == 0 or step == self.cfg.max_steps)

    @torch.no_grad()
    def run(self, step: int, metrics: dict) -> dict:
        self.engine.eval()
        losses = [
            batch_loss(self.engine, batch, self.device).item()
            for batch in self.data.val_batches(self.cfg.eval_batches)
        ]
        self.engine.train()
        if not losses:  # the same on every rank: the val split is dealt out in equal rounds
            log.warning("the val split is too small for one sequence per rank: no val loss")
            return {}
        loss = collectives.mean_over_ranks(sum(losses) / len(losses))
        return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0))}


class Reporter:
    """On rank 0, every step: a row of ``metrics.jsonl``, the same to wandb, and every
    ``log_every`` steps (and at validation and the last step) a line on the console."""

    def __init__(
        self,
        cfg: TrainerConfig,
        run: RunDir,
        monitor: ThroughputMonitor,
        tracker: Tracker | None,
        is_main: bool,
    ):
        self.cfg, self.run_dir, self.monitor = cfg, run, monitor
        self.tracker, self.is_main = tracker, is_main

    def due(self, step: int) -> bool:
        return self.is_main

    def run(self, step: int, metrics: dict) -> dict:
        try:
            with open(self.run_dir.metrics, "a") as f:
                # The clocks too, wall and this process's CPU: rates over many steps with
                # everything between steps included (bench/bench_train.py).
                stamps = {"time": time.time(), "cpu_time": time.process_time()}
                f.write(json.dumps({"step": step, **stamps, **metrics}) + "\n")
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise DiskFull(disk_full_message(self.run_dir, self.run_dir.metrics)) from exc
        if self.tracker is not None:
            self.tracker.log(metrics, step)
        t = self.cfg
        if step % t.log_every == 0 or step == t.max_steps or "val/loss" in metrics:
            log.info(self.line(step, metrics))
        return {}

    def line(self, step: int, metrics: dict) -> str:
        t = self.cfg
        line = (
            f"step {step}/{t.max_steps} | loss {metrics['train/loss']:.4f} | "
            f"lr {metrics['train/lr']:.2e} | gnorm {_fmt(metrics['train/grad_norm'], '.3f')} | "
            f"{metrics['perf/tokens_per_s']:,.0f} tok/s | "
            f"mfu {_fmt(metrics['perf/mfu'], '.1%')} | "
            f"data {metrics['perf/data_wait_share']:.0%} | "
            f"mem {metrics['perf/peak_memory_gb']:.2f} GB | "
            f"eta {format_eta(self.monitor.eta_s(t.max_steps - step))}"
        )
        if "val/loss" in metrics:
            line += f" | val {metrics['val/loss']:.4f} (ppl {metrics['val/perplexity']:.2f})"
        return line


# Slurm's USR1 (slurm/train.sbatch), submitit's USR2 and a plain TERM.
PREEMPTION_SIGNALS = (*processes.PREEMPTION_WARNINGS, signal.SIGTERM)


class Preemption:
    """SIGUSR1/SIGUSR2/SIGTERM: checkpoint at the next step boundary, then stop with
    ``exit_code`` (the sbatch script requeues on it). The handler only sets a flag: saving from
    inside a signal handler could interrupt a collective."""

    def __init__(self, checkpointer: Checkpointer, exit_code: int):
        self.checkpointer, self.exit_code = checkpointer, exit_code
        self.signalled_here = False
        # The optimizer step's one collective carries it to every rank.
        self.signalled_anywhere = False
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._set)

    def _set(self, signum, _frame):
        log.warning(
            "received %s: will checkpoint and exit at the next step boundary",
            signal.Signals(signum).name,
        )
        self.signalled_here = True

    def due(self, step: int) -> bool:
        return self.signalled_anywhere  # a signal may reach only some ranks

    def run(self, step: int, metrics: dict) -> dict:
        self.checkpointer.save(step)
        self.checkpointer.finish()  # written in the background: the exit waits for it
        log.warning(
            "checkpointed step %d after a preemption signal; exiting with %d "
            "so the job is requeued",
            step,
            self.exit_code,
        )
        raise Preempted(self.exit_code)


def drop_metrics_after(path: Path, step: int) -> None:
    """Keeps the rows of ``metrics.jsonl`` up to ``step`` (the step a run resumes from):
    rewritten whole and renamed into place, so a crash leaves the old file or the new one. A
    line cut short by a crash is dropped too."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and _step_of(line) <= step]
    if len(kept) == len(lines):
        return
    partial = path.with_suffix(".partial")
    partial.write_text("".join(kept))
    os.replace(partial, path)
    log.info("dropped %d rows of %s after step %d", len(lines) - len(kept), path, step)


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
