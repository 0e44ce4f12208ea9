"""Procedural MIDI for tests: small real pieces (melody, bass, drums) and every kind of bad
file the pipeline must quarantine."""

import multiprocessing as mp
import os
import random
from pathlib import Path

import numpy as np
import symusic

TPQ = 480
SCALE = (0, 2, 4, 5, 7, 9, 11)


def piece(seed: int, bars: int = 8, drums: bool = True, programs=(0, 33)) -> symusic.Score:
    """A piece in a major key: a melody, a bass line and (optionally) a drum track."""
    rng = random.Random(seed)
    score = symusic.Score(TPQ)
    score.tempos.append(symusic.Tempo(0, rng.choice([90.0, 100.0, 120.0, 140.0])))
    score.time_signatures.append(symusic.TimeSignature(0, 4, 4))
    tonic = 60 + rng.randrange(-5, 6)
    melody = symusic.Track(name="melody", program=programs[0])
    bass = symusic.Track(name="bass", program=programs[1])
    for bar in range(bars):
        for beat in range(4):
            start = (bar * 4 + beat) * TPQ
            for half in (0, 1):
                if rng.random() < 0.8:
                    pitch = tonic + 12 + SCALE[rng.randrange(7)]
                    t = start + half * TPQ // 2
                    melody.notes.append(symusic.Note(t, TPQ // 2, pitch, rng.randrange(60, 110)))
            if beat % 2 == 0:
                bass.notes.append(
                    symusic.Note(start, TPQ * 2 - 10, tonic - 12 + SCALE[rng.randrange(3) * 2], 80)
                )
    score.tracks.append(melody)
    score.tracks.append(bass)
    if drums:
        kit = symusic.Track(name="drums", program=0, is_drum=True)
        for bar in range(bars):
            for beat in range(4):
                start = (bar * 4 + beat) * TPQ
                kit.notes.append(symusic.Note(start, TPQ // 4, 36 if beat % 2 == 0 else 38, 100))
                kit.notes.append(symusic.Note(start + TPQ // 2, TPQ // 4, 42, 70))
        score.tracks.append(kit)
    return score


def write_piece(path: Path, seed: int, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    piece(seed, **kwargs).dump_midi(str(path))
    return path


def write_corpus(root: Path, count: int, collections=("jazz", "folk")) -> list[Path]:
    """``count`` distinct pieces spread over collection sub-directories."""
    return [
        write_piece(root / collections[i % len(collections)] / f"piece{i:03d}.mid", seed=i)
        for i in range(count)
    ]


def write_two_styles(root: Path, count: int) -> list[Path]:
    """``count`` pieces in two audibly different collections: ``band`` (piano melody, bass and
    drums, 8 bars) and ``duo`` (flute over cello, no drums, 4 bars), alternating."""
    styles = {
        "band": {"drums": True, "programs": (0, 33)},
        "duo": {"drums": False, "programs": (73, 42), "bars": 4},
    }
    names = list(styles)
    return [
        write_piece(root / names[i % 2] / f"piece{i:03d}.mid", seed=i, **styles[names[i % 2]])
        for i in range(count)
    ]


def write_two_kinds(root: Path, count: int) -> list[Path]:
    """``write_two_styles``' pieces under a second level of directories naming a second label,
    the lead instrument: piano or organ, alternating in pairs (independent of the style)."""
    styles = {
        "band": {"drums": True, "bass": 33},
        "duo": {"drums": False, "bass": 42, "bars": 4},
    }
    leads = {"piano": 0, "organ": 19}
    paths = []
    for i in range(count):
        style, lead = list(styles)[i % 2], list(leads)[i // 2 % 2]
        kwargs = dict(styles[style])
        kwargs["programs"] = (leads[lead], kwargs.pop("bass"))
        paths.append(write_piece(root / style / lead / f"piece{i:03d}.mid", seed=i, **kwargs))
    return paths


def write_bad_files(root: Path) -> dict[str, str]:
    """One file per kind of bad input; maps file name -> the reason code expected."""
    root.mkdir(parents=True, exist_ok=True)
    good = write_piece(root / "truncated.mid", seed=999).read_bytes()
    (root / "empty.mid").write_bytes(b"")
    (root / "random.mid").write_bytes(random.Random(1).randbytes(4096))
    (root / "truncated.mid").write_bytes(good[: len(good) // 3])
    (root / "text.mid").write_text("this is not a MIDI file, just text with a .mid name\n")
    header = b"MThd\x00\x00\x00\x06\x00\x01\x00\x02\x01\xe0"
    (root / "header_only.mid").write_bytes(header)
    (root / "garbage_after_header.mid").write_bytes(header + random.Random(2).randbytes(2048))
    silent = symusic.Score(TPQ)
    silent.tracks.append(symusic.Track(name="silent"))
    silent.dump_midi(str(root / "zero_notes.mid"))
    return {
        "empty.mid": "empty",
        "random.mid": "not_midi",
        "truncated.mid": "parse_error",
        "text.mid": "not_midi",
        "header_only.mid": "no_notes",
        "garbage_after_header.mid": "parse_error",
        "zero_notes.mid": "no_notes",
    }


# A corpus at scale: every piece different in length, meter, tempo, instruments and density,
# and a share of files broken the ways real crawls are (cut short, garbage, empty, no notes).
METERS = ((4, 4), (3, 4), (2, 4), (6, 8), (5, 4), (7, 8), (12, 8))
BAD_KINDS = ("empty", "garbage", "truncated", "text", "zero_notes")
STYLES = ("band", "piano", "choir", "strings", "folk", "electronic", "brass", "solo")


def varied_piece(seed: int) -> symusic.Score:
    """A procedural piece: 1-64 bars in one of several meters, one to six instruments (drums
    in some), one to three tempos, notes of varied density, length and loudness."""
    rng = np.random.default_rng(seed)
    score = symusic.Score(TPQ)
    num, den = METERS[rng.integers(len(METERS))]
    bar_ticks = TPQ * 4 * num // den
    bars = int(rng.choice((1, 2, 4, 8, 16, 32, 64), p=(0.05, 0.1, 0.2, 0.3, 0.2, 0.1, 0.05)))
    score.time_signatures.append(symusic.TimeSignature(0, num, den))
    for change in range(int(rng.integers(1, 4))):
        at = 0 if change == 0 else int(rng.integers(bars)) * bar_ticks
        score.tempos.append(symusic.Tempo(at, float(rng.uniform(50, 200))))
    sixteenths = bars * bar_ticks // (TPQ // 4)
    tonic = int(rng.integers(48, 72))
    for t in range(int(rng.integers(1, 7))):
        drums = t > 0 and rng.random() < 0.3
        track = symusic.Track(name=f"t{t}", program=int(rng.integers(128)), is_drum=bool(drums))
        n = max(1, int(sixteenths * rng.uniform(0.1, 1.0)))
        starts = np.sort(rng.integers(0, sixteenths, n)) * (TPQ // 4)
        durations = rng.choice((TPQ // 4, TPQ // 2, TPQ, 2 * TPQ, 4 * TPQ), n)
        if drums:
            pitches = rng.choice((36, 38, 42, 46, 49, 51), n)
        else:
            walk = np.cumsum(rng.integers(-2, 3, n)) % 14
            octave = 12 * int(rng.integers(-2, 2))
            pitches = tonic + octave + np.take(SCALE, walk % 7) + 12 * (walk // 7)
        track.notes = symusic.Note.from_numpy(
            starts.astype(np.int32),
            durations.astype(np.int32),
            np.clip(pitches, 21, 108).astype(np.int8),
            rng.integers(30, 127, n).astype(np.int8),
        )
        score.tracks.append(track)
    return score


def bad_bytes(kind: str, seed: int) -> bytes:
    rng = random.Random(seed)
    if kind == "empty":
        return b""
    if kind == "garbage":
        return rng.randbytes(rng.randrange(16, 8192))
    if kind == "truncated":
        good = varied_piece(seed).dumps_midi()
        return good[: max(20, len(good) // rng.randrange(2, 6))]
    if kind == "text":
        return f"not a MIDI file ({seed})\n".encode()
    silent = symusic.Score(TPQ)
    silent.tracks.append(symusic.Track(name="silent"))
    return silent.dumps_midi()


def scale_file(index: int, bad_share: float, duplicate_share: float) -> tuple[str, bytes]:
    """File ``index`` of a scale corpus: its path under the root and its bytes."""
    rng = random.Random(index)
    style = STYLES[index % len(STYLES)]
    name = f"{style}/{index // 1000:04d}/{index:07d}.mid"
    draw = rng.random()
    if draw < bad_share:
        return name, bad_bytes(BAD_KINDS[index % len(BAD_KINDS)], index)
    if draw < bad_share + duplicate_share and index > 0:
        return name, varied_piece(rng.randrange(index)).dumps_midi()
    return name, varied_piece(index).dumps_midi()


def _write_range(job: tuple[str, range, float, float]) -> int:
    root, indices, bad_share, duplicate_share = job
    written = 0
    for index in indices:
        name, data = scale_file(index, bad_share, duplicate_share)
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            written += f.write(data)
    return written


def write_scale_corpus(
    root: Path,
    count: int,
    workers: int = 1,
    bad_share: float = 0.03,
    duplicate_share: float = 0.01,
) -> int:
    """Writes ``count`` files under ``root/<style>/<thousand>/`` (the same bytes for the same
    arguments, whatever ``workers``); returns the bytes written."""
    jobs = [
        (str(root), range(start, min(start + 500, count)), bad_share, duplicate_share)
        for start in range(0, count, 500)
    ]
    if workers <= 1:
        return sum(map(_write_range, jobs))
    # Spawned: forking a process that has imported torch (the benches, pytest) can crash.
    with mp.get_context("spawn").Pool(workers) as pool:
        return sum(pool.imap_unordered(_write_range, jobs))
