"""Discovery end to end: a contrastive stage from a tiny language model (ZeRO-3, stopped and
resumed), the probe suite on a corpus with two label kinds with every baseline, and search
over the index embed builds, with its bad inputs."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from support import midi_factory
from support.apps import prepare_train_export, run_module, train_env

from mtrain.evaluation.search_index import PieceIndex

# At lr 3e-3 the loss falls by about 0.5 in 40 steps; at 1e-3 by 0.27-0.37, depending on the
# order prepare wrote the pieces in.
STEPS, HALF = 40, 20
# Pieces and language-model steps: the fewest that keep two balanced label kinds with 3 folds
# and a model the contrastive stage can start from (it need not make music).
PIECES, LM_STEPS = 40, 80


def contrastive(root: Path, steps: int) -> None:
    run_module(
        "mtrain.train",
        f"data.path={root / 'ds'}",
        f"run_dir={root / 'contrastive'}",
        f"init_from={root / 'export'}",
        "objective=contrastive",
        "contrastive.view_tokens=64",
        "model=tiny",
        "deepspeed=cpu",
        "deepspeed.zero_stage=3",
        f"trainer.max_steps={steps}",
        f"trainer.save_every={HALF}",
        "trainer.eval_every=0",
        "trainer.micro_batch_size=8",
        "trainer.global_batch_tokens=1024",
        "optim.lr=3e-3",
        "optim.warmup_steps=5",
        "logger.mode=disabled",
        env=train_env(),
    )


@pytest.fixture(scope="module")
def discovery(tmp_path_factory) -> Path:
    """PIECES pieces labelled by style (band, duo) and lead instrument (piano, organ); a tiny
    language model trained on them; a contrastive stage from it, run to step 20, then resumed
    to 40, exported; embed over every split with the probes (3 folds)."""
    root = tmp_path_factory.mktemp("discovery")
    midi_factory.write_two_kinds(root / "midi", PIECES)
    prepare_train_export(
        root, 0.1, 0.2, LM_STEPS, prepare_extra=("labels.path_levels=[collection,lead]",)
    )
    contrastive(root, HALF)
    contrastive(root, STEPS)
    run_module("mtrain.export", f"checkpoint={root / 'contrastive'}", f"output={root / 'embedder'}")
    run_module(
        "mtrain.embed",
        f"checkpoint={root / 'embedder'}",
        f"data_path={root / 'ds'}",
        f"output={root / 'index'}",
        "split=all",
        "folds=3",
        f"handcrafted.cache_dir={root / 'features'}",
    )
    return root


def test_the_contrastive_loss_falls_through_a_resume(discovery):
    rows = [json.loads(line) for line in (discovery / "contrastive" / "metrics.jsonl").open()]
    losses = {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}
    assert sorted(losses) == list(range(1, STEPS + 1))  # each step once, across the resume
    first, last = (
        np.mean([losses[s] for s in range(1, 6)]),
        np.mean([losses[s] for s in range(STEPS - 4, STEPS + 1)]),
    )
    assert last < first - 0.3
    meta = json.loads((discovery / "embedder" / "config.json").read_text())
    assert meta["embedding"]["objective"] == "contrastive"
    assert meta["embedding"]["init_from"] == str(discovery / "export")


def test_the_rate_at_which_views_rank_each_other_first_is_reported_for_each_model(discovery):
    """Whether they do is the unit test's (tests/unit/training/test_contrastive.py): views of
    these procedural pieces, transposed apart, share too little to tell them from the rest."""
    report = json.loads((discovery / "index" / "report.json").read_text())
    rates = report["views_first"]
    assert set(rates) == {"model", "language_model", "random"}
    assert all(0 <= rate <= 1 for rate in rates.values())
    rows = [json.loads(line) for line in (discovery / "index" / "pieces.jsonl").open()]
    held_out = sum(row["split"] != "train" for row in rows)
    assert report["views_of"] == {"pieces": held_out, "held_out": True} and held_out >= 2
    said = (discovery / "index" / "report.md").read_text()
    line = f"Views of one piece ranking each other first: model embedding {rates['model']:.3f}"
    assert line in said


def test_the_probe_suite_scores_both_label_kinds_against_every_baseline(discovery):
    report = json.loads((discovery / "index" / "report.json").read_text())
    assert report["pieces"] == PIECES and report["unscored"] == {}
    features = {"model", "language_model", "random", "handcrafted", "pitch_classes"}
    for kind in ("collection", "lead"):
        row = report["probes"][kind]
        assert set(row) == features
        for cell in row.values():
            assert cell["folds"] == 3 and cell["classes"] == 2 and cell["pieces"] == PIECES
            assert 0 <= cell["std"] < 0.5
    # Style shows in what plays (drums or not, the bass's instrument): the handcrafted vector
    # and the model find it.
    assert report["probes"]["collection"]["handcrafted"]["accuracy"] >= 0.8
    assert report["probes"]["collection"]["model"]["accuracy"] >= 0.7
    table = (discovery / "index" / "report.md").read_text()
    assert f"| collection (2, {PIECES}; majority 0.500) |" in table
    assert f"| lead (2, {PIECES}; majority 0.500) |" in table
    assert "handcrafted (music21 + MusPy metrics)" in table


def search(discovery: Path, *overrides: str, check: bool = True):
    return run_module("mtrain.search", f"index={discovery / 'index'}", *overrides, check=check)


def test_search_finds_a_piece_from_its_own_file_first(discovery):
    file = sorted((discovery / "midi" / "duo" / "organ").glob("*.mid"))[0]
    proc = search(discovery, f"query={file}", "k=3")
    ranks = [line for line in proc.stdout.splitlines() if line.startswith("| ")][2:]
    assert len(ranks) == 3 and f"duo/organ/{file.name}" in ranks[0]
    scores = [float(line.split("|")[2]) for line in ranks]
    # Embedded from the file, the query is the vector embed stored from the shards' tokens.
    assert scores[0] == pytest.approx(1.0, abs=1e-3)
    assert scores == sorted(scores, reverse=True) and scores[0] > scores[1]


def test_files_added_to_the_index_are_found_and_the_rest_is_not_embedded_again(discovery, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(discovery / "index", index)
    before = PieceIndex.load(index)
    new = midi_factory.write_piece(tmp_path / "new" / "fresh.mid", seed=1000, drums=False)
    (tmp_path / "new" / "notes.mid").write_text("not MIDI")
    proc = run_module("mtrain.search", f"index={index}", f"add={new.parent}", f"query={new}")
    after = PieceIndex.load(index)
    assert len(after.rows) == len(before.rows) + 1 and after.rows[-1]["name"] == "fresh.mid"
    stored = after.index.reconstruct_n(0, len(before.rows))
    np.testing.assert_array_equal(stored, before.index.reconstruct_n(0, len(before.rows)))
    assert "| 1 |" in proc.stdout and "fresh.mid" in proc.stdout.split("| 1 |")[1].split("\n")[0]
    assert "skipped" in proc.stdout + proc.stderr and "1 skipped" in proc.stdout + proc.stderr


@pytest.mark.parametrize("case", ["not_midi", "no_notes", "other_model"])
def test_a_bad_query_is_refused_in_one_line(discovery, tmp_path, case):
    if case == "not_midi":
        query = tmp_path / "text.mid"
        query.write_text("hello")
        overrides, says = [f"query={query}"], "is not a readable MIDI file"
    elif case == "no_notes":
        query = midi_factory.write_bad_files(tmp_path)
        overrides, says = [f"query={tmp_path / 'zero_notes.mid'}"], "holds no notes"
    else:
        file = next((discovery / "midi").rglob("*.mid"))
        overrides = [f"query={file}", f"checkpoint={discovery / 'export'}"]
        says = "the index was built from model"
    proc = search(discovery, *overrides, check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0]
