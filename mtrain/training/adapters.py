"""Low-rank adapters (LoRA, through PEFT) over mtrain's GPT for fine-tuning: which layers get
one, their injection with the base frozen, and the plain weights they merge into."""

import logging
from dataclasses import dataclass, field
from enum import Enum

import torch

from data_pipeline.errors import ConfigError, require
from mtrain.model import GPTConfig

log = logging.getLogger(__name__)
# PEFT's name for the one adapter a model carries, and the mark of its parameters.
ADAPTER_NAME = "default"
ADAPTER_MARK = "lora_"
# What a target names: one linear layer of every block, or a kind of them.
KINDS = ("attn", "mlp")
# The token embedding (tied to the output layer where the model ties them), which
# ``finetune.train_embedding`` trains beside the adapters.
EMBEDDING = "wte.weight"


class FinetuneMethod(Enum):
    none = "none"  # every weight trains (pretraining, or full fine-tuning with init_from)
    lora = "lora"  # the base frozen, low-rank adapters on the target layers train


@dataclass
class FinetuneConfig:
    method: FinetuneMethod = FinetuneMethod.none
    rank: int = 8
    # The update is scaled by alpha / rank (PEFT's lora_alpha).
    alpha: float = 16.0
    dropout: float = 0.0
    # Linear layers of every block that get an adapter: attn.qkv, attn.proj, mlp.up, mlp.down,
    # mlp.gate (llama blocks), or attn / mlp for every one of that kind.
    targets: list[str] = field(default_factory=lambda: ["attn", "mlp"])
    # Train the token embedding too (and so the output layer tied to it): a new label's row,
    # and the rows of tokens the base hardly saw (an instrument new to it), which adapters on
    # the blocks cannot move. Vocabulary x width more parameters: small beside a model of
    # width 768 or more, large beside a narrow one.
    train_embedding: bool = False

    def __post_init__(self):
        require(
            self,
            "finetune",
            [
                (self.rank >= 1, "rank", "must be at least 1"),
                (self.alpha > 0, "alpha", "must be above 0"),
                (0 <= self.dropout < 1, "dropout", "must be in [0, 1)"),
                (bool(self.targets), "targets", "must name at least one layer"),
            ],
        )

    @property
    def adapters(self) -> bool:
        return self.method == FinetuneMethod.lora


def block_layers(model: GPTConfig) -> list[str]:
    """The linear layers of one block, by their name inside it."""
    mlp = ["mlp.gate", "mlp.up", "mlp.down"] if model.block == "llama" else ["mlp.up", "mlp.down"]
    return ["attn.qkv", "attn.proj", *mlp]


def target_layers(cfg: FinetuneConfig, model: GPTConfig) -> list[str]:
    """The block layers ``finetune.targets`` names; a name that matches none is refused,
    listing the layers there are."""
    layers = block_layers(model)
    chosen = []
    for target in cfg.targets:
        matched = [name for name in layers if target in (name, name.split(".")[0])]
        if not matched:
            raise ConfigError(
                f"finetune.targets: {target!r} matches no layer of a {model.block} block; its "
                f"layers are {', '.join(layers)} (or {' / '.join(KINDS)} for every one of a kind)"
            )
        chosen += [name for name in matched if name not in chosen]
    return chosen


def check_finetune(cfg: FinetuneConfig, init_from: str | None) -> None:
    """Adapters need a trained model to adapt (its shape, hence the targets' check,
    ``target_layers``, comes with it)."""
    if cfg.adapters and init_from is None:
        raise ConfigError(
            "finetune.method=lora trains adapters over a trained model: set "
            "init_from=<exported model dir> (python -m mtrain.export writes one)"
        )


def lora_config(cfg: FinetuneConfig, model: GPTConfig):
    """PEFT's LoraConfig for ``cfg`` on mtrain's module names."""
    from peft import LoraConfig

    layers = "|".join(name.replace(".", r"\.") for name in target_layers(cfg, model))
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=rf"blocks\.\d+\.({layers})",
        bias="none",
    )


def add_adapters(model: torch.nn.Module, cfg: FinetuneConfig, seed: int) -> torch.nn.Module:
    """Injects PEFT's LoRA layers into ``model`` in place (the base layer kept inside each)
    and freezes everything else. The adapters' initial values come from ``seed``, the same on
    every rank."""
    from peft import inject_adapter_in_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(lora_config(cfg, model.config), model, adapter_name=ADAPTER_NAME)
    for name, param in model.named_parameters():
        param.requires_grad = trains(name, cfg)
    # Checkpoints keep what trains: DeepSpeed drops the frozen parameters by name, but not a
    # tied alias of one (lm_head.weight is wte.weight), which would be saved whole.
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    model.register_state_dict_post_hook(_keeping(trained))
    trainable, total = trainable_share(model)
    log.info(
        "LoRA r=%d alpha=%g on %s%s: %d of %d parameters trainable (%.2f%%), the rest frozen",
        cfg.rank,
        cfg.alpha,
        ", ".join(target_layers(cfg, model.config)),
        " and the token embedding" if cfg.train_embedding else "",
        trainable,
        total,
        100 * trainable / total,
    )
    return model


def _keeping(names: set[str]):
    """A state-dict hook that keeps, of the module's own entries, those of ``names`` alone."""

    def hook(_module, state: dict, prefix: str, _metadata) -> None:
        for key in [k for k in state if k.startswith(prefix) and k[len(prefix) :] not in names]:
            del state[key]

    return hook


def trained_weights(state: dict[str, torch.Tensor], cfg: FinetuneConfig) -> dict:
    """The entries of an adapter run's checkpoint ``state`` that it trained."""
    return {name: t for name, t in state.items() if trains(name, cfg)}


def trains(name: str, cfg: FinetuneConfig) -> bool:
    """Whether the parameter ``name`` trains under adapters: an adapter's, or the embedding
    where ``finetune.train_embedding`` asks for it."""
    return ADAPTER_MARK in name or (cfg.train_embedding and name == EMBEDDING)


def trainable_share(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable elements, all elements) of ``model``, whole even where ZeRO-3 partitions."""
    trainable = total = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", param.numel())
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def has_frozen(module: torch.nn.Module) -> bool:
    """Whether part of ``module`` is frozen: its checkpoints then keep only what trains."""
    return any(not p.requires_grad for p in module.parameters())


def plain_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict:
    """``weights`` (by ``module``'s parameter names) as the plain GPT's: each adapted layer's
    base weight plus its low-rank update, W + (alpha / r) B A, under the base layer's name.
    Unchanged for a module without adapters (PEFT not even imported)."""
    if not any(ADAPTER_MARK in name for name in weights):
        return weights
    from peft.tuners.lora import LoraLayer

    plain = dict(weights)
    for name, layer in module.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        a = plain.pop(f"{name}.lora_A.{ADAPTER_NAME}.weight")
        b = plain.pop(f"{name}.lora_B.{ADAPTER_NAME}.weight")
        for part in ("weight", "bias"):
            if f"{name}.base_layer.{part}" in plain:
                plain[f"{name}.{part}"] = plain.pop(f"{name}.base_layer.{part}")
        update = (b.float() @ a.float()) * layer.scaling[ADAPTER_NAME]
        plain[f"{name}.weight"] = plain[f"{name}.weight"] + update.to(plain[f"{name}.weight"])
    return plain
