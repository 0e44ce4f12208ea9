"""Labels of the built-in corpus read from each score's own fields (ABC headers, Essen
origins), the conditioning tokens they get, and the length check on converted scores."""

import json
from pathlib import Path

import pytest
from support.midi_factory import piece

from data_pipeline.abc_tunes import (
    convert_book,
    key_labels,
    meter_label,
    origin_region,
    read_tunes,
    tune_type,
)
from data_pipeline.config import LabelConfig, LimitsConfig
from data_pipeline.errors import ConfigError
from data_pipeline.music21_corpus import CorpusSpec, convert_work, list_works
from data_pipeline.piece import Rejection, check_and_measure

BOOK = """\
%abc-2.1
X: 0007
T: The Silver Spear
T: (second title)
R: Reel
M: C|
L: 1/8
O: Ireland
K: D % the key
|:FA (3AAA BAFA|dfed BddB:|
K: G
|:gfge d2dB:|

X:8
T:Ein Lied
O: Europa, Mitteleuropa, Deutschland (BRD) , Hessen
R: Liebes - Lied, Leid, Klage]
M: 3/4
K: Ador
A2 B2 c2|
"""


def test_a_book_gives_each_tune_the_labels_of_its_own_header():
    tunes = read_tunes(BOOK)
    assert [t.number for t in tunes] == ["7", "8"]  # X:0007 is music21's tune 7
    reel, song = tunes[0].labels, tunes[1].labels
    # The body's K: G changes the music, not the tune's key.
    assert reel == {
        "meter": "2/2",
        "key": "D major",
        "mode": "major",
        "key_signature": "+2",
        "tune_type": "reel",
        "region": "Ireland",
    }
    assert song == {
        "meter": "3/4",
        "key": "A dorian",
        "mode": "dorian",
        "key_signature": "+1",
        "tune_type": "liebes-lied",
        "region": "Deutschland",
    }


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("Gm", ("G minor", "-2")),
        ("E Minor", ("E minor", "+1")),
        ("EM", ("E minor", "+1")),  # modes are case-insensitive: M is minor
        ("Dmix", ("D mixolydian", "+1")),
        ("A Dorian", ("A dorian", "+1")),
        ("Bb", ("Bb major", "-2")),
        ("F#m", ("F# minor", "+3")),
        ("E phr bass", ("E phrygian", "+0")),
        ("G bass", ("G major", "+1")),  # a clef, not a mode
        ("Glyd", ("G lydian", "+2")),
        ("D Major", ("D major", "+2")),
    ],
)
def test_key_fields_give_key_mode_and_signature(field, expected):
    labels = key_labels(field)
    assert (labels["key"], labels["key_signature"]) == expected
    assert labels["mode"] == expected[0].split()[1]


@pytest.mark.parametrize("field", ["HP", "Hp", "none", "Es", "Bn", ""])
def test_keys_that_name_no_tonic_and_mode_give_no_labels(field):
    assert key_labels(field) == {}


@pytest.mark.parametrize(
    ("field", "expected"),
    [("C", "4/4"), ("C|", "2/2"), ("6/8", "6/8"), (" 2/2]", "2/2"), ("FREI4/4", "free")],
)
def test_meters(field, expected):
    assert meter_label(field) == expected


def test_meter_none_gives_no_label():
    assert meter_label("none") is None


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("Reel", "reel"),
        ("slipjig", "slip jig"),
        ("Slip Jig", "slip jig"),
        ("Romanze, Ballade, Lied", "romanze"),
        ("Xiaodiao. Geming lishi minge]", "xiaodiao"),
        ("???", None),
        ("", None),
    ],
)
def test_tune_types(field, expected):
    assert tune_type(field) == expected


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("Europa, Mitteleuropa, Deutschland", "Deutschland"),
        ("Mitteleuropa, Deutschland / Frankreich, Lothringen", "Deutschland"),
        ("Europa, Mitteleuropa, Deutschland; Frankreich", "Deutschland"),
        ("Luxemburg", "Luxemburg"),
        ("China, Shaanxi, Zizhou", "China"),
        ("Asien, Ostasien, China", "China"),
        ("SCOTCH.", "Scotch"),
        ("Nord - Amerika", "Nord-Amerika"),
        ("", None),
    ],
)
def test_essen_origins_give_the_country_or_region(field, expected):
    assert origin_region(field) == expected


def test_abc2midi_converts_every_tune_of_a_book_by_its_number():
    midi = convert_book(BOOK.encode(), timeout_s=30)
    assert sorted(midi) == ["7", "8"]
    assert all(data.startswith(b"MThd") for data in midi.values())
    # Same book, same bytes: the cache and the shards built from it are reproducible.
    assert convert_book(BOOK.encode(), timeout_s=30) == midi


def test_only_chosen_label_kinds_get_conditioning_tokens():
    labels = LabelConfig(path_levels=["style"])
    assert labels.conditions("collection=bach") and labels.conditions("tune_type=reel")
    assert labels.conditions("style=jazz")  # a path level names a kind to condition on
    assert not labels.conditions("meter=3/4") and not labels.conditions("region=China")


def _midi() -> bytes:
    return piece(seed=1, drums=False).dumps_midi()


def test_a_score_that_plays_far_more_notes_than_it_writes_is_quarantined():
    data = _midi()
    played = check_and_measure(data, LimitsConfig())[1]["notes"]
    limits = LimitsConfig(max_repeat_expansion=4.0)
    # Repeats played out: within the bound, kept.
    assert not isinstance(check_and_measure(data, limits, written_notes=played // 3), Rejection)
    rejection = check_and_measure(data, limits, written_notes=played // 5)
    assert isinstance(rejection, Rejection) and rejection.code == "repeats_blow_up"
    assert f"{played} notes played from {played // 5} written" in rejection.detail
    assert "limits.max_repeat_expansion=4" in rejection.detail
    # A file that is no converted score (no count written) is not checked.
    assert not isinstance(check_and_measure(data, limits, written_notes=None), Rejection)


def test_the_repeat_bound_is_validated():
    with pytest.raises(ConfigError, match=r"limits.max_repeat_expansion=0.5 must be at least 1"):
        LimitsConfig(max_repeat_expansion=0.5)


def test_a_converted_score_keeps_the_labels_its_score_states(tmp_path):
    work = next(w for w in list_works(CorpusSpec(("bach",))) if w.source_path == "bach/bwv10.7.mxl")
    midi = convert_work((work, str(tmp_path / "w.mid"), 120.0))
    labels = json.loads((tmp_path / "w.json").read_text())
    # Read from the score before the export moves its meters and keys to a conductor track.
    assert labels == {"meter": "4/4", "key_signature": "-2", "key": "G minor", "mode": "minor"}
    assert Path(midi).read_bytes().startswith(b"MThd")
