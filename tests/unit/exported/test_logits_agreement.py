"""The rule both export checks hold logits to: the largest difference within a tolerance."""

import math

import torch

from mtrain.exported.logits_agreement import logits_gap


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
