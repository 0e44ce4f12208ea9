"""Bar attribute controls: MidiTok's bar-level attribute-control classes computed on each bar of
a piece (all its tracks together), and the model-only tokens, MidiTok's own token names, that
carry their values."""

from dataclasses import dataclass

import symusic
from miditok import constants
from miditok.attribute_controls import (
    BarAttributeControl,
    BarNoteDensity,
    BarNoteDuration,
    BarOnsetPolyphony,
)
from miditok.utils import get_bars_ticks

from data_pipeline.errors import ConfigError


@dataclass(frozen=True)
class BarAttribute:
    """One value MidiTok computes per bar: ``event`` is the type of the event ``control``
    returns for it (a control may return several, as polyphony returns min and max)."""

    name: str
    event: str
    control: BarAttributeControl

    @property
    def tokens(self) -> list[str]:
        return [t for t in self.control.tokens if t.rpartition("_")[0] == self.event]

    @property
    def values(self) -> list[str]:
        return [t.rpartition("_")[2] for t in self.tokens]

    def token(self, value: str) -> str:
        return f"{self.event}_{value}"


def _attributes() -> dict[str, BarAttribute]:
    # MidiTok's own defaults (those its TokenizerConfig gives the same classes). BarPitchClass
    # is left out: a bar holds a set of pitch classes, a variable number of tokens, not a value.
    density = BarNoteDensity(constants.AC_NOTE_DENSITY_BAR_MAX)
    polyphony = BarOnsetPolyphony(constants.AC_POLYPHONY_MIN, constants.AC_POLYPHONY_MAX)
    durations = BarNoteDuration()
    found = [
        BarAttribute("note_density", "ACBarNoteDensity", density),
        BarAttribute("polyphony_min", "ACBarOnsetPolyphonyMin", polyphony),
        BarAttribute("polyphony_max", "ACBarOnsetPolyphonyMax", polyphony),
    ]
    # BarNoteDuration computes whole to sixteenth (its thirty-second token is never produced).
    for name in ("Whole", "Half", "Quarter", "Eight", "Sixteenth"):
        user = "eighth" if name == "Eight" else name.lower()
        found.append(BarAttribute(f"has_{user}_notes", f"ACBarNoteDuration{name}", durations))
    return {a.name: a for a in found}


ATTRIBUTES = _attributes()


def attributes_named(names: list[str], key: str) -> list[BarAttribute]:
    """The attributes ``names`` lists, in the order of ``ATTRIBUTES``; refused with the valid
    names when one is unknown (``key`` is the config key that gave them)."""
    unknown = [n for n in names if n not in ATTRIBUTES]
    if unknown:
        raise ConfigError(
            f"{key}: unknown bar attribute {', '.join(unknown)}; valid: {', '.join(ATTRIBUTES)}"
        )
    return [a for name, a in ATTRIBUTES.items() if name in names]


def control_tokens(attributes: list[BarAttribute]) -> list[str]:
    """Every token the attributes can write: the vocabulary a model trained with them has."""
    return [t for a in attributes for t in a.tokens]


def all_notes(score: symusic.Score) -> symusic.Track:
    """A score's notes, every track's, in one track sorted by onset: a bar's attributes are
    the whole bar's, as a musician asks for them."""
    merged = symusic.Track()
    for track in score.tracks:
        merged.notes.extend(track.notes)
    merged.notes.sort()
    return merged


def bar_values(
    score: symusic.Score, bars: int, attributes: list[BarAttribute]
) -> list[dict[str, str]]:
    """For each of the first ``bars`` bars of ``score`` (the bars MidiTok counts from its time
    signatures, as REMI's Bar tokens do): attribute name -> value, as MidiTok's classes compute
    it. A bar MidiTok gives no value for (empty, or holding a single note) has none."""
    values: list[dict[str, str]] = [{} for _ in range(bars)]
    notes = all_notes(score)
    if not notes.notes:
        return values
    ticks = get_bars_ticks(score)
    index = {int(tick): i for i, tick in enumerate(ticks[:bars])}
    by_event = {a.event: a for a in attributes}
    for control in {id(a.control): a.control for a in attributes}.values():
        events = control.compute(notes, score.ticks_per_quarter, ticks, [], range(len(ticks)))
        for event in events:
            attribute, bar = by_event.get(event.type_), index.get(int(event.time))
            if attribute is not None and bar is not None:
                values[bar][attribute.name] = str(event.value)
    return values
