"""Asked bar controls held by construction: at each sampling step, the ids whose music would
take an asked bar past what was asked (a note beyond its density, an onset beyond its
polyphony, a duration it must not hold) are masked, and so is ending the bar (a Bar, a
control, EOS) before it holds what was asked (its density, an onset of its polyphony, a
duration it must hold). The model still chooses everything the controls leave open.

MIDI-GPT's attribute controls are held the same way at sampling time. The mask works on what
MidiTok's classes compute (``data_pipeline.bar_controls``): notes of every track counted by
onset, durations in beats of the bar's time signature. Each model id is summarised once by
what its base tokens add to a bar (a learned piece may hold several notes and onsets), so a
step costs a few vector operations per row.
"""

from dataclasses import dataclass

import numpy as np
import torch

from data_pipeline.bar_controls import ATTRIBUTES
from data_pipeline.tokenizer import MusicTokenizer

NOTE_STARTS = ("Pitch", "PitchDrum", "NoteOn", "NoteOnDrum")
TIME_STEPS = ("Position", "TimeShift", "Rest")
# BarNoteDuration's flags: the duration each names, in quarter notes.
FLAG_QUARTERS = {
    "has_whole_notes": 4.0,
    "has_half_notes": 2.0,
    "has_quarter_notes": 1.0,
    "has_eighth_notes": 0.5,
    "has_sixteenth_notes": 0.25,
}
NONE = 1 << 20  # the minimum of no onset


def _beats(value: str) -> float:
    """A Duration token's value ('1.2.8': 1 + 2/8 beats) in beats of the time signature."""
    whole, part, resolution = (int(v) for v in value.split("."))
    return whole + part / resolution


@dataclass
class PieceEffects:
    """What each model id adds to the bar it is read in ([vocab] arrays), its leading Bar set
    aside (``opens``: what follows belongs to the bar it opens)."""

    opens: np.ndarray  # starts with a Bar
    lead: np.ndarray  # notes at the current onset, before the id's first time step
    steps: np.ndarray  # holds a time step: the current onset closes
    inner_max: np.ndarray  # notes at the onsets the id opens and closes itself
    inner_min: np.ndarray  # (NONE: no such onset)
    tail: np.ndarray  # notes at the onset open after it
    notes: np.ndarray
    owes: np.ndarray  # ends on a Position, which a note (or a Tempo) must follow
    # Ends on a note's Program, before its Pitch: the note is as good as written.
    pending: np.ndarray
    timed: np.ndarray  # holds a Duration
    denominator: np.ndarray  # the time signature it sets (0: none)
    # For each time-signature denominator the bar may have: flag -> whether the id writes a
    # note of that flag's duration.
    durations: dict[int, dict[str, np.ndarray]]

    @classmethod
    def of(cls, tokenizer: MusicTokenizer) -> "PieceEffects":
        base_names = {i: name.split("_", 1) for name, i in tokenizer.base.vocab.items()}
        denominators = sorted(
            {int(v.split("/")[1]) for k, v in base_names.values() if k == "TimeSig"} | {4}
        )
        vocab = tokenizer.vocab_size
        ints = {k: np.zeros(vocab, dtype=np.int64) for k in ("lead", "inner_max", "tail")}
        ints["notes"], ints["denominator"] = np.zeros(vocab, np.int64), np.zeros(vocab, np.int64)
        ints["inner_min"] = np.full(vocab, NONE, dtype=np.int64)
        flags = {
            k: np.zeros(vocab, dtype=bool) for k in ("opens", "steps", "owes", "pending", "timed")
        }
        durations = {d: {f: np.zeros(vocab, bool) for f in FLAG_QUARTERS} for d in denominators}
        music = range(tokenizer.num_specials, tokenizer.infill_offset)
        for model_id in music:
            expansion = tokenizer.decode_base(np.array([model_id])).tolist()
            if not all(i in base_names for i in expansion):
                continue  # a learned vocabulary's <unk>: no music
            parts = [base_names[i] for i in expansion]
            if parts[:1] and parts[0][0] == "Bar":
                flags["opens"][model_id] = True
                parts = parts[1:]
            onset, closed, beats = 0, [], []
            for kind, value in parts:
                if kind in NOTE_STARTS:
                    onset += 1
                    ints["notes"][model_id] += 1
                elif kind in TIME_STEPS:
                    if flags["steps"][model_id]:
                        closed.append(onset)
                    else:
                        ints["lead"][model_id] = onset
                    flags["steps"][model_id], onset = True, 0
                elif kind == "TimeSig":
                    ints["denominator"][model_id] = int(value.split("/")[1])
                elif kind == "Duration":
                    beats.append(_beats(value))
                    flags["timed"][model_id] = True
            if flags["steps"][model_id]:
                ints["tail"][model_id] = onset
            else:
                ints["lead"][model_id] = onset
            sounding = [n for n in closed if n]
            ints["inner_max"][model_id] = max(sounding, default=0)
            ints["inner_min"][model_id] = min(sounding, default=NONE)
            flags["owes"][model_id] = bool(parts) and parts[-1][0] == "Position"
            flags["pending"][model_id] = bool(parts) and parts[-1][0] == "Program"
            for d in denominators:
                own = ints["denominator"][model_id] or d
                quarters = {b * 4 / own for b in beats}
                for flag, length in FLAG_QUARTERS.items():
                    durations[d][flag][model_id] = length in quarters
        return cls(**flags, **ints, durations=durations)


