"""The corpus's score -> MIDI conversion: music21's export with a one-pass tie merge gives the
same bytes as music21's own, on real scores with tied notes."""

import pytest
from music21 import corpus, midi

from data_pipeline.music21_midi import merge_ties, score_to_midi


@pytest.mark.parametrize("work", ["bach/bwv10.7.mxl", "palestrina/Credo_10_d.krn"])
def test_the_midi_bytes_are_music21s_own(work):
    ours = score_to_midi(corpus.parse(work, forceSource=True))
    theirs = midi.translate.music21ObjectToMidiFile(corpus.parse(work, forceSource=True))
    assert ours == theirs.writestr()


def test_tied_notes_become_one_note_each():
    part = corpus.parse("palestrina/Credo_10_d.krn", forceSource=True).parts[0]
    tied = [n for n in part.recurse().notes if n.tie is not None]
    before = len(part.recurse().notes)
    length = part.highestTime
    merge_ties(part)
    assert tied and len(part.recurse().notes) < before
    assert all(n.tie is None or n.tie.type == "start" for n in part.recurse().notes)
    assert part.highestTime == length  # durations moved onto the first note, none lost
