"""The faiss piece index: exact under the threshold, HNSW past it, extended without touching
what it holds, saved and loaded, and bound to the model that made it."""

import numpy as np
import pytest

from mtrain.evaluation import search_index
from mtrain.evaluation.search_index import EmbeddingModel, PieceIndex, WrongModel

MODEL = EmbeddingModel("abc/mean/last", "/models/lm", None)


def pieces(n: int, seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    """Vectors sharing one large direction (as mean-pooled states do), and their rows."""
    rng = np.random.default_rng(seed)
    vectors = (10 * rng.normal(size=16) + rng.normal(size=(n, 16))).astype(np.float32)
    rows = [{"id": f"{seed}-{i}", "name": f"p{i}", "labels": {}} for i in range(n)]
    return vectors, rows


def test_each_piece_finds_itself_first_with_cosine_one_and_the_rest_by_cosine():
    vectors, rows = pieces(50)
    index = PieceIndex.build(vectors, rows, MODEL)
    assert index.kind == "exact"
    scores, found = index.search(vectors, 5)
    assert (found[:, 0] == np.arange(50)).all()
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    units = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    centred = units - units.mean(0)
    centred /= np.linalg.norm(centred, axis=1, keepdims=True)
    expected = np.argsort(-(centred @ centred[7]), kind="stable")[:5]
    assert list(found[7]) == list(expected)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    _, stored_found = index.search_stored(7, 5)
    assert list(stored_found[0]) == list(found[7])


def test_added_pieces_are_found_and_the_pieces_there_are_left_alone(tmp_path):
    vectors, rows = pieces(30)
    index = PieceIndex.build(vectors, rows, MODEL)
    before = index.index.reconstruct_n(0, 30)
    more, more_rows = pieces(5, seed=1)
    index.add(more, more_rows)
    index.save(tmp_path)
    loaded = PieceIndex.load(tmp_path)
    assert [r["id"] for r in loaded.rows] == [r["id"] for r in rows + more_rows]
    np.testing.assert_array_equal(loaded.index.reconstruct_n(0, 30), before)
    _, found = loaded.search(more, 1)
    assert list(found[:, 0]) == list(range(30, 35))
    assert (loaded.model, loaded.checkpoint, loaded.layer) == tuple(MODEL)


def test_past_the_threshold_the_index_turns_approximate_and_still_finds_the_pieces(monkeypatch):
    monkeypatch.setattr(search_index, "APPROXIMATE_FROM", 40)
    vectors, rows = pieces(30)
    index = PieceIndex.build(vectors, rows, MODEL)
    assert index.kind == "exact"
    more, more_rows = pieces(20, seed=1)
    index.add(more, more_rows)
    assert index.kind == "hnsw" and index.index.ntotal == 50
    _, found = index.search(np.concatenate([vectors, more]), 1)
    assert (found[:, 0] == np.arange(50)).mean() >= 0.98


def test_another_models_query_is_refused_naming_both():
    index = PieceIndex.build(*pieces(5), MODEL)
    index.check_model(MODEL.id)
    with pytest.raises(WrongModel, match="built from model abc/mean/last, the query embedded by x"):
        index.check_model("x")


def test_a_directory_without_an_index_says_how_to_build_one(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m mtrain\.embed"):
        PieceIndex.load(tmp_path)
