"""Typed configs of the trainer, registered with Hydra's ConfigStore.

``conf/train.yaml`` merges onto ``TrainConfig``: a misspelt key or a wrong type fails in Hydra
before any process group starts, each dataclass rejects impossible values in ``__post_init__``
naming ``section.key``, and ``batch_sizes`` rejects impossible batch arithmetic with a fix.
"""

import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from data_pipeline.errors import ConfigError, require
from data_pipeline.retries import configured_budget_s
from data_pipeline.storage import is_remote
from mtrain.data.loader import DataConfig
from mtrain.model import GPTConfig
from mtrain.runs.tracking import LoggerConfig
from mtrain.training.adapters import FinetuneConfig, check_finetune
from mtrain.training.contrastive import CONTRASTIVE, LM, OBJECTIVES, ContrastiveConfig

AT_LEAST_1 = "must be at least 1"
DEFAULT_MAX_STEPS = 1000
DEFAULT_WARMUP_STEPS = 100
# What a collective's timeout allows beyond the storage retry budget: the step of the rank that
# retried, once its read came through.
STEP_ROOM_S = 120
# Keys of the model's shape that became the trainer's run-time knobs: a config or override
# still setting one is refused, naming where it is now.
MOVED_KEYS = {
    "model.activation_checkpointing": "trainer.activation_checkpointing",
    "model.compile": "trainer.compile",
}


class Schedule(Enum):
    cosine = "cosine"  # linear warmup, cosine decay to min_lr_ratio * lr
    wsd = "wsd"  # warmup, stable, then a linear decay over the last decay_fraction of steps


