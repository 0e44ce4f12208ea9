"""The embedding rows a LoRA run trains: the base's loss per token on the run's data, summed
as the model reads each piece, and the tokens it predicts worse than a uniform guess."""

import math

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline.config import TokenizerConfig
from data_pipeline.reader import StoredPiece
from data_pipeline.tokenizer import MusicTokenizer, build_base_tokenizer
from mtrain.model import GPT, GPTConfig
from mtrain.training.token_rows import (
    MIN_COUNT,
    describe,
    new_label_rows,
    surprise_by_token,
    unlearned_tokens,
)


def test_the_loss_per_token_sums_what_the_model_reads():
    tok = MusicTokenizer(build_base_tokenizer(TokenizerConfig()), ["collection=mine"])
    torch.manual_seed(0)
    model = GPT(GPTConfig(tok.vocab_size, n_layer=1, n_head=2, d_model=32, max_seq_len=64))
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, tok.infill_offset, 40)
    piece = StoredPiece("k", tokens, {"labels": {"collection": "mine"}})
    nats, counts = surprise_by_token(model, tok, [piece])
    doc = torch.from_numpy(tok.document({"collection": "mine"}, tokens))
    with torch.no_grad():
        nll = F.cross_entropy(model.eval()(doc[None, :-1]).logits[0], doc[1:], reduction="none")
    expected = np.zeros(tok.vocab_size)
    np.add.at(expected, doc[1:].numpy(), nll.double().numpy())
    np.testing.assert_allclose(nats, expected, rtol=1e-5)
    assert counts.sum() == len(doc) - 1 and counts[tok.eos_id] == 1


def test_unlearned_tokens_are_predicted_worse_than_a_uniform_guess_often_enough():
    vocab = 100  # a uniform guess: log(100) = 4.61 nats
    nats, counts = np.zeros(vocab), np.zeros(vocab, dtype=np.int64)
    counts[[5, 6, 7, 8]] = [MIN_COUNT, MIN_COUNT - 1, 50, 50]
    nats[5], nats[6] = 5.0 * MIN_COUNT, 5.0 * (MIN_COUNT - 1)  # worse than uniform
    nats[7], nats[8] = 4.5 * 50, 0.1 * 50  # better: learned, if poorly
    assert unlearned_tokens(nats, counts, vocab) == [5]
    assert math.log(vocab) < 5.0
    assert new_label_rows(90, 93) == [90, 91, 92]


def test_rows_are_named_for_the_log():
    tok = MusicTokenizer(build_base_tokenizer(TokenizerConfig()), ["collection=mine"])
    program = tok.base.vocab["Program_53"]
    assert describe(tok, [program, tok.label_offset]) == "Program_53, collection=mine"
