"""The contrastive objective (``objective=contrastive``): a language model's mean-pooled states
trained so that two views of one piece (``mtrain.data.views``) are nearer to each other than to
the other pieces of the batch (InfoNCE, SimCSE-style, with a learned temperature), read through
a projection head (SimCLR's) that is trained with the model but not exported."""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from data_pipeline.errors import require
from mtrain.data.views import PAD, ViewSpec
from mtrain.distributed import heartbeats
from mtrain.model import GPT, GPTConfig, ModelOutput

LM, CONTRASTIVE = "lm", "contrastive"
OBJECTIVES = (LM, CONTRASTIVE)
# The objective's own parameters: trained and checkpointed with the model, never exported (the
# export is the GPT that embeds).
TEMPERATURE = "log_inverse_temperature"
PROJECTION = "projection"  # the head's module name: its parameters are "projection.*"
# CLIP's bound on the learned logit scale: beyond it one pair's similarity swamps the batch.
MAX_LOGIT_SCALE = 100.0


@dataclass
class ContrastiveConfig:
    # Tokens per view (a window of the piece, BOS first); None: model.max_seq_len.
    view_tokens: int | None = None
    # The starting temperature of the similarities (SimCSE's 0.05); it is learned from there.
    temperature: float = 0.05
    # The block whose states are pooled, indexed like a Python list; None: the last, normed.
    layer: int | None = None
    # Each view's own shifts, in bins, on top of data.transpose_range (0: off).
    velocity_shift: int = 2
    tempo_shift: int = 2
    # The head the loss reads: the pooled state through Linear-GELU-Linear to this many
    # dimensions (0: the loss reads the pooled state itself). What the views teach the loss to
    # ignore (the key, under transposed views) is dropped in the head, and the pooled state the
    # export embeds with keeps more of it (Chen et al. 2020, SimCLR, section 4.2).
    projection: int = 0

    def __post_init__(self):
        require(
            self,
            "contrastive",
            [
                (self.temperature > 0, "temperature", "must be positive (SimCSE uses 0.05)"),
                (
                    self.view_tokens is None or self.view_tokens >= 2,
                    "view_tokens",
                    "must be at least 2 (BOS and a token), or None for model.max_seq_len",
                ),
                (self.velocity_shift >= 0, "velocity_shift", "must be at least 0 (0: off)"),
                (self.tempo_shift >= 0, "tempo_shift", "must be at least 0 (0: off)"),
                (self.projection >= 0, "projection", "must be at least 0 (0: no head)"),
            ],
        )

    def views(self, max_seq_len: int) -> ViewSpec:
        tokens = min(self.view_tokens or max_seq_len, max_seq_len)
        return ViewSpec(tokens, self.velocity_shift, self.tempo_shift)


def mean_pooled(model: GPT, views: torch.Tensor, layer: int | None) -> torch.Tensor:
    """[views, d_model]: the mean hidden state over each view's tokens (PAD excluded); padding
    sits on the right, where causal attention keeps it out of every real position."""
    real = views != PAD
    states = model.hidden_states(views.clamp(min=0), layer)
    weights = real.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1)


def info_nce(embeddings: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """InfoNCE over views in pairs (rows 2i and 2i+1 are one piece): each view must pick its
    twin among every other view of the batch."""
    z = F.normalize(embeddings.float(), dim=-1)
    logits = z @ z.T * log_scale.float().exp().clamp(max=MAX_LOGIT_SCALE)
    logits = logits.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), -math.inf)
    twins = torch.arange(len(z), device=z.device) ^ 1
    return F.cross_entropy(logits, twins)


def twin_first_rate(embeddings: torch.Tensor) -> float:
    """The share of views (in pairs, as ``info_nce`` reads them) whose nearest other view by
    cosine is their twin."""
    z = F.normalize(embeddings.float(), dim=-1)
    sims = (z @ z.T).fill_diagonal_(-math.inf)
    twins = torch.arange(len(z), device=z.device) ^ 1
    return (sims.argmax(1) == twins).float().mean().item()


class ContrastiveGPT(GPT):
    """A GPT whose forward without targets is the contrastive loss of its input views; with
    targets it is the language model it was made from (validation reports that loss)."""

    def __init__(self, config: GPTConfig, objective: ContrastiveConfig):
        super().__init__(config)
        self.pooled_layer = objective.layer
        # One element, not a 0-dim tensor: DeepSpeed flattens parameters by viewing them.
        start = torch.full((1,), math.log(1 / objective.temperature))
        setattr(self, TEMPERATURE, nn.Parameter(start))
        if objective.projection:
            width = config.d_model
            head = nn.Sequential(
                nn.Linear(width, width), nn.GELU(), nn.Linear(width, objective.projection)
            )
            setattr(self, PROJECTION, head)

    def forward(self, idx, targets=None, kv_cache=None) -> ModelOutput:
        if targets is not None or kv_cache is not None:
            return super().forward(idx, targets, kv_cache)
        pooled = mean_pooled(self, idx, self.pooled_layer)
        head = getattr(self, PROJECTION, None)
        compared = pooled if head is None else head(pooled)
        return ModelOutput(pooled, info_nce(compared, getattr(self, TEMPERATURE)))


def objective_parameter(name: str) -> bool:
    """Whether a parameter (by name) is the contrastive objective's own, not the GPT's."""
    return name == TEMPERATURE or name.startswith(PROJECTION + ".")


def language_model_weights(weights: dict) -> dict:
    """The weights a GPT holds, from a model trained with an objective of its own (the
    temperature, the projection head): what is exported and checked."""
    return {name: w for name, w in weights.items() if not objective_parameter(name)}


def trained_embedding(train_config: Path) -> dict | None:
    """What an export of a contrastive run records in its config.json (``embedding``): the
    objective, the pooling it was trained with and the language model it started from; None
    for a language model's run (or when the run's config is not at hand)."""
    if not train_config.exists():
        return None
    cfg = OmegaConf.load(train_config)
    if cfg.get("objective", LM) != CONTRASTIVE:
        return None
    return {
        "objective": CONTRASTIVE,
        "pooling": "mean",
        "layer": cfg.contrastive.layer,
        "init_from": cfg.init_from,
    }


def contrastive_batch_loss(engine, batch: torch.Tensor, device) -> torch.Tensor:
    """The InfoNCE loss of one batch of view pairs [2 * pieces, view_tokens]."""
    heartbeats.record_step(getattr(engine, "global_steps", 0))
    return engine(batch.to(device, non_blocking=True)).loss
