"""One slice of a prepare run: every listed file is hashed, and those whose hash falls in this
slice are checked, tokenized and written to shards; the rest of the run merges the slices.

Results come back from the workers in listing order, so the shards and manifest do not depend
on the number of workers, and "first of a duplicate set" means first in sorted name order.
"""

import contextlib
import itertools
import json
import logging
import resource
import tempfile
import time
from collections import Counter

from tqdm import tqdm

from data_pipeline import storage
from data_pipeline.app import config_dict
from data_pipeline.config import PrepareConfig
from data_pipeline.manifest import SPLITS, ManifestRow, content_hash, slice_of, split_of
from data_pipeline.piece import (
    OtherSlice,
    Rejection,
    TokenizedFile,
    WorkerSetup,
    init_worker,
    process_file,
)
from data_pipeline.pool import ResilientPool, TaskFailure
from data_pipeline.shards import ShardWriter
from data_pipeline.sources import SourceFile, discover
from data_pipeline.tokenizer import base_fingerprint, base_tokenizer_of

log = logging.getLogger(__name__)
# A source of at most this many files is hashed up front when its val split would be empty by
# the fractions alone: a folder of one's own (tens of pieces) still gets a validation piece.
SMALL_SOURCE = 1000


def slice_dir(output: str, index: int, count: int) -> str:
    return storage.join(output, "slices", f"{index:04d}-of-{count:04d}")


def shard_prefix(split: str, cfg: PrepareConfig) -> str:
    return split if cfg.num_slices == 1 else f"{split}-{cfg.slice_index:04d}"


class SliceTally:
    """What a slice's card counts, added up as the rows go by; the rows themselves go straight
    to local files (manifest and failures), so a task's memory does not grow with its files
    beyond one content hash per kept piece (for finding duplicates)."""

    def __init__(self, val_hash: str | None = None):
        # A piece sent to val whatever its hash's fraction (``nearest_val``).
        self.val_hash = val_hash
        self.by_hash: dict[str, str] = {}
        self.tokens = 0
        self.files: Counter = Counter()
        self.splits = {s: Counter() for s in SPLITS}
        self.labels: Counter = Counter()
        self.collections: dict[str, Counter] = {}
        self.by_reason: Counter = Counter()
        self.manifest = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False)  # noqa: SIM115
        self.failures = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False)  # noqa: SIM115

    def add(self, row: ManifestRow) -> None:
        line = json.dumps(row.to_json()) + "\n"
        self.manifest.write(line)
        self.files["total"] += 1
        collection = self.collections.setdefault(row.labels.get("collection", "-"), Counter())
        if row.status == "quarantined":
            self.failures.write(line)
            self.files["quarantined"] += 1
            self.by_reason[row.reason] += 1
            collection["quarantined"] += 1
        elif row.status == "duplicate":
            self.files["duplicates"] += 1
            collection["duplicates"] += 1
        else:
            self.files["ok"] += 1
            counts = {
                "pieces": 1,
                "tokens": row.tokens,
                "notes": row.notes,
                "duration_s": row.duration_s,
            }
            self.splits[row.split].update(counts)
            collection.update(counts)
            collection[f"{row.split}_pieces"] += 1
            self.labels.update(f"{k}={v}" for k, v in row.labels.items())

    def publish(self, where: str) -> None:
        """Moves (or uploads) the manifest and failures into the slice directory."""
        for file, name in ((self.manifest, "manifest.jsonl"), (self.failures, "failures.jsonl")):
            file.close()
            storage.make_readable(file.name)
            storage.publish_file(file.name, storage.join(where, name))


def _failure_code(reason: str) -> str:
    if reason.startswith("worker process died"):
        return "worker_crashed"
    if reason.startswith("timed out"):
        return "timeout"
    return "tokenize_error"


def _hash_in_parent(url: str) -> str | None:
    """The hash of a file whose worker crashed (the worker could not report it)."""
    try:
        return content_hash(storage.read_bytes(url))
    except Exception:
        return None


def _owned(digest: str | None, name: str, cfg: PrepareConfig) -> bool:
    """Whether this slice reports the file; unreadable files are placed by their name."""
    key = digest or content_hash(name.encode())
    return slice_of(key, cfg.num_slices) == cfg.slice_index


