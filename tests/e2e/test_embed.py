"""Pieces -> vectors: hidden states, mean pooling over windows, centring, label retrieval and
probe against the pitch-class baseline, nearest-neighbour queries, a dataset with one label, and
the app's errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import symusic
import torch
from support.apps import run_module
from support.datasets import iter_pieces, shard_urls

from data_pipeline.tokenizer import MusicTokenizer
from mtrain.evaluation.pooling import (
    MeanPooler,
    centred_unit_rows,
    pitch_class_histogram,
    unit_rows,
)
from mtrain.exported.loading import load_exported

K = 4


@pytest.fixture(scope="module")
def test_split(tiny_model) -> list[tuple[np.ndarray, dict]]:
    """(base ids, meta) of every piece of the tiny model's test split, in card order."""
    return list(iter_pieces(shard_urls(str(tiny_model["dataset"]), "test")))


@pytest.fixture(scope="module")
def embedded(tiny_model, test_split, tmp_path_factory) -> tuple[Path, str]:
    """The app run once over the test split, queried with its third piece: (output, stdout)."""
    out = tmp_path_factory.mktemp("embed")
    proc = run_module(
        "mtrain.embed",
        f"checkpoint={tiny_model['export']}",
        f"data_path={tiny_model['dataset']}",
        f"output={out}",
        f"query={test_split[2][1]['hash'][:10]}",
        f"k={K}",
        "batch_size=3",
    )
    return out, proc.stdout


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model):
    model, _ = load_exported(tiny_model["export"])
    return model, MusicTokenizer.load(str(tiny_model["export"] / "tokenizer"))


