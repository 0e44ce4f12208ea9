"""Embeddings without a model: centring spreads pieces that share one direction, and a
dataset whose labels cannot tell pieces apart is named before anything is scored."""

import numpy as np
import pytest

from mtrain.evaluation.pooling import centred_unit_rows, unit_rows
from mtrain.evaluation.probes import cosine_spread, label_precision, unscorable


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


@pytest.mark.parametrize(
    ("labels", "says"),
    [
        (
            {"collection=bach": 432, "composer=bach": 432},
            "one 'collection' label, collection=bach, so no piece can be told from another by it "
            "(no kind of label in it has two values",
        ),
        (
            {"composer=bach": 3, "composer=handel": 2},
            "no 'collection' label, so no piece can be told from another by it (label_key= "
            "picks another kind: composer)",
        ),
    ],
)
def test_fewer_than_two_label_values_cannot_be_scored(labels, says):
    assert says in unscorable({"labels": labels}, "collection")
    assert unscorable({"labels": {"collection=a": 1, "collection=b": 1}}, "collection") is None
