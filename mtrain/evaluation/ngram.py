"""A floor every model must beat: an n-gram model of the token documents, interpolated
modified Kneser-Ney (Chen & Goodman), counted with numpy over the train split.

It reads the documents the model reads (``tokenizer.document``: BOS, label tokens, music,
EOS) and scores the same targets (every token after BOS), so its bits per note stand beside
a model's. N-grams are rows of token ids, counted by sorting (``np.unique``): no Python loop
over tokens, so a corpus of tens of millions of tokens counts in seconds.
"""

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from data_pipeline.reader import StoredPiece
from data_pipeline.tokenizer import MusicTokenizer
from mtrain.evaluation.likelihood import Tally, token_types

log = logging.getLogger(__name__)

# Discounts are fitted from counts of counts 1..4 (Chen & Goodman's estimate).
_MAX_DISCOUNTED = 3


def _rows(ids: np.ndarray, width: int) -> np.ndarray:
    """Every run of ``width`` consecutive ids, one per row."""
    return np.lib.stride_tricks.sliding_window_view(ids, width)


def _keys(rows: np.ndarray) -> np.ndarray:
    """Rows of ids as one comparable value each (their bytes), for sorting and searching:
    n-grams of any vocabulary size, without packing them into one integer."""
    rows = np.ascontiguousarray(rows, dtype=">u4")  # big-endian: byte order is numeric order
    return rows.view(np.dtype((np.void, rows.shape[1] * 4))).ravel()


def _unkey(keys: np.ndarray, width: int) -> np.ndarray:
    return keys.view(">u4").reshape(-1, width).astype(np.int64)


@dataclass
class _Order:
    """Counts of one order k: every k-gram seen (sorted keys) with its count, and per context
    (the first k-1 ids) the total count and how many words follow it once, twice, 3+ times."""

    grams: np.ndarray
    counts: np.ndarray
    contexts: np.ndarray
    context_totals: np.ndarray
    context_types: np.ndarray  # (contexts, 3): N1, N2, N3+ of the words after each context
    discounts: np.ndarray  # D for counts 1, 2, 3+ (index 0 unused: a zero count takes none)


def _count(grams: np.ndarray, counts: np.ndarray, width: int) -> _Order:
    # Unigrams share one (empty) context.
    contexts_of = _keys(grams[:, : width - 1]) if width > 1 else np.zeros(len(grams), "V4")
    contexts, where = np.unique(contexts_of, return_inverse=True)
    totals = np.bincount(where, weights=counts, minlength=len(contexts))
    types = np.stack(
        [
            np.bincount(where, weights=(counts == 1), minlength=len(contexts)),
            np.bincount(where, weights=(counts == 2), minlength=len(contexts)),
            np.bincount(where, weights=(counts >= 3), minlength=len(contexts)),
        ],
        axis=1,
    )
    return _Order(_keys(grams), counts, contexts, totals, types, _discounts(counts))


def _discounts(counts: np.ndarray) -> np.ndarray:
    n = np.bincount(np.minimum(counts, 4).astype(np.int64), minlength=5)[1:].astype(float)
    if n[0] == 0 or n[1] == 0:
        return np.array([0.0, 0.5, 0.5, 0.5])  # too few counts to fit: a plain discount
    y = n[0] / (n[0] + 2 * n[1])
    d = [1 - 2 * y * n[1] / n[0]]
    d += [k + 1 - (k + 2) * y * n[k + 1] / n[k] if n[k] else k for k in (1, 2)]
    # Each discount stays in (0, its count]: a sparse corpus can push the estimate outside.
    return np.array([0.0, *(min(max(dk, 1e-3), k + 1) for k, dk in enumerate(d))])


