"""Live call and response: each answer is a bar of its own after the bar heard, its notes are
yielded as MidiTok decodes them (onset, duration, pitch), in order, past the model's context
too; tokenizers without whole REMI bars are refused in one line."""

import numpy as np
import pytest
import torch
from support.midi_factory import piece

from data_pipeline.config import TokenizerConfig, TokenizerKind
from data_pipeline.errors import ConfigError
from data_pipeline.tokenizer import MusicTokenizer, build_base_tokenizer
from mtrain.generation.live import LiveSession, RemiClock
from mtrain.generation.sampling import SamplingConfig
from mtrain.model import GPT, GPTConfig


def model_for(tok: MusicTokenizer, context: int) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(tok.vocab_size, n_layer=1, n_head=2, d_model=32, max_seq_len=context)
    return GPT(cfg).eval()


def played(tok: MusicTokenizer, seed: int) -> list[np.ndarray]:
    bars = tok.split_bars(tok.midi_to_base_ids(piece(seed, bars=6)))
    return [b for b in bars if len(b) and b[0] == tok.bar_id]


def as_decoded(tok: MusicTokenizer, ids: list[int]) -> list[tuple]:
    """(onset, duration, pitch) in quarter notes of every note MidiTok decodes from ``ids``."""
    score = tok.base_ids_to_midi(tok.decode_base(np.array(ids)))
    tpq = score.ticks_per_quarter
    notes = [(n.time / tpq, n.duration / tpq, n.pitch) for t in score.tracks for n in t.notes]
    return sorted(notes)


@pytest.mark.parametrize("context", [1024, 96])
def test_answers_are_bars_of_their_own_decoded_as_midi_decodes_them(context):
    tok = MusicTokenizer(build_base_tokenizer(TokenizerConfig()), [])
    live = LiveSession(model_for(tok, context), tok, SamplingConfig(temperature=1.0, seed=3))
    answered = []
    for heard, bar in enumerate(played(tok, 0), start=1):
        live.hear(bar)
        notes = list(live.answer())
        assert [n.onset for n in notes] == sorted(n.onset for n in notes)
        assert {n.bar for n in notes} <= {2 * heard}  # the bar after the one heard
        answered += notes
    assert answered
    clock, clocked = RemiClock(tok.base), []
    for base_id in tok.decode_base(np.array(live.ids)).tolist():
        if (parts := clock.read(base_id)) is not None:
            clocked.append(clock.note_of(parts, 0.0))
    # The clock reads the whole session (heard and answered) as MidiTok's decoder does.
    assert sorted((n.onset, n.duration, n.pitch) for n in clocked) == as_decoded(tok, live.ids)
    yielded = {(n.onset, n.duration, n.pitch) for n in answered}
    assert yielded == {(n.onset, n.duration, n.pitch) for n in clocked if n.bar % 2 == 0}
    if context < 1024:
        assert live.window_start > 0  # the window slid, and sampling went on


def test_tokenizers_without_remi_bars_are_refused_in_one_line():
    tok = MusicTokenizer(build_base_tokenizer(TokenizerConfig(kind=TokenizerKind.TSD)), [])
    with pytest.raises(ConfigError) as error:
        LiveSession(model_for(tok, 64), tok, SamplingConfig())
    assert "tokenizer=remi" in str(error.value) and "\n" not in str(error.value)
