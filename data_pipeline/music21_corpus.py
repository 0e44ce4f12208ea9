"""The built-in corpus: scores bundled with music21, converted to MIDI once and cached, with
the labels each score's own metadata gives.

``music21:bach`` (about 430 chorales) is the quickstart default; ``music21:all`` takes every
collection (about 15k works, mostly folk tunes). ABC song books go through abc2midi, a book
per process start (``abc_tunes``); every other score is parsed by music21 in the resilient
pool, the largest first so the slowest scores do not start last. A work that cannot be
converted, or takes too long, is recorded once (a ``.failed.json`` beside the cache entry) and
reported as a quarantined source, never retried on every run.
"""

import contextlib
import hashlib
import json
import logging
import math
import resource
import signal
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from data_pipeline import abc_tunes, storage
from data_pipeline.config import LimitsConfig
from data_pipeline.music21_midi import score_to_midi
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
    "beach": "beach",
    "johnson_j_r": "johnson_j_r",
    "liliuokalani": "liliuokalani",
    "luca": "luca",
    "lusitano": "lusitano",
}
FOLK_COLLECTIONS = {
    "essenFolksong",
    "oneills1850",
    "airdsAirs",
    "ryansMammoth",
    "miscFolk",
    "nottingham-dataset",
}
# Collections whose ABC ``R:`` field names a song genre (ballad, love song, xiaodiao), not a
# dance: their value is a ``song_type`` label, kept apart from the dance tunes' ``tune_type``.
SONG_GENRE_COLLECTIONS = {"essenFolksong"}


@dataclass(frozen=True)
class CorpusWork:
    """One work of the bundled corpus: a file, and a tune number inside ABC song books."""

    source_path: str
    number: str | None
    # Notes the score writes (music21's metadata; repeats not played out): the order of the
    # conversion queue, and what the length check compares the converted MIDI with.
    written_notes: int | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return self.source_path + (f"#{self.number}" if self.number else "")

    @property
    def collection(self) -> str:
        return self.source_path.split("/", 1)[0]

    @property
    def is_abc(self) -> bool:
        return self.source_path.endswith(".abc")

    def cache_path(self, root: Path) -> Path:
        """Where the work's MIDI file is cached: under the converter's own folder for ABC."""
        stem = self.source_path + (f"-{self.number}" if self.number else "")
        return (abc_cache(root) if self.is_abc else root) / f"{stem}.mid"


def collection_labels(collection: str) -> dict[str, str]:
    """What the collection says of each of its works: its name, composer, folk or art."""
    labels = {"collection": collection}
    if collection in COMPOSER_COLLECTIONS:
        labels["composer"] = COMPOSER_COLLECTIONS[collection]
    labels["genre"] = "folk" if collection in FOLK_COLLECTIONS else "art"
    return labels


@dataclass(frozen=True)
class CorpusSpec:
    """The collections a ``music21:`` source names: ``music21:bach+palestrina`` (those),
    ``music21:all`` (every one), ``music21:all-palestrina`` (every one but those after ``all-``,
    joined by ``-``: a base to fine-tune on the ones left out)."""

    collections: tuple[str, ...] | None  # None: all
    excluded: str = ""  # '-'-joined names, matched against the known ones (some contain '-')

    @classmethod
    def parse(cls, source: str) -> "CorpusSpec":
        # ``+`` joins names because a comma on Hydra's command line means a list or a sweep.
        spec = source.removeprefix("music21:").replace(",", "+")
        if spec.startswith("all-"):
            return cls(None, spec.removeprefix("all-"))
        names = tuple(n.strip() for n in spec.split("+") if n.strip())
        if not names:
            raise ValueError(f"source={source}: name at least one collection, e.g. music21:bach")
        return cls(None if names == ("all",) else names)

    def select(self, known: list[str]) -> set[str]:
        """The collections of ``known`` this spec takes; a name not known is refused."""
        if self.collections is None:
            excluded, unknown = _split_known(self.excluded, known)
            chosen, source = set(known) - set(excluded), f"all-{self.excluded}"
        else:
            unknown = sorted(set(self.collections) - set(known))
            chosen, source = set(self.collections), "+".join(self.collections)
        if unknown:
            raise ValueError(
                f"source=music21:{source}: unknown collection(s) {unknown}; "
                f"known: {', '.join(known)} (or music21:all, music21:all-<name>-<name>)"
            )
        return chosen


def _split_known(joined: str, known: list[str]) -> tuple[list[str], list[str]]:
    """``palestrina-nottingham-dataset`` -> (["palestrina", "nottingham-dataset"], []): the
    longest known name at each place; what matches none comes back as unknown."""
    names, unknown, rest = [], [], joined
    while rest:
        match = max(
            (k for k in known if rest == k or rest.startswith(k + "-")), key=len, default=None
        )
        if match is None:
            head, _, rest = rest.partition("-")
            unknown.append(head)
            continue
        names.append(match)
        rest = rest[len(match) + 1 :]
    return names, unknown


