"""The learned-vocabulary encode path, as a loader worker runs it: today's LearnedVocab (kept
below as the peer) against data_pipeline.learned_vocab's, in CPU time.

    python bench/bench_vocab.py [data/bach] [--vocabs bpe:1000 bpe:4000 unigram:1000]
        [--epochs 3] [--repeats 3] [--engines]

Each vocabulary is learned over the dataset's train pieces (as prepare learns it), then the
training loader itself (StreamingData, num_workers=0: in this process) reads ``--epochs``
epochs with its own random transposition, once per class, interleaved, ``--repeats`` times.
Two regimes: ``cold``, a fresh cache (a small corpus: bars come back every epoch), and
``full``, the cache first filled with CACHED_BARS bars that never come back and ``--churn`` of
them evicted already (a worker on a large corpus, whose cache is full within its first 200k
bars and evicts from then on).

Rates are base tokens per CPU second: inside LearnedVocab.encode (the encode path) and for
the whole loader (reading, augmentation, packing included). Identity: the two classes' batches
must hash alike, and the new ids must equal sentencepiece's, bar by bar, on every piece read.
``--engines`` also times the encoders a miss could use (sentencepiece per bar or per piece,
Hugging Face tokenizers built from the sentencepiece model) on the pieces read.
"""

import argparse
import itertools
import statistics
import time
import zlib
from collections.abc import Callable

import numpy as np
import sentencepiece as spm

from data_pipeline import learned_vocab
from data_pipeline.config import LearnedVocabConfig, LearnedVocabKind
from data_pipeline.learned_vocab import CHAR_OFFSET, LearnedVocab, ids_to_text, text_to_ids
from data_pipeline.reader import split_shares
from data_pipeline.tokenizer import MusicTokenizer
from mtrain.data.loader import DataConfig, StreamingData

SEQ_LEN, BATCH = 512, 8


class OldLearnedVocab:
    """LearnedVocab's encode and cache as they were before this bench (the peer)."""

    CACHED_BARS = 200_000

    def __init__(self, model: bytes):
        self.model = model
        self._sp = spm.SentencePieceProcessor(model_proto=model)
        self._bars: dict[bytes, np.ndarray] = {}

    def __len__(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, base_ids: np.ndarray, bar_id: int | None = None) -> np.ndarray:
        base_ids = np.asarray(base_ids, dtype=np.int64)
        if bar_id is None:
            return np.asarray(self._sp.encode(ids_to_text(base_ids)), dtype=np.int64)
        cuts = np.flatnonzero(base_ids == bar_id)
        keys = [bar.astype(np.int32).tobytes() for bar in np.split(base_ids, cuts[cuts > 0])]
        bars = {key: self._bars.get(key) for key in keys}
        missing = [key for key, ids in bars.items() if ids is None]
        if missing:
            texts = [ids_to_text(np.frombuffer(key, dtype=np.int32)) for key in missing]
            for key, ids in zip(missing, self._sp.encode(texts), strict=True):
                bars[key] = np.asarray(ids, dtype=np.int64)
                if len(self._bars) >= self.CACHED_BARS:  # first in, first out
                    del self._bars[next(iter(self._bars))]
                self._bars[key] = bars[key]
        if not keys:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([bars[key] for key in keys])

    def decode(self, piece_ids: np.ndarray) -> np.ndarray:
        return text_to_ids(self._sp.decode([int(i) for i in piece_ids]))


Vocab = LearnedVocab | OldLearnedVocab


class Timed:
    """A vocabulary that counts the CPU time and base tokens of its encode calls and keeps
    what it was asked to encode (for the identity check)."""

    def __init__(self, vocab: Vocab, keep: bool):
        self.vocab, self.keep = vocab, keep
        self.cpu_s, self.tokens = 0.0, 0
        self.inputs: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, base_ids: np.ndarray, bar_id: int | None = None) -> np.ndarray:
        start = time.process_time()
        ids = self.vocab.encode(base_ids, bar_id)
        self.cpu_s += time.process_time() - start
        self.tokens += len(base_ids)
        if self.keep:
            self.inputs.append(np.array(base_ids))
        return ids


