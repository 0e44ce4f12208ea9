"""An embedding job, what ``python -m mtrain.embed`` runs: pieces as vectors, for music discovery.

A piece's embedding is its hidden state (after the final LayerNorm, or after block ``layer``)
averaged over every token position of the piece and L2-normalised; a contrastive export says
which layer it was trained on (its pooling). Writes ``embeddings.npy`` (float32 [pieces,
d_model], less the pieces' mean, L2-normalised again; row i is line i of ``pieces.jsonl``: id,
name, labels, tokens) and a faiss index of them (``mtrain.evaluation.search_index``, queried by
``python -m mtrain.search``). With ``probes=true``, ``report.json`` / ``report.md`` (and a wandb
table, task by feature, with ``logger.mode=offline|online``): for every kind of label the
pieces carry, the accuracy of stratified k-fold logistic-regression probes (scikit-learn) and
the leave-one-out precision@k of cosine neighbours, for the model's embedding and its baselines
on the same pieces (``FEATURES``); a kind that cannot be scored is named with the reason. With
``query=<id>`` (a sha256 or a unique prefix of one), also the k pieces nearest to that one.
"""

import hashlib
import heapq
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_pipeline.app import config_dict
from data_pipeline.errors import require
from data_pipeline.reader import ShardReader, split_shares
from mtrain.data.augmentation import Augmenter
from mtrain.data.views import ViewPairs
from mtrain.evaluation.handcrafted import HandcraftedConfig, handcrafted_vectors
from mtrain.evaluation.pooling import (
    FEATURES,
    EmbeddedSplit,
    MeanPooler,
    centred_unit_rows,
    embedding_model_id,
    pitch_class_histogram,
    unit_rows,
)
from mtrain.evaluation.probes import (
    cosine_spread,
    find_piece,
    kfold_probe,
    label_precision,
    neighbours_of,
    probe_task,
)
from mtrain.evaluation.search_index import EmbeddingModel, PieceIndex
from mtrain.exported.loading import ModelAndData, load_exported, load_for_data
from mtrain.model import GPT
from mtrain.runs.tracking import LoggerConfig, WandbMode, log_report, table
from mtrain.training.contrastive import mean_pooled, twin_first_rate

log = logging.getLogger(__name__)

# The views held-out pieces are matched by: contrastive training's defaults.
VIEW_TRANSPOSE, VIEW_SHIFT = 5, 2
VIEW_BATCH = 64
# split=ALL_SPLITS reads every split of the dataset (the probes' folds are drawn over them).
ALL_SPLITS = "all"


@dataclass
class EmbedConfig:
    # An exported model directory, or a run directory (its newest checkpoint is exported).
    checkpoint: str = "???"
    # The prepared dataset whose pieces are embedded (written by data_pipeline.prepare).
    data_path: str = "data/bach"
    output: str = "???"
    # One split of the dataset, or "all".
    split: str = "test"
    # The block whose output is pooled, indexed like a Python list; None: the last, normed, or
    # the layer a contrastive export was trained on.
    layer: int | None = None
    # Windows of max_seq_len tokens per forward pass.
    batch_size: int = 8
    # Pieces read (the first ones of the split); None: all.
    max_pieces: int | None = None
    # A random sample of this many pieces of the split(s), drawn by ``seed`` (the pieces whose
    # hash of seed and id ranks first): the same pieces for every model and every feature, on
    # every run. None: every piece (up to max_pieces).
    sample: int | None = None
    # Views are matched for at most this many held-out pieces (those not in the train split,
    # or every piece embedded when none is held out): each view ranks all the others.
    views_pieces: int = 1000
    # A piece id (the "id" of pieces.jsonl, or a unique prefix): print its k nearest pieces.
    # Quote a prefix that reads as a number: query="'0123'".
    query: str | None = None
    # Neighbours per query, and the k of precision@k.
    k: int = 10
    # The probe suite and its baselines; off: embeddings and the index only.
    probes: bool = True
    # Stratified folds of each probe; a label value with fewer pieces is left out of its task.
    folds: int = 5
    seed: int = 0
    # The language model a contrastive checkpoint is compared with; None: the one its export
    # names (init_from), when that directory exists.
    language_model: str | None = None
    handcrafted: HandcraftedConfig = field(default_factory=HandcraftedConfig)
    # Where the model runs: auto (the GPU when there is one), cpu, cuda, ...
    device: str = "auto"
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(mode=WandbMode.disabled))

    def __post_init__(self):
        require(
            self,
            "",
            [
                (self.k >= 1, "k", "must be at least 1"),
                (self.batch_size >= 1, "batch_size", "must be at least 1"),
                (self.max_pieces is None or self.max_pieces >= 1, "max_pieces", "must be >= 1"),
                (self.sample is None or self.sample >= 1, "sample", "must be >= 1 (None: all)"),
                (self.views_pieces >= 2, "views_pieces", "must be at least 2"),
                (self.folds >= 2, "folds", "must be at least 2"),
            ],
        )


