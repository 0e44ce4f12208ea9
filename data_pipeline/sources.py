"""Where MIDI comes from: a local directory tree, an fsspec URL, or the built-in corpus."""

import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import TypeVar

from data_pipeline import music21_corpus, storage
from data_pipeline.config import PrepareConfig

MIDI_SUFFIXES = (".mid", ".midi")
T = TypeVar("T")


@dataclass(frozen=True)
class SourceFile:
    """One input file: where its bytes are, its name inside the source, its labels, and for
    a converted score the notes its source writes (for the length check)."""

    url: str
    name: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    written_notes: int | None = None


@dataclass
class SourceListing:
    # Drawn lazily (a walk of a local tree), so a prepare task never holds the whole listing.
    files: Iterable[SourceFile]
    count: int
    # Inputs that never became a MIDI file (built-in corpus works that cannot be converted;
    # the file's url names the work), and why.
    unconverted: list[tuple[SourceFile, str]] = field(default_factory=list)


def labels_from_path(name: str, levels: list[str]) -> dict[str, str]:
    parts = name.split("/")[:-1]
    return {key: value for key, value in zip(levels, parts, strict=False)}


def discover(cfg: PrepareConfig) -> SourceListing:
    """The source's files, the first ``max_files`` of its sorted listing, in a seeded order
    mixed over ``shards.shuffle_window`` files."""
    if cfg.source.startswith("music21:"):
        listing = _music21(cfg)
    else:
        listing = _files(cfg.source, cfg.labels.path_levels)
    if cfg.max_files is not None:
        listing.files = islice(listing.files, cfg.max_files)
        listing.count = min(listing.count, cfg.max_files)
    listing.files = mixed(listing.files, cfg.shards.shuffle_window, cfg.seed)
    return listing


def mixed(items: Iterable[T], window: int, seed: int) -> Iterator[T]:
    """``items`` in a seeded random order, each drawn from the next ``window`` of them (all of
    them when there are fewer): the same order on every machine and for every number of
    workers, holding at most ``window`` items."""
    rng = random.Random(seed)
    pool: list[T] = []
    for item in items:
        if len(pool) < window:
            pool.append(item)
            continue
        i = rng.randrange(window)
        yield pool[i]
        pool[i] = item
    rng.shuffle(pool)
    yield from pool


def _files(source: str, levels: list[str]) -> SourceListing:
    root = source.removeprefix("file://")
    if not storage.is_remote(source) and not os.path.isdir(root):
        raise FileNotFoundError(
            f"source={source}: no such directory. Give a directory of .mid/.midi files, an "
            "fsspec URL (s3://bucket/prefix) or the built-in corpus (source=music21:bach)"
        )
    # Counted by a walk of its own (names only, no file opened): the progress bar's total.
    count = sum(1 for _ in storage.iter_files(source, MIDI_SUFFIXES))
    return SourceListing(_source_files(source, root, levels), count)


def _source_files(source: str, root: str, levels: list[str]) -> Iterator[SourceFile]:
    prefix = source.rstrip("/") + "/"
    for url in storage.iter_files(source, MIDI_SUFFIXES):
        name = url[len(prefix) :] if url.startswith(prefix) else os.path.relpath(url, root)
        yield SourceFile(url, name, labels_from_path(name, levels))


def _music21(cfg: PrepareConfig) -> SourceListing:
    collection_labels = music21_corpus.collection_labels
    works = music21_corpus.list_works(music21_corpus.CorpusSpec.parse(cfg.source))
    if cfg.max_files is not None:
        works = works[: cfg.max_files]
    root = music21_corpus.cache_root(cfg.cache_dir)
    failed = music21_corpus.ensure_converted(works, root, cfg.workers, cfg.limits)
    works = [w for w in works if w not in failed]
    labels = music21_corpus.work_labels(works, root)
    files = [SourceFile(str(w.cache_path(root)), w.name, labels[w], w.written_notes) for w in works]
    unconverted = [
        (SourceFile(f"music21:{w.name}", w.name, collection_labels(w.collection)), why)
        for w, why in failed.items()
    ]
    return SourceListing(files, len(files), unconverted)
