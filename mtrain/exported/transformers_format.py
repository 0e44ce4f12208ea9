"""The model in a Hugging Face ``transformers`` layout that computes exactly what it does, saved
with ``save_pretrained`` and checked by loading it back.

Each model has one: learned positions and GPT-2's block are ``GPT2LMHeadModel``; rotary
positions and GPT-2's block ``GPTNeoXForCausalLM`` (rotary over every channel, rotating channel
i with i + head_dim/2 as mtrain does, one residual after the other); rotary positions and
Llama's block ``LlamaForCausalLM``. Biases a model trained without are zeros where the layout
insists on them; an untied output layer is copied, a tied one tied again.
"""

from collections.abc import Callable
from pathlib import Path

import torch

from data_pipeline.tokenizer import MusicTokenizer
from mtrain.exported.logits_agreement import check_hf_logits
from mtrain.model import GPT, NORM_EPS, GPTConfig

# Every tokenizer artifact's special ids: generate() then pads and stops as mtrain's does.
SPECIAL_IDS = {
    "pad_token_id": MusicTokenizer.pad_id,
    "bos_token_id": MusicTokenizer.bos_id,
    "eos_token_id": MusicTokenizer.eos_id,
}


def hf_architecture(cfg: GPTConfig) -> str:
    """The ``transformers`` class the model maps onto."""
    if cfg.positional == "learned":
        return "GPT2LMHeadModel"
    return "LlamaForCausalLM" if cfg.block == "llama" else "GPTNeoXForCausalLM"


def _weights(model: GPT) -> tuple[dict[str, torch.Tensor], Callable[[str, int], torch.Tensor]]:
    """The model's state dict, and a bias by prefix that is zeros where it has none."""
    sd = model.state_dict()

    def bias_of(prefix: str, size: int) -> torch.Tensor:
        return sd.get(f"{prefix}.bias", torch.zeros(size))

    return sd, bias_of


def _output_layer(model: GPT, key: str) -> dict[str, torch.Tensor]:
    """An untied output layer under ``key``; a tied one is tied again by ``tie_weights``."""
    return {} if model.config.tie_embeddings else {key: model.lm_head.weight.detach()}


def gpt2(model: GPT):
    """GPT-2: a fused qkv, GELU; its Conv1D layers store weights as [in, out], hence the
    transposes."""
    from transformers import GPT2Config

    cfg, (sd, bias_of) = model.config, _weights(model)
    d = cfg.d_model
    out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["wpe.weight"],
           "transformer.ln_f.weight": sd["ln_f.weight"],
           "transformer.ln_f.bias": bias_of("ln_f", d)}  # fmt: skip
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}", f"transformer.h.{i}"
        for ln in ("ln_1", "ln_2"):
            out[f"{dst}.{ln}.weight"] = sd[f"{src}.{ln}.weight"]
            out[f"{dst}.{ln}.bias"] = bias_of(f"{src}.{ln}", d)
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                             ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):  # fmt: skip
            weight = sd[f"{src}.{ours}.weight"]
            out[f"{dst}.{theirs}.weight"] = weight.t().contiguous()
            out[f"{dst}.{theirs}.bias"] = bias_of(f"{src}.{ours}", weight.shape[0])
    config = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=d,
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.mlp_width,
        activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=NORM_EPS, tie_word_embeddings=cfg.tie_embeddings, **SPECIAL_IDS,
    )  # fmt: skip
    return config, out | _output_layer(model, "lm_head.weight")


def neox_by_head(t: torch.Tensor, cfg: GPTConfig) -> torch.Tensor:
    """Rows of mtrain's fused qkv ([all q, all k, all v]) in GPT-NeoX's order ([q_h, k_h, v_h]
    for each head h)."""
    return t.unflatten(0, (3, cfg.n_head, cfg.head_dim)).transpose(0, 1).flatten(0, 2)


