"""Datasets and a model made by the apps themselves, once per session: a procedural MIDI corpus
with bad files beside it, real Bach shards, a tiny trained and exported model."""

import shutil
from pathlib import Path

import pytest
from support import midi_factory
from support.apps import prepare_train_export, run_module


@pytest.fixture(scope="session")
def midi_corpus(tmp_path_factory) -> Path:
    """40 good pieces in two collections, one exact duplicate, and every kind of bad file."""
    root = tmp_path_factory.mktemp("corpus")
    files = midi_factory.write_corpus(root, 40)
    shutil.copy(files[3], root / "jazz" / "copy_of_piece003.mid")
    midi_factory.write_bad_files(root / "bad")
    return root


@pytest.fixture(scope="session")
def bach_dataset(tmp_path_factory) -> Path:
    """Real music: 48 Bach chorales from the built-in corpus, converted from scratch."""
    root = tmp_path_factory.mktemp("bach")
    run_module(
        "data_pipeline.prepare",
        "source=music21:bach",
        "max_files=48",
        f"output={root / 'ds'}",
        f"cache_dir={root / 'cache'}",
        "shards.max_pieces=6",
        "split.val=0.1",
        "split.test=0.1",
        f"hydra.run.dir={root / 'hydra'}",
    )
    return root / "ds"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> dict[str, Path]:
    """A tiny GPT trained briefly (1 process, ZeRO-0, CPU) on 60 procedural pieces in two
    styles (labels collection=band, collection=duo), exported: ``dataset``, ``run``,
    ``export`` directories. Enough training to tell the styles apart, not to make music."""
    root = tmp_path_factory.mktemp("tiny_model")
    midi_factory.write_two_styles(root / "midi", 60)
    prepare_train_export(root, val=0.1, test=0.2, steps=200)
    return {"dataset": root / "ds", "run": root / "run", "export": root / "export"}
