"""Bar attribute controls in training: a run's ``data.attribute_controls`` puts the control
tokens of MidiTok's bar attributes (``data_pipeline.bar_controls``) before the bars of a share
of its training pieces, computed as the pieces are read.

Computed at load time, not stored in the shards: one prepared dataset serves runs with and
without controls (and with other attributes or rates), as it serves any infilling rate, and
the values follow the augmentation (a transposed piece's bars are measured as transposed).
"""

from dataclasses import dataclass, field

import numpy as np

from data_pipeline.bar_controls import (
    attributes_named,
    bar_values,
    control_tokens,
)
from data_pipeline.errors import ConfigError, require
from data_pipeline.tokenizer import MusicTokenizer


@dataclass
class AttributeControlsConfig:
    # Bar attributes whose control tokens open bars of training pieces (note_density,
    # polyphony_min, polyphony_max, has_half_notes, ...: data_pipeline.bar_controls); empty
    # trains without controls and keeps the dataset's vocabulary.
    attributes: list[str] = field(default_factory=list)
    # Share of training pieces given controls; the others stay plain, so the model also
    # composes with no control asked.
    piece_rate: float = 0.5
    # Share of such a piece's bars that carry each attribute, drawn for each attribute on its
    # own: any subset of the attributes can be asked of a bar at generation.
    bar_rate: float = 0.5

    def __post_init__(self):
        attributes_named(list(self.attributes), "data.attribute_controls.attributes")
        require(
            self,
            "data.attribute_controls",
            [
                (0 < self.piece_rate <= 1, "piece_rate", "must be in (0, 1]"),
                (0 < self.bar_rate <= 1, "bar_rate", "must be in (0, 1]"),
            ],
        )


def with_controls(tokenizer: MusicTokenizer, cfg: AttributeControlsConfig) -> MusicTokenizer:
    """The tokenizer a run with ``cfg`` trains: the dataset's, plus the control tokens of its
    attributes (appended as labels are, so every id the dataset's has keeps its meaning)."""
    if not cfg.attributes:
        return tokenizer
    if tokenizer.bar_id is None:
        raise ConfigError(
            f"data.attribute_controls.attributes={list(cfg.attributes)} puts controls at bar "
            f"starts, and the {type(tokenizer.base).__name__} tokenizer has no Bar tokens: "
            "prepare the dataset with tokenizer=remi, or leave the attributes empty"
        )
    tokens = control_tokens(attributes_named(list(cfg.attributes), "data.attribute_controls"))
    if set(tokens) <= set(tokenizer.control_index):
        return tokenizer
    return tokenizer.extended(tokens)


class ControlTraining:
    """A training piece as a document, with probability ``piece_rate`` with control tokens
    before its bars (each attribute of each bar kept with probability ``bar_rate``, in
    ``ATTRIBUTES`` order), else plain. With no attributes, always plain and no draw."""

    def __init__(self, tokenizer: MusicTokenizer, cfg: AttributeControlsConfig):
        self.tokenizer, self.cfg = tokenizer, cfg
        self.attributes = attributes_named(list(cfg.attributes), "data.attribute_controls")

    def __call__(
        self, labels: dict[str, str], base_ids: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        if not self.attributes or rng.random() >= self.cfg.piece_rate:
            return self.tokenizer.document(labels, base_ids)
        tok = self.tokenizer
        bars = tok.split_bars(base_ids)
        values = bar_values(tok.base_ids_to_midi(base_ids), len(bars), self.attributes)
        keep = rng.random((len(bars), len(self.attributes))) < self.cfg.bar_rate
        controls = [
            [a.token(found[a.name]) for a, k in zip(self.attributes, kept, strict=True) if k]
            for found, kept in zip(values, keep & self._known(values), strict=True)
        ]
        return tok.controlled_document(labels, bars, controls)

    def _known(self, values: list[dict[str, str]]) -> np.ndarray:
        """[bars, attributes]: whether MidiTok computed each attribute for each bar."""
        known = [[a.name in found for a in self.attributes] for found in values]
        return np.array(known, dtype=bool).reshape(len(values), len(self.attributes))