def pooled_layer(meta: dict, layer: int | None) -> int | None:
    """The layer given, else the one a contrastive export was trained to pool (its config.json's
    ``embedding``), else None (the last, normed)."""
    return layer if layer is not None else meta.get("embedding", {}).get("layer")


def comparison_models(model: GPT, meta: dict, cfg: EmbedConfig) -> dict[str, GPT]:
    """The checkpoint's baselines of the same shape: randomly initialised, and the language
    model a contrastive checkpoint was made from."""
    torch.manual_seed(cfg.seed)
    models = {"random": GPT(model.config).eval().to(model.device)}
    source = cfg.language_model or meta.get("embedding", {}).get("init_from")
    if source and Path(source).exists():
        models["language_model"] = load_exported(source)[0].to(model.device)
    elif source:
        log.warning("the language model %s is not there: no mean-pooled baseline", source)
    return models


@dataclass
class Embedded:
    pieces: EmbeddedSplit
    midis: list[bytes]  # each piece's MIDI file (for the handcrafted features)
    tokens: list[np.ndarray]  # each piece's base ids (for its views)
    models: dict[str, GPT]  # the checkpoint's model and those compared with it, by FEATURES name


def sampled_ids(ids: Iterable[str], count: int, seed: int) -> set[str]:
    """``count`` piece ids drawn at random by ``seed``: those whose sha256 of seed and id ranks
    first. The same pieces on every run, whatever reads them; a larger sample holds a smaller."""
    return set(
        heapq.nsmallest(count, ids, key=lambda i: hashlib.sha256(f"{seed}/{i}".encode()).digest())
    )


