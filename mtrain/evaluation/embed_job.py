"""An embedding job, what ``python -m mtrain.embed`` runs: pieces as vectors, for music discovery.

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
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipeline.errors import require
from data_pipeline.reader import ShardReader, split_shares
from data_pipeline.tokenizer import MusicTokenizer
from mtrain.evaluation.pooling import (
    FEATURES,
    EmbeddedSplit,
    MeanPooler,
    centred_unit_rows,
    pitch_class_histogram,
    unit_rows,
)
from mtrain.evaluation.probes import (
    PROBE_FIT_SPLIT,
    cosine_spread,
    find_piece,
    label_precision,
    linear_probe,
    neighbours_of,
    unscorable,
)
from mtrain.exported.loading import load_for_data
from mtrain.model import GPT

log = logging.getLogger(__name__)


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


def probe_scores(
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
        "probe": {} if unscored else probe_scores(model, tokenizer, pieces, cfg, card),
        "query": query,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    return report
