"""Fill-in-the-middle in training: pieces arranged as infilling documents (the tokenizer's
``infill_document``) at a run's ``data.infill_rate``, and the one check that a tokenizer, or a
trained model, can fill bars."""

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from data_pipeline.errors import ConfigError
from data_pipeline.tokenizer import FRAME_TOKENS, MusicTokenizer, join_bars

log = logging.getLogger(__name__)


def trained_infill_rate(train_config: Path) -> float | None:
    """``data.infill_rate`` of a run, read from its Hydra config (0 for runs from before the
    key), or None when that config is not at hand."""
    if not train_config.exists():
        return None
    return float(OmegaConf.load(train_config).get("data", {}).get("infill_rate", 0.0))


def check_infillable(
    tokenizer: MusicTokenizer, asked_by: str, exported: dict | None = None
) -> None:
    """Refuses ``asked_by`` (a config key and its value) when ``tokenizer`` cannot express
    infilling (no infilling tokens, or no Bar tokens) or, given an exported model's
    ``config.json``, when its run never arranged a piece for infilling (``data.infill_rate``
    0). An export that predates recording the rate is assumed to fill bars, with a warning."""
    retrain = "" if exported is None else ", and train on it with data.infill_rate=0.5"
    if tokenizer.infill_ids is None:
        raise ConfigError(
            f"{asked_by} needs the infilling tokens, and this tokenizer artifact predates them: "
            "prepare the dataset again (python -m data_pipeline.prepare) to get an artifact "
            f"that has them{retrain}"
        )
    if tokenizer.bar_id is None:
        raise ConfigError(
            f"{asked_by} fills whole bars, and the {type(tokenizer.base).__name__} tokenizer has "
            f"no Bar tokens: prepare the dataset with tokenizer=remi{retrain}"
        )
    if exported is None:
        return
    rate = exported.get("data", {}).get("infill_rate")
    if rate == 0:
        raise ConfigError(
            f"{asked_by}: the model was trained with data.infill_rate=0 and never learned to "
            "fill bars; train one with data.infill_rate=0.5 (or fine-tune this one with "
            "init_from=)"
        )
    if rate is None:
        log.warning(
            "%s: the export records no data.infill_rate (it was exported before the rate was "
            "recorded, or without its run's config): assuming the model learned to fill bars; "
            "export it again (python -m mtrain.export) to have it checked",
            asked_by,
        )


def excerpt(lengths: np.ndarray, budget: int, rng: np.random.Generator) -> tuple[int, int]:
    """Bars [first, stop) of a piece whose bars are ``lengths`` tokens long: all of them when
    they fit ``budget`` tokens, else as many as fit (one at least) from a random first bar."""
    if lengths.sum() <= budget:
        return 0, len(lengths)
    first = int(rng.integers(len(lengths)))
    fits = int(np.searchsorted(np.cumsum(lengths[first:]), budget, side="right"))
    return first, first + max(1, fits)


class InfillTraining:
    """Rearranges a training piece, with probability ``rate``, into an infilling document: an
    excerpt of whole bars that fits the ``context`` (a model sees the bars nearest a gap, never
    a whole long piece), a random span of up to half its bars as the middle. Other pieces are
    the documents ``plain`` makes (plain documents by default), so a rate of 0 trains exactly
    as before."""

    def __init__(
        self,
        tokenizer: MusicTokenizer,
        rate: float,
        context: int,
        plain: Callable[[dict, np.ndarray, np.random.Generator], np.ndarray] | None = None,
    ):
        if rate > 0:
            check_infillable(tokenizer, f"data.infill_rate={rate}")
        self.tokenizer, self.rate, self.context = tokenizer, rate, context
        self.plain = plain or (lambda labels, base_ids, rng: tokenizer.document(labels, base_ids))

    def __call__(
        self, labels: dict[str, str], base_ids: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        if not self.rate or rng.random() >= self.rate:
            return self.plain(labels, base_ids, rng)
        bars = self.tokenizer.split_bars(base_ids)
        budget = self.context - FRAME_TOKENS - len(self.tokenizer.head(labels))
        first, stop = excerpt(np.array([len(b) for b in bars]), budget, rng)
        bars = bars[first:stop]
        width = int(rng.integers(1, max(1, len(bars) // 2) + 1))
        start = int(rng.integers(len(bars) - width + 1))
        return self.tokenizer.infill_document(
            labels,
            join_bars(bars[:start]),
            join_bars(bars[start + width :]),
            join_bars(bars[start : start + width]),
        )
