"""Musical metrics of one piece (MusPy's definitions) over a ``symusic.Score``.

Drum tracks are ignored throughout. A beat is a quarter note. Note times are resampled to a
grid of ``STEPS_PER_BEAT`` steps per beat, so values do not depend on the file's ticks per
quarter; a note lasts at least one step. Metrics undefined for a piece without pitched notes
(or, for IOI and groove, without two onsets or two measures) are NaN.
"""

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from symusic import Score

from data_pipeline.midi_file import MidiFileError, barline_ticks, read_score

log = logging.getLogger(__name__)

# MusPy's own resolution: fine enough for 32nd notes and for triplets.
STEPS_PER_BEAT = 24
MIDI_SUFFIXES = {".mid", ".midi"}

_MAJOR = np.array([1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1], dtype=bool)
_NATURAL_MINOR = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0], dtype=bool)
# Row k is a scale on root k % 12: the 12 major scales, then the 12 natural minor scales.
SCALES = np.stack([np.roll(mode, root) for mode in (_MAJOR, _NATURAL_MINOR) for root in range(12)])


@dataclass(frozen=True)
class _PitchedNotes:
    """The non-drum notes of a score on the beat grid, plus its measures."""

    pitch: np.ndarray
    start: np.ndarray
    end: np.ndarray
    barlines: np.ndarray  # grid step of every barline, the last one at or after the final end

    @property
    def length(self) -> int:
        return int(self.end.max(initial=0))


def _to_steps(ticks, ticks_per_quarter: int) -> np.ndarray:
    steps = np.asarray(ticks, dtype=np.float64) * (STEPS_PER_BEAT / ticks_per_quarter)
    return np.rint(steps).astype(np.int64)


def _barlines(score: Score, length: int) -> np.ndarray:
    """Grid steps of the barlines (``barline_ticks``), the last one at or after ``length``, so
    that every step of the music lies in a measure."""
    scale = STEPS_PER_BEAT / score.ticks_per_quarter
    ticks = []
    for tick in barline_ticks(score):
        ticks.append(tick)
        if round(tick * scale) >= length:  # as _to_steps rounds: half to even
            break
    return np.unique(_to_steps(ticks, score.ticks_per_quarter))


def _pitched_notes(score: Score) -> _PitchedNotes:
    tracks = [track.notes.numpy() for track in score.tracks if not track.is_drum]

    def column(name: str) -> np.ndarray:
        # The empty int64 array keeps a score without pitched tracks concatenable.
        return np.concatenate([notes[name] for notes in tracks] + [np.zeros(0, np.int64)])

    pitch, onset = column("pitch"), column("time")
    start = _to_steps(onset, score.ticks_per_quarter)
    end = np.maximum(_to_steps(onset + column("duration"), score.ticks_per_quarter), start + 1)
    return _PitchedNotes(pitch, start, end, _barlines(score, int(end.max(initial=0))))


def _sounding_pitches(notes: _PitchedNotes) -> np.ndarray:
    """How many distinct pitches sound at each grid step: MusPy's boolean piano roll, summed."""
    order = np.lexsort((notes.start, notes.pitch))
    pitch, start, end = notes.pitch[order], notes.start[order], notes.end[order]
    # A note is cut to begin where earlier notes of its pitch have ended, so a unison doubled
    # across tracks counts once. Lifting each pitch above the last lets one running maximum
    # serve all pitches: a lower pitch's ends never reach a higher pitch's starts.
    lift = pitch * (notes.length + 1)
    reached = np.concatenate([[0], np.maximum.accumulate(end + lift)[:-1]]) - lift
    start = np.maximum(start, reached)
    sounding = start < end
    edges = np.bincount(start[sounding], minlength=notes.length + 1) - np.bincount(
        end[sounding], minlength=notes.length + 1
    )
    return np.cumsum(edges)[:-1]


def _entropy(histogram: np.ndarray) -> float:
    if histogram.sum() == 0:
        return math.nan
    probability = histogram[histogram > 0] / histogram.sum()
    return float(-(probability * np.log2(probability)).sum())


def pitch_range(score: Score) -> float:
    """Highest minus lowest pitch, in semitones."""
    pitch = _pitched_notes(score).pitch
    return float(pitch.max() - pitch.min()) if pitch.size else math.nan


def n_pitches_used(score: Score) -> float:
    """Number of distinct pitches (0 for a piece without notes, as in MusPy)."""
    return float(np.unique(_pitched_notes(score).pitch).size)


def n_pitch_classes_used(score: Score) -> float:
    """Number of distinct pitch classes (0 for a piece without notes, as in MusPy)."""
    return float(np.unique(_pitched_notes(score).pitch % 12).size)


def polyphony(score: Score) -> float:
    """Mean number of pitches sounding, over the grid steps where at least one sounds."""
    sounding = _sounding_pitches(_pitched_notes(score))
    active = np.count_nonzero(sounding)
    return float(sounding.sum() / active) if active else math.nan


