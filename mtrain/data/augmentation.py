"""On-the-fly augmentation of a piece's base token ids: pitch transposition, velocity and tempo
shifts."""

import numpy as np

# Token families that carry a melodic pitch; drums have their own (PitchDrum, DrumOn, DrumOff).
MELODIC_PITCH_FAMILIES = ("Pitch", "NoteOn", "NoteOff")
MIDI_PITCHES = 128


class Augmenter:
    """Transposes a piece's melodic notes by one random shift and moves all its velocities (and
    its tempos) by one random number of bins. Drums keep their pitches; the shift is drawn
    among those that keep every note of the piece inside the tokenizer's pitch range (0 always
    does)."""

    def __init__(
        self, vocab: dict[str, int], transpose_range: int, velocity_shift: int, tempo_shift=0
    ):
        self.transpose_range, self.velocity_shift = transpose_range, velocity_shift
        size = max(vocab.values()) + 1
        self.family = np.full(size, -1)
        self.pitch = np.full(size, -1)
        self.is_program = np.zeros(size, dtype=bool)
        for name, i in vocab.items():
            kind, _, value = name.partition("_")
            if kind in MELODIC_PITCH_FAMILIES:
                self.family[i], self.pitch[i] = MELODIC_PITCH_FAMILIES.index(kind), int(value)
            elif kind == "Program":
                self.is_program[i] = True
        melodic = self.family >= 0
        self.pitch_id = np.full((len(MELODIC_PITCH_FAMILIES), MIDI_PITCHES), -1)
        self.pitch_id[self.family[melodic], self.pitch[melodic]] = np.flatnonzero(melodic)
        self.low, self.high = int(self.pitch[melodic].min()), int(self.pitch[melodic].max())
        # Each token's pitch for a piece's lowest and highest note (others out of the way),
        # and one lookup table per shift: every id to itself but melodic notes, moved.
        self.pitch_for_low = np.where(melodic, self.pitch, MIDI_PITCHES)
        self.pitch_for_high = np.where(melodic, self.pitch, -1)
        notes = np.flatnonzero(melodic)
        self.transposed = np.tile(np.arange(size), (2 * transpose_range + 1, 1))
        for row, shift in enumerate(range(-transpose_range, transpose_range + 1)):
            moved = self.pitch[notes] + shift
            inside = (moved >= 0) & (moved < MIDI_PITCHES)
            targets = self.pitch_id[self.family[notes[inside]], moved[inside]]
            self.transposed[row, notes[inside]] = targets
        self.drum_program = vocab.get("Program_-1", -1)
        self.velocities = BinShift(vocab, "Velocity", velocity_shift)
        self.tempos = BinShift(vocab, "Tempo", tempo_shift)

    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ids = np.array(ids, dtype=np.int64)
        self._transpose(ids, rng)
        self.velocities(ids, rng)
        if self.tempos.shift:
            self.tempos(ids, rng)
        return ids

    def _transpose(self, ids: np.ndarray, rng: np.random.Generator) -> None:
        drums = self._in_drum_track(ids)
        kept = ids if drums is None else ids[~drums]
        lowest = int(self.pitch_for_low[kept].min(initial=MIDI_PITCHES))
        if lowest == MIDI_PITCHES:  # no melodic note
            return
        highest = int(self.pitch_for_high[kept].max())
        low = max(-self.transpose_range, self.low - lowest)
        high = min(self.transpose_range, self.high - highest)
        table = self.transposed[rng.integers(low, high + 1) + self.transpose_range]
        if drums is None:
            ids[:] = table[ids]
        else:
            ids[~drums] = table[kept]

    def _in_drum_track(self, ids: np.ndarray) -> np.ndarray | None:
        """Tokens after a Program_-1 (drums) and before the next Program token: drum notes,
        when the tokenizer writes them with ordinary Pitch tokens (use_pitchdrum_tokens off).
        None for a piece without drums (most: one comparison instead of a scan)."""
        if self.drum_program < 0 or not (ids == self.drum_program).any():
            return None
        last_program = np.maximum.accumulate(
            np.where(self.is_program[ids], np.arange(len(ids)), -1)
        )
        return (last_program >= 0) & (ids[last_program] == self.drum_program)


class BinShift:
    """Moves every token of one family of binned values (Velocity, Tempo) by one random
    number of bins, clipped to the tokenizer's range: one gather a piece, no masks."""

    def __init__(self, vocab: dict[str, int], family: str, shift: int):
        self.shift = shift
        bins = sorted(
            (float(n.partition("_")[2]), i) for n, i in vocab.items() if n.startswith(f"{family}_")
        )
        ids = np.array([i for _, i in bins], dtype=np.int64)
        size = max(vocab.values()) + 1
        # One lookup table per shift: every id to itself but the family's, moved.
        self.tables = np.tile(np.arange(size), (2 * shift + 1, 1))
        for row, moved_by in enumerate(range(-shift, shift + 1)):
            moved = np.clip(np.arange(len(ids)) + moved_by, 0, max(len(ids) - 1, 0))
            self.tables[row, ids] = ids[moved]

    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> None:
        ids[:] = self.tables[rng.integers(-self.shift, self.shift + 1) + self.shift, ids]
