"""A decoder-only GPT in plain PyTorch: the math of the model and nothing about distribution.

Pre-norm blocks of causal attention and an MLP, in two flavours: GPT-2's (LayerNorm, GELU) and
Llama's (RMSNorm, SwiGLU); rotary or learned positions, tied input and output embeddings,
GPT-2 initialisation, and a KV cache for generation.
"""

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

POSITIONALS = ("rope", "learned")
# The block's norm and MLP: GPT-2's LayerNorm and GELU MLP, or Llama's RMSNorm and SwiGLU MLP.
BLOCKS = ("gpt2", "llama")
# Both norms' epsilon: PyTorch's LayerNorm default, and Llama 2's RMSNorm's.
NORM_EPS = 1e-5
# A SwiGLU hidden width is rounded up to a multiple of this, as Llama's is (whole GPU tiles).
SWIGLU_MULTIPLE = 64
# The size dial's (``model.depth``) default width per layer: nanochat's aspect ratio.
ASPECT_RATIO = 64


@dataclass
class GPTConfig:
    """The model's shape and initialisation, all that fixes its weights: the keys of
    conf/model/*.yaml. How a run computes them (activation checkpointing, compile) is the
    trainer's (``trainer.*``)."""

    # Set at run time from the tokenizer artifact; a model cannot be built while it is 0.
    vocab_size: int = 0
    n_layer: int = 2
    n_head: int = 2
    d_model: int = 64
    # Width of the MLP's hidden layer; when None, 4 * d_model for GELU and for SwiGLU 8/3 *
    # d_model rounded up to a multiple of 64 (its three matrices then hold about GELU's two's).
    d_ff: int | None = None
    max_seq_len: int = 128
    dropout: float = 0.0
    bias: bool = False
    block: str = "gpt2"
    positional: str = "rope"
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    # One dial for a family of shapes (model=scaling): depth sets n_layer = n_head = depth and
    # d_model = aspect_ratio * depth, so heads are aspect_ratio wide (nanochat's rule, whose
    # heads are 128 wide where ours keep one head per layer). None: the shape is n_layer,
    # n_head and d_model as given.
    depth: int | None = None
    # Width per layer of the depth family (None: ASPECT_RATIO); only with depth.
    aspect_ratio: int | None = None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def mlp_width(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.block == "llama":
            return -(-8 * self.d_model // (3 * SWIGLU_MULTIPLE)) * SWIGLU_MULTIPLE
        return 4 * self.d_model

    def __post_init__(self):
        """Plain ValueErrors naming ``model.<key>``: the app runner reports them as input
        errors. The first problem found is said."""
        if self.depth is not None:
            self._derive_from_depth()
        elif self.aspect_ratio is not None:
            raise ValueError(
                f"model.aspect_ratio={self.aspect_ratio} shapes the depth family only: set "
                "model.depth too (model=scaling), or drop it"
            )
        if self.vocab_size < 0:
            raise ValueError(
                f"model.vocab_size={self.vocab_size} must be 0 (set from the tokenizer) or more"
            )
        for key in ("n_layer", "n_head", "d_model", "max_seq_len"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key}={getattr(self, key)} must be at least 1")
        if self.d_model % self.n_head:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}"
            )
        if self.positional not in POSITIONALS:
            raise ValueError(
                f"model.positional={self.positional!r} is not one of {', '.join(POSITIONALS)}"
            )
        if self.block not in BLOCKS:
            raise ValueError(f"model.block={self.block!r} is not one of {', '.join(BLOCKS)}")
        if self.block == "llama" and self.positional != "rope":
            raise ValueError(
                "model.block='llama' is Llama's, whose positions are rotary: set "
                "model.positional=rope, or model.block=gpt2 for learned positions"
            )
        if self.positional == "rope" and self.head_dim % 2:
            raise ValueError(
                "model.positional='rope' rotates pairs of channels: the head size "
                f"d_model/n_head={self.head_dim} must be even"
            )

    def _derive_from_depth(self) -> None:
        """Sets the shape ``depth`` implies. A key given beside it with another value is
        refused; a key left at the class default counts as not given."""
        if self.depth < 1:
            raise ValueError(f"model.depth={self.depth} must be at least 1 (or null)")
        aspect = ASPECT_RATIO if self.aspect_ratio is None else self.aspect_ratio
        if aspect < 1:
            raise ValueError(f"model.aspect_ratio={aspect} must be at least 1")
        derived = {"n_layer": self.depth, "n_head": self.depth, "d_model": aspect * self.depth}
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        said = ", ".join(f"{k}={v}" for k, v in derived.items())
        for key, value in derived.items():
            given = getattr(self, key)
            if given not in (value, defaults[key]):
                raise ValueError(
                    f"model.{key}={given} conflicts with model.depth={self.depth}, which sets "
                    f"{said}: drop model.{key}, or set model.depth=null"
                )
            setattr(self, key, value)

    def with_vocab(self, vocab_size: int) -> "GPTConfig":
        """This shape with the tokenizer's vocabulary size (checked again)."""
        return dataclasses.replace(self, vocab_size=vocab_size)


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # [batch, time, vocab]
    loss: torch.Tensor | None  # mean next-token cross entropy; None without targets


