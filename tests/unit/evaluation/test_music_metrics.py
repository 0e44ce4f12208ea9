"""Musical metrics pinned on hand-built pieces; generated vs reference sets compared."""

import json
import logging
import math
import random

import numpy as np
import pytest
import symusic
from support.midi_factory import piece, write_bad_files, write_piece

from mtrain.evaluation import reports
from mtrain.evaluation.music_metrics import (
    METRICS,
    compute_all,
    metrics_for_midi_dir,
    polyphony_rate,
)
from mtrain.evaluation.set_comparison import compare_sets, overlap_and_divergence

TPQ = 480
C_MAJOR_SCALE = (60, 62, 64, 65, 67, 69, 71, 72)


def track(notes, is_drum=False, tpq=TPQ) -> symusic.Track:
    """A track from (onset in beats, duration in beats, pitch) triples."""
    built = symusic.Track(is_drum=is_drum)
    for onset, duration, pitch in notes:
        built.notes.append(symusic.Note(round(onset * tpq), round(duration * tpq), pitch, 80))
    return built


def score(*tracks, time_signature=None, tpq=TPQ) -> symusic.Score:
    built = symusic.Score(tpq)
    if time_signature:
        built.time_signatures.append(symusic.TimeSignature(0, *time_signature))
    built.tracks.extend(tracks)
    return built


def scale_of_quarters(tpq=TPQ) -> symusic.Score:
    """C D E F G A B C, one quarter note each, no time signature (so 4/4): two full bars."""
    notes = [(beat, 1, pitch) for beat, pitch in enumerate(C_MAJOR_SCALE)]
    return score(track(notes, tpq=tpq), tpq=tpq)


def test_c_major_scale_of_quarters():
    assert compute_all(scale_of_quarters()) == pytest.approx(
        {
            "pitch_range": 12,  # 72 - 60
            "n_pitches_used": 8,
            "n_pitch_classes_used": 7,  # the two Cs share a class
            "polyphony": 1,  # one pitch sounds at every sounding step
            "polyphony_rate": 0,
            "pitch_entropy": 3,  # 8 equally likely pitches: log2 8
            # C has 2/8, six classes 1/8: -(1/4 log2 1/4) - 6 (1/8 log2 1/8) = 0.5 + 2.25
            "pitch_class_entropy": 2.75,
            "scale_consistency": 1,
            "empty_beat_rate": 0,  # 8 beats, all sounding
            "groove_consistency": 1,  # both bars have onsets on all four beats
            "note_density": 1,  # 8 notes over 8 beats
            "mean_ioi": 1,  # onsets one beat apart
        }
    )


def test_chord_then_dyad_then_single_note():
    # Beat 0: C E G; beat 1: C E; beats 2-3: C.
    chords = score(track([(0, 1, 60), (0, 2, 64), (0, 1, 67), (1, 3, 60)]))
    metrics = compute_all(chords)
    assert metrics["polyphony"] == pytest.approx((3 + 2 + 1 + 1) / 4)
    assert metrics["polyphony_rate"] == pytest.approx(1 / 4)  # only beat 0 has more than 2
    assert polyphony_rate(chords, threshold=1) == pytest.approx(2 / 4)  # beats 0 and 1
    assert metrics["note_density"] == pytest.approx(4 / 4)  # 4 notes over 4 beats
    assert metrics["mean_ioi"] == pytest.approx(1)  # distinct onsets at beats 0 and 1
    assert metrics["pitch_entropy"] == pytest.approx(1.5)  # C 1/2, E 1/4, G 1/4
    assert math.isnan(metrics["groove_consistency"])  # a single measure


def test_a_held_chord_is_fully_polyphonic():
    chord = compute_all(score(track([(0, 1, 60), (0, 1, 64), (0, 1, 67)])))
    assert chord["polyphony"] == pytest.approx(3)
    assert chord["polyphony_rate"] == pytest.approx(1)  # 3 > threshold 2 throughout
    assert chord["note_density"] == pytest.approx(3)  # 3 notes in 1 beat
    assert chord["pitch_entropy"] == pytest.approx(math.log2(3))
    assert math.isnan(chord["mean_ioi"])  # one onset, no interval


def test_a_unison_doubled_on_two_tracks_counts_once():
    doubled = score(track([(0, 2, 60)]), track([(1, 2, 60)]))
    assert compute_all(doubled)["polyphony"] == pytest.approx(1)


