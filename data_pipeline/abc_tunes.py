"""ABC song books: each tune's labels from its own header fields, and its MIDI from abc2midi.

abc2midi (shipped in symusic's wheel) converts a whole book in one process start, where
music21 parses a tune at a time; both expand repeats. Chord symbols (``"Am"``) are not
played, as music21's conversion never played them: a tune is its melody.
"""

import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import symusic

ABC2MIDI = Path(symusic.__file__).parent / "bin" / "abc2midi"
# -NGUI: chord symbols are not played; -NCOM: comments are not copied into the MIDI file.
ABC2MIDI_FLAGS = ("-silent", "-NGUI", "-NCOM")

# Sharps (+) or flats (-) of each major key; a mode shifts it by its distance from major.
_MAJOR_FIFTHS = {
    "Cb": -7, "Gb": -6, "Db": -5, "Ab": -4, "Eb": -3, "Bb": -2, "F": -1, "C": 0,
    "G": 1, "D": 2, "A": 3, "E": 4, "B": 5, "F#": 6, "C#": 7,
}  # fmt: skip
_MODES = {
    "maj": ("major", 0),
    "ion": ("major", 0),
    "mix": ("mixolydian", -1),
    "dor": ("dorian", -2),
    "m": ("minor", -3),
    "min": ("minor", -3),
    "aeo": ("minor", -3),
    "phr": ("phrygian", -4),
    "lyd": ("lydian", 1),
    "loc": ("locrian", -5),
}
# One dance, two spellings in the books.
_SPELLINGS = {"slipjig": "slip jig", "doublejig": "double jig"}
# Levels of an Essen origin (``O: Europa, Mitteleuropa, Deutschland, Hessen``) broader than
# a country or region.
_CONTINENTS = {
    "europa", "mitteleuropa", "osteuropa", "westeuropa", "nordeuropa", "suedeuropa",
    "suedosteuropa", "asien", "ostasien", "afrika", "amerika", "nordamerika",
}  # fmt: skip


@dataclass(frozen=True)
class AbcTune:
    """One tune of a book: its reference number (``X:``) and the labels its header gives."""

    number: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)


def read_tunes(text: str) -> list[AbcTune]:
    """The tunes of an ABC book, in order, each with the labels of its header (the fields
    from ``X:`` to the first ``K:``; fields in the tune body change the music, not the tune)."""
    tunes = []
    header: dict[str, str] | None = None
    number = None
    for line in text.splitlines():
        match = re.match(r"([A-Za-z]):\s*(.*)", line)
        if match and match.group(1) == "X":
            number = _reference_number(match.group(2))
            header = {} if number is not None else None
            continue
        if header is None or not match:
            continue
        name, value = match.group(1), _strip_comment(match.group(2))
        # The first occurrence counts: T: and N: repeat, the first title is the tune's.
        header.setdefault(name, value)
        if name == "K":
            tunes.append(AbcTune(number, header_labels(header)))
            header = None
    return tunes


def header_labels(fields: dict[str, str]) -> dict[str, str]:
    """Labels from a tune's header fields: meter (M:), key, mode and key signature (K:),
    tune type (R:) and region (O:). A field that is absent or unreadable gives no label."""
    labels = {}
    if meter := meter_label(fields.get("M", "")):
        labels["meter"] = meter
    labels.update(key_labels(fields.get("K", "")))
    if kind := tune_type(fields.get("R", "")):
        labels["tune_type"] = kind
    if region := origin_region(fields.get("O", "")):
        labels["region"] = region
    return labels


def meter_label(value: str) -> str | None:
    """``M:`` as a fraction: ``C`` is 4/4, ``C|`` 2/2, Essen's ``FREI...`` free."""
    value = value.strip().rstrip("]").strip()
    if value in ("C", "C|"):
        return "4/4" if value == "C" else "2/2"
    if value.upper().startswith("FREI"):
        return "free"
    match = re.fullmatch(r"(\d+)\s*/\s*(\d+)", value)
    return f"{match.group(1)}/{match.group(2)}" if match else None