def test_rows_line_up_with_the_pieces_of_the_split(embedded, test_split, model_and_tokenizer):
    out, _ = embedded
    vectors = np.load(out / "embeddings.npy")
    rows = [json.loads(line) for line in (out / "pieces.jsonl").read_text().splitlines()]
    assert vectors.dtype == np.float32
    assert vectors.shape == (len(test_split), model_and_tokenizer[0].config.d_model)
    assert [r["id"] for r in rows] == [meta["hash"] for _, meta in test_split]
    assert [r["labels"] for r in rows] == [meta["labels"] for _, meta in test_split]
    assert [r["tokens"] for r in rows] == [len(tokens) for tokens, _ in test_split]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_a_piece_embeds_the_same_alone_and_in_a_batch(embedded, test_split, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    docs = [tokenizer.document({}, tokens, end=False) for tokens, _ in test_split]
    # A piece of several windows after others, so its windows land in different batches and
    # padding.
    long = [i for i, doc in enumerate(docs) if len(doc) > 2 * model.config.max_seq_len and i]
    assert long, [len(doc) for doc in docs]
    alone = MeanPooler(model, None, batch_size=1)
    alone.add(docs[long[0]])
    together = MeanPooler(model, None, batch_size=4)
    for doc in docs:
        together.add(doc)
    np.testing.assert_allclose(together.means()[long[0]], alone.means()[0], atol=1e-5)
    # The app's rows are the pieces without their labels, pooled over all their windows, at
    # length 1, less the split's mean.
    app_rows = np.load(embedded[0] / "embeddings.npy")
    expected = centred_unit_rows(unit_rows(together.means()))
    np.testing.assert_allclose(expected, app_rows, atol=1e-5)


def test_the_last_hidden_states_are_what_the_logits_are_made_from(model_and_tokenizer):
    model, _ = model_and_tokenizer
    idx = torch.randint(
        model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        last = model.hidden_states(idx)
        torch.testing.assert_close(model.lm_head(last), model(idx).logits)
        torch.testing.assert_close(model.hidden_states(idx, layer=-1), last)
        first = model.hidden_states(idx, layer=0)
        torch.testing.assert_close(model.hidden_states(idx, layer=-2), first)
    assert first.shape == last.shape == (2, 40, model.config.d_model)
    assert not torch.allclose(first, last)
    with pytest.raises(ValueError, match="layer=2"):
        model.hidden_states(idx, layer=2)


def test_the_pitch_class_baseline_counts_pitched_notes_only(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    score = symusic.Score(480)
    chord = symusic.Track(name="chord", program=0)
    for i, pitch in enumerate((60, 64, 67, 72)):  # C E G C
        chord.notes.append(symusic.Note(i * 480, 480, pitch, 80))
    drums = symusic.Track(name="drums", is_drum=True)
    drums.notes.extend(symusic.Note(i * 240, 120, 42, 80) for i in range(8))  # F#, as a pitch
    score.tracks.extend([chord, drums])
    histogram = pitch_class_histogram(tokenizer.base_ids_to_midi(tokenizer.midi_to_base_ids(score)))
    np.testing.assert_allclose(histogram, np.bincount([0, 4, 7, 0], minlength=12) / 4)


def test_the_model_retrieves_its_style_better_than_chance_beside_the_baselines(embedded):
    out, stdout = embedded
    report = json.loads((out / "report.json").read_text())
    retrieval = report["retrieval"]["collection"]
    model, baseline = retrieval["model"], retrieval["pitch_classes"]
    assert model["k"] == baseline["k"] == K
    assert model["precision"] > model["chance"] + 0.2
    # Precision is a share of hits among k neighbours of every query; accuracy a share of pieces.
    hits = baseline["precision"] * baseline["k"] * baseline["queries"]
    assert hits == pytest.approx(round(hits)) and baseline["chance"] == model["chance"]
    probes = report["probes"]["collection"]
    assert set(probes) == {"model", "random", "handcrafted", "pitch_classes"}
    for probe in probes.values():
        assert probe["classes"] == 2 and probe["pieces"] == model["queries"]
    assert probes["model"]["accuracy"] > probes["model"]["majority"]
    table = (out / "report.md").read_text()
    assert "model embedding" in table and "pitch-class histogram" in table
    assert table.split("\n## ")[0] in stdout
    # Centring spreads the cosines that mean pooling crowds near 1.
    spread = report["cosine_spread"]
    assert spread["centred"]["min"] < 0 < spread["mean-pooled"]["min"]
    assert spread["centred"]["median"] < spread["mean-pooled"]["median"]
    assert "cosines between pieces: mean-pooled" in table


def test_without_probes_only_the_embeddings_and_the_index_are_written(tiny_model, tmp_path):
    run_module(
        "mtrain.embed",
        f"checkpoint={tiny_model['export']}",
        f"data_path={tiny_model['dataset']}",
        f"output={tmp_path}",
        "probes=false",
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["probes"] == report["retrieval"] == report["views_first"] == {}
    assert "Probes" not in (tmp_path / "report.md").read_text()
    assert np.load(tmp_path / "embeddings.npy").shape[0] == report["pieces"]
    assert (tmp_path / "index.faiss").exists() and (tmp_path / "index.json").exists()


def test_a_query_lists_its_nearest_other_pieces(embedded, test_split):
    out, stdout = embedded
    query = json.loads((out / "report.json").read_text())["query"]
    vectors = np.load(out / "embeddings.npy")
    ids = [meta["hash"] for _, meta in test_split]
    assert query["piece"]["id"] == ids[2]
    # Cosine similarity to every other piece, the query itself left out.
    similarity = vectors @ vectors[2]
    expected = [i for i in np.argsort(-similarity, kind="stable") if i != 2][:K]
    assert [n["id"] for n in query["neighbours"]] == [ids[i] for i in expected]
    np.testing.assert_allclose(
        [n["similarity"] for n in query["neighbours"]], similarity[expected], rtol=1e-5
    )
    assert f"Nearest to {ids[2][:12]}" in stdout and ids[expected[0]][:12] in stdout


@pytest.mark.parametrize(
    ("override", "key"),
    [("query=ffffffffffff", "query=ffffffffffff"), ("checkpoint=/nonexistent", "checkpoint=")],
)
def test_a_bad_query_or_checkpoint_exits_2_naming_the_key(tiny_model, tmp_path, override, key):
    proc = run_module(
        "mtrain.embed",
        f"checkpoint={tiny_model['export']}",
        f"data_path={tiny_model['dataset']}",
        f"output={tmp_path}",
        override,
        check=False,
    )
    assert proc.returncode == 2
    assert key in proc.stdout + proc.stderr
    if key.startswith("query"):
        assert "pieces.jsonl" in proc.stdout + proc.stderr