def fill(vocab: Vocab, bar_id: int, base_size: int, churn: int) -> None:
    """Fills the cache with CACHED_BARS bars, then evicts ``churn`` of them with as many more:
    distinct bars of a bar token and three others that no piece of music holds."""
    others = np.setdiff1d(np.arange(4, base_size), [bar_id])
    n = vocab.CACHED_BARS + churn
    codes = others[np.arange(n)[:, None] // len(others) ** np.arange(3) % len(others)]
    bars = np.concatenate([np.full((n, 1), bar_id), codes], axis=1)
    for chunk in np.array_split(bars, n // 10_000):
        vocab.encode(chunk.ravel(), bar_id)


def read(path: str, vocab: Timed | None, epochs: int) -> tuple[float, int, int]:
    """(loader CPU seconds, window tokens, hash of the batches) for ``epochs`` epochs."""
    data = StreamingData(DataConfig(path=path, num_workers=0), SEQ_LEN, BATCH)
    data.tokenizer.learned = vocab  # the loader's documents go through this vocabulary
    digest, tokens = 0, 0
    start = time.process_time()
    for inputs, _ in data.train_batches():
        digest = zlib.crc32(inputs.numpy().tobytes(), digest)
        tokens += inputs.numel()
        if data.train.epoch >= epochs:
            break
    return time.process_time() - start, tokens, digest


def sentencepiece_bars(sp: spm.SentencePieceProcessor, base_ids: np.ndarray, bar_id: int):
    """The reference: sentencepiece on each bar's text alone."""
    starts = np.flatnonzero(base_ids == bar_id)
    bars = np.split(base_ids, starts[starts > 0])
    return np.array([i for bar in bars for i in sp.encode(ids_to_text(bar))], dtype=np.int64)


def huggingface(model: bytes, kind: LearnedVocabKind, bar_id: int):
    """A tokenizers.Tokenizer built from the sentencepiece model: BPE with every split of a
    piece as a merge, ranked by the piece's id (its score order); Unigram with the scores. The
    pre-tokenizer only cuts the text before each bar token."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    sp = spm.SentencePieceProcessor(model_proto=model)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    if kind == LearnedVocabKind.bpe:
        vocab = {piece: i for i, piece in enumerate(pieces)}
        merges = [
            (p[:k], p[k:])
            for p in pieces
            for k in range(1, len(p))
            if p[:k] in vocab and p[k:] in vocab
        ]
        hf = Tokenizer(models.BPE(vocab, merges, unk_token=pieces[0]))
    else:
        scores = [(p, sp.get_score(i)) for i, p in enumerate(pieces)]
        hf = Tokenizer(models.Unigram(scores, unk_id=0, byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Split(chr(CHAR_OFFSET + bar_id), "merged_with_next")
    return hf


def engines(model: bytes, kind: LearnedVocabKind, bar_id: int, pieces: list, reference: list):
    """Base tokens per CPU second of each encoder a cache miss could go to, over ``pieces``."""
    sp = spm.SentencePieceProcessor(model_proto=model)
    hf = huggingface(model, kind, bar_id)

    def per_bar(ids):
        text = ids_to_text(ids)
        bounds = [0, *np.flatnonzero(ids[1:] == bar_id) + 1, len(text)]
        texts = [text[a:b] for a, b in itertools.pairwise(bounds)]
        return [i for bar in sp.encode(texts, num_threads=1) for i in bar]

    candidates: dict[str, Callable] = {
        "sentencepiece, bars in one call": per_bar,
        "sentencepiece, the piece at once": lambda ids: sp.encode(ids_to_text(ids)),
        "tokenizers, the piece at once": lambda ids: hf.encode(ids_to_text(ids)).ids,
    }
    total = sum(len(p) for p in pieces)
    for name, encode in candidates.items():
        start = time.process_time()
        out = [encode(p) for p in pieces]
        rate = total / (time.process_time() - start)
        wrong = sum(not np.array_equal(o, r) for o, r in zip(out, reference, strict=True))
        print(f"    {name:34s} {rate / 1e6:6.2f} M tok/s  pieces differing: {wrong}")


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} [{min(values):.2f}-{max(values):.2f}]"


def bench_vocab(
    path: str, model: bytes, kind: LearnedVocabKind, tok: MusicTokenizer, args: argparse.Namespace
) -> None:
    for regime in ("cold", "full"):
        rates: dict[str, list[float]] = {"old": [], "new": [], "old loader": [], "new loader": []}
        for repeat in range(args.repeats):
            digests = {}
            for name, cls in (("old", OldLearnedVocab), ("new", LearnedVocab)):
                vocab = cls(model)
                if regime == "full":
                    fill(vocab, tok.bar_id, len(tok.base), args.churn)
                timed = Timed(vocab, keep=regime == "cold" and repeat == 0 and name == "new")
                loader_s, _, digests[name] = read(path, timed, args.epochs)
                rates[name].append(timed.tokens / timed.cpu_s / 1e6)
                rates[f"{name} loader"].append(timed.tokens / loader_s / 1e6)
                if timed.keep:
                    check_identity(model, kind, timed, tok.bar_id, args.engines)
            if digests["old"] != digests["new"]:
                raise AssertionError(f"{regime} repeat {repeat}: the batches differ")
        ratios = [n / o for n, o in zip(rates["new"], rates["old"], strict=True)]
        loader = [n / o for n, o in zip(rates["new loader"], rates["old loader"], strict=True)]
        print(
            f"  {regime}: encode path M tok/s old {spread(rates['old'])} new "
            f"{spread(rates['new'])} ratio {spread(ratios)}\n"
            f"  {regime}: whole loader M tok/s old {spread(rates['old loader'])} new "
            f"{spread(rates['new loader'])} ratio {spread(loader)}  (batches identical)"
        )


def check_identity(
    model: bytes, kind: LearnedVocabKind, timed: Timed, bar_id: int, with_engines: bool
) -> None:
    sp = spm.SentencePieceProcessor(model_proto=model)
    fresh = LearnedVocab(model)
    reference = [sentencepiece_bars(sp, ids, bar_id) for ids in timed.inputs]
    wrong = sum(
        not np.array_equal(fresh.encode(ids, bar_id), ref)
        for ids, ref in zip(timed.inputs, reference, strict=True)
    )
    print(f"  identity: {len(timed.inputs)} pieces read, {wrong} differ from sentencepiece's ids")
    if wrong:
        raise AssertionError("the new encode differs from sentencepiece")
    if with_engines:
        engines(model, kind, bar_id, timed.inputs, reference)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", nargs="?", default="data/bach")
    p.add_argument("--vocabs", nargs="+", default=["bpe:1000", "bpe:4000", "unigram:1000"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engines", action="store_true")
    # Bars evicted before a full-cache run: the old FIFO's eviction scans the dict's deleted
    # slots, so its cost grows with them (~80 us each after 100k, 50-370 us in steady state).
    p.add_argument("--churn", type=int, default=100_000)
    args = p.parse_args()

    data = StreamingData(DataConfig(path=args.path, num_workers=0), SEQ_LEN, BATCH)
    tok = data.tokenizer
    base = [read(args.path, None, args.epochs) for _ in range(args.repeats)]
    rates = [tokens / cpu_s / 1e6 for cpu_s, tokens, _ in base]
    print(f"base vocabulary: whole loader {spread(rates)} M window tok/s")
    pieces = [p.tokens for p in data.reader.pieces(split_shares(args.path, "train", data.card))]
    for spec in args.vocabs:
        kind, size = spec.split(":")
        cfg = LearnedVocabConfig(kind=LearnedVocabKind(kind), size=int(size))
        model = learned_vocab.train(pieces, range(4, len(tok.base)), tok.bar_id, cfg, seed=0)
        print(f"{spec} ({len(LearnedVocab(model))} pieces), {args.epochs} epochs x {args.repeats}:")
        bench_vocab(args.path, model, cfg.kind, tok, args)


if __name__ == "__main__":
    main()
