"""The contrastive objective in one process: InfoNCE's bounds, a tiny model learning to pair two
views of a piece, and the language model it was made from kept intact."""

import math

import numpy as np
import pytest
import torch

from data_pipeline.errors import ConfigError
from mtrain.data.views import PAD
from mtrain.model import GPT, GPTConfig
from mtrain.training.config import TrainConfig, TrainerConfig
from mtrain.training.contrastive import (
    PROJECTION,
    TEMPERATURE,
    ContrastiveConfig,
    ContrastiveGPT,
    info_nce,
    language_model_weights,
    mean_pooled,
    objective_parameter,
    twin_first_rate,
)

SHAPE = GPTConfig(vocab_size=40, n_layer=2, n_head=2, d_model=32, max_seq_len=32)


def test_info_nce_is_near_zero_for_twins_alone_and_log_candidates_for_noise():
    twins = torch.eye(8).repeat_interleave(2, dim=0)  # rows 2i, 2i+1 equal, others orthogonal
    assert info_nce(twins, torch.tensor([math.log(100)])).item() < 1e-3
    noise = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    assert info_nce(noise, torch.zeros(1)).item() == pytest.approx(math.log(511), rel=0.01)
    assert twin_first_rate(twins) == 1.0
    assert twin_first_rate(noise) < 0.05


def test_padding_does_not_change_a_views_pooled_state():
    model = GPT(SHAPE).eval()
    view = torch.randint(0, 40, (1, 10), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([view, torch.full((1, 6), PAD)], dim=1)
    torch.testing.assert_close(mean_pooled(model, padded, None), mean_pooled(model, view, None))


def views_of(corpus: np.ndarray, seed: int) -> torch.Tensor:
    """Two fresh views of each piece of ``corpus`` (each piece a set of its own 6 tokens): two
    independent draws of 16 of its tokens, 20% of them replaced by any token; the views share
    no position, only what the piece is made of."""
    rng = np.random.default_rng(seed)
    views = []
    for own in corpus:
        for _ in range(2):
            view = rng.choice(own, 16)
            noise = rng.random(16) < 0.2
            view[noise] = rng.integers(1, 40, noise.sum())
            views.append(view)
    return torch.from_numpy(np.stack(views))


def test_a_tiny_model_learns_to_pair_two_views_of_each_piece_of_a_small_corpus():
    rng = np.random.default_rng(0)
    corpus = np.stack([rng.choice(np.arange(1, 40), 6, replace=False) for _ in range(16)])
    torch.manual_seed(0)
    model = ContrastiveGPT(SHAPE, ContrastiveConfig(layer=None))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    unseen = views_of(corpus, seed=999)  # views never trained on
    with torch.no_grad():
        before = twin_first_rate(mean_pooled(model.eval(), unseen, None))
    losses = []
    model.train()
    for step in range(60):
        loss = model(views_of(corpus, seed=step)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        after = twin_first_rate(mean_pooled(model.eval(), unseen, None))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    assert after >= 0.85 and after > before + 0.2, (before, after)
    # The temperature learned too, and the exported weights are a plain GPT's.
    assert getattr(model, TEMPERATURE).item() != pytest.approx(math.log(20))
    gpt = GPT(SHAPE)
    gpt.load_state_dict(language_model_weights(model.state_dict()), strict=True)
    idx = unseen[:2]
    torch.testing.assert_close(gpt(idx).logits, model(idx, targets=idx).logits)


def test_the_contrastive_objective_starts_from_an_exported_model_with_negatives():
    with pytest.raises(ConfigError, match="init_from"):
        TrainConfig(objective="contrastive")
    with pytest.raises(ConfigError, match=r"trainer\.micro_batch_size"):
        TrainConfig(
            objective="contrastive", init_from="x", trainer=TrainerConfig(micro_batch_size=1)
        )
    with pytest.raises(ConfigError, match="objective"):
        TrainConfig(objective="simclr")


def test_a_projection_head_trains_with_the_loss_and_stays_out_of_the_exported_weights():
    rng = np.random.default_rng(0)
    corpus = np.stack([rng.choice(np.arange(1, 40), 6, replace=False) for _ in range(16)])
    torch.manual_seed(0)
    model = ContrastiveGPT(SHAPE, ContrastiveConfig(projection=16))
    head = [name for name, _ in model.named_parameters() if name.startswith(PROJECTION + ".")]
    assert len(head) == 4  # two Linear layers' weights and biases
    start = {name: p.detach().clone() for name, p in model.named_parameters() if name in head}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    unseen = views_of(corpus, seed=999)
    losses = []
    for step in range(60):
        out = model(views_of(corpus, seed=step))
        assert out.logits.shape == (32, SHAPE.d_model)  # the pooled state, not the head's output
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    assert all(not torch.equal(start[n], p) for n, p in model.named_parameters() if n in start)
    with torch.no_grad():
        assert twin_first_rate(mean_pooled(model.eval(), unseen, None)) >= 0.5
    weights = language_model_weights(model.state_dict())
    assert not any(objective_parameter(name) for name in weights)
    GPT(SHAPE).load_state_dict(weights, strict=True)
    with pytest.raises(ConfigError, match="projection"):
        ContrastiveConfig(projection=-1)
