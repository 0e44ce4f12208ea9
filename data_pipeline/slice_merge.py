"""Joins the slices of a prepare run into one dataset (what ``python -m data_pipeline.merge`` runs).

Checks that every slice is present and was made with the same config, adds up their cards,
joins manifests and failures, gives every label seen often enough its own conditioning token,
learns the sentencepiece vocabulary over the train shards if one is configured, and writes the
tokenizer artifact and the dataset card (last: a dataset without a card is unfinished).
"""

import heapq
import json
import logging
import shutil
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime

from omegaconf import OmegaConf

from data_pipeline import learned_vocab, storage
from data_pipeline.config import LearnedVocabConfig, PrepareConfig
from data_pipeline.learned_vocab import LearnedVocab
from data_pipeline.manifest import SPLITS
from data_pipeline.reader import CARD_NAME, ShardReader, shard_shares
from data_pipeline.slice_run import peak_rss_mb, slice_dir
from data_pipeline.tokenizer import MusicTokenizer, artifact_of, build_base_tokenizer

log = logging.getLogger(__name__)
CARD_FORMAT = 1
# Base tokens of train data per learned-vocabulary unit below which the vocabulary is too large
# for its corpus (most units would be rare).
MIN_TOKENS_PER_UNIT = 1000


def _load_slice_cards(output: str) -> list[dict]:
    fs, root = storage.filesystem(storage.join(output, "slices"))
    found = sorted(fs.glob(f"{root}/*/card.json"))
    if not found:
        raise FileNotFoundError(
            f"no slice cards under {storage.join(output, 'slices')}: run "
            f"`python -m data_pipeline.prepare output={output}` first"
        )
    cards = [json.loads(fs.cat_file(p)) for p in found]
    count = cards[0]["slice"]["count"]
    cards = [c for c in cards if c["slice"]["count"] == count]
    present = {c["slice"]["index"] for c in cards}
    missing = sorted(set(range(count)) - present)
    if missing:
        raise RuntimeError(
            f"slices {missing} of {count} are missing or unfinished under {output}: run "
            f"`python -m data_pipeline.prepare output={output} num_slices={count} "
            f"slice_index=<i> merge=false` for each, then merge again"
        )
    reference = _comparable_config(cards[0])
    for card in cards[1:]:
        if _comparable_config(card) != reference:
            raise RuntimeError(
                f"slice {card['slice']['index']} of {output} was prepared with a different "
                "config than slice 0; prepare all slices with the same overrides"
            )
    return sorted(cards, key=lambda c: c["slice"]["index"])


def _comparable_config(card: dict) -> dict:
    config = dict(card["config"])
    config.pop("slice_index", None)
    config.pop("merge", None)
    return {"config": config, "base_tokenizer": card["base_tokenizer"]}


def _join_jsonl(output: str, cards: list[dict], name: str) -> None:
    """Concatenates the slices' ``name`` files into one, streamed through a local file: a
    million-row manifest is never in memory."""
    with tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False) as joined:
        for c in cards:
            where = slice_dir(output, c["slice"]["index"], c["slice"]["count"])
            stream, _ = storage.open_input(storage.join(where, name))
            with stream:
                shutil.copyfileobj(stream, joined, 1 << 20)
    storage.make_readable(joined.name)
    storage.publish_file(joined.name, storage.join(output, name))


def _sum_splits(cards: list[dict]) -> dict:
    splits = {}
    for split in SPLITS:
        parts = [c["splits"][split] for c in cards]
        splits[split] = {key: sum(p[key] for p in parts) for key in ("pieces", "tokens", "notes")}
        splits[split]["duration_s"] = round(sum(p["duration_s"] for p in parts), 3)
        splits[split]["shards"] = [s for p in parts for s in p["shards"]]
    return splits


def _sum_collections(cards: list[dict]) -> dict:
    """Per-collection counts of every slice, added up (slices cut across collections)."""
    total: dict[str, Counter] = {}
    for card in cards:
        for name, counts in card.get("collections", {}).items():
            total.setdefault(name, Counter()).update(counts)
    return {
        name: {**counts, "duration_s": round(counts["duration_s"], 3)}
        for name, counts in sorted(total.items())
    }


