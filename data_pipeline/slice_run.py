"""One slice of a prepare run: every listed file is hashed, and those whose hash falls in this
slice are checked, tokenized and written to shards; the rest of the run merges the slices.

Results come back from the workers in listing order, so the shards and manifest do not depend
on the number of workers, and "first of a duplicate set" means first in sorted name order.
"""

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from omegaconf import OmegaConf
from tqdm import tqdm

from data_pipeline import storage
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
from data_pipeline.tokenizer import base_fingerprint, build_base_tokenizer

log = logging.getLogger(__name__)


def slice_dir(output: str, index: int, count: int) -> str:
    return storage.join(output, "slices", f"{index:04d}-of-{count:04d}")


def shard_prefix(split: str, cfg: PrepareConfig) -> str:
    return split if cfg.num_slices == 1 else f"{split}-{cfg.slice_index:04d}"


@dataclass
class SliceTally:
    rows: list[ManifestRow] = field(default_factory=list)
    by_hash: dict[str, str] = field(default_factory=dict)
    tokens: int = 0

    def add(self, row: ManifestRow) -> None:
        self.rows.append(row)

    def failures(self) -> list[ManifestRow]:
        return [r for r in self.rows if r.status == "quarantined"]


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
        tokens=len(result.tokens),
    )
    if result.hash in tally.by_hash:
        row.status, row.duplicate_of = "duplicate", tally.by_hash[result.hash]
        tally.add(row)
        return
    tally.by_hash[result.hash] = file.name
    row.split = split_of(result.hash, cfg.split)
    meta = {
        "hash": result.hash,
        "name": file.name,
        "labels": file.labels,
        "notes": row.notes,
        "duration_s": row.duration_s,
        "tracks": row.tracks,
        "programs": row.programs,
    }
    row.shard = writers[row.split].write(result.hash, result.tokens, meta)
    tally.tokens += row.tokens
    tally.add(row)


def run_slice(cfg: PrepareConfig) -> dict:
    """Processes this slice and writes its shards, manifest, failures and card."""
    listing = discover(cfg)
    files = listing.files
    log.info(
        "%d MIDI files listed from %s; this is slice %d of %d",
        len(files),
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
    tally = SliceTally()
    for name, reason in listing.unconverted:
        if _owned(None, name, cfg):
            tally.add(
                ManifestRow(
                    name,
                    f"music21:{name}",
                    None,
                    "quarantined",
                    reason="conversion_failed",
                    detail=reason,
                )
            )
    setup = WorkerSetup(cfg.tokenizer, cfg.limits, cfg.num_slices, cfg.slice_index)
    start = time.monotonic()
    startup = 0.0
    bar = tqdm(total=len(files), unit="file", desc="tokenize", smoothing=0.05)
    with ResilientPool(
        process_file, cfg.workers, cfg.limits.timeout_s, init_worker, (setup,)
    ) as pool:
        for i, (file, result) in enumerate(
            zip(files, pool.imap([f.url for f in files]), strict=True)
        ):
            if i == 0:
                # Spawned workers import MidiTok (and with it torch) before the first result.
                startup = time.monotonic() - start
            _record(file, result, cfg, writers, tally)
            bar.update()
            if i % 64 == 0:
                bar.set_postfix(
                    tokens_per_s=f"{tally.tokens / bar.format_dict['elapsed']:.0f}"
                    if bar.format_dict["elapsed"]
                    else "-"
                )
        restarts = pool.restarts
    bar.close()
    elapsed = time.monotonic() - start
    shards = {s: w.close() for s, w in writers.items()}
    card = _slice_card(cfg, tally, shards, elapsed, startup, restarts)
    log.info(
        "slice %d: %d files in %.1f s (%.1f files/s, %.0f tokens/s), %d quarantined",
        cfg.slice_index,
        len(files),
        elapsed,
        len(files) / max(elapsed, 1e-9),
        tally.tokens / max(elapsed, 1e-9),
        len(tally.failures()),
    )
    _write_slice(cfg, tally, card)
    return card


def _slice_card(
    cfg, tally: SliceTally, shards: dict, elapsed: float, startup: float, restarts: int
) -> dict:
    ok = [r for r in tally.rows if r.status == "ok"]
    splits = {}
    for split in SPLITS:
        rows = [r for r in ok if r.split == split]
        splits[split] = {
            "pieces": len(rows),
            "tokens": sum(r.tokens for r in rows),
            "notes": sum(r.notes for r in rows),
            "duration_s": round(sum(r.duration_s for r in rows), 3),
            "shards": shards[split],
        }
    failures = tally.failures()
    labels = Counter(f"{k}={v}" for r in ok for k, v in r.labels.items())
    config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    return {
        "slice": {"index": cfg.slice_index, "count": cfg.num_slices},
        "base_tokenizer": base_fingerprint(build_base_tokenizer(cfg.tokenizer)),
        "splits": splits,
        "files": {
            "total": len(tally.rows),
            "ok": len(ok),
            "duplicates": sum(r.status == "duplicate" for r in tally.rows),
            "quarantined": len(failures),
        },
        "failures": {
            "total": len(failures),
            "by_reason": dict(sorted(Counter(r.reason for r in failures).items())),
        },
        "labels": dict(sorted(labels.items())),
        "throughput": {
            "seconds": round(elapsed, 2),
            "startup_s": round(startup, 2),
            "workers": cfg.workers,
            "files_per_s": round(len(tally.rows) / max(elapsed, 1e-9), 1),
            "tokens_per_s": round(tally.tokens / max(elapsed, 1e-9)),
            "worker_restarts": restarts,
        },
        "config": config,
    }


def jsonl(rows: list[ManifestRow]) -> bytes:
    return "".join(json.dumps(r.to_json()) + "\n" for r in rows).encode()


def _write_slice(cfg: PrepareConfig, tally: SliceTally, card: dict) -> None:
    where = slice_dir(cfg.output, cfg.slice_index, cfg.num_slices)
    storage.write_bytes(storage.join(where, "manifest.jsonl"), jsonl(tally.rows))
    storage.write_bytes(storage.join(where, "failures.jsonl"), jsonl(tally.failures()))
    # The card goes last: a slice directory without it is an unfinished slice.
    storage.write_bytes(storage.join(where, "card.json"), json.dumps(card, indent=2).encode())