class Precision(Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class SaveMode(Enum):
    """How a checkpoint is written (``trainer.save_in_background``). staged: the state copied
    to host memory, then written by a thread over as many steps as it takes; live: the state
    itself written by a thread until the next optimizer update, which waits for it (no copy);
    auto: staged where the memory plan has room for the copy, else live; off: every rank
    waits for the last byte."""

    auto = "auto"
    staged = "staged"
    live = "live"
    off = "off"


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    schedule: Schedule = Schedule.cosine
    # Steps of linear warmup: DEFAULT_WARMUP_STEPS unless given, or warmup_fraction instead.
    warmup_steps: int | None = None
    # Warmup as a share of the run's steps, for runs whose length a compute budget sets
    # (trainer.flops_budget): warmup_steps = ceil(warmup_fraction * trainer.max_steps).
    warmup_fraction: float | None = None
    decay_fraction: float = 0.2

    def __post_init__(self):
        if self.warmup_steps is not None and self.warmup_fraction is not None:
            raise ConfigError(
                f"optim.warmup_steps={self.warmup_steps} and optim.warmup_fraction="
                f"{self.warmup_fraction} both set the warmup: drop one"
            )
        fraction = self.warmup_fraction
        require(
            self,
            "optim",
            [
                (
                    self.warmup_steps is None or self.warmup_steps >= 0,
                    "warmup_steps",
                    "must be at least 0",
                ),
                (fraction is None or 0 <= fraction < 1, "warmup_fraction", "must be in [0, 1)"),
                (0 < self.decay_fraction <= 1, "decay_fraction", "must be in (0, 1]"),
            ],
        )

    def warmup_for(self, max_steps: int) -> int:
        """Steps of warmup in a run of ``max_steps``."""
        if self.warmup_fraction is not None:
            return math.ceil(self.warmup_fraction * max_steps)
        return DEFAULT_WARMUP_STEPS if self.warmup_steps is None else self.warmup_steps


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 3
    precision: Precision = Precision.bf16
    offload_optimizer: bool = False
    offload_params: bool = False
    # Params smaller than this stay gathered on every rank under ZeRO-3 (DeepSpeed's default is
    # 1e5; a tiny model needs 0 to be partitioned at all).
    param_persistence_threshold: int = 100_000
    # Build the model already partitioned (deepspeed.zero.Init): needed once a model does not
    # fit on one device; slower start-up for small ones.
    zero_init: bool = False
    # Seconds before a collective gives up; then the surviving ranks name the rank that stopped
    # answering (mtrain.distributed.heartbeats). A hung rank otherwise blocks the others (and
    # their GPUs) for torch's 30 minutes. Minutes, not seconds: a checkpoint save of a large
    # model, or a slow first step, happens between collectives and must not trip it; and with
    # data in object storage it must outlast data.storage_retry_s and a step (TrainConfig).
    timeout_s: int = 900
    # Refuse to launch when the memory estimate (mtrain.training.memory_plan) exceeds a rank's
    # device memory.
    check_memory: bool = True

    def __post_init__(self):
        require(
            self,
            "deepspeed",
            [
                (self.zero_stage in (0, 1, 2, 3), "zero_stage", "must be 0, 1, 2 or 3"),
                (
                    not self.offload_params or self.zero_stage == 3,
                    "offload_params",
                    "needs deepspeed.zero_stage=3",
                ),
                (self.timeout_s >= 1, "timeout_s", "must be at least 1 (seconds)"),
            ],
        )

    @property
    def half_precision(self) -> bool:
        return self.precision != Precision.fp32

    @property
    def accumulates_in_fp32(self) -> bool:
        """Whether the micro batches' gradients add up in fp32 (``grad_accum_dtype``; the
        reasons are at ``deepspeed_config.gradient_precision``): where ZeRO partitions them
        (ZeRO-2/3), or the model is fp32 anyway."""
        return not self.half_precision or self.zero_stage >= 2

    def overlaps_reduction(self, on_gpu: bool) -> bool:
        """Whether ZeRO-1/2 reduce the gradients on a side stream while the backward pass goes
        on (``overlap_comm``, with a second bucket to fill meanwhile): on GPUs. DeepSpeed turns
        it on for ZeRO-3 itself; a CPU has no side stream, the reduction would block as before
        through twice the bucket memory, so CPU runs keep DeepSpeed's default (off)."""
        return on_gpu and self.zero_stage in (1, 2)

    @property
    def clips_in_trainer(self) -> bool:
        """Whether the trainer clips the gradients instead of DeepSpeed: without ZeRO or a
        mixed-precision optimizer DeepSpeed computes the norm to clip and then drops it, and
        has no check of it; the trainer's one norm serves clipping, reporting and the check."""
        return self.zero_stage == 0 and self.precision == Precision.fp32


@dataclass
class TrainerConfig:
    # Optimizer steps: DEFAULT_MAX_STEPS unless given or set by a compute budget.
    max_steps: int | None = None
    # Training FLOPs (flops.flops_per_token times the tokens trained) that fix the number of
    # steps instead of max_steps: mtrain.training.compute_budget derives them once the
    # vocabulary is known. For compute-matched runs, as a scaling-law grid needs.
    flops_budget: float | None = None
    # Tokens per optimizer step over all ranks; the gradient accumulation is derived from it.
    global_batch_tokens: int = 524_288
    micro_batch_size: int = 8
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 500
    keep_last: int = 2
    max_nonfinite_in_row: int = 5
    seed: int = 1234
    # Exit code after a checkpoint taken on SIGUSR1/SIGUSR2/SIGTERM: the sbatch script requeues
    # on it.
    preempt_exit_code: int = 75
    # Every sample_every steps (0: never) rank 0 draws sample_count pieces of sample_tokens
    # tokens and logs their musical metrics, MIDI, piano rolls and audio.
    sample_every: int = 0
    sample_count: int = 2
    sample_tokens: int = 256
    # Seconds without a heartbeat after which another job's lock on the run directory is
    # taken over (its holder is presumed dead; the heartbeat is refreshed every tenth of it).
    lock_stale_s: float = 300.0
    # How the model is computed, not what it is (no weight changes, so a restart may switch
    # them): recompute each block's activations in the backward pass (less memory, about a
    # third more compute), and torch.compile the model inside the DeepSpeed engine
    # (engine.compile(), in place: no "_orig_mod." in checkpoints; the first step waits for
    # the compiler, minutes on a CPU).
    activation_checkpointing: bool = False
    compile: bool = False
    # Stop once this many validations in a row did not lower the val loss, keeping the best
    # checkpoint (saved when it was reached); 0: never stop early. Needs trainer.eval_every.
    early_stop_patience: int = 0
    # Checkpoints written by a thread while training goes on, each file made durable before
    # the COMPLETE marker (SaveMode: auto, staged, live, off).
    save_in_background: SaveMode = SaveMode.auto

    def __post_init__(self):
        if self.flops_budget is not None and self.max_steps is not None:
            raise ConfigError(
                f"trainer.max_steps={self.max_steps} conflicts with trainer.flops_budget="
                f"{self.flops_budget:g}, which derives the steps: drop one"
            )
        require(
            self,
            "trainer",
            [
                (self.max_steps is None or self.max_steps >= 1, "max_steps", AT_LEAST_1),
                (
                    self.flops_budget is None or self.flops_budget > 0,
                    "flops_budget",
                    "must be above 0 (FLOPs)",
                ),
                (self.keep_last >= 1, "keep_last", AT_LEAST_1),
                (self.save_every >= 1, "save_every", AT_LEAST_1),
                (self.log_every >= 1, "log_every", AT_LEAST_1),
                (self.eval_every >= 0, "eval_every", "must be at least 0 (0: never)"),
                (self.sample_every >= 0, "sample_every", "must be at least 0 (0: never)"),
                (self.max_nonfinite_in_row >= 1, "max_nonfinite_in_row", AT_LEAST_1),
                (self.lock_stale_s > 0, "lock_stale_s", "must be above 0"),
                (self.early_stop_patience >= 0, "early_stop_patience", "must be at least 0"),
                (
                    self.early_stop_patience == 0 or self.eval_every > 0,
                    "early_stop_patience",
                    "needs validations: set trainer.eval_every",
                ),
            ],
        )


@dataclass
class TrainConfig:
    # Checkpoints, metrics, samples and the wandb run; stable across requeues of one Slurm job.
    run_dir: str = "runs/${oc.env:SLURM_JOB_NAME,mtrain}-${oc.env:SLURM_JOB_ID,local}"
    # The run's name in logs and wandb; the run directory's name when not given.
    run_name: str | None = None
    # An exported model (python -m mtrain.export) whose weights start this run: fine-tuning.
    init_from: str | None = None
    # What the run trains: "lm" (the next token) or "contrastive" (piece embeddings, from an
    # exported language model: init_from=; mtrain.training.contrastive).
    objective: str = LM
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self):
        """What spans two sections."""
        self.run_name = self.run_name or Path(self.run_dir).name
        check_finetune(self.finetune, self.init_from)
        # Not in TrainerConfig's own check: OmegaConf builds the schema's defaults from an
        # instance, whose max_steps would then look given.
        if self.trainer.max_steps is None and self.trainer.flops_budget is None:
            self.trainer.max_steps = DEFAULT_MAX_STEPS
        if self.trainer.max_steps is not None:  # else once a budget has set them
            self.check_schedule()
        self._check_timeouts()
        self._check_objective()

    def _check_objective(self) -> None:
        contrastive = self.objective == CONTRASTIVE
        require(
            self,
            "",
            [
                (self.objective in OBJECTIVES, "objective", f"must be one of {OBJECTIVES}"),
                (
                    not contrastive or self.init_from,
                    "init_from",
                    "objective=contrastive starts from a language model: set init_from=<export>",
                ),
            ],
        )
        require(
            self.trainer,
            "trainer",
            [
                (
                    not contrastive or self.trainer.micro_batch_size >= 2,
                    "micro_batch_size",
                    "must be at least 2 with objective=contrastive (the other pieces of the "
                    "batch are each view's negatives)",
                ),
            ],
        )

    def check_schedule(self) -> None:
        """The warmup fits in the run (checked again once a budget has set its length)."""
        max_steps = self.trainer.max_steps
        if self.optim.warmup_for(max_steps) > max_steps:
            raise ConfigError(
                f"optim.warmup_steps={self.optim.warmup_for(max_steps)} must be in [0, "
                f"trainer.max_steps={max_steps}]"
            )

    def _check_timeouts(self) -> None:
        """A rank retrying stalled object storage keeps the others waiting in a collective: the
        collective timeout must outlast the retry budget and a step, or the others give up (and
        NCCL's watchdog ends the job) just before the retrying rank would have come through."""
        if not is_remote(self.data.path):
            return
        budget = configured_budget_s(self.data.storage_retry_s)
        need = int(budget) + STEP_ROOM_S + 1
        require(
            self.deepspeed,
            "deepspeed",
            [
                (
                    self.deepspeed.timeout_s >= need,
                    "timeout_s",
                    f"must exceed the storage retry budget (data.storage_retry_s / "
                    f"$MTRAIN_STORAGE_RETRY_S: {budget:g} s) plus {STEP_ROOM_S} s for a step: "
                    f"set deepspeed.timeout_s={need} or more, or lower data.storage_retry_s",
                )
            ],
        )


