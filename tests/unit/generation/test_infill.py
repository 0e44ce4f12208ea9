"""Infilling: the tokens that frame it (and artifacts from before them), the training
rearrangement, and filling bars of a MIDI file without touching the others."""

import hashlib
import json

import numpy as np
import pytest
import torch
from support.midi_factory import piece
from support.scores import notes

from data_pipeline.config import LearnedVocabConfig, LearnedVocabKind, TokenizerConfig
from data_pipeline.errors import ConfigError, InputError
from data_pipeline.learned_vocab import LearnedVocab, train
from data_pipeline.tokenizer import (
    MusicTokenizer,
    base_fingerprint,
    build_base_tokenizer,
    join_bars,
)
from mtrain.data.fill_in_middle import InfillTraining, check_infillable
from mtrain.generation.infill import BarRange, gap_ticks, infill, infill_request, splice
from mtrain.generation.job import GenerateConfig
from mtrain.generation.sampling import SamplingConfig
from mtrain.model import GPT, GPTConfig

LABELS = {"collection": "jazz"}


@pytest.fixture(scope="module")
def tok() -> MusicTokenizer:
    return MusicTokenizer(build_base_tokenizer(TokenizerConfig()), ["collection=jazz"])


def test_an_artifact_from_before_infilling_loads_with_its_ids_and_hash(tok, tmp_path):
    """artifact.json as written before the infilling tokens: no infill_ids, and a hash over the
    base vocabulary and the labels only. It loads unchanged, and says it cannot infill."""
    tok.save(str(tmp_path / "old"))
    meta = json.loads((tmp_path / "old" / "artifact.json").read_text())
    del meta["infill_ids"]
    old_hash = hashlib.sha256()
    old_hash.update(base_fingerprint(tok.base).encode())
    old_hash.update(json.dumps(tok.labels).encode())
    meta["hash"] = old_hash.hexdigest()
    meta["vocab_size"] = len(tok.base) + 1
    (tmp_path / "old" / "artifact.json").write_text(json.dumps(meta))

    old = MusicTokenizer.load(str(tmp_path / "old"))
    assert old.hash == meta["hash"] != tok.hash
    assert old.infill_ids is None and old.vocab_size == len(tok.base) + 1
    assert old.label_ids(LABELS) == [len(tok.base)]  # right after the units, as before
    with pytest.raises(ConfigError, match=r"data.infill_rate=0.5 needs the infilling tokens"):
        InfillTraining(old, 0.5, 128)
    InfillTraining(old, 0.0, 128)  # a rate of 0 trains as before, whatever the artifact


def test_infilling_tokens_sit_between_the_units_and_the_labels_with_a_learned_vocabulary():
    base = build_base_tokenizer(TokenizerConfig())
    pieces = [np.asarray(base.encode(piece(seed)).ids) for seed in range(20)]
    cfg = LearnedVocabConfig(kind=LearnedVocabKind.bpe, size=600)
    vocab = LearnedVocab(train(pieces, range(4, len(base)), base.vocab["Bar_None"], cfg, seed=0))
    tok = MusicTokenizer(base, ["collection=jazz"], vocab)
    fim = tok.infill_ids
    assert list(fim) == list(range(4 + len(vocab), 8 + len(vocab)))
    assert tok.label_offset == fim.end + 1 and tok.vocab_size == tok.label_offset + 1
    doc = InfillTraining(tok, 1.0, 10_000)(LABELS, pieces[0], np.random.default_rng(0))
    # The framing tokens decode to nothing; the three parts are the piece's bars reordered.
    assert sorted(i for i in doc if fim.prefix <= i <= fim.end) == list(fim)
    assert sorted(tok.decode_base(doc)) == sorted(pieces[0])


def test_a_training_piece_becomes_prefix_suffix_middle_at_bar_boundaries(tok):
    base = tok.midi_to_base_ids(piece(5, bars=12))
    plain = tok.document(LABELS, base)
    assert np.array_equal(InfillTraining(tok, 0.0, 128)(LABELS, base, None), plain)
    fim, bar = tok.infill_ids, tok.bar_id
    for seed in range(20):
        doc = InfillTraining(tok, 1.0, 300)(LABELS, base, np.random.default_rng(seed))
        assert len(doc) <= 300 and list(doc[:2]) == list(tok.head(LABELS))
        assert doc[2] == fim.prefix and doc[-1] == fim.end
        cut = [list(doc).index(i) for i in (fim.suffix, fim.middle)]
        prefix, suffix, middle = doc[3 : cut[0]], doc[cut[0] + 1 : cut[1]], doc[cut[1] + 1 : -1]
        assert middle[0] == bar and all(p[0] == bar for p in (prefix, suffix) if len(p))
        excerpt = np.concatenate([prefix, middle, suffix])
        # Whole bars in their order: a run of the piece's own tokens.
        windows = np.lib.stride_tricks.sliding_window_view(base, len(excerpt))
        assert (windows == excerpt).all(axis=1).any()


