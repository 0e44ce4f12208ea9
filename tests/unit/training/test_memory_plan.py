"""The memory estimate (mtrain.training.memory_plan): its arithmetic, the advice, the fit check
before launch, and a rank killed for memory named as such."""

import json
import os
import time
from dataclasses import replace

import pytest

from data_pipeline.errors import ConfigError
from mtrain.distributed import heartbeats
from mtrain.model import GPTConfig
from mtrain.training.config import BatchSizes, DeepSpeedConfig, OptimConfig, Precision
from mtrain.training.deepspeed_config import deepspeed_config
from mtrain.training.memory_plan import (
    GiB,
    Layout,
    ModelShape,
    activation_bytes,
    advice,
    attention_kernel,
    estimate,
    fastest_fitting_stage,
    judge,
    zero_buckets,
)

# gpt_760m's shape, as conf/model/gpt_760m.yaml has it, at the length the issue trains.
GPT_760M = GPTConfig(vocab_size=521, n_layer=24, n_head=16, d_model=1536, max_seq_len=128)
FP32_ZERO3 = DeepSpeedConfig(zero_stage=3, precision=Precision.fp32)


def layout(**change) -> Layout:
    base = Layout(GPT_760M, FP32_ZERO3, 1, world_size=2, activation_checkpointing=True)
    return replace(base, **change)


def test_model_shape_counts_the_gpt_exactly():
    d, shape = 1536, ModelShape.of(GPT_760M)
    # Per block: q, k, v, out (4 d^2), the MLP (8 d^2), two LayerNorm weights; tied embedding.
    assert shape.block == 12 * d * d + 2 * d
    assert shape.params == 24 * shape.block + 521 * d + d  # + the final LayerNorm
    assert shape.largest == 4 * d * d


def test_zero3_states_are_partitioned_and_counted_per_byte():
    n = ModelShape.of(GPT_760M).params
    two, four = estimate(layout()).parts, estimate(layout(world_size=4)).parts
    assert two["parameters"] == two["gradients"] == 4 * n / 2
    assert two["Adam moments (fp32)"] == 8 * n / 2
    assert four["Adam moments (fp32)"] == two["Adam moments (fp32)"] / 2
    bf16 = estimate(layout(deepspeed=replace(FP32_ZERO3, precision=Precision.bf16))).parts
    assert bf16["parameters"] == 2 * n / 2 and bf16["Adam moments (fp32)"] == 8 * n / 2
    ddp = estimate(layout(deepspeed=replace(FP32_ZERO3, zero_stage=0))).parts
    # Without ZeRO an fp32 run needs no master copy; nothing is gathered or bucketed by ZeRO.
    assert ddp["parameters"] == 4 * n and ddp["fp32 master weights + gradients"] == 0
    assert ddp["gathered parameters (ZeRO-3)"] == 0


def test_half_precision_gradients_are_counted_in_the_fp32_they_are_summed_in():
    shape = ModelShape.of(GPT_760M)
    n, bucket = shape.params, zero_buckets(shape).reduce

    def parts(stage: int, precision: Precision, device: str = "cpu") -> dict:
        ds = DeepSpeedConfig(zero_stage=stage, precision=precision)
        return estimate(layout(deepspeed=ds, device=device)).parts

    # ZeRO-3 accumulates a bf16 model's gradient partitions in fp32.
    assert parts(3, Precision.bf16)["gradients"] == 4 * n / 2
    # A bucket: its copies in the model's precision, plus the fp32 copy sent over the ranks
    # for a half-precision one, plus the second bucket overlap_comm fills (ZeRO-1/2 on GPUs).
    assert parts(2, Precision.fp32)["communication buckets"] == 4 * 2 * bucket
    assert parts(2, Precision.bf16)["communication buckets"] == (2 * 2 + 4) * bucket
    assert parts(2, Precision.bf16, "cuda")["communication buckets"] == (2 * 3 + 4) * bucket
    assert parts(3, Precision.bf16, "cuda")["communication buckets"] == (2 * 2 + 4) * bucket


def test_each_zero_stage_needs_less_memory_per_rank():
    totals = [
        estimate(layout(deepspeed=replace(FP32_ZERO3, zero_stage=s), world_size=8)).total
        for s in range(4)
    ]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4


def test_buckets_follow_the_model_and_keep_deepspeeds_defaults_for_large_ones():
    shape = ModelShape.of(GPT_760M)
    small = zero_buckets(shape)
    assert small.reduce == small.max_live == 2 * shape.block and small.prefetch == shape.block
    huge = zero_buckets(ModelShape.of(replace(GPT_760M, n_layer=2, n_head=64, d_model=8192)))
    assert (huge.reduce, huge.prefetch, huge.max_live) == (500_000_000, 50_000_000, 1_000_000_000)
    ds = deepspeed_config(FP32_ZERO3, OptimConfig(), BatchSizes(1, 128, 1, 2), shape)
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == small.reduce
    assert zero["stage3_max_live_parameters"] == small.max_live


