"""Bar controls: the values are MidiTok's own, a controlled document decodes to the same music,
training draws them at its rates, sampling places exactly the asked tokens before the asked
bars (REMI and a learned vocabulary), and bad requests are refused in one line."""

import copy

import miditok
import numpy as np
import pytest
import symusic
import torch
from support.midi_factory import piece

from data_pipeline.bar_controls import ATTRIBUTES, bar_values
from data_pipeline.config import (
    LearnedVocabConfig,
    LearnedVocabKind,
    TokenizerConfig,
    TokenizerKind,
)
from data_pipeline.errors import ConfigError
from data_pipeline.learned_vocab import LearnedVocab, train
from data_pipeline.tokenizer import MusicTokenizer, build_base_tokenizer
from mtrain.data.controls import AttributeControlsConfig, ControlTraining, with_controls
from mtrain.evaluation.likelihood import token_types
from mtrain.generation.compose import compose
from mtrain.generation.controls import ControlPlan, outcomes, parse_controls
from mtrain.generation.sampling import SamplingConfig
from mtrain.model import GPT, GPTConfig

LABELS = ["collection=folk", "collection=jazz"]
NAMES = ["note_density", "polyphony_max", "has_half_notes"]
EVERY_BAR = AttributeControlsConfig(attributes=NAMES, piece_rate=1.0, bar_rate=1.0)


@pytest.fixture(scope="module")
def remi() -> MusicTokenizer:
    return with_controls(MusicTokenizer(build_base_tokenizer(TokenizerConfig()), LABELS), EVERY_BAR)


@pytest.fixture(scope="module")
def bpe() -> MusicTokenizer:
    plain = MusicTokenizer(build_base_tokenizer(TokenizerConfig()), LABELS)
    base = plain.base
    pieces = [plain.midi_to_base_ids(piece(seed)) for seed in range(12)]
    cfg = LearnedVocabConfig(kind=LearnedVocabKind.bpe, size=len(base) + 150)
    vocab = LearnedVocab(train(pieces, range(4, len(base)), base.vocab["Bar_None"], cfg, seed=0))
    return with_controls(MusicTokenizer(base, LABELS, vocab), EVERY_BAR)


def one_track(score: symusic.Score) -> symusic.Score:
    """``score`` with every note in one track (MidiTok computes its controls per track)."""
    merged = symusic.Score(score.ticks_per_quarter)
    merged.tempos, merged.time_signatures = score.tempos, score.time_signatures
    track = symusic.Track(program=0)
    for t in score.tracks:
        track.notes.extend(t.notes)
    track.notes.sort()
    merged.tracks.append(track)
    return merged


def test_values_are_what_miditok_writes_in_its_own_tokens(remi):
    """MidiTok's REMI with its bar controls on (one track, no program stream) writes them after
    each Bar; the values read there are the ones mtrain computes for the same bars."""
    config = copy.deepcopy(remi.base.config)
    config.use_programs = config.one_token_stream_for_programs = False
    config.ac_note_density_bar = config.ac_polyphony_bar = config.ac_note_duration_bar = True
    theirs = miditok.REMI(config)
    for seed in range(4):
        score = one_track(remi.base_ids_to_midi(remi.midi_to_base_ids(piece(seed, drums=False))))
        bars = list(range(8))
        indexes = {0: {i: bars for i in range(len(theirs.attribute_controls))}}
        tokens = theirs.encode(score, attribute_controls_indexes=indexes)
        tokens = (tokens[0] if isinstance(tokens, list) else tokens).tokens
        written = []
        for token in tokens:
            if token == "Bar_None":
                written.append({})
            elif token.startswith("ACBar"):
                written[-1][token.rpartition("_")[0]] = token.rpartition("_")[2]
        ours = bar_values(score, len(written), [ATTRIBUTES[n] for n in NAMES])
        assert len(written) == 8
        for bar, values in zip(written, ours, strict=True):
            assert {ATTRIBUTES[n].event: v for n, v in values.items()} == {
                ATTRIBUTES[n].event: bar[ATTRIBUTES[n].event] for n in NAMES
            }


