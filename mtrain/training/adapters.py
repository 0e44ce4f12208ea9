"""Low-rank adapters (LoRA, through PEFT) over mtrain's GPT for fine-tuning: which layers get
one, their injection with the base frozen, the rows of the token embedding trained beside
them, and the plain weights they merge into."""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.errors import ConfigError, require
from mtrain.model import GPTConfig

log = logging.getLogger(__name__)
# PEFT's name for the one adapter a model carries, and the mark of its parameters.
ADAPTER_NAME = "default"
ADAPTER_MARK = "lora_"
# What a target names: one linear layer of every block, or a kind of them.
KINDS = ("attn", "mlp")
# The token embedding (tied to the output layer where the model ties them), which
# ``finetune.embedding_rows=all`` trains whole beside the adapters.
EMBEDDING = "wte.weight"
# The trained rows of the embedding and output layers (``TrainedRows``), by their parameter name.
ROWS = "rows"


class EmbeddingRows(Enum):
    """Which rows of the token embedding (and of the output layer, tied or not) train beside
    the adapters. Adapters on the blocks cannot move a row: a new label's stays the mean it
    starts at, and a token the base hardly saw (an instrument new to it) keeps the near-zero
    probability the base gives it."""

    none = "none"  # every row frozen
    new = "new"  # the rows of the labels the base lacks
    # Those, and the rows of tokens the base has not learned: on this run's training data it
    # predicts them worse than a uniform guess over the vocabulary (mtrain.training.token_rows).
    unlearned = "unlearned"
    all = "all"  # the whole embedding: vocabulary x width more parameters, and more forgetting


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
    # Rows of the token embedding that train too (EmbeddingRows).
    embedding_rows: EmbeddingRows = EmbeddingRows.unlearned

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


def add_adapters(
    model: torch.nn.Module, cfg: FinetuneConfig, seed: int, rows: Sequence[int] = ()
) -> torch.nn.Module:
    """Injects PEFT's LoRA layers into ``model`` in place (the base layer kept inside each)
    and freezes everything else but the embedding's ``rows`` (``TrainedRows``; the whole
    embedding under ``embedding_rows=all``). The adapters' initial values come from ``seed``,
    the same on every rank."""
    from peft import inject_adapter_in_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(lora_config(cfg, model.config), model, adapter_name=ADAPTER_NAME)
    for name, param in model.named_parameters():
        param.requires_grad = trains(name, cfg)
    if rows and cfg.embedding_rows not in (EmbeddingRows.none, EmbeddingRows.all):
        train_rows(model, rows)
    # Checkpoints keep what trains: DeepSpeed drops the frozen parameters by name, but not a
    # tied alias of one (lm_head.weight is wte.weight), which would be saved whole.
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    model.register_state_dict_post_hook(_keeping(trained))
    trainable, total = trainable_share(model)
    embedding = {
        EmbeddingRows.all: " and the token embedding",
        EmbeddingRows.none: "",
    }.get(cfg.embedding_rows, f" and {len(rows)} rows of the token embedding" if rows else "")
    log.info(
        "LoRA r=%d alpha=%g on %s%s: %d of %d parameters trainable (%.2f%%), the rest frozen",
        cfg.rank,
        cfg.alpha,
        ", ".join(target_layers(cfg, model.config)),
        embedding,
        trainable,
        total,
        100 * trainable / total,
    )
    return model


class TrainedRows(nn.Module):
    """An embedding (or output layer) whose rows ``ids`` train while the rest stay frozen: the
    rows replace the weight's, as PEFT's trainable tokens do (``TrainableTokensLayer``), but
    held where ZeRO-3 gathers them: the frozen ``weight`` and the trained ``rows`` are this
    module's own parameters, gathered when it runs (PEFT's layer reads a partitioned weight
    outside its base layer's forward, and gathers its rows on CUDA only). An output layer tied
    to the embedding shares both parameters and the ids."""

    def __init__(self, weight: nn.Parameter, ids: torch.Tensor, rows=None, output=False):
        super().__init__()
        self.weight = weight
        self.output = output
        # Not in the state dict: the run records its rows (mtrain.training.token_rows).
        self.register_buffer("ids", ids, persistent=False)
        if rows is None:
            rows = nn.Parameter(_rows_of(weight, ids), requires_grad=True)
        self.rows = rows

    def merged(self) -> torch.Tensor:
        return self.weight.index_copy(0, self.ids, self.rows.to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.merged()) if self.output else F.embedding(x, self.merged())


def _rows_of(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The rows ``ids`` of ``weight``, gathered first where ZeRO-3 partitions it (collective)."""
    if not hasattr(weight, "ds_id"):
        return weight.detach()[ids].clone()
    import deepspeed

    with deepspeed.zero.GatheredParameters([weight]):
        return weight.detach()[ids].clone()


def train_rows(model: torch.nn.Module, rows: Sequence[int]) -> None:
    """Makes the embedding's ``rows`` trainable (``TrainedRows``) in ``model``, and the output
    layer's: the same parameter where they are tied, rows of its own where not."""
    ids = torch.tensor(sorted(rows), dtype=torch.long, device=model.wte.weight.device)
    tied = model.lm_head.weight is model.wte.weight
    model.wte = TrainedRows(model.wte.weight, ids)
    shared = model.wte.rows if tied else None
    model.lm_head = TrainedRows(model.lm_head.weight, ids, rows=shared, output=True)


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
    """Whether the parameter ``name`` trains under adapters: an adapter's, chosen rows of the
    embedding, or the whole embedding where ``finetune.embedding_rows=all`` asks for it."""
    return (
        ADAPTER_MARK in name
        or name.endswith(f".{ROWS}")
        or (cfg.embedding_rows == EmbeddingRows.all and name == EMBEDDING)
    )


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
    base weight plus its low-rank update, W + (alpha / r) B A, under the base layer's name, and
    trained rows written into the embedding (and an untied output layer). Unchanged for a
    module without either (PEFT not even imported)."""
    rows = {
        name: layer for name, layer in module.named_children() if isinstance(layer, TrainedRows)
    }
    if not rows and not any(ADAPTER_MARK in name for name in weights):
        return weights
    plain = dict(weights)
    for name, layer in rows.items():
        if f"{name}.{ROWS}" in plain:  # a tied output layer's are the embedding's
            base = plain[f"{name}.weight"]
            trained = plain.pop(f"{name}.{ROWS}").to(base)
            plain[f"{name}.weight"] = base.index_copy(0, layer.ids.to(base.device), trained)
    if not any(ADAPTER_MARK in name for name in plain):
        return plain
    from peft.tuners.lora import LoraLayer

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