def test_a_piece_with_an_empty_bar():
    bar = [(beat, 1, pitch) for beat, pitch in enumerate((60, 62, 64, 65))]
    gap = score(track(bar + [(onset + 8, duration, pitch) for onset, duration, pitch in bar]))
    metrics = compute_all(gap)
    assert metrics["empty_beat_rate"] == pytest.approx(4 / 12)  # bar 2 of 3 is silent
    # Bars 1 and 3 each have 4 onsets, bar 2 none: Hamming distances 4 and 4 over 96 steps.
    assert metrics["groove_consistency"] == pytest.approx(1 - 4 / 96)
    assert metrics["note_density"] == pytest.approx(8 / 12)
    # Onsets at beats 0 1 2 3 8 9 10 11: intervals 1 1 1 5 1 1 1.
    assert metrics["mean_ioi"] == pytest.approx(11 / 7)


def test_a_rest_inside_a_beat_leaves_it_filled():
    # Eighth notes on the beats only: every beat sounds for half its length.
    offbeat_rests = score(track([(beat, 0.5, 60) for beat in range(4)]))
    assert compute_all(offbeat_rests)["empty_beat_rate"] == 0
    assert compute_all(offbeat_rests)["polyphony"] == 1


def test_groove_follows_the_time_signature():
    # Two bars of 3/4: three crotchets, then a dotted minim.
    waltz = [(0, 1, 60), (1, 1, 64), (2, 1, 67), (3, 3, 60)]
    # The bars differ at the positions of beats 2 and 3: 2 of 72 steps.
    assert compute_all(score(track(waltz), time_signature=(3, 4)))[
        "groove_consistency"
    ] == pytest.approx(1 - 2 / 72)
    # Read as 4/4 they fill a bar with onsets on all four beats and half a bar with none:
    # Hamming distance 4 over 96 steps.
    assert compute_all(score(track(waltz)))["groove_consistency"] == pytest.approx(1 - 4 / 96)
    # A meter change after the last note adds no empty measures.
    scale = scale_of_quarters()
    scale.time_signatures.append(symusic.TimeSignature(16 * TPQ, 3, 4))
    assert compute_all(scale)["groove_consistency"] == 1


def test_scale_consistency_with_a_chromatic_note():
    # The C major scale plus a C#: no major or minor scale holds all 8 classes; C major holds 8/9.
    chromatic = score(track([(beat, 1, pitch) for beat, pitch in enumerate((*C_MAJOR_SCALE, 61))]))
    assert compute_all(chromatic)["scale_consistency"] == pytest.approx(8 / 9)


def test_drum_tracks_are_ignored():
    scale = scale_of_quarters()
    with_drums = scale_of_quarters()
    # Drums on every eighth note, outlasting the melody by a bar, on pitches far outside it.
    with_drums.tracks.append(track([(k / 2, 0.25, 35 + k % 12) for k in range(24)], is_drum=True))
    assert compute_all(with_drums) == pytest.approx(compute_all(scale))
    drums_only = compute_all(score(with_drums.tracks[-1]))
    assert math.isnan(drums_only["pitch_range"])
    assert drums_only["n_pitches_used"] == 0


def test_metrics_do_not_depend_on_ticks_per_quarter():
    a_piece = piece(seed=3)
    assert compute_all(a_piece.resample(96)) == pytest.approx(compute_all(a_piece), rel=1e-9)
    assert compute_all(scale_of_quarters(tpq=960)) == compute_all(scale_of_quarters(tpq=96))


@pytest.mark.parametrize(
    "empty", [symusic.Score(TPQ), score(symusic.Track()), score(track([]), time_signature=(3, 4))]
)
def test_a_score_without_notes_gives_nan_not_a_crash(empty):
    metrics = compute_all(empty)
    assert set(metrics) == set(METRICS)
    assert metrics["n_pitches_used"] == metrics["n_pitch_classes_used"] == 0  # MusPy's counts
    undefined = {
        k: v for k, v in metrics.items() if k not in ("n_pitches_used", "n_pitch_classes_used")
    }
    assert all(math.isnan(value) for value in undefined.values()), undefined


def test_metrics_for_midi_dir_skips_unreadable_files(tmp_path, caplog):
    write_piece(tmp_path / "a.mid", seed=1)
    write_piece(tmp_path / "sub" / "b.mid", seed=2)
    write_bad_files(tmp_path / "bad")
    with caplog.at_level(logging.WARNING, logger="mtrain.evaluation.music_metrics"):
        results = metrics_for_midi_dir(tmp_path)
    # header_only.mid and zero_notes.mid parse, as pieces without notes.
    assert sorted(results) == ["a.mid", "bad/header_only.mid", "bad/zero_notes.mid", "sub/b.mid"]
    assert results["sub/b.mid"] == pytest.approx(
        compute_all(symusic.Score(str(tmp_path / "sub" / "b.mid")))
    )
    assert math.isnan(results["bad/zero_notes.mid"]["pitch_entropy"])
    assert "skipped 5 of 9 MIDI files" in caplog.text


