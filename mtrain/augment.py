"""On-the-fly augmentation of a piece's base token ids: pitch transposition, velocity shift."""

import numpy as np

# Token families that carry a melodic pitch; drums have their own (PitchDrum, DrumOn, DrumOff).
MELODIC_PITCH_FAMILIES = ("Pitch", "NoteOn", "NoteOff")
MIDI_PITCHES = 128


class Augmenter:
    """Transposes a piece's melodic notes by one random shift and moves all its velocities by
    one random number of bins. Drums keep their pitches; the shift is drawn among those that
    keep every note of the piece inside the tokenizer's pitch range (0 always does)."""

    def __init__(self, vocab: dict[str, int], transpose_range: int, velocity_shift: int):
        self.transpose_range, self.velocity_shift = transpose_range, velocity_shift
        size = max(vocab.values()) + 1
        self.family = np.full(size, -1)
        self.pitch = np.full(size, -1)
        self.is_program = np.zeros(size, dtype=bool)
        velocities = []
        for name, i in vocab.items():
            kind, _, value = name.partition("_")
            if kind in MELODIC_PITCH_FAMILIES:
                self.family[i], self.pitch[i] = MELODIC_PITCH_FAMILIES.index(kind), int(value)
            elif kind == "Program":
                self.is_program[i] = True
            elif kind == "Velocity":
                velocities.append((int(value), i))
        melodic = self.family >= 0
        self.pitch_id = np.full((len(MELODIC_PITCH_FAMILIES), MIDI_PITCHES), -1)
        self.pitch_id[self.family[melodic], self.pitch[melodic]] = np.flatnonzero(melodic)
        self.low, self.high = int(self.pitch[melodic].min()), int(self.pitch[melodic].max())
        self.drum_program = vocab.get("Program_-1", -1)
        self.velocity_ids = np.array([i for _, i in sorted(velocities)], dtype=np.int64)
        self.velocity_rank = np.full(size, -1)
        self.velocity_rank[self.velocity_ids] = np.arange(len(self.velocity_ids))

    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ids = np.array(ids, dtype=np.int64)
        self._transpose(ids, rng)
        self._shift_velocities(ids, rng)
        return ids

    def _transpose(self, ids: np.ndarray, rng: np.random.Generator) -> None:
        notes = (self.family[ids] >= 0) & ~self._in_drum_track(ids)
        if not notes.any():
            return
        pitches = self.pitch[ids[notes]]
        low = max(-self.transpose_range, self.low - int(pitches.min()))
        high = min(self.transpose_range, self.high - int(pitches.max()))
        ids[notes] = self.pitch_id[self.family[ids[notes]], pitches + rng.integers(low, high + 1)]

    def _in_drum_track(self, ids: np.ndarray) -> np.ndarray:
        """Tokens after a Program_-1 (drums) and before the next Program token: drum notes,
        when the tokenizer writes them with ordinary Pitch tokens (use_pitchdrum_tokens off)."""
        last_program = np.maximum.accumulate(
            np.where(self.is_program[ids], np.arange(len(ids)), -1)
        )
        return (last_program >= 0) & (ids[last_program] == self.drum_program)

    def _shift_velocities(self, ids: np.ndarray, rng: np.random.Generator) -> None:
        ranks = self.velocity_rank[ids]
        on = ranks >= 0
        shift = rng.integers(-self.velocity_shift, self.velocity_shift + 1)
        ids[on] = self.velocity_ids[np.clip(ranks[on] + shift, 0, len(self.velocity_ids) - 1)]
