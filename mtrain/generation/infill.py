"""Infilling: bars of a piece regenerated from the bars before and after them, every note that
starts outside those bars kept note-for-note.

The model reads the nearest bars on either side that fit its context (as it was trained, see
``mtrain.data.fill_in_middle``) and writes the middle bars; the new notes are then spliced into a
copy of the input score, so nothing outside the gap passes through the tokenizer's quantization.
The middle closes itself (FIM_END) where its last bar ends, as training taught it; the sampling
grammar holds it to the gap's bars. A gap too long for the context is filled in steps.
"""

import dataclasses
import logging
import re
from dataclasses import dataclass
from itertools import islice

import numpy as np
import symusic

from data_pipeline.errors import InputError
from data_pipeline.midi_file import barline_ticks
from data_pipeline.tokenizer import FRAME_TOKENS, MusicTokenizer, join_bars
from mtrain.generation.compose import GeneratedPiece
from mtrain.generation.decoding import Continuation, Stop, decode
from mtrain.generation.grammar import middle_grammar
from mtrain.generation.repair import to_midi
from mtrain.generation.sampling import SamplingConfig, seeded_batches
from mtrain.model import GPT

log = logging.getLogger(__name__)

BAR_RANGE = re.compile(r"bars:(\d+)(?:-(\d+))?")
BAR_RANGE_FORMAT = "bars:FIRST-LAST, counted from 1 (e.g. bars:9-12)"


@dataclass(frozen=True)
class BarRange:
    """Bars ``first`` to ``last`` of a piece, counted from 1, both included."""

    first: int
    last: int

    @classmethod
    def parse(cls, text: str) -> "BarRange | None":
        """``bars:9-12`` or ``bars:9``; None when ``text`` is not a range of that form."""
        match = BAR_RANGE.fullmatch(text.strip())
        if not match:
            return None
        first, last = int(match[1]), int(match[2] or match[1])
        return cls(first, last) if 1 <= first <= last else None

    def __str__(self) -> str:
        return f"bars:{self.first}-{self.last}"


def gap_ticks(score: symusic.Score, tokenizer: MusicTokenizer, gap: BarRange) -> tuple[int, int]:
    """[start, end) in ticks of the bars ``gap`` of ``score``, as the tokenizer's Bar tokens
    cut it: through the time signatures when it reads them, else in 4/4 (MidiTok's default)."""
    barlines = barline_ticks(
        score if tokenizer.base.config.use_time_signatures else without_time_signatures(score)
    )
    ticks = list(islice(barlines, gap.last + 1))
    return ticks[gap.first - 1], ticks[gap.last]


def without_time_signatures(score: symusic.Score) -> symusic.Score:
    score = score.copy()
    score.time_signatures.clear()
    return score


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


@dataclass
class InfillRequest:
    """What a model fills: the input score, its bars in base ids, the gap and the prompt."""

    score: symusic.Score
    bars: list[np.ndarray]
    gap: BarRange
    prompt: list[int]
    context: tuple[int, int]  # the bars the model reads, [start, end) counted from 0
    room: int  # tokens left for the middle: half as many again as the bars it replaces
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    max_seq_len: int = 0
    # The gap's bars as they are filled, one range after the other: the whole gap when it fits
    # the context, else a bar or a few at a time, each step reading the bars around it.
    steps: list[BarRange] = dataclasses.field(default_factory=list)


def middle_room(lengths: list[int]) -> int:
    """Tokens left for a middle replacing bars ``lengths`` tokens long: half as many again,
    and room for a note in each bar (a gap of rests gets one)."""
    return 3 * sum(lengths) // 2 + 8 * len(lengths)


