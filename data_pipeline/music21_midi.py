"""A music21 score as MIDI bytes: music21's own export, minus two costs that buy nothing here.

music21's MIDI export merges tied notes (``Stream.stripTies``) one group at a time, and each
group re-sorts the part, rescans its spanners and searches every measure for the notes to
remove: time grows with the square of the part's length, most of a long score's conversion.
``merge_ties`` is the same algorithm (music21 10's ``stripTies`` with ``matchByPitch=True``,
what the export asks for) over a list, with the spanners read once and the merged-away notes
removed from their measures in one call each. And the export expands repeats on a deep copy of
every part, repeats or not: a part without repeat marks is used as it is (the score is parsed
for this conversion alone). The export runs with both in place; the MIDI bytes are music21's
(``tests/unit/data_pipeline/test_music21_midi.py``).
"""

import contextlib
from collections.abc import Iterator


def score_to_midi(score) -> bytes:
    """The MIDI file music21 writes for ``score`` (which it may change: parse it for this)."""
    from music21.midi import translate

    with _lean_export():
        return translate.music21ObjectToMidiFile(score).writestr()


@contextlib.contextmanager
def _lean_export() -> Iterator[None]:
    from music21 import bar, repeat, spanner, stream

    strip_ties, expand_repeats = stream.Stream.stripTies, stream.Stream.expandRepeats

    def lean_strip_ties(self, *, inPlace=False, matchByPitch=True):
        if not matchByPitch:
            return strip_ties(self, inPlace=inPlace, matchByPitch=matchByPitch)
        target = self if inPlace else self.coreCopyAsDerivation("stripTies")
        target.streamStatus.beams = False
        if target.hasPartLikeStreams():
            for part in target.getElementsByClass(stream.Stream):
                part.stripTies(inPlace=True)
        elif target.hasVoices():
            for voice in target.voices:
                voice.stripTies(inPlace=True)
        else:
            merge_ties(target)
        return None if inPlace else target

    def lean_expand_repeats(self, copySpanners=True):
        marks = (bar.Repeat, repeat.RepeatExpression, spanner.RepeatBracket)
        if self.recurse().getElementsByClass(marks).first() is None:
            return self  # nothing to expand: the deep copy would be all it did
        return expand_repeats(self, copySpanners=copySpanners)

    stream.Stream.stripTies = lean_strip_ties
    stream.Stream.expandRepeats = lean_expand_repeats
    try:
        yield
    finally:
        stream.Stream.stripTies, stream.Stream.expandRepeats = strip_ties, expand_repeats


def _ends_tie(n, last, last_at: int | None, connected: list[int]) -> bool:
    """music21's ``updateEndMatch`` with ``matchByPitch=True``."""
    from music21 import chord, note

    tie = getattr(n, "tie", None)
    if not isinstance(n, chord.Chord) and tie is not None and tie.type == "stop":
        return True
    if last is None or last_at not in connected:
        return False
    if (
        hasattr(last, "pitch")
        and hasattr(n, "pitch")
        and not isinstance(last, chord.Chord)
        and not isinstance(n, chord.Chord)
        and last.pitch == n.pitch
    ):
        return True
    if not isinstance(n, note.Note) and hasattr(last, "pitches") and hasattr(n, "pitches"):
        if len(last.pitches) != len(n.pitches):
            return False
        return all(
            a.step == b.step and a.isEnharmonic(b)
            for a, b in zip(last.pitches, n.pitches, strict=False)
        )
    return False


def merge_ties(container) -> None:
    """Tied notes of ``container`` (no parts or voices directly inside) become one note each,
    in place: music21's ``stripTies`` algorithm in one pass."""
    from music21.common.numberTools import opFrac
    from music21.exceptions21 import StreamException

    flat = container.flatten()
    items = [e for e in flat.notesAndRests if e.quarterLength > 0]
    spanners = list(flat.spanners)
    connected: list[int] = []
    delete: list[int] = []
    for i, n in enumerate(items):
        last_at, last = (i - 1, items[i - 1]) if i else (None, None)
        tie = getattr(n, "tie", None)
        ends = None
        if tie is not None and tie.type == "start":
            if last_at is None or last_at not in connected:
                connected = [i]
            else:
                connected.append(i)
            ends = False
        elif tie is not None and tie.type == "continue":
            # A continuation of the group, or (not matching it) the start of another.
            matches = connected and _ends_tie(n, last, last_at, connected)
            connected = [*connected, i] if matches else [i]
            ends = False
        if ends is None:
            ends = _ends_tie(n, last, last_at, connected)
        if not ends:
            continue
        connected.append(i)
        if len(connected) < 2:
            connected = []
            continue
        added = 0
        for q in connected[1:]:
            added += items[q].quarterLength
            delete.append(q)
        if added == 0:
            raise StreamException("aggregated ties have a zero duration sum")
        first = items[connected[0]]
        if not first.duration.linked:
            first.duration.linked = True
        first.quarterLength = opFrac(first.quarterLength + added)
        first.tie = None
        first.informSites()
        for spanner in spanners:
            for q in connected[1:]:
                if items[q] in spanner:
                    spanner.replaceSpannedElement(items[q], first)
        connected = []
    _remove(container, [items[q] for q in delete])


def _remove(container, elements: list) -> None:
    """Removes each element from the stream of ``container``'s hierarchy that holds it (the
    first in ``recurse`` order, as ``Stream.remove(recurse=True)`` finds it), one call per
    stream."""
    if not elements:
        return
    owner: dict[int, object] = {}
    for where in [container, *container.recurse(streamsOnly=True)]:
        for element in [*where._elements, *where._endElements]:
            owner.setdefault(id(element), where)
    by_owner: dict[int, tuple[object, list]] = {}
    for element in elements:
        where = owner.get(id(element))
        if where is not None:  # not in the hierarchy: remove(recurse=True) skips it too
            by_owner.setdefault(id(where), (where, []))[1].append(element)
    for where, found in by_owner.values():
        where.remove(found)
