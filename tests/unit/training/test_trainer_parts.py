"""The trainer's parts one at a time, without DeepSpeed or a process group: the schedule, the
DeepSpeed config, batch arithmetic, config checks, the run directory, checkpoint pruning, the
non-finite bookkeeping of an optimizer step, the step timer and the preemption component."""

import itertools
import math
import os
import signal
from types import SimpleNamespace

import pytest
import torch
from support.scripted_engine import ScriptedEngine, micro_batches

from data_pipeline.app import config_dict
from data_pipeline.errors import ConfigError
from mtrain.data.loader import DataConfig
from mtrain.model import GPT, GPTConfig
from mtrain.runs.checkpoint_files import latest_complete
from mtrain.runs.run_dir import CheckpointDir, RunDir
from mtrain.runs.tracking import scrub
from mtrain.training.checkpointer import _prune
from mtrain.training.config import (
    DeepSpeedConfig,
    OptimConfig,
    Precision,
    Schedule,
    TrainConfig,
    TrainerConfig,
    batch_sizes,
)
from mtrain.training.deepspeed_config import deepspeed_config
from mtrain.training.memory_plan import ModelShape, zero_buckets
from mtrain.training.monitor import StepTimer
from mtrain.training.schedule import lr_multiplier
from mtrain.training.step_components import PREEMPTION_SIGNALS, Preempted, Preemption
from mtrain.training.trainer import NonFiniteLoss, OptimizerStep


