"""Every model in transformers: GPT-2, GPT-NeoX or Llama, loaded back with ``from_pretrained``,
computes mtrain's logits and decodes mtrain's greedy tokens; a wrong mapping is refused."""

import pytest
import torch

from data_pipeline.tokenizer import MusicTokenizer
from mtrain.exported import transformers_format
from mtrain.exported.transformers_format import hf_architecture, save_hf
from mtrain.generation.decoding import decode
from mtrain.generation.sampling import SamplingConfig
from mtrain.model import GPT, GPTConfig

VOCAB = 97
GREEDY_TOKENS = 24
# Shapes by name: each architecture plain, and with biases and an untied output layer.
SHAPES = {
    "gpt2": dict(positional="learned"),
    "gpt2-bias-untied": dict(positional="learned", bias=True, tie_embeddings=False),
    "neox": dict(),
    "neox-bias-untied": dict(bias=True, tie_embeddings=False),
    "llama": dict(block="llama"),
    "llama-bias-untied": dict(block="llama", bias=True, tie_embeddings=False),
}
ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "neox": "GPTNeoXForCausalLM",
    "llama": "LlamaForCausalLM",
}


def trained_like(**overrides) -> GPT:
    """A tiny model whose every weight matters: gains, shifts and biases away from their
    initial ones and the rotary base off its default, so a weight left out or misplaced by a
    mapping shows in the logits; weights large enough that greedy decoding meets no near-ties."""
    cfg = dict(vocab_size=VOCAB, n_layer=2, n_head=4, d_model=32, max_seq_len=64, init_std=0.1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**(cfg | {"rope_theta": 500.0} | overrides)))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def probe(batch: int = 2, length: int = 48) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("shape", SHAPES)
def test_the_exported_model_computes_and_decodes_what_mtrain_does(shape, tmp_path):
    from transformers import AutoModelForCausalLM

    model = trained_like(**SHAPES[shape])
    architecture = ARCHITECTURES[shape.split("-")[0]]
    assert hf_architecture(model.config) == architecture
    diff = save_hf(model, tmp_path, probe(), tolerance=1e-4)
    assert diff <= 1e-4

    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == architecture
    inputs = probe(3, 64)  # the whole context, other rows than the export checked
    with torch.no_grad():
        torch.testing.assert_close(hf(inputs).logits, model(inputs).logits, rtol=0, atol=1e-4)

    # A prompt of varied tokens, and EOS banned on both sides so both decode GREEDY_TOKENS.
    prompt = [MusicTokenizer.bos_id, *probe(1, 15)[0].tolist()]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=GREEDY_TOKENS)
    ours = decode(model, [prompt], greedy, banned_ids=[MusicTokenizer.eos_id])[0].tokens
    with torch.no_grad():
        theirs = hf.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=GREEDY_TOKENS,
            min_new_tokens=GREEDY_TOKENS,
        )
    assert theirs[0, len(prompt) :].tolist() == ours


def test_a_mapping_that_misplaces_a_weight_is_refused(tmp_path, monkeypatch):
    """The NeoX layout with mtrain's qkv order instead of NeoX's head-by-head one: loadable,
    but other logits; the export says so instead of writing a wrong model silently."""
    model = trained_like()
    layout = transformers_format.LAYOUTS["GPTNeoXForCausalLM"]

    def unpermuted(m: GPT):
        config, state = layout(m)
        for i in range(m.config.n_layer):
            key = f"gpt_neox.layers.{i}.attention.query_key_value.weight"
            state[key] = m.state_dict()[f"blocks.{i}.attn.qkv.weight"]
        return config, state

    monkeypatch.setitem(transformers_format.LAYOUTS, "GPTNeoXForCausalLM", unpermuted)
    with pytest.raises(RuntimeError, match=r"GPTNeoXForCausalLM.*away from the model's own"):
        save_hf(model, tmp_path, probe(), tolerance=1e-4)