def with_random_pitches(seed: int) -> symusic.Score:
    """A procedural piece whose pitched notes are drawn uniformly from three octaves."""
    scrambled = piece(seed)
    rng = random.Random(seed)
    for part in scrambled.tracks:
        if not part.is_drum:
            for note in part.notes:
                note.pitch = rng.randrange(48, 84)
    return scrambled


@pytest.fixture(scope="module")
def reference_features() -> list[dict[str, float]]:
    return [compute_all(piece(seed)) for seed in range(30)]


def test_a_set_compared_with_itself_overlaps(reference_features):
    comparison = compare_sets(reference_features, reference_features)
    for feature, result in comparison.items():
        assert result["gen_mean"] == result["ref_mean"]
        assert result["gen_std"] == result["ref_std"]
        assert result["oa"] > 0.9, feature
        assert result["kl"] < 0.05, feature


def test_random_pitches_are_told_apart_from_the_reference(reference_features):
    scrambled = [compute_all(with_random_pitches(seed)) for seed in range(30)]
    comparison = compare_sets(scrambled, reference_features)
    itself = compare_sets(reference_features, reference_features)
    for feature in ("pitch_entropy", "pitch_class_entropy", "scale_consistency", "n_pitches_used"):
        assert comparison[feature]["oa"] < 0.2 < itself[feature]["oa"], feature
        assert comparison[feature]["kl"] > 1 > itself[feature]["kl"], feature
    # The rhythm is untouched.
    assert comparison["note_density"]["oa"] > 0.9


def test_overlap_and_divergence_of_two_gaussians():
    rng = np.random.default_rng(0)
    # N(0, 1) against N(1, 1): OA = 2 Phi(-1/2) = 0.617, KL = 1/2 nat (a little less once
    # the kernels widen both).
    oa, kl = overlap_and_divergence(rng.normal(0, 1, 4000), rng.normal(1, 1, 4000))
    assert oa == pytest.approx(0.617, abs=0.03)
    assert kl == pytest.approx(0.5, abs=0.06)


def test_nan_values_are_dropped_and_small_sets_give_nan():
    generated = [{"polyphony": 1.0}, {"polyphony": math.nan}, {"polyphony": 3.0}]
    reference = [{"polyphony": 2.0}, {"polyphony": 2.0}, {"polyphony": 2.0}]
    result = compare_sets(generated, reference)["polyphony"]
    assert (result["gen_mean"], result["gen_std"]) == (2.0, 1.0)
    assert (result["ref_mean"], result["ref_std"]) == (2.0, 0.0)
    assert 0 < result["oa"] < 0.5  # reference distances are all 0, generated-to-reference all 1
    lone = compare_sets(generated[:2], reference)["polyphony"]
    assert lone["gen_mean"] == 1.0
    assert math.isnan(lone["oa"]) and math.isnan(lone["kl"])


def test_empty_and_unreadable_pieces_fail_and_are_left_out_of_every_metric(tmp_path):
    """A piece with no notes (or no readable MIDI) is a failure: counted in empty_rate and left
    out of every metric alike, never averaged in as zeros."""
    generated = reports.save_scores(
        {"a.mid": piece(1), "b.mid": piece(2), "silent.mid": symusic.Score(TPQ)},
        tmp_path / "generated",
    )
    assert sorted(generated.per_piece) == ["a.mid", "b.mid"]
    assert generated.failed == {"silent.mid": "empty: no notes"}
    assert generated.empty_rate == pytest.approx(1 / 3)
    alone = reports.measure(
        {"a.mid": piece(1), "b.mid": piece(2)}, tmp_path / "generated"
    ).per_piece
    assert generated.per_piece == alone  # the failure changes no other value

    write_piece(tmp_path / "folder" / "good.mid", seed=3)
    symusic.Score(TPQ).dump_midi(str(tmp_path / "folder" / "silent.mid"))
    (tmp_path / "folder" / "cut.mid").write_bytes(
        (tmp_path / "folder" / "good.mid").read_bytes()[:40]
    )
    folder = reports.measure_folder(tmp_path / "folder", "midi_dir")
    assert list(folder.per_piece) == ["good.mid"]
    assert folder.failed["silent.mid"] == "empty: no notes"
    assert folder.failed["cut.mid"].startswith("unreadable: ")

    section = reports.compare(generated, folder, tmp_path / "report")
    assert section["generated"] == {
        "path": str(tmp_path / "generated"),
        "pieces": 2,
        "failed": 1,
        "empty_rate": pytest.approx(1 / 3),
    }
    assert "2 pieces; 1 of 3 empty or unreadable (33%), left out" in reports.markdown_comparison(
        section
    )
    assert json.loads((tmp_path / "report" / "generated_failed.json").read_text()) == {
        "silent.mid": "empty: no notes"
    }
