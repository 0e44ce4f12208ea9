"""Composing and infilling draw their batches alike: batch b with seed + b, whatever draws."""

import dataclasses

import pytest
import torch
from support.midi_factory import piece

from data_pipeline.config import TokenizerConfig
from data_pipeline.tokenizer import MusicTokenizer, build_base_tokenizer
from mtrain.generation.compose import compose
from mtrain.generation.infill import BarRange, infill, infill_request
from mtrain.generation.sampling import SamplingConfig, seeded_batches
from mtrain.model import GPT, GPTConfig

SAMPLING = SamplingConfig(max_new_tokens=12, seed=7)


@pytest.fixture(scope="module")
def tok() -> MusicTokenizer:
    return MusicTokenizer(build_base_tokenizer(TokenizerConfig()), [])


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, max_seq_len=512)
    return GPT(cfg).eval()


def test_batches_cover_the_count_each_with_its_own_seed():
    batches = seeded_batches(5, 2, SAMPLING)
    assert [rows for rows, _ in batches] == [2, 2, 1]
    assert [s.seed for _, s in batches] == [7, 8, 9]
    assert all(dataclasses.replace(s, seed=7) == SAMPLING for _, s in batches)
    with pytest.raises(ValueError, match="num_samples=0"):
        seeded_batches(0, 2, SAMPLING)


def test_the_third_piece_of_batches_of_two_is_the_first_drawn_with_the_next_seed(tok, model):
    """So both ways of drawing reproduce a piece from its seed and batch size."""
    later = dataclasses.replace(SAMPLING, seed=SAMPLING.seed + 1)
    composed = compose(model, tok, [tok.bos_id], 3, SAMPLING, batch_size=2)
    assert composed[2].ids == compose(model, tok, [tok.bos_id], 1, later, batch_size=1)[0].ids
    request = infill_request(tok, piece(3, bars=8), BarRange(4, 5), {}, 512)
    filled = infill(model, tok, request, 3, SAMPLING, batch_size=2)
    assert filled[2].ids == infill(model, tok, request, 1, later, batch_size=1)[0].ids
