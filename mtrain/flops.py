"""Parameter counts, training FLOPs per token, and device peaks for MFU.

FLOPs per token follow the PaLM paper (appendix B): 6N for the matrix multiplies of the forward
and backward pass, N the non-embedding parameters (an embedding lookup is no matmul; a tied
output projection is, and is counted through the vocabulary term below), plus 12·L·H·Q·T for
attention over a context of T tokens (L layers, H heads of size Q).
"""

from mtrain.model import GPTConfig

# Dense bf16 tensor-core peaks in FLOP/s (never the 2:4-sparsity figures vendors headline).
# Matched against torch.cuda.get_device_name(); the first pattern found wins, so the more
# specific names come first.
PEAK_BF16_FLOPS: dict[str, float] = {
    "GH200": 989e12,
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
    "V100": 125e12,  # no bf16: its fp16 tensor-core peak
    "MI300X": 1307e12,
    "MI250X": 383e12,
}


def param_count(cfg: GPTConfig, include_embeddings: bool = True) -> int:
    """Exactly what ``GPT(cfg)`` holds, a tied weight once."""
    d, f, L = cfg.d_model, cfg.hidden, cfg.n_layer
    bias = 1 if cfg.bias else 0
    norm = d * (1 + bias)
    attention = d * 3 * d + 3 * d * bias + d * d + d * bias
    mlp = d * f + f * bias + f * d + d * bias
    body = L * (2 * norm + attention + mlp) + norm
    if not include_embeddings:
        return body + (0 if cfg.tie_embeddings else cfg.vocab_size * d)
    embeddings = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    if cfg.positional == "learned":
        embeddings += cfg.max_seq_len * d
    return body + embeddings


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token: 6N + 12·L·H·Q·T, with N the
    non-embedding parameters plus the output projection onto the vocabulary."""
    n = param_count(cfg, include_embeddings=False)
    if cfg.tie_embeddings:
        n += cfg.vocab_size * cfg.d_model  # the tied lm_head is still a matmul per token
    return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of one device, None where unknown (or a CPU)."""
    for pattern, peak in PEAK_BF16_FLOPS.items():
        if pattern.lower() in device_name.lower():
            return peak
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak_total: float | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak of all devices."""
    if not peak_total:
        return None
    return tokens_per_s * flops_per_token / peak_total
