"""A search query is the piece the shards hold: a file tokenized by prepare and by the query
path gives the same base ids, and a query at the length the pooler gives it lands on the
vector embed stored for it."""

import numpy as np
from support.datasets import prepare
from support.midi_factory import varied_piece

from data_pipeline.reader import ShardReader, load_card, split_shares
from data_pipeline.tokenizer import MusicTokenizer
from mtrain.evaluation.pooling import unit_rows
from mtrain.evaluation.search_index import EmbeddingModel, PieceIndex
from mtrain.evaluation.search_job import file_base_ids

# The ticks per quarter music21's MIDI export writes: resampled by the tokenizer.
MUSIC21_TPQ = 10080


def test_a_file_tokenized_by_prepare_equals_the_query_paths_tokens(tmp_path):
    # Meters, tempo changes, drums, up to six instruments, and two tick resolutions: what the
    # tokenizer resamples, quantises and merges into one stream.
    (tmp_path / "midi").mkdir()
    files = {}
    for seed in range(6):
        score = varied_piece(seed)
        score = score.resample(MUSIC21_TPQ) if seed % 2 else score
        path = tmp_path / "midi" / f"p{seed}.mid"
        score.dump_midi(str(path))
        files[path.name] = str(path)
    ds = str(prepare(tmp_path / "midi", tmp_path / "ds", "workers=1", "limits.min_notes=1"))
    tokenizer = MusicTokenizer.load(f"{ds}/tokenizer")
    card = load_card(ds)
    stored = [
        piece
        for split, counts in card["splits"].items()
        if counts["pieces"]
        for piece in ShardReader().pieces(split_shares(ds, split, card))
    ]
    assert len(stored) == len(files)
    for piece in stored:
        query = file_base_ids(tokenizer, files[piece.meta["name"]])
        np.testing.assert_array_equal(query, piece.tokens.astype(np.int64))


def test_a_query_at_any_length_finds_its_stored_vector_at_cosine_one():
    # embed indexes unit-length rows; a query comes straight from the pooler, at the length of
    # a mean hidden state: the index must put both in one space.
    rng = np.random.default_rng(0)
    pooled = 10 * rng.normal(size=16) + rng.normal(size=(40, 16))
    rows = [{"id": str(i), "name": f"p{i}", "labels": {}} for i in range(40)]
    index = PieceIndex.build(unit_rows(pooled), rows, EmbeddingModel("m/mean/last", "/m", None))
    scores, found = index.search(pooled * 7.5, 2)
    assert list(found[:, 0]) == list(range(40))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (scores[:, 1] < 0.99).all()
