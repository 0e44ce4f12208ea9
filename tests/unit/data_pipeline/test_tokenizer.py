"""Tokenizer artifact: MIDI round trips for every base tokenizer, learned vocabularies that
decode back exactly, and a saved artifact that reloads under the same hash."""

import json
import pickle

import numpy as np
import pytest
import sentencepiece as spm
from support.midi_factory import piece

from data_pipeline.config import (
    LearnedVocabConfig,
    LearnedVocabKind,
    TokenizerConfig,
    TokenizerKind,
)
from data_pipeline.learned_vocab import CHAR_OFFSET, LearnedVocab, ids_to_text, train
from data_pipeline.tokenizer import MusicTokenizer, build_base_tokenizer
from mtrain.data.augmentation import Augmenter


def notes(score, with_velocity=False):
    """(program, pitch, onset in beats[, velocity]) of every note, drums as program -1."""
    tpq = score.ticks_per_quarter
    return sorted(
        (-1 if t.is_drum else t.program, n.pitch, n.time / tpq)
        + ((n.velocity,) if with_velocity else ())
        for t in score.tracks
        for n in t.notes
    )


@pytest.mark.parametrize("kind", list(TokenizerKind))
def test_tokens_decode_back_to_the_same_notes(kind):
    tok = MusicTokenizer(build_base_tokenizer(TokenizerConfig(kind=kind)), [])
    score = piece(3)
    decoded = tok.base_ids_to_midi(tok.midi_to_base_ids(score))
    # Onsets sit on the tokenizer's grid, so pitches, programs and onsets survive exactly;
    # velocities survive up to their quantization.
    assert notes(decoded) == notes(score)
    assert notes(decoded, True) == notes(tok.base.preprocess_score(score.copy()), True)


@pytest.fixture(scope="module")
def training_pieces():
    tok = build_base_tokenizer(TokenizerConfig())
    return tok, [np.asarray(tok.encode(piece(seed)).ids) for seed in range(60)]


@pytest.mark.parametrize("kind", [LearnedVocabKind.bpe, LearnedVocabKind.unigram])
def test_learned_vocabulary_round_trips_exactly(training_pieces, kind):
    base, pieces = training_pieces
    cfg = LearnedVocabConfig(kind=kind, size=700)
    vocab = LearnedVocab(train(pieces, range(4, len(base)), base.vocab["Bar_None"], cfg, seed=0))
    tok = MusicTokenizer(base, ["collection=jazz"], vocab)
    unseen = np.asarray(base.encode(piece(1000)).ids)  # not in the training pieces
    for ids in [*pieces[:10], unseen]:
        model_ids = tok.encode_base(ids)
        assert len(model_ids) < len(ids)  # pieces merge tokens
        assert model_ids.min() >= tok.num_specials and model_ids.max() < tok.label_offset
        np.testing.assert_array_equal(tok.decode_base(model_ids), ids)
    # A token never seen in training still encodes (every base token is a required char).
    rare = np.array([base.vocab["Pitch_108"], base.vocab["Pitch_21"]])
    np.testing.assert_array_equal(tok.decode_base(tok.encode_base(rare)), rare)


@pytest.mark.parametrize("kind", [LearnedVocabKind.bpe, LearnedVocabKind.unigram])
def test_bar_by_bar_encoding_gives_the_whole_piece_encoding(training_pieces, kind):
    base, pieces = training_pieces
    cfg = LearnedVocabConfig(kind=kind, size=700)
    vocab = LearnedVocab(train(pieces, range(4, len(base)), base.vocab["Bar_None"], cfg, seed=0))
    vocab.CACHED_BARS = 50  # fewer than the pieces' bars: eviction happens too
    unseen = [np.asarray(base.encode(piece(seed)).ids) for seed in range(1000, 1005)]
    for ids in [*pieces[:10], *unseen, *pieces[:3]]:  # the last three come from the cache
        body = ids[ids >= 4]
        whole = vocab.encode(body)  # no bar id: the piece in one go
        np.testing.assert_array_equal(vocab.encode(body, base.vocab["Bar_None"]), whole)


def learn(training_pieces, kind: LearnedVocabKind, bars: bool = True) -> LearnedVocab:
    base, pieces = training_pieces
    bar_id = base.vocab["Bar_None"] if bars else None
    cfg = LearnedVocabConfig(kind=kind, size=700)
    return LearnedVocab(train(pieces, range(4, len(base)), bar_id, cfg, seed=0))


def sentencepiece_bars(vocab: LearnedVocab, ids: np.ndarray, bar_id: int) -> np.ndarray:
    """What the loader's ids must be: sentencepiece on each bar alone."""
    sp = spm.SentencePieceProcessor(model_proto=vocab.model)
    starts = np.flatnonzero(ids == bar_id)
    bars = np.split(ids, starts[starts > 0])
    return np.array([i for bar in bars for i in sp.encode(ids_to_text(bar))], dtype=np.int64)


@pytest.mark.parametrize("kind", [LearnedVocabKind.bpe, LearnedVocabKind.unigram])
def test_loader_ids_are_sentencepieces_bar_by_bar(training_pieces, kind):
    """Transposed as the loader does, through a cache that evicts, with a head before the first
    bar, empty bars and empty pieces: every id is sentencepiece's."""
    base, pieces = training_pieces
    bar_id = base.vocab["Bar_None"]
    vocab = learn(training_pieces, kind)
    vocab.CACHED_BARS = 100  # fewer than the bars below: eviction happens too
    augment, rng = Augmenter(base.vocab, 5, 0), np.random.default_rng(0)
    unseen = [np.asarray(base.encode(piece(seed)).ids) for seed in range(1000, 1005)]
    bodies = [augment(ids, rng)[ids >= 4] for ids in [*pieces[:20], *unseen] * 3]
    bodies[1] = bodies[1][5:]  # a head: tokens before the first bar
    bodies += [np.array([bar_id, bar_id, 40, bar_id], dtype=np.int64), np.zeros(0, np.int64)]
    sp = spm.SentencePieceProcessor(model_proto=vocab.model)
    for ids in bodies:
        np.testing.assert_array_equal(
            vocab.encode(ids, bar_id), sentencepiece_bars(vocab, ids, bar_id)
        )
        # Without a bar id: the ids of the whole piece at once.
        np.testing.assert_array_equal(vocab.encode(ids), sp.encode(ids_to_text(ids)))


