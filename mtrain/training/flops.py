"""Parameter counts and training FLOPs per token from a model's shape, and the device peaks that
turn a measured tokens/s into MFU. Needs no torch, so it is cheap to import anywhere.
"""

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mtrain.model import GPTConfig

# Dense bf16 tensor-core peaks in FLOP/s per device, from the vendors' spec sheets: the dense
# figure, never the 2:4-sparsity one the sheets headline (twice as large). A key matches a
# whole word (or words) of torch.cuda.get_device_name(); the longest matching key wins, so
# "H100 PCIe" beats "H100", "H200 NVL" beats "H200", and "L4" does not match "L40S".
# Hopper, from NVIDIA's H100 and H200 datasheets ("BF16 Tensor Core", given with sparsity):
# SXM 1,979 TFLOPS, NVL 1,671, H100 PCIe 1,513; halved here. The NVL boards are PCIe cards
# of 350-600 W, clocked below the 700 W SXM modules.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100": 989e12,  # SXM, which names itself "NVIDIA H100 80GB HBM3"
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,  # SXM, which names itself "NVIDIA H200"
    "H200 NVL": 835e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,  # SXM and PCIe alike
    "L4": 121e12,
    "L40S": 362e12,
    "RTX 4090": 165e12,  # with fp32 accumulation, as training uses
    "V100": 125e12,  # no bf16 at all: its fp16 tensor-core peak, what a V100 run would use
    "MI250X": 383e12,
    "MI300X": 1307e12,
}


def param_count(cfg: "GPTConfig", include_embeddings: bool = True) -> int:
    """Exactly the parameters ``GPT(cfg)`` holds, a tied weight once. Without embeddings it
    leaves out the lookup tables (token and learned position embeddings), not an untied
    output projection, which is a matmul."""
    d, f, bias = cfg.d_model, cfg.mlp_width, int(cfg.bias)
    llama = cfg.block == "llama"
    # A LayerNorm has a gain and (with biases) a shift; an RMSNorm a gain only.
    norm = d + d * bias * (not llama)
    attention = (d * 3 * d + 3 * d * bias) + (d * d + d * bias)
    # SwiGLU's gate is a third matrix beside GELU's up and down.
    up_matrices = 2 if llama else 1
    mlp = up_matrices * (d * f + f * bias) + (f * d + d * bias)
    total = cfg.n_layer * (2 * norm + attention + mlp) + norm
    if not cfg.tie_embeddings:
        total += cfg.vocab_size * d  # lm_head
    if include_embeddings:
        total += cfg.vocab_size * d
        if cfg.positional == "learned":
            total += cfg.max_seq_len * d
    return total


def flops_per_token(cfg: "GPTConfig", seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token, PaLM (Chowdhery et al. 2022, appendix B):
    6N + 12·L·H·Q·T for L layers of H heads of size Q over a context of T tokens.

    N counts every weight a token is multiplied by (``matmul_params``): the non-embedding
    parameters plus the output projection onto the vocabulary, also when it is tied. A
    lookup costs no FLOPs but the projection does (2·V·d per token forward), and with a music
    vocabulary and a small model it is no rounding error. SwiGLU's gate is one more matrix in
    N; its elementwise product, like GELU, is left out as PaLM leaves nonlinearities out.
    """
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len


def matmul_params(cfg: "GPTConfig") -> int:
    """The weights a token is multiplied by: the non-embedding parameters plus the output
    projection onto the vocabulary, tied to the token embedding or not (the N of 6N)."""
    n = param_count(cfg, include_embeddings=False)
    if cfg.tie_embeddings:
        n += cfg.vocab_size * cfg.d_model
    return n


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of one device named as torch names it; None for a CPU or an unknown one."""
    matches = [
        key
        for key in PEAK_BF16_FLOPS
        if re.search(rf"\b{re.escape(key)}\b", device_name, flags=re.IGNORECASE)
    ]
    return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


def mfu(
    tokens_per_s: float, flops_per_token: float, peak_flops_total: float | None
) -> float | None:
    """Model FLOPs utilisation: the training FLOP/s achieved over the summed peak of all
    devices; None where the peak is unknown."""
    if not peak_flops_total:
        return None
    return tokens_per_s * flops_per_token / peak_flops_total