def _learn_vocab(cfg: PrepareConfig, output: str, splits: dict, base) -> LearnedVocab:
    # A damaged shard stops the merge, named: a vocabulary learned without it would differ.
    reader = ShardReader(len(base))
    pieces = reader.pieces(shard_shares(output, splits["train"]["shards"]))
    # The pieces with the smallest content hashes: the vocabulary (and the tokenizer hash) does
    # not depend on how the corpus was sliced or in which order the shards were written, and
    # memory holds max_pieces pieces, however large the corpus (a heap over the stream).
    limit = cfg.tokenizer.learned.max_pieces
    if limit is None:
        chosen = sorted(pieces, key=lambda piece: piece.key)
    else:
        chosen = heapq.nsmallest(limit, pieces, key=lambda piece: piece.key)
    train_pieces = [piece.tokens for piece in chosen]

    _warn_if_too_large(cfg.tokenizer.learned, train_pieces)
    specials = len(base.special_tokens)
    bar_id = base.vocab.get("Bar_None")
    start = time.monotonic()
    model = learned_vocab.train(
        train_pieces, range(specials, len(base)), bar_id, cfg.tokenizer.learned, cfg.seed
    )
    log.info(
        "learned a %s vocabulary of %d pieces in %.1f s",
        cfg.tokenizer.learned.kind.value,
        cfg.tokenizer.learned.size,
        time.monotonic() - start,
    )
    return LearnedVocab(model)


def _warn_if_too_large(cfg: LearnedVocabConfig, pieces: list) -> None:
    """A learned unit seen a handful of times is an embedding the model barely trains: say so
    when the corpus gives fewer than MIN_TOKENS_PER_UNIT base tokens per unit."""
    tokens = sum(len(piece) for piece in pieces)
    if tokens >= MIN_TOKENS_PER_UNIT * cfg.size:
        return
    log.warning(
        "tokenizer.learned.size=%d is large for this corpus: %d train pieces, %d base tokens, "
        "%.0f per learned unit (aim for at least %d); use tokenizer.learned.size=%d or less, "
        "or more pieces",
        cfg.size,
        len(pieces),
        tokens,
        tokens / cfg.size,
        MIN_TOKENS_PER_UNIT,
        max(1, tokens // MIN_TOKENS_PER_UNIT),
    )


def _extend(parent: MusicTokenizer, labels: list[str], cfg: PrepareConfig) -> MusicTokenizer:
    """``parent``'s ids, and a new label token after them for each label value it lacks."""
    tokenizer = parent.extended(labels)
    added = tokenizer.lineage["added_labels"]
    log.info(
        "tokenized with %s (tokenizer %s); %s",
        cfg.tokenizer_from,
        parent.hash[:12],
        f"new label tokens {', '.join(added)} (ids {parent.vocab_size}.."
        f"{tokenizer.vocab_size - 1}), tokenizer {tokenizer.hash[:12]}"
        if added
        else "every label already has a token: the same tokenizer",
    )
    return tokenizer if added else parent


def merge_slices(output: str) -> dict:
    start = time.monotonic()
    cards = _load_slice_cards(output)
    cfg: PrepareConfig = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(PrepareConfig), cards[0]["config"])
    )
    splits = _sum_splits(cards)
    label_counts = Counter()
    for card in cards:
        label_counts.update(card["labels"])
    labels = sorted(
        n for n, c in label_counts.items() if c >= cfg.labels.min_count and cfg.labels.conditions(n)
    )

    learn_start = time.monotonic()
    if cfg.tokenizer_from is not None:
        tokenizer = _extend(MusicTokenizer.load(artifact_of(cfg.tokenizer_from)), labels, cfg)
    else:
        base = build_base_tokenizer(cfg.tokenizer)
        learned = None
        if cfg.tokenizer.learned.kind.value != "none":
            learned = _learn_vocab(cfg, output, splits, base)
        tokenizer = MusicTokenizer(base, labels, learned)
    learned_s = time.monotonic() - learn_start
    tokenizer.save(storage.join(output, "tokenizer"))

    _join_jsonl(output, cards, "manifest.jsonl")
    _join_jsonl(output, cards, "failures.jsonl")
    by_reason = Counter()
    for card in cards:
        by_reason.update(card["failures"]["by_reason"])
    card = {
        "format": CARD_FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": cfg.source,
        "tokenizer": {"path": "tokenizer", **tokenizer.describe()},
        "splits": splits,
        "files": {k: sum(c["files"][k] for c in cards) for k in cards[0]["files"]},
        "failures": {
            "total": sum(by_reason.values()),
            "by_reason": dict(sorted(by_reason.items())),
        },
        "labels": dict(sorted(label_counts.items())),
        "collections": _sum_collections(cards),
        "slices": [{"index": c["slice"]["index"], **c["throughput"]} for c in cards],
        "merge": {
            "seconds": round(time.monotonic() - start, 2),
            "learned_vocab_s": round(learned_s, 2),
            "peak_rss_mb": peak_rss_mb()["collector"],
        },
        "config": {**cards[0]["config"], "slice_index": None},
    }
    storage.write_bytes(storage.join(output, CARD_NAME), json.dumps(card, indent=2).encode())
    return card
