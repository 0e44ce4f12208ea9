"""Early stopping keeps the best checkpoint and goes on from its record after a restart; a
rising validation loss and a train split smaller than one step are said with their numbers;
a small source still gets a validation piece, chosen by content."""

import logging

import pytest

from data_pipeline.config import PrepareConfig, SplitConfig
from data_pipeline.manifest import content_hash, split_of
from data_pipeline.slice_run import nearest_val
from data_pipeline.sources import SourceFile
from mtrain.runs.run_dir import RunDir
from mtrain.training.config import TrainerConfig
from mtrain.training.small_data import (
    StoppedEarly,
    ValidationWatch,
    best_step,
    warn_if_smaller_than_a_batch,
)


class SavingCheckpointer:
    def __init__(self, every: int):
        self.every, self.saved, self.finished = every, [], 0

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int) -> None:
        self.saved.append(step)

    def finish(self) -> None:  # waits for a write in flight
        self.finished += 1


def test_early_stopping_saves_each_best_and_stops_after_patience(tmp_path, caplog):
    cfg = TrainerConfig(eval_every=10, early_stop_patience=2)
    run, ckpt = RunDir(tmp_path), SavingCheckpointer(every=100)
    watch = ValidationWatch(cfg, ckpt, run, main=True)
    for step, loss in ((10, 3.0), (20, 2.5), (30, 2.6)):
        watch.run(step, {"val/loss": loss})
    assert ckpt.saved == [10, 20] and best_step(run) == 20
    # A restart goes on from the record: one more validation without a new best stops it.
    again = ValidationWatch(cfg, ckpt, run, main=True)
    with caplog.at_level(logging.WARNING), pytest.raises(StoppedEarly, match="the best is step 20"):
        again.run(40, {"val/loss": 3.1})
    assert ckpt.finished == 1  # the best, perhaps written in the background, is whole first
    assert "validation loss 3.1000 at step 40 is above the first validation's 3.0000" in caplog.text


def test_without_patience_it_warns_and_saves_nothing(tmp_path, caplog):
    ckpt = SavingCheckpointer(every=100)
    watch = ValidationWatch(TrainerConfig(eval_every=10), ckpt, RunDir(tmp_path), main=True)
    with caplog.at_level(logging.WARNING):
        watch.run(10, {"val/loss": 2.0})
        watch.run(20, {"val/loss": 2.2})
    assert ckpt.saved == [] and "set trainer.early_stop_patience" in caplog.text
    assert not RunDir(tmp_path).best.exists()  # the run directory as without the watch


def test_a_train_split_smaller_than_a_step_is_said(caplog):
    with caplog.at_level(logging.WARNING):
        warn_if_smaller_than_a_batch(3000, 12, 4096)
        warn_if_smaller_than_a_batch(5000, 20, 4096)
    assert caplog.text.count("less than one optimizer step") == 1
    assert "holds 3000 tokens (12 pieces), less than one optimizer step's 4096" in caplog.text


def test_a_small_source_gets_the_piece_nearest_the_val_range(tmp_path):
    files = []
    for i in range(25):
        (tmp_path / f"{i}.mid").write_bytes(f"piece {i}".encode())
        files.append(SourceFile(str(tmp_path / f"{i}.mid"), f"{i}.mid", {}))
    split = SplitConfig(val=0.001, test=0.0)
    digests = [content_hash(f"piece {i}".encode()) for i in range(25)]
    assert not any(split_of(d, split) == "val" for d in digests)
    chosen = nearest_val(files, PrepareConfig(split=split))
    assert chosen == min(digests, key=lambda d: int(d[:12], 16))
    # Already one in val by its hash: nothing is moved.
    assert nearest_val(files, PrepareConfig(split=SplitConfig(val=0.5, test=0.0))) is None
