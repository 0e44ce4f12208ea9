"""Pretrain a GPT on prepared shards: ``python -m mtrain.train data.path=... model=tiny``.

One loop (``Trainer.fit``); checkpoints, metrics, wandb, validation and signals are separate
modules it calls at step boundaries. Launch it with ``torchrun``, the ``deepspeed`` launcher or
``srun``; the config is validated before any process group starts.
"""

import dataclasses
import json
import logging
import math
import random
import signal
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from data_pipeline.app import entry_point
from mtrain import checkpoint, distributed
from mtrain.artifacts import MODEL_CONFIG
from mtrain.config import TrainConfig, check, plan_batch
from mtrain.data import StreamingData
from mtrain.ds_config import deepspeed_config
from mtrain.model import GPT
from mtrain.monitor import StepTimer, ThroughputMonitor, format_eta
from mtrain.schedule import lr_multiplier
from mtrain.tracking import Tracker
from mtrain.training_samples import TrainingSamples

log = logging.getLogger("mtrain.train")


class NonFiniteLoss(RuntimeError):
    pass


class PreemptionFlag:
    """Set by SIGUSR1/SIGTERM; the loop checkpoints at the next step boundary. The handler
    only sets the flag: saving from inside a signal handler could interrupt a collective."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._set)

    def _set(self, signum, _frame):
        log.warning(
            "received %s: will checkpoint and exit at the next step boundary",
            signal.Signals(signum).name,
        )
        self.raised = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        place: distributed.Placement,
        data: StreamingData,
        overrides: list[str],
    ):
        self.cfg, self.place, self.overrides = cfg, place, overrides
        self.data = data
        self.plan = plan_batch(cfg, place.world_size)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.step = 0
        self.nonfinite_skipped = 0
        self.run_id: str | None = None
        self.grad_norm: float | None = None

    # ---- set-up ----------------------------------------------------------------------------
    def _build_engine(self, device: torch.device):
        import deepspeed

        cfg = self.cfg
        seed_everything(cfg.trainer.seed)  # same initial weights on every rank
        ds_config = deepspeed_config(cfg.deepspeed, cfg.optim, self.plan)
        if cfg.deepspeed.zero_init and cfg.deepspeed.zero_stage == 3:
            with deepspeed.zero.Init(config_dict_or_path=ds_config):
                model = GPT(cfg.model)
        else:
            model = GPT(cfg.model)
        if cfg.init_from:
            from mtrain.artifacts import load_weights

            load_weights(model, cfg.init_from)
        max_steps = cfg.trainer.max_steps

        def schedule(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: lr_multiplier(s, max_steps, cfg.optim)
            )

        engine, _, _, scheduler = deepspeed.initialize(
            model=model,
            model_parameters=model.param_groups(cfg.optim.weight_decay),
            config=ds_config,
            lr_scheduler=schedule,
        )
        self.engine, self.scheduler = engine, scheduler
        self.device = device
        local, total = parameter_share(engine.module)
        log.info(
            "rank %d holds %d of %d parameter elements (%.1f%%)",
            self.place.rank,
            local,
            total,
            100 * local / total,
        )
        seed_everything(cfg.trainer.seed + self.place.rank)  # different dropout per rank

    def _resume(self) -> None:
        path = checkpoint.latest_complete(self.ckpt_root)
        if path is None:
            return
        client, rank_state = checkpoint.load(self.engine, path)
        self.step = client["step"]
        self.nonfinite_skipped = client.get("nonfinite_skipped", 0)
        self.run_id = client.get("wandb_run_id")
        self.data.load_state_dict(rank_state["data"])
        log.info("resumed from %s at step %d", path, self.step)

    def _save(self) -> None:
        client = {
            "step": self.step,
            "wandb_run_id": self.run_id,
            "nonfinite_skipped": self.nonfinite_skipped,
        }
        probe = checkpoint.probe_logits(self.engine, self.cfg.model.vocab_size, self.plan.seq_len)
        checkpoint.save(
            self.engine,
            self.ckpt_root,
            self.step,
            client,
            {"data": self.data.state_dict()},
            self.cfg.trainer.keep_last,
            probe,
        )

    # ---- the loop ------------------------------------------------------------------------
    def fit(self, device: torch.device) -> int:
        cfg, t = self.cfg, self.cfg.trainer
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.place.is_main:
            # What export needs besides the weights: the model shape and the tokenizer.
            (self.run_dir / MODEL_CONFIG).write_text(json.dumps(dataclasses.asdict(cfg.model)))
            self.data.tokenizer.save(str(self.run_dir / "tokenizer"))
        self._build_engine(device)
        self._resume()
        tracker = None
        if self.place.is_main:
            tracker = Tracker(
                cfg.logger,
                cfg.run_name,
                self.run_dir,
                self._config_dict(),
                self.run_id,
                self.overrides,
            )
            self.run_id = tracker.run_id
        preempt = PreemptionFlag()
        monitor = ThroughputMonitor(
            cfg.model, self.plan.seq_len, self.plan.tokens_per_step, self.place.world_size, device
        )
        batches = self.data.train_batches()
        samples = TrainingSamples(
            t, cfg.model, self.data.tokenizer, self.run_dir, self.place.is_main
        )
        timer = StepTimer()
        log.info(
            "training %s for %d steps: %d tokens/step = %d micro x %d seq x %d accum x %d ranks",
            cfg.run_name,
            t.max_steps,
            self.plan.tokens_per_step,
            self.plan.micro_batch_size,
            self.plan.seq_len,
            self.plan.grad_accum,
            self.place.world_size,
        )
        while self.step < t.max_steps:
            loss = self._optimizer_step(batches, timer)
            self.step += 1
            step_s, wait_s = timer.finish()
            if self.step == 1:  # optimizer state exists from the first step on
                log.info(
                    "rank %d holds %.2f MB of parameters and optimizer state",
                    self.place.rank,
                    state_megabytes(self.engine),
                )
            metrics = {
                "train/loss": loss,
                "train/lr": self.scheduler.get_last_lr()[0],
                "train/grad_norm": self.grad_norm,
                "train/nonfinite_skipped": self.nonfinite_skipped,
                "train/tokens_seen": self.step * self.plan.tokens_per_step,
                "data/corrupt_shards": self.data.corrupt_shards,
                **monitor.metrics(step_s, wait_s),
            }
            if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.max_steps):
                metrics |= self.validate()
                timer.restart()
            if samples.due(self.step):
                sample_metrics, media = samples(self.engine.module, self.step)
                metrics |= sample_metrics
                if tracker is not None and media:
                    tracker.log(media, self.step)
                timer.restart()
            if self.place.is_main:
                self._report(metrics, monitor, tracker)
            if distributed.any_rank(preempt.raised):
                self._save()
                log.warning(
                    "checkpointed step %d after a preemption signal; exiting with %d "
                    "so the job is requeued",
                    self.step,
                    t.preempt_exit_code,
                )
                return t.preempt_exit_code
            if self.step % t.save_every == 0 or self.step == t.max_steps:
                self._save()
                timer.restart()
        if tracker is not None:
            tracker.finish()
        return 0

    def _optimizer_step(self, batches, timer: StepTimer) -> float:
        """One optimizer step over grad_accum micro batches; returns the mean loss over ranks.

        A micro batch whose loss is not finite on any rank is skipped on all of them (ZeRO's
        collectives need every rank to take the same path) and counted; too many in a row stop
        the run, since a model that only produces NaN will not recover.
        """
        losses = []
        in_row = 0
        while len(losses) < self.plan.grad_accum:
            with timer.waiting():
                batch = next(batches)
            loss = self._loss(batch)
            if distributed.any_rank(not torch.isfinite(loss).item()):
                self.nonfinite_skipped += 1
                in_row += 1
                log.warning(
                    "non-finite loss at step %d: micro batch skipped (%d in a row)",
                    self.step + 1,
                    in_row,
                )
                if in_row >= self.cfg.trainer.max_nonfinite_in_row:
                    raise NonFiniteLoss(
                        f"{in_row} micro batches in a row gave a non-finite loss at step "
                        f"{self.step + 1}; lower optim.lr, raise optim.warmup_steps, or use "
                        "deepspeed.precision=fp32/bf16 instead of fp16"
                    )
                continue
            in_row = 0
            self.engine.backward(loss)
            if len(losses) == self.plan.grad_accum - 1:
                self.grad_norm = self._unsharded_grad_norm()
            self.engine.step()
            losses.append(loss.item())
        self.grad_norm = _as_float(self.engine.get_global_grad_norm()) or self.grad_norm
        return distributed.mean_over_ranks(sum(losses) / len(losses))

    def _unsharded_grad_norm(self) -> float | None:
        """Without ZeRO, DeepSpeed reports no grad norm; the gradients are whole (and already
        averaged over ranks after the last backward of a step), so measure them."""
        if self.cfg.deepspeed.zero_stage != 0:
            return None
        norms = [p.grad.norm() for p in self.engine.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else None

    @torch.no_grad()
    def validate(self) -> dict:
        """Mean loss over ``eval_batches`` val batches on every rank (each rank its own)."""
        self.engine.eval()
        losses = [
            self._loss(batch).item()
            for batch in self.data.val_batches(self.cfg.trainer.eval_batches)
        ]
        self.engine.train()
        if not losses:  # the same on every rank: the val split is dealt out in equal rounds
            log.warning("the val split is too small for one sequence per rank: no val loss")
            return {}
        loss = distributed.mean_over_ranks(sum(losses) / len(losses))
        return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0))}

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = (x.to(self.device, non_blocking=True) for x in batch)
        return self.engine(inputs, targets=targets).loss

    # ---- reporting ---------------------------------------------------------------------------
    def _report(self, metrics: dict, monitor: ThroughputMonitor, tracker: Tracker | None):
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **metrics}) + "\n")
        if tracker is not None:
            tracker.log(metrics, self.step)
        t = self.cfg.trainer
        if self.step % t.log_every and self.step != t.max_steps and "val/loss" not in metrics:
            return
        line = (
            f"step {self.step}/{t.max_steps} | loss {metrics['train/loss']:.4f} | "
            f"lr {metrics['train/lr']:.2e} | gnorm {_fmt(metrics['train/grad_norm'], '.3f')} | "
            f"{metrics['perf/tokens_per_s']:,.0f} tok/s | "
            f"mfu {_fmt(metrics['perf/mfu'], '.1%')} | "
            f"data {metrics['perf/data_wait_share']:.0%} | "
            f"mem {metrics['perf/peak_memory_gb']:.2f} GB | "
            f"eta {format_eta(monitor.eta_s(t.max_steps - self.step))}"
        )
        if "val/loss" in metrics:
            line += f" | val {metrics['val/loss']:.4f} (ppl {metrics['val/perplexity']:.2f})"
        log.info(line)

    def _config_dict(self) -> dict:
        return OmegaConf.to_container(
            OmegaConf.structured(self.cfg), resolve=True, enum_to_str=True
        )


def state_megabytes(engine) -> float:
    """This rank's parameters (its partitions under ZeRO-3) plus its optimizer state, in MB."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    tensors = [t for state in inner.state.values() for t in state.values() if torch.is_tensor(t)]
    tensors += [p for group in inner.param_groups for p in group["params"]]
    tensors += [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    unique = {t.data_ptr(): t for t in tensors}  # a tensor shared by two lists counts once
    return sum(t.numel() * t.element_size() for t in unique.values()) / 2**20


def parameter_share(module: torch.nn.Module) -> tuple[int, int]:
    """(elements this rank stores, elements in the model): ZeRO-3 keeps a partition of each."""
    local = total = 0
    for p in module.parameters():
        full = getattr(p, "ds_numel", p.numel())
        total += full
        local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else full
    return local, total


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _as_float(x) -> float | None:
    if x is None:
        return None
    return float(x.item() if torch.is_tensor(x) else x)


def run(cfg: TrainConfig, overrides: list[str]) -> int:
    place = distributed.placement_from_env()
    check(cfg)
    # Before any process group exists: every rank fails fast on the same input error.
    data = StreamingData(
        cfg.data, cfg.model.max_seq_len, cfg.trainer.micro_batch_size, place.rank, place.world_size
    )
    cfg.model.vocab_size = data.tokenizer.vocab_size
    cfg.model.validate()
    trainer = Trainer(cfg, place, data, overrides)
    device = distributed.init(place, cfg.deepspeed.timeout_s)
    return trainer.fit(device)


main = entry_point("train", TrainConfig, run)

if __name__ == "__main__":
    main()
