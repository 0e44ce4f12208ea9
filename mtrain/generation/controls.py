"""Bar controls at generation: ``controls="5-8:note_density=16,9-12:note_density=8"`` parsed
against what a model was trained with, and the steering of sampling that places the asked
control tokens before the asked bars (the only tokens allowed where those bars open)."""

import re
from dataclasses import dataclass

import symusic
import torch

from data_pipeline.bar_controls import ATTRIBUTES, attributes_named, bar_values
from data_pipeline.errors import ConfigError
from data_pipeline.tokenizer import MusicTokenizer
from mtrain.generation.bar_guard import BarGuard

CONTROLS_FORMAT = (
    "BARS:ATTRIBUTE=VALUE items joined by commas, bars counted from 1 (e.g. "
    "'controls=\"5-8:note_density=16,5-8:polyphony_max=4,9-12:note_density=8\"')"
)
ITEM = re.compile(r"(\d+)(?:-(\d+))?:(\w+)=(\S+)")


def parse_controls(text: str) -> dict[int, dict[str, str]]:
    """Bar (from 1) -> attribute -> value as asked; refused, with the format, when ``text`` is
    not of it, and when one bar is asked two values of one attribute."""
    asked: dict[int, dict[str, str]] = {}
    for item in text.split(","):
        match = ITEM.fullmatch(item.strip())
        first, last = (int(match[1]), int(match[2] or match[1])) if match else (0, 0)
        if not 1 <= first <= last:
            raise ConfigError(f"controls: {item.strip()!r} is not {CONTROLS_FORMAT}")
        for bar in range(first, last + 1):
            if asked.setdefault(bar, {}).setdefault(match[3], match[4]) != match[4]:
                raise ConfigError(
                    f"controls: bar {bar} is asked {match[3]}={asked[bar][match[3]]} and "
                    f"{match[3]}={match[4]}; ask one value per bar"
                )
    return asked


@dataclass
class ControlPlan:
    """The control ids to place before each asked bar, in the order training put them."""

    by_bar: dict[int, list[int]]
    asked: dict[int, dict[str, str]]  # parse_controls's reading of the request
    # Whether sampling also masks what would break an asked value (``bar_guard``), or leaves
    # meeting it to the model, which reads the controls (the bench's baseline for the model).
    held: bool = True

    @classmethod
    def of(cls, tokenizer: MusicTokenizer, text: str, held: bool = True) -> "ControlPlan":
        """``text`` as model ids, once every attribute and value is known to the model."""
        index = tokenizer.control_index
        if not index:
            raise ConfigError(
                f"controls={text}: the model was trained without bar controls; train one with "
                "data.attribute_controls.attributes=[note_density,...]"
            )
        trained = [a for a in ATTRIBUTES.values() if set(a.tokens) <= set(index)]
        by_name = {a.name: a for a in trained}
        by_bar, asked = {}, parse_controls(text)
        for bar, values in sorted(asked.items()):
            for name, value in values.items():
                attribute = by_name.get(name)
                if attribute is None:
                    raise ConfigError(
                        f"controls: the model was not trained to control {name}; it controls "
                        f"{', '.join(by_name)}"
                    )
                if value not in attribute.values:
                    raise ConfigError(
                        f"controls: {name}={value} is not a value of {name}; valid: "
                        f"{', '.join(attribute.values)}"
                    )
            by_bar[bar] = [index[a.token(values[a.name])] for a in trained if a.name in values]
        return cls(by_bar, asked, held)

    @property
    def ids(self) -> set[int]:
        return {i for ids in self.by_bar.values() for i in ids}

    @property
    def last_bar(self) -> int:
        return max(self.by_bar)


class Steering:
    """Follows each row's bars and the controls placed before its next one, and narrows the
    grammar's mask: where the next bar is asked and may open, its first control replaces the
    Bar, with the probability the model gives to ending the bar there (a Bar, or any control:
    what training put at a bar's end); after a control only the next one, after the last only
    a Bar. Until the last asked bar opens, the piece may not end. A plan ``held`` also masks,
    first, what would break the asked values (``bar_guard.BarGuard``)."""

    def __init__(
        self, plan: ControlPlan, tokenizer: MusicTokenizer, bar_openers: list[int], rows: int
    ):
        self.plan, self.end_id = plan, tokenizer.eos_id
        self.openers = torch.tensor(bar_openers, dtype=torch.long)
        self.controls = torch.tensor(sorted(tokenizer.control_index.values()), dtype=torch.long)
        self.opener_set, self.control_set = set(bar_openers), plan.ids
        self.bars = [0] * rows  # bar openers read
        self.placed = [0] * rows  # controls read since
        self.guard = BarGuard(tokenizer, plan.asked, rows) if plan.held else None

    def read(self, row: int, model_id: int) -> None:
        if self.guard is not None:
            self.guard.read(row, model_id)
        if model_id in self.control_set:
            self.placed[row] += 1
        elif model_id in self.opener_set:
            self.bars[row] += 1
            self.placed[row] = 0

    def steer(self, logits: torch.Tensor, allowed: torch.Tensor, live: list[bool]) -> torch.Tensor:
        """``logits`` [rows, vocab] with the mass of ending a bar moved onto the asked control
        where one replaces a Bar; ``allowed`` (the grammar's mask) narrowed in place."""
        openers, controls = self.openers.to(allowed.device), self.controls.to(allowed.device)
        moved = None
        for row in (r for r, alive in enumerate(live) if alive):
            mask, asked = allowed[row], self.plan.by_bar.get(self.bars[row] + 1, [])
            before = mask.clone()
            placed = self.placed[row]
            if self.guard is not None:
                self.guard.narrow(row, self.bars[row], mask, ended=placed > 0)
            if placed:
                may_open = mask[openers].clone()
                mask[:] = False
                if placed < len(asked):
                    mask[asked[placed]] = True
                else:
                    mask[openers] = may_open
            elif asked and bool(mask[openers].any()):
                ends = torch.cat([openers[mask[openers]], controls])
                moved = logits.clone() if moved is None else moved
                moved[row, asked[0]] = torch.logsumexp(logits[row, ends].float(), 0)
                mask[openers] = False
                mask[asked[0]] = True
            if self.bars[row] < self.plan.last_bar:
                mask[self.end_id] = False
            if not bool(mask.any()):  # nothing fits: the grammar's own mask
                mask.copy_(before)
        return logits if moved is None else moved


@dataclass
class Outcome:
    """One asked attribute of one bar, and the value MidiTok computes on the generated bar
    (None: it computes none, the bar being empty or holding one note)."""

    bar: int
    attribute: str
    asked: str
    got: str | None

    @property
    def met(self) -> bool:
        return self.asked == self.got


def outcomes(score: symusic.Score, asked: dict[int, dict[str, str]]) -> list[Outcome]:
    """What MidiTok's classes compute on each asked bar of a generated ``score``, against what
    was asked (``parse_controls``)."""
    names = sorted({name for values in asked.values() for name in values})
    found = bar_values(score, max(asked), attributes_named(names, "controls"))
    return [
        Outcome(bar, name, value, found[bar - 1].get(name))
        for bar, values in sorted(asked.items())
        for name, value in sorted(values.items())
    ]