@dataclass
class Ask:
    """One bar's asked values, as bounds on what the bar may hold."""

    density: tuple[int, int | None] | None = None  # (at least, at most)
    most_at_onset: tuple[int, bool] | None = None  # polyphony max: (p, whether p is the cap)
    least_at_onset: tuple[int, bool, bool] | None = None  # polyphony min: (m, cap, floor)
    holds: tuple[str, ...] = ()  # duration flags asked 1
    lacks: tuple[str, ...] = ()  # duration flags asked 0

    @classmethod
    def of(cls, values: dict[str, str]) -> "Ask":
        ask = cls()
        if "note_density" in values:
            v = values["note_density"]
            ask.density = (int(v[:-1]), None) if v.endswith("+") else (int(v), int(v))
        # MidiTok clips onset polyphony into [lowest, highest]: asking the highest asks at
        # least that many, asking the lowest at most that many.
        polyphony = ATTRIBUTES["polyphony_max"].values
        lowest, highest = polyphony[0], polyphony[-1]
        if "polyphony_max" in values:
            v = values["polyphony_max"]
            ask.most_at_onset = (int(v), v == highest)
        if "polyphony_min" in values:
            v = values["polyphony_min"]
            ask.least_at_onset = (int(v), v == highest, v == lowest)
        ask.holds = tuple(f for f in FLAG_QUARTERS if values.get(f) == "1")
        ask.lacks = tuple(f for f in FLAG_QUARTERS if values.get(f) == "0")
        return ask


@dataclass
class BarSoFar:
    """What one row's current bar holds: notes, the notes at the open onset, the most and the
    fewest at its closed onsets, the duration flags written, its time signature's
    denominator."""

    notes: int = 0
    onset: int = 0
    most: int = 0
    fewest: int = NONE
    flags: frozenset = frozenset()
    denominator: int = 4


