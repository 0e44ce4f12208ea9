"""A sentencepiece BPE/Unigram vocabulary learned over MidiTok base tokens.

Each base token is written as one Unicode character (CJK block, so no character is special
to sentencepiece) and a piece is learned over those characters. Every base token is in the
character set, so encoding never produces <unk> and decode(encode(ids)) == ids.
"""

import io
import itertools
from array import array
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from data_pipeline.config import LearnedVocabConfig, LearnedVocabKind

CHAR_OFFSET = 0x4E00


def ids_to_text(base_ids: np.ndarray) -> str:
    # Code points as UTF-32 bytes: one decode, not a chr() per token joined.
    code_points = np.asarray(base_ids, dtype=np.int64) + CHAR_OFFSET
    return code_points.astype("<u4").tobytes().decode("utf-32-le")


def text_to_ids(text: str) -> np.ndarray:
    return np.fromiter((ord(c) - CHAR_OFFSET for c in text), dtype=np.int64, count=len(text))


def sentences(pieces: Iterable[np.ndarray], bar_id: int | None, max_tokens: int) -> Iterator[str]:
    """Bars (or fixed chunks, for tokenizers without bar tokens) as training sentences.

    Unigram training fails on one sentence per piece; a bar is the natural unit anyway.
    """
    for ids in pieces:
        ids = np.asarray(ids)
        if bar_id is not None:
            cuts = np.flatnonzero(ids == bar_id)
            bars = np.split(ids, cuts[cuts > 0])
        else:
            bars = [ids]
        for bar in bars:
            for start in range(0, len(bar), max_tokens):
                chunk = bar[start : start + max_tokens]
                if len(chunk):
                    yield ids_to_text(chunk)


def train(
    pieces: Iterable[np.ndarray],
    musical_ids: range,
    bar_id: int | None,
    cfg: LearnedVocabConfig,
    seed: int,
) -> bytes:
    """Learns the vocabulary; returns the serialized sentencepiece model."""
    if cfg.kind == LearnedVocabKind.none:
        raise ValueError("tokenizer.learned.kind is none: there is no vocabulary to learn")
    required = [chr(CHAR_OFFSET + i) for i in musical_ids]
    if cfg.size <= len(required):
        raise ValueError(
            f"tokenizer.learned.size={cfg.size} must exceed the {len(required)} base tokens "
            f"it is learned over; try tokenizer.learned.size={4 * len(required)}"
        )
    # One thread and a fixed seed: the same corpus learns the same vocabulary, hence hash.
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        # Every base token once, alone (so it adds no pair counts): sentencepiece ignores
        # required_chars that the corpus lacks, and a token unseen in training would be <unk>.
        sentence_iterator=itertools.chain(
            required, sentences(pieces, bar_id, cfg.max_tokens_per_sentence)
        ),
        model_writer=model,
        model_type=cfg.kind.value,
        vocab_size=cfg.size,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_by_unicode_script=False,
        split_by_number=False,
        split_by_whitespace=False,
        max_sentence_length=4 * 3 * cfg.max_tokens_per_sentence,
        max_sentencepiece_length=16,
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


class LearnedVocab:
    """Maps base-token arrays to learned-piece ids and back."""

    # Bars encoded, kept for the next time they come (the next epoch, a repeat, another piece);
    # bounded so that a loader worker's cache stays around a hundred MB (bench/README.md).
    CACHED_BARS = 200_000

    def __init__(self, model: bytes):
        self.model = model
        self._sp = spm.SentencePieceProcessor(model_proto=model)
        proto = sentencepiece_model_pb2.ModelProto.FromString(model)
        self._bpe = proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
        # Bar text -> its piece ids as int32 bytes: a piece's ids are then one bytes join.
        self._bars: dict[str, bytes] = {}
        # Insertion order, for first-in-first-out eviction in O(1): evicting a dict's first
        # key with next(iter(...)) scans the deleted slots before it, slower as the cache fills.
        self._order: deque[str] = deque()
        # By bar id: which pieces open a bar, where bars may be encoded joined (_bar_openers).
        self._openers: dict[int, np.ndarray | None] = {}

    def __len__(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, base_ids: np.ndarray, bar_id: int | None = None) -> np.ndarray:
        """Learned-piece ids of base ids; with ``bar_id`` (the vocabulary was learned over
        bars) bar by bar, each bar encoded once and then cached. Bar by bar gives the same ids
        as the whole piece at once: every training sentence begins at a bar token, so no
        learned piece holds one anywhere but at its start, and none crosses into a bar."""
        base_ids = np.asarray(base_ids, dtype=np.int64)
        text = ids_to_text(base_ids)
        if bar_id is None:
            return np.asarray(self._sp.encode(text), dtype=np.int64)
        # One character per token: the bars are slices of the piece's text, no array for each.
        starts = np.flatnonzero(base_ids[1:] == bar_id) + 1
        bounds = [0, *starts.tolist(), len(text)]
        bars = [text[a:b] for a, b in itertools.pairwise(bounds)]
        found = {bar: self._bars.get(bar) for bar in bars}
        missing = [bar for bar, ids in found.items() if ids is None]
        if missing:
            for bar, ids in zip(missing, self._encode(missing, bar_id), strict=True):
                found[bar] = ids
                self._remember(bar, ids)
        joined = b"".join([found[bar] for bar in bars])
        return np.frombuffer(joined, dtype=np.int32).astype(np.int64)

    def _encode(self, bars: list[str], bar_id: int) -> list[bytes]:
        """Each bar's piece ids (sentencepiece's for the bar alone), as int32 bytes."""
        openers = self._bar_openers(bar_id)
        if openers is None:
            # One thread: the default starts a pool per call, and a loader worker has one core.
            return [array("i", ids).tobytes() for ids in self._sp.encode(bars, num_threads=1)]
        # The bars joined, in one call (a call costs sentencepiece some microseconds, a bar
        # about as many): BPE merges exactly as in each bar alone, since no merge reaches into
        # a bar. A bar's ids begin at its one piece that opens a bar; only the first bar can
        # lack one (a piece's head, the tokens before its first bar).
        ids = np.array(self._sp.encode("".join(bars)), dtype=np.int32)
        cuts = np.flatnonzero(openers[ids]).tolist()
        if not bars[0].startswith(chr(CHAR_OFFSET + bar_id)):
            cuts = [0, *cuts]
        raw = ids.tobytes()
        return [raw[a:b] for a, b in itertools.pairwise([4 * c for c in cuts] + [len(raw)])]

    def _bar_openers(self, bar_id: int) -> np.ndarray | None:
        """Whether each piece opens a bar, if bars can be encoded joined: a BPE vocabulary
        whose pieces hold a bar token at their start only. Not Unigram: its Viterbi sums scores
        in float32 from the start of the text, so joined, a near tie in a bar could break
        another way."""
        if bar_id not in self._openers:
            bar = chr(CHAR_OFFSET + bar_id)
            pieces = [self._sp.id_to_piece(i) for i in range(len(self))]
            joinable = self._bpe and not any(bar in piece[1:] for piece in pieces)
            openers = np.array([piece.startswith(bar) for piece in pieces])
            self._openers[bar_id] = openers if joinable else None
        return self._openers[bar_id]

    def _remember(self, bar: str, ids: bytes) -> None:
        if len(self._order) >= self.CACHED_BARS:  # first in, first out
            del self._bars[self._order.popleft()]
        self._bars[bar] = ids
        self._order.append(bar)

    def decode(self, piece_ids: np.ndarray) -> np.ndarray:
        return text_to_ids(self._sp.decode([int(i) for i in piece_ids]))
