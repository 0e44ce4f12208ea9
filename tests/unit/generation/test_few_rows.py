"""Decoding swaps the few-row CPU path into a model's blocks without touching its weights."""

import torch
from torch import nn

from mtrain.generation.decoding import decode
from mtrain.generation.few_rows import FewRowLinear
from mtrain.generation.sampling import SamplingConfig
from mtrain.model import GPT, GPTConfig


def test_decoding_swaps_in_few_row_linears_and_keeps_the_state_dict():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, n_layer=2, n_head=2, d_model=32, max_seq_len=32)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = model(torch.tensor([[1, 2, 3]])).logits
    decode(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=4))
    swapped = [m for m in model.modules() if isinstance(m, FewRowLinear)]
    assert len(swapped) == 2 * 4  # qkv, proj, up, down in each block
    assert type(model.lm_head) is nn.Linear
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([[1, 2, 3]])).logits, plain)
