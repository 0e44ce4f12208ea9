"""The sampling grammar: what an untrained model draws under the mask decodes with no repair,
for REMI, a learned BPE vocabulary and MidiTok's type graph; a piece ends only after a note;
likelihood evaluation never masks."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support.midi_factory import piece

from data_pipeline.config import (
    LearnedVocabConfig,
    LearnedVocabKind,
    TokenizerConfig,
    TokenizerKind,
)
from data_pipeline.learned_vocab import LearnedVocab, train
from data_pipeline.reader import StoredPiece
from data_pipeline.tokenizer import MusicTokenizer, build_base_tokenizer
from mtrain.evaluation.likelihood import evaluate_pieces
from mtrain.generation.compose import compose
from mtrain.generation.grammar import Cursor, middle_grammar, piece_grammar
from mtrain.generation.repair import repair
from mtrain.generation.sampling import SamplingConfig
from mtrain.model import GPT, GPTConfig

LABELS = ["collection=folk", "collection=jazz"]
# Hot, unfiltered: what a barely trained model draws at its worst.
HOT = SamplingConfig(temperature=1.2, max_new_tokens=120)


def untrained(tok: MusicTokenizer) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(tok.vocab_size, n_layer=1, n_head=2, d_model=32, max_seq_len=96, init_std=0.2)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def remi() -> MusicTokenizer:
    return MusicTokenizer(build_base_tokenizer(TokenizerConfig()), LABELS)


@pytest.fixture(scope="module")
def bpe(remi) -> MusicTokenizer:
    base = remi.base
    pieces = [remi.midi_to_base_ids(piece(seed)) for seed in range(12)]
    cfg = LearnedVocabConfig(kind=LearnedVocabKind.bpe, size=len(base) + 150)
    vocab = LearnedVocab(train(pieces, range(4, len(base)), base.vocab["Bar_None"], cfg, seed=0))
    return MusicTokenizer(base, LABELS, vocab)


def sampled(tok: MusicTokenizer, grammar: bool, seeds: int = 4):
    model = untrained(tok)
    sampling = SamplingConfig(**{**HOT.__dict__, "grammar": grammar})
    pieces = []
    for seed in range(seeds):
        sampling.seed = seed
        pieces += compose(model, tok, [tok.bos_id], 4, sampling, batch_size=4)
    return pieces


@pytest.mark.parametrize("kind", ["remi", "bpe"])
def test_masked_samples_of_an_untrained_model_need_no_repair_and_hold_notes(kind, request):
    tok = request.getfixturevalue(kind)
    pieces = sampled(tok, grammar=True)
    assert [p.repairs for p in pieces] == [0] * len(pieces)
    assert min(p.score.note_num() for p in pieces) > 0
    # The peer: the same model unmasked needs repairs (the test can fail).
    assert sum(p.repairs for p in sampled(tok, grammar=False, seeds=1)) > 0


def test_masked_samples_follow_the_type_graph_of_other_tokenizers():
    tok = MusicTokenizer(build_base_tokenizer(TokenizerConfig(kind=TokenizerKind.TSD)), LABELS)
    pieces = sampled(tok, grammar=True, seeds=2)
    assert sum(repair(tok, p.ids)[1].total() for p in pieces) == 0
    assert min(p.score.note_num() for p in pieces) > 0


def test_a_piece_ends_only_after_its_first_note_and_labels_only_in_its_head(remi):
    table = piece_grammar(remi)
    sid = table.start()
    labels = range(remi.label_offset, remi.vocab_size)
    assert not table.mask([sid])[0, remi.eos_id]
    assert table.mask([sid])[0, list(labels)].all()
    for token in remi.encode_base(remi.midi_to_base_ids(piece(1)))[:3]:  # Bar TimeSig Position
        sid = table.read(sid, int(token))
        assert not table.mask([sid])[0, remi.eos_id]
        assert not table.mask([sid])[0, list(labels)].any()
    for token in remi.encode_base(remi.midi_to_base_ids(piece(1)))[3:]:
        sid = table.read(sid, int(token))
        if table.states[sid].noted:  # the first note is whole
            break
    assert table.mask([sid])[0, remi.eos_id]


def test_every_token_of_real_music_is_allowed_where_it_stands(remi, bpe):
    for tok in (remi, bpe):
        table = piece_grammar(tok)
        sid = table.start()
        for token in tok.document({}, tok.midi_to_base_ids(piece(3)), end=True)[1:]:
            assert table.mask([sid])[0, int(token)], (tok.learned is not None, int(token))
            sid = table.after(sid, int(token))
        assert table.closable[sid]


def test_likelihood_evaluation_never_masks(remi):
    """Tokens out of grammar are scored by the bare model's softmax, as any other."""
    model = untrained(remi)
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, remi.infill_offset, 60)  # music in no order at all
    stored = StoredPiece("k", tokens, {"labels": {}, "notes": 10, "duration_s": 5.0})
    report = evaluate_pieces(model, remi, [stored])
    doc = torch.from_numpy(remi.document({}, tokens))
    logits = model(doc[None, :-1]).logits[0]
    nats = F.cross_entropy(logits, doc[1:], reduction="sum").item()
    assert math.isclose(report["nll_per_token_nats"] * report["tokens"], nats, rel_tol=1e-5)


def test_a_middle_closes_at_its_gaps_bar_count_and_not_before(remi):
    """Two bars to fill: FIM_END is forbidden in the first bar and before a note, allowed in
    the second once it holds one, where a third Bar drawn closes the middle instead."""
    table = middle_grammar(remi, bars=2)
    end, bar = remi.infill_ids.end, remi.bar_id
    bars = remi.split_bars(remi.midi_to_base_ids(piece(2)))
    cursor = Cursor(table, 1)
    allowed = []
    for token in remi.encode_base(np.concatenate(bars[:2])).tolist():
        allowed.append((table.states[cursor.sids[0]].bars, bool(table.mask(cursor.sids)[0, end])))
        cursor.read(0, token)
    assert not any(ok for bars_read, ok in allowed if bars_read < 2)
    assert any(ok for bars_read, ok in allowed if bars_read == 2)
    assert table.mask(cursor.sids)[0, [end, bar]].all()
    assert cursor.settle(torch.tensor([bar])).tolist() == [end]
    assert cursor.settle(torch.tensor([remi.base.vocab["Position_31"]])).tolist() != [end]
    for rests in (False, True):
        table = middle_grammar(remi, bars=1, rests=rests)
        sid = table.start()
        for token in (bar, remi.base.vocab["TimeSig_4/4"]):
            sid = table.read(sid, token)
        # An empty bar closes only when rests are asked for; else a note comes first.
        assert bool(table.mask([sid])[0, end]) == rests