@pytest.mark.parametrize("kind", ["remi", "bpe"])
def test_a_controlled_document_decodes_to_the_same_music(kind, request):
    tok = request.getfixturevalue(kind)
    training = ControlTraining(tok, EVERY_BAR)
    for seed in range(3):
        base = tok.midi_to_base_ids(piece(seed))
        doc = training({"collection": "folk"}, base, np.random.default_rng(seed))
        controls = np.isin(doc, list(tok.control_index.values()))
        assert controls.sum() == 3 * 8  # every attribute of every bar
        assert np.array_equal(tok.decode_base(doc), base)
        plain = tok.document({"collection": "folk"}, base)
        assert np.array_equal(doc[~controls], plain)
        score = tok.base_ids_to_midi(tok.decode_base(doc))
        assert score.note_num() == piece(seed).note_num()
        assert score == tok.base_ids_to_midi(base)


def test_training_rates_and_off_by_default(remi):
    base = remi.midi_to_base_ids(piece(1))
    off = ControlTraining(remi, AttributeControlsConfig())
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert np.array_equal(off({}, base, rng), remi.document({}, base))
    assert rng.bit_generator.state == state  # no draw: runs without controls train as before
    half = ControlTraining(remi, AttributeControlsConfig(NAMES, piece_rate=0.5, bar_rate=0.5))
    ids = list(remi.control_index.values())
    counts = [np.isin(half({}, base, np.random.default_rng(s)), ids).sum() for s in range(200)]
    with_any = np.mean([c > 0 for c in counts])
    per_piece = np.mean([c for c in counts if c]) / (3 * 8)
    assert 0.4 < with_any < 0.6 and 0.4 < per_piece < 0.6


def test_the_run_vocabulary_extends_the_dataset_one():
    plain = MusicTokenizer(build_base_tokenizer(TokenizerConfig()), LABELS)
    tok = with_controls(plain, EVERY_BAR)
    assert tok.added_labels_over(plain) is not None  # the dataset's ids keep their meaning
    assert tok.vocab_size == plain.vocab_size + 19 + 6 + 2
    assert tok.conditioning_ids == plain.conditioning_ids
    assert with_controls(tok, EVERY_BAR) is tok
    types = token_types(tok)
    assert {types[i] for i in tok.control_index.values()} == {"control"}
    assert {types[i] for i in tok.conditioning_ids} == {"conditioning"}


def test_bad_configs_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="unknown bar attribute pitch_range; valid: note_dens"):
        AttributeControlsConfig(attributes=["pitch_range"])
    with pytest.raises(ConfigError, match="piece_rate"):
        AttributeControlsConfig(attributes=NAMES, piece_rate=0)
    tsd = MusicTokenizer(build_base_tokenizer(TokenizerConfig(kind=TokenizerKind.TSD)), LABELS)
    with pytest.raises(ConfigError, match="has no Bar tokens: prepare the dataset with tokenizer"):
        with_controls(tsd, EVERY_BAR)


def test_bad_requests_are_refused_in_one_line(remi):
    plain = MusicTokenizer(remi.base, LABELS)
    cases = [
        (plain, "2:note_density=4", "trained without bar controls"),
        (remi, "2:polyphony_min=2", "not trained to control polyphony_min; it controls"),
        (remi, "2:note_density=x", "valid: 0, 1, 2"),
        (remi, "2-1:note_density=4", "is not BARS:ATTRIBUTE=VALUE"),
        (remi, "2:note_density=4,1-3:note_density=5", "bar 2 is asked note_density=4 and"),
    ]
    for tok, text, says in cases:
        with pytest.raises(ConfigError, match=says) as error:
            ControlPlan.of(tok, text)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("kind", ["remi", "bpe"])