def list_works(spec: CorpusSpec) -> list[CorpusWork]:
    """The works of the collections ``spec`` names, in sorted order. A song book's
    whole-book entry is left out where its tunes are listed one by one: it repeats them, and
    music21 cannot export it."""
    from music21 import corpus

    bundle = corpus.corpora.CoreCorpus().metadataBundle
    # Iterating the bundle itself indexes a list per item (O(n²): 12 s for 15k works); its
    # entry dict is the same data in one pass.
    entries = getattr(bundle, "_metadataEntries", None)
    entries = entries.values() if entries is not None else bundle
    works = {
        CorpusWork(
            str(e.sourcePath),
            str(e.number) if e.number else None,
            getattr(e.metadata, "noteCount", None),
        )
        for e in entries
    }
    numbered = {w.source_path for w in works if w.number is not None}
    works = {w for w in works if w.number is not None or w.source_path not in numbered}
    chosen = spec.select(sorted({w.collection for w in works}))
    works = {w for w in works if w.collection in chosen}
    return sorted(works, key=lambda w: (w.source_path, int(w.number or 0)))


def corpus_dir() -> Path:
    from music21 import corpus

    return Path(corpus.__file__).parent


def cache_root(cache_dir: str) -> Path:
    import music21

    return Path(cache_dir) / f"music21-{music21.__version__}"


def abc_cache(root: Path) -> Path:
    """ABC tunes' MIDI, apart from music21's: another converter (and its flags), other bytes."""
    import symusic

    flags = hashlib.sha256(" ".join(abc_tunes.ABC2MIDI_FLAGS).encode()).hexdigest()[:8]
    return root / f"abc2midi-symusic{symusic.__version__}-{flags}"


def _labels_path(midi: Path) -> Path:
    return midi.with_suffix(".json")


def _failed_path(midi: Path) -> Path:
    return midi.with_suffix(".failed.json")


def score_labels(score) -> dict[str, str]:
    """Labels a parsed music21 score states: meter, key signature and, where the score names
    it, key and mode (MusicXML's ``<mode>``, Humdrum's ``*G:``). Its composer field is not
    read: OCR debris and a dozen spellings per composer; the collection names the composer."""
    from music21 import key, meter

    labels = {}
    first_meter = next(iter(score.recurse().getElementsByClass(meter.TimeSignature)), None)
    if first_meter is not None:
        labels["meter"] = first_meter.ratioString
    first_key = next(iter(score.recurse().getElementsByClass(key.KeySignature)), None)
    if first_key is not None:
        labels["key_signature"] = f"{first_key.sharps:+d}"
        if isinstance(first_key, key.Key) and first_key.mode:
            labels["key"] = f"{first_key.tonic.name.replace('-', 'b')} {first_key.mode}"
            labels["mode"] = first_key.mode
    return labels


class ConversionTooSlow(Exception):
    pass


def _over_budget(*_) -> None:
    raise ConversionTooSlow


def _load_music21() -> None:
    """Worker start: music21 imported (seconds, overlapping abc2midi); SIGXCPU (the kernel's
    word that the CPU budget ``convert_work`` set ran out) stops the conversion, not the worker."""
    from music21 import corpus

    corpus.corpora.CoreCorpus()
    signal.signal(signal.SIGXCPU, _over_budget)


def convert_work(task: tuple[CorpusWork, str, float]) -> str:
    """Worker: converts one score with music21 to MIDI at the given path within a budget of
    CPU seconds, then writes its labels beside it (last: a cache entry with labels is
    complete). Both written atomically.

    The budget is CPU time (RLIMIT_CPU), not wall time: the same scores are converted on a busy
    machine as on a quiet one, so the cache, and the shards built from it, do not depend on
    the machine's load."""
    from music21 import corpus

    work, out, cpu_s = task
    used = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(used + cpu_s), hard))
    try:
        # forceSource: no pickle of the parsed score is written to music21's scratch folder
        # (gzip of a large score costs seconds, and nothing here parses a score twice).
        score = corpus.parse(work.source_path, number=work.number, forceSource=True)
        # Read before the export, which moves meters and keys to a conductor track.
        labels = score_labels(score)
        midi = score_to_midi(score)
    except ConversionTooSlow:
        raise ConversionTooSlow(
            f"the conversion took more than limits.convert_cpu_s={cpu_s:g} CPU seconds"
        ) from None
    finally:
        resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))
    storage.write_bytes(out, midi)
    storage.write_bytes(str(_labels_path(Path(out))), json.dumps(labels, sort_keys=True).encode())
    return out


def _convert_books(works: list[CorpusWork], root: Path, workers: int, timeout_s: float):
    """abc2midi over each book that has a tune missing from the cache: every tune it writes
    is cached, every tune it does not gets a failure marker. Books go ``workers`` at a time
    (threads that wait on abc2midi processes)."""
    books: dict[str, list[CorpusWork]] = defaultdict(list)
    for work in works:
        books[work.source_path].append(work)
    with ThreadPoolExecutor(workers) as threads:
        converted = threads.map(lambda path: _convert_book(path, timeout_s), books)
        bar = tqdm(converted, total=len(books), unit="book", desc="abc2midi", mininterval=1)
        for (midi, reason), tunes in zip(bar, books.values(), strict=True):
            for work in tunes:
                # A single-tune file is one work (no number): its one tune, whatever its X:.
                data = midi.get(work.number) if work.number else next(iter(midi.values()), None)
                path = work.cache_path(root)
                if data is None:
                    _mark_failed(work, path, reason)
                else:
                    storage.write_bytes(str(path), data)


