"""A handcrafted description of a piece, the probes' symbolic baseline: music21's jSymbolic-style
feature extractors (``music21.features``) and mtrain's MusPy-definition metrics, one vector,
computed in a resilient process pool and cached per piece."""

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipeline.midi_file import read_score
from data_pipeline.pool import ResilientPool, TaskFailure
from mtrain.evaluation.music_metrics import METRICS, compute_all

log = logging.getLogger(__name__)

# Extractors that read what a MIDI file made from a score does not carry (lyrics' language),
# always the same value here: columns that say nothing.
LEFT_OUT = {"LanguageFeature"}
# Bump when the extractors or their order change: cached vectors of another version are stale.
VERSION = 1


def extractors() -> list:
    from music21 import features

    return [e for e in features.extractorsById("all") if e.__name__ not in LEFT_OUT]


def width() -> int:
    return sum(e().dimensions for e in extractors()) + len(METRICS)


def describe(midi: bytes) -> np.ndarray:
    """Worker: the feature vector of one MIDI file; NaN where an extractor fails on it (the
    probe fills those with the column's mean)."""
    from music21 import converter, features

    stream = converter.parseData(midi, format="midi")
    # One DataInstance shares its derived streams (chordified, by part, ...) among extractors:
    # each extractor building its own repeats that work dozens of times.
    data = features.DataInstance(stream)
    parts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for extractor in extractors():
            try:
                parts.append(np.asarray(extractor(data).extract().vector, dtype=np.float64))
            except Exception:  # an extractor undefined for this piece (no chords, one voice)
                parts.append(np.full(extractor().dimensions, np.nan))
        metrics = compute_all(read_score(midi))
    parts.append(np.array([metrics[name] for name in METRICS], dtype=np.float64))
    return np.concatenate(parts).astype(np.float32)


@dataclass
class HandcraftedConfig:
    # Cached vectors, one file per piece id (the sha256 of its MIDI file), so a second run,
    # or one over a larger set, computes only the pieces it has not seen.
    cache_dir: str = "~/.cache/mtrain/handcrafted"
    workers: int = 2
    # A piece whose extraction runs longer is left NaN (a few large scores take minutes).
    timeout_s: float = 120.0


def handcrafted_vectors(ids: list[str], midis: list[bytes], cfg: HandcraftedConfig) -> np.ndarray:
    """[pieces, width()] for the pieces ``ids`` (their MIDI files ``midis``), from the cache
    where it has them; a piece that fails or times out is a row of NaN, counted in the log."""
    cache = Path(cfg.cache_dir).expanduser() / f"v{VERSION}"
    cache.mkdir(parents=True, exist_ok=True)
    rows = [np.full(width(), np.nan, dtype=np.float32) for _ in ids]
    todo = []
    for i, piece_id in enumerate(ids):
        path = cache / f"{piece_id}.npy"
        if path.exists():
            rows[i] = np.load(path)
        else:
            todo.append(i)
    failed = 0
    if todo:
        with ResilientPool(describe, cfg.workers, cfg.timeout_s) as pool:
            results = pool.imap(midis[i] for i in todo)
            bar = tqdm(results, total=len(todo), unit="piece", desc="handcrafted features")
            for i, result in zip(todo, bar, strict=True):
                if isinstance(result, TaskFailure):
                    failed += 1
                    log.warning("handcrafted features of %s: %s", ids[i][:12], result.reason)
                    continue
                rows[i] = result
                np.save(cache / f"{ids[i]}.npy", result)
    log.info(
        "handcrafted features: %d pieces from the cache, %d computed, %d failed (NaN rows)",
        len(ids) - len(todo),
        len(todo) - failed,
        failed,
    )
    return np.stack(rows)
