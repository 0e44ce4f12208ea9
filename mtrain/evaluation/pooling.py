"""Pieces as vectors: the mean hidden state of each piece, read in windows, its pitch-class
histogram as a baseline, rows scaled to unit length (less their mean, for comparing), and the
id of the model that made them."""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import symusic
import torch

from mtrain.exported.writing import WEIGHTS
from mtrain.model import GPT

# The descriptions of a piece compared, with their report titles: the checkpoint's embedding
# and its baselines (the mean-pooled language model when the checkpoint is a contrastive
# model made from one, the same shape randomly initialised, and two symbolic ones).
FEATURES = {
    "model": "model embedding",
    "language_model": "mean-pooled language model",
    "random": "random init, same shape",
    "handcrafted": "handcrafted (music21 + MusPy metrics)",
    "pitch_classes": "pitch-class histogram",
}


@dataclass
class EmbeddedSplit:
    """Pieces (of one split, or all) and their descriptions, by FEATURES name."""

    split: str
    rows: list[dict]  # id, name, labels, tokens: the lines of pieces.jsonl
    features: dict[str, np.ndarray]  # [pieces, dim]; embeddings unit length (not centred)
    seconds: float  # embedding the checkpoint's vectors

    @property
    def ids(self) -> list[str]:
        return [row["id"] for row in self.rows]

    def labels(self, key: str) -> list[str | None]:
        return [row["labels"].get(key) for row in self.rows]

    def label_kinds(self) -> list[str]:
        return sorted({kind for row in self.rows for kind in row["labels"]})


def embedding_model_id(model_dir: Path, layer: int | None) -> str:
    """What made an index's vectors: the weights' sha256 and the pooling. A query embedded by
    anything else is not comparable with them."""
    digest = hashlib.sha256()
    with open(model_dir / WEIGHTS, "rb") as weights:
        for block in iter(lambda: weights.read(1 << 24), b""):
            digest.update(block)
    return f"{digest.hexdigest()[:16]}/mean/{'last' if layer is None else layer}"


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


def pitch_class_histogram(score: symusic.Score) -> np.ndarray:
    """The share of the piece's non-drum notes on each of the 12 pitch classes, read from the
    decoded score, so that it means the same for every tokenization."""
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
