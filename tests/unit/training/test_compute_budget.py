"""The size dial (model.depth) and the compute budget (trainer.flops_budget): the shape each
depth gives, the steps a budget buys, and the conflicts each refuses in one line."""

import dataclasses
import math

import pytest

from data_pipeline.errors import ConfigError
from mtrain.model import GPT, GPTConfig
from mtrain.training.compute_budget import apply_budget, plan
from mtrain.training.config import OptimConfig, TrainConfig, TrainerConfig
from mtrain.training.flops import flops_per_token, matmul_params, param_count
from mtrain.training.schedule import lr_multiplier

VOCAB = 300


@pytest.mark.parametrize(
    ("depth", "aspect", "shape"),
    [(1, None, (1, 1, 64)), (6, None, (6, 6, 384)), (3, 32, (3, 3, 96))],
)
def test_depth_sets_layers_width_and_heads(depth, aspect, shape):
    cfg = GPTConfig(depth=depth, aspect_ratio=aspect)
    assert (cfg.n_layer, cfg.n_head, cfg.d_model) == shape
    assert cfg.head_dim == (aspect or 64)


def test_a_depth_shape_survives_its_own_record():
    """model_config.json records depth beside the shape it set: read back, it is the same."""
    cfg = GPTConfig(depth=4, max_seq_len=256).with_vocab(VOCAB)
    assert GPTConfig(**dataclasses.asdict(cfg)) == cfg


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"depth": 3, "n_layer": 4},
            "model.n_layer=4 conflicts with model.depth=3, which sets n_layer=3, n_head=3, "
            "d_model=192: drop model.n_layer, or set model.depth=null",
        ),
        ({"depth": 0}, "model.depth=0 must be at least 1"),
        ({"aspect_ratio": 32}, "model.aspect_ratio=32 shapes the depth family only"),
    ],
)
def test_depth_conflicts_are_refused_naming_the_key(kwargs, message):
    with pytest.raises(ValueError) as error:
        GPTConfig(**kwargs)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_a_budget_buys_the_steps_its_flops_allow():
    model = GPTConfig(depth=2, max_seq_len=128).with_vocab(VOCAB)
    per_step = flops_per_token(model, 128) * 1024
    found = plan(model, 100.4 * per_step, 1024)
    assert found.steps == 100
    assert found.tokens == 100 * 1024
    assert found.flops == pytest.approx(100 * per_step)
    # N: every weight a token is multiplied by (the tied output projection too), not the
    # embedding lookups.
    assert found.params == matmul_params(model)
    assert found.params == param_count(model, include_embeddings=False) + VOCAB * model.d_model
    n_model = sum(p.numel() for p in GPT(model).parameters())
    assert found.params == n_model  # tied: the one matrix is both lookup and projection


def test_a_budget_below_one_step_is_refused_with_the_least_that_buys_one():
    model = GPTConfig(depth=2).with_vocab(VOCAB)
    with pytest.raises(ConfigError) as error:
        plan(model, 1e6, 1024)
    assert str(error.value).startswith("trainer.flops_budget=1e+06 buys less than one step")


def test_max_steps_and_a_budget_conflict_in_one_line():
    with pytest.raises(ConfigError) as error:
        TrainerConfig(max_steps=500, flops_budget=1e12)
    assert str(error.value) == (
        "trainer.max_steps=500 conflicts with trainer.flops_budget=1e+12, which derives the "
        "steps: drop one"
    )


def test_without_a_budget_the_default_length_stays():
    assert TrainConfig().trainer.max_steps == 1000
    assert TrainConfig().optim.warmup_for(1000) == 100


def test_the_schedule_follows_the_derived_steps():
    cfg = TrainConfig(
        model=GPTConfig(depth=1, max_seq_len=64),
        trainer=TrainerConfig(flops_budget=2e10, global_batch_tokens=512, micro_batch_size=8),
        optim=OptimConfig(warmup_fraction=0.1),
    )
    assert cfg.trainer.max_steps is None  # until the vocabulary is known
    cfg.model = cfg.model.with_vocab(VOCAB)
    found = apply_budget(cfg)
    steps = cfg.trainer.max_steps
    assert steps == found.steps == round(2e10 / (flops_per_token(cfg.model, 64) * 512))
    warmup = math.ceil(0.1 * steps)
    assert cfg.optim.warmup_for(steps) == warmup
    assert lr_multiplier(warmup - 1, steps, cfg.optim) == 1.0  # warmup ends on time
    assert lr_multiplier(steps, steps, cfg.optim) == pytest.approx(cfg.optim.min_lr_ratio)


def test_warmup_steps_and_fraction_conflict():
    with pytest.raises(
        ConfigError, match=r"optim.warmup_steps=10 and optim.warmup_fraction=0.1 both"
    ):
        OptimConfig(warmup_steps=10, warmup_fraction=0.1)