def _convert_book(source_path: str, timeout_s: float) -> tuple[dict[str, bytes], str]:
    try:
        midi = abc_tunes.convert_book((corpus_dir() / source_path).read_bytes(), timeout_s)
        return midi, "abc2midi wrote no MIDI file for this tune"
    except abc_tunes.Abc2MidiError as exc:
        return {}, str(exc)


def _mark_failed(work: CorpusWork, path: Path, reason: str) -> None:
    storage.write_bytes(
        str(_failed_path(path)), json.dumps({"work": work.name, "reason": reason}).encode()
    )


def _converted(work: CorpusWork, root: Path) -> bool:
    path = work.cache_path(root)
    done = path if work.is_abc else _labels_path(path)
    return done.exists() or _failed_path(path).exists()


def ensure_converted(
    works: list[CorpusWork], root: Path, workers: int, limits: LimitsConfig
) -> dict[CorpusWork, str]:
    """Converts what the cache lacks. Returns the failure reason of each work that failed or
    was left unconverted."""
    # Conversion time grows with the square of a score's length (music21's tie and repeat
    # handling): the few whole string quartets would cost more than the rest of the corpus.
    # Decided on the written length, so the same scores are left out on every machine.
    too_long = {
        w: f"{w.written_notes} written notes > limits.convert_max_notes={limits.convert_max_notes}"
        for w in works
        if (w.written_notes or 0) > limits.convert_max_notes
    }
    todo = [w for w in works if w not in too_long and not _converted(w, root)]
    if todo:
        _convert(todo, root, workers, limits.timeout_s, limits.convert_cpu_s)
    failures = dict(too_long)
    for work in works:
        marker = _failed_path(work.cache_path(root))
        if marker.exists():
            failures[work] = json.loads(marker.read_text())["reason"]
    return failures


def _convert(
    todo: list[CorpusWork], root: Path, workers: int, timeout_s: float, cpu_s: float
) -> None:
    tunes = [w for w in todo if w.is_abc]
    # Largest first: the long scores overlap each other and the many short ones fill in
    # behind them, instead of one long score running alone at the end.
    scores = sorted((w for w in todo if not w.is_abc), key=lambda w: -(w.written_notes or 0))
    log.info(
        "converting %d ABC tunes (abc2midi) and %d scores (music21) to MIDI, cached in %s",
        len(tunes),
        len(scores),
        root,
    )
    start, cpu = time.monotonic(), _cpu_seconds()
    # The pool's workers import music21 (seconds) while abc2midi converts the books.
    # No wall-clock limit: convert_work's CPU budget bounds each score, whatever the load.
    pool = ResilientPool(convert_work, workers, math.inf, _load_music21) if scores else None
    with pool or contextlib.nullcontext():
        if tunes:
            _convert_books(tunes, root, workers, timeout_s)
        if pool is not None:
            items = [(work, str(work.cache_path(root)), cpu_s) for work in scores]
            results = tqdm(pool.imap(items), total=len(items), unit="score", desc="music21")
            for (work, path, _), result in zip(items, results, strict=True):
                if isinstance(result, TaskFailure):
                    _mark_failed(work, Path(path), result.reason)
    log.info(
        "converted %d works in %.1f s (%.0f CPU s, workers included)",
        len(todo),
        time.monotonic() - start,
        _cpu_seconds() - cpu,
    )


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (workers, abc2midi)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def work_labels(works: list[CorpusWork], root: Path) -> dict[CorpusWork, dict[str, str]]:
    """Every label of each converted work: its collection's, then its own (an ABC tune's
    header, a score's metadata as cached beside its MIDI)."""
    headers = _abc_headers(sorted({w.source_path for w in works if w.is_abc}))
    out = {}
    for work in works:
        labels = collection_labels(work.collection)
        if work.is_abc:
            own = dict(headers.get((work.source_path, work.number), {}))
            if work.collection in SONG_GENRE_COLLECTIONS and "tune_type" in own:
                own["song_type"] = own.pop("tune_type")
        else:
            path = _labels_path(work.cache_path(root))
            own = json.loads(path.read_text()) if path.exists() else {}
        out[work] = dict(sorted({**own, **labels}.items()))
    return out


def _abc_headers(books: list[str]) -> dict[tuple[str, str | None], dict[str, str]]:
    headers = {}
    for source_path in books:
        text = (corpus_dir() / source_path).read_bytes().decode("utf-8", errors="replace")
        tunes = abc_tunes.read_tunes(text)
        for tune in tunes:
            headers[(source_path, tune.number)] = tune.labels
        if len(tunes) == 1:
            headers[(source_path, None)] = tunes[0].labels
    return headers
