"""Pieces as vectors, for music discovery (what ``python -m mtrain.embed`` runs).

A piece's embedding is its hidden state (after the final LayerNorm, or after block ``layer``)
averaged over every token position of the piece and L2-normalised; neighbours compare these
less the split's mean, L2-normalised again, so that a dot product of two rows is their cosine
similarity. Writes those rows as ``embeddings.npy`` (float32 [pieces, d_model]; row i is line i
of ``pieces.jsonl``: id, name, labels, tokens), and ``report.json`` / ``report.md``: how well the
embeddings find pieces with the same label (precision@k of cosine nearest neighbours,
leave-one-out over the split, and the accuracy of a linear probe fit on the train split), next
to the same numbers for a 12-dim pitch-class histogram, and the spread of cosines between
pieces. A dataset with fewer than two values of the label is said to be so before anything is
embedded, and nothing is scored. With ``query=<id>`` (a sha256 or a unique prefix of one), also
the k pieces nearest to that one, itself left out.
"""

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data_pipeline.errors import require
from data_pipeline.reader import ShardReader, split_shares
from data_pipeline.tokenizer import MusicTokenizer
from mtrain.exported.loading import load_for_data
from mtrain.model import GPT

log = logging.getLogger(__name__)
# The linear probe is always fit on this split, whichever split is embedded and scored.
PROBE_FIT_SPLIT = "train"
# Ridge penalty on the probe's weights: a few dozen pieces in d_model dimensions are separable,
# and without it the weights of a separable problem grow without bound.
PROBE_L2 = 1e-3
# Queries compared against the whole split at once: bounds the similarity matrix's memory.
QUERY_CHUNK = 1024
# The two descriptions of a piece compared (EmbeddedSplit fields), with their report titles.
FEATURES = {"model": "model embedding", "pitch_classes": "pitch-class histogram (baseline)"}
# Pieces whose pairwise cosines make the reported spread: bounds that matrix's memory too.
SPREAD_PIECES = 1024