def key_labels(value: str) -> dict[str, str]:
    """``K:`` as key (``A dorian``), mode (``dorian``) and key signature (``+2``: sharps,
    ``-3``: flats). ABC modes are case-insensitive and known by their first three letters;
    a missing mode is major. Bagpipe keys (``HP``), ``none`` and unknown tonics give none."""
    match = re.match(r"\s*([A-G])([#b]?)\s*([A-Za-z]*)", value)
    if not match:
        return {}
    tonic = match.group(1) + match.group(2)
    word = match.group(3).lower()
    if word and not _starts_clef_or_octave(word):
        mode = _MODES.get(word if word == "m" else word[:3])
        if mode is None:
            return {}
    else:
        mode = _MODES["maj"]
    name, shift = mode
    if tonic not in _MAJOR_FIFTHS:
        return {}
    fifths = _MAJOR_FIFTHS[tonic] + shift
    if abs(fifths) > 7:
        return {}
    return {"key": f"{tonic} {name}", "mode": name, "key_signature": f"{fifths:+d}"}


def tune_type(value: str) -> str | None:
    """``R:`` reduced to its first term, lower case: ``Reel`` and ``reel`` are one type,
    ``Romanze, Ballade, Lied`` is ``romanze``, ``Liebes - Lied`` is ``liebes-lied``."""
    first = re.split(r"[,.;\]]", value, maxsplit=1)[0]
    first = _joined(first.lower()).strip("-? ")
    return _SPELLINGS.get(first, first) or None


def origin_region(value: str) -> str | None:
    """The country or region of an origin (``O:``) such as Essen's ``Europa, Mitteleuropa,
    Deutschland (BRD), Hessen`` -> ``Deutschland``: the first level below the continents, up
    to a ``/`` or ``;`` (a song of two countries counts for the first)."""
    for part in value.split(","):
        level = _joined(re.split(r"[/;(]", part, maxsplit=1)[0]).rstrip(".")
        if level and level.lower() not in _CONTINENTS:
            # Aird's books shout (O:SCOTCH): one spelling per region.
            return level.title()
    return None


def _joined(text: str) -> str:
    """Spaces collapsed, and none around a hyphen (``Nord - Amerika`` -> ``Nord-Amerika``)."""
    return re.sub(r"\s+", " ", re.sub(r"\s*-\s*", "-", text)).strip()


def _reference_number(value: str) -> str | None:
    # music21 numbers a book's tunes by X: as an integer (X:0001 is tune 1).
    match = re.match(r"\s*(\d+)", value)
    return str(int(match.group(1))) if match else None


def _strip_comment(value: str) -> str:
    return value.split("%", 1)[0].strip()


def _starts_clef_or_octave(word: str) -> bool:
    # K:G bass, K:A treble8 name a clef after the key, not a mode.
    return word.startswith(("bass", "treble", "alto", "tenor", "clef", "octave", "transpose"))


class Abc2MidiError(RuntimeError):
    pass


def convert_book(book: bytes, timeout_s: float) -> dict[str, bytes]:
    """MIDI bytes of every tune of an ABC book that abc2midi converts, by reference number.

    abc2midi writes ``<stem><X>.mid`` beside its input, so it runs in a directory of its own
    with a fixed stem: the numbers are read back from the file names unambiguously."""
    with tempfile.TemporaryDirectory(prefix="abc2midi-") as where:
        Path(where, "t.abc").write_bytes(book)
        try:
            done = subprocess.run(
                [str(ABC2MIDI), "t.abc", *ABC2MIDI_FLAGS],
                cwd=where,
                capture_output=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise Abc2MidiError(f"abc2midi timed out after {timeout_s:g} s") from exc
        out = {}
        for path in Path(where).glob("t*.mid"):
            number = path.stem[1:]
            if number.isdigit():
                out[str(int(number))] = path.read_bytes()
        if not out:
            tail = (done.stderr or done.stdout).decode(errors="replace").strip()[-300:]
            raise Abc2MidiError(f"abc2midi wrote no MIDI (exit {done.returncode}): {tail}")
        return out
