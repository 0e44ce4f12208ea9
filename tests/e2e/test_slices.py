"""Scale-out: two slices prepared apart and merged equal one single-process prepare."""

import json

from support.apps import run_module
from support.datasets import comparable

from data_pipeline.reader import load_card

OPTIONS = ("shards.max_pieces=8", "tokenizer.learned.kind=bpe", "tokenizer.learned.size=600")


def test_two_slices_merged_equal_one_run(midi_corpus, tmp_path):
    single, sliced = tmp_path / "single", tmp_path / "sliced"
    run_module(
        "data_pipeline.prepare",
        f"source={midi_corpus}",
        f"output={single}",
        "workers=1",
        *OPTIONS,
        f"hydra.run.dir={tmp_path / 'h0'}",
    )
    for index in (1, 0):
        run_module(
            "data_pipeline.prepare",
            f"source={midi_corpus}",
            f"output={sliced}",
            "num_slices=2",
            f"slice_index={index}",
            "workers=1",
            *OPTIONS,
            f"hydra.run.dir={tmp_path / f'h{index + 1}'}",
        )
    assert not (sliced / "dataset.json").exists()  # slices alone do not make a dataset
    proc = run_module("data_pipeline.merge", f"output={sliced}", f"hydra.run.dir={tmp_path / 'hm'}")
    assert "dataset card" in proc.stdout

    one, two = load_card(str(single)), load_card(str(sliced))
    assert comparable(two) == comparable(one)
    assert {s["index"] for s in two["slices"]} == {0, 1}
    names = [s["name"] for split in two["splits"].values() for s in split["shards"]]
    assert any(n.startswith("train-0000-") for n in names)
    assert any(n.startswith("train-0001-") for n in names)
    rows = [json.loads(line) for line in (sliced / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == two["files"]["total"]


def test_merge_names_the_missing_slice(midi_corpus, tmp_path):
    out = tmp_path / "ds"
    run_module(
        "data_pipeline.prepare",
        f"source={midi_corpus}",
        f"output={out}",
        "num_slices=3",
        "slice_index=1",
        "workers=1",
        f"hydra.run.dir={tmp_path / 'h'}",
    )
    proc = run_module(
        "data_pipeline.merge", f"output={out}", f"hydra.run.dir={tmp_path / 'hm'}", check=False
    )
    assert proc.returncode != 0
    assert "slices [0, 2] of 3 are missing or unfinished" in proc.stderr
