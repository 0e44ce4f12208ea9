"""Piano rolls that show what was made: the generated region shaded, bar lines drawn, tracks
named."""

import logging

import numpy as np
import pytest
import symusic
from matplotlib import colors, image
from support.midi_factory import piece

from mtrain.generation.render import (
    GENERATED_COLOR,
    RenderConfig,
    Renderer,
    find_soundfont,
    piano_roll_png,
    seconds_at,
    track_name,
)


def shaded_columns(path) -> np.ndarray:
    """Which pixel columns of the PNG hold the generated region's shade (drawn at alpha 0.6 on
    white)."""
    pixels = image.imread(str(path))[..., :3]
    shade = 0.6 * np.array(colors.to_rgb(GENERATED_COLOR)) + 0.4
    return (np.abs(pixels - shade).max(axis=-1) < 0.02).any(axis=0)


def test_the_generated_bars_are_shaded_and_nothing_else(tmp_path):
    score = piece(3, bars=8)
    bar = 4 * score.ticks_per_quarter
    piano_roll_png(score, tmp_path / "plain.png", "plain")
    piano_roll_png(score, tmp_path / "filled.png", "filled", (2 * bar, 4 * bar))
    assert not shaded_columns(tmp_path / "plain.png").any()
    columns = np.flatnonzero(shaded_columns(tmp_path / "filled.png"))
    # Two bars of eight: a quarter of the roll's width, in one run of columns.
    width = image.imread(str(tmp_path / "filled.png")).shape[1]
    assert 0.15 * width < len(columns) < 0.3 * width
    assert columns[-1] - columns[0] < 0.3 * width


def test_bar_lines_fall_at_their_seconds_through_tempo_changes_and_tracks_are_named():
    score = symusic.Score(480)
    score.tempos.append(symusic.Tempo(0, 120.0))
    score.tempos.append(symusic.Tempo(1920, 60.0))
    assert seconds_at(score, [0, 960, 1920, 3840]) == [0.0, 1.0, 2.0, 6.0]
    assert track_name(symusic.Track("", 33)) == "Electric Bass (finger)"
    assert track_name(symusic.Track("lead", 0)) == "lead (Acoustic Grand Piano)"
    assert track_name(symusic.Track("", 0, is_drum=True)) == "drums"


@pytest.mark.skipif(find_soundfont() is None, reason="no General MIDI SoundFont installed")
def test_a_note_the_synthesizer_hangs_on_costs_its_wav_not_the_run(tmp_path, caplog):
    renderer = Renderer(RenderConfig(audio_timeout_s=5))
    written = renderer.write(piece(3, bars=2), tmp_path / "plain")
    assert written["audio"].stat().st_size > 1000
    # symusic's synthesizer never returns on FluidR3's celesta at pitch 108 (an untrained
    # model wrote it): with FluidR3, no WAV and a warning; with another SoundFont, a WAV.
    hangs = symusic.Score(480)
    celesta = symusic.Track(program=8)
    celesta.notes.append(symusic.Note(0, 240, 108, 90))
    hangs.tracks.append(celesta)
    with caplog.at_level(logging.WARNING):
        written = renderer.write(hangs, tmp_path / "celesta")
    assert written["midi"].exists() and written["piano_roll"].exists()
    if "FluidR3" in str(renderer.soundfont.resolve()):
        assert "audio" not in written and not (tmp_path / "celesta.wav").exists()
        assert "render.audio_timeout_s=5" in caplog.text