def polyphony_rate(score: Score, threshold: int = 2) -> float:
    """Share of grid steps, from time 0 to the last note's end, with more than ``threshold``
    pitches sounding (MusPy counts ``> threshold``, so by default three or more)."""
    sounding = _sounding_pitches(_pitched_notes(score))
    return float(np.mean(sounding > threshold)) if sounding.size else math.nan


def pitch_entropy(score: Score) -> float:
    """Base-2 entropy of the normalized histogram of the notes' pitches."""
    return _entropy(np.bincount(_pitched_notes(score).pitch, minlength=128))


def pitch_class_entropy(score: Score) -> float:
    """Base-2 entropy of the normalized histogram of the notes' pitch classes."""
    return _entropy(np.bincount(_pitched_notes(score).pitch % 12, minlength=12))


def scale_consistency(score: Score) -> float:
    """Largest share of notes inside one scale, over the 12 major and 12 natural minor scales."""
    histogram = np.bincount(_pitched_notes(score).pitch % 12, minlength=12)
    if histogram.sum() == 0:
        return math.nan
    return float((SCALES @ histogram).max() / histogram.sum())


def empty_beat_rate(score: Score) -> float:
    """Share of beats, from time 0 to the beat holding the last note's end, during which no
    note sounds. As in MusPy a held note fills every beat it overlaps, not only its onset's;
    unlike MusPy, a note ending exactly on a beat does not fill the beat it ends on."""
    sounding = _sounding_pitches(_pitched_notes(score))
    if not sounding.size:
        return math.nan
    n_beats = -(-sounding.size // STEPS_PER_BEAT)
    beats = np.zeros(n_beats * STEPS_PER_BEAT, dtype=np.int64)
    beats[: sounding.size] = sounding
    return float(np.mean(~beats.reshape(n_beats, STEPS_PER_BEAT).any(axis=1)))


def groove_consistency(score: Score) -> float:
    """One minus the mean Hamming distance between the onset patterns of neighbouring measures,
    each distance divided by the measure's length in grid steps (MusPy's measure_resolution).

    Measures follow the time signatures; when neighbours differ in length the shorter pattern
    is padded with silence. Unlike MusPy no empty measure is added after a piece that ends on
    a barline. NaN for pieces shorter than two measures.
    """
    notes = _pitched_notes(score)
    if notes.length == 0 or notes.barlines.size < 3:
        return math.nan
    onsets = np.unique(notes.start)
    measure = np.searchsorted(notes.barlines, onsets, side="right") - 1
    position = onsets - notes.barlines[measure]
    n_measures = notes.barlines.size - 1
    per_measure = np.bincount(measure, minlength=n_measures)
    # Onsets at the same position in the next measure: the ones the Hamming distance forgives.
    width = int(np.diff(notes.barlines).max())
    cells = measure * width + position
    shared = np.bincount(measure[np.isin(cells + width, cells)], minlength=n_measures)[:-1]
    hamming = per_measure[:-1] + per_measure[1:] - 2 * shared
    lengths = np.diff(notes.barlines)
    return float(1 - np.mean(hamming / np.maximum(lengths[:-1], lengths[1:])))


def note_density(score: Score) -> float:
    """Notes per beat (quarter note), from time 0 to the last note's end."""
    notes = _pitched_notes(score)
    return notes.pitch.size * STEPS_PER_BEAT / notes.length if notes.length else math.nan


def mean_ioi(score: Score) -> float:
    """Mean inter-onset interval in beats, between consecutive distinct onset times."""
    onsets = np.unique(_pitched_notes(score).start)
    return float(np.diff(onsets).mean() / STEPS_PER_BEAT) if onsets.size > 1 else math.nan


METRICS: dict[str, Callable[[Score], float]] = {
    metric.__name__: metric
    for metric in (
        pitch_range,
        n_pitches_used,
        n_pitch_classes_used,
        polyphony,
        polyphony_rate,
        pitch_entropy,
        pitch_class_entropy,
        scale_consistency,
        empty_beat_rate,
        groove_consistency,
        note_density,
        mean_ioi,
    )
}


def compute_all(score: Score) -> dict[str, float]:
    return {name: metric(score) for name, metric in METRICS.items()}


def read_midi_dir(path: str | Path) -> tuple[dict[str, Score], dict[str, str]]:
    """Every MIDI file under ``path`` as a score, keyed by its path relative to ``path``, and
    the files that are not whole MIDI files with the reason (each also said in a warning)."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES)
    scores, unreadable = {}, {}
    for file in files:
        name = file.relative_to(root).as_posix()
        try:
            scores[name] = read_score(file.read_bytes())
        except MidiFileError as exc:
            log.warning("skipping unreadable MIDI file %s: %s", file, exc)
            unreadable[name] = f"unreadable: {exc}"
    if unreadable:
        log.warning(
            "skipped %d of %d MIDI files under %s as unreadable", len(unreadable), len(files), root
        )
    return scores, unreadable


def metrics_for_midi_dir(path: str | Path) -> dict[str, dict[str, float]]:
    """Metrics of every readable MIDI file under ``path``, keyed by its relative path."""
    scores, _ = read_midi_dir(path)
    return {name: compute_all(score) for name, score in scores.items()}
