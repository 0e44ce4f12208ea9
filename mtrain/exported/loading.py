"""Loading an exported model: for inference, with a dataset it must match, or as the start of
a fine-tuning run."""

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import torch

from data_pipeline import storage
from data_pipeline.errors import InputError
from data_pipeline.reader import load_card
from data_pipeline.tokenizer import MusicTokenizer
from mtrain.exported.model_dir import CONFIG, TOKENIZER, WEIGHTS, load_exported
from mtrain.exported.vocab_growth import added_labels, grown_rows
from mtrain.exported.writing import exported_model_dir
from mtrain.model import GPT, GPTConfig
from mtrain.runs.run_dir import model_shape
from mtrain.training.contrastive import objective_parameter


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
    dataset was tokenized with another tokenizer than the model's or one it extends (its ids
    would mean other tokens), or lacks ``split`` (None: every split is read)."""
    model, meta, tokenizer, model_dir = load_for_inference(checkpoint_path, device)
    card = load_card(data_path)
    if card["tokenizer"]["hash"] != tokenizer.hash and not _reads(tokenizer, data_path, card):
        raise ValueError(
            f"data_path={data_path} was tokenized with tokenizer "
            f"{card['tokenizer']['hash'][:12]}, the model (checkpoint={checkpoint_path}) with "
            f"{tokenizer.hash[:12]}: use data prepared with the model's tokenizer"
        )
    if split is not None and split not in card["splits"]:
        raise ValueError(f"split={split}: {data_path} has splits {', '.join(card['splits'])}")
    return ModelAndData(model, meta, tokenizer, card, model_dir)


def exported_tokenizer(path: str | Path) -> MusicTokenizer:
    """The tokenizer artifact an exported model was trained with."""
    return MusicTokenizer.load(str(Path(path) / TOKENIZER))


def init_from_shape(path: str, model: GPTConfig, overrides: list[str]) -> GPTConfig:
    """The model shape of a fine-tuning run: the exported model's (its vocabulary set from
    the data later; dropout the run's own), whatever ``model=`` the config defaults to; model
    overrides that ask for another shape are refused, naming the keys."""
    if not (Path(path) / CONFIG).exists():
        raise FileNotFoundError(
            f"init_from={path}: no {CONFIG} there; give a directory `python -m mtrain.export` wrote"
        )
    recorded = model_shape(json.loads((Path(path) / CONFIG).read_text())["model"])
    theirs = dataclasses.replace(GPTConfig(**recorded), dropout=model.dropout)
    ours = dataclasses.asdict(dataclasses.replace(model, vocab_size=theirs.vocab_size))
    given = [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] == "model"]
    # A model group (model=...) asks for a whole shape, model.<key>=... for that key alone.
    keys = {o.lstrip("+~").split("=")[0].partition(".")[2] for o in given}
    asked = set(ours) if "" in keys else keys
    differ = [
        f"model.{k}={ours[k]!r} vs {v!r}"
        for k, v in dataclasses.asdict(theirs).items()
        if k in asked and k != "dropout" and ours[k] != v
    ]
    if differ:
        raise InputError(
            f"init_from={path} has another model shape than the overrides {' '.join(given)} "
            f"ask for ({', '.join(differ)}): drop them, the export's shape is taken"
        )
    return theirs


def check_init_from(path: str, tokenizer: MusicTokenizer) -> list[str]:
    """Before a fine-tuning run starts: the label tokens its data's ``tokenizer`` adds to the
    exported model's (refused when it is another tokenizer altogether)."""
    if not (Path(path) / WEIGHTS).exists():
        raise FileNotFoundError(
            f"init_from={path}: no {WEIGHTS} there; give a directory `python -m mtrain.export` "
            "wrote"
        )
    return added_labels(path, exported_tokenizer(path), tokenizer)


def _reads(tokenizer: MusicTokenizer, data_path: str, card: dict) -> bool:
    """Whether a model with ``tokenizer`` reads the dataset's ids as they were meant: its
    tokenizer is the dataset's, or extends it with labels (a fine-tuned model reading its
    base's data)."""
    data_tokenizer = MusicTokenizer.load(storage.join(data_path, card["tokenizer"]["path"]))
    return tokenizer.added_labels_over(data_tokenizer) is not None


def load_weights(model: GPT, path: str | Path, tokenizer: MusicTokenizer) -> None:
    """Fine-tuning: start ``model`` from exported weights of the same shape, with rows for the
    label tokens the run's ``tokenizer`` adds (``vocab_growth``). A model built partitioned
    (ZeRO-3's ``deepspeed.zero.Init``: its parameters are empty placeholders, which
    ``load_state_dict`` cannot fill) is filled one parameter at a time, gathered whole while
    rank 0 writes it and partitioned again from rank 0's values (collective)."""
    source, _ = load_exported(path)
    parent = exported_tokenizer(path)
    added_labels(str(path), parent, tokenizer)
    weights = grown_rows(source.state_dict(), parent, tokenizer)
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        # A training objective's own parameters (the contrastive temperature and head) start
        # fresh.
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or any(not objective_parameter(name) for name in missing):
            raise ValueError(
                f"init_from={path} holds another model shape than this run's model "
                f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
            )
        return
    import deepspeed
    import torch.distributed as dist

    shapes = {
        name: tuple(p.ds_shape)
        for name, p in model.named_parameters()
        if not objective_parameter(name)
    }
    theirs = {name: tuple(weights[name].shape) for name in shapes if name in weights}
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
            if objective_parameter(name):
                continue
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if writer:
                    param.copy_(weights[name])
