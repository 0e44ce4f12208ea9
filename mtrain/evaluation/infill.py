"""How well a model fills bars: the NLL of a piece's true middle bars read with the bars after
them (infilling) and without (continuation from the same bars before), and the musical metrics
of the bars the model writes in the gap against the true ones."""

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import symusic
import torch
import torch.nn.functional as F

from data_pipeline.errors import InputError, require
from data_pipeline.reader import StoredPiece
from data_pipeline.tokenizer import MusicTokenizer, join_bars
from mtrain.evaluation.music_metrics import compute_all
from mtrain.evaluation.set_comparison import compare_sets
from mtrain.generation.compose import DEFAULT_MIN_P
from mtrain.generation.infill import BarRange, InfillRequest, gap_ticks, infill, infill_request
from mtrain.generation.sampling import SamplingConfig
from mtrain.model import GPT


@dataclass
class InfillEvalConfig:
    """``infill.*`` of an evaluation: the gap filled in each piece of the split."""

    # Bars of the gap, in the middle of each piece; 0 skips the infilling evaluation.
    bars: int = 0
    # Pieces read (the first of the split); the gap is filled once in each.
    max_pieces: int = 16
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(min_p=DEFAULT_MIN_P))

    def __post_init__(self):
        require(
            self,
            "infill",
            [
                (self.bars >= 0, "bars", "must be at least 0 (0: no infilling evaluation)"),
                (self.max_pieces >= 1, "max_pieces", "must be at least 1"),
            ],
        )


def middle_gap(num_bars: int, bars: int) -> BarRange | None:
    """``bars`` bars in the middle of a piece of ``num_bars`` bars, with one bar or more on
    either side; None when the piece is too short for that."""
    if num_bars < bars + 2:
        return None
    first = (num_bars - bars) // 2 + 1
    return BarRange(first, first + bars - 1)


@torch.no_grad()
def tail_nll(model: GPT, doc: np.ndarray, count: int) -> float:
    """Nats the model gives the ``count`` tokens before the last token of ``doc``, read with
    everything before them."""
    ids = torch.from_numpy(doc).to(model.device)[None]
    logits = model.eval()(ids[:, :-1]).logits.float()
    nll = F.cross_entropy(logits[0], ids[0, 1:], reduction="none")
    return float(nll[-count - 1 : -1].sum())


def middle_nll(
    model: GPT, tokenizer: MusicTokenizer, request: InfillRequest, labels: dict[str, str]
) -> tuple[float, float, int]:
    """Nats of the gap's true tokens with the suffix (an infilling document) and without it (the
    plain piece up to the gap's end, from the same bars before it), and how many tokens."""
    start, end = request.context
    gap = request.gap
    prefix = join_bars(request.bars[start : gap.first - 1])
    middle = join_bars(request.bars[gap.first - 1 : gap.last])
    suffix = join_bars(request.bars[gap.last : end])
    count = len(tokenizer.encode_base(middle))
    with_suffix = tokenizer.infill_document(labels, prefix, suffix, middle)  # ends on FIM_END
    # A dummy last token: tail_nll scores the tokens before the last one in both documents.
    plain = tokenizer.document(labels, np.concatenate([prefix, middle]), end=True)
    return tail_nll(model, with_suffix, count), tail_nll(model, plain, count), count


def gap_bars(score: symusic.Score, tokenizer: MusicTokenizer, gap: BarRange) -> symusic.Score:
    """The notes of ``score`` that start in ``gap``, moved to start at tick 0."""
    start, end = gap_ticks(score, tokenizer, gap)
    return score.clip(start, end).shift_time(-start)


def evaluate_infilling(
    model: GPT,
    tokenizer: MusicTokenizer,
    pieces: Iterable[StoredPiece],
    cfg: InfillEvalConfig,
) -> dict:
    """Fills ``cfg.bars`` bars in the middle of each piece (pieces too short or whose gap does
    not fit the context are counted as skipped) and reports the mean NLL per gap token with and
    without the suffix, and the filled bars' musical metrics against the true bars'."""
    nats_with = nats_without = 0.0
    tokens = skipped = 0
    filled, true = [], []
    for piece in pieces:
        score = tokenizer.base_ids_to_midi(piece.tokens)
        gap = middle_gap(len(tokenizer.split_bars(piece.tokens)), cfg.bars)
        try:
            if gap is None:
                raise InputError("too short")
            request = infill_request(tokenizer, score, gap, piece.labels, model.config.max_seq_len)
        except InputError:
            skipped += 1
            continue
        with_suffix, without, count = middle_nll(model, tokenizer, request, piece.labels)
        nats_with, nats_without, tokens = (
            nats_with + with_suffix,
            nats_without + without,
            tokens + count,
        )
        (fill,) = infill(model, tokenizer, request, 1, cfg.sampling)
        filled.append(compute_all(gap_bars(fill.score, tokenizer, gap)))
        true.append(compute_all(gap_bars(score, tokenizer, gap)))
    if not tokens:
        raise InputError(f"infill.bars={cfg.bars}: no piece had a gap to fill ({skipped} skipped)")
    return {
        "gap_bars": cfg.bars,
        "pieces": len(filled),
        "skipped": skipped,
        "gap_tokens": tokens,
        "nll_with_suffix": nats_with / tokens,
        "nll_without_suffix": nats_without / tokens,
        "suffix_gain_bits_per_token": (nats_without - nats_with) / tokens / math.log(2),
        "music": compare_sets(filled, true),
    }


def infill_markdown(report: dict) -> list[str]:
    lines = [
        f"## Infilling: {report['gap_bars']} bars in the middle of {report['pieces']} pieces "
        f"({report['skipped']} skipped)",
        "",
        "| NLL per gap token (nats) | with the suffix | without | gain (bits/token) |",
        "| --- | --- | --- | --- |",
        f"| {report['gap_tokens']} tokens | {report['nll_with_suffix']:.3f} | "
        f"{report['nll_without_suffix']:.3f} | {report['suffix_gain_bits_per_token']:.3f} |",
        "",
        "| feature | filled bars | true bars | OA |",
        "| --- | --- | --- | --- |",
    ]
    for feature, row in report["music"].items():
        lines.append(
            f"| {feature} | {row['gen_mean']:.3g} ± {row['gen_std']:.2g} | "
            f"{row['ref_mean']:.3g} ± {row['ref_std']:.2g} | {row['oa']:.2f} |"
        )
    return [*lines, ""]