def gpt_neox(model: GPT):
    """GPT-NeoX: a fused qkv laid out head by head ([q_h, k_h, v_h] for each head h, where
    mtrain has [all q, all k, all v]), GELU, biases in every MLP and LayerNorm."""
    from transformers import GPTNeoXConfig

    cfg, (sd, bias_of) = model.config, _weights(model)
    d = cfg.d_model

    def by_head(t: torch.Tensor) -> torch.Tensor:
        return neox_by_head(t, cfg)

    out = {"gpt_neox.embed_in.weight": sd["wte.weight"],
           "gpt_neox.final_layer_norm.weight": sd["ln_f.weight"],
           "gpt_neox.final_layer_norm.bias": bias_of("ln_f", d)}  # fmt: skip
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}", f"gpt_neox.layers.{i}"
        for ours, theirs in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
            out[f"{dst}.{theirs}.weight"] = sd[f"{src}.{ours}.weight"]
            out[f"{dst}.{theirs}.bias"] = bias_of(f"{src}.{ours}", d)
        out[f"{dst}.attention.query_key_value.weight"] = by_head(sd[f"{src}.attn.qkv.weight"])
        out[f"{dst}.attention.dense.weight"] = sd[f"{src}.attn.proj.weight"]
        if cfg.bias:  # attention_bias follows the model; the MLP's biases are always there
            out[f"{dst}.attention.query_key_value.bias"] = by_head(sd[f"{src}.attn.qkv.bias"])
            out[f"{dst}.attention.dense.bias"] = sd[f"{src}.attn.proj.bias"]
        for ours, theirs in (("mlp.up", "mlp.dense_h_to_4h"), ("mlp.down", "mlp.dense_4h_to_h")):
            weight = sd[f"{src}.{ours}.weight"]
            out[f"{dst}.{theirs}.weight"] = weight
            out[f"{dst}.{theirs}.bias"] = bias_of(f"{src}.{ours}", weight.shape[0])
    config = GPTNeoXConfig(
        vocab_size=cfg.vocab_size, hidden_size=d, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, intermediate_size=cfg.mlp_width, hidden_act="gelu",
        max_position_embeddings=cfg.max_seq_len, layer_norm_eps=NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                         "partial_rotary_factor": 1.0},
        use_parallel_residual=False, attention_bias=cfg.bias,
        tie_word_embeddings=cfg.tie_embeddings, hidden_dropout=0.0, attention_dropout=0.0,
        **SPECIAL_IDS,
    )  # fmt: skip
    return config, out | _output_layer(model, "lm_head.weight")


def llama(model: GPT):
    """Llama: separate q, k and v projections (rows of mtrain's fused one), SwiGLU, RMSNorm."""
    from transformers import LlamaConfig

    cfg, (sd, _) = model.config, _weights(model)
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["ln_f.weight"]}
    names = {"ln_1.weight": "input_layernorm.weight",
             "ln_2.weight": "post_attention_layernorm.weight",
             **{f"attn.proj.{p}": f"self_attn.o_proj.{p}" for p in ("weight", "bias")},
             **{f"mlp.{m}.{p}": f"mlp.{m}_proj.{p}"
                for m in ("gate", "up", "down") for p in ("weight", "bias")}}  # fmt: skip
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}", f"model.layers.{i}"
        for ours, theirs in names.items():
            if f"{src}.{ours}" in sd:
                out[f"{dst}.{theirs}"] = sd[f"{src}.{ours}"]
        for part in ("weight", "bias"):
            if f"{src}.attn.qkv.{part}" in sd:
                q, k, v = sd[f"{src}.attn.qkv.{part}"].chunk(3)
                for name, t in (("q", q), ("k", k), ("v", v)):
                    out[f"{dst}.self_attn.{name}_proj.{part}"] = t
    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_width,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=cfg.bias, mlp_bias=cfg.bias, tie_word_embeddings=cfg.tie_embeddings,
        attention_dropout=0.0, **SPECIAL_IDS,
    )  # fmt: skip
    return config, out | _output_layer(model, "lm_head.weight")


LAYOUTS = {"GPT2LMHeadModel": gpt2, "GPTNeoXForCausalLM": gpt_neox, "LlamaForCausalLM": llama}


def to_hf(model: GPT):
    """The ``transformers`` model (eval mode, fp32) holding ``model``'s weights."""
    import transformers

    name = hf_architecture(model.config)
    config, state = LAYOUTS[name](model)
    hf = getattr(transformers, name)(config)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    # A tied output layer is the only weight the layouts leave out of the state dict.
    tied = {"lm_head.weight"} if model.config.tie_embeddings else set()
    if unexpected or set(missing) != tied:
        raise RuntimeError(f"{name} mapping: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.eval()


def save_hf(
    model: GPT, output: Path, inputs: torch.Tensor, tolerance: float | None = None
) -> float:
    """Saves ``model`` as its ``transformers`` class to ``output``, loads it back with
    ``from_pretrained`` and returns how far its logits on ``inputs`` [batch, time] are from the
    model's own; refused (RuntimeError) beyond ``tolerance`` (``check_hf_logits``)."""
    from transformers import AutoModelForCausalLM

    to_hf(model).save_pretrained(str(output))
    loaded = AutoModelForCausalLM.from_pretrained(str(output)).eval()
    return check_hf_logits(
        model,
        loaded,
        inputs,
        what=f"{output} ({type(loaded).__name__})",
        reference="the model's own on the probe batch",
        cause="the mapping onto transformers is wrong for this model shape, or this "
        "transformers version computes otherwise",
        tolerance=tolerance,
    )