class BarGuard:
    """Narrows a row's mask (``narrow``) by its current bar's asked values and follows what the
    row writes (``read``). ``asked``: bar (from 1) -> attribute -> value."""

    def __init__(self, tokenizer: MusicTokenizer, asked: dict[int, dict[str, str]], rows: int):
        self.effects = PieceEffects.of(tokenizer)
        self.asks = {bar: Ask.of(values) for bar, values in asked.items()}
        self.bars = [BarSoFar() for _ in range(rows)]
        self.enders = np.zeros(tokenizer.vocab_size, dtype=bool)  # what ends a bar
        self.enders[self.effects.opens] = True
        self.enders[list(tokenizer.control_index.values())] = True
        self.enders[tokenizer.eos_id] = True
        self.gave_way = 0  # steps where the asked values left nothing to draw

    def read(self, row: int, model_id: int) -> None:
        e, bar = self.effects, self.bars[row]
        if e.opens[model_id]:
            bar = BarSoFar(denominator=bar.denominator)
        self.bars[row] = self._after(bar, model_id)

    def _after(self, bar: BarSoFar, i: int) -> BarSoFar:
        e = self.effects
        denominator = int(e.denominator[i]) or bar.denominator
        flags = bar.flags | {f for f, has in e.durations[denominator].items() if has[i]}
        notes = bar.notes + int(e.notes[i])
        if not e.steps[i]:
            return BarSoFar(notes, bar.onset + int(e.lead[i]), bar.most, bar.fewest, flags,
                            denominator)  # fmt: skip
        closing = [n for n in (bar.onset + int(e.lead[i]),) if n]
        most = max([bar.most, int(e.inner_max[i]), *closing])
        fewest = min([bar.fewest, int(e.inner_min[i]), *closing])
        return BarSoFar(notes, int(e.tail[i]), most, fewest, flags, denominator)

    def narrow(self, row: int, bar_number: int, mask: torch.Tensor, ended: bool) -> None:
        """Row ``row`` is in bar ``bar_number``; ``mask`` (its allowed ids) narrowed in place.
        ``ended``: the bar was already ended (its next bar's controls placed), so only what
        opens the next bar is checked. Where the asked values leave nothing the grammar
        allows (values that contradict each other, a bar out of positions), the mask stays
        as it was and ``gave_way`` counts it: the bar may then miss what was asked."""
        here, following = self.asks.get(bar_number), self.asks.get(bar_number + 1)
        if here is None and following is None:
            return
        keep = np.ones(len(self.enders), dtype=bool)
        if here is not None and not ended:
            bar = self.bars[row]
            keep &= self._fits(here, bar) | self.enders
            if not self._complete(here, bar):
                keep &= ~self.enders
        if following is not None:
            fresh = BarSoFar(denominator=self.bars[row].denominator)
            keep &= self._fits(following, fresh) | ~self.effects.opens
        narrowed = mask & torch.from_numpy(keep).to(mask.device)
        if bool(narrowed.any()):
            mask.copy_(narrowed)
        else:
            self.gave_way += 1

    def _fits(self, ask: Ask, bar: BarSoFar) -> np.ndarray:
        """[vocab]: whether each id, read next, keeps the bar within what ``ask`` allows."""
        e = self.effects
        fits = np.ones(len(e.notes), dtype=bool)
        if ask.density is not None and ask.density[1] is not None:
            most = ask.density[1]
            fits &= bar.notes + e.notes + e.pending <= most
            # A Position owes a note: none may be owed once the bar holds all it may.
            fits &= ~(e.owes & (bar.notes + e.notes >= most))
        first = bar.onset + e.lead
        if ask.most_at_onset is not None and not ask.most_at_onset[1]:
            p = ask.most_at_onset[0]
            last = np.where(e.steps, e.tail, first) + e.pending
            fits &= (first <= p) & (e.inner_max <= p) & (last <= p)
        if ask.least_at_onset is not None:
            m, cap, floor = ask.least_at_onset
            if not floor:  # asking the lowest value asks at most that many: any onset meets
                # Every onset the bar closes holds at least m notes.
                fits &= ~(e.steps & (first > 0)) | (first >= m)
                fits &= e.inner_min >= m
            if not cap and bar.fewest != m:
                # No onset holds exactly m yet: the open one stops there, so the bar can close.
                fits &= e.steps | (first + e.pending <= m)
        durations = e.durations[bar.denominator]
        for flag in ask.lacks:
            fits &= ~durations[flag]
        for flag in ask.holds:
            if flag not in bar.flags:
                # The bar's next note takes the asked duration: it then may close whenever
                # the model likes, rather than only once it drew that duration by chance.
                fits &= ~e.timed | durations[flag]
        return fits

    @staticmethod
    def _complete(ask: Ask, bar: BarSoFar) -> bool:
        """Whether the bar holds what ``ask`` asks, so that it may end now."""
        onsets = [n for n in (bar.onset,) if n]
        most = max([bar.most, *onsets])
        fewest = min([bar.fewest, *onsets])
        # MidiTok computes no value on a bar of one note (unless it is the piece's last): a
        # bar asked anything holds two, unless a density below two was asked.
        if bar.notes < (2 if ask.density is None else min(2, max(1, ask.density[0]))):
            return False
        if ask.density is not None:
            least, most_notes = ask.density
            if bar.notes < least or (most_notes is not None and bar.notes > most_notes):
                return False
        if ask.most_at_onset is not None:
            p, cap = ask.most_at_onset
            if most < p or (not cap and most > p):
                return False
        if ask.least_at_onset is not None:
            m, cap, floor = ask.least_at_onset
            if (fewest > m) if floor else (fewest < m or (not cap and fewest != m)):
                return False
        return all(flag in bar.flags for flag in ask.holds)
