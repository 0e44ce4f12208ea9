"""Sources and configs: the built-in music21 corpus, bad overrides, bad source names."""

from support.apps import run_module
from support.datasets import iter_pieces, shard_urls

from data_pipeline.reader import load_card


def test_builtin_corpus_converts_labels_and_caches(tmp_path):
    out, cache = tmp_path / "ds", tmp_path / "cache"
    args = (
        "source=music21:bach+palestrina",
        f"output={out}",
        f"cache_dir={cache}",
        "max_files=6",
        "split.val=0",
        "split.test=0",
        f"hydra.run.dir={tmp_path / 'h'}",
    )
    run_module("data_pipeline.prepare", *args)
    card = load_card(str(out))
    assert card["files"]["ok"] == 6
    # Every label is in the card and in each piece's record; only the conditioning kinds get
    # tokens (meter, key and mode are for probes and reports).
    assert sorted(card["tokenizer"]["labels"]) == ["collection=bach", "composer=bach", "genre=art"]
    assert {"collection=bach": 6, "composer=bach": 6, "genre=art": 6}.items() <= card[
        "labels"
    ].items()
    pieces = list(iter_pieces(shard_urls(str(out), "train", card)))
    assert all(meta["name"].startswith("bach/") and meta["notes"] > 20 for _, meta in pieces)
    chorales = [meta["labels"] for _, meta in pieces if meta["name"].endswith(".mxl")]
    assert chorales and all({"meter", "key", "mode", "key_signature"} <= set(c) for c in chorales)
    assert card["collections"]["bach"]["pieces"] == 6
    assert len(list(cache.rglob("*.mid"))) == 6
    # A second run converts nothing: the cache is complete.
    again = run_module(
        "data_pipeline.prepare",
        *args[:-1],
        f"output={tmp_path / 'ds2'}",
        f"hydra.run.dir={tmp_path / 'h2'}",
    )
    assert "converting" not in again.stderr
    assert load_card(str(tmp_path / "ds2"))["splits"] == card["splits"]


def test_unknown_collection_names_the_known_ones(tmp_path):
    proc = run_module(
        "data_pipeline.prepare",
        "source=music21:bahc",
        f"output={tmp_path}",
        f"hydra.run.dir={tmp_path / 'h'}",
        check=False,
    )
    assert proc.returncode != 0
    assert "unknown collection(s) ['bahc']" in proc.stderr and "bach" in proc.stderr


def test_missing_source_directory_is_named(tmp_path):
    proc = run_module(
        "data_pipeline.prepare",
        f"source={tmp_path / 'nope'}",
        f"output={tmp_path}",
        f"hydra.run.dir={tmp_path / 'h'}",
        check=False,
    )
    assert proc.returncode != 0 and f"source={tmp_path / 'nope'}: no such directory" in proc.stderr


def test_unknown_key_and_wrong_type_are_rejected_before_any_work(tmp_path):
    for override, expected in [
        ("tokenizer.nmu_velocities=16", "tokenizer.nmu_velocities"),
        ("workers=two", "workers"),
        ("tokenizer=bogus", "tokenizer"),
        ("tokenizer.kind=WordPiece", "tokenizer.kind"),
    ]:
        proc = run_module(
            "data_pipeline.prepare",
            override,
            f"output={tmp_path / 'x'}",
            f"hydra.run.dir={tmp_path / 'h'}",
            check=False,
        )
        assert proc.returncode != 0, override
        assert expected in proc.stderr, (override, proc.stderr[-2000:])
    assert not (tmp_path / "x").exists()


def test_bad_split_fractions_are_explained(tmp_path):
    proc = run_module(
        "data_pipeline.prepare",
        "split.val=0.6",
        "split.test=0.5",
        f"output={tmp_path / 'x'}",
        f"hydra.run.dir={tmp_path / 'h'}",
        check=False,
    )
    assert proc.returncode != 0 and "split.val=0.6 + split.test=0.5" in proc.stderr
