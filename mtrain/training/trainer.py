"""The training loop: optimizer steps over micro batches, and after each the step components
that are due (validation, samples, reporting, preemption, checkpoints).
"""

import dataclasses
import json
import logging
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from data_pipeline.app import config_dict
from data_pipeline.launch import Placement
from data_pipeline.reader import split_shares
from mtrain.data.loader import StreamingData
from mtrain.distributed import collectives, heartbeats
from mtrain.exported.adapter import check_base, record_base, recorded_rows
from mtrain.exported.loading import load_weights
from mtrain.exported.model_dir import WEIGHTS
from mtrain.runs.run_dir import RunDir
from mtrain.runs.tracking import Tracker
from mtrain.training.adapters import EmbeddingRows, add_adapters
from mtrain.training.checkpointer import Checkpointer
from mtrain.training.config import TrainConfig, batch_sizes
from mtrain.training.contrastive import CONTRASTIVE, contrastive_batch_loss
from mtrain.training.engine import as_float, batch_loss, build_engine, engine_config, new_model
from mtrain.training.grad_sync import OverlappedAllReduce, take_gradient_reduction
from mtrain.training.monitor import StepTimer, ThroughputMonitor
from mtrain.training.resume import check_resumable
from mtrain.training.samples import TrainingSamples
from mtrain.training.small_data import (
    StoppedEarly,
    ValidationWatch,
    warn_if_smaller_than_a_batch,
)
from mtrain.training.step_components import (
    Preempted,
    Preemption,
    Reporter,
    StateSizeReport,
    StepComponent,
    Validator,
    drop_metrics_after,
)
from mtrain.training.token_rows import choose_rows

log = logging.getLogger(__name__)

# Steps after a resume during which a non-finite loss names the resumed checkpoint a suspect.
SUSPECT_STEPS = 10


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class StepOutcome:
    """What every rank agrees on after an optimizer step, from the step's one collective."""

    loss: float  # mean over ranks and micro batches of the finite losses (nan if none)
    nonfinite: int  # micro batches, over all ranks, whose loss was not finite
    applied: bool  # False: the optimizer skipped the step (gradients not finite)
    stop_asked: bool  # a preemption signal reached some rank


