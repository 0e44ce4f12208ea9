"""The model in Hugging Face ``transformers``' GPT-2 layout, where it maps exactly.

It maps when positions are learned (GPT-2 has no rotary embeddings): pre-LayerNorm blocks, a
fused qkv projection, a GELU MLP and tied embeddings are GPT-2's own; a model trained without
biases gets zero biases. GPT-2's Conv1D layers store weights as [in, out], hence the transposes.
"""

from pathlib import Path

import torch

from mtrain.model import GPT


def maps_to_gpt2(model: GPT) -> str | None:
    """None when the model maps onto GPT-2, else the reason it does not."""
    cfg = model.config
    if cfg.positional != "learned":
        return f"model.positional={cfg.positional} (GPT-2 has learned positions only)"
    if not cfg.tie_embeddings:
        return "model.tie_embeddings=false (GPT-2 ties its output layer to the embeddings)"
    return None


def gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    sd = model.state_dict()

    def bias_of(prefix: str, size: int) -> torch.Tensor:
        return sd.get(f"{prefix}.bias", torch.zeros(size))

    d = model.config.d_model
    out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["wpe.weight"],
           "transformer.ln_f.weight": sd["ln_f.weight"],
           "transformer.ln_f.bias": bias_of("ln_f", d)}  # fmt: skip
    for i in range(model.config.n_layer):
        src, dst = f"blocks.{i}", f"transformer.h.{i}"
        for ln in ("ln_1", "ln_2"):
            out[f"{dst}.{ln}.weight"] = sd[f"{src}.{ln}.weight"]
            out[f"{dst}.{ln}.bias"] = bias_of(f"{src}.{ln}", d)
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                             ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):  # fmt: skip
            weight = sd[f"{src}.{ours}.weight"]
            out[f"{dst}.{theirs}.weight"] = weight.t().contiguous()
            out[f"{dst}.{theirs}.bias"] = bias_of(f"{src}.{ours}", weight.shape[0])
    return out


def to_gpt2(model: GPT):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.config
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.hidden,
        activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=1e-5, tie_word_embeddings=True,
    ))  # fmt: skip
    missing, unexpected = hf.load_state_dict(gpt2_state_dict(model), strict=False)
    # The tied lm_head is the only weight GPT-2 does not read from the state dict.
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    return hf.eval()


def save_gpt2(model: GPT, output: Path) -> None:
    to_gpt2(model).save_pretrained(str(output))