@dataclass(frozen=True)
class BatchSizes:
    micro_batch_size: int
    seq_len: int
    grad_accum: int
    world_size: int

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch_size * self.seq_len * self.grad_accum * self.world_size


def batch_sizes(cfg: TrainConfig, world_size: int) -> BatchSizes:
    t, micro, seq_len = cfg.trainer, cfg.trainer.micro_batch_size, cfg.model.max_seq_len
    per_micro = micro * seq_len * world_size
    shape = (
        f"trainer.micro_batch_size={micro} x model.max_seq_len={seq_len} x {world_size} ranks "
        f"= {per_micro}"
    )
    if micro < 1 or t.global_batch_tokens < per_micro:
        raise ConfigError(
            f"trainer.global_batch_tokens={t.global_batch_tokens} is smaller than one micro "
            f"batch on every rank: {shape}; set trainer.global_batch_tokens={per_micro} (or a "
            "multiple of it)"
        )
    if t.global_batch_tokens % per_micro:
        lower = t.global_batch_tokens // per_micro * per_micro
        raise ConfigError(
            f"trainer.global_batch_tokens={t.global_batch_tokens} is not a multiple of {shape}; "
            f"use {lower or per_micro} or {lower + per_micro}"
        )
    return BatchSizes(micro, seq_len, t.global_batch_tokens // per_micro, world_size)
