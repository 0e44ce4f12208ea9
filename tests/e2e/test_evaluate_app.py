"""``python -m mtrain.evaluate``: a model's likelihood plus its samples' musical metrics against
the test split, and the metrics-only mode over folders of MIDI files."""

import json
import os
from pathlib import Path

import pytest
from support.apps import run_module

from mtrain.evaluation.music_metrics import METRICS

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def evaluate(output: Path, *overrides: str, check: bool = True):
    return run_module("mtrain.evaluate", f"output={output}", *overrides, env=ENV, check=check)


@pytest.fixture(scope="module")
def model_report(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaluate")
    evaluate(
        out,
        f"checkpoint={tiny_model['export']}",
        f"data_path={tiny_model['dataset']}",
        "music.num_samples=6",
        "music.sampling.max_new_tokens=120",
        "logger.mode=offline",
    )
    return out


def test_model_report_compares_samples_with_the_test_split(model_report):
    report = json.loads((model_report / "report.json").read_text())
    assert report["likelihood"]["pieces"] > 0
    music = report["music"]
    assert music["generated"]["pieces"] == music["reference"]["pieces"] == 6
    assert set(music["features"]) == set(METRICS)
    for row in music["features"].values():
        assert set(row) == {"gen_mean", "gen_std", "ref_mean", "ref_std", "oa", "kl"}
    for name in ("generated", "reference"):
        per_file = json.loads((model_report / f"{name}_metrics.json").read_text())
        assert len(per_file) == 6 and all(set(m) == set(METRICS) for m in per_file.values())
    assert sorted(p.stem for p in (model_report / "plots").glob("*.png")) == sorted(METRICS)
    md = (model_report / "report.md").read_text()
    assert "| bits_per_note |" in md and "| scale_consistency |" in md and "| OA | KL |" in md


def test_model_report_is_logged_to_wandb(model_report):
    (run,) = (model_report / "wandb").glob("offline-run-*")
    assert len(list(run.glob("files/media/images/**/*.png"))) == len(METRICS)
    assert list(run.glob("files/media/table/**/*.table.json"))


def test_metrics_only_mode_writes_per_file_values(tiny_model, tmp_path):
    midi = tiny_model["dataset"].parent / "midi"
    evaluate(tmp_path, f"midi_dir={midi}")
    per_file = json.loads((tmp_path / "midi_dir_metrics.json").read_text())
    assert sorted(per_file) == sorted(p.relative_to(midi).as_posix() for p in midi.rglob("*.mid"))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["pieces"] == len(per_file)
    # 4 bars of flute and cello: two programs, never drums, in a major key.
    assert per_file["duo/piece001.mid"]["scale_consistency"] == 1.0


def test_a_folder_against_itself_overlaps_more_than_against_another_style(tiny_model, tmp_path):
    midi = tiny_model["dataset"].parent / "midi"
    overlap = {}
    for other in ("duo", "band"):
        out = tmp_path / other
        evaluate(out, f"midi_dir={midi / 'duo'}", f"reference_dir={midi / other}")
        features = json.loads((out / "report.json").read_text())["music"]["features"]
        overlap[other] = features["note_density"]["oa"]
    assert overlap["duo"] > 0.9 and overlap["duo"] > overlap["band"], overlap


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ((), "give checkpoint=<export or run dir> to evaluate a model, baseline=ngram for"),
        (("midi_dir=/nonexistent",), "midi_dir=/nonexistent is not a directory"),
        (
            ("checkpoint=EXPORT", "data_path=DATA", "music.label=composer:nobody"),
            "no conditioning token for composer=nobody",
        ),
    ],
)
def test_bad_requests_fail_with_the_key_named(tiny_model, tmp_path, overrides, message):
    overrides = [
        o.replace("EXPORT", str(tiny_model["export"])).replace("DATA", str(tiny_model["dataset"]))
        for o in overrides
    ]
    proc = evaluate(tmp_path, *overrides, "music.sampling.max_new_tokens=8", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stdout + proc.stderr
