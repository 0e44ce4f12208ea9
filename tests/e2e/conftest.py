"""Datasets and models made by the apps themselves, once per session: a procedural MIDI corpus
with bad files beside it, real Bach shards, a tiny trained and exported model, a ZeRO-3 run on
the Bach shards exported and fine-tuned from its export."""

import os
import shutil
from pathlib import Path

import pytest
from support import midi_factory
from support.apps import prepare_train_export, run_module
from support.trainings import CPU_ENV, run, train_args


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
    ``export`` directories. Enough training to tell the styles apart, not to make music: at 200
    steps whether a label steered the style depended on the loader's seed."""
    root = tmp_path_factory.mktemp("tiny_model")
    midi_factory.write_two_styles(root / "midi", 60)
    prepare_train_export(root, val=0.1, test=0.2, steps=400)
    return {"dataset": root / "ds", "run": root / "run", "export": root / "export"}


# GPT-2's shape (learned positions, biases): the export maps it onto GPT2LMHeadModel.
GPT2_SHAPE = ("model.positional=learned", "model.bias=true")


def train_and_export(dataset: Path, root: Path, *extra: str) -> dict[str, Path]:
    """A training on 2 ranks (``root/run``) exported by ``python -m mtrain.export``
    (``root/export``)."""
    code, out = run(train_args(dataset, root / "run", *extra), ranks=2)
    assert code == 0, out[-4000:]
    env = {**os.environ, **CPU_ENV}
    run_module("mtrain.export", f"checkpoint={root / 'run'}", f"output={root / 'export'}", env=env)
    return {"run": root / "run", "export": root / "export"}


@pytest.fixture(scope="session")
def zero3_export(bach_dataset, tmp_path_factory) -> dict[str, Path]:
    """6 steps of the tiny model in GPT-2's shape under ZeRO-3 on 2 ranks (``run``), exported
    (``export``): the consolidation of ZeRO-3 shards, and the base the fine-tuning below starts
    from."""
    root = tmp_path_factory.mktemp("zero3_export")
    return train_and_export(bach_dataset, root, "trainer.max_steps=6", *GPT2_SHAPE)


@pytest.fixture(scope="session")
def tuned_from_export(bach_dataset, zero3_export, tmp_path_factory) -> dict[str, Path]:
    """2 steps of 2 ZeRO-3 ranks fine-tuning ``zero3_export`` with the model built partitioned
    (``deepspeed.zero_init=true``) at lr 0 (AdamW then changes no weight, weight decay
    included) (``run``), exported (``export``). Its first loss is the exported model's, and its
    export holds the exported weights."""
    root = tmp_path_factory.mktemp("tuned_from_export")
    return train_and_export(
        bach_dataset,
        root,
        "trainer.max_steps=2",
        "deepspeed.zero_init=true",
        f"init_from={zero3_export['export']}",
        "optim.lr=0",
        *GPT2_SHAPE,
    )
