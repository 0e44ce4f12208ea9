"""Loading an exported model: for inference, with a dataset it must match, or as the start of
a fine-tuning run."""

import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_model

from data_pipeline.reader import load_card
from data_pipeline.tokenizer import MusicTokenizer
from mtrain.exported.writing import CONFIG, TOKENIZER, WEIGHTS, exported_model_dir
from mtrain.model import GPT, GPTConfig
from mtrain.runs.run_dir import model_shape
from mtrain.training.contrastive import TEMPERATURE


def load_exported(path: str | Path) -> tuple[GPT, dict]:
    """The exported model (eval mode, CPU) and its config.json."""
    path = Path(path)
    if not (path / WEIGHTS).exists():
        raise FileNotFoundError(
            f"{path / WEIGHTS} not found: export a checkpoint first with "
            f"`python -m mtrain.export checkpoint=<run_dir> output={path}`"
        )
    meta = json.loads((path / CONFIG).read_text())
    model = GPT(GPTConfig(**model_shape(meta["model"])))
    load_model(model, str(path / WEIGHTS))
    return model.eval(), meta


class ModelAndData(NamedTuple):
    model: GPT
    meta: dict  # the export's config.json
    tokenizer: MusicTokenizer
    card: dict  # the dataset's card
    model_dir: Path


def pick_device(name: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_for_inference(
    checkpoint_path: str, device: str = "auto"
) -> tuple[GPT, dict, MusicTokenizer, Path]:
    """The model of ``checkpoint_path`` (exported first if need be) on ``device``, its
    config.json, its tokenizer and the exported directory."""
    model_dir = exported_model_dir(checkpoint_path)
    model, meta = load_exported(model_dir)
    model.to(pick_device(device))
    return model, meta, MusicTokenizer.load(str(model_dir / TOKENIZER)), model_dir


def load_for_data(
    checkpoint_path: str, data_path: str, split: str | None, device: str = "auto"
) -> ModelAndData:
    """``load_for_inference``, and the card of the dataset the model is to read; refused when the
    dataset was tokenized with another tokenizer (its ids would mean other tokens) or lacks
    ``split`` (None: every split is read)."""
    model, meta, tokenizer, model_dir = load_for_inference(checkpoint_path, device)
    card = load_card(data_path)
    if card["tokenizer"]["hash"] != tokenizer.hash:
        raise ValueError(
            f"data_path={data_path} was tokenized with tokenizer "
            f"{card['tokenizer']['hash'][:12]}, the model (checkpoint={checkpoint_path}) with "
            f"{tokenizer.hash[:12]}: use data prepared with the model's tokenizer"
        )
    if split is not None and split not in card["splits"]:
        raise ValueError(f"split={split}: {data_path} has splits {', '.join(card['splits'])}")
    return ModelAndData(model, meta, tokenizer, card, model_dir)


def load_weights(model: GPT, path: str | Path) -> None:
    """Fine-tuning: start ``model`` from exported weights of the same shape. A model built
    partitioned (ZeRO-3's ``deepspeed.zero.Init``: its parameters are empty placeholders,
    which ``load_state_dict`` cannot fill) is filled one parameter at a time, gathered whole
    while rank 0 writes it and partitioned again from rank 0's values (collective)."""
    source, meta = load_exported(path)
    if meta["model"]["vocab_size"] != model.config.vocab_size:
        raise ValueError(
            f"init_from={path} has vocab_size {meta['model']['vocab_size']} but this run's "
            f"tokenizer has {model.config.vocab_size}; fine-tune on data prepared with the "
            "same tokenizer artifact"
        )
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        # A training objective's own parameters (the contrastive temperature) start fresh.
        missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
        if unexpected or set(missing) - {TEMPERATURE}:
            raise ValueError(
                f"init_from={path} holds another model shape than this run's model "
                f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
            )
        return
    import deepspeed
    import torch.distributed as dist

    weights = dict(source.named_parameters())
    shapes = {
        name: tuple(p.ds_shape) for name, p in model.named_parameters() if name != TEMPERATURE
    }
    theirs = {name: tuple(p.shape) for name, p in weights.items()}
    if shapes != theirs:
        other = sorted(
            name for name in shapes.keys() | theirs.keys() if shapes.get(name) != theirs.get(name)
        )
        raise ValueError(
            f"init_from={path} holds another model shape than this run's model "
            f"(parameters {other[:5]} differ); fine-tune with the exported model's shape"
        )
    writer = dist.get_rank() == 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == TEMPERATURE:
                continue
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if writer:
                    param.copy_(weights[name])