@pytest.mark.parametrize("kind", [LearnedVocabKind.bpe, LearnedVocabKind.unigram])
def test_cached_bars_give_the_ids_of_a_cold_vocabulary_through_evictions(training_pieces, kind):
    base, pieces = training_pieces
    bar_id = base.vocab["Bar_None"]
    warm = learn(training_pieces, kind)
    warm.CACHED_BARS = 40  # fewer than a few pieces' bars: evictions all along
    bodies = [ids[ids >= 4] for ids in pieces[:12]]
    for _ in range(3):  # rounds two and three: hits, and misses for the bars evicted
        for body in bodies:
            cold = LearnedVocab(warm.model)  # nothing cached yet
            np.testing.assert_array_equal(warm.encode(body, bar_id), cold.encode(body, bar_id))


def test_the_cache_a_loader_worker_receives_stays_within_its_bound(training_pieces):
    """Pickled (as loader workers receive it), a vocabulary carries the bars it has cached:
    past its bound it carries no more, however many pieces it encodes."""
    base, pieces = training_pieces
    bar_id = base.vocab["Bar_None"]
    model = learn(training_pieces, LearnedVocabKind.bpe).model
    cold = len(pickle.dumps(LearnedVocab(model)))

    def carried(n_pieces: int, bound: int) -> int:
        vocab = LearnedVocab(model)
        vocab.CACHED_BARS = bound
        for ids in pieces[:n_pieces]:
            vocab.encode(ids[ids >= 4], bar_id)
        return len(pickle.dumps(vocab)) - cold

    unbounded, few, many = carried(60, 10**6), carried(10, 30), carried(60, 30)
    assert many < 0.25 * unbounded  # 30 bars of the pieces' hundreds
    assert many < 2 * few  # six times the pieces, about the same 30 bars


def test_vocabulary_with_pieces_across_bars_encodes_bar_by_bar(training_pieces):
    """Learned without bars, BPE pieces cross into bars: joined, bars would merge together, so
    each bar goes to sentencepiece alone (the ids the loader always had)."""
    base, pieces = training_pieces
    bar_id = base.vocab["Bar_None"]
    vocab = learn(training_pieces, LearnedVocabKind.bpe, bars=False)
    bar = chr(CHAR_OFFSET + bar_id)
    sp = spm.SentencePieceProcessor(model_proto=vocab.model)
    assert any(bar in sp.id_to_piece(i)[1:] for i in range(len(vocab)))
    for ids in pieces[:10]:
        body = ids[ids >= 4]
        np.testing.assert_array_equal(
            vocab.encode(body, bar_id), sentencepiece_bars(vocab, body, bar_id)
        )
        np.testing.assert_array_equal(vocab.encode(body), sp.encode(ids_to_text(body)))


def test_learned_vocabulary_pickles_with_its_cache(training_pieces):
    """Loader workers get the tokenizer pickled."""
    base, pieces = training_pieces
    vocab = learn(training_pieces, LearnedVocabKind.bpe)
    body = pieces[0][pieces[0] >= 4]
    ids = vocab.encode(body, base.vocab["Bar_None"])
    pickled = pickle.dumps(vocab)
    assert len(pickled) > len(pickle.dumps(LearnedVocab(vocab.model)))  # the bars came along
    np.testing.assert_array_equal(pickle.loads(pickled).encode(body, base.vocab["Bar_None"]), ids)


def test_learned_size_must_exceed_the_base_vocabulary(training_pieces):
    base, pieces = training_pieces
    with pytest.raises(ValueError, match=r"tokenizer.learned.size=100 must exceed"):
        train(pieces, range(4, len(base)), None, LearnedVocabConfig(LearnedVocabKind.bpe, 100), 0)


def test_artifact_saves_reloads_and_detects_damage(training_pieces, tmp_path):
    base, pieces = training_pieces
    cfg = LearnedVocabConfig(kind=LearnedVocabKind.bpe, size=700)
    vocab = LearnedVocab(train(pieces, range(4, len(base)), base.vocab["Bar_None"], cfg, seed=0))
    tok = MusicTokenizer(base, ["collection=folk", "collection=jazz"], vocab)
    tok.save(str(tmp_path / "tok"))
    again = MusicTokenizer.load(str(tmp_path / "tok"))
    assert again.hash == tok.hash and again.vocab_size == tok.vocab_size
    assert again.label_ids({"collection": "jazz"}) == [tok.label_offset + 1]
    assert again.label_ids({"collection": "unknown"}) == []
    np.testing.assert_array_equal(again.encode_base(pieces[0]), tok.encode_base(pieces[0]))

    meta = json.loads((tmp_path / "tok" / "artifact.json").read_text())
    meta["hash"] = "0" * 64
    (tmp_path / "tok" / "artifact.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="is damaged"):
        MusicTokenizer.load(str(tmp_path / "tok"))
    with pytest.raises(FileNotFoundError, match="not a complete tokenizer artifact"):
        MusicTokenizer.load(str(tmp_path / "missing"))