@dataclass
class EmbedConfig:
    # An exported model directory, or a run directory (its newest checkpoint is exported).
    checkpoint: str = "???"
    # The prepared dataset whose pieces are embedded (written by data_pipeline.prepare).
    data_path: str = "data/bach"
    output: str = "???"
    split: str = "test"
    # The block whose output is pooled, indexed like a Python list; None: the last, normed.
    layer: int | None = None
    # Windows of max_seq_len tokens per forward pass.
    batch_size: int = 8
    # Pieces read from each split (the embedded one and the probe's train split); None: all.
    max_pieces: int | None = None
    # A piece id (the "id" of pieces.jsonl, or a unique prefix): print its k nearest pieces.
    # Quote a prefix that reads as a number: query="'0123'".
    query: str | None = None
    # Neighbours per query, and the k of precision@k.
    k: int = 5
    # The label kind (a key of the pieces' labels) that retrieval and the probe must recover.
    label_key: str = "collection"
    # Where the model runs: auto (the GPU when there is one), cpu, cuda, ...
    device: str = "auto"

    def __post_init__(self):
        require(
            self,
            "",
            [
                (self.k >= 1, "k", "must be at least 1"),
                (self.batch_size >= 1, "batch_size", "must be at least 1"),
                (self.max_pieces is None or self.max_pieces >= 1, "max_pieces", "must be >= 1"),
            ],
        )


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
        device = self.model.wte.weight.device
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


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (an all-zero row stays zero: similar to nothing)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def centred_unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows less their mean, then scaled to length 1. Mean pooling leaves every piece close to
    one direction that all pieces share (a median cosine of 0.986 between the Bach test pieces
    under the old quickstart's model), so raw cosines all read "alike"; less the shared part
    they span -1 to 1 and rank neighbours as well (precision@5 by collection 0.993 both ways
    over Bach, Palestrina and O'Neill test pieces)."""
    return unit_rows(vectors - vectors.mean(axis=0))


def cosine_spread(vectors: np.ndarray) -> dict:
    """Lowest, median and highest cosine between two different rows of unit ``vectors`` (the
    first SPREAD_PIECES): how much room the similarities have to tell pieces apart."""
    rows = vectors[:SPREAD_PIECES]
    if len(rows) < 2:
        return {}
    sims = (rows @ rows.T)[~np.eye(len(rows), dtype=bool)]
    return {"min": float(sims.min()), "median": float(np.median(sims)), "max": float(sims.max())}


def label_values(card: dict, key: str) -> list[str]:
    """The values that the label ``key`` takes in the dataset (from its card's label counts)."""
    parts = (label.partition("=") for label in card["labels"])
    return sorted(value for kind, _, value in parts if kind == key)


def pitch_class_histogram(tokenizer: MusicTokenizer, base_ids: np.ndarray) -> np.ndarray:
    """The share of the piece's non-drum notes on each of the 12 pitch classes, read from the
    decoded score, so that it means the same for every tokenization."""
    score = tokenizer.base_ids_to_midi(base_ids)
    pitches = [track.notes.numpy()["pitch"] for track in score.tracks if not track.is_drum]
    histogram = np.bincount(np.concatenate([*pitches, np.zeros(0, int)]) % 12, minlength=12)
    return histogram / max(histogram.sum(), 1)


def embed_split(
    model: GPT, tokenizer: MusicTokenizer, card: dict, split: str, cfg: EmbedConfig
) -> EmbeddedSplit:
    """Embeds every piece of ``split`` (up to ``cfg.max_pieces``), showing pieces/s."""
    pooler = MeanPooler(model, cfg.layer, cfg.batch_size)
    rows, histograms, tokens = [], [], 0
    # A damaged shard stops the run, named: embeddings of part of a split would mislead.
    pieces = ShardReader(len(tokenizer.base)).pieces(split_shares(cfg.data_path, split, card))
    total = card["splits"][split]["pieces"]
    total = total if cfg.max_pieces is None else min(total, cfg.max_pieces)
    started = time.perf_counter()
    bar = tqdm(total=total, unit="piece", desc=f"embed {split}", smoothing=0.05)
    for piece in islice(pieces, cfg.max_pieces):
        # Without the label tokens: embeddings that saw them would let retrieval by label read
        # the answer off the conditioning instead of the music.
        doc = tokenizer.document({}, piece.tokens, end=False)
        pooler.add(doc)
        tokens += len(doc)
        histograms.append(pitch_class_histogram(tokenizer, piece.tokens))
        rows.append(
            {
                "id": piece.key,
                "name": piece.meta["name"],
                "labels": piece.labels,
                "tokens": len(piece.tokens),
            }
        )
        bar.update()
    vectors = pooler.means()
    bar.close()
    seconds = time.perf_counter() - started
    if not rows:
        raise ValueError(f"split {split!r} of {cfg.data_path} has no pieces to embed")
    log.info(
        "embedded %d pieces (%d tokens) of %s in %.1f s: %.1f pieces/s, %.0f tokens/s",
        len(rows),
        tokens,
        split,
        seconds,
        len(rows) / seconds,
        tokens / seconds,
    )
    return EmbeddedSplit(split, rows, unit_rows(vectors), unit_rows(np.stack(histograms)), seconds)


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


def probes(
    model: GPT, tokenizer: MusicTokenizer, pieces: EmbeddedSplit, cfg: EmbedConfig, card: dict
) -> dict:
    """The linear probe of each kind of features, fit on the train split."""
    if cfg.split == PROBE_FIT_SPLIT:
        log.warning("split=%s: the probe is scored on the pieces it was fit on", cfg.split)
        train = pieces
    elif card["splits"].get(PROBE_FIT_SPLIT, {}).get("pieces"):
        train = embed_split(model, tokenizer, card, PROBE_FIT_SPLIT, cfg)
    else:
        return {name: {"skipped": f"no {PROBE_FIT_SPLIT} split to fit on"} for name in FEATURES}
    labels, train_labels = pieces.labels(cfg.label_key), train.labels(cfg.label_key)
    return {
        name: linear_probe(getattr(train, name), train_labels, getattr(pieces, name), labels)
        for name in FEATURES
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


def label_text(labels: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def markdown(report: dict) -> str:
    layer = "last (normed)" if report["layer"] is None else report["layer"]
    lines = [
        f"# Embeddings: {report['checkpoint']} on {report['data_path']} ({report['split']})",
        "",
        f"{report['pieces']} pieces, layer {layer}, d_model {report['d_model']}; "
        + spread_text(report["cosine_spread"]),
        "",
    ]
    lines += [f"Not scored: {report['unscored']}."] if report["unscored"] else scores(report)
    query = report.get("query")
    if query:
        piece = query["piece"]
        lines += [
            "",
            f"## Nearest to {piece['id'][:12]} ({piece['name']}; {label_text(piece['labels'])})",
            "",
            "| rank | id | name | cosine | labels |",
            "| --- | --- | --- | --- | --- |",
        ]
        for rank, n in enumerate(query["neighbours"], 1):
            lines.append(
                f"| {rank} | {n['id'][:12]} | {n['name']} | {n['similarity']:.3f} | "
                f"{label_text(n['labels'])} |"
            )
    return "\n".join(lines) + "\n"


def spread_text(spread: dict) -> str:
    ranges = [
        f"{name} {s['min']:.3f} to {s['max']:.3f} (median {s['median']:.3f})"
        for name, s in spread.items()
        if s
    ]
    return "cosines between pieces: " + "; ".join(ranges) if ranges else "one piece: no cosines"


def scores(report: dict) -> list[str]:
    """The table of retrieval and probe scores of each kind of features, and why any cell was
    skipped."""
    lines = [
        f"Label {report['label_key']!r}; leave-one-out retrieval by cosine similarity of centred "
        f"vectors; probe fit on {PROBE_FIT_SPLIT!r}",
        "",
        f"| features | precision@{report['k']} | chance | probe accuracy | majority label |",
        "| --- | --- | --- | --- | --- |",
    ]
    notes = []
    for name, title in FEATURES.items():
        cells = [title]
        for part, keys in (
            ("retrieval", ("precision", "chance")),
            ("probe", ("accuracy", "majority")),
        ):
            result = report[part][name]
            if "skipped" in result:
                cells += ["-", "-"]
                notes.append(f"- {part} of {title} skipped: {result['skipped']}")
            else:
                cells += [f"{result[key]:.3f}" for key in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + (["", *notes] if notes else [])


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


def embed(cfg: EmbedConfig) -> dict:
    model, meta, tokenizer, card, model_dir = load_for_data(
        cfg.checkpoint, cfg.data_path, cfg.split, cfg.device
    )
    unscored = unscorable(card, cfg.label_key)
    if unscored:
        log.warning("no retrieval or probe scores: %s; embedding for neighbours only", unscored)
    pieces = embed_split(model, tokenizer, card, cfg.split, cfg)
    # What neighbours and retrieval compare; the probe standardises the pooled means itself.
    centred = {name: centred_unit_rows(getattr(pieces, name)) for name in FEATURES}
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "embeddings.npy", centred["model"])
    listing = out / "pieces.jsonl"
    listing.write_text("".join(json.dumps(row) + "\n" for row in pieces.rows))
    query = None
    if cfg.query is not None:
        row = find_piece(pieces, str(cfg.query), listing)
        query = neighbours_of(pieces, centred["model"], row, cfg.k)
    labels = pieces.labels(cfg.label_key)
    report = {
        "checkpoint": str(model_dir),
        "step": meta["step"],
        "data_path": cfg.data_path,
        "split": cfg.split,
        "layer": cfg.layer,
        "label_key": cfg.label_key,
        "k": cfg.k,
        "pieces": len(pieces.rows),
        "d_model": model.config.d_model,
        "pieces_per_s": len(pieces.rows) / pieces.seconds,
        "embeddings": "embeddings.npy: mean hidden state per piece, L2-normalised, less the "
        "split's mean, L2-normalised again",
        "cosine_spread": {
            "mean-pooled": cosine_spread(pieces.model),
            "centred": cosine_spread(centred["model"]),
        },
        "unscored": unscored,
        "retrieval": {}
        if unscored
        else {name: label_precision(centred[name], labels, cfg.k) for name in FEATURES},
        "probe": {} if unscored else probes(model, tokenizer, pieces, cfg, card),
        "query": query,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    return report