def infill_request(
    tokenizer: MusicTokenizer,
    score: symusic.Score,
    gap: BarRange,
    labels: dict[str, str],
    max_seq_len: int,
    in_steps: bool = False,
) -> InfillRequest:
    """The prompt to fill ``gap`` of ``score``: the nearest bars around it that fit the context
    next to room for the middle (``middle_room``). A gap whose room exceeds the context is
    refused in one line, or, ``in_steps``, filled a few bars at a time (``gap_steps``): the
    prompt is then the first step's. A gap outside the piece is refused."""
    bars = tokenizer.split_bars(tokenizer.midi_to_base_ids(score.copy()))
    if gap.last > len(bars):
        raise InputError(
            f"infill={gap}: the prompt has {len(bars)} bars; give a range within bars:1-{len(bars)}"
        )
    lengths = [len(tokenizer.encode_base(bar)) for bar in bars]
    space = max_seq_len - len(tokenizer.head(labels)) - FRAME_TOKENS
    steps = [gap]
    if middle_room(lengths[gap.first - 1 : gap.last]) > space:
        if not in_steps:
            raise InputError(
                f"infill={gap}: the bars to fill need about "
                f"{middle_room(lengths[gap.first - 1 : gap.last])} tokens, more than the "
                f"model's context of {max_seq_len} leaves beside them; fill fewer bars"
            )
        steps = gap_steps(lengths, gap, space)
    room = middle_room(lengths[steps[0].first - 1 : steps[0].last])
    start, end = nearest_context(lengths, steps[0].first - 1, steps[0].last, space - room)
    prompt = tokenizer.infill_document(
        labels, join_bars(bars[start : steps[0].first - 1]), join_bars(bars[steps[0].last : end])
    )
    return InfillRequest(
        score, bars, steps[0], prompt.tolist(), (start, end), room, labels, max_seq_len, steps
    )


def gap_steps(lengths: list[int], gap: BarRange, space: int) -> list[BarRange]:
    """``gap`` cut into runs of bars whose middles take half the ``space`` at most (the other
    half for the bars around them), one bar at least; refused when one bar's middle alone
    exceeds the space."""
    steps, first = [], gap.first
    while first <= gap.last:
        last = first
        while last < gap.last and middle_room(lengths[first - 1 : last + 1]) <= space // 2:
            last += 1
        if middle_room(lengths[first - 1 : last]) > space:
            raise InputError(
                f"infill={gap}: bar {first} alone needs about "
                f"{middle_room(lengths[first - 1 : last])} tokens, more than the model's "
                "context leaves beside it; a model with a longer context can fill it"
            )
        steps.append(BarRange(first, last))
        first = last + 1
    return steps


def banned_while_filling(tokenizer: MusicTokenizer) -> list[int]:
    """Everything but music and FIM_END, which closes the middle."""
    fim = tokenizer.infill_ids
    labels = range(tokenizer.label_offset, tokenizer.vocab_size)
    return [*range(tokenizer.num_specials), fim.prefix, fim.suffix, fim.middle, *labels]


def splice(
    tokenizer: MusicTokenizer, request: InfillRequest, new_ids: list[int]
) -> tuple[symusic.Score, int]:
    """The input score with the notes that start in the gap replaced by those the model wrote
    there, and the number of tokens repaired to decode them. The middle is decoded after the
    whole prefix, so its bars land where the gap's bars start."""
    middle = tokenizer.decode_base([i for i in new_ids if i != tokenizer.infill_ids.end])
    if not len(middle) or middle[0] != tokenizer.bar_id:
        middle = np.concatenate([[tokenizer.bar_id], middle])
    prefix = join_bars(request.bars[: request.gap.first - 1])
    written, repairs = to_midi(tokenizer, tokenizer.encode_base(np.concatenate([prefix, middle])))
    (start, end), (w_start, w_end) = (
        gap_ticks(request.score, tokenizer, request.gap),
        gap_ticks(written, tokenizer, request.gap),
    )
    scale = request.score.ticks_per_quarter / written.ticks_per_quarter
    out = request.score.copy()
    for track in out.tracks:
        track.notes.filter(lambda n: not start <= n.time < end, inplace=True)
    for track in written.tracks:
        target = next(
            (t for t in out.tracks if (t.program, t.is_drum) == (track.program, track.is_drum)),
            None,
        )
        if target is None:
            target = symusic.Track(track.name, track.program, track.is_drum)
            out.tracks.append(target)
        for note in track.notes:
            if w_start <= note.time < w_end:
                time = start + round((note.time - w_start) * scale)
                if time < end:
                    duration = max(1, round(note.duration * scale))
                    target.notes.append(symusic.Note(time, duration, note.pitch, note.velocity))
        target.notes.sort()
    return out, repairs


