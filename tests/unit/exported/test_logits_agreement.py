"""The rule the export's checks hold logits to: the largest difference within a tolerance."""

import math
from types import SimpleNamespace

import pytest
import torch

from mtrain.exported.logits_agreement import check_hf_logits, logits_gap


def test_logits_agree_within_the_tolerance_and_not_past_it_nor_with_nan_or_another_shape():
    reference = torch.zeros(2, 3, 5)
    close = reference + torch.tensor(1e-5)
    assert logits_gap(close, reference, 1e-4).agrees
    assert not logits_gap(reference + 1e-3, reference, 1e-4).agrees
    nan = reference.clone()
    nan[0, 0, 0] = math.nan
    assert not logits_gap(nan, reference, 1e-4).agrees
    other_shape = logits_gap(torch.zeros(2, 4, 5), reference, 1e-4)
    assert other_shape.max_abs_diff == math.inf and not other_shape.agrees


class Logits(torch.nn.Module):
    """A model whose logits are its inputs one-hot, plus ``offset``: as transformers' models
    and mtrain's, a forward whose output has ``.logits``."""

    def __init__(self, offset: float = 0.0):
        super().__init__()
        self.offset = offset

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=torch.nn.functional.one_hot(input_ids, 5) + self.offset)


def test_a_transformers_copy_is_held_to_the_models_logits_in_eval_mode_and_named_when_off():
    inputs = torch.tensor([[0, 1, 2, 3]])
    model = Logits().train()
    assert check_hf_logits(model, Logits(1e-5), inputs, "copy", "the model's", "why") < 1e-4
    assert model.training  # its mode given back
    with pytest.raises(RuntimeError, match=r"^copy gives logits 1\.00e-02 away from the model's"):
        check_hf_logits(model, Logits(1e-2), inputs, "copy", "the model's", "why")
    with pytest.raises(RuntimeError, match=r"\(tolerance 1\.00e-01\): why$"):
        check_hf_logits(model, Logits(1.0), inputs, "copy", "the model's", "why", tolerance=0.1)
