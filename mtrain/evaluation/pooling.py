"""Pieces as vectors: the mean hidden state of each piece, read in windows, and its pitch-class
histogram as a baseline, with rows scaled to unit length (less their mean, for comparing)."""

from dataclasses import dataclass

import numpy as np
import torch

from data_pipeline.tokenizer import MusicTokenizer
from mtrain.model import GPT

# The two descriptions of a piece compared (EmbeddedSplit fields), with their report titles.
FEATURES = {"model": "model embedding", "pitch_classes": "pitch-class histogram (baseline)"}


@dataclass
class EmbeddedSplit:
    """Every piece of a split: who it is, its model embedding and its pitch-class baseline."""

    split: str
    rows: list[dict]  # id, name, labels, tokens: the lines of pieces.jsonl
    model: np.ndarray  # [pieces, d_model], mean states, unit length (not centred)
    pitch_classes: np.ndarray  # [pieces, 12], unit length
    seconds: float

    @property
    def ids(self) -> list[str]:
        return [row["id"] for row in self.rows]

    def labels(self, key: str) -> list[str | None]:
        return [row["labels"].get(key) for row in self.rows]


class MeanPooler:
    """The mean hidden state of each document added, over all its positions. A document longer
    than max_seq_len is cut into consecutive windows, each read without the one before, and
    their states pooled weighted by length; windows of many documents share a forward pass."""

    def __init__(self, model: GPT, layer: int | None, batch_size: int):
        self.model, self.layer, self.batch_size = model.eval(), layer, batch_size
        self.sums: list[np.ndarray] = []
        self.positions: list[int] = []
        self.pending: list[tuple[int, np.ndarray]] = []

    def add(self, doc: np.ndarray) -> None:
        piece = len(self.sums)
        self.sums.append(np.zeros(self.model.config.d_model))
        self.positions.append(len(doc))
        length = self.model.config.max_seq_len
        for start in range(0, len(doc), length):
            self.pending.append((piece, doc[start : start + length]))
            if len(self.pending) == self.batch_size:
                self._flush()

    @torch.no_grad()
    def _flush(self) -> None:
        # Padding on the right: causal attention keeps it out of every real position, so its
        # value does not matter and a window's states do not depend on its batch.
        inputs = torch.zeros(len(self.pending), max(len(w) for _, w in self.pending), dtype=int)
        for row, (_, window) in enumerate(self.pending):
            inputs[row, : len(window)] = torch.from_numpy(window)
        device = self.model.device
        hidden = self.model.hidden_states(inputs.to(device), self.layer).double().cpu().numpy()
        for row, (piece, window) in enumerate(self.pending):
            self.sums[piece] += hidden[row, : len(window)].sum(axis=0)
        self.pending.clear()

    def means(self) -> np.ndarray:
        """[documents, d_model]: the mean state of every document added so far."""
        if self.pending:
            self._flush()
        width = self.model.config.d_model
        sums = np.stack(self.sums) if self.sums else np.zeros((0, width))
        return (sums / np.maximum(self.positions, 1)[:, None]).astype(np.float32)


def pitch_class_histogram(tokenizer: MusicTokenizer, base_ids: np.ndarray) -> np.ndarray:
    """The share of the piece's non-drum notes on each of the 12 pitch classes, read from the
    decoded score, so that it means the same for every tokenization."""
    score = tokenizer.base_ids_to_midi(base_ids)
    pitches = [track.notes.numpy()["pitch"] for track in score.tracks if not track.is_drum]
    histogram = np.bincount(np.concatenate([*pitches, np.zeros(0, int)]) % 12, minlength=12)
    return histogram / max(histogram.sum(), 1)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (an all-zero row stays zero: similar to nothing)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def centred_unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows less their mean, then scaled to length 1. Mean pooling leaves every piece close to
    one direction that all pieces share, so raw cosines all read "alike"; less the shared part
    they span -1 to 1 and rank neighbours as well."""
    return unit_rows(vectors - vectors.mean(axis=0))
