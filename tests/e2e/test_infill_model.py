"""Infilling for real: a tiny model trained on pieces whose second half only the suffix
reveals, for which the suffix must help, and ``python -m mtrain.generate infill=bars:3-4``
filling bars of a MIDI file without touching the others, closing each middle by itself."""

import json
import random

import pytest
import symusic
from support.apps import prepare_train_export, run_module
from support.scores import notes

from data_pipeline.tokenizer import MusicTokenizer
from mtrain.generation.infill import BarRange, gap_ticks


def two_halves(seed: int, bars: int = 6) -> symusic.Score:
    """Quarter notes of one pitch in the first two bars, of another in the rest: for a gap of
    bars 3-4 the second pitch is in the suffix, and nowhere before the gap."""
    rng = random.Random(seed)
    first, second = rng.sample(range(48, 84), 2)
    score = symusic.Score(480)
    score.tempos.append(symusic.Tempo(0, 120.0))
    score.time_signatures.append(symusic.TimeSignature(0, 4, 4))
    track = symusic.Track(name="piano", program=0)
    for beat in range(4 * bars):
        track.notes.append(symusic.Note(beat * 480, 480, first if beat < 8 else second, 80))
    score.tracks.append(track)
    return score


@pytest.fixture(scope="module")
def fim_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("fim")
    for seed in range(200):
        path = root / "midi" / f"piece{seed:03d}.mid"
        path.parent.mkdir(parents=True, exist_ok=True)
        two_halves(seed).dump_midi(str(path))
    prepare_train_export(root, 0.05, 0.1, 300, "data.infill_rate=0.5", "data.transpose_range=0")
    return root


def test_the_suffix_lowers_the_gaps_nll_on_a_model_trained_to_fill(fim_model):
    out = fim_model / "eval"
    run_module(
        "mtrain.evaluate",
        f"checkpoint={fim_model / 'export'}",
        f"data_path={fim_model / 'ds'}",
        f"output={out}",
        "music.num_samples=0",
        "infill.bars=2",
        "infill.max_pieces=6",
        "infill.sampling.temperature=0",
    )
    report = json.loads((out / "report.json").read_text())["infill"]
    assert report["pieces"] == 6 and report["skipped"] == 0, report
    assert report["nll_with_suffix"] < report["nll_without_suffix"] - 0.05, report
    assert "## Infilling: 2 bars" in (out / "report.md").read_text()


def test_generate_fills_bars_of_a_midi_file_and_keeps_the_others(fim_model, tmp_path):
    prompt = tmp_path / "prompt.mid"
    score = two_halves(10_000)
    score.dump_midi(str(prompt))
    score = symusic.Score.from_midi(prompt.read_bytes())
    out = tmp_path / "filled"
    run_module(
        "mtrain.generate",
        f"checkpoint={fim_model / 'export'}",
        f"prompt={prompt}",
        "infill=bars:3-4",
        f"output={out}",
        "num_samples=2",
    )
    tok = MusicTokenizer.load(str(fim_model / "export" / "tokenizer"))
    ticks = gap_ticks(score, tok, BarRange(3, 4))
    for name in ("sample-000.mid", "sample-001.mid"):
        filled = symusic.Score.from_midi((out / name).read_bytes())
        assert notes(filled, ticks, False) == notes(score, ticks, False)
    report = json.loads((out / "samples.json").read_text())
    assert report["mode"] == "infill"
    # Each middle closed itself (FIM_END), which the grammar allows only after the gap's bars.
    assert [s["stopped_by"] for s in report["samples"]] == ["stop_token"] * 2, report["samples"]
    assert (out / "sample-000.png").exists()
