"""What piece embeddings tell apart: cosine nearest neighbours, leave-one-out retrieval of a
label, a linear probe for it, and the spread of cosines between pieces."""

from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mtrain.evaluation.pooling import EmbeddedSplit

# The linear probe is always fit on this split, whichever split is embedded and scored.
PROBE_FIT_SPLIT = "train"
# Ridge penalty on the probe's weights: a few dozen pieces in d_model dimensions are separable,
# and without it the weights of a separable problem grow without bound.
PROBE_L2 = 1e-3
# Queries compared against the whole split at once: bounds the similarity matrix's memory.
QUERY_CHUNK = 1024
# Pieces whose pairwise cosines make the reported spread: bounds that matrix's memory too.
SPREAD_PIECES = 1024


def cosine_spread(vectors: np.ndarray) -> dict:
    """Lowest, median and highest cosine between two different rows of unit ``vectors`` (the
    first SPREAD_PIECES): how much room the similarities have to tell pieces apart."""
    rows = vectors[:SPREAD_PIECES]
    if len(rows) < 2:
        return {}
    sims = (rows @ rows.T)[~np.eye(len(rows), dtype=bool)]
    return {"min": float(sims.min()), "median": float(np.median(sims)), "max": float(sims.max())}


def nearest(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and cosine similarities [queries, k] of the k rows of unit ``vectors`` nearest
    to each row numbered in ``queries``, most similar first, the query row itself left out."""
    found, similar = [], []
    for chunk in np.array_split(queries, max(1, -(-len(queries) // QUERY_CHUNK))):
        sims = vectors[chunk] @ vectors.T
        sims[np.arange(len(chunk)), chunk] = -np.inf
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        found.append(order)
        similar.append(np.take_along_axis(sims, order, axis=1))
    return np.concatenate(found), np.concatenate(similar)


def label_precision(vectors: np.ndarray, labels: list[str | None], k: int) -> dict:
    """Leave-one-out precision@k over unit ``vectors``: the share of each labelled piece's k
    nearest labelled pieces that share its label, with the share expected of k pieces drawn at
    random."""
    have = np.array([label is not None for label in labels])
    names = np.array([label for label in labels if label is not None])
    if len(set(names)) < 2:
        return {"skipped": f"{len(set(names))} distinct label(s) among the pieces: nothing to tell"}
    k = min(k, len(names) - 1)
    found, _ = nearest(vectors[have], np.arange(len(names)), k)
    counts = Counter(names)
    return {
        "k": k,
        "queries": len(names),
        "precision": float((names[found] == names[:, None]).mean()),
        "chance": float(np.mean([(counts[n] - 1) / (len(names) - 1) for n in names])),
    }


def linear_probe(
    train: np.ndarray,
    train_labels: list[str | None],
    test: np.ndarray,
    test_labels: list[str | None],
) -> dict:
    """Accuracy of a multinomial logistic regression fit on ``train``, scored on the labelled
    rows of ``test``; a label the train split lacks counts as a miss. With the accuracy of
    always answering the train split's most common label."""
    fit = [i for i, label in enumerate(train_labels) if label is not None]
    scored = [i for i, label in enumerate(test_labels) if label is not None]
    classes = sorted({train_labels[i] for i in fit})
    if len(classes) < 2:
        return {"skipped": f"the {PROBE_FIT_SPLIT} split has {len(classes)} label(s): no probe"}
    if not scored:
        return {"skipped": "no piece of the embedded split has the label"}
    x = torch.from_numpy(train[fit]).double()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    x = (x - mean) / std
    y = torch.tensor([classes.index(train_labels[i]) for i in fit])
    weight = torch.zeros(x.size(1), len(classes), dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(len(classes), dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + PROBE_L2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        x_test = (torch.from_numpy(test[scored]).double() - mean) / std
        predicted = [classes[i] for i in (x_test @ weight + bias).argmax(1).tolist()]
    truth = [test_labels[i] for i in scored]
    majority = Counter(train_labels[i] for i in fit).most_common(1)[0][0]
    return {
        "fit_pieces": len(fit),
        "scored_pieces": len(scored),
        "classes": classes,
        "accuracy": float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)])),
        "majority": float(np.mean([t == majority for t in truth])),
        "unseen_labels": sum(t not in classes for t in truth),
    }


def find_piece(pieces: EmbeddedSplit, query: str, listing: Path) -> int:
    """The row of the one piece whose id is or starts with ``query``."""
    matches = [i for i, piece_id in enumerate(pieces.ids) if piece_id.startswith(query.lower())]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ValueError(
            f"query={query}: no piece of split {pieces.split!r} has an id starting with it; "
            f"piece ids (sha256 of each MIDI file) are the 'id' field of {listing}"
        )
    raise ValueError(
        f"query={query}: {len(matches)} pieces' ids start with it (e.g. "
        f"{', '.join(pieces.ids[i][:16] for i in matches[:3])}); give more of the id"
    )


def neighbours_of(pieces: EmbeddedSplit, vectors: np.ndarray, row: int, k: int) -> dict:
    """The k pieces whose rows of unit ``vectors`` are nearest to piece ``row``."""
    found, similar = nearest(vectors, np.array([row]), min(k, len(pieces.rows) - 1))
    return {
        "piece": pieces.rows[row],
        "neighbours": [
            {**pieces.rows[i], "similarity": float(s)}
            for i, s in zip(found[0], similar[0], strict=True)
        ],
    }


def label_values(card: dict, key: str) -> list[str]:
    """The values that the label ``key`` takes in the dataset (from its card's label counts)."""
    parts = (label.partition("=") for label in card["labels"])
    return sorted(value for kind, _, value in parts if kind == key)


def unscorable(card: dict, key: str) -> str | None:
    """Why retrieval and the probe by label ``key`` cannot be scored on any split of the
    dataset (it has fewer than two values of that label), or None when they can."""
    values = label_values(card, key)
    if len(values) >= 2:
        return None
    kinds = sorted({label.partition("=")[0] for label in card["labels"]})
    others = [kind for kind in kinds if len(label_values(card, kind)) >= 2]
    has = f"one {key!r} label, {key}={values[0]}" if values else f"no {key!r} label"
    fix = (
        f"label_key= picks another kind: {', '.join(others)}"
        if others
        else "no kind of label in it has two values; prepare pieces from several collections"
    )
    return f"the dataset has {has}, so no piece can be told from another by it ({fix})"