def embed_pieces(data: ModelAndData, cfg: EmbedConfig) -> Embedded:
    """Embeds every piece of the split(s) (up to ``cfg.max_pieces``, or the random ``sample``),
    showing pieces/s, with every baseline FEATURES names when probes are on."""
    model, meta, tokenizer, card = data.model, data.meta, data.tokenizer, data.card
    layer = pooled_layer(meta, cfg.layer)
    pooler = MeanPooler(model, layer, cfg.batch_size)
    others = comparison_models(model, meta, cfg) if cfg.probes else {}
    other_poolers = {name: MeanPooler(m, layer, cfg.batch_size) for name, m in others.items()}
    splits = list(card["splits"]) if cfg.split == ALL_SPLITS else [cfg.split]
    splits = [s for s in splits if card["splits"][s]["pieces"]]
    # A damaged shard stops the run, named: embeddings of part of a split would mislead.
    reader = ShardReader(len(tokenizer.base))

    def stored():
        for s in splits:
            yield from ((s, p) for p in reader.pieces(split_shares(cfg.data_path, s, card)))

    pieces = stored()
    total = sum(card["splits"][s]["pieces"] for s in splits)
    if cfg.sample is not None and cfg.sample < total:
        # A first pass for the ids alone: the sample is drawn from all of them.
        chosen = sampled_ids((p.key for _, p in stored()), cfg.sample, cfg.seed)
        pieces, total = ((s, p) for s, p in stored() if p.key in chosen), cfg.sample
        log.info("a random sample of %d pieces (seed %d)", cfg.sample, cfg.seed)
    total = total if cfg.max_pieces is None else min(total, cfg.max_pieces)
    rows, histograms, midis, base_ids, tokens, seconds = [], [], [], [], 0, 0.0
    bar = tqdm(total=total, unit="piece", desc=f"embed {cfg.split}", smoothing=0.05)
    for split, piece in islice(pieces, cfg.max_pieces):
        # Without the label tokens: embeddings that saw them would let a probe read the answer
        # off the conditioning instead of the music.
        doc = tokenizer.document({}, piece.tokens, end=False)
        started = time.perf_counter()
        pooler.add(doc)
        seconds += time.perf_counter() - started
        for other in other_poolers.values():
            other.add(doc)
        tokens += len(doc)
        score = tokenizer.base_ids_to_midi(piece.tokens)
        histograms.append(pitch_class_histogram(score))
        if cfg.probes:
            midis.append(score.dumps_midi())
            base_ids.append(piece.tokens)
        rows.append(
            {
                "id": piece.key,
                "name": piece.meta["name"],
                "labels": piece.labels,
                "tokens": len(piece.tokens),
                "split": split,
            }
        )
        bar.update()
    started = time.perf_counter()
    vectors = pooler.means()
    seconds += time.perf_counter() - started
    bar.close()
    if not rows:
        raise ValueError(f"split {cfg.split!r} of {cfg.data_path} has no pieces to embed")
    log.info(
        "embedded %d pieces (%d tokens) in %.1f s of model time: %.1f pieces/s, %.0f tokens/s",
        len(rows),
        tokens,
        seconds,
        len(rows) / seconds,
        tokens / seconds,
    )
    features = {"model": unit_rows(vectors), "pitch_classes": unit_rows(np.stack(histograms))}
    features |= {name: unit_rows(p.means()) for name, p in other_poolers.items()}
    pieces = EmbeddedSplit(cfg.split, rows, features, seconds)
    return Embedded(pieces, midis, base_ids, {"model": model, **others})


def view_rows(rows: list[dict], limit: int) -> tuple[list[int], bool]:
    """The pieces whose views are matched: the first ``limit`` held out from training (not in
    the train split), else the first ``limit`` of all; and whether they are held out."""
    held_out = [i for i, row in enumerate(rows) if row.get("split") != "train"]
    chosen = held_out or list(range(len(rows)))
    return chosen[:limit], bool(held_out)


