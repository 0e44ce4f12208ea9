"""A faiss index of piece embeddings: exact inner product on unit vectors for small collections,
HNSW past ``APPROXIMATE_FROM`` pieces; extendable, and bound to the model that made it."""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np

log = logging.getLogger(__name__)

# Past this many pieces an exact search reads every vector per query: HNSW answers in
# logarithmic time instead, at a small loss of recall (bench/bench_search.py measures both).
APPROXIMATE_FROM = 100_000
# HNSW's neighbours per node, and the candidate lists of building and searching: faiss's
# usual values for ~99% recall@10 on real embeddings.
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128

INDEX_FILE, ROWS_FILE, META_FILE = "index.faiss", "pieces.jsonl", "index.json"


class EmbeddingModel(NamedTuple):
    id: str  # its weights' hash and its pooling (mtrain.evaluation.pooling.embedding_model_id)
    checkpoint: str
    layer: int | None


class WrongModel(ValueError):
    """A query embedded by one model against an index built from another's embeddings."""


def unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def new_index(dim: int, pieces: int) -> faiss.Index:
    """Exact for a collection under APPROXIMATE_FROM pieces, HNSW from there on."""
    if pieces < APPROXIMATE_FROM:
        return faiss.IndexFlatIP(dim)
    index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.hnsw.efSearch = HNSW_EF_SEARCH
    return index


@dataclass
class PieceIndex:
    """Pieces (rows of pieces.jsonl: id, name, labels) and their vectors in a faiss index.
    Vectors are scaled to unit length, less ``centre`` (the mean of the pieces first indexed,
    at unit length: mean-pooled states share one direction that would make every piece look
    alike), and scaled to unit length again, so an inner product is a cosine. A query and added
    pieces go the same way, at whatever length the pooler gives them: one file is one vector
    whether embed or search embedded it."""

    index: faiss.Index
    rows: list[dict]
    centre: np.ndarray  # [dim]
    model: str  # the embedding model's id: its weights' hash and its pooling
    checkpoint: str  # where that model was (an exported model directory), to embed queries
    layer: int | None  # the block it pools (None: the last, normed)

    @classmethod
    def build(cls, vectors: np.ndarray, rows: list[dict], model: EmbeddingModel):
        mean = unit(vectors).mean(axis=0)
        empty = new_index(vectors.shape[1], len(rows))
        index = cls(empty, [], mean, model.id, model.checkpoint, model.layer)
        index.add(vectors, rows)
        return index

    @property
    def kind(self) -> str:
        return "exact" if isinstance(self.index, faiss.IndexFlat) else "hnsw"

    def prepared(self, vectors: np.ndarray) -> np.ndarray:
        return unit(unit(vectors) - self.centre)

    def add(self, vectors: np.ndarray, rows: list[dict]) -> None:
        """Adds pieces without touching the vectors already there. A collection growing past
        APPROXIMATE_FROM moves to HNSW once, from the stored vectors (nothing re-embedded)."""
        if len(vectors) != len(rows):
            raise ValueError(f"{len(vectors)} vectors for {len(rows)} pieces")
        total = len(self.rows) + len(rows)
        if self.kind == "exact" and total >= APPROXIMATE_FROM:
            stored = self.index.reconstruct_n(0, self.index.ntotal)
            self.index = new_index(self.index.d, total)
            self.index.add(stored)
            log.info("%d pieces: the index moves from exact to HNSW", total)
        self.index.add(self.prepared(vectors))
        self.rows.extend(rows)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Cosines and row numbers [queries, k] of the nearest pieces, nearest first."""
        scores, found = self.index.search(self.prepared(vectors), min(k, len(self.rows)))
        return scores, found

    def search_stored(self, row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``search`` for a piece of the index, from its stored vector (itself ranks first)."""
        stored = self.index.reconstruct(row)[None]
        return self.index.search(stored, min(k, len(self.rows)))

    def check_model(self, model: str) -> None:
        if model != self.model:
            raise WrongModel(
                f"the index was built from model {self.model}, the query embedded by {model}: "
                "query with the model that built it, or build an index with this one (embed)"
            )

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(directory / INDEX_FILE))
        (directory / ROWS_FILE).write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        meta = {
            "model": self.model,
            "checkpoint": self.checkpoint,
            "layer": self.layer,
            "kind": self.kind,
            "pieces": len(self.rows),
            "dim": self.index.d,
            "centre": self.centre.tolist(),
        }
        (directory / META_FILE).write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: Path) -> "PieceIndex":
        if not (directory / META_FILE).exists():
            raise FileNotFoundError(
                f"{directory / META_FILE} not found: build an index with "
                f"`python -m mtrain.embed checkpoint=<model> data_path=<data> output={directory}`"
            )
        meta = json.loads((directory / META_FILE).read_text())
        index = faiss.read_index(str(directory / INDEX_FILE))
        if isinstance(index, faiss.IndexHNSW):
            index.hnsw.efSearch = HNSW_EF_SEARCH
        rows = [json.loads(line) for line in (directory / ROWS_FILE).read_text().splitlines()]
        return cls(
            index,
            rows,
            np.array(meta["centre"], dtype=np.float32),
            meta["model"],
            meta["checkpoint"],
            meta["layer"],
        )