def infill(
    model: GPT,
    tokenizer: MusicTokenizer,
    request: InfillRequest,
    count: int,
    sampling: SamplingConfig,
    batch_size: int = 4,
    rests: bool = False,
) -> list[GeneratedPiece]:
    """``count`` fillings of ``request``'s gap, drawn ``batch_size`` at a time, seeded as
    ``seeded_batches`` says, step after step when the gap is filled in steps (each step reads
    the bars already filled before it). With ``sampling.grammar`` each middle holds exactly
    its bars and, unless ``rests``, a note."""
    steps = request.steps or [request.gap]
    pieces = []
    for rows, seeded in seeded_batches(count, batch_size, sampling):
        scores, new_ids = [request.score] * rows, [[] for _ in range(rows)]
        repairs, stops = [0] * rows, [Stop.stop_token] * rows
        for k, step in enumerate(steps):
            requests = [request] * rows
            if len(steps) > 1:
                requests = [
                    infill_request(tokenizer, s, step, request.labels, request.max_seq_len)
                    for s in scores
                ]
            # Another seed per step, the same as before for a gap filled at once.
            step_sampling = dataclasses.replace(seeded, seed=seeded.seed + 100_003 * k)
            for row, new in enumerate(fill_step(model, tokenizer, requests, step_sampling, rests)):
                scores[row], repaired = splice(tokenizer, requests[row], new.complete)
                new_ids[row] += new.complete
                repairs[row] += repaired
                if stops[row] == Stop.stop_token:
                    stops[row] = new.stop
        for row in range(rows):
            ids = request.prompt + new_ids[row]
            piece = GeneratedPiece(ids, len(request.prompt), scores[row], repairs[row], stops[row])
            pieces.append(piece)
            if not rests and not gap_notes(piece.score, tokenizer, request):
                log.warning("a filling of %s holds no note: the gap is silent", request.gap)
    return pieces


def fill_step(
    model: GPT,
    tokenizer: MusicTokenizer,
    requests: list[InfillRequest],
    sampling: SamplingConfig,
    rests: bool,
) -> list[Continuation]:
    """One middle per request (one gap, or one step of it, each row its own prompt)."""
    banned, stop = banned_while_filling(tokenizer), tokenizer.infill_ids.end
    # A middle twice the room is far past the gap's end, where notes are dropped: stop there.
    room = max(r.room for r in requests)
    sampling = dataclasses.replace(sampling, max_new_tokens=min(sampling.max_new_tokens, 2 * room))
    gap = requests[0].gap
    grammar = None
    if sampling.grammar:
        grammar = middle_grammar(tokenizer, gap.last - gap.first + 1, rests, model.device)
    prompts = [r.prompt for r in requests]
    # The whole prompt is the head: past the context the window slides over the middle and
    # keeps both sides of the gap.
    head = min(map(len, prompts))
    return decode(
        model,
        prompts,
        sampling,
        stop,
        banned_ids=banned,
        head=head,
        grammar=grammar,
        grammar_from=[len(p) for p in prompts],
    )


def gap_notes(score: symusic.Score, tokenizer: MusicTokenizer, request: InfillRequest) -> int:
    """Notes of ``score`` that start in the whole gap of ``request``."""
    steps = request.steps or [request.gap]
    start, end = gap_ticks(request.score, tokenizer, BarRange(steps[0].first, steps[-1].last))
    onsets = [t.notes.numpy()["time"] for t in score.tracks]
    return sum(int(((times >= start) & (times < end)).sum()) for times in onsets)
