"""Which rows of the token embedding a LoRA run trains beside its adapters
(``finetune.embedding_rows``): the labels the base lacks, and under ``unlearned`` the tokens
the base has not learned. A token is unlearned when, on the run's own training data, the base
predicts it worse than a uniform guess over the vocabulary would: its output row (tied to its
embedding row) gives it almost no probability in any context, and adapters on the blocks,
which never touch that row, recover it only in part. An instrument the base's corpus hardly
held is the common case (a folder of Palestrina's voices, program 53, which 3 of the base's
12,303 training pieces hold)."""

import logging
import math
from collections.abc import Iterable, Iterator
from itertools import islice

import numpy as np
import torch

from data_pipeline.reader import StoredPiece
from data_pipeline.tokenizer import MusicTokenizer
from mtrain.evaluation.likelihood import window_nats, windows
from mtrain.model import GPT, GPTConfig

log = logging.getLogger(__name__)
# Windows of the training split the base reads to find its unlearned tokens: enough for a
# folder of a few hundred pieces whole, bounded for a large one.
SCORED_WINDOWS = 512
# A token must be this frequent among the scored targets to earn a row: rarer ones move the
# loss little and a row trained on a few examples learns them by heart.
MIN_COUNT = 8


@torch.no_grad()
def surprise_by_token(
    model: GPT, tokenizer: MusicTokenizer, pieces: Iterable[StoredPiece], batch_size: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """(nats summed, times scored) per target id: how ``model`` predicts each token of up to
    ``SCORED_WINDOWS`` windows of ``pieces``, each piece read as training reads it."""
    vocab = model.config.vocab_size
    nats, counts = np.zeros(vocab), np.zeros(vocab, dtype=np.int64)
    for batch in _batches(_windows(tokenizer, pieces, model.config.max_seq_len), batch_size):
        nll, targets, scored = window_nats(model, batch)
        np.add.at(nats, targets[scored].numpy(), nll[scored].double().numpy())
        np.add.at(counts, targets[scored].numpy(), 1)
    return nats, counts


def _windows(tokenizer: MusicTokenizer, pieces: Iterable[StoredPiece], length: int) -> Iterator:
    documents = (tokenizer.document(piece.labels, piece.tokens) for piece in pieces)
    return islice((w for doc in documents for w in windows(doc, length)), SCORED_WINDOWS)


def _batches(items: Iterator, size: int) -> Iterator[list]:
    while batch := list(islice(items, size)):
        yield batch


def unlearned_tokens(nats: np.ndarray, counts: np.ndarray, vocab_size: int) -> list[int]:
    """Ids scored at least ``MIN_COUNT`` times whose mean loss is above a uniform guess's,
    log(vocab_size) nats."""
    mean = nats / np.maximum(counts, 1)
    chosen = (counts >= MIN_COUNT) & (mean > math.log(vocab_size))
    return [int(i) for i in np.flatnonzero(chosen)]


def new_label_rows(parent_vocab_size: int, vocab_size: int) -> list[int]:
    """The rows a run's tokenizer adds to its base's: the labels the base lacks."""
    return list(range(parent_vocab_size, vocab_size))


def describe(tokenizer: MusicTokenizer, ids: Iterable[int]) -> str:
    """Token names for a log line: the base vocabulary's, a label's, or the id."""
    names = {} if tokenizer.learned else {i: name for name, i in tokenizer.base.vocab.items()}
    labels = {tokenizer.label_offset + i: name for i, name in enumerate(tokenizer.labels)}
    return ", ".join(names.get(i) or labels.get(i) or f"id {i}" for i in ids)


def choose_rows(
    mode,
    init_from: str,
    shape: GPTConfig,
    tokenizer: MusicTokenizer,
    pieces: Iterable[StoredPiece],
    device: torch.device,
) -> list[int]:
    """The rows ``finetune.embedding_rows=mode`` trains (``new`` or ``unlearned``) over the
    base ``init_from``. For ``unlearned`` a plain GPT of the run's ``shape`` on ``device``,
    filled with the base's weights (grown for the new labels), scores ``pieces``."""
    from mtrain.exported.loading import exported_tokenizer, load_weights
    from mtrain.training.adapters import EmbeddingRows
    from mtrain.training.memory_plan import NoInitialValues

    parent = exported_tokenizer(init_from)
    rows = new_label_rows(parent.vocab_size, tokenizer.vocab_size)
    if mode != EmbeddingRows.unlearned:
        return rows
    with NoInitialValues():  # the base's weights fill it
        model = GPT(shape).to(device)
    load_weights(model, init_from, tokenizer)
    nats, counts = surprise_by_token(model, tokenizer, pieces)
    unlearned = unlearned_tokens(nats, counts, model.config.vocab_size)
    log.info(
        "finetune.embedding_rows=unlearned: %d of %d token kinds in %d scored targets of the "
        "training data are predicted worse than a uniform guess (%.2f nats) by the base: %s%s",
        len(unlearned),
        int((counts > 0).sum()),
        int(counts.sum()),
        math.log(model.config.vocab_size),
        describe(tokenizer, unlearned[:12]) or "none",
        " ..." if len(unlearned) > 12 else "",
    )
    return sorted(set(rows) | set(unlearned))