@torch.no_grad()
def views_first(
    embedded: Embedded, tokenizer, layer: int | None, seed: int, rows: list[int]
) -> dict[str, float]:
    """For each model: the share of views whose nearest other view, among two views of each
    piece of ``rows`` (augmented and windowed as contrastive training makes them), is of its
    own piece."""
    model = embedded.models["model"]
    augment = Augmenter(tokenizer.base.vocab, VIEW_TRANSPOSE, VIEW_SHIFT, VIEW_SHIFT)
    pairs = ViewPairs(tokenizer, augment, model.config.max_seq_len)
    views = np.concatenate(
        [pairs(embedded.tokens[i], np.random.default_rng([seed, i])) for i in rows]
    )
    rates = {}
    for name, m in embedded.models.items():
        pooled = [
            mean_pooled(m, torch.from_numpy(chunk).to(m.device), layer).cpu()
            for chunk in np.array_split(views, max(1, len(views) // VIEW_BATCH))
        ]
        rates[name] = twin_first_rate(torch.cat(pooled))
    return rates


def probe_suite(pieces: EmbeddedSplit, cfg: EmbedConfig) -> tuple[dict, dict, dict]:
    """For every label kind: k-fold probe accuracy and precision@k of each feature, or why the
    kind cannot be scored."""
    probes, retrieval, unscored = {}, {}, {}
    for kind in pieces.label_kinds():
        task = probe_task(pieces.labels(kind), cfg.folds)
        if isinstance(task, str):
            unscored[kind] = task
            log.info("label %r not scored: %s", kind, task)
            continue
        rows, labels = task
        probes[kind], retrieval[kind] = {}, {}
        for name in FEATURES:
            if name not in pieces.features:
                continue
            vectors = pieces.features[name][rows]
            probes[kind][name] = kfold_probe(vectors, labels, cfg.folds, cfg.seed)
            retrieval[kind][name] = label_precision(comparable(vectors), labels, cfg.k)
    return probes, retrieval, unscored


def comparable(vectors: np.ndarray) -> np.ndarray:
    """Rows neighbours compare by cosine: each column standardised (a handcrafted vector's
    columns have unrelated scales; undefined ones count as average), less the mean, unit."""
    filled = np.where(np.isnan(vectors), np.nanmean(vectors, axis=0), vectors)
    filled = np.nan_to_num(filled)
    scaled = (filled - filled.mean(0)) / np.maximum(filled.std(0), 1e-6)
    return centred_unit_rows(scaled)


def label_text(labels: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def markdown(report: dict) -> str:
    layer = "last (normed)" if report["layer"] is None else report["layer"]
    lines = [
        f"# Embeddings: {report['checkpoint']} on {report['data_path']} ({report['split']})",
        "",
        f"{report['pieces']} pieces{sample_text(report['sample'])}, layer {layer}, "
        f"d_model {report['d_model']}, "
        f"{report['pieces_per_s']:.1f} pieces/s; index: {report['index']}; "
        + spread_text(report["cosine_spread"]),
        "",
    ]
    if report["views_first"]:
        rates = ", ".join(f"{FEATURES[n]} {r:.3f}" for n, r in report["views_first"].items())
        of = report["views_of"]
        which = "held-out" if of["held_out"] else "embedded (none held out)"
        lines += [
            f"Views of one piece ranking each other first: {rates} "
            f"({2 * of['pieces']} views of {of['pieces']} {which} pieces)",
            "",
        ]
    if report["probes"] or report["unscored"]:
        lines += scores(report)
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


def sample_text(sample: dict | None) -> str:
    return "" if sample is None else f" (a random sample, seed {sample['seed']})"


def spread_text(spread: dict) -> str:
    ranges = [
        f"{name} {s['min']:.3f} to {s['max']:.3f} (median {s['median']:.3f})"
        for name, s in spread.items()
        if s
    ]
    return "cosines between pieces: " + "; ".join(ranges) if ranges else "one piece: no cosines"


def scores(report: dict) -> list[str]:
    """Two tables, task by feature: probe accuracy (± std over folds) and precision@k; then
    the label kinds not scored, with the reason."""
    not_scored = [f"- {kind}: {why}" for kind, why in report["unscored"].items()]
    not_scored = ["Not scored:", *not_scored] if not_scored else []
    if not report["probes"]:
        return not_scored
    names = [n for n in FEATURES if any(n in row for row in report["probes"].values())]
    header = "| task (classes, pieces) | " + " | ".join(FEATURES[n] for n in names) + " |"
    rule = "| --- " * (len(names) + 1) + "|"
    lines = [
        f"## Probes: logistic regression, stratified {report['folds']}-fold accuracy ± std",
        "",
        header,
        rule,
    ]
    for kind, row in report["probes"].items():
        first = next(iter(row.values()))
        shape = f"{first['classes']}, {first['pieces']}; majority {first['majority']:.3f}"
        cells = [f"{kind} ({shape})"]
        cells += [f"{row[n]['accuracy']:.3f} ± {row[n]['std']:.3f}" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"## Retrieval: leave-one-out precision@{report['k']} (chance)", "", header, rule]
    for kind, row in report["retrieval"].items():
        cells = [kind] + [
            f"{row[n]['precision']:.3f} ({row[n]['chance']:.3f})" if "precision" in row[n] else "-"
            for n in names
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + (["", *not_scored] if not_scored else [])


def log_to_wandb(cfg: EmbedConfig, out: Path, report: dict, overrides: list[str]) -> None:
    """The probe table (task x feature) to wandb, its accuracies to the run's summary."""
    summary = {
        f"probe/{kind}/{name}": cell["accuracy"]
        for kind, row in report["probes"].items()
        for name, cell in row.items()
    }
    summary["embed/pieces_per_s"] = report["pieces_per_s"]

    def media() -> dict:
        if not report["probes"]:
            return {}
        rows = [
            {"task": kind, "feature": name, "accuracy": c["accuracy"], "std": c["std"]}
            for kind, row in report["probes"].items()
            for name, c in row.items()
        ]
        return {"probes": table(rows)}

    log_report(cfg.logger, f"embed-{out.name}", out, config_dict(cfg), overrides, summary, media)


def embed(cfg: EmbedConfig, overrides: list[str] = ()) -> dict:
    split = None if cfg.split == ALL_SPLITS else cfg.split
    data = load_for_data(cfg.checkpoint, cfg.data_path, split, cfg.device)
    embedded = embed_pieces(data, cfg)
    pieces = embedded.pieces
    rates, viewed, held_out = {}, [], False
    if cfg.probes:
        pieces.features["handcrafted"] = handcrafted_vectors(
            pieces.ids, embedded.midis, cfg.handcrafted
        )
        viewed, held_out = view_rows(pieces.rows, cfg.views_pieces)
        if len(viewed) >= 2:
            layer = pooled_layer(data.meta, cfg.layer)
            rates = views_first(embedded, data.tokenizer, layer, cfg.seed, viewed)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    centred = centred_unit_rows(pieces.features["model"])
    np.save(out / "embeddings.npy", centred)
    model_id = embedding_model_id(data.model_dir, pooled_layer(data.meta, cfg.layer))
    started = time.perf_counter()
    made_by = EmbeddingModel(model_id, str(data.model_dir), pooled_layer(data.meta, cfg.layer))
    index = PieceIndex.build(pieces.features["model"], pieces.rows, made_by)
    build_s = time.perf_counter() - started
    index.save(out)
    query = None
    if cfg.query is not None:
        row = find_piece(pieces, str(cfg.query), out / "pieces.jsonl")
        query = neighbours_of(pieces, centred, row, cfg.k)
    probes, retrieval, unscored = probe_suite(pieces, cfg) if cfg.probes else ({}, {}, {})
    report = {
        "checkpoint": str(data.model_dir),
        "model_id": model_id,
        "step": data.meta["step"],
        "data_path": cfg.data_path,
        "split": cfg.split,
        "layer": pooled_layer(data.meta, cfg.layer),
        "k": cfg.k,
        "folds": cfg.folds,
        "pieces": len(pieces.rows),
        "d_model": data.model.config.d_model,
        "pieces_per_s": len(pieces.rows) / pieces.seconds,
        "index": f"{index.kind}, built in {build_s * 1e3:.1f} ms",
        "embeddings": "embeddings.npy: mean hidden state per piece, L2-normalised, less the "
        "pieces' mean, L2-normalised again",
        "cosine_spread": {
            "mean-pooled": cosine_spread(pieces.features["model"]),
            "centred": cosine_spread(centred),
        },
        "features": {name: FEATURES[name] for name in FEATURES if name in pieces.features},
        "probes": probes,
        "views_first": rates,
        "views_of": {"pieces": len(viewed) if rates else 0, "held_out": held_out},
        "sample": None if cfg.sample is None else {"pieces": cfg.sample, "seed": cfg.seed},
        "retrieval": retrieval,
        "unscored": unscored,
        "query": query,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    log_to_wandb(cfg, out, report, list(overrides))
    return report
