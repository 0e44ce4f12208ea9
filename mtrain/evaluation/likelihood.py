"""How well a model predicts held-out music: NLL per token, per note and per second.

Perplexity per token depends on the tokenizer (a learned vocabulary packs several base tokens
into one), so the same total information is also reported per note and per second of music,
which are comparable across tokenizers. Every token of a piece is scored once, with up to half
a context window of history before it (strided windows), in pieces read whole from the shards.
"""

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline.reader import StoredPiece
from data_pipeline.tokenizer import SPECIAL_TOKENS, MusicTokenizer, is_control
from mtrain.model import GPT

IGNORE = -100


def token_types(tokenizer: MusicTokenizer) -> list[str]:
    """A type per model id: the MidiTok token family (Pitch, Duration, Position, ...),
    ``special``, ``infill`` for the infilling tokens, ``conditioning`` for labels, ``control``
    for bar controls, ``learned`` for learned-vocabulary pieces. Bar controls are never scored:
    pieces are read as plain documents, so a model trained with controls is measured on the
    same tokens, and bits per note count the music alone."""
    types = ["special"] * len(SPECIAL_TOKENS)
    if tokenizer.learned is None:
        by_id = {i: name for name, i in tokenizer.base.vocab.items()}
        types += [by_id[i].split("_")[0] for i in range(len(SPECIAL_TOKENS), len(by_id))]
    else:
        types += ["learned"] * tokenizer.num_units
    labels = ["control" if is_control(name) else "conditioning" for name in tokenizer.labels]
    return types + ["infill"] * tokenizer.num_infill + labels


def windows(doc: np.ndarray, length: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) windows of ``length`` covering every target of ``doc`` once; targets
    already scored by the previous window (kept as context) are set to IGNORE."""
    out, scored, stride = [], 0, max(1, length // 2)
    start = 0
    while scored < len(doc) - 1:
        chunk = doc[start : start + length + 1]
        inputs, targets = chunk[:-1].copy(), chunk[1:].copy()
        targets[: scored - start] = IGNORE  # predicted already, with less context
        pad = length - len(inputs)
        out.append((np.pad(inputs, (0, pad)), np.pad(targets, (0, pad), constant_values=IGNORE)))
        scored = start + len(targets)
        start += stride
    return out


@dataclass
class Tally:
    """Information summed over the pieces of a split, overall, by token type and by
    collection (a piece's ``collection`` label)."""

    nats: float = 0.0
    tokens: int = 0
    notes: int = 0
    seconds: float = 0.0
    pieces: int = 0
    by_type: dict = field(default_factory=lambda: defaultdict(lambda: [0.0, 0]))
    by_collection: dict = field(default_factory=dict)

    def add_piece(self, piece: StoredPiece) -> "Tally":
        """Counts a piece's notes and seconds, here and in its collection's tally, which it
        returns (for the piece's tokens: ``add_tokens``)."""
        name = piece.labels.get("collection", "-")
        collection = self.by_collection.setdefault(name, Tally())
        for tally in (self, collection):
            tally.pieces += 1
            tally.notes += piece.meta["notes"]
            tally.seconds += piece.meta["duration_s"]
        return collection

    def add_tokens(self, nats: float, tokens: int) -> None:
        self.nats += nats
        self.tokens += tokens

    def add_types(self, nats: np.ndarray, kinds: np.ndarray) -> None:
        """Per-token nats split by the token types ``kinds`` (same length)."""
        for kind in np.unique(kinds):
            mask = kinds == kind
            self.by_type[kind][0] += float(nats[mask].sum())
            self.by_type[kind][1] += int(mask.sum())

    def headline(self) -> dict:
        bits = self.nats / math.log(2)
        return {
            "pieces": self.pieces,
            "tokens": self.tokens,
            "notes": self.notes,
            "seconds": round(self.seconds, 2),
            "nll_per_token_nats": self.nats / self.tokens,
            "perplexity": math.exp(self.nats / self.tokens),
            "bits_per_token": bits / self.tokens,
            "bits_per_note": bits / self.notes,
            "bits_per_second": bits / self.seconds,
        }

    def report(self) -> dict:
        if not self.pieces:
            raise ValueError("no pieces to evaluate")
        return {
            **self.headline(),
            "by_token_type": {
                kind: {"tokens": n, "nll_nats": nats / n, "share_of_bits": nats / self.nats}
                for kind, (nats, n) in sorted(self.by_type.items())
            },
            "by_collection": {
                name: tally.headline()
                for name, tally in sorted(self.by_collection.items())
                if tally.tokens and tally.notes and tally.seconds
            },
        }


@torch.no_grad()
def window_nats(
    model: GPT, batch: list[tuple[np.ndarray, np.ndarray]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nats per target, the targets, which of them are scored) of a batch of ``windows``, on
    the CPU (tallies index them with numpy)."""
    inputs = torch.from_numpy(np.stack([w[0] for w in batch]))
    targets = torch.from_numpy(np.stack([w[1] for w in batch]))
    logits = model.eval()(inputs.to(model.device)).logits.float()
    nll = F.cross_entropy(
        logits.transpose(1, 2), targets.to(model.device), ignore_index=IGNORE, reduction="none"
    ).cpu()
    return nll, targets, targets != IGNORE


@torch.no_grad()
def evaluate_pieces(
    model: GPT, tokenizer: MusicTokenizer, pieces: Iterable[StoredPiece], batch_size: int = 8
) -> dict:
    """Scores every piece, read whole as the model reads it."""
    kinds = np.array(token_types(tokenizer))
    length = model.config.max_seq_len
    tally = Tally()
    # Windows waiting for a batch, each with the collection tally of its piece.
    pending: list[tuple[np.ndarray, np.ndarray, Tally]] = []

    def flush():
        nll, targets, scored = window_nats(model, [(w[0], w[1]) for w in pending])
        tally.add_tokens(nll[scored].sum().item(), int(scored.sum()))
        tally.add_types(nll[scored].numpy(), kinds[targets[scored].numpy()])
        row_nats, row_tokens = (nll * scored).sum(1), scored.sum(1)
        for (_, _, collection), nats, n in zip(pending, row_nats, row_tokens, strict=True):
            collection.add_tokens(nats.item(), int(n))
        pending.clear()

    for piece in pieces:
        collection = tally.add_piece(piece)
        for inputs, targets in windows(tokenizer.document(piece.labels, piece.tokens), length):
            pending.append((inputs, targets, collection))
            if len(pending) == batch_size:
                flush()
    if pending:
        flush()
    return tally.report()
