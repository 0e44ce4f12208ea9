"""Generation: sampling filters, the KV-cache loop against the uncached one, the window that
slides past the context, length limits that stop sampling, prompts from labels and MIDI, and
any token sequence back to a valid MIDI score."""

import dataclasses
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import symusic
import torch
from support.midi_factory import piece, varied_piece, write_piece

from data_pipeline.config import TokenizerConfig, TokenizerKind
from data_pipeline.tokenizer import MusicTokenizer, build_base_tokenizer
from mtrain.generation.compose import GeneratedPiece, head_length
from mtrain.generation.decoding import Continuation, Stop, decode
from mtrain.generation.prompts import (
    build_prompt,
    clip_score,
    continuation_banned_ids,
    prompt_from_midi,
    tick_at_bar,
)
from mtrain.generation.repair import repair, to_midi
from mtrain.generation.sampling import Sampler, SamplingConfig, next_token
from mtrain.generation.timeline import Timeline, time_events
from mtrain.model import GPT, GPTConfig

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=60)
# Probabilities of 20 tokens: five likely ones, then 15 at 0.1/15 each.
PROBS = torch.tensor([0.35, 0.25, 0.15, 0.1, 0.05] + [0.1 / 15] * 15)


@pytest.fixture(scope="module")
def tok() -> MusicTokenizer:
    """The REMI artifact data_pipeline.prepare builds from pieces in two collections (labels
    collection=folk and collection=jazz)."""
    labels = ["collection=folk", "collection=jazz"]
    return MusicTokenizer(build_base_tokenizer(TokenizerConfig()), labels)


def random_model(tok: MusicTokenizer, max_seq_len: int, positional: str = "rope") -> GPT:
    # A large init spreads the logits: clear argmaxes, and a model that loves to repeat.
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=tok.vocab_size,
        n_layer=2,
        n_head=2,
        d_model=32,
        max_seq_len=max_seq_len,
        positional=positional,
        init_std=0.2,
    )
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    return random_model(tok, 128)


def draws(cfg: SamplingConfig, logits: torch.Tensor, n: int = 4000, banned=()) -> set[int]:
    return set(Sampler(cfg, banned, "cpu").draw(logits.expand(n, -1)).tolist())


def new_tokens(model: GPT, batch, cfg: SamplingConfig, stop_id=None, **options) -> list[list]:
    """The tokens ``decode`` draws for each prompt."""
    return [row.tokens for row in decode(model, batch, cfg, stop_id, **options)]


def prompts(tok: MusicTokenizer) -> list[list[int]]:
    """Two prompts of different lengths from real music."""
    music = tok.encode_base(tok.midi_to_base_ids(piece(5)))
    return [
        build_prompt(tok, {"collection": "jazz"}, music[:7]),
        build_prompt(tok, {"collection": "folk"}, music[:12]),
    ]


# ---- sampling ----------------------------------------------------------------------------