def _quarantine(file: SourceFile, digest: str | None, code: str, detail: str) -> ManifestRow:
    return ManifestRow(
        file.name, file.url, digest, "quarantined", labels=file.labels, reason=code, detail=detail
    )


def _record(file, result, cfg, writers, tally) -> None:
    if isinstance(result, OtherSlice):
        return
    if isinstance(result, TaskFailure):
        digest = _hash_in_parent(file.url)
        if _owned(digest, file.name, cfg):
            tally.add(_quarantine(file, digest, _failure_code(result.reason), result.reason))
        return
    if isinstance(result, Rejection):
        if _owned(result.hash, file.name, cfg):
            tally.add(_quarantine(file, result.hash, result.code, result.detail))
        return
    assert isinstance(result, TokenizedFile)
    row = ManifestRow(
        file.name,
        file.url,
        result.hash,
        "ok",
        labels=file.labels,
        notes=result.notes,
        duration_s=result.duration_s,
        tracks=result.tracks,
        programs=result.programs,
        tokens=result.tokens,
    )
    if result.hash in tally.by_hash:
        row.status, row.duplicate_of = "duplicate", tally.by_hash[result.hash]
        tally.add(row)
        return
    tally.by_hash[result.hash] = file.name
    row.split = "val" if result.hash == tally.val_hash else split_of(result.hash, cfg.split)
    row.shard = writers[row.split].append(result.sample, result.tokens)
    tally.tokens += row.tokens
    tally.add(row)


def nearest_val(files: list, cfg: PrepareConfig) -> str | None:
    """The content hash of the piece sent to val when the fractions alone would send none
    there (a small source): the one whose hash falls nearest above the val range, so that the
    choice is by content, the same on every machine. None when some piece falls in val already
    or the source has fewer than three files (one to train on, one to validate, one spare)."""
    digests = set()
    for file in files:
        with contextlib.suppress(Exception):  # unreadable: quarantined later, by the workers
            digests.add(content_hash(storage.read_bytes(file.url)))
    if len(digests) < 3 or any(split_of(d, cfg.split) == "val" for d in digests):
        return None
    train = [d for d in digests if split_of(d, cfg.split) == "train"]
    chosen = min(train, key=lambda d: int(d[:12], 16), default=None)
    if chosen is not None:
        log.info(
            "%d files and split.val=%g would leave val empty: the piece %s goes to val",
            len(files),
            cfg.split.val,
            chosen[:12],
        )
    return chosen


def run_slice(cfg: PrepareConfig) -> dict:
    """Processes this slice and writes its shards, manifest, failures and card."""
    # Before any file is read: a tokenizer_from that names no artifact is refused here.
    base = base_tokenizer_of(cfg.tokenizer, cfg.tokenizer_from)
    listing = discover(cfg)
    files = listing.files
    log.info(
        "%d MIDI files listed from %s; this is slice %d of %d",
        listing.count,
        cfg.source,
        cfg.slice_index,
        cfg.num_slices,
    )
    writers = {
        s: ShardWriter(
            cfg.output, shard_prefix(s, cfg), cfg.shards.max_bytes, cfg.shards.max_pieces
        )
        for s in SPLITS
    }
    val_hash = None
    # Every slice of a small local source hashes all of it: they all choose the same piece
    # (object storage is read once, by the workers).
    small = listing.count <= SMALL_SOURCE and not storage.is_remote(cfg.source)
    if cfg.split.val > 0 and small:
        files = list(files)
        val_hash = nearest_val(files, cfg)
    tally = SliceTally(val_hash)
    for file, reason in listing.unconverted:
        if _owned(None, file.name, cfg):
            tally.add(_quarantine(file, None, "conversion_failed", reason))
    setup = WorkerSetup(
        cfg.tokenizer, cfg.limits, cfg.num_slices, cfg.slice_index, cfg.tokenizer_from
    )
    start = time.monotonic()
    startup = 0.0
    # Redrawn once a second: on a slow console every redraw is a blocking write in the one
    # process that collects the workers' results.
    bar = tqdm(total=listing.count, unit="file", desc="tokenize", smoothing=0.05, mininterval=1)
    with ResilientPool(
        process_file, cfg.workers, cfg.limits.timeout_s, init_worker, (setup,)
    ) as pool:
        # Two walks of one lazy listing: one feeds the workers, one names their results.
        files, feed = itertools.tee(files)
        for i, (file, result) in enumerate(zip(files, pool.imap(feed), strict=True)):
            if i == 0:
                # Spawned workers import MidiTok (and with it torch) before the first result.
                startup = time.monotonic() - start
            _record(file, result, cfg, writers, tally)
            bar.update()
            if i % 64 == 0:
                bar.set_postfix(
                    refresh=False,
                    tokens_per_s=f"{tally.tokens / bar.format_dict['elapsed']:.0f}"
                    if bar.format_dict["elapsed"]
                    else "-",
                )
        restarts = pool.restarts
    bar.close()
    elapsed = time.monotonic() - start
    shards = {s: w.close() for s, w in writers.items()}
    card = _slice_card(cfg, tally, shards, elapsed, startup, restarts, base_fingerprint(base))
    log.info(
        "slice %d: %d files in %.1f s (%.1f files/s, %.0f tokens/s), %d quarantined",
        cfg.slice_index,
        tally.files["total"],
        elapsed,
        tally.files["total"] / max(elapsed, 1e-9),
        tally.tokens / max(elapsed, 1e-9),
        tally.files["quarantined"],
    )
    _write_slice(cfg, tally, card)
    return card


