"""The built-in corpus: scores bundled with music21, converted to MIDI once and cached.

``music21:bach`` (about 430 chorales) is the quickstart default; ``music21:all`` takes every
collection (about 15k works, mostly folk tunes). Conversion runs in the resilient pool: a work
that music21 cannot export, or that takes too long, is recorded once (a ``.failed.json``
beside the cache entry) and reported as a quarantined source, never retried on every run.
"""

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from data_pipeline import storage
from data_pipeline.pool import ResilientPool, TaskFailure

log = logging.getLogger(__name__)

# Collections that are one composer's works: the collection names the composer.
COMPOSER_COLLECTIONS = {
    "bach": "bach",
    "beethoven": "beethoven",
    "chopin": "chopin",
    "corelli": "corelli",
    "cpebach": "cpebach",
    "handel": "handel",
    "haydn": "haydn",
    "josquin": "josquin",
    "joplin": "joplin",
    "monteverdi": "monteverdi",
    "mozart": "mozart",
    "palestrina": "palestrina",
    "schoenberg": "schoenberg",
    "schubert": "schubert",
    "schumann_clara": "schumann_clara",
    "schumann_robert": "schumann_robert",
    "verdi": "verdi",
    "weber": "weber",
    "webern": "webern",
    "ciconia": "ciconia",
}
FOLK_COLLECTIONS = {
    "essenFolksong",
    "oneills1850",
    "airdsAirs",
    "ryansMammoth",
    "miscFolk",
    "nottingham-dataset",
}


@dataclass(frozen=True)
class CorpusWork:
    """One work of the bundled corpus: a file, and a tune number inside ABC song books."""

    source_path: str
    number: str | None

    @property
    def name(self) -> str:
        return self.source_path + (f"#{self.number}" if self.number else "")

    @property
    def collection(self) -> str:
        return self.source_path.split("/", 1)[0]

    @property
    def labels(self) -> dict[str, str]:
        labels = {"collection": self.collection}
        if self.collection in COMPOSER_COLLECTIONS:
            labels["composer"] = COMPOSER_COLLECTIONS[self.collection]
        labels["genre"] = "folk" if self.collection in FOLK_COLLECTIONS else "art"
        return labels

    def cache_path(self, root: Path) -> Path:
        stem = self.source_path + (f"-{self.number}" if self.number else "")
        return root / f"{stem}.mid"


def parse_spec(source: str) -> list[str] | None:
    """``music21:bach+palestrina`` -> ["bach", "palestrina"]; ``music21:all`` -> None.

    ``+`` joins names because a comma on Hydra's command line means a list or a sweep."""
    spec = source.removeprefix("music21:").replace(",", "+")
    names = [n.strip() for n in spec.split("+") if n.strip()]
    if not names:
        raise ValueError(f"source={source}: name at least one collection, e.g. music21:bach")
    return None if names == ["all"] else names


def list_works(collections: list[str] | None) -> list[CorpusWork]:
    from music21 import corpus

    bundle = corpus.corpora.CoreCorpus().metadataBundle
    # Iterating the bundle itself indexes a list per item (O(n²): 12 s for 15k works); its
    # entry dict is the same data in one pass.
    entries = getattr(bundle, "_metadataEntries", None)
    entries = entries.values() if entries is not None else bundle
    works = {CorpusWork(str(e.sourcePath), str(e.number) if e.number else None) for e in entries}
    known = sorted({w.collection for w in works})
    if collections is not None:
        unknown = sorted(set(collections) - set(known))
        if unknown:
            raise ValueError(
                f"source=music21:{'+'.join(collections)}: unknown collection(s) {unknown}; "
                f"known: {', '.join(known)} (or music21:all)"
            )
        works = {w for w in works if w.collection in collections}
    return sorted(works, key=lambda w: (w.source_path, int(w.number or 0)))


def _separate_shared_meters(score) -> None:
    """ABC song books reuse one TimeSignature object in several measures, which the MIDI
    export rejects ("already found in this Stream"); give each measure its own copy."""
    from music21 import meter

    owners: set[int] = set()
    for container in score.recurse(streamsOnly=True, includeSelf=True):
        for ts in list(container.getElementsByClass(meter.TimeSignature)):
            if id(ts) in owners:
                container.replace(ts, copy.deepcopy(ts))
            else:
                owners.add(id(ts))


def convert_work(task: tuple[CorpusWork, str]) -> str:
    """Worker: converts one work to MIDI at the given path (written atomically)."""
    import music21
    from music21 import corpus

    work, out = task
    score = corpus.parse(work.source_path, number=work.number)
    _separate_shared_meters(score)
    storage.write_bytes(out, music21.midi.translate.music21ObjectToMidiFile(score).writestr())
    return out


def cache_root(cache_dir: str) -> Path:
    import music21

    return Path(cache_dir) / f"music21-{music21.__version__}"


def ensure_converted(
    works: list[CorpusWork], root: Path, workers: int, timeout_s: float
) -> dict[CorpusWork, str]:
    """Converts what the cache lacks. Returns the failure reason of each work that failed."""
    todo = []
    for work in works:
        path = work.cache_path(root)
        if not path.exists() and not path.with_suffix(".failed.json").exists():
            todo.append((work, str(path)))
    if todo:
        log.info("converting %d music21 works to MIDI (cached in %s)", len(todo), root)
        start = time.monotonic()
        with ResilientPool(convert_work, workers, timeout_s) as pool:
            bar = tqdm(pool.imap(todo), total=len(todo), unit="work", desc="music21 → MIDI")
            for (work, path), result in zip(todo, bar, strict=True):
                if isinstance(result, TaskFailure):
                    storage.write_bytes(
                        str(Path(path).with_suffix(".failed.json")),
                        json.dumps({"work": work.name, "reason": result.reason}).encode(),
                    )
        elapsed = time.monotonic() - start
        log.info(
            "converted %d works in %.1f s (%.1f works/s)",
            len(todo),
            elapsed,
            len(todo) / max(elapsed, 1e-9),
        )
    failures = {}
    for work in works:
        marker = work.cache_path(root).with_suffix(".failed.json")
        if marker.exists():
            failures[work] = json.loads(marker.read_text())["reason"]
    return failures