class OptimizerStep:
    """One optimizer step over ``grad_accum`` micro batches.

    Nothing is checked between micro batches: a check would cost a host sync, and a collective
    too (ZeRO needs every rank on the same path), per micro batch. A non-finite loss gives
    non-finite gradients, and the step is then skipped as a whole: by DeepSpeed's own check of
    the global gradient norm under ZeRO, by the trainer's under ZeRO-0 (which has none), where
    the trainer clips too (``clips_own``), so that one norm serves clipping, reporting and the
    check. The step's bookkeeping (loss, non-finite count, preemption) is one small all-reduce
    at its end, where the optimizer has synchronised anyway. Too many steps in a row with a
    non-finite loss stop the run, since a model that only produces NaN will not recover.
    """

    def __init__(
        self,
        engine,
        device,
        grad_accum: int,
        max_nonfinite_in_row: int,
        clips_own: bool,
        grad_clip: float = 0.0,
        reduction: OverlappedAllReduce | None = None,
        loss_fn=batch_loss,
    ):
        self.engine, self.device, self.grad_accum = engine, device, grad_accum
        self.max_nonfinite_in_row, self.clips_own = max_nonfinite_in_row, clips_own
        self.grad_clip = grad_clip
        # The trainer's own gradient reduction, overlapped with the last backward pass of a
        # step (ZeRO-0 on several ranks); None where DeepSpeed reduces, or nothing needs to.
        self.reduction = reduction
        # The objective's loss of one micro batch (next-token; or contrastive over views).
        self.loss_fn = loss_fn
        self.nonfinite_skipped = 0
        self.nonfinite_in_row = 0
        self.grad_norm: float | None = None
        # Called before the optimizer's update (a checkpoint still being written waits it).
        self.before_update: Callable[[], None] | None = None
        # The checkpoint (path, step) this run resumed from: a suspect for a NaN soon after.
        self.resumed_from: tuple[str, int] | None = None

    def __call__(
        self, batches: Iterator, step: int, timer: StepTimer, stop_asked: bool = False
    ) -> StepOutcome:
        """Takes optimizer step number ``step`` (counted from 1)."""
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        nonfinite = torch.zeros((), dtype=torch.float64, device=self.device)
        own_norm = None
        for micro in range(self.grad_accum):
            with timer.waiting():
                batch = next(batches)
            loss = self.loss_fn(self.engine, batch, self.device)
            finite = torch.isfinite(loss.detach())
            loss_sum += torch.where(finite, loss.detach(), 0.0)
            nonfinite += ~finite
            last = micro == self.grad_accum - 1
            if last and self.reduction is not None:
                self.reduction.arm()
            self.engine.backward(loss)
            if last and self.reduction is not None:
                self.reduction.wait()
            if last and self.clips_own:
                own_norm = self._clip()  # gradients are reduced over ranks by now
            if last and self.before_update is not None:
                self.before_update()
            self.engine.step()
        total_loss, total_nonfinite, stops = collectives.sum_over_ranks(
            [loss_sum, nonfinite, float(stop_asked)]
        )
        ranks = collectives.world_size()
        finite_batches = self.grad_accum * ranks - total_nonfinite
        if own_norm is not None:
            self.grad_norm = own_norm
            applied = math.isfinite(own_norm)
        else:
            self.grad_norm = as_float(self.engine.get_global_grad_norm())
            applied = self.engine.was_step_applied()
        outcome = StepOutcome(
            loss=total_loss / finite_batches if finite_batches else math.nan,
            nonfinite=int(total_nonfinite),
            applied=applied,
            stop_asked=stops > 0,
        )
        self._count(outcome, step)
        return outcome

    def _clip(self) -> float:
        """Clips the whole gradients (ZeRO-0) and returns their norm; non-finite ones are
        dropped, so that the optimizer skips every parameter."""
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True).item()
        if not math.isfinite(norm):
            self.engine.optimizer.zero_grad(set_to_none=True)
        return norm

    def _count(self, outcome: StepOutcome, step: int) -> None:
        if not outcome.nonfinite:
            self.nonfinite_in_row = 0
            return
        self.nonfinite_skipped += outcome.nonfinite
        self.nonfinite_in_row += 1
        log.warning(
            "non-finite loss in %d micro batch(es) at step %d: step %s (%d in a row)",
            outcome.nonfinite,
            step,
            "applied with the finite gradients" if outcome.applied else "skipped",
            self.nonfinite_in_row,
        )
        if self.nonfinite_in_row >= self.max_nonfinite_in_row:
            raise NonFiniteLoss(self._nonfinite_message(self.nonfinite_in_row, step))

    def _nonfinite_message(self, in_row: int, step: int) -> str:
        message = (
            f"{in_row} optimizer steps in a row had a non-finite loss, the last at step {step}"
        )
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
        place: Placement,
        data: StreamingData,
        overrides: list[str],
    ):
        self.cfg, self.place, self.data, self.overrides = cfg, place, data, overrides
        self.batch_sizes = batch_sizes(cfg, place.world_size)
        self.run_dir = RunDir(cfg.run_dir)
        self.step = 0
        self.run_id: str | None = None
        self.resuming = False

    def check_resumable(self) -> None:
        """Before any process group, on every rank (the same answer from the same files):
        refuses a run directory whose checkpoints another model shape or tokenizer saved, with
        nothing in it changed (another number of ranks resumes, converted)."""
        self.resuming = check_resumable(
            self.run_dir, dataclasses.asdict(self.cfg.model), self.data.tokenizer.hash
        )
        if self.resuming and self.cfg.finetune.adapters:
            init_from = self.cfg.init_from
            check_base(self.run_dir, init_from, Path(init_from) / WEIGHTS)

    def fit(self, device: torch.device) -> int:
        """Trains to ``trainer.max_steps``; returns the exit code (0, or the requeue code after
        a preemption signal)."""
        components, tracker = self._start(device)
        preemption = next(c for c in components if isinstance(c, Preemption))
        batches, timer = self.data.train_batches(), StepTimer()
        self._log_batch_sizes()
        try:
            while self.step < self.cfg.trainer.max_steps:
                outcome = self.stepper(batches, self.step + 1, timer, preemption.signalled_here)
                preemption.signalled_anywhere = outcome.stop_asked
                self.step += 1
                metrics = self._metrics(outcome, *timer.finish())
                for component in components:
                    if component.due(self.step):
                        with timer.paused():
                            metrics |= component.run(self.step, metrics)
        except Preempted as stop:
            return stop.exit_code
        except StoppedEarly as stop:
            log.info("%s", stop)
        except RuntimeError as error:  # a failed collective: name the rank that stopped answering
            heartbeats.raise_naming_suspects(error, self.run_dir.root)
            raise
        if tracker is not None:
            tracker.finish()
        return 0

    # ---- set-up ----------------------------------------------------------------------------
    def _start(self, device: torch.device) -> tuple[list[StepComponent], Tracker | None]:
        """Writes what export needs, builds the model (fresh, or the exported one ``init_from``
        names) and its engine, resumes, and builds the components in the order they run after
        a step: validation and samples add metrics the report shows; a preemption saves and
        stops before a regular save would."""
        cfg, t, main = self.cfg, self.cfg.trainer, self.place.is_main
        self.run_dir.root.mkdir(parents=True, exist_ok=True)
        say_log_file_failures_once()
        if main and (not self.resuming or not self.run_dir.model_config.exists()):
            # What export needs besides the weights: the model shape and the tokenizer (a
            # resumed run's are this run's already: check_resumable compared them).
            self.run_dir.model_config.write_text(json.dumps(dataclasses.asdict(cfg.model)))
            self.data.tokenizer.save(str(self.run_dir.tokenizer))
        ds_config = engine_config(cfg, self.batch_sizes)
        model = new_model(cfg, ds_config)
        if cfg.init_from:  # fine-tuning: the exported weights replace the fresh ones
            load_weights(model, cfg.init_from, self.data.tokenizer)
        if cfg.finetune.adapters:
            rows = self._embedding_rows(device)
            add_adapters(model, cfg.finetune, t.seed, rows)
            if main and not self.resuming:
                record_base(self.run_dir, cfg.init_from, Path(cfg.init_from) / WEIGHTS, rows)
        engine, self.scheduler = build_engine(cfg, model, ds_config, self.place.rank)
        self.stepper = OptimizerStep(
            engine,
            device,
            self.batch_sizes.grad_accum,
            t.max_nonfinite_in_row,
            clips_own=cfg.deepspeed.clips_in_trainer,
            grad_clip=cfg.optim.grad_clip,
            reduction=take_gradient_reduction(engine, cfg.deepspeed),
            loss_fn=contrastive_batch_loss if cfg.objective == CONTRASTIVE else batch_loss,
        )
        probe_shape = (cfg.model.vocab_size, self.batch_sizes.seq_len)
        checkpointer = Checkpointer(engine, self.run_dir, t, probe_shape, self._state)
        self.stepper.before_update = checkpointer.wait_for_write
        self._resume(checkpointer)
        tracker = self._tracker() if main else None
        self.monitor = ThroughputMonitor(
            cfg.model,
            self.batch_sizes.seq_len,
            self.batch_sizes.tokens_per_step,
            self.place.world_size,
            device,
        )
        return [
            StateSizeReport(engine, self.place.rank),
            Validator(t, engine, self.data, device),
            ValidationWatch(t, checkpointer, self.run_dir, main),
            TrainingSamples(t, engine.module, self.data.tokenizer, self.run_dir, tracker, main),
            Reporter(t, self.run_dir, self.monitor, tracker, main),
            Preemption(checkpointer, t.preempt_exit_code),
            checkpointer,
        ], tracker

    def _embedding_rows(self, device: torch.device) -> list[int]:
        """The embedding rows an adapter run trains: those it recorded when it started, else
        chosen by rank 0 (the base scores the training data) and shared with every rank."""
        cfg = self.cfg
        if cfg.finetune.embedding_rows in (EmbeddingRows.none, EmbeddingRows.all):
            return []
        if self.resuming and (recorded := recorded_rows(self.run_dir)) is not None:
            return recorded
        rows = None
        if self.place.is_main:
            data = self.data
            pieces = data.reader.pieces(split_shares(data.cfg.path, "train", data.card))
            rows = choose_rows(cfg.finetune.embedding_rows, cfg.init_from, cfg.model,
                               data.tokenizer, pieces, device)  # fmt: skip
        return collectives.from_rank_0(rows)

    def _log_batch_sizes(self) -> None:
        sizes = self.batch_sizes
        train = self.data.card["splits"]["train"]
        warn_if_smaller_than_a_batch(train["tokens"], train["pieces"], sizes.tokens_per_step)
        log.info(
            "training %s for %d steps: %d tokens/step = %d micro x %d seq x %d accum x %d ranks",
            self.cfg.run_name,
            self.cfg.trainer.max_steps,
            sizes.tokens_per_step,
            sizes.micro_batch_size,
            sizes.seq_len,
            sizes.grad_accum,
            sizes.world_size,
        )

    def _resume(self, checkpointer: Checkpointer) -> None:
        """Loads the newest intact checkpoint; rows of ``metrics.jsonl`` after its step are
        dropped, so that each step appears once. A checkpoint of another number of ranks is
        converted, and the data dealt anew from where all its ranks stood."""
        resumed = checkpointer.resume()
        ckpt, client, skipped = resumed.ckpt, resumed.client, resumed.skipped
        skipped_note = f" (skipped {'; '.join(skipped)})" if skipped else ""
        if ckpt is not None:
            self.step = client["step"]
            self.stepper.nonfinite_skipped = client.get("nonfinite_skipped", 0)
            self.stepper.resumed_from = (str(ckpt.path), self.step)
            self.run_id = client.get("wandb_run_id")
            change = ""
            if not resumed.resharded:
                self.data.load_state_dict(resumed.rank_states[0]["data"])
            else:
                position = self.data.resume_resharded([s["data"] for s in resumed.rank_states])
                change = (
                    f", written by {resumed.saved_by} rank(s), now {self.place.world_size}: "
                    f"{resumed.conversion}; data position: {position}"
                )
            log.info("resumed from %s at step %d%s%s", ckpt.path, self.step, change, skipped_note)
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
            "nonfinite_skipped": self.stepper.nonfinite_skipped,
        }
        return client, {"data": self.data.state_dict()}

    def _tracker(self) -> Tracker:
        config = config_dict(self.cfg)
        tracker = Tracker(
            self.cfg.logger, self.cfg.run_name, self.run_dir, config, self.run_id, self.overrides
        )
        self.run_id = tracker.run_id
        return tracker

    def _metrics(self, outcome: StepOutcome, step_s: float, wait_s: float) -> dict:
        return {
            "train/loss": outcome.loss,
            "train/step_applied": outcome.applied,
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/grad_norm": self.stepper.grad_norm,
            "train/nonfinite_skipped": self.stepper.nonfinite_skipped,
            "train/tokens_seen": self.step * self.batch_sizes.tokens_per_step,
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