def _slice_card(
    cfg,
    tally: SliceTally,
    shards: dict,
    elapsed: float,
    startup: float,
    restarts: int,
    base_tokenizer: str,
) -> dict:
    splits = {}
    for split in SPLITS:
        counts = tally.splits[split]
        splits[split] = {
            "pieces": counts["pieces"],
            "tokens": counts["tokens"],
            "notes": counts["notes"],
            "duration_s": round(counts["duration_s"], 3),
            "shards": shards[split],
        }
    config = config_dict(cfg)
    files = tally.files
    return {
        "slice": {"index": cfg.slice_index, "count": cfg.num_slices},
        "base_tokenizer": base_tokenizer,
        "splits": splits,
        "files": {k: files[k] for k in ("total", "ok", "duplicates", "quarantined")},
        "failures": {
            "total": files["quarantined"],
            "by_reason": dict(sorted(tally.by_reason.items())),
        },
        "labels": dict(sorted(tally.labels.items())),
        "collections": {
            name: _collection_counts(counts) for name, counts in sorted(tally.collections.items())
        },
        "throughput": {
            "seconds": round(elapsed, 2),
            "startup_s": round(startup, 2),
            "workers": cfg.workers,
            "files_per_s": round(files["total"] / max(elapsed, 1e-9), 1),
            "tokens_per_s": round(tally.tokens / max(elapsed, 1e-9)),
            "worker_restarts": restarts,
            "peak_rss_mb": peak_rss_mb(),
            "cpu_s": cpu_seconds(),
        },
        "config": config,
    }


COLLECTION_COUNTS = (
    "pieces",
    "tokens",
    "notes",
    "duration_s",
    *(f"{split}_pieces" for split in SPLITS),
    "duplicates",
    "quarantined",
)


def _collection_counts(counts: Counter) -> dict:
    """A collection's kept pieces (with their tokens, notes and seconds, and how many fell in
    each split), duplicates and quarantined files."""
    out = {key: counts[key] for key in COLLECTION_COUNTS}
    out["duration_s"] = round(out["duration_s"], 3)
    return out


def peak_rss_mb() -> dict:
    """Peak resident memory of this process and of its largest worker so far, in MiB."""
    mib = 1024  # ru_maxrss is in KiB on Linux
    return {
        "collector": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / mib),
        "worker": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / mib),
    }


def cpu_seconds() -> dict:
    """CPU seconds of this process (the collector) and of its workers so far (start-up
    included): files per CPU second is the rate a busy machine does not distort."""
    collector = resource.getrusage(resource.RUSAGE_SELF)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "collector": round(collector.ru_utime + collector.ru_stime, 2),
        "workers": round(workers.ru_utime + workers.ru_stime, 2),
    }


def _write_slice(cfg: PrepareConfig, tally: SliceTally, card: dict) -> None:
    where = slice_dir(cfg.output, cfg.slice_index, cfg.num_slices)
    tally.publish(where)
    # The card goes last: a slice directory without it is an unfinished slice.
    storage.write_bytes(storage.join(where, "card.json"), json.dumps(card, indent=2).encode())
