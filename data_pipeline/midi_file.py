"""MIDI files: their bytes read strictly, and where their bars fall.

A file is checked chunk by chunk before symusic parses it, so a cut-off or padded file is
refused whatever the parser's own leniency (symusic 0.5 reads a truncated track as if it simply
ended).
"""

import struct
from collections.abc import Iterator

import symusic

MIDI_MAGIC = (b"MThd", b"RIFF")  # a Standard MIDI File, or one wrapped in RIFF (.rmi)


class MidiFileError(ValueError):
    """Bytes that are not a usable MIDI file; ``reason`` is the quarantine code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def structure_error(data: bytes) -> str | None:
    """Why a Standard MIDI File's chunks do not add up, or None when they do: a 6-byte MThd,
    then chunks each whole inside the file."""
    if data[:4] != b"MThd":
        return None  # RIFF-wrapped: left to the parser
    if len(data) < 14 or struct.unpack(">I", data[4:8])[0] != 6:
        return "the MThd header chunk is not 6 bytes long"
    tracks = struct.unpack(">H", data[10:12])[0]
    offset, found = 14, 0
    while offset + 8 <= len(data) and found < tracks:
        kind = data[offset : offset + 4]
        (length,) = struct.unpack(">I", data[offset + 4 : offset + 8])
        if offset + 8 + length > len(data):
            return (
                f"chunk {kind!r} at byte {offset} claims {length} bytes but the file ends "
                f"{len(data) - offset - 8} bytes later: the file is truncated or corrupt"
            )
        found += kind == b"MTrk"
        offset += 8 + length
    # Fewer tracks than announced, ending on a chunk boundary, is read as what it holds (a
    # header-only file is a piece without notes, as symusic 0.6 reads it).
    return None


def read_score(data: bytes) -> symusic.Score:
    """The score in ``data``, or MidiFileError with reason empty / not_midi / parse_error."""
    if not data:
        raise MidiFileError("empty", "the file is empty (0 bytes)")
    if not data.startswith(MIDI_MAGIC):
        raise MidiFileError(
            "not_midi", f"starts with {data[:8]!r}, not the MIDI header 'MThd': not a MIDI file"
        )
    problem = structure_error(data)
    if problem:
        raise MidiFileError("parse_error", problem)
    try:
        return symusic.Score.from_midi(data)
    except Exception as exc:  # symusic raises RuntimeError("MiniMidi: ...") on bad bytes
        raise MidiFileError("parse_error", f"{type(exc).__name__}: {exc}") from exc


def barline_ticks(score: symusic.Score) -> Iterator[int]:
    """The tick of every bar line of ``score`` from 0 on, without end. Bars are 4/4 until the
    first time signature, as in MIDI; a time signature takes effect at the first bar line at or
    after it (MIDI's delayed time signature, and how MidiTok places it when it tokenizes), so a
    change off a bar line never cuts a bar short. Signatures with a zero numerator or
    denominator are ignored."""
    signatures = sorted(
        (sig for sig in score.time_signatures if sig.numerator > 0 and sig.denominator > 0),
        key=lambda sig: sig.time,
    )
    tick, ticks_per_bar, upcoming = 0, 4 * score.ticks_per_quarter, iter(signatures)
    sig = next(upcoming, None)
    while True:
        # Of the signatures up to this bar line, the last one sets the bar it starts.
        while sig is not None and sig.time <= tick:
            ticks_per_bar = max(1, 4 * score.ticks_per_quarter * sig.numerator // sig.denominator)
            sig = next(upcoming, None)
        yield tick
        tick += ticks_per_bar