# ---- learning-rate schedules -------------------------------------------------------------------
def test_cosine_warms_up_then_falls_to_the_floor():
    cfg = OptimConfig(schedule=Schedule.cosine, warmup_steps=10, min_lr_ratio=0.1)
    lr = [lr_multiplier(s, 110, cfg) for s in range(130)]
    assert lr[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr[10] == pytest.approx(1.0)
    assert lr[60] == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert lr[110] == pytest.approx(0.1)
    assert lr[129] == pytest.approx(0.1)  # past max_steps it stays at the floor
    assert all(a >= b for a, b in itertools.pairwise(lr[10:]))


def test_wsd_warms_up_holds_then_decays_linearly_over_the_last_fraction():
    cfg = OptimConfig(schedule=Schedule.wsd, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    lr = [lr_multiplier(s, 100, cfg) for s in range(101)]
    assert lr[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr[10:81] == [1.0] * 71  # the stable plateau up to the last 20 steps
    assert lr[85] == pytest.approx(1 - 0.9 * 5 / 20)
    assert lr[90] == pytest.approx(0.55)
    assert lr[100] == pytest.approx(0.1)
    decay = lr[80:]
    steps = [a - b for a, b in itertools.pairwise(decay)]
    assert steps == pytest.approx([0.9 / 20] * 20)  # linear


# ---- DeepSpeed config ----------------------------------------------------------------------------
MICRO, SEQ_LEN, RANKS = 8, 64, 4
GLOBAL_BATCH_TOKENS = MICRO * SEQ_LEN * RANKS * 3
# A model of four blocks, for the bucket sizes.
SHAPE = ModelShape.of(GPTConfig(vocab_size=97, n_layer=4, n_head=2, d_model=64, max_seq_len=64))


def sizes():
    trainer = TrainerConfig(micro_batch_size=MICRO, global_batch_tokens=GLOBAL_BATCH_TOKENS)
    return batch_sizes(TrainConfig(model=GPTConfig(max_seq_len=SEQ_LEN), trainer=trainer), RANKS)


# The optimizer, batch and model shape every DeepSpeed config below is generated with.
CONFIGS = (OptimConfig(), sizes(), SHAPE)


@pytest.mark.parametrize("precision", list(Precision))
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_takes_stage_batch_and_precision_from_the_typed_configs(stage, precision):
    ds = DeepSpeedConfig(zero_stage=stage, precision=precision, param_persistence_threshold=7)
    out = deepspeed_config(ds, OptimConfig(grad_clip=0.5), sizes())
    zero = out["zero_optimization"]
    assert zero["stage"] == stage
    # Micro batch x accumulation x ranks: the global batch (DeepSpeed checks the product).
    micro, accumulation = out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"]
    assert micro == MICRO and out["train_batch_size"] == micro * accumulation * RANKS
    assert out["train_batch_size"] * SEQ_LEN == GLOBAL_BATCH_TOKENS
    # A half-precision section is on exactly when the run is in that precision.
    assert out["bf16"]["enabled"] == (precision == Precision.bf16)
    assert out["fp16"]["enabled"] == (precision == Precision.fp16)
    # Gradients are clipped once: by the trainer where it clips, else by DeepSpeed.
    assert out["gradient_clipping"] == (0.0 if ds.clips_in_trainer else 0.5)
    # ZeRO-3's own settings under ZeRO-3 only; the export consolidates the fp32 weights itself.
    assert any(key.startswith("stage3_") for key in zero) == (stage == 3)
    if stage == 3:
        assert zero["stage3_param_persistence_threshold"] == 7
        assert not zero["stage3_gather_16bit_weights_on_model_save"]


@pytest.mark.parametrize("precision", list(Precision))
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_half_precision_gradients_are_summed_in_fp32_where_deepspeed_allows(stage, precision):
    out = deepspeed_config(DeepSpeedConfig(zero_stage=stage, precision=precision), *CONFIGS)
    if precision == Precision.fp32:  # nothing to widen: DeepSpeed's defaults are fp32 already
        assert "communication_data_type" not in out and "data_types" not in out
        return
    # Over ranks: fp32 at every stage (DeepSpeed's default would be the model's precision).
    assert out["communication_data_type"] == "fp32"
    # Over micro batches: fp32 where ZeRO partitions the gradients. Not under ZeRO-0, which
    # DeepSpeed refuses ("unsupported mix"), nor ZeRO-1, where bf16 would switch DeepSpeed to
    # its BF16_Optimizer, whose checkpoints zero_to_fp32 cannot merge ("is not a zero
    # checkpoint": the export fails).
    accumulation = out.get("data_types", {}).get("grad_accum_dtype")
    assert accumulation == ("fp32" if stage >= 2 else None)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_1_and_2_overlap_their_reduction_with_the_backward_pass_on_GPUs_only(stage):
    for on_gpu in (False, True):
        ds = DeepSpeedConfig(zero_stage=stage)
        zero = deepspeed_config(ds, *CONFIGS, on_gpu=on_gpu)["zero_optimization"]
        # ZeRO-3 overlaps by DeepSpeed's own default; ZeRO-0 has no ZeRO reduction; on a CPU
        # DeepSpeed's default (off) stays, as CPU runs have always trained.
        assert zero.get("overlap_comm") is (True if on_gpu and stage in (1, 2) else None)


def test_zero_buckets_are_sized_from_the_model_when_its_shape_is_given():
    for stage in range(4):
        sized = deepspeed_config(DeepSpeedConfig(zero_stage=stage), OptimConfig(), sizes(), SHAPE)
        unsized = deepspeed_config(DeepSpeedConfig(zero_stage=stage), OptimConfig(), sizes())
        zero = sized["zero_optimization"]
        assert not any("bucket" in key for key in unsized["zero_optimization"])  # DeepSpeed's
        if stage == 0:  # no ZeRO, no ZeRO buckets
            assert not any("bucket" in key for key in zero)
        else:
            assert zero["reduce_bucket_size"] == zero_buckets(SHAPE).reduce


def test_offloads_go_to_the_cpu_when_asked_only():
    for optimizer, params in itertools.product([False, True], repeat=2):
        ds = DeepSpeedConfig(zero_stage=3, offload_optimizer=optimizer, offload_params=params)
        zero = deepspeed_config(ds, OptimConfig(), sizes())["zero_optimization"]
        asked = {"offload_optimizer": optimizer, "offload_param": params}
        offloaded = {key: zero[key]["device"] for key in asked if key in zero}
        assert offloaded == {key: "cpu" for key, on in asked.items() if on}


def test_the_optimizer_is_torchs_fused_adamw_with_the_optim_settings():
    optim = OptimConfig(lr=1e-3, weight_decay=0.2, beta1=0.8, beta2=0.9, eps=1e-6)
    optimizer = deepspeed_config(DeepSpeedConfig(), optim, sizes())["optimizer"]
    params = optimizer["params"]
    assert optimizer["type"] == "AdamW" and params["adam_w_mode"]
    assert params["lr"] == optim.lr and params["betas"] == [optim.beta1, optim.beta2]
    assert params["eps"] == optim.eps and params["weight_decay"] == optim.weight_decay
    # torch's AdamW in one kernel, not DeepSpeed's JIT-built one: resumes reproduce bit for bit.
    assert params["torch_adam"] and params["fused"]


# ---- batch arithmetic ----------------------------------------------------------------------------
def batch_config(global_batch_tokens: int, micro_batch_size: int = 4) -> TrainConfig:
    return TrainConfig(
        model=GPTConfig(max_seq_len=128),
        trainer=TrainerConfig(
            global_batch_tokens=global_batch_tokens, micro_batch_size=micro_batch_size
        ),
    )


def test_batch_sizes_derive_the_gradient_accumulation():
    p = batch_sizes(batch_config(4 * 128 * 2 * 3), world_size=2)
    assert (p.micro_batch_size, p.seq_len, p.grad_accum, p.world_size) == (4, 128, 3, 2)
    assert p.tokens_per_step == 3072


def test_batch_sizes_refuse_a_batch_that_is_not_a_multiple():
    with pytest.raises(ConfigError, match=r"trainer\.global_batch_tokens=1000 is not a multiple"):
        batch_sizes(batch_config(1000, micro_batch_size=2), world_size=1)
    with pytest.raises(ConfigError, match="use 768 or 1024"):
        batch_sizes(batch_config(1000, micro_batch_size=2), world_size=1)


def test_batch_sizes_refuse_a_batch_smaller_than_one_micro_batch_per_rank():
    with pytest.raises(
        ConfigError,
        match=r"global_batch_tokens=512 is smaller than one micro batch.*"
        r"set trainer.global_batch_tokens=1024",
    ):
        batch_sizes(batch_config(512), world_size=2)


# ---- config checks -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: DeepSpeedConfig(zero_stage=5), "deepspeed.zero_stage=5 must be 0, 1, 2 or 3"),
        (
            lambda: DeepSpeedConfig(zero_stage=2, offload_params=True),
            "deepspeed.offload_params=True needs deepspeed.zero_stage=3",
        ),
        (lambda: TrainerConfig(max_steps=0), "trainer.max_steps=0 must be at least 1"),
        (lambda: TrainerConfig(keep_last=0), "trainer.keep_last=0 must be at least 1"),
        (lambda: OptimConfig(decay_fraction=0.0), "optim.decay_fraction=0.0 must be in (0, 1]"),
        (lambda: OptimConfig(warmup_steps=-1), "optim.warmup_steps=-1 must be at least 0"),
        (
            lambda: TrainConfig(
                optim=OptimConfig(warmup_steps=20), trainer=TrainerConfig(max_steps=10)
            ),
            "optim.warmup_steps=20 must be in [0, trainer.max_steps=10]",
        ),
        (
            lambda: GPTConfig(d_model=32, n_head=3),
            "model.d_model=32 is not divisible by model.n_head=3",
        ),
        (lambda: GPTConfig(positional="alibi"), "model.positional='alibi' is not one of"),
        (lambda: GPT(GPTConfig()), "model.vocab_size=0 must be set from the tokenizer"),
    ],
)
def test_a_config_names_the_bad_key_and_value(build, message):
    with pytest.raises(ValueError) as error:
        build()
    assert str(error.value).startswith(message)


def test_several_problems_are_listed_together():
    with pytest.raises(ConfigError) as error:
        TrainerConfig(max_steps=0, keep_last=0)
    assert str(error.value).splitlines() == [
        "invalid config:",
        "  trainer.max_steps=0 must be at least 1",
        "  trainer.keep_last=0 must be at least 1",
    ]


def test_with_vocab_sets_the_vocabulary_and_checks_again():
    shape = GPTConfig(n_layer=3)
    sized = shape.with_vocab(97)
    assert (sized.vocab_size, sized.n_layer, shape.vocab_size) == (97, 3, 0)
    with pytest.raises(ValueError, match=r"model\.vocab_size=-1"):
        shape.with_vocab(-1)


# ---- wandb config scrubbing ----------------------------------------------------------------------
def test_scrub_redacts_credentials_at_any_depth_but_keeps_token_counts():
    config = {
        "hf_token": "hf_abc",
        "max_tokens": 5,
        "apiKey": "k",
        "trainer": {"global_batch_tokens": 1024, "seed": 1, "tokens_per_s": 9.0},
        "tokenizer": {"kind": "remi", "tokenizer_from": "runs/base/export"},
        "data": {"path": "s3://b", "storage": {"aws_secret_access_key": "x", "api_key": "y"}},
        "logger": {"password": "p", "Credential_file": "c", "project": "mtrain"},
    }
    assert scrub(config) == {
        "hf_token": "<redacted>",
        "max_tokens": 5,
        "apiKey": "<redacted>",
        "trainer": {"global_batch_tokens": 1024, "seed": 1, "tokens_per_s": 9.0},
        "tokenizer": {"kind": "remi", "tokenizer_from": "runs/base/export"},
        "data": {
            "path": "s3://b",
            "storage": {"aws_secret_access_key": "<redacted>", "api_key": "<redacted>"},
        },
        "logger": {"password": "<redacted>", "Credential_file": "<redacted>", "project": "mtrain"},
    }
    assert config["data"]["storage"]["api_key"] == "y"  # a copy: the config itself is untouched


# ---- the run directory -------------------------------------------------------------------------
def test_run_dir_paths_keep_the_layout(tmp_path):
    run = RunDir(str(tmp_path))
    assert run.root == tmp_path
    assert run.model_config == tmp_path / "model_config.json"
    assert run.tokenizer == tmp_path / "tokenizer"
    assert run.metrics == tmp_path / "metrics.jsonl"
    assert run.wandb_run_id == tmp_path / "wandb_run_id"
    assert run.samples_at(60) == tmp_path / "samples" / "step_00000060"
    assert run.export == tmp_path / "export"
    ckpt = run.checkpoint(1000)
    assert ckpt.path == tmp_path / "checkpoints" / "step_00001000"
    assert ckpt.marker == ckpt.path / "COMPLETE"
    assert ckpt.probe == ckpt.path / "probe.pt"
    assert ckpt.trainer_state(1) == ckpt.path / "trainer_state_rank1.pt"
    assert ckpt.export == ckpt.path / "export"
    assert ckpt.run.root == tmp_path
    assert ckpt.named_as_step and not CheckpointDir(tmp_path).named_as_step


def test_checkpoint_dirs_are_the_step_directories_oldest_first(tmp_path):
    run = RunDir(tmp_path)
    for step in (20, 3, 100):
        run.checkpoint(step).path.mkdir(parents=True)
    (run.checkpoints / "latest").write_text("step_00000100")  # DeepSpeed's pointer file
    (run.checkpoints / "step_00000200").write_text("a file, not a checkpoint")
    assert [c.path.name for c in run.checkpoint_dirs()] == [
        "step_00000003",
        "step_00000020",
        "step_00000100",
    ]
    assert not any(c.complete for c in run.checkpoint_dirs())


# ---- checkpoint pruning --------------------------------------------------------------------------
def make_checkpoints(run: RunDir, complete: list[int], incomplete: list[int]) -> None:
    for step in complete + incomplete:
        run.checkpoint(step).path.mkdir(parents=True)
    for step in complete:
        run.checkpoint(step).marker.write_text("{}")


def test_prune_keeps_the_newest_complete_and_a_newer_incomplete_one(tmp_path):
    run = RunDir(tmp_path)
    make_checkpoints(run, complete=[5, 15, 20], incomplete=[10, 25])
    _prune(run, keep_last=2)
    assert [c.path.name for c in run.checkpoint_dirs()] == [
        "step_00000015",
        "step_00000020",
        "step_00000025",  # maybe being written: never deleted
    ]
    assert latest_complete(run).path == run.checkpoint(20).path


def test_prune_with_keep_last_1_and_nothing_complete(tmp_path):
    run = RunDir(tmp_path)
    make_checkpoints(run, complete=[], incomplete=[5, 10])
    _prune(run, keep_last=1)
    assert len(run.checkpoint_dirs()) == 2  # no complete one: nothing is pruned
    assert latest_complete(run) is None
    make_checkpoints(run, complete=[15, 20], incomplete=[])
    _prune(run, keep_last=1)
    assert [c.path.name for c in run.checkpoint_dirs()] == ["step_00000020"]


# ---- the optimizer step's non-finite bookkeeping -----------------------------------------------
def test_a_non_finite_loss_skips_the_step_and_is_counted():
    engine = ScriptedEngine([1.0, math.nan, 2.0, 4.0, 6.0, 8.0], grad_accum=3)
    step = OptimizerStep(engine, "cpu", grad_accum=3, max_nonfinite_in_row=2, clips_own=False)
    first = step(micro_batches(), 1, StepTimer())
    assert first.loss == pytest.approx(1.5)  # the mean of the two finite ones
    assert (first.nonfinite, first.applied) == (1, False)
    assert len(engine.backwards) == 3  # every micro batch goes through backward
    second = step(micro_batches(), 2, StepTimer())
    assert (second.loss, second.nonfinite, second.applied) == (6.0, 0, True)
    assert step.nonfinite_skipped == 1 and step.nonfinite_in_row == 0
    assert step.grad_norm == 0.5


def test_too_many_steps_in_a_row_with_a_non_finite_loss_stop_the_run():
    engine = ScriptedEngine([1.0, math.nan, math.inf, 1.0, math.nan, math.nan], grad_accum=2)
    step = OptimizerStep(engine, "cpu", grad_accum=2, max_nonfinite_in_row=3, clips_own=False)
    message = r"3 optimizer steps in a row .* at step 7; lower optim\.lr"
    step(micro_batches(), 5, StepTimer())
    step(micro_batches(), 6, StepTimer())
    with pytest.raises(NonFiniteLoss, match=message):
        step(micro_batches(), 7, StepTimer())
    assert step.nonfinite_skipped == 4


def test_without_zero_the_trainer_clips_measures_and_checks_the_whole_gradients():
    model = torch.nn.Linear(3, 1, bias=False)
    engine = ScriptedEngine([1.0, 2.0, 1.0, 1.0], grad_accum=2, grad_norm=None)
    engine.module = model
    engine.optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    engine.backward = lambda loss: setattr(model.weight, "grad", torch.tensor([[3.0, 0.0, 4.0]]))
    step = OptimizerStep(
        engine, "cpu", grad_accum=2, max_nonfinite_in_row=2, clips_own=True, grad_clip=1.0
    )
    assert step(micro_batches(), 1, StepTimer()).applied
    assert step.grad_norm == pytest.approx(5.0)  # before clipping
    assert torch.linalg.vector_norm(model.weight.grad) == pytest.approx(1.0)
    engine.backward = lambda loss: setattr(model.weight, "grad", torch.full((1, 3), math.inf))
    assert not step(micro_batches(), 2, StepTimer()).applied
    assert model.weight.grad is None  # dropped: the optimizer skips every parameter


# ---- step timer --------------------------------------------------------------------------------
def test_step_timer_counts_waiting_and_leaves_out_paused_time():
    now = [100.0]
    timer = StepTimer(clock=lambda: now[0])
    with timer.waiting():
        now[0] += 2
    now[0] += 1
    with timer.paused():
        now[0] += 10  # validation, say
    now[0] += 3
    assert timer.finish() == (6.0, 2.0)
    now[0] += 4
    assert timer.finish() == (4.0, 0.0)  # the next step starts at finish()


def test_step_timer_contexts_count_their_time_when_the_body_raises():
    now = [0.0]
    timer = StepTimer(clock=lambda: now[0])
    with pytest.raises(StopIteration), timer.waiting():
        now[0] += 1.5
        raise StopIteration
    with pytest.raises(RuntimeError), timer.paused():
        now[0] += 7
        raise RuntimeError
    assert timer.finish() == (1.5, 1.5)


# ---- preemption --------------------------------------------------------------------------------
@pytest.fixture
def own_signal_handlers():
    saved = {sig: signal.getsignal(sig) for sig in PREEMPTION_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


# Slurm's --signal=USR1 (slurm/train.sbatch), submitit's timeout warning USR2, a plain TERM.
@pytest.mark.parametrize(
    "sig", [signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM], ids=["USR1", "USR2", "TERM"]
)
def test_preemption_is_due_after_a_signal_and_stops_after_saving(own_signal_handlers, sig):
    saved = []
    finish = lambda: saved.append("written")  # noqa: E731 - a write in flight, waited for
    preemption = Preemption(SimpleNamespace(save=saved.append, finish=finish), exit_code=75)
    assert not preemption.due(3)
    os.kill(os.getpid(), sig)
    assert preemption.signalled_here and not preemption.due(4)  # due once the ranks agree on it
    engine = ScriptedEngine([1.0], grad_accum=1)
    step = OptimizerStep(engine, "cpu", grad_accum=1, max_nonfinite_in_row=1, clips_own=False)
    preemption.signalled_anywhere = step(
        micro_batches(), 4, StepTimer(), preemption.signalled_here
    ).stop_asked
    assert preemption.due(4)
    with pytest.raises(Preempted) as stop:
        preemption.run(4, {})
    assert stop.value.exit_code == 75 and saved == [4, "written"]


def test_scrub_keeps_every_key_of_the_training_config_readable():
    """No key of the trainer's own config names a secret: runs stay comparable by tokenizer,
    batch tokens and the rest (``data.tokenizer`` was once shown as redacted)."""
    config = config_dict(TrainConfig(data=DataConfig(path="data/bach", tokenizer="data/tok")))
    assert scrub(config) == config
    assert scrub(config)["data"]["tokenizer"] == "data/tok"
