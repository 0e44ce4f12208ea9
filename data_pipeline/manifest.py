"""Content hashes and what follows from them: split, slice, duplicates.

Both the split and the slice come from the SHA-256 of the file's bytes, so they are the same
on every machine and every run, and a file renamed or moved keeps its split. They use
different bits of the hash, so a slice holds the same split fractions as the whole corpus.
"""

import hashlib
from dataclasses import dataclass, field, fields

from data_pipeline.config import SplitConfig

SPLITS = ("train", "val", "test")


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split_of(digest: str, fractions: SplitConfig) -> str:
    u = int(digest[:12], 16) / float(1 << 48)
    if u < fractions.test:
        return "test"
    if u < fractions.test + fractions.val:
        return "val"
    return "train"


def slice_of(digest: str, num_slices: int) -> int:
    return int(digest[12:24], 16) % num_slices


@dataclass
class ManifestRow:
    """One input file and what became of it: ok (in a shard), duplicate or quarantined."""

    name: str
    url: str
    hash: str | None
    status: str
    split: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    notes: int | None = None
    duration_s: float | None = None
    tracks: int | None = None
    programs: list[int] | None = None
    tokens: int | None = None
    shard: str | None = None
    reason: str | None = None
    detail: str | None = None
    duplicate_of: str | None = None

    def to_json(self) -> dict:
        # Not dataclasses.asdict: its deep copy of every field was a fifth of the per-file
        # work of the process that writes the shards.
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}
