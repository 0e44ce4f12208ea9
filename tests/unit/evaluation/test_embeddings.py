"""Embeddings without a model: centring spreads pieces that share one direction; k-fold probes
(scikit-learn) over every label kind, and the kinds that cannot be scored, named."""

import numpy as np
import pytest

from mtrain.evaluation.embed_job import EmbedConfig, probe_suite, sampled_ids, view_rows
from mtrain.evaluation.pooling import EmbeddedSplit, centred_unit_rows, unit_rows
from mtrain.evaluation.probes import cosine_spread, kfold_probe, label_precision, probe_task


def test_centring_spreads_pieces_that_share_one_direction():
    """Mean pooling's failure mode, made up: every vector is mostly one shared direction, with
    a small part of its own cluster's direction and noise on top."""
    rng = np.random.default_rng(0)
    clusters = rng.normal(size=(3, 32))
    labels = [str(i % 3) for i in range(60)]
    own = clusters[[int(label) for label in labels]] + rng.normal(scale=0.7, size=(60, 32))
    pooled = 20 * rng.normal(size=32) + own
    assert cosine_spread(unit_rows(pooled))["min"] > 0.98
    centred = centred_unit_rows(pooled)
    spread = cosine_spread(centred)
    assert spread["min"] < -0.5 and abs(spread["median"]) < 0.2 and 0.5 < spread["max"] < 1
    assert label_precision(centred, labels, 4)["precision"] > 0.95
    np.testing.assert_allclose(np.linalg.norm(centred, axis=1), 1.0, rtol=1e-5)


def made_up_pieces(n: int = 90) -> EmbeddedSplit:
    """Pieces with two label kinds: ``style`` (3 values) written into the "model" vectors,
    ``key`` (2 values) into the "pitch_classes" ones; a third kind with one value, and a fourth
    whose second value has too few pieces."""
    rng = np.random.default_rng(1)
    style = np.arange(n) % 3
    key = rng.integers(0, 2, n)
    model = rng.normal(size=(n, 8))
    model[:, 0] += 4 * style
    pitch = rng.normal(size=(n, 12))
    pitch[:, 5] += 3 * key
    rows = [
        {
            "id": f"{i:04d}",
            "name": f"p{i}",
            "labels": {
                "style": f"s{style[i]}",
                "key": f"k{key[i]}",
                "collection": "bach",
                "meter": "3/4" if i < 3 else "4/4",
            },
            "tokens": 10,
        }
        for i in range(n)
    ]
    handcrafted = rng.normal(size=(n, 5))
    handcrafted[::7, 2] = np.nan  # an extractor undefined for some pieces
    features = {"model": model, "pitch_classes": pitch, "handcrafted": handcrafted}
    return EmbeddedSplit("all", rows, features, 1.0)


def test_every_label_kind_is_probed_by_every_feature_and_the_informative_one_wins():
    probes, retrieval, unscored = probe_suite(made_up_pieces(), EmbedConfig(output="-", folds=5))
    assert set(probes) == set(retrieval) == {"style", "key"}
    for kind in probes:
        assert set(probes[kind]) == {"model", "pitch_classes", "handcrafted"}
    style, key = probes["style"], probes["key"]
    assert style["model"]["accuracy"] > 0.9 > 0.6 > style["pitch_classes"]["accuracy"]
    assert key["pitch_classes"]["accuracy"] > 0.9 > 0.75 > key["model"]["accuracy"]
    assert style["model"]["classes"] == 3 and style["model"]["folds"] == 5
    assert style["handcrafted"]["accuracy"] < 0.6  # noise, NaN filled: scored all the same
    assert retrieval["style"]["model"]["precision"] > retrieval["style"]["model"]["chance"] + 0.15
    assert "1 value(s) among 90 labelled pieces" in unscored["collection"]
    assert "1 with at least 5 pieces (needs 2; 4/4: 87, 3/4: 3)" in unscored["meter"]


def test_a_kfold_probe_reports_the_spread_over_folds_and_the_majority_share():
    labels = ["a"] * 30 + ["b"] * 10
    features = np.random.default_rng(0).normal(size=(40, 3))
    features[:, 0] += [0.0] * 30 + [1.5] * 10  # a weak signal: folds score differently
    result = kfold_probe(features, labels, folds=4, seed=0)
    assert result["majority"] == 0.75 and result["pieces"] == 40 and result["folds"] == 4
    assert result["std"] > 0 and 0 <= result["accuracy"] <= 1
    # Folds drawn from the seed: the same score again.
    assert kfold_probe(features, labels, 4, 0) == result


@pytest.mark.parametrize(
    ("labels", "kept"),
    [(["a"] * 5 + ["b"] * 5 + ["c"] * 4 + [None], 10), (["a"] * 6 + ["b"] * 2, None)],
)
def test_a_label_value_with_fewer_pieces_than_folds_is_left_out(labels, kept):
    task = probe_task(labels, folds=5)
    if kept is None:
        assert isinstance(task, str) and "needs 2" in task
    else:
        rows, values = task
        assert len(rows) == kept and set(values) == {"a", "b"}


def test_a_sample_is_the_same_pieces_on_every_run_and_a_larger_one_holds_a_smaller():
    ids = [f"{i:064x}" for i in range(500)]
    small, large = sampled_ids(ids, 50, seed=0), sampled_ids(reversed(ids), 120, seed=0)
    assert len(small) == 50 and len(large) == 120 and small <= large
    assert sampled_ids(ids, 50, seed=0) == small  # whatever order the shards give them in
    assert len(sampled_ids(ids, 50, seed=1) & small) < 25  # another seed, another draw


def test_views_are_matched_for_held_out_pieces_when_there_are_some():
    rows = [{"split": s} for s in ("train", "test", "train", "val", "test")]
    assert view_rows(rows, 10) == ([1, 3, 4], True)
    assert view_rows(rows, 2) == ([1, 3], True)
    assert view_rows([{"split": "train"}] * 3, 10) == ([0, 1, 2], False)
