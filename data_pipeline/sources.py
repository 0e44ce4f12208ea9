"""Where MIDI comes from: a local directory tree, an fsspec URL, or the built-in corpus."""

import os
from dataclasses import dataclass, field

from data_pipeline import music21_corpus, storage
from data_pipeline.config import PrepareConfig

MIDI_SUFFIXES = (".mid", ".midi")


@dataclass(frozen=True)
class SourceFile:
    """One input file: where its bytes are, its name inside the source, its labels."""

    url: str
    name: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass
class SourceListing:
    files: list[SourceFile]
    # Inputs that never became a MIDI file (built-in corpus works music21 cannot export).
    unconverted: list[tuple[str, str]] = field(default_factory=list)


def labels_from_path(name: str, levels: list[str]) -> dict[str, str]:
    parts = name.split("/")[:-1]
    return {key: value for key, value in zip(levels, parts, strict=False)}


def discover(cfg: PrepareConfig) -> SourceListing:
    if cfg.source.startswith("music21:"):
        listing = _music21(cfg)
    else:
        listing = _files(cfg.source, cfg.labels.path_levels)
    if cfg.max_files is not None:
        listing.files = listing.files[: cfg.max_files]
    return listing


def _files(source: str, levels: list[str]) -> SourceListing:
    root = source.removeprefix("file://")
    if not storage.is_remote(source) and not os.path.isdir(root):
        raise FileNotFoundError(
            f"source={source}: no such directory. Give a directory of .mid/.midi files, an "
            "fsspec URL (s3://bucket/prefix) or the built-in corpus (source=music21:bach)"
        )
    urls = storage.list_files(source, MIDI_SUFFIXES)
    prefix = source.rstrip("/") + "/"
    files = []
    for url in urls:
        name = url[len(prefix) :] if url.startswith(prefix) else os.path.relpath(url, root)
        files.append(SourceFile(url, name, labels_from_path(name, levels)))
    return SourceListing(files)


def _music21(cfg: PrepareConfig) -> SourceListing:
    works = music21_corpus.list_works(music21_corpus.parse_spec(cfg.source))
    if cfg.max_files is not None:
        works = works[: cfg.max_files]
    root = music21_corpus.cache_root(cfg.cache_dir)
    failed = music21_corpus.ensure_converted(works, root, cfg.workers, cfg.limits.timeout_s)
    files = [
        SourceFile(str(w.cache_path(root)), w.name, w.labels) for w in works if w not in failed
    ]
    return SourceListing(files, [(w.name, reason) for w, reason in failed.items()])
