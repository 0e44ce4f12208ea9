"""The training loop: optimizer steps over micro batches, and after each the step components
that are due (validation, samples, reporting, preemption, checkpoints).
"""

import dataclasses
import json
import logging
import sys
from collections.abc import Iterator

import torch
from omegaconf import OmegaConf

from mtrain import distributed, liveness
from mtrain.checkpoint import SUSPECT_STEPS, Checkpointer, check_resumable
from mtrain.config import TrainConfig, plan_batch
from mtrain.data import StreamingData
from mtrain.engine import as_float, batch_loss, build_engine, whole_grad_norm
from mtrain.monitor import StepTimer, ThroughputMonitor
from mtrain.run_dir import RunDir
from mtrain.step_components import (
    Preempted,
    Preemption,
    Reporter,
    StateMemory,
    StepComponent,
    Validator,
    drop_metrics_after,
)
from mtrain.tracking import Tracker
from mtrain.training_samples import TrainingSamples

# The name the trainer's lines have always had in logs, whichever module says them.
log = logging.getLogger("mtrain.train")


class NonFiniteLoss(RuntimeError):
    pass


class OptimizerStep:
    """One optimizer step over ``grad_accum`` micro batches; returns the mean loss over ranks.

    A micro batch whose loss is not finite on any rank is skipped on all of them (ZeRO's
    collectives need every rank to take the same path) and counted; too many in a row stop the
    run, since a model that only produces NaN will not recover. ``whole_grads``: the engine
    reports no grad norm (no ZeRO), so it is measured on the whole gradients.
    """

    def __init__(
        self, engine, device, grad_accum: int, max_nonfinite_in_row: int, whole_grads: bool
    ):
        self.engine, self.device, self.grad_accum = engine, device, grad_accum
        self.max_nonfinite_in_row, self.whole_grads = max_nonfinite_in_row, whole_grads
        self.nonfinite_skipped = 0
        self.grad_norm: float | None = None
        # The checkpoint (path, step) this run resumed from: a suspect for a NaN soon after.
        self.resumed_from: tuple[str, int] | None = None

    def __call__(self, batches: Iterator, step: int, timer: StepTimer) -> float:
        """Takes optimizer step number ``step`` (counted from 1)."""
        losses = []
        in_row = 0
        while len(losses) < self.grad_accum:
            with timer.waiting():
                batch = next(batches)
            loss = batch_loss(self.engine, batch, self.device)
            if distributed.any_rank(not torch.isfinite(loss).item()):
                self.nonfinite_skipped += 1
                in_row += 1
                log.warning(
                    "non-finite loss at step %d: micro batch skipped (%d in a row)", step, in_row
                )
                if in_row >= self.max_nonfinite_in_row:
                    raise NonFiniteLoss(self._nonfinite_message(in_row, step))
                continue
            in_row = 0
            self.engine.backward(loss)
            if len(losses) == self.grad_accum - 1:
                self.grad_norm = whole_grad_norm(self.engine.module) if self.whole_grads else None
            self.engine.step()
            losses.append(loss.item())
        self.grad_norm = as_float(self.engine.get_global_grad_norm()) or self.grad_norm
        return distributed.mean_over_ranks(sum(losses) / len(losses))

    def _nonfinite_message(self, in_row: int, step: int) -> str:
        message = f"{in_row} micro batches in a row gave a non-finite loss at step {step}"
        if self.resumed_from is not None and step <= self.resumed_from[1] + SUSPECT_STEPS:
            path, at = self.resumed_from
            return (
                f"{message}, {step - at} step(s) after resuming from {path}: that checkpoint is "
                f"the first suspect (move it aside, e.g. to {path}.damaged, and restart to "
                "resume from the one before); otherwise lower optim.lr or avoid fp16"
            )
        return (
            f"{message}; lower optim.lr, raise optim.warmup_steps, or use "
            "deepspeed.precision=fp32/bf16 instead of fp16"
        )


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        place: distributed.Placement,
        data: StreamingData,
        overrides: list[str],
    ):
        self.cfg, self.place, self.data, self.overrides = cfg, place, data, overrides
        self.plan = plan_batch(cfg, place.world_size)
        self.run_dir = RunDir(cfg.run_dir)
        self.step = 0
        self.run_id: str | None = None
        self.resuming = False

    def check_resumable(self) -> None:
        """Before any process group, on every rank (the same answer from the same files):
        refuses a run directory whose checkpoints another model shape, tokenizer or number of
        ranks saved, with nothing in it changed."""
        self.resuming = check_resumable(
            self.run_dir,
            dataclasses.asdict(self.cfg.model),
            self.data.tokenizer.hash,
            self.place.world_size,
        )

    def fit(self, device: torch.device) -> int:
        """Trains to ``trainer.max_steps``; returns the exit code (0, or the requeue code after
        a preemption signal)."""
        components, tracker = self._start(device)
        batches, timer = self.data.train_batches(), StepTimer()
        self._log_plan()
        try:
            while self.step < self.cfg.trainer.max_steps:
                loss = self.optimizer_step(batches, self.step + 1, timer)
                self.step += 1
                metrics = self._metrics(loss, *timer.finish())
                for component in components:
                    if component.due(self.step):
                        with timer.paused():
                            metrics |= component.run(self.step, metrics)
        except Preempted as stop:
            return stop.exit_code
        except RuntimeError as error:  # a failed collective: name the rank that stopped answering
            liveness.raise_naming_suspects(error, self.run_dir.root)
            raise
        if tracker is not None:
            tracker.finish()
        return 0

    # ---- set-up ----------------------------------------------------------------------------
    def _start(self, device: torch.device) -> tuple[list[StepComponent], Tracker | None]:
        """Writes what export needs, builds the engine, resumes, and builds the components in
        the order they run after a step: validation and samples add metrics the report shows;
        a preemption saves and stops before a regular save would."""
        cfg, t, main = self.cfg, self.cfg.trainer, self.place.is_main
        self.run_dir.root.mkdir(parents=True, exist_ok=True)
        say_log_file_failures_once()
        if main and (not self.resuming or not self.run_dir.model_config.exists()):
            # What export needs besides the weights: the model shape and the tokenizer (a
            # resumed run's are this run's already: check_resumable compared them).
            self.run_dir.model_config.write_text(json.dumps(dataclasses.asdict(cfg.model)))
            self.data.tokenizer.save(str(self.run_dir.tokenizer))
        engine, self.scheduler = build_engine(cfg, self.plan, self.place.rank)
        self.optimizer_step = OptimizerStep(
            engine,
            device,
            self.plan.grad_accum,
            t.max_nonfinite_in_row,
            whole_grads=cfg.deepspeed.zero_stage == 0,
        )
        probe_shape = (cfg.model.vocab_size, self.plan.seq_len)
        checkpointer = Checkpointer(engine, self.run_dir, t, probe_shape, self._state)
        self._resume(checkpointer)
        tracker = self._tracker() if main else None
        self.monitor = ThroughputMonitor(
            cfg.model, self.plan.seq_len, self.plan.tokens_per_step, self.place.world_size, device
        )
        return [
            StateMemory(engine, self.place.rank),
            Validator(t, engine, self.data, device),
            TrainingSamples(t, engine.module, self.data.tokenizer, self.run_dir, tracker, main),
            Reporter(t, self.run_dir, self.monitor, tracker, main),
            Preemption(checkpointer, t.preempt_exit_code),
            checkpointer,
        ], tracker

    def _log_plan(self) -> None:
        plan = self.plan
        log.info(
            "training %s for %d steps: %d tokens/step = %d micro x %d seq x %d accum x %d ranks",
            self.cfg.run_name,
            self.cfg.trainer.max_steps,
            plan.tokens_per_step,
            plan.micro_batch_size,
            plan.seq_len,
            plan.grad_accum,
            plan.world_size,
        )

    def _resume(self, checkpointer: Checkpointer) -> None:
        """Loads the newest intact checkpoint; rows of ``metrics.jsonl`` after its step are
        dropped, so that each step appears once."""
        ckpt, client, rank_state, skipped = checkpointer.resume()
        skipped_note = f" (skipped {'; '.join(skipped)})" if skipped else ""
        if ckpt is not None:
            self.step = client["step"]
            self.optimizer_step.nonfinite_skipped = client.get("nonfinite_skipped", 0)
            self.optimizer_step.resumed_from = (str(ckpt.path), self.step)
            self.run_id = client.get("wandb_run_id")
            self.data.load_state_dict(rank_state["data"])
            log.info("resumed from %s at step %d%s", ckpt.path, self.step, skipped_note)
        elif skipped:
            log.warning("no intact checkpoint: starting from step 0%s", skipped_note)
        if self.place.is_main:
            drop_metrics_after(self.run_dir.metrics, self.step)

    def _state(self) -> tuple[dict, dict]:
        """What a checkpoint keeps besides the engine: the shared client state and this
        rank's own."""
        client = {
            "step": self.step,
            "wandb_run_id": self.run_id,
            "nonfinite_skipped": self.optimizer_step.nonfinite_skipped,
        }
        return client, {"data": self.data.state_dict()}

    def _tracker(self) -> Tracker:
        config = OmegaConf.to_container(
            OmegaConf.structured(self.cfg), resolve=True, enum_to_str=True
        )
        tracker = Tracker(
            self.cfg.logger, self.cfg.run_name, self.run_dir, config, self.run_id, self.overrides
        )
        self.run_id = tracker.run_id
        return tracker

    def _metrics(self, loss: float, step_s: float, wait_s: float) -> dict:
        return {
            "train/loss": loss,
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/grad_norm": self.optimizer_step.grad_norm,
            "train/nonfinite_skipped": self.optimizer_step.nonfinite_skipped,
            "train/tokens_seen": self.step * self.plan.tokens_per_step,
            "data/corrupt_shards": self.data.corrupt_shards,
            "data/storage_retries": self.data.storage_retries,
            **self.monitor.metrics(step_s, wait_s),
        }


def say_log_file_failures_once() -> None:
    """A log file on a full disk would print a traceback for every line logged; its first
    failure is said once on stderr and the file dropped (the console keeps every line)."""
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler):

            def drop(record, handler=handler):
                root.removeHandler(handler)
                print(
                    f"warning: cannot write the log file {handler.baseFilename} "
                    f"({sys.exc_info()[1]}); logging to the console only",
                    file=sys.stderr,
                    flush=True,
                )

            handler.handleError = drop
