"""The GPT and its FLOPs arithmetic: shapes, causality, the KV cache, both blocks, rotary tables,
parameter counts, MFU."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from support.apps import REPO

from mtrain import model as model_module
from mtrain.generation.few_rows import FewRowLinear
from mtrain.model import GPT, GPTConfig
from mtrain.training import flops

VOCAB = 97
MODEL_CONFS = REPO / "conf" / "model"
# GPT-2 small exactly: learned positions, biases, its 50257-token vocabulary.
GPT2_SMALL = GPTConfig(
    vocab_size=50257,
    n_layer=12,
    n_head=12,
    d_model=768,
    max_seq_len=1024,
    bias=True,
    positional="learned",
)
# Llama 2 7B exactly: 6,738,415,616 parameters as published (untied, hidden 11008).
LLAMA2_7B = GPTConfig(
    vocab_size=32000,
    n_layer=32,
    n_head=32,
    d_model=4096,
    d_ff=11008,
    max_seq_len=4096,
    block="llama",
    tie_embeddings=False,
)
# Every (positional, block) a model may have.
ARCHITECTURES = [("rope", "gpt2"), ("learned", "gpt2"), ("rope", "llama")]


def tiny(**overrides) -> GPTConfig:
    shape = dict(vocab_size=VOCAB, n_layer=2, n_head=2, d_model=32, max_seq_len=64)
    return GPTConfig(**(shape | overrides))


def count(model: GPT, non_embedding: bool = False) -> int:
    """Parameters of a model, a tied weight once; ``non_embedding`` leaves out the lookup
    tables wte and wpe (Kaplan et al.'s N)."""
    total = sum(p.numel() for p in model.parameters())
    if non_embedding:
        total -= sum(t.weight.numel() for t in (model.wte, model.wpe) if t is not None)
    return total


def build(cfg: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg)


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_shape_and_loss_at_init_is_uniform_guessing():
    model = build(tiny())
    idx = tokens(3, 20)
    logits, loss = model(idx)
    assert logits.shape == (3, 20, VOCAB) and loss is None
    # Small initial weights mean near-uniform predictions: cross entropy ~ ln(vocab).
    _, loss = model(idx, targets=tokens(3, 20, seed=2))
    assert loss.ndim == 0 and abs(loss.item() - math.log(VOCAB)) < 0.1


def test_targets_of_minus_100_are_left_out_of_the_mean():
    model = build(tiny())
    idx, targets = tokens(2, 16), tokens(2, 16, seed=2)
    masked = targets.clone()
    masked[:, 8:] = -100
    logits, loss = model(idx, targets=masked)
    expected = F.cross_entropy(logits[:, :8].reshape(-1, VOCAB), targets[:, :8].reshape(-1))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(("positional", "block"), ARCHITECTURES)
def test_a_future_token_does_not_change_earlier_logits(positional, block):
    model = build(tiny(positional=positional, block=block)).eval()
    idx = tokens(2, 24)
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % VOCAB
    before, after = model(idx).logits, model(changed).logits
    torch.testing.assert_close(before[:, :12], after[:, :12], rtol=0, atol=0)
    assert not torch.allclose(before[:, 12:], after[:, 12:])


@pytest.mark.parametrize(("positional", "block"), ARCHITECTURES)
def test_kv_cache_decoding_matches_a_full_forward(positional, block):
    model = build(tiny(positional=positional, block=block)).eval()
    idx = tokens(2, 40)
    with torch.no_grad():
        full = model(idx).logits
        cache = model.new_kv_cache(batch_size=2, max_len=40)
        # A prompt, a chunk continuing it, then one token at a time, as generation goes.
        pieces = [idx[:, :13], idx[:, 13:20], *idx[:, 20:].split(1, dim=1)]
        incremental = torch.cat([model(piece, kv_cache=cache).logits for piece in pieces], dim=1)
    assert cache.pos == 40
    torch.testing.assert_close(incremental, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("positional", "block"), ARCHITECTURES)
def test_hidden_states_of_the_last_block_are_what_lm_head_reads(positional, block):
    model = build(tiny(positional=positional, block=block)).eval()
    idx = tokens(2, 20)
    with torch.no_grad():
        logits = model.lm_head(model.hidden_states(idx))
        torch.testing.assert_close(logits, model(idx).logits, rtol=0, atol=0)
        assert model.hidden_states(idx, layer=0).shape == (2, 20, 32)


def test_rotary_tables_are_made_once_per_device_in_fp32_as_the_per_call_formula(monkeypatch):
    made, rotary = [], model_module.rotary
    monkeypatch.setattr(model_module, "rotary", lambda *args: made.append(args) or rotary(*args))
    cfg = tiny(rope_theta=500.0)
    model = build(cfg).eval().to(torch.bfloat16)  # bf16 weights: the tables stay fp32
    with torch.no_grad():
        model(tokens(2, 20))
        cache = model.new_kv_cache(batch_size=1)
        for piece in tokens(1, 9).split(3, dim=1):
            model(piece, kv_cache=cache)
    assert len(made) == 1 and made[0][1:3] == (0, cfg.max_seq_len)
    cos, sin = model.rotary_tables[torch.device("cpu")]
    assert cos.dtype == sin.dtype == torch.float32
    assert not any("rotary" in key for key in model.state_dict())
    # The angles as they were computed at every call before the tables, for positions 5..11.
    freqs = cfg.rope_theta ** -(torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
    angles = torch.outer(torch.arange(5, 12).float(), freqs)
    torch.testing.assert_close(cos[5:12], angles.cos().repeat(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(
        sin[5:12], torch.cat((-angles.sin(), angles.sin()), 1), rtol=0, atol=0
    )


def test_kv_cache_and_context_limits_are_errors():
    model = build(tiny()).eval()
    cache = model.new_kv_cache(batch_size=1, max_len=8)
    with torch.no_grad():
        model(tokens(1, 6), kv_cache=cache)
        with pytest.raises(ValueError, match="KV cache holds 8"):
            model(tokens(1, 3), kv_cache=cache)
        with pytest.raises(ValueError, match="max_seq_len=64"):
            model(tokens(1, 65))


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"model\.vocab_size"):
        GPT(replace(tiny(), vocab_size=0))
    with pytest.raises(ValueError, match=r"model\.positional='alibi'"):
        GPT(tiny(positional="alibi"))
    with pytest.raises(ValueError, match=r"model\.n_head=3"):
        GPT(tiny(n_head=3))
    with pytest.raises(ValueError, match=r"model\.block='mamba'"):
        GPT(tiny(block="mamba"))
    with pytest.raises(ValueError, match=r"model\.block='llama'.*model\.positional=rope"):
        GPT(tiny(block="llama", positional="learned"))


def test_swiglu_hidden_width_holds_about_the_gelu_mlps_parameters():
    # 8/3 d_model rounded up to a multiple of 64: exactly 8/3 d for GPT-2 small's width.
    assert tiny(d_model=768, n_head=12, block="llama").mlp_width == 2048
    assert tiny(d_model=512, n_head=8, block="llama").mlp_width == 1408
    assert tiny(d_model=512, n_head=8).mlp_width == 2048
    assert tiny(block="llama", d_ff=100).mlp_width == 100


def test_input_and_output_embeddings_share_one_tensor():
    tied = build(tiny())
    assert tied.lm_head.weight is tied.wte.weight
    assert tied.lm_head.weight.data_ptr() == tied.wte.weight.data_ptr()
    untied = build(tiny(tie_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()


def test_residual_projections_start_smaller_with_depth():
    cfg = tiny(n_layer=8, d_model=128)
    model = build(cfg)
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
    for name, p in model.named_parameters():
        into_residual = name.endswith(("attn.proj.weight", "mlp.down.weight"))
        expected = residual_std if into_residual else cfg.init_std
        if p.dim() >= 2:
            assert p.std().item() == pytest.approx(expected, rel=0.1), name


def test_weight_decay_only_on_matrices_and_each_tensor_once():
    model = build(tiny(bias=True, positional="learned"))
    decay, no_decay = model.param_groups(weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    grouped = decay["params"] + no_decay["params"]
    assert len({id(p) for p in grouped}) == len(grouped)
    assert sum(p.numel() for p in grouped) == count(model)
    assert any(p is model.wte.weight for p in decay["params"])
    assert any(p is model.wpe.weight for p in decay["params"])


@pytest.mark.parametrize(
    "cfg",
    [
        tiny(),
        tiny(bias=True),
        tiny(positional="learned", tie_embeddings=False),
        tiny(bias=True, positional="learned", d_ff=48, n_layer=3),
        tiny(block="llama"),
        tiny(block="llama", bias=True, tie_embeddings=False, d_ff=48),
    ],
    ids=["tied-rope", "bias", "learned-untied", "bias-learned-d_ff", "llama", "llama-bias"],
)
def test_analytic_param_count_is_the_model_count(cfg):
    model = build(cfg)
    assert flops.param_count(cfg) == sum(p.numel() for p in model.parameters())
    with torch.device("meta"):
        on_meta = GPT(cfg)
    assert flops.param_count(cfg) == count(model) == count(on_meta)
    assert flops.param_count(cfg, include_embeddings=False) == count(model, non_embedding=True)


def test_param_count_of_the_gpt2_small_shape_built_on_meta():
    # 124,439,808 parameters as published; on the meta device they cost no memory.
    with torch.device("meta"):
        model = GPT(GPT2_SMALL)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    assert flops.param_count(GPT2_SMALL) == 124_439_808
    embeddings = (50257 + 1024) * 768
    assert count(model, non_embedding=True) == 124_439_808 - embeddings
    assert flops.param_count(GPT2_SMALL, include_embeddings=False) == 124_439_808 - embeddings


def test_param_count_of_the_llama2_7b_shape_built_on_meta():
    with torch.device("meta"):
        model = GPT(LLAMA2_7B)
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616
    assert flops.param_count(LLAMA2_7B) == 6_738_415_616
    # SwiGLU's three matrices per block count in N: 6N + attention, N without the lookup table.
    n = 6_738_415_616 - 32000 * 4096
    assert flops.flops_per_token(LLAMA2_7B, 4096) == 6 * n + 12 * 32 * 4096 * 4096


def test_flops_per_token():
    cfg = GPT2_SMALL
    # nanoGPT's estimate for GPT-2 small: N = 123.65M (the tied output projection counted, the
    # position table not), plus attention over 1024 tokens.
    assert flops.flops_per_token(cfg, 1024) == 6 * 123_653_376 + 12 * 12 * 12 * 64 * 1024
    # The attention term grows linearly with the context.
    step = flops.flops_per_token(cfg, 2048) - flops.flops_per_token(cfg, 1024)
    assert step == 12 * cfg.n_layer * cfg.d_model * 1024
    # Untying adds a table lookup, not FLOPs.
    untied = replace(cfg, tie_embeddings=False)
    assert flops.flops_per_token(untied, 1024) == flops.flops_per_token(cfg, 1024)


# Device names as torch.cuda.get_device_name() gives them, and the table entry each must get.
DEVICE_ENTRIES = {
    "NVIDIA H100 80GB HBM3": "H100",
    "NVIDIA H100 PCIe": "H100 PCIe",
    "NVIDIA H100 NVL": "H100 NVL",
    "NVIDIA H200": "H200",
    "NVIDIA H200 NVL": "H200 NVL",
    "NVIDIA GH200 480GB": "GH200",
    "NVIDIA A100-SXM4-80GB": "A100",
    "NVIDIA A100 80GB PCIe": "A100",
    "NVIDIA L4": "L4",
    "NVIDIA L40S": "L40S",
    "NVIDIA GeForce RTX 4090": "RTX 4090",
    "Tesla V100-SXM2-32GB": "V100",
    "AMD Instinct MI300X": "MI300X",
}


@pytest.mark.parametrize(("device_name", "entry"), DEVICE_ENTRIES.items())
def test_a_device_gets_the_peak_of_the_longest_name_it_contains(device_name, entry):
    # "H100 PCIe" over "H100", and no name inside a longer word ("L4" in "L40S", "H200" in
    # "GH200"), whatever the case.
    assert flops.peak_flops(device_name) == flops.PEAK_BF16_FLOPS[entry]
    assert flops.peak_flops(device_name.lower()) == flops.PEAK_BF16_FLOPS[entry]


def test_every_entry_of_the_table_is_reachable_by_its_name():
    for entry, peak in flops.PEAK_BF16_FLOPS.items():
        assert flops.peak_flops(f"NVIDIA {entry}") == peak, entry


@pytest.mark.parametrize("device_name", ["cpu", "NVIDIA GeForce RTX 3090", "Intel Gaudi", ""])
def test_an_unknown_device_has_no_peak_and_so_no_mfu(device_name):
    assert flops.peak_flops(device_name) is None
    assert flops.mfu(1e6, 1e9, flops.peak_flops(device_name)) is None


def test_the_peaks_are_dense_never_the_sparsity_headline():
    # The spec sheets headline the 2:4-sparsity figure, twice the dense one MFU is measured on.
    sparsity_headlines = {
        "NVIDIA H100 80GB HBM3": 1979e12,
        "NVIDIA H100 PCIe": 1513e12,
        "NVIDIA H100 NVL": 1671e12,
        "NVIDIA H200": 1979e12,
        "NVIDIA H200 NVL": 1671e12,
        "NVIDIA A100-SXM4-80GB": 624e12,
    }
    for device_name, sparse in sparsity_headlines.items():
        assert flops.peak_flops(device_name) == pytest.approx(sparse / 2, rel=1e-3)


def test_mfu():
    # 8 H100s at 40% MFU on a model of 1 GFLOP per token run 8 * 989e12 * 0.4 / 1e9 tokens/s.
    tokens_per_s = 8 * 989e12 * 0.4 / 1e9
    assert flops.mfu(tokens_per_s, 1e9, 8 * 989e12) == pytest.approx(0.4)
    assert flops.mfu(tokens_per_s, 1e9, None) is None


def test_activation_checkpointing_recomputes_blocks_with_the_same_gradients():
    def gradients(checkpointing: bool) -> tuple[dict, int]:
        model = build(tiny(dropout=0.1)).train()
        model.activation_checkpointing = checkpointing
        calls = []
        model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
        torch.manual_seed(3)  # the same dropout masks, which the recomputation must replay
        model(tokens(2, 32), targets=tokens(2, 32, seed=2)).loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}, len(calls)

    plain, plain_calls = gradients(False)
    recomputed, recomputed_calls = gradients(True)
    assert (plain_calls, recomputed_calls) == (1, 2)
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=0, atol=1e-6, msg=name)


def test_a_tiny_model_overfits_one_batch():
    model = build(tiny()).train()
    optimizer = torch.optim.AdamW(model.param_groups(0.0), lr=3e-3)
    idx, targets = tokens(4, 32), tokens(4, 32, seed=2)
    losses = []
    for _ in range(50):
        loss = model(idx, targets=targets).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    "name", ["tiny", "small_20m", "gpt_125m", "gpt_350m", "gpt_760m", "gpt_1b"]
)
def test_model_configs_are_gpt_configs(name):
    raw = OmegaConf.load(MODEL_CONFS / f"{name}.yaml")
    assert "vocab_size" not in raw  # it comes from the tokenizer
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(GPTConfig), raw))
    cfg = cfg.with_vocab(VOCAB)  # the shape is checked again, now with a vocabulary
    with torch.device("meta"):
        model = GPT(cfg)
    assert count(model) == flops.param_count(cfg)


@pytest.mark.parametrize("rows", [1, 5, 16, 40])
@pytest.mark.parametrize("bias", [True, False])
def test_decoding_linear_equals_nn_linear(rows, bias):
    """The few-row CPU path of FewRowLinear (taken without gradients) computes what nn.Linear
    does, for a lone row, a handful and more than FEW_ROWS."""
    torch.manual_seed(rows)
    layer = FewRowLinear(48, 80, bias=bias)
    x = torch.randn(rows, 1, 48)
    with torch.no_grad():
        fast = layer(x)
    assert fast.shape == (rows, 1, 80)
    torch.testing.assert_close(fast, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