class KneserNey:
    """An n-gram model of token ids ``0..vocab_size-1``, trained on whole documents."""

    def __init__(self, order: int, vocab_size: int, pad_id: int):
        if order < 1:
            raise ValueError(f"order={order} must be at least 1")
        self.order, self.vocab_size, self.pad_id = order, vocab_size, pad_id
        self.orders: list[_Order] = []

    def fit(self, documents: Iterable[np.ndarray]) -> "KneserNey":
        """Counts every n-gram that ends at a target (a token after a document's first)."""
        n = self.order
        targets = [self._windows(doc) for doc in documents if len(doc) > 1]
        if not targets:
            raise ValueError("no documents to count")
        keys, counts = np.unique(_keys(np.concatenate(targets)), return_counts=True)
        grams = _unkey(keys, n)
        self.orders = [_count(grams, counts, n)]
        # Lower orders count continuations: in how many distinct contexts a k-gram follows,
        # not how often (Kneser-Ney's point: a token frequent after one context only is
        # a poor guess after a context never seen).
        for width in range(n - 1, 0, -1):
            keys, counts = np.unique(_keys(grams[:, 1:]), return_counts=True)
            grams = _unkey(keys, width)
            self.orders.insert(0, _count(grams, counts, width))
        return self

    def _windows(self, doc: np.ndarray) -> np.ndarray:
        """One row per target of ``doc`` (its tokens after the first): the order-1 ids before
        it, then it; order-2 pads go before the document's own first token (its BOS), so
        every target has a full history, as a model's first target has the BOS."""
        pads = np.full(max(self.order - 2, 0), self.pad_id, dtype=">u4")
        padded = np.concatenate([pads, np.asarray(doc, dtype=">u4")])
        return _rows(padded, self.order)[-(len(doc) - 1) :]

    def log_probs(self, doc: np.ndarray) -> np.ndarray:
        """Natural log-probability of each token of ``doc`` after its first."""
        return np.log(self._probabilities(self._windows(doc)))

    def distribution(self, context: np.ndarray) -> np.ndarray:
        """P(w | context) for every id w, where ``context`` is a document so far (its BOS
        first): the next token's distribution, as ``log_probs`` scores it."""
        history = self._windows(np.append(np.asarray(context, np.int64), 0))[-1, :-1]
        rows = np.column_stack(
            [
                np.broadcast_to(history, (self.vocab_size, self.order - 1)),
                np.arange(self.vocab_size),
            ]
        )
        return self._probabilities(rows)

    def _probabilities(self, rows: np.ndarray) -> np.ndarray:
        """P(last id | the ids before it) for each row of ``order`` ids, lowest order up."""
        p = np.full(len(rows), 1.0 / self.vocab_size)
        for width in range(1, self.order + 1):
            level = self.orders[width - 1]
            grams = rows[:, self.order - width :]
            count = _lookup(level.grams, _keys(grams), level.counts)
            if width > 1:
                at = _find(level.contexts, _keys(grams[:, :-1]))
            else:
                at = np.zeros(len(rows), np.int64)
            seen = at >= 0
            total = np.where(seen, level.context_totals[np.maximum(at, 0)], 0.0)
            types = level.context_types[np.maximum(at, 0)]
            backoff = types @ level.discounts[1:]
            discount = level.discounts[np.minimum(count, _MAX_DISCOUNTED).astype(np.int64)]
            safe = np.where(seen, total, 1.0)
            mixed = (np.maximum(count - discount, 0.0) + backoff * p) / safe
            p = np.where(seen & (total > 0), mixed, p)
        return p


def _find(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Index of each key in ``sorted_keys``, or -1."""
    if len(sorted_keys) == 0:
        return np.full(len(keys), -1, np.int64)
    at = np.searchsorted(sorted_keys, keys)
    at = np.minimum(at, len(sorted_keys) - 1)
    return np.where(sorted_keys[at] == keys, at, -1)


def _lookup(sorted_keys: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    at = _find(sorted_keys, keys)
    return np.where(at >= 0, values[np.maximum(at, 0)], 0).astype(float)


def evaluate_floor(
    tokenizer: MusicTokenizer,
    train: Iterable[StoredPiece],
    pieces: Iterable[StoredPiece],
    order: int,
) -> dict:
    """Fits an order-``order`` Kneser-Ney model on the ``train`` pieces' documents and scores
    ``pieces`` as ``likelihood.evaluate_pieces`` scores a model: the same report (bits per
    token, note and second; by token type and by collection), plus the n-gram model's size."""
    start = time.monotonic()
    model = KneserNey(order, tokenizer.vocab_size, tokenizer.pad_id)
    model.fit(tokenizer.document(piece.labels, piece.tokens) for piece in train)
    fitted = time.monotonic() - start
    log.info("counted a %d-gram model in %.1f s", order, fitted)
    kinds = np.array(token_types(tokenizer))
    tally = Tally()
    for piece in pieces:
        collection = tally.add_piece(piece)
        doc = tokenizer.document(piece.labels, piece.tokens)
        nats = -model.log_probs(doc)
        for where in (tally, collection):
            where.add_tokens(float(nats.sum()), len(nats))
        tally.add_types(nats, kinds[doc[1:]])
    report = tally.report()
    report["model"] = {
        "kind": f"interpolated modified Kneser-Ney {order}-gram",
        "order": order,
        "train_tokens": int(model.orders[-1].counts.sum()),
        "ngrams": [len(level.grams) for level in model.orders],
        "fit_seconds": round(fitted, 2),
    }
    return report