def test_bad_infill_requests_are_refused_in_one_line(tok):
    for text in ("bars:0-2", "bars:5-3", "9-12", "bars:x"):
        assert BarRange.parse(text) is None
        with pytest.raises(ConfigError, match=r"^infill=.* must be bars:FIRST-LAST"):
            GenerateConfig(checkpoint="c", output="o", prompt="p.mid", infill=text)
    with pytest.raises(ConfigError, match=r"^infill='bars:2-3' needs prompt=<file.mid>"):
        GenerateConfig(checkpoint="c", output="o", infill="bars:2-3")
    with pytest.raises(InputError, match=r"^infill=bars:7-9: the prompt has 8 bars; give a"):
        infill_request(tok, piece(1, bars=8), BarRange(7, 9), {}, 512)
    with pytest.raises(InputError, match=r"^infill=bars:1-8: the bars to fill need about"):
        infill_request(tok, piece(1, bars=8), BarRange(1, 8), {}, 512)
    old = MusicTokenizer(tok.base, tok.labels, infill=False)
    with pytest.raises(InputError, match=r"^infill=bars:2-3 needs the infilling tokens"):
        check_infillable(old, "infill=bars:2-3", {"data": {"infill_rate": 0.5}})
    with pytest.raises(InputError, match=r"^infill=bars:2-3: the model was trained with data"):
        check_infillable(tok, "infill=bars:2-3", {"data": {"infill_rate": 0.0}})


def test_filling_keeps_every_note_outside_the_gap_exactly(tok):
    """Even an untrained model's fill leaves the notes outside the gap as they were (velocities
    and ticks off the tokenizer's grid included), and the true middle bars spliced back give
    the gap's notes on the grid."""
    score = piece(3, bars=10)
    for track in score.tracks:  # off the grid: the tokenizer would move these
        for note in track.notes:
            note.time += 7
    gap = BarRange(4, 5)
    ticks = gap_ticks(score, tok, gap)
    request = infill_request(tok, score, gap, LABELS, 512)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, max_seq_len=512)
    (filled,) = infill(GPT(cfg).eval(), tok, request, 1, SamplingConfig(max_new_tokens=24))
    # An untrained model does not stop by itself; what it wrote is kept to its last whole note.
    assert filled.stop == "max_new_tokens" and 16 <= filled.new_tokens <= 24 and not filled.repairs
    assert notes(filled.score, ticks, False) == notes(score, ticks, False)
    true_middle = tok.encode_base(join_bars(request.bars[3:5])).tolist()
    oracle, repairs = splice(tok, request, [*true_middle, tok.infill_ids.end])
    quantized = tok.base_ids_to_midi(tok.midi_to_base_ids(score.copy()))
    scale = score.ticks_per_quarter / quantized.ticks_per_quarter
    on_grid = [
        (n[0], n[1], ticks[0] + round((n[2] - gap_ticks(quantized, tok, gap)[0]) * scale), n[4])
        for n in notes(quantized, gap_ticks(quantized, tok, gap), True)
    ]
    assert repairs == 0
    assert [(n[0], n[1], n[2], n[4]) for n in notes(oracle, ticks, True)] == sorted(on_grid)
    assert notes(oracle, ticks, False) == notes(score, ticks, False)


def test_a_gap_longer_than_the_context_is_filled_in_steps_each_bar_with_notes(tok):
    """Four bars whose middle needs more tokens than a context of 256 leaves: filled a bar at a
    time, each reading the bars around it, every note outside kept, every bar given notes and
    no token repaired (the grammar holds each middle to its bars)."""
    score = piece(3, bars=10)
    gap = BarRange(3, 6)
    with pytest.raises(InputError, match="fill fewer bars"):
        infill_request(tok, score, gap, LABELS, 256)
    request = infill_request(tok, score, gap, LABELS, 256, in_steps=True)
    assert request.steps == [BarRange(bar, bar) for bar in range(3, 7)]
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, max_seq_len=256)
    hot = SamplingConfig(temperature=1.2, max_new_tokens=80)
    (filled,) = infill(GPT(cfg).eval(), tok, request, 1, hot)
    assert filled.repairs == 0
    assert notes(filled.score, gap_ticks(score, tok, gap), False) == notes(
        score, gap_ticks(score, tok, gap), False
    )
    for bar in range(3, 7):
        assert notes(filled.score, gap_ticks(score, tok, BarRange(bar, bar)), True), bar
