"""Memory per rank of a training, on paper: what DeepSpeed holds for a model, batch, ZeRO stage
and world size, whether it fits the devices, and what to change when it does not.

The same arithmetic sizes DeepSpeed's ZeRO buckets (``zero_buckets``) and checks a run before
launch (``check_fits``); ``python -m mtrain.plan`` prints it.
"""

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from data_pipeline.errors import ConfigError
from mtrain.distributed.collectives import on_gpu
from mtrain.distributed.heartbeats import last_memory_kill
from mtrain.distributed.host_memory import keep_freed_memory, memory_available, return_freed_memory
from mtrain.model import GPT, GPTConfig
from mtrain.training.config import DeepSpeedConfig, Precision, SaveMode, TrainConfig

log = logging.getLogger(__name__)

GiB = 2**30
# DeepSpeed's own bucket sizes (elements).
DEEPSPEED_BUCKET = 500_000_000
DEEPSPEED_PREFETCH = 50_000_000
DEEPSPEED_LIVE = 1_000_000_000
# A rank's memory outside the model's tensors: on CPU the process itself (Python, torch,
# DeepSpeed, gloo, the loader's buffers; 0.65 GiB measured with a 7M-parameter model), on a
# GPU the CUDA context and the caching allocator's reserve.
RUNTIME_BYTES = {"cpu": 0.65 * GiB, "cuda": 1.0 * GiB}
# What the allocators keep beyond the live tensors (fragmentation, freed blocks not yet
# returned): a share of the tensors.
SLACK = 0.10
# Copies of a gradient bucket alive at once under ZeRO-1/2/3: the bucket, and the interleaved
# flat copy that reduce_scatter_coalesced makes of it.
BUCKET_COPIES = 2
# Freed blocks kept in the process (host_memory.keep_freed_memory) let the heap grow past the
# live tensors, since a freed block serves a later one of another size only in part: they are
# kept only where the plan leaves this much room over its estimate. A quarter was too little:
# gpt_760m's kept heap outgrew its plan by more than 1.39x and was killed for memory (its
# peak with freed blocks returned is below the plan; bench/README.md has the peaks). Wide
# models gain least from keeping them (compute grows with width squared, page faults with it).
KEPT_HEAP_ROOM = 2.0


