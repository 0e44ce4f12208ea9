"""Activation checkpointing and compile are the trainer's run-time knobs, no part of the model's
shape: a run or an export that recorded them beside the shape still resumes and loads, a switch
of them is no reason to refuse a resume, and the memory plan advises the trainer's key."""

import dataclasses
import json
import re
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_model

from data_pipeline.app import moved_keys_said, one_line
from data_pipeline.config import TokenizerConfig
from data_pipeline.errors import InputError
from data_pipeline.tokenizer import MusicTokenizer, build_base_tokenizer
from mtrain.exported.loading import load_exported, load_weights
from mtrain.exported.writing import CONFIG, WEIGHTS
from mtrain.model import GPT, GPTConfig
from mtrain.runs.run_dir import RunDir
from mtrain.training.config import MOVED_KEYS, DeepSpeedConfig, Precision
from mtrain.training.contrastive import ContrastiveConfig, ContrastiveGPT
from mtrain.training.memory_plan import GiB, Layout, advice, estimate, judge
from mtrain.training.resume import check_resumable

SHAPE = GPTConfig(vocab_size=50, n_layer=2, n_head=2, d_model=16, max_seq_len=32)
HASH = "a" * 64
# What model_config.json and an export's config held while the knobs were model keys.
OLD_KEYS = {"activation_checkpointing": True, "compile": False}


def run_saved_with(tmp_path, recorded: dict) -> RunDir:
    """A run directory with one complete checkpoint whose model_config.json is ``recorded``."""
    run = RunDir(tmp_path / "run")
    ckpt = run.checkpoint(10)
    ckpt.path.mkdir(parents=True)
    ckpt.marker.write_text(json.dumps({"step": 10}))
    run.model_config.write_text(json.dumps(recorded))
    run.tokenizer.mkdir()
    (run.tokenizer / "artifact.json").write_text(json.dumps({"hash": HASH}))
    return run


def test_the_shape_holds_no_run_time_knob():
    names = {f.name for f in dataclasses.fields(GPTConfig)}
    assert not names & {"activation_checkpointing", "compile"}


def test_a_run_that_recorded_the_knobs_with_its_shape_resumes(tmp_path):
    run = run_saved_with(tmp_path, dataclasses.asdict(SHAPE) | OLD_KEYS)
    assert check_resumable(run, dataclasses.asdict(SHAPE), HASH) is True
    deeper = dataclasses.asdict(replace(SHAPE, n_layer=3))
    with pytest.raises(InputError, match=re.escape("model.n_layer: run 2, now 3")) as refused:
        check_resumable(run, deeper, HASH)
    assert "activation_checkpointing" not in str(refused.value)


def test_an_export_that_recorded_the_knobs_with_its_shape_loads(tmp_path):
    torch.manual_seed(0)
    model = GPT(SHAPE)
    save_model(model, str(tmp_path / WEIGHTS))
    (tmp_path / CONFIG).write_text(json.dumps({"model": dataclasses.asdict(SHAPE) | OLD_KEYS}))
    loaded, _ = load_exported(tmp_path)
    assert loaded.config == SHAPE
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    tokenizer = MusicTokenizer(build_base_tokenizer(TokenizerConfig()), [])
    tokenizer.save(str(tmp_path / "tokenizer"))
    fine_tuned = GPT(SHAPE)  # init_from= an old export, on data in its tokenizer's ids
    load_weights(fine_tuned, tmp_path, tokenizer)
    assert torch.equal(fine_tuned.wte.weight, model.wte.weight)
    # A contrastive run starts from it too: its temperature and head are its own, left fresh.
    embedder = ContrastiveGPT(SHAPE, ContrastiveConfig(projection=8))
    load_weights(embedder, tmp_path, tokenizer)
    assert torch.equal(embedder.wte.weight, model.wte.weight)


def test_the_memory_plan_takes_the_knob_from_the_layout_and_advises_the_trainer_key():
    shape = GPTConfig(vocab_size=521, n_layer=24, n_head=16, d_model=1536, max_seq_len=1024)
    ds = DeepSpeedConfig(zero_stage=3, precision=Precision.bf16)
    plain = Layout(shape, ds, micro_batch_size=8, world_size=2)
    checkpointed = replace(plain, activation_checkpointing=True)
    saved = estimate(plain).parts["activations"] - estimate(checkpointed).parts["activations"]
    assert saved > 0
    budget = (estimate(plain).total + estimate(checkpointed).total) / 2
    line = advice(judge(plain, budget, "test"))
    assert "trainer.activation_checkpointing=true" in line, line
    assert "activation_checkpointing" not in advice(judge(checkpointed, 64 * GiB, "test"))


def test_hydra_refusing_an_old_model_key_names_the_trainer_key():
    report = (
        "Could not override 'model.activation_checkpointing'.\nTo append to your config use "
        "+model.activation_checkpointing=true\nKey 'activation_checkpointing' not in "
        "'GPTConfig'\n    full_key: model.activation_checkpointing\n    object_type=dict\n"
    )
    said = one_line(moved_keys_said(report, MOVED_KEYS))
    assert said.startswith(
        "model.activation_checkpointing is no longer a key: set "
        "trainer.activation_checkpointing instead; Could not override"
    ), said
    other = report.replace("activation_checkpointing", "n_layr")
    assert moved_keys_said(other, MOVED_KEYS) == other