def test_advice_names_the_fastest_stage_or_the_changes_that_fit():
    roomy = 64 * GiB
    assert fastest_fitting_stage(layout(), roomy) == 0
    assert "deepspeed.zero_stage=0" in advice(judge(layout(), roomy, "test"))
    verdict = judge(layout(), 8 * GiB, "test")
    assert not verdict.fits
    line = advice(verdict)
    assert "deepspeed.precision=bf16" in line and "4 ranks" in line, line
    assert "8 ranks" not in line  # only the fewest ranks that fit


def test_training_is_refused_before_launch_when_it_cannot_fit(monkeypatch):
    from mtrain.training import memory_plan

    monkeypatch.setattr(memory_plan, "memory_available", lambda: 4 * GiB)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as refused:
        memory_plan.check_fits(layout())
    message = str(refused.value)
    assert "\n" not in message and "2.0 GiB (available memory / 2 ranks" in message, message
    assert "deepspeed.check_memory=false" in message


def test_a_rank_gone_with_memory_exhausted_is_named_killed_for_memory(tmp_path, monkeypatch):
    gone_pid = 2**22 + 12345  # above the default pid_max: no such process
    now = time.time()
    for rank, rss, available in ((0, 2 * GiB, 2 * GiB), (1, 7.9 * GiB, 0.1 * GiB)):
        path = heartbeats.heartbeat_path(tmp_path, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"rank": rank, "pid": os.getpid() if rank == 0 else gone_pid,
                  "host": os.uname().nodename, "step": 3, "time": now, "rss": rss,
                  "available": available}  # fmt: skip
        path.write_text(json.dumps(record))
    monkeypatch.setattr(heartbeats, "_oom_kills_at_start", None)
    named, lines = heartbeats.suspects(tmp_path, 2, me=0, now=now)
    assert named == [1]
    assert "killed for memory (its last RSS 7.90 GiB with 0.10 GiB left)" in lines[1], lines
    # The kernel's count rising is evidence enough, however much memory was left.
    record["available"] = 16 * GiB
    heartbeats.heartbeat_path(tmp_path, 1).write_text(json.dumps(record))
    monkeypatch.setattr(heartbeats, "_oom_kills_at_start", -1)
    monkeypatch.setattr(heartbeats, "oom_kills", lambda: 0)
    _, lines = heartbeats.suspects(tmp_path, 2, me=0, now=now)
    assert "OOM-kill count rose -1 -> 0" in lines[1], lines
    monkeypatch.setattr(heartbeats, "_oom_kills_at_start", 0)
    _, lines = heartbeats.suspects(tmp_path, 2, me=0, now=now)
    assert "killed for memory" not in lines[1]


# gpt_1b's shape (conf/model/gpt_1b.yaml) at its full context.
GPT_1B = GPTConfig(vocab_size=521, n_layer=24, n_head=32, d_model=2048, max_seq_len=2048)


def test_the_plan_follows_the_attention_kernel_the_run_takes():
    """Flash (bf16/fp16) and memory-efficient (fp32) kernels on CUDA never store the T x T
    scores; the CPU's math kernel stores scores and probabilities, 2 h T values per token and
    block. gpt_1b at micro batch 8 x 2048 on 8 GPUs of 80 GB fits only with the former."""
    assert attention_kernel("cuda", Precision.bf16) == "flash"
    assert attention_kernel("cuda", Precision.fp16) == "flash"
    assert attention_kernel("cuda", Precision.fp32) == "memory-efficient"
    assert attention_kernel("cpu", Precision.bf16) == "math"
    bf16 = DeepSpeedConfig(zero_stage=3, precision=Precision.bf16)
    on = {d: Layout(GPT_1B, bf16, 8, world_size=8, device=d) for d in ("cuda", "cpu")}
    shape, tokens, p = ModelShape.of(GPT_1B), 8 * 2048, 2
    scores = shape.n_layer * tokens * 2 * shape.n_head * 2048 * p
    statistics = shape.n_layer * tokens * 4 * shape.n_head
    gap = activation_bytes(shape, on["cpu"], p) - activation_bytes(shape, on["cuda"], p)
    assert gap == pytest.approx(scores - statistics)
    logits = tokens * shape.vocab_size * (p + 8)
    flash = activation_bytes(shape, on["cuda"], p)
    assert flash == pytest.approx(shape.n_layer * tokens * 17 * 2048 * p + statistics + logits)
    assert judge(on["cuda"], 80 * GiB, "80 GB").fits
    assert not judge(on["cpu"], 80 * GiB, "80 GB").fits
    assert "flash attention" in judge(on["cuda"], 80 * GiB, "80 GB").line()
    # Checkpointing keeps one block's kernel activations either way: the rule applies there too.
    checkpointed = replace(on["cuda"], activation_checkpointing=True)
    assert activation_bytes(shape, checkpointed, p) < activation_bytes(shape, on["cuda"], p)