class KVCache:
    """Keys and values of every layer for the positions seen so far, preallocated to max_len."""

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.n_head, max_len, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.max_len = max_len
        # Positions filled; the model advances it once every layer has appended a chunk.
        self.pos = 0

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores a chunk's keys and values at ``pos``; returns those of the whole prefix."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions, not {end}")
        self.keys[layer][:, :, self.pos : end] = k
        self.values[layer][:, :, self.pos : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def rotary(cfg: GPTConfig, start: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation's two tables [length, head_dim] in fp32 for positions start..start+length-1:
    cos of the angles position x frequency, twice, and their sin, negated then as is; see
    ``apply_rotary``."""
    freqs = cfg.rope_theta ** -(
        torch.arange(0, cfg.head_dim, 2, device=device, dtype=torch.float32) / cfg.head_dim
    )
    positions = torch.arange(start, start + length, device=device, dtype=torch.float32)
    angles = torch.outer(positions, freqs)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates channel i with channel i + head_dim/2 of x [..., head_dim] by the tables of
    ``rotary`` (broadcast to x): (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), in fp32. As
    x * cos + (x2, x1) * sin: four kernels, where the two halves apart took seven."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((x2, x1), dim=-1) * sin).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.proj.into_residual = True

    def forward(self, x, rope=None, kv_cache: KVCache | None = None):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.cfg.n_head, self.cfg.head_dim)
        qk, v = qkv[:, :, :2], qkv[:, :, 2]
        if rope is not None:
            qk = apply_rotary(qk, *rope)  # queries and keys together
        q, k = (t.transpose(1, 2) for t in qk.unbind(2))
        v = v.transpose(1, 2)
        prefix = 0 if kv_cache is None else kv_cache.pos
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer, k, v)
        mask = None
        if prefix and T > 1:
            # A chunk after a cached prefix: query i (at position prefix + i) sees keys
            # 0..prefix + i. is_causal would align the triangle to the top left, hiding most of
            # the prefix. A single new token sees every key: no mask at all.
            mask = torch.ones(T, prefix + T, dtype=torch.bool, device=x.device)
            mask = mask.tril(diagonal=prefix)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.cfg.dropout if self.training else 0.0,
            is_causal=not prefix,
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """GPT-2's, down(gelu(up x)), or Llama's SwiGLU (Shazeer 2020), down(silu(gate x) * up x)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate = (
            nn.Linear(cfg.d_model, cfg.mlp_width, bias=cfg.bias) if cfg.block == "llama" else None
        )
        self.up = nn.Linear(cfg.d_model, cfg.mlp_width, bias=cfg.bias)
        self.down = nn.Linear(cfg.mlp_width, cfg.d_model, bias=cfg.bias)
        self.down.into_residual = True

    def forward(self, x):
        if self.gate is None:
            return self.down(F.gelu(self.up(x)))
        return self.down(F.silu(self.gate(x)) * self.up(x))


class RMSNorm(nn.Module):
    """x / rms(x) times a gain, no mean subtracted and no bias (Zhang & Sennrich 2019); in fp32
    then cast back before the gain, exactly as Llama computes it."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + NORM_EPS)
        return self.weight * h.type_as(x)


def norm(cfg: GPTConfig) -> nn.Module:
    """The block's normalisation over d_model: LayerNorm for GPT-2's, RMSNorm for Llama's."""
    if cfg.block == "llama":
        return RMSNorm(cfg.d_model)
    return nn.LayerNorm(cfg.d_model, eps=NORM_EPS, bias=cfg.bias)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, kv_cache: KVCache | None = None):
        x = x + self.drop(self.attn(self.ln_1(x), rope, kv_cache))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.vocab_size < 1:
            raise ValueError(
                f"model.vocab_size={config.vocab_size} must be set from the tokenizer first"
            )
        self.config = config
        # Recompute each block's activations in the backward pass: less memory, about a third
        # more compute. A run-time switch (trainer.activation_checkpointing), not the shape.
        self.activation_checkpointing = False
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = None
        if config.positional == "learned":
            self.wpe = nn.Embedding(config.max_seq_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # cos and sin of positions 0..max_seq_len-1 per device, made at the first forward there
        # (see _rotary). An attribute, not a buffer: bf16 training would cast a buffer down,
        # and checkpoints would hold it.
        self.rotary_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        # Through apply(), one module at a time: under deepspeed.zero.Init that is where each
        # module's partitioned parameters are gathered for writing.
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if getattr(module, "into_residual", False):
            # GPT-2: projections that add to the residual stream shrink with depth, so the
            # stream's variance does not grow with the number of blocks adding to it.
            std /= math.sqrt(2 * self.config.n_layer)
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> ModelOutput:
        """Next-token logits at every position of ``idx`` [batch, time], and the mean loss
        against ``targets`` when given (targets of -100 are ignored). With a ``kv_cache``,
        ``idx`` continues the sequence the cache holds, and is appended to it."""
        x = self._residual_stream(idx, self.config.n_layer, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += idx.size(1)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            # In fp32: a bf16 log-softmax over the vocabulary loses the small probabilities.
            loss = F.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100
            )
        return ModelOutput(logits, loss)

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    def hidden_states(self, idx: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """The hidden states [batch, time, d_model] of ``idx`` after block ``layer``, indexed
        like a Python list (-1 is the last block; None means the last). The last block's pass
        through the final norm: they are exactly what ``lm_head`` turns into the logits.
        Earlier blocks' are the raw residual stream."""
        n_layer = self.config.n_layer
        layer = n_layer - 1 if layer is None else layer
        if not -n_layer <= layer < n_layer:
            raise ValueError(
                f"layer={layer}: the model has {n_layer} blocks, so 0..{n_layer - 1} "
                f"(or -{n_layer}..-1 from the top)"
            )
        depth = layer % n_layer + 1
        x = self._residual_stream(idx, depth)
        return self.ln_f(x) if depth == n_layer else x

    def _residual_stream(
        self, idx: torch.Tensor, depth: int, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        """The residual stream of ``idx`` after the first ``depth`` blocks: token (and learned
        position) embeddings, then the blocks. A cache is appended to but not advanced."""
        T = idx.size(1)
        start = 0 if kv_cache is None else kv_cache.pos
        if start + T > self.config.max_seq_len:
            raise ValueError(f"{start + T} positions > model.max_seq_len={self.config.max_seq_len}")
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        else:
            rope = self._rotary(start, T, idx.device)
        x = self.drop(x)
        for block in itertools.islice(self.blocks, depth):
            # Not with a cache: recomputing a block in the backward pass would append twice.
            if self.activation_checkpointing and self.training and kv_cache is None:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, kv_cache)
        return x

    def _rotary(self, start: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables of positions start..start+length-1, shaped [length, 1, 1,
        head_dim] to broadcast over queries and keys [batch, time, 2, head, head_dim], sliced
        from this device's. A compiled graph computes them itself instead (fused into its
        kernels): filling the cache from inside it would make torch.compile recompile at the
        next call."""
        if torch.compiler.is_compiling():
            tables, first = rotary(self.config, start, length, device), 0
        else:
            tables, first = self.rotary_tables.get(device), start
            if tables is None:
                # Plain tensors even when the first call is generation's (inference mode): a
                # table made there could not be saved for a later backward.
                with torch.inference_mode(False), torch.no_grad():
                    tables = rotary(self.config, 0, self.config.max_seq_len, device)
                self.rotary_tables[device] = tables
        return tuple(t[first : first + length].view(length, 1, 1, -1) for t in tables)

    def new_kv_cache(
        self, batch_size: int, max_len: int | None = None, device=None, dtype=None
    ) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_len`` (default
        max_seq_len) positions, on the model's device and in its dtype unless told."""
        weight = self.wte.weight
        return KVCache(
            self.config,
            batch_size,
            max_len or self.config.max_seq_len,
            device or weight.device,
            dtype or weight.dtype,
        )

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on matrices and embeddings (dim >= 2), none on biases and norm
        gains. ``parameters()`` yields a tied weight once."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
