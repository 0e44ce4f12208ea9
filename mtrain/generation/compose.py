"""Composing pieces: prompts continued in batches, each decoded to a valid score with its stats."""

from dataclasses import dataclass
from itertools import takewhile

import symusic

from data_pipeline.midi_file import barline_ticks
from data_pipeline.tokenizer import MusicTokenizer
from mtrain.evaluation.music_metrics import compute_all
from mtrain.generation.controls import ControlPlan, Steering
from mtrain.generation.decoding import Stop, decode
from mtrain.generation.grammar import piece_grammar
from mtrain.generation.prompts import banned_for, clip_score
from mtrain.generation.repair import to_midi
from mtrain.generation.sampling import SamplingConfig, seeded_batches
from mtrain.generation.timeline import Timeline, time_events
from mtrain.model import GPT

# The apps' default min-p: the long tail of a small model's distribution (15% of the mass on
# 500 unlikely tokens after 600 steps of `tiny`) derails the token grammar within a few draws;
# cutting what is under 5% of the top token keeps every piece musical, 0 turns it off.
DEFAULT_MIN_P = 0.05


@dataclass
class GeneratedPiece:
    """One generated piece: the model ids (prompt included) and what they decode to."""

    ids: list[int]
    prompt_tokens: int
    score: symusic.Score
    repairs: int
    stop: Stop  # what ended sampling: EOS, max_new_tokens, max_bars or max_seconds

    @property
    def new_tokens(self) -> int:
        return len(self.ids) - self.prompt_tokens

    @property
    def bars(self) -> int:
        """Bars up to the one the last note starts in (0 without notes); a note held past the
        cut at max_bars adds none."""
        onsets = [int(t.notes.numpy()["time"].max()) for t in self.score.tracks if t.notes]
        if not onsets:
            return 0
        last = max(onsets)
        return sum(1 for _ in takewhile(lambda tick: tick <= last, barline_ticks(self.score)))

    def stats(self) -> dict:
        return {
            "tokens": len(self.ids),
            "new_tokens": self.new_tokens,
            "stopped_by": str(self.stop),
            "repairs": self.repairs,
            "notes": self.score.note_num(),
            "bars": self.bars,
            "seconds": round(float(self.score.to("second").end()), 3),
            **compute_all(self.score),
        }


def head_length(tokenizer: MusicTokenizer, prompt: list[int]) -> int:
    """The leading ids of ``prompt`` that say what the piece is, BOS and the labels: a piece
    longer than the model's context keeps them in its window."""
    labels = range(tokenizer.label_offset, tokenizer.vocab_size)
    head = int(bool(prompt) and prompt[0] == tokenizer.bos_id)
    while head < len(prompt) and prompt[head] in labels:
        head += 1
    return head


def compose(
    model: GPT,
    tokenizer: MusicTokenizer,
    prompt: list[int],
    count: int,
    sampling: SamplingConfig,
    batch_size: int = 4,
    max_bars: int | None = None,
    max_seconds: float | None = None,
    controls: ControlPlan | None = None,
) -> list[GeneratedPiece]:
    """``count`` pieces continuing ``prompt`` (model ids starting with BOS), drawn
    ``batch_size`` at a time, seeded as ``seeded_batches`` says. Each piece (prompt included)
    ends at EOS, after ``sampling.max_new_tokens`` new tokens, or as soon as it reaches
    ``max_bars`` bars or ``max_seconds`` seconds: sampling stops there, and the score is cut to
    that length. ``controls`` places bar controls before the bars it asks (the grammar must be
    on: ``sampling.grammar``)."""
    if controls is not None and not sampling.grammar:
        raise ValueError("bar controls are placed by the sampling grammar: sampling.grammar=true")
    batches = seeded_batches(count, batch_size, sampling)
    banned = banned_for(tokenizer, prompt)
    if controls is not None:
        banned = [i for i in banned if i not in controls.ids]
    limited = max_bars is not None or max_seconds is not None
    events = time_events(tokenizer) if limited else {}
    grammar = piece_grammar(tokenizer, model.device) if sampling.grammar else None
    pieces = []
    for rows, seeded in batches:
        meters = [Timeline(tokenizer, events, max_bars, max_seconds) for _ in range(rows)]
        for new in decode(
            model,
            [prompt] * rows,
            seeded,
            tokenizer.eos_id,
            banned_ids=banned,
            head=head_length(tokenizer, prompt),
            meters=meters if limited else (),
            grammar=grammar,
            steering=None
            if controls is None
            else Steering(controls, tokenizer, grammar.bar_openers, rows),
        ):
            ids = prompt + new.complete
            score, repairs = to_midi(tokenizer, ids)
            piece = clip_score(clip_score(score, max_bars), seconds=max_seconds)
            pieces.append(GeneratedPiece(ids, len(prompt), piece, repairs, new.stop))
    return pieces
