"""Composing pieces: prompts continued in batches, each decoded to a valid score with its stats."""

import dataclasses
from dataclasses import dataclass

import symusic

from data_pipeline.tokenizer import MusicTokenizer
from mtrain.evaluation.music_metrics import compute_all
from mtrain.generation.decoding import decode
from mtrain.generation.prompts import banned_for, clip_score
from mtrain.generation.repair import to_midi
from mtrain.generation.sampling import SamplingConfig
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
    stopped: bool  # drew EOS before any length limit

    @property
    def new_tokens(self) -> int:
        return len(self.ids) - self.prompt_tokens

    def stats(self) -> dict:
        return {
            "tokens": len(self.ids),
            "new_tokens": self.new_tokens,
            "repairs": self.repairs,
            "ended_with_eos": self.stopped,
            "notes": self.score.note_num(),
            "seconds": round(float(self.score.to("second").end()), 3),
            **compute_all(self.score),
        }


def compose(
    model: GPT,
    tokenizer: MusicTokenizer,
    prompt: list[int],
    count: int,
    sampling: SamplingConfig,
    batch_size: int = 4,
    max_bars: int | None = None,
    max_seconds: float | None = None,
) -> list[GeneratedPiece]:
    """``count`` pieces continuing ``prompt`` (model ids starting with BOS), drawn
    ``batch_size`` at a time; batch b draws with seed ``sampling.seed + b`` so that any batch
    size gives reproducible music."""
    if count < 1 or batch_size < 1:
        raise ValueError(f"num_samples={count} and batch_size={batch_size} must be >= 1")
    banned = banned_for(tokenizer, prompt)
    pieces = []
    for batch, start in enumerate(range(0, count, batch_size)):
        rows = min(batch_size, count - start)
        seeded = dataclasses.replace(sampling, seed=sampling.seed + batch)
        for new in decode(model, [prompt] * rows, seeded, tokenizer.eos_id, banned_ids=banned):
            ids = prompt + new
            score, repairs = to_midi(tokenizer, ids)
            stopped = bool(new) and new[-1] == tokenizer.eos_id
            piece = clip_score(score, max_bars, max_seconds)
            pieces.append(GeneratedPiece(ids, len(prompt), piece, repairs, stopped))
    return pieces
