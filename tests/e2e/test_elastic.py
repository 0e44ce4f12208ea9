"""Resuming on another number of ranks for real: the loader over real shards repeats and skips
no piece, and real ZeRO-3 runs resumed 2 -> 1 -> 2 and 2 -> 4 load weights and Adam moments
equal, bit for bit, to what the old ranks saved."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from support.apps import REPO
from support.trainings import losses, run, train_args

from data_pipeline.reader import ShardReader
from mtrain.data.loader import DataConfig, StreamingData, TrainStream
from mtrain.runs.run_dir import CheckpointDir, RunDir
from mtrain.training.resume import convert_to_universal


def read_pieces(data: StreamingData, monkeypatch, batches: int | None = None) -> list:
    """(epoch, piece key) of each piece the loader packs while it gives ``batches`` batches
    (None: until its stream is in epoch 1; no workers, so the stream is ``data.train``)."""
    seen = []
    document = TrainStream._document

    def record(self, piece):
        seen.append((self.epoch, piece.key))
        return document(self, piece)

    monkeypatch.setattr(TrainStream, "_document", record)
    loader = data.train_batches()
    for _ in range(batches) if batches is not None else iter(lambda: data.train.epoch, 1):
        next(loader)
    monkeypatch.setattr(TrainStream, "_document", document)
    return seen


@pytest.mark.parametrize(("old", "new"), [(2, 1), (2, 3)])
def test_the_loader_resumed_resharded_repeats_and_skips_no_piece(
    bach_dataset, monkeypatch, old, new
):
    cfg = DataConfig(path=str(bach_dataset), num_workers=0, shuffle_buffer=4, transpose_range=0)
    before, states = [], []
    for rank in range(old):
        data = StreamingData(cfg, 64, 2, rank, old)
        before += read_pieces(data, monkeypatch, batches=7 + 3 * rank)
        states.append(data.state_dict())
    assert {epoch for epoch, _ in before} == {0}
    before = [key for _, key in before]
    after = []
    for rank in range(new):
        data = StreamingData(cfg, 64, 2, rank, new)
        assert str(data.resume_resharded(states)) == f"{len(before)} pieces of epoch 0"
        after += [key for epoch, key in read_pieces(data, monkeypatch) if epoch == 0]
    everything = [p.key for p in ShardReader().pieces(data.train.shards)]
    assert sorted(before + after) == sorted(everything)  # none read twice, none skipped


def elastic_args(dataset: Path, run_dir: Path, *extra: str) -> list[str]:
    """``train_args`` with micro batches of 2: 1024 tokens a step on 1, 2 or 4 ranks."""
    args = [a for a in train_args(dataset, run_dir) if not a.startswith("trainer.micro")]
    return [*args, "trainer.micro_batch_size=2", *extra]


def train(args: list[str], ranks: int) -> str:
    code, out = run(args, ranks, torchrun=True)  # --standalone: a free port, even for 1 rank
    assert code == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def two_ranks(bach_dataset, tmp_path_factory) -> Path:
    """8 steps on 2 ranks under ZeRO-3, saved at 4 and 8: the run resumed elsewhere from step
    4, and the reference its schedule and losses are compared with."""
    run_dir = tmp_path_factory.mktemp("elastic") / "two"
    train(elastic_args(bach_dataset, run_dir, "trainer.max_steps=8", "trainer.save_every=4"), 2)
    return run_dir


def resume_on(ranks: int, source: Path, step: int, run_dir: Path, dataset: Path) -> str:
    """Resumes ``source``'s checkpoint of ``step`` on ``ranks`` ranks and trains to step 8 (the
    schedule's end, as in ``two_ranks``), saving every 2; the state it loaded is saved at once
    in ``<run_dir>.loaded``. Returns the log."""
    shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns("universal"))
    for ckpt in RunDir(run_dir).checkpoint_dirs():
        if ckpt.path.name > f"step_{step:08d}":
            shutil.rmtree(ckpt.path)
    args = elastic_args(dataset, run_dir, "trainer.max_steps=8", "trainer.save_every=2")
    helper = [str(REPO / "tests" / "support" / "elastic_resave.py"), f"{run_dir}.loaded", *args[2:]]
    return train(helper, ranks)


def universal_files(ckpt: CheckpointDir) -> dict[str, object]:
    """Every parameter's fp32 weights and Adam moments (and step) as the universal layout
    holds them, whatever the number of ranks that saved them."""
    assert convert_to_universal(ckpt, ckpt.universal) is None
    root = ckpt.universal / "zero"
    # optimizer_state.pt is rank 0's optimizer state as saved: its partition, not comparable.
    files = {
        p.relative_to(root).as_posix(): torch.load(p, weights_only=False)
        for p in root.rglob("*.pt")
        if p.name != "optimizer_state.pt"
    }
    shutil.rmtree(ckpt.universal.parent)
    return files


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def assert_loaded_exactly(saved: CheckpointDir, loaded: CheckpointDir) -> None:
    want, got = universal_files(saved), universal_files(loaded)
    assert sorted(want) == sorted(got)
    assert {Path(name).name for name in want} >= {"fp32.pt", "exp_avg.pt", "exp_avg_sq.pt"}
    assert [name for name in want if not same(want[name], got[name])] == []  # bit for bit
    probes = [torch.load(c.probe)["logits"] for c in (saved, loaded)]
    assert torch.equal(*probes)


def assert_continues(reference: Path, run_dir: Path, steps: range) -> None:
    """The schedule goes on exactly; the loss goes on from where it was (other ranks read
    other pieces at each step, so it is close, not equal)."""
    want, got = rows(reference), rows(run_dir)
    for step in steps:
        assert got[step]["train/lr"] == want[step]["train/lr"]
        assert abs(got[step]["train/loss"] - want[step]["train/loss"]) < 0.3
    assert got[steps[-1]]["train/loss"] < want[1]["train/loss"] - 0.3


def rows(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {row["step"]: row for row in map(json.loads, lines)}


def test_zero3_resumes_from_2_ranks_on_1_and_back_on_2(two_ranks, bach_dataset, tmp_path):
    one = tmp_path / "one"
    log = resume_on(1, two_ranks, 4, one, bach_dataset)
    said = re.search(
        r"resumed from \S+step_00000004 at step 4, written by 2 rank\(s\), now 1: "
        r"converted ZeRO-3 state .* data position: (\d+) pieces of epoch 0",
        log,
    )
    assert said and int(said[1]) > 0, log[-3000:]
    assert_loaded_exactly(RunDir(two_ranks).checkpoint(4), RunDir(f"{one}.loaded").checkpoint(4))
    assert_continues(two_ranks, one, range(5, 9))
    assert sorted(losses(one)) == list(range(1, 9))

    two = tmp_path / "two"
    log = resume_on(2, one, 6, two, bach_dataset)
    assert "written by 1 rank(s), now 2" in log
    assert_loaded_exactly(RunDir(one).checkpoint(6), RunDir(f"{two}.loaded").checkpoint(6))
    assert_continues(two_ranks, two, range(7, 9))


def test_zero3_resumes_from_2_ranks_on_4(two_ranks, bach_dataset, tmp_path):
    four = tmp_path / "four"
    log = resume_on(4, two_ranks, 4, four, bach_dataset)
    assert "written by 2 rank(s), now 4" in log
    assert_loaded_exactly(RunDir(two_ranks).checkpoint(4), RunDir(f"{four}.loaded").checkpoint(4))
    assert_continues(two_ranks, four, range(5, 9))
