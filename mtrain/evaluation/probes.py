"""What piece embeddings tell apart: cosine nearest neighbours, leave-one-out retrieval of a
label, k-fold logistic-regression probes (scikit-learn), and the spread of cosines."""

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mtrain.evaluation.pooling import EmbeddedSplit

# Inverse L2 penalties the probe chooses among, by an inner cross-validation on each training
# fold: a few dozen pieces in d_model dimensions are separable (no penalty: weights without
# bound), and one fixed penalty suits neither tight clusters nor noisy columns.
PROBE_CS = (0.1, 1.0, 10.0)
PROBE_INNER_FOLDS = 3
PROBE_MAX_ITER = 1000
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


def kfold_probe(features: np.ndarray, labels: list[str], folds: int, seed: int) -> dict:
    """Stratified k-fold accuracy of a multinomial logistic regression (scikit-learn) that reads
    ``labels`` off ``features``: columns standardised on each fold's training part, a feature
    undefined for a piece (NaN) filled with that part's mean, the penalty chosen among PROBE_CS
    on that part alone. With the spread over folds and the accuracy of always answering the
    most common label."""
    probe = make_pipeline(
        SimpleImputer(keep_empty_features=True),
        StandardScaler(),
        LogisticRegressionCV(
            Cs=list(PROBE_CS),
            cv=PROBE_INNER_FOLDS,
            max_iter=PROBE_MAX_ITER,
            use_legacy_attributes=False,  # the fitted attributes are not read here
            l1_ratios=(0.0,),  # L2 only
            scoring="accuracy",  # the penalty chosen by what the probe reports
        ),
    )
    splits = StratifiedKFold(folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # A fold that stops at max_iter is still a fitted probe; the accuracy says how good.
        warnings.simplefilter("ignore", category=ConvergenceWarning)
        accuracy = cross_val_score(probe, features, np.asarray(labels), cv=splits)
    counts = Counter(labels)
    return {
        "accuracy": float(accuracy.mean()),
        "std": float(accuracy.std()),
        "folds": folds,
        "pieces": len(labels),
        "classes": len(counts),
        "majority": counts.most_common(1)[0][1] / len(labels),
    }


def probe_task(labels: list[str | None], folds: int) -> tuple[np.ndarray, list[str]] | str:
    """The pieces a probe of one label kind is scored on (rows, and their labels): those whose
    label has at least ``folds`` pieces, so every fold holds each class. Why not, when fewer
    than two such labels remain."""
    counts = Counter(label for label in labels if label is not None)
    kept = {label for label, n in counts.items() if n >= folds}
    if len(kept) < 2:
        have = ", ".join(f"{label}: {n}" for label, n in counts.most_common(4)) or "none"
        return (
            f"{len(counts)} value(s) among {sum(counts.values())} labelled pieces, "
            f"{len(kept)} with at least {folds} pieces (needs 2; {have})"
        )
    rows = np.array([i for i, label in enumerate(labels) if label in kept])
    return rows, [labels[i] for i in rows]


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