def test_the_same_seed_draws_the_same_tokens_and_another_seed_others():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    seen = torch.zeros(8, 0, dtype=torch.long)

    def draw(seed: int) -> list[int]:
        cfg = SamplingConfig(seed=seed, top_p=0.9)
        return next_token(logits, seen, cfg, torch.Generator().manual_seed(seed)).tolist()

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_temperature_zero_is_the_argmax_whatever_the_filters():
    logits = torch.randn(16, 100, generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(temperature=0.0, top_k=3, top_p=0.5)
    picked = next_token(logits, torch.zeros(16, 0, dtype=torch.long), cfg, torch.Generator())
    assert torch.equal(picked, logits.argmax(dim=-1))


@pytest.mark.parametrize(
    "cfg, kept",
    [
        (SamplingConfig(top_k=2), {0, 1}),
        # Before token 3 the mass is 0.75 >= 0.7: tokens 0-2 make the nucleus.
        (SamplingConfig(top_p=0.7), {0, 1, 2}),
        # At least a quarter of 0.35 = 0.0875: tokens 0-3.
        (SamplingConfig(min_p=0.25), {0, 1, 2, 3}),
        (SamplingConfig(top_k=4, top_p=0.5), {0, 1}),
    ],
)
def test_filters_draw_exactly_the_tokens_they_keep(cfg, kept):
    assert draws(cfg, PROBS.log()) == kept


def test_disallowed_tokens_are_never_drawn():
    logits = PROBS.log()[None]
    assert draws(SamplingConfig(), logits, banned=[0, 2, 7]) == set(range(20)) - {0, 2, 7}
    assert draws(SamplingConfig(top_k=3), logits, banned=[0, 2, 7]) == {1, 3, 4}


def test_repetition_penalty_pushes_seen_tokens_down_whatever_their_sign():
    cfg = SamplingConfig(temperature=0.0, repetition_penalty=1.2)
    positive = torch.tensor([[2.0, 1.9, 0.0]])
    negative = torch.tensor([[-1.0, -1.1, -5.0]])
    seen = torch.tensor([[0, 0]])
    assert next_token(positive, seen, cfg, torch.Generator()).item() == 1
    assert next_token(negative, seen, cfg, torch.Generator()).item() == 1


def test_repetition_penalty_lowers_repeats_in_generation(tok, model):
    def distinct_share(penalty: float) -> float:
        cfg = SamplingConfig(temperature=0.0, repetition_penalty=penalty, max_new_tokens=80)
        rows = new_tokens(model, prompts(tok), cfg)
        return sum(len(set(row)) for row in rows) / sum(map(len, rows))

    assert distinct_share(1.5) > 2 * distinct_share(1.0)


def test_sampling_config_names_a_bad_key():
    with pytest.raises(ValueError, match=r"sampling\.top_p=0"):
        SamplingConfig(top_p=0.0)


# ---- the generation loop -----------------------------------------------------------------


def test_cached_generation_equals_uncached_and_one_prompt_at_a_time(tok, model):
    batch = prompts(tok)
    cached = new_tokens(model, batch, GREEDY)
    assert [len(row) for row in cached] == [60, 60]
    assert new_tokens(model, batch, GREEDY, use_cache=False) == cached
    # Prompts of different lengths in one batch: each row as if generated alone.
    assert [new_tokens(model, [p], GREEDY)[0] for p in batch] == cached
    # A LongTensor batch of equal-length prompts is read the same way.
    tensor = torch.tensor([batch[0], batch[0]])
    assert new_tokens(model, tensor, GREEDY) == [cached[0], cached[0]]


def test_sampled_generation_repeats_with_its_seed(tok, model):
    def sample(seed: int) -> list[list[int]]:
        cfg = SamplingConfig(top_k=50, seed=seed, max_new_tokens=40)
        return new_tokens(model, prompts(tok), cfg)

    assert sample(3) == sample(3) != sample(4)


def test_each_row_stops_after_its_stop_token(tok, model):
    batch = prompts(tok)
    free = new_tokens(model, batch, GREEDY)
    # In use stop_id is EOS, which an untrained model hardly draws; a token it does draw
    # exercises the same rule.
    stop = free[0][10]
    stopped = decode(model, batch, GREEDY, stop)
    for row, full in zip(stopped, free, strict=True):
        end = full.index(stop) + 1 if stop in full else len(full)
        assert row.tokens == full[:end]
        assert row.stop == (Stop.stop_token if stop in full else Stop.max_new_tokens)
    assert len(stopped[0].tokens) <= 11 < len(free[0])


@pytest.mark.parametrize("positional", ["rope", "learned"])
def test_generation_slides_its_window_past_the_context(tok, positional):
    """Four times the context: while the sequence fits the tokens are a plain run's; after, the
    window holds the head (BOS, label) and the latest tokens, cached or not alike."""
    model, batch = random_model(tok, 32, positional), prompts(tok)
    head, context = head_length(tok, batch[0]), model.config.max_seq_len
    assert head == 2
    # Greedy with a repetition penalty: varied tokens, each one the model's choice.
    cfg = SamplingConfig(temperature=0.0, repetition_penalty=1.3, max_new_tokens=4 * context)
    slid = new_tokens(model, batch, cfg, head=head)
    assert [len(row) for row in slid] == [4 * context] * 2
    fits = dataclasses.replace(cfg, max_new_tokens=context - len(batch[1]))
    assert [row[: fits.max_new_tokens] for row in slid] == new_tokens(model, batch, fits, head=head)
    assert new_tokens(model, batch, cfg, head=head, use_cache=False) == slid
    # The first slide comes when token context + 1 is due: the window drops half its music.
    sequence = batch[0] + slid[0]
    t = context + 1
    start = t - (context - head) + (context - head) // 2
    window = torch.tensor([sequence[:head] + sequence[start:t]])
    with torch.inference_mode():
        logits = model(window).logits[:, -1]
    assert next_token(logits, window, cfg, torch.Generator()).item() == sequence[t]


def test_a_head_is_bos_and_the_labels(tok):
    music = tok.encode_base(tok.midi_to_base_ids(piece(5)))[:5].tolist()
    labels = tok.label_ids({"collection": "jazz"})
    assert head_length(tok, [tok.bos_id, *labels, *music]) == 2
    assert head_length(tok, [tok.bos_id, *music]) == 1
    assert head_length(tok, music) == 0


def test_the_timeline_follows_the_decoder_through_meters_and_tempos(tok):
    """At every note, the clock's seconds are the decoded note's onset, and it reads as many
    bars as the piece has Bar tokens: 4/4, 3/4, 2/4, 6/8, 5/4, 7/8, 12/8, 1-3 tempos."""
    names = {i: name for name, i in tok.base.vocab.items()}
    events = time_events(tok)
    for seed in range(12):
        ids = tok.encode_base(tok.midi_to_base_ids(varied_piece(seed))).tolist()
        clock, onsets = Timeline(tok, events), []
        for token in ids:
            assert clock.read(token) is None  # no limits, none reached
            if names[token].startswith("Pitch"):
                onsets.append(clock.seconds)
        score = tok.base_ids_to_midi(tok.decode_base(np.array(ids))).to("second")
        decoded = sorted(n.time for t in score.tracks for n in t.notes)
        assert sorted(onsets) == pytest.approx(decoded, abs=1e-4)  # symusic: float32
        assert clock.bars == [names[i] for i in ids].count("Bar_None")


def limited(tok, model, max_bars=None, max_seconds=None) -> list:
    """Continuations of [BOS] that may only draw one bar's worth of tokens (so bars come
    quickly), stopped by a Timeline at max_bars or max_seconds, and their scores with one more
    note (C4) where sampling stopped."""
    v = tok.base.vocab
    note = [v["Program_0"], v["Pitch_60"], v["Velocity_63"], v["Duration_1.0.8"]]
    allowed = {v["Bar_None"], v["TimeSig_4/4"], v["Position_0"], v["Position_16"], *note}
    banned = [i for i in range(tok.vocab_size) if i not in allowed]
    meters = [Timeline(tok, time_events(tok), max_bars, max_seconds) for _ in range(3)]
    cfg = SamplingConfig(max_new_tokens=500, seed=1)
    rows = decode(model, [[tok.bos_id]] * 3, cfg, None, banned_ids=banned, meters=meters)
    # After a bar line, the note needs the bar's time signature and a position.
    opening = [v["TimeSig_4/4"], v["Position_0"]]
    scores = [
        to_midi(tok, [tok.bos_id, *row.tokens, *opening[row.tokens[-1] != v["Bar_None"] :], *note])
        for row in rows
    ]
    return rows, [score for score, _ in scores]


def onsets(score: symusic.Score) -> list[int]:
    return [n.time for t in score.tracks for n in t.notes]


def test_max_bars_stops_sampling_at_the_bar_line_past_it(tok, model):
    rows, scores = limited(tok, model, max_bars=3)
    bar = tok.base.vocab["Bar_None"]
    for row, score in zip(rows, scores, strict=True):
        assert row.stop == Stop.max_bars
        # The fourth bar line is the last token drawn: sampling stopped there, not at 500.
        assert row.tokens.count(bar) == 4 and row.tokens[-1] == bar
        # Every note drawn is in the first 3 bars; where it stopped is bar 3 (0-based).
        *drawn, where = onsets(score)
        assert max(drawn, default=0) < tick_at_bar(score, 3) <= where


def test_max_seconds_stops_sampling_at_the_onset_past_it(tok, model):
    rows, scores = limited(tok, model, max_seconds=5.0)  # 2 s a bar: 4/4 at 120 bpm
    for row, score in zip(rows, scores, strict=True):
        assert row.stop == Stop.max_seconds and len(row.tokens) < 500
        *drawn, where = onsets(score.to("second"))
        assert max(drawn, default=0) < 5.0 <= where


def test_a_prompt_already_long_enough_draws_nothing(tok, model):
    v = tok.base.vocab
    bars = [v["Bar_None"], v["TimeSig_4/4"], v["Position_0"], v["Pitch_60"]] * 3
    meter = Timeline(tok, time_events(tok), max_bars=2)
    (row,) = decode(model, [[tok.bos_id, *bars]], GREEDY, None, meters=[meter])
    assert row == Continuation([], Stop.max_bars)


def test_a_piece_reports_what_stopped_it_and_its_bars(tok):
    score = tok.base_ids_to_midi(tok.midi_to_base_ids(piece(3, bars=5)))
    stats = GeneratedPiece([1] * 30, 10, score, 0, Stop.max_bars).stats()
    assert stats["stopped_by"] == "max_bars" and stats["new_tokens"] == 20
    assert stats["bars"] == 5


def test_continuations_never_draw_specials_or_labels(tok, model):
    banned = continuation_banned_ids(tok)
    assert tok.eos_id not in banned and {tok.pad_id, tok.bos_id, tok.label_offset} <= set(banned)
    cfg = SamplingConfig(max_new_tokens=100)
    rows = new_tokens(model, prompts(tok), cfg, banned_ids=banned)
    assert not {t for row in rows for t in row} & set(banned)


# ---- tokens to MIDI ----------------------------------------------------------------------


def test_any_ids_decode_to_a_score_with_repairs_counted(tok):
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = rng.integers(0, tok.vocab_size, size=rng.integers(20, 400))
        score, repairs = to_midi(tok, ids)
        assert isinstance(score, symusic.Score) and repairs > 0
        # What is left obeys MidiTok's own grammar check: token types and time order.
        kept, _ = repair(tok, ids)
        assert not kept or tok.base.tokens_errors(kept) == 0
    score, repairs = to_midi(tok, [])
    assert score.note_num() == 0 and repairs == 0


def test_each_repair_rule_drops_or_inserts_what_it_says(tok):
    v = tok.base.vocab
    note = [v["Program_0"], v["Pitch_60"], v["Velocity_63"], v["Duration_1.0.8"]]
    bar = [v["Bar_None"], v["TimeSig_4/4"]]
    at_0 = [*bar, v["Position_0"]]
    cases = [
        ([*at_0, v["Velocity_63"], *note], {"stray_note_token": 1}),
        ([*at_0, *note[:2], *note], {"incomplete_note": 2}),
        ([*at_0, *note, *note[:3]], {"incomplete_note": 3}),
        (
            [*at_0, *note, v["Program_-1"], v["Pitch_36"]],
            {"stray_note_token": 1, "incomplete_note": 1},
        ),
        ([*bar, v["Position_8"], *note, v["Position_4"], *note], {"position_backwards": 1}),
        ([*at_0, *note, v["Position_40"], *note], {"position_past_bar": 1}),
        ([*at_0, v["Position_4"], *note], {"empty_position": 1}),
        ([*at_0, *note, v["Tempo_121.29"], *note], {"stray_tempo": 1}),
        ([*at_0, v["TimeSig_3/4"], *note], {"stray_time_signature": 1}),
        ([v["Bar_None"], v["Position_0"], *note], {"missing_time_signature": 1}),
        ([*bar, *note, v["Position_0"], *note], {"note_without_position": 4}),
    ]
    for ids, expected in cases:
        _, repairs = repair(tok, ids)
        assert repairs == expected
        score, count = to_midi(tok, ids)
        assert count == sum(expected.values())
        assert [n.pitch for t in score.tracks for n in t.notes][-1] == 60


def test_a_real_piece_decodes_unrepaired_with_its_notes(tok):
    original = piece(3)
    ids = tok.encode_base(tok.midi_to_base_ids(original))
    score, repairs = to_midi(tok, [tok.bos_id, tok.label_offset, *ids, tok.eos_id])
    assert repairs == 0

    def pitches(s: symusic.Score) -> dict:
        by_track = {(t.is_drum, t.program): sorted(n.pitch for n in t.notes) for t in s.tracks}
        return {k: v for k, v in by_track.items() if v}

    assert pitches(score) == pitches(original)


@pytest.mark.parametrize("kind", [TokenizerKind.TSD, TokenizerKind.MIDILike])
def test_other_tokenizers_fall_back_to_the_type_graph(kind):
    other = MusicTokenizer(build_base_tokenizer(TokenizerConfig(kind=kind)), [])
    _, repairs = to_midi(other, other.encode_base(other.midi_to_base_ids(piece(3))))
    assert repairs == 0
    rng = np.random.default_rng(1)
    for _ in range(50):
        ids = rng.integers(0, other.vocab_size, size=rng.integers(20, 300))
        score, repairs = to_midi(other, ids)
        assert isinstance(score, symusic.Score) and repairs > 0


# ---- prompts -----------------------------------------------------------------------------


def notes_by_track(score: symusic.Score) -> dict:
    out = defaultdict(list)
    for track in score.tracks:
        out[track.is_drum, track.program] += [(n.time, n.duration, n.pitch) for n in track.notes]
    return out


def test_a_continuation_starts_with_the_prompt_notes(tok, model, tmp_path):
    path = write_piece(tmp_path / "prompt.mid", seed=7)
    music = prompt_from_midi(tok, str(path), bars=1)
    names = {i: name for name, i in tok.base.vocab.items()}
    assert [names[int(i)] for i in music].count("Bar_None") == 1
    prompt = build_prompt(tok, {"collection": "jazz"}, music)
    assert prompt[:2] == [tok.bos_id, tok.label_ids({"collection": "jazz"})[0]]
    new = new_tokens(model, [prompt], SamplingConfig(max_new_tokens=60), tok.eos_id)[0]
    alone, repairs = to_midi(tok, prompt)
    continued, _ = to_midi(tok, prompt + new)
    assert repairs == 0 and alone.note_num() > 0
    for track, notes in notes_by_track(alone).items():
        assert notes_by_track(continued)[track][: len(notes)] == notes


def meter(*signatures: tuple[int, int, int], tpq: int = 480) -> symusic.Score:
    """An empty score with (tick, numerator, denominator) time signatures."""
    score = symusic.Score(tpq)
    score.time_signatures.extend(symusic.TimeSignature(*sig) for sig in signatures)
    return score


def test_bars_follow_meter_changes_each_from_the_next_bar_line():
    # Two bars of 4/4 (1920 ticks), two of 3/4 (1440), two of 6/8 (1440), then 2/4 (960),
    # given half-way through the second 6/8 bar: it waits for that bar's end at 9600.
    changes = meter((0, 4, 4), (3840, 3, 4), (6720, 6, 8), (8640, 2, 4))
    expected = [0, 1920, 3840, 5280, 6720, 8160, 9600, 10560, 11520]
    assert [tick_at_bar(changes, bar) for bar in range(len(expected))] == expected
    # Listed out of order, the same; without a time signature, 4/4 (at any resolution).
    shuffled = meter((8640, 2, 4), (0, 4, 4), (6720, 6, 8), (3840, 3, 4))
    assert tick_at_bar(shuffled, 8) == 11520
    assert tick_at_bar(meter(tpq=96), 3) == 3 * 4 * 96
    # A first signature off the first bar line leaves that bar 4/4.
    assert [tick_at_bar(meter((960, 3, 4)), bar) for bar in range(3)] == [0, 1920, 3360]


def test_a_prompt_in_bars_ends_at_the_bar_line_after_a_meter_change():
    score = meter((0, 4, 4), (1920, 3, 4))
    track = symusic.Track()
    track.notes.extend(symusic.Note(tick, 240, 60, 80) for tick in range(0, 7680, 480))
    score.tracks.append(track)
    clipped = clip_score(score, bars=3)
    assert max(n.time for n in clipped.tracks[0].notes) == 1920 + 2 * 1440 - 480


def test_a_prompt_in_seconds_holds_the_notes_that_start_before(tok, tmp_path):
    path = write_piece(tmp_path / "prompt.mid", seed=7)
    score, _ = to_midi(tok, prompt_from_midi(tok, str(path), seconds=3.1))
    onsets = [n.time for t in score.to("second").tracks for n in t.notes]
    original = symusic.Score(str(path)).to("second")
    expected = [n.time for t in original.tracks for n in t.notes if n.time < 3.1]
    assert max(onsets) < 3.1 and len(onsets) == len(expected)


def test_an_unknown_label_lists_the_known_ones(tok):
    with pytest.raises(ValueError, match=r"collection=rock.*collection=folk, collection=jazz"):
        build_prompt(tok, {"collection": "rock"}, None)


def test_a_corrupt_prompt_file_is_named(tok, tmp_path):
    bad = tmp_path / "broken.mid"
    bad.write_bytes(b"MThd" + bytes(range(40)))
    with pytest.raises(ValueError, match=r"broken\.mid"):
        prompt_from_midi(tok, str(bad), bars=2)
    with pytest.raises(ValueError, match=r"missing\.mid"):
        prompt_from_midi(tok, str(Path(tmp_path) / "missing.mid"))
