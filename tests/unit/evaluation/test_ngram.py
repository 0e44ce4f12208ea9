"""The n-gram floor: interpolated modified Kneser-Ney, checked on a corpus small enough to
work out by hand, and as a distribution (it sums to one after any context)."""

import numpy as np
import pytest

from mtrain.evaluation.ngram import KneserNey

PAD, BOS, EOS, A, B = range(5)


def test_a_bigram_model_of_a_tiny_corpus_matches_the_hand_computation():
    # Bigrams (BOS A) (A B) (B EOS) (BOS B) (B A) (A EOS): each seen once, so no count of two
    # to fit discounts from: D = 0.5. Continuation counts: A, B and EOS each follow 2 tokens.
    model = KneserNey(2, vocab_size=5, pad_id=PAD).fit(
        [np.array([BOS, A, B, EOS]), np.array([BOS, B, A, EOS])]
    )
    unigram = {A: (2 - 0.5 + 1.5 / 5) / 6, PAD: (1.5 / 5) / 6}  # 0.3 and 0.05
    after_a = model.distribution(np.array([BOS, A]))
    # P(B | A) = (1 - 0.5) / 1 + 2 * 0.5 / 1 * P1(B): A was followed by B and by EOS once each.
    assert after_a[B] == pytest.approx((1 - 0.5 + 2 * 0.5 * unigram[A]) / 2)
    assert after_a[PAD] == pytest.approx(2 * 0.5 * unigram[PAD] / 2)
    # A context never seen (EOS is never followed) backs off to the unigram distribution.
    assert model.distribution(np.array([BOS, A, EOS]))[A] == pytest.approx(unigram[A])


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_probabilities_sum_to_one_after_any_context(order):
    rng = np.random.default_rng(order)
    docs = [
        np.concatenate([[BOS], rng.integers(3, 12, rng.integers(3, 40)), [EOS]]) for _ in range(50)
    ]
    model = KneserNey(order, vocab_size=16, pad_id=PAD).fit(docs)
    for context in ([BOS], [BOS, 3, 4, 5], [BOS, 15, 14, 13, 12], docs[0][:7]):
        p = model.distribution(np.array(context))
        assert p.sum() == pytest.approx(1.0, abs=1e-9) and (p > 0).all()
    # log_probs scores each token as the distribution after its prefix gives it.
    doc = docs[1]
    expected = [np.log(model.distribution(doc[:i])[doc[i]]) for i in range(1, len(doc))]
    assert np.allclose(model.log_probs(doc), expected)


def test_a_longer_context_predicts_a_repeated_pattern_better():
    # After 3 comes 4 or 5: which one, only the token before the 3 tells.
    docs = [np.array([BOS, *([3, 4, 3, 5] * 20), EOS]) for _ in range(5)]
    test = np.array([BOS, *([3, 4, 3, 5] * 5), EOS])
    nats = [-KneserNey(n, 8, PAD).fit(docs).log_probs(test).sum() for n in (1, 2, 5)]
    assert nats[0] > nats[1] > nats[2]