def test_sampling_places_the_asked_controls_before_the_asked_bars(kind, request):
    tok = request.getfixturevalue(kind)
    torch.manual_seed(0)
    cfg = GPTConfig(tok.vocab_size, n_layer=1, n_head=2, d_model=32, max_seq_len=96, init_std=0.2)
    model = GPT(cfg).eval()
    text = "1:note_density=5,1:has_half_notes=1,2:polyphony_max=2"
    plan = ControlPlan.of(tok, text)
    sampling = SamplingConfig(temperature=1.2, max_new_tokens=300, min_p=0.05)
    index = tok.control_index
    asked = {
        1: [index["ACBarNoteDensity_5"], index["ACBarNoteDurationHalf_1"]],
        2: [index["ACBarOnsetPolyphonyMax_2"]],
    }
    samples = compose(model, tok, [tok.bos_id], 4, sampling, 4, max_bars=3, controls=plan)
    reached = 0
    for sample in samples:
        assert sample.repairs == 0
        ids = np.array(sample.ids)
        base = tok.decode_base(ids)
        opens = [
            i
            for i, t in enumerate(ids)
            if tok.decode_base(ids[i : i + 1])[:1].tolist() == [tok.bar_id]
        ]
        placed = [i for i, t in enumerate(ids) if t in index.values()]
        wanted = []
        for bar, at in enumerate(opens, start=1):
            n = len(asked.get(bar, []))
            assert ids[at - n : at].tolist() == asked.get(bar, [])
            wanted += range(at - n, at)
        assert placed == wanted
        reached += len(opens) >= 2
        if str(sample.stop) == "stop_token":  # no end before the last asked bar
            assert np.count_nonzero(base == tok.bar_id) >= 2
        found = outcomes(sample.score, parse_controls(text))
        assert [(o.bar, o.attribute) for o in found][:2] == [
            (1, "has_half_notes"),
            (1, "note_density"),
        ]
    assert reached  # bar 2's control was placed in one sample at least


def test_without_a_plan_no_control_is_ever_drawn(remi):
    torch.manual_seed(1)
    cfg = GPTConfig(remi.vocab_size, n_layer=1, n_head=2, d_model=32, max_seq_len=96, init_std=0.2)
    model = GPT(cfg).eval()
    # A model that would rather draw controls than anything else.
    with torch.no_grad():
        model.lm_head.weight[list(remi.control_index.values())] *= 50
    for grammar in (True, False):
        sampling = SamplingConfig(temperature=1.2, max_new_tokens=80, grammar=grammar)
        for sample in compose(model, remi, [remi.bos_id], 2, sampling, 2):
            assert not set(sample.ids) & set(remi.control_index.values())


HELD = (
    "1-3:note_density=5",
    "1-3:note_density=18+",
    "1-3:polyphony_max=2",
    "1-3:has_half_notes=1",
    "1-3:has_half_notes=0",
    "1:note_density=5,1:has_half_notes=1,2:polyphony_max=2,3:note_density=8",
)


@pytest.mark.parametrize("kind", ["remi", "bpe"])
def test_held_controls_are_met_even_by_an_untrained_model(kind, request):
    """Every asked bar an untrained model writes meets what was asked, as MidiTok computes it,
    when sampling holds the values; left to that model alone, few do."""
    tok = request.getfixturevalue(kind)
    torch.manual_seed(0)
    cfg = GPTConfig(tok.vocab_size, n_layer=1, n_head=2, d_model=32, max_seq_len=512, init_std=0.2)
    model = GPT(cfg).eval()
    sampling = SamplingConfig(temperature=1.2, max_new_tokens=400, min_p=0.05)
    alone = []
    for text in HELD:
        asked = parse_controls(text)
        for held in (True, False) if text in HELD[:2] else (True,):
            plan = ControlPlan.of(tok, text, held=held)
            samples = compose(model, tok, [tok.bos_id], 8, sampling, 8, max_bars=4, controls=plan)
            assert all(s.repairs == 0 for s in samples)
            met = [o.met for s in samples for o in outcomes(s.score, asked)]
            if held:
                assert all(met), (text, met)
            else:
                alone.append(np.mean(met))
    assert np.mean(alone) < 0.5, alone
