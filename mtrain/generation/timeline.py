"""Where a piece is in its music, read token by token as it is drawn: bars begun and seconds
reached, so that sampling stops at a length in bars or seconds, not only at a token count."""

from dataclasses import dataclass

import numpy as np

from data_pipeline.tokenizer import MusicTokenizer
from mtrain.generation.decoding import Stop


@dataclass(frozen=True)
class TimeEvent:
    """What one base token does to the clock (MidiTok token families; others do nothing)."""

    kind: str  # "bar", "position", "shift", "tempo" or "meter"
    value: float = 0.0  # position index, quarters shifted or quarters per minute
    meter: tuple[int, int] = (4, 4)


def time_events(tokenizer: MusicTokenizer) -> dict[int, TimeEvent]:
    """Base id -> its event, for the tokens that move time: REMI's Bar and Position, TSD's and
    MIDI-Like's TimeShift and Rest (beat.position.resolution), Tempo and TimeSig."""
    events = {}
    for name, base_id in tokenizer.base.vocab.items():
        kind, _, value = name.partition("_")
        if kind == "Bar":
            events[base_id] = TimeEvent("bar")
        elif kind == "Position":
            events[base_id] = TimeEvent("position", int(value))
        elif kind in ("TimeShift", "Rest"):
            beats, positions, resolution = map(int, value.split("."))
            # In beats of the time signature, made quarters by the clock's meter.
            events[base_id] = TimeEvent("shift", beats + positions / resolution)
        elif kind == "Tempo":
            events[base_id] = TimeEvent("tempo", float(value))
        elif kind == "TimeSig":
            numerator, denominator = map(int, value.split("/"))
            events[base_id] = TimeEvent("meter", meter=(numerator, denominator))
    return events


class Timeline:
    """One row's clock, fed its prompt and then each drawn token (model ids).

    It follows MidiTok's decoder: a Bar starts the next bar one bar length (of the current time
    signature) after the last, a Position places the onset inside the bar, a TimeShift moves it
    on, a Tempo changes the speed from the current onset. Positions going backwards or past the
    bar's end are ignored, as the grammar repair drops them. ``read`` says which limit a token
    reaches: the Bar opening bar ``max_bars`` (0-based, so the piece already has ``max_bars``
    bars), or an onset at ``max_seconds`` or later; nothing after it survives the cut to that
    length, so sampling can stop there.
    """

    def __init__(
        self,
        tokenizer: MusicTokenizer,
        events: dict[int, TimeEvent],
        max_bars: int | None = None,
        max_seconds: float | None = None,
    ):
        self.tokenizer, self.events = tokenizer, events
        self.max_bars, self.max_seconds = max_bars, max_seconds
        self.positions_per_beat = tokenizer.base.config.max_num_pos_per_beat
        self.base_ids: dict[int, list[int]] = {}  # model id -> its base ids, as first seen
        self.bars = 0  # Bar tokens read
        self.meter = (4, 4)
        self.bar_start = 0.0  # in quarter notes, as every length below
        self.position = -1  # in the bar, -1 before its first Position
        self.onset = 0.0
        # Until the first Tempo: the decoder's, the vocabulary's tempo nearest to 120 bpm.
        self.qpm = float(tokenizer.base.default_tempo)
        self.tempo_onset, self.tempo_seconds = 0.0, 0.0  # where the tempo last changed

    @property
    def beat(self) -> float:
        """Quarters in a beat of the current time signature."""
        return 4 / self.meter[1]

    @property
    def seconds(self) -> float:
        """The current onset in seconds."""
        return self.tempo_seconds + (self.onset - self.tempo_onset) * 60 / self.qpm

    def read(self, model_id: int) -> Stop | None:
        """Advances the clock by one model id (several base tokens for a learned vocabulary);
        the limit reached, if any."""
        base_ids = self.base_ids.get(model_id)
        if base_ids is None:
            base_ids = self.tokenizer.decode_base(np.array([model_id])).tolist()
            self.base_ids[model_id] = base_ids
        reached = None
        for base_id in base_ids:
            event = self.events.get(base_id)
            if event is not None:
                reached = self._advance(event) or reached
        return reached

    def _advance(self, event: TimeEvent) -> Stop | None:
        if event.kind == "bar":
            if self.bars:
                self.bar_start += self.meter[0] * self.beat
            self.bars += 1
            self.onset, self.position = self.bar_start, -1
            if self.max_bars is not None and self.bars > self.max_bars:
                return Stop.max_bars
        elif event.kind == "position":
            per_bar = self.meter[0] * self.positions_per_beat
            if not self.position < event.value < per_bar:
                return None
            self.position = int(event.value)
            self.onset = self.bar_start + event.value / self.positions_per_beat * self.beat
        elif event.kind == "shift":
            self.onset += event.value * self.beat
        elif event.kind == "tempo":
            self.tempo_seconds, self.tempo_onset = self.seconds, self.onset
            self.qpm = event.value
            return None
        else:
            self.meter = event.meter
            return None
        if self.max_seconds is not None and self.seconds >= self.max_seconds:
            return Stop.max_seconds
        return None
