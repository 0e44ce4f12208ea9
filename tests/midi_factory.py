"""Procedural MIDI for tests: small real pieces (melody, bass, drums) and every kind of bad
file the pipeline must quarantine."""

import random
from pathlib import Path

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