class NoInitialValues(TorchFunctionMode):
    """Skips in-place writes (the weights' initialisation), for a model whose values come
    later or never: meta tensors hold no values, and torch's first meta ``normal_`` costs
    seconds of setting up; a model about to be filled with given weights needs no random ones
    (nor draws from the random generators)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.startswith("_"):
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class ModelShape:
    """Element counts of a model, read from the model itself built on the meta device."""

    params: int
    largest: int  # the largest single tensor
    block: int  # one transformer block
    n_layer: int
    d_model: int
    n_head: int
    vocab_size: int

    @classmethod
    def of(cls, cfg: GPTConfig) -> "ModelShape":
        with torch.device("meta"), NoInitialValues():
            model = GPT(cfg)
        sizes = [p.numel() for p in model.parameters()]
        block = sum(p.numel() for p in model.blocks[0].parameters())
        return cls(
            sum(sizes), max(sizes), block, cfg.n_layer, cfg.d_model, cfg.n_head, cfg.vocab_size
        )


@dataclass(frozen=True)
class ZeroBuckets:
    """DeepSpeed's communication and gathering sizes (elements), from the model's shape."""

    reduce: int
    prefetch: int
    max_live: int
    sub_group: int

    def as_deepspeed(self, stage: int) -> dict:
        sizes = {"reduce_bucket_size": self.reduce, "allgather_bucket_size": self.reduce}
        if stage == 3:
            sizes |= {
                "sub_group_size": self.sub_group,
                "stage3_prefetch_bucket_size": self.prefetch,
                "stage3_max_live_parameters": self.max_live,
                "stage3_max_reuse_distance": self.max_live,
            }
        return sizes


# DeepSpeed's defaults, which hold up to 1e9 gathered parameters, 5e8-element gradient buckets
# and 1e9-element optimizer sub-groups: sized for GPUs with tens of GB.
DEEPSPEED_DEFAULTS = ZeroBuckets(
    DEEPSPEED_BUCKET, DEEPSPEED_PREFETCH, DEEPSPEED_LIVE, DEEPSPEED_LIVE
)


def zero_buckets(shape: ModelShape) -> ZeroBuckets:
    """Two blocks' worth of parameters live and per gradient bucket, one block prefetched: a
    block's collectives stay whole (throughput), memory follows the model instead of a GPU's
    defaults, and a model big enough for those defaults gets them unchanged."""
    two_blocks = max(shape.largest, 2 * shape.block)
    return ZeroBuckets(
        reduce=min(DEEPSPEED_BUCKET, two_blocks),
        prefetch=min(DEEPSPEED_PREFETCH, max(shape.largest, shape.block)),
        max_live=min(DEEPSPEED_LIVE, two_blocks),
        sub_group=min(DEEPSPEED_LIVE, two_blocks),
    )


@dataclass(frozen=True)
class Layout:
    """What a training asks of each rank's device."""

    model: GPTConfig  # with its vocabulary size
    deepspeed: DeepSpeedConfig
    micro_batch_size: int
    world_size: int
    device: str = "cpu"  # "cpu" or "cuda"
    activation_checkpointing: bool = False
    staged_checkpoint: bool = False  # a copy of the rank's checkpoint held while it is written


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank, by part."""

    parts: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def table(self) -> str:
        rows = [f"  {name:<34} {size / GiB:7.2f} GiB" for name, size in self.parts.items()]
        return "\n".join([*rows, f"  {'total':<34} {self.total / GiB:7.2f} GiB"])


def estimate(layout: Layout, buckets: ZeroBuckets | None = None) -> MemoryEstimate:
    """Peak memory per rank: partitioned model states, gathered parameters, communication
    buckets, activations, the runtime, and the allocators' slack. ``buckets``: ZeRO's sizes,
    ``zero_buckets`` of the model (what mtrain configures) when not given."""
    shape, ds, world = ModelShape.of(layout.model), layout.deepspeed, layout.world_size
    n, stage = shape.params, ds.zero_stage
    p = 4 if ds.precision == Precision.fp32 else 2
    buckets = buckets or zero_buckets(shape)
    # Each stage partitions one more of: optimizer state, gradients, parameters. DeepSpeed's
    # ZeRO optimizers keep an fp32 master copy of the weights (even when training in fp32) and
    # the gradient in fp32 during the step; without ZeRO, fp32 needs neither.
    share = {name: (1 / world if stage >= level else 1) for name, level in
             (("optimizer", 1), ("gradients", 2), ("parameters", 3))}  # fmt: skip
    # ZeRO-3 flattens one sub-group of gradients to fp32 at a time for the step; the others
    # flatten the whole partition.
    master = 0 if stage == 0 and p == 4 else 4 if stage == 3 else 8
    step_grad = 4 * min(n * share["optimizer"], buckets.sub_group) if stage == 3 else 0
    # ZeRO-3 accumulates its gradient partitions in fp32 (ZeRO-2's fp32 partition is the
    # step's fp32 gradient, counted with the master weights).
    grad = 4 if stage == 3 and ds.accumulates_in_fp32 else p
    # A gradient bucket is sent in fp32 (an fp32 copy of a half-precision one); overlapped,
    # a second bucket fills while the first is reduced.
    bucket = p * (BUCKET_COPIES + ds.overlaps_reduction(layout.device == "cuda"))
    bucket += 4 if ds.half_precision else 0
    parts = {
        "parameters": p * n * share["parameters"],
        "gradients": grad * n * share["gradients"],
        "Adam moments (fp32)": 8 * n * share["optimizer"],
        "fp32 master weights + gradients": master * n * share["optimizer"] + step_grad,
        "gathered parameters (ZeRO-3)": (
            p * min(n, buckets.max_live + buckets.prefetch) if stage == 3 else 0
        ),
        "communication buckets": bucket * min(n, buckets.reduce) if world > 1 else 0,
        "activations": activation_bytes(shape, layout, p),
    }
    if ds.offload_optimizer and layout.device != "cpu":
        parts["Adam moments (fp32)"] = parts["fp32 master weights + gradients"] = 0
    if ds.offload_params and layout.device != "cpu":
        parts["parameters"] = 0
    parts["allocator slack"] = SLACK * sum(parts.values())
    if layout.staged_checkpoint:
        parts["checkpoint staging (background save)"] = staging_bytes(shape, stage, p, share)
    parts["runtime"] = RUNTIME_BYTES[layout.device]
    return MemoryEstimate(parts)


def staging_bytes(shape: ModelShape, stage: int, p: int, share: dict[str, float]) -> float:
    """A staged copy of what a rank's checkpoint holds, the largest rank's (rank 0's): the
    model file (the whole weights below ZeRO-3; DeepSpeed's own copy of them is cloned
    already, so counted once), the optimizer's partition (Adam moments, and fp32 master
    weights where ZeRO or half precision keeps them) and the probe's fp32 weights: all of
    them below ZeRO-3; under it the writer gathers them a weight at a time for a probe that
    holds the embedding and one block at once (checkpointer.PartitionedWeights)."""
    n = shape.params
    model = p * n if stage < 3 else 0
    optimizer = (8 if stage == 0 and p == 4 else 12) * n * share["optimizer"]
    probe = 4 * n if stage < 3 else 4 * (shape.largest + shape.block)
    return model + optimizer + probe


def attention_kernel(device: str, precision: Precision) -> str:
    """The kernel ``scaled_dot_product_attention`` takes for a training step (causal, no mask):
    on CUDA, flash attention in bf16/fp16 and the memory-efficient kernel in fp32, which keep
    each head's softmax statistics and never the T x T scores; on the CPU the plan assumes the
    math kernel, which keeps the scores and probabilities for the backward pass."""
    if device == "cuda":
        return "flash" if precision != Precision.fp32 else "memory-efficient"
    return "math"


def activation_bytes(shape: ModelShape, layout: Layout, p: int) -> float:
    """A micro batch's saved activations: per block ~17 d values per token (norms, q/k/v, the
    attention output, MLP), plus the attention kernel's own: 2 h T values per token (scores
    and probabilities) for the math kernel, h fp32 softmax statistics for flash and
    memory-efficient ones; with checkpointing only each block's input is kept, plus one block
    being recomputed. The logits and their fp32 softmax and gradient come on top."""
    tokens, seq = layout.micro_batch_size * layout.model.max_seq_len, layout.model.max_seq_len
    if attention_kernel(layout.device, layout.deepspeed.precision) == "math":
        attention = 2 * shape.n_head * seq * p
    else:
        attention = 4 * shape.n_head
    per_block = tokens * (17 * shape.d_model * p + attention)
    if layout.activation_checkpointing:
        blocks = shape.n_layer * tokens * shape.d_model * p + 2 * per_block
    else:
        blocks = shape.n_layer * per_block
    return blocks + tokens * shape.vocab_size * (p + 8)


# ---- fitting a layout to the devices ------------------------------------------------------


def device_memory(device: str, ranks_per_node: int) -> tuple[float, str]:
    """(bytes one rank may use, where that figure comes from): a GPU's memory, or on CPU the
    memory available now (the cgroup's limit where lower) shared by the node's ranks."""
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        return total, f"GPU memory ({torch.cuda.get_device_name(0)})"
    return (
        memory_available() / ranks_per_node,
        f"available memory / {ranks_per_node} ranks on this node",
    )


def ranks_per_node() -> int:
    env = os.environ
    return int(env.get("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", "1")).split("(")[0])


@dataclass(frozen=True)
class Verdict:
    layout: Layout
    estimate: MemoryEstimate
    device_bytes: float
    where: str

    @property
    def fits(self) -> bool:
        return self.estimate.total <= self.device_bytes

    def line(self) -> str:
        ds, m = self.layout.deepspeed, self.layout.model
        return (
            f"{self.estimate.total / GiB:.1f} GiB per rank estimated for a "
            f"{ModelShape.of(m).params / 1e6:.0f}M-parameter model, ZeRO-{ds.zero_stage}, "
            f"{ds.precision.value}, micro batch {self.layout.micro_batch_size} x "
            f"{m.max_seq_len} tokens, {self.layout.world_size} ranks, "
            f"{attention_kernel(self.layout.device, ds.precision)} attention; each rank has "
            f"{self.device_bytes / GiB:.1f} GiB ({self.where})"
        )


def judge(layout: Layout, device_bytes: float, where: str) -> Verdict:
    return Verdict(layout, estimate(layout), device_bytes, where)


def fastest_fitting_stage(layout: Layout, device_bytes: float) -> int | None:
    """The lowest ZeRO stage (the least communication) whose estimate fits, or None."""
    for stage in range(4):
        ds = replace(layout.deepspeed, zero_stage=stage, offload_params=False)
        if estimate(replace(layout, deepspeed=ds)).total <= device_bytes:
            return stage
    return None


def remedies(layout: Layout, device_bytes: float) -> list[str]:
    """Overrides that each alone make ``layout`` fit, cheapest for throughput first, each with
    its estimate."""
    ds = layout.deepspeed
    changes = [(f"deepspeed.zero_stage={s}", {"deepspeed": replace(ds, zero_stage=s)})
               for s in range(ds.zero_stage + 1, 4)]  # fmt: skip
    if not layout.activation_checkpointing:
        changes.append(
            ("trainer.activation_checkpointing=true", {"activation_checkpointing": True})
        )
    for micro in sorted({layout.micro_batch_size // 2, 1}, reverse=True):
        if 1 <= micro < layout.micro_batch_size:
            changes.append((f"trainer.micro_batch_size={micro}", {"micro_batch_size": micro}))
    if ds.precision == Precision.fp32:
        bf16 = replace(ds, precision=Precision.bf16)
        changes.append(("deepspeed.precision=bf16", {"deepspeed": bf16}))
    if layout.device != "cpu" and not ds.offload_optimizer:
        offload = replace(ds, offload_optimizer=True)
        changes.append(("deepspeed.offload_optimizer=true", {"deepspeed": offload}))
    found = [
        f"{override} ({total / GiB:.1f} GiB)"
        for override, change in changes
        if (total := estimate(replace(layout, **change)).total) <= device_bytes
    ]
    if ds.zero_stage >= 1:  # the fewest ranks that fit (a partition shrinks with more)
        for factor in (2, 4, 8, 16):
            world = factor * layout.world_size
            total = estimate(replace(layout, world_size=world)).total
            if total <= device_bytes:
                found.append(f"{world} ranks ({total / GiB:.1f} GiB)")
                break
    return found


def advice(verdict: Verdict) -> str:
    """What to change: the fastest stage that fits, or the overrides that would make it fit."""
    layout, budget = verdict.layout, verdict.device_bytes
    stage = fastest_fitting_stage(layout, budget)
    lines = []
    if stage is not None and stage < layout.deepspeed.zero_stage:
        lines.append(f"fastest ZeRO stage that fits: deepspeed.zero_stage={stage}")
    elif stage is None or not verdict.fits:
        fixes = remedies(layout, budget)
        lines.append(
            "does not fit; any one of: " + ", ".join(fixes)
            if fixes
            else "does not fit with any single change: combine them (more ranks, bf16, "
            "activation checkpointing, a smaller micro batch) or take a smaller model"
        )
    return "; ".join(lines)


def check_fits(layout: Layout) -> Verdict:
    """Before a training launches: refuses (one line, the fixes) a layout whose estimate
    exceeds each rank's device memory."""
    verdict = judge(layout, *device_memory(layout.device, ranks_per_node()))
    if not verdict.fits:
        raise ConfigError(
            f"out of memory ahead: {verdict.line()}; {advice(verdict)} "
            "(deepspeed.check_memory=false to try anyway)"
        )
    return verdict


def training_layout(cfg: TrainConfig, world_size: int) -> Layout:
    """The layout of a training on this machine (the device the process group will take)."""
    device = "cuda" if on_gpu() else "cpu"
    t = cfg.trainer
    return Layout(
        cfg.model,
        cfg.deepspeed,
        t.micro_batch_size,
        world_size,
        device,
        t.activation_checkpointing,
        staged_checkpoint=t.save_in_background == SaveMode.staged,
    )


def plan_training(cfg: TrainConfig, world_size: int) -> Verdict:
    """Before a training launches: the plan of its layout on this machine, with
    ``trainer.save_in_background=auto`` settled (staged where the plan has room for the copy,
    else live; logged with the reason); refuses a layout that does not fit unless
    ``deepspeed.check_memory=false``."""
    t = cfg.trainer
    budget, where = device_memory("cuda" if on_gpu() else "cpu", ranks_per_node())
    take_advice_after_memory_kill(cfg, world_size)
    if t.save_in_background == SaveMode.auto:
        t.save_in_background = SaveMode.staged
        staged = judge(training_layout(cfg, world_size), budget, where)
        copy = staged.estimate.parts["checkpoint staging (background save)"]
        if not staged.fits:
            t.save_in_background = SaveMode.live
        log.info(
            "checkpoints: %s (a staged copy takes %.2f GiB; with it %.2f GiB of %.2f GiB per rank)",
            "staged and written in the background"
            if staged.fits
            else "written live in the background until the next optimizer update, no room "
            "for a staged copy",
            copy / GiB,
            staged.estimate.total / GiB,
            budget / GiB,
        )
    verdict = judge(training_layout(cfg, world_size), budget, where)
    if cfg.deepspeed.check_memory:
        check_fits(verdict.layout)
    return verdict


def take_advice_after_memory_kill(cfg: TrainConfig, world_size: int) -> None:
    """A run whose earlier attempt lost a rank to the kernel's OOM killer resumes with the
    plan's advice among the changes that leave every weight as it would have been
    (activation checkpointing: recomputed, the same values), when it lowers the estimate;
    logged with the kill. Other advice changes the run and is left to its user."""
    kill = last_memory_kill(Path(cfg.run_dir))
    if kill is None or cfg.trainer.activation_checkpointing:
        return
    before = estimate(training_layout(cfg, world_size)).total
    cfg.trainer.activation_checkpointing = True
    after = estimate(training_layout(cfg, world_size)).total
    if after >= before:
        cfg.trainer.activation_checkpointing = False
        return
    limit = kill.get("limit")
    log.warning(
        "an earlier attempt of this run lost rank %s to the kernel's OOM killer at step %s%s: "
        "resuming with trainer.activation_checkpointing=true, the memory plan's advice "
        "(%.2f -> %.2f GiB per rank estimated)",
        kill.get("rank"),
        kill.get("step"),
        f" (its cgroup's limit {limit / GiB:.2f} GiB)" if limit else "",
        before / GiB,
        after / GiB,
    )


def host_memory_policy(verdict: Verdict) -> bool:
    """A CPU run's freed host memory: kept for the next step (no page faults) where the plan
    leaves ``KEPT_HEAP_ROOM`` over its estimate, returned to the kernel where it is tight (a
    kept heap could outgrow the memory). Logged with the reason; True when kept."""
    total, budget = verdict.estimate.total, verdict.device_bytes
    figures = (
        f"the plan's {total / GiB:.2f} GiB per rank of {budget / GiB:.2f} GiB ({verdict.where})"
    )
    if total * KEPT_HEAP_ROOM <= budget:
        if keep_freed_memory():
            log.info("host memory: freed blocks stay in the process for the next step: %s "
                     "leaves room for them", figures)  # fmt: skip
            return True
        return False
    if return_freed_memory():
        log.info("host memory: freed blocks go back to the kernel (mmap from %d KiB, trimmed): "
                 "%s is tight for a kept heap (x%.2f)", 64, figures, KEPT_HEAP_ROOM)  # fmt: skip
    return False
