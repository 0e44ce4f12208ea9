"""Fill-in-the-middle over bar boundaries: a piece as prefix, suffix, then its middle bars (the
PSM order of Bavarian et al. 2022), so that a model learns to fill bars from both sides."""

import numpy as np

from data_pipeline.errors import ConfigError
from data_pipeline.tokenizer import MusicTokenizer

# FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE and FIM_END around the music of an infilling document.
FRAME_TOKENS = 4


def split_bars(tokenizer: MusicTokenizer, base_ids: np.ndarray) -> list[np.ndarray]:
    """A piece's base ids cut into its bars, each from its Bar token to the next (what precedes
    the first bar belongs to it); they concatenate back to ``base_ids``."""
    base_ids = np.asarray(base_ids, dtype=np.int64)
    starts = np.flatnonzero(base_ids == tokenizer.bar_id)
    return np.split(base_ids, starts[1:]) if len(starts) else [base_ids]


def joined(bars: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(bars) if bars else np.zeros(0, np.int64)


def infill_document(
    tokenizer: MusicTokenizer,
    labels: dict[str, str],
    prefix: np.ndarray,
    suffix: np.ndarray,
    middle: np.ndarray | None = None,
) -> np.ndarray:
    """[BOS, labels..., FIM_PREFIX, prefix, FIM_SUFFIX, suffix, FIM_MIDDLE, middle, FIM_END]
    from base ids; without ``middle``, the prompt a model fills the middle from."""
    fim = tokenizer.infill_ids
    parts = [tokenizer.head(labels), [fim.prefix], tokenizer.encode_base(prefix), [fim.suffix]]
    parts += [tokenizer.encode_base(suffix), [fim.middle]]
    if middle is not None:
        parts += [tokenizer.encode_base(middle), [fim.end]]
    return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])


def check_infillable(tokenizer: MusicTokenizer, what: str) -> None:
    """Refuses a tokenizer that cannot express infilling, naming ``what`` asked for it."""
    if tokenizer.infill_ids is None:
        raise ConfigError(
            f"{what} needs the infilling tokens, and this tokenizer artifact predates them: "
            "prepare the dataset again (python -m data_pipeline.prepare) to get an artifact "
            "that has them"
        )
    if tokenizer.bar_id is None:
        raise ConfigError(
            f"{what} fills whole bars, and the {type(tokenizer.base).__name__} tokenizer has no "
            "Bar tokens: prepare the dataset with tokenizer=remi"
        )


def excerpt(lengths: np.ndarray, budget: int, rng: np.random.Generator) -> tuple[int, int]:
    """Bars [first, stop) of a piece whose bars are ``lengths`` tokens long: all of them when
    they fit ``budget`` tokens, else as many as fit (one at least) from a random first bar."""
    if lengths.sum() <= budget:
        return 0, len(lengths)
    first = int(rng.integers(len(lengths)))
    fits = int(np.searchsorted(np.cumsum(lengths[first:]), budget, side="right"))
    return first, first + max(1, fits)


def nearest_context(lengths: list[int], first: int, stop: int, budget: int) -> tuple[int, int]:
    """Bars [start, end) around the gap [first, stop) of bars ``lengths`` tokens long: the bars
    nearest the gap on either side, taken from the side with fewer tokens so far, while they fit
    ``budget`` tokens (the gap's own bars not counted). A whole piece that fits is all of it."""
    start, end, before, after = first, stop, 0, 0
    while True:
        sides = [(before, "before"), (after, "after")]
        for _, side in sorted(sides):
            if side == "before" and start > 0 and before + after + lengths[start - 1] <= budget:
                start, before = start - 1, before + lengths[start - 1]
                break
            if side == "after" and end < len(lengths) and before + after + lengths[end] <= budget:
                end, after = end + 1, after + lengths[end]
                break
        else:
            return start, end


class InfillTraining:
    """Rearranges a training piece, with probability ``rate``, into an infilling document: an
    excerpt of whole bars that fits the ``context`` (a model sees the bars nearest a gap, never
    a whole long piece), a random span of up to half its bars as the middle. Other pieces stay
    plain documents, so a rate of 0 trains exactly as before."""

    def __init__(self, tokenizer: MusicTokenizer, rate: float, context: int):
        if rate > 0:
            check_infillable(tokenizer, f"data.infill_rate={rate}")
        self.tokenizer, self.rate, self.context = tokenizer, rate, context

    def __call__(
        self, labels: dict[str, str], base_ids: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        if not self.rate or rng.random() >= self.rate:
            return self.tokenizer.document(labels, base_ids)
        bars = split_bars(self.tokenizer, base_ids)
        budget = self.context - FRAME_TOKENS - len(self.tokenizer.head(labels))
        first, stop = excerpt(np.array([len(b) for b in bars]), budget, rng)
        bars = bars[first:stop]
        width = int(rng.integers(1, max(1, len(bars) // 2) + 1))
        start = int(rng.integers(len(bars) - width + 1))
        return infill_document(
            self.tokenizer,
            labels,
            joined(bars[:start]),
            joined(bars[start + width :]),
            joined(bars[start : start + width]),
        )
