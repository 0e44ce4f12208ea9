"""The fine-tuning config: LoRA through Hydra's config group, refused in one line without a
model to adapt or with a layer that does not exist; adapters injected by PEFT train alone and
a checkpoint's state holds them alone; tokenizer_from refused when it names no artifact."""

import dataclasses

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data_pipeline.app import CONF_DIR
from data_pipeline.config import PrepareConfig, TokenizerConfig
from data_pipeline.errors import ConfigError, InputError
from data_pipeline.tokenizer import artifact_of
from mtrain import train as train_app  # noqa: F401  (registers the train schema with Hydra)
from mtrain.model import GPT, GPTConfig
from mtrain.training.adapters import (
    EmbeddingRows,
    FinetuneConfig,
    FinetuneMethod,
    add_adapters,
    has_frozen,
    target_layers,
    trainable_share,
)


def train_config(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        raw = compose("train", ["data.path=/data", *overrides])
    return OmegaConf.to_object(raw)


def test_finetune_lora_is_a_config_group_with_its_knobs():
    cfg = train_config("finetune=lora", "init_from=/export", "finetune.rank=16")
    assert cfg.finetune.method == FinetuneMethod.lora and cfg.finetune.rank == 16
    assert train_config().finetune.method == FinetuneMethod.none


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["finetune=lora"],
            "finetune.method=lora trains adapters over a trained model: set init_from=",
        ),
        (
            ["finetune=lora", "init_from=/x", "finetune.rank=0"],
            "finetune.rank=0 must be at least 1",
        ),
    ],
)
def test_a_bad_fine_tuning_config_is_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        train_config(*overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_target_that_matches_no_layer_is_refused_listing_them():
    lora = train_config("finetune=lora", "init_from=/x", "finetune.targets=[attn,mlp.gate]")
    with pytest.raises(ConfigError) as err:
        target_layers(lora.finetune, lora.model)  # the model: init_from's shape, here tiny
    assert str(err.value) == (
        "finetune.targets: 'mlp.gate' matches no layer of a gpt2 block; its layers are "
        "attn.qkv, attn.proj, mlp.up, mlp.down (or attn / mlp for every one of a kind)"
    )
    llama = dataclasses.replace(lora.model, block="llama")
    assert target_layers(lora.finetune, llama) == ["attn.qkv", "attn.proj", "mlp.gate"]


def test_adapters_train_alone_and_the_state_dict_holds_them_alone():
    model = GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, d_model=32, max_seq_len=16))
    lora = FinetuneConfig(method=FinetuneMethod.lora, rank=4, targets=["attn"])
    add_adapters(model, lora, seed=0)
    trainable, _ = trainable_share(model)
    # q, k, v fused (32 -> 96) and the output projection (32 -> 32), per block: r (in + out).
    assert trainable == 2 * 4 * ((32 + 96) + (32 + 32)) and has_frozen(model)
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    state = model.state_dict()
    assert state and all("lora_" in k for k in state)  # not even the tied lm_head alias
    loss = model(torch.randint(50, (2, 8)), targets=torch.randint(50, (2, 8))).loss
    loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_the_embedding_trains_beside_the_adapters_when_asked():
    model = GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, d_model=32, max_seq_len=16))
    lora = FinetuneConfig(method=FinetuneMethod.lora, rank=4, targets=["attn"])
    add_adapters(model, dataclasses.replace(lora, embedding_rows=EmbeddingRows.all), seed=0)
    trainable, _ = trainable_share(model)
    assert trainable == 2 * 4 * ((32 + 96) + (32 + 32)) + 50 * 32  # the tied output, once
    state = model.state_dict()
    assert "wte.weight" in state and "lm_head.weight" not in state
    assert all("lora_" in k for k in state if k != "wte.weight")
    loss = model(torch.randint(50, (2, 8)), targets=torch.randint(50, (2, 8))).loss
    loss.backward()
    assert model.wte.weight.grad is not None and model.blocks[0].mlp.up.weight.grad is None


@pytest.mark.parametrize("tied", [True, False])
def test_chosen_rows_train_alone_in_the_embedding_and_the_output_layer(tied):
    cfg = GPTConfig(vocab_size=50, n_layer=2, n_head=2, d_model=32, max_seq_len=16,
                    tie_embeddings=tied)  # fmt: skip
    torch.manual_seed(0)
    base = GPT(cfg)
    model = GPT(cfg)
    model.load_state_dict(base.state_dict())
    lora = FinetuneConfig(method=FinetuneMethod.lora, rank=4, targets=["attn"])
    add_adapters(model, lora, seed=0, rows=[7, 3, 49])
    trainable, _ = trainable_share(model)
    rows = 3 * 32 * (1 if tied else 2)  # the tied output layer's rows are the embedding's
    assert trainable == 2 * 4 * ((32 + 96) + (32 + 32)) + rows
    # Before training, the same model: the rows start as the base's.
    inputs, targets = torch.randint(50, (2, 8)), torch.randint(50, (2, 8))
    inputs[0, :3] = torch.tensor([3, 7, 49])  # the embedding's rows are read
    torch.testing.assert_close(model(inputs).logits, base(inputs).logits)
    state = model.state_dict()
    assert ("wte.rows" in state) and (("lm_head.rows" in state) != tied)
    assert not {"wte.weight", "lm_head.weight", "wte.ids"} & state.keys()
    model(inputs, targets=targets).loss.backward()
    assert model.wte.weight.grad is None and model.wte.rows.grad.abs().sum() > 0
    with torch.no_grad():  # a step on the rows moves those rows of the logits' weights alone
        model.wte.rows.add_(1.0)
        merged = model.lm_head.merged() if tied else model.wte.merged()
    moved = (merged - base.wte.weight).abs().amax(dim=1).nonzero().flatten().tolist()
    assert moved == [3, 7, 49]


def test_tokenizer_from_must_name_an_artifact(tmp_path):
    with pytest.raises(InputError, match="is not an exported model, a dataset or a tokenizer"):
        artifact_of(str(tmp_path))
    with pytest.raises(ConfigError, match=r"tokenizer_from=.* drop the tokenizer"):
        PrepareConfig(tokenizer_from=str(tmp_path), tokenizer=TokenizerConfig(num_velocities=8))
