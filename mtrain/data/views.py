"""Two views of one piece for the contrastive objective: each an independently augmented copy
(transposition, velocity and tempo shifts) cut to its own random window."""

from typing import NamedTuple

import numpy as np
import torch

from data_pipeline.tokenizer import MusicTokenizer
from mtrain.data.augmentation import Augmenter

# Fills a view shorter than view_tokens (a short piece); the model pools over the rest only.
PAD = -1


class ViewSpec(NamedTuple):
    """What the contrastive objective asks of its views (its config decides)."""

    view_tokens: int
    velocity_shift: int
    tempo_shift: int


class ViewPairs:
    """[2, view_tokens] int64 for a piece's base ids: its two views, PAD on the right."""

    def __init__(self, tokenizer: MusicTokenizer, augment: Augmenter, view_tokens: int):
        self.tokenizer, self.augment, self.view_tokens = tokenizer, augment, view_tokens

    def __call__(self, tokens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        pair = np.full((2, self.view_tokens), PAD, dtype=np.int64)
        for row in pair:
            # Without label tokens: the views must agree on the music, not on its labels.
            doc = self.tokenizer.document({}, self.augment(tokens, rng), end=False)
            start = rng.integers(0, max(len(doc) - self.view_tokens, 0) + 1)
            window = doc[start : start + self.view_tokens]
            row[: len(window)] = window
        return pair


def view_batch(pairs: np.ndarray) -> torch.Tensor:
    """A loader batch of pairs [pieces, 2, view_tokens] as the views [2 * pieces, view_tokens]
    the objective reads, twins in adjacent rows."""
    return torch.from_numpy(pairs.reshape(-1, pairs.shape[-1]))
