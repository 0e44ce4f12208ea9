"""A checkpoint's integrity and a run directory's owner, with real files and no process group:
checksums in the marker, verification and moving aside, resume checks, the metrics rewrite,
the trainer state as plain data, and the run lock."""

import json
import logging
import os
import random
import re
import socket
import time
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from support.scripted_engine import ScriptedEngine, micro_batches

from data_pipeline.errors import InputError
from mtrain.distributed import collectives
from mtrain.exported.writing import resolve_checkpoint
from mtrain.runs.checkpoint_files import checksums, damage, latest_intact
from mtrain.runs.lock import RunLock
from mtrain.runs.run_dir import CheckpointDir, RunDir
from mtrain.training.monitor import StepTimer
from mtrain.training.resume import check_resumable, load_trainer_state
from mtrain.training.rng_state import cuda_state_for, rng_state, set_rng_state
from mtrain.training.step_components import drop_metrics_after
from mtrain.training.trainer import NonFiniteLoss, OptimizerStep, say_log_file_failures_once

MODEL = {"n_layer": 2, "d_model": 64, "vocab_size": 300}


def save_checkpoint(run: RunDir, step: int, ranks: int = 2, with_sums: bool = True):
    """A checkpoint as the trainer lays it out: files of random bytes, then the marker."""
    ckpt = run.checkpoint(step)
    (ckpt.path / "sub").mkdir(parents=True)
    (ckpt.path / "mp_rank_00_model_states.pt").write_bytes(os.urandom(5000))
    (ckpt.path / "sub" / "nested.bin").write_bytes(os.urandom(100))
    for rank in range(ranks):
        (ckpt.path / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(
            os.urandom(3000)
        )
        ckpt.trainer_state(rank).write_bytes(os.urandom(200))
    marker = {"step": step, "time": time.time()}
    if with_sums:
        marker["files"] = checksums(ckpt)
    ckpt.marker.write_text(json.dumps(marker))
    return ckpt


def scribble(path, at: int = 100) -> None:
    """Random bytes over part of a file, its size unchanged."""
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(os.urandom(32))


def test_marker_records_size_and_crc32_of_every_file(tmp_path):
    ckpt = save_checkpoint(RunDir(tmp_path), 10)
    files = json.loads(ckpt.marker.read_text())["files"]
    assert sorted(files) == sorted(
        [
            "mp_rank_00_model_states.pt",
            "sub/nested.bin",
            "trainer_state_rank0.pt",
            "trainer_state_rank1.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        ]
    )
    model = (ckpt.path / "mp_rank_00_model_states.pt").read_bytes()
    assert files["mp_rank_00_model_states.pt"] == {
        "size": len(model),
        "crc32": f"{zlib.crc32(model):08x}",
    }
    assert damage(ckpt) == []


def test_damage_names_the_file_and_how(tmp_path):
    run = RunDir(tmp_path)
    ckpt = save_checkpoint(run, 10)
    scribble(ckpt.path / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    (ckpt.path / "sub" / "nested.bin").write_bytes(b"short")
    ckpt.trainer_state(0).unlink()
    (ckpt.path / "export").mkdir()  # an export made later is not part of the checkpoint
    problems = damage(ckpt)
    assert len(problems) == 3
    assert "sub/nested.bin has 5 bytes, the marker says 100" in problems
    assert "trainer_state_rank0.pt is missing" in problems
    scribbled = "zero_pp_rank_1_mp_rank_00_optim_states.pt has CRC-32"
    assert any(p.startswith(scribbled) for p in problems)
    old = save_checkpoint(run, 20, with_sums=False)
    assert damage(old) is None


def test_a_damaged_checkpoint_is_moved_aside_and_the_one_before_used(tmp_path, caplog):
    run = RunDir(tmp_path)
    save_checkpoint(run, 10)
    newest = save_checkpoint(run, 20)
    scribble(newest.path / "mp_rank_00_model_states.pt")
    found, skipped = latest_intact(run, move_aside=True)
    assert found.path.name == "step_00000010"
    assert len(skipped) == 1 and skipped[0].startswith("step_00000020: mp_rank_00_model_states.pt")
    assert not newest.path.exists() and (run.checkpoints / "step_00000020.damaged").is_dir()
    assert [c.path.name for c in run.checkpoint_dirs()] == ["step_00000010"]
    # The same step damaged again (after the run saved it anew) gets its own name.
    again = save_checkpoint(run, 20)
    again.trainer_state(1).unlink()
    assert latest_intact(run, move_aside=True)[0].path.name == "step_00000010"
    assert (run.checkpoints / "step_00000020.damaged2").is_dir()
    assert "moved aside" in caplog.text


def test_every_rank_checks_the_checkpoints_rank_0_listed(tmp_path, monkeypatch):
    """A rank's own listing of a shared file system may be stale: rank 1 sees step 20 complete,
    rank 0 does not (yet), and both must resume from the same checkpoint."""
    run = RunDir(tmp_path)
    save_checkpoint(run, 10)
    save_checkpoint(run, 20)
    asked = []

    def rank_0_says(obj):
        asked.append(obj)
        return ["step_00000010"]

    monkeypatch.setattr(collectives, "group_rank", lambda: 1)
    monkeypatch.setattr(collectives, "from_rank_0", rank_0_says)
    found, skipped = latest_intact(run, move_aside=True)
    assert found.path == run.checkpoint(10).path and skipped == []
    assert asked == [None]  # rank 1 listed nothing itself
    monkeypatch.undo()
    assert latest_intact(run, move_aside=True)[0].path == run.checkpoint(20).path  # one rank


def test_export_falls_back_from_a_run_dir_but_refuses_a_damaged_step_dir(tmp_path):
    run = RunDir(tmp_path)
    save_checkpoint(run, 10)
    newest = save_checkpoint(run, 20)
    scribble(newest.path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert resolve_checkpoint(tmp_path).path.name == "step_00000010"
    assert newest.path.exists()  # export only reads
    with pytest.raises(InputError, match=re.escape("zero_pp_rank_0_mp_rank_00_optim_states.pt")):
        resolve_checkpoint(newest.path)


def test_an_old_marker_without_checksums_is_loaded_unverified(tmp_path, caplog):
    run = RunDir(tmp_path)
    save_checkpoint(run, 10, with_sums=False)
    caplog.set_level("INFO")
    found, skipped = latest_intact(run, move_aside=True)
    assert found.path.name == "step_00000010" and skipped == []
    assert "no checksums" in caplog.text


def run_with_checkpoint(tmp_path, ranks: int = 2) -> RunDir:
    run = RunDir(tmp_path / "run")
    save_checkpoint(run, 10, ranks=ranks)
    run.model_config.write_text(json.dumps(MODEL))
    run.tokenizer.mkdir()
    (run.tokenizer / "artifact.json").write_text(json.dumps({"hash": "a" * 64}))
    return run


def snapshot(root) -> dict:
    return {p: p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def test_check_resumable_fresh_matching_and_another_number_of_ranks(tmp_path):
    assert check_resumable(RunDir(tmp_path / "new"), MODEL, "a" * 64) is False
    run = run_with_checkpoint(tmp_path)
    assert check_resumable(run, MODEL, "a" * 64) is True
    # Saved by 2 ranks, resumed by any number: the state is converted at load (test_elastic).
    assert check_resumable(run_with_checkpoint(tmp_path / "one", ranks=1), MODEL, "a" * 64)


@pytest.mark.parametrize(
    ("model", "tokenizer", "message"),
    [
        ({**MODEL, "n_layer": 4}, "a" * 64, "model.n_layer: run 2, now 4"),
        (MODEL, "b" * 64, "tokenizer: run aaaaaaaaaaaa, this dataset's bbbbbbbbbbbb"),
    ],
)
def test_check_resumable_refuses_another_shape_or_tokenizer(tmp_path, model, tokenizer, message):
    run = run_with_checkpoint(tmp_path)
    before = snapshot(run.root)
    with pytest.raises(InputError, match=re.escape(message)) as refused:
        check_resumable(run, model, tokenizer)
    assert "run_dir=" in str(refused.value) and "init_from=" in str(refused.value)
    assert snapshot(run.root) == before


def test_metrics_after_the_resumed_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in range(1, 8)]
    path.write_text("".join(rows) + '{"step": 8, "train/lo')  # cut short by a crash
    drop_metrics_after(path, 5)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    drop_metrics_after(path, 0)
    assert path.read_text() == ""


def test_trainer_state_loads_as_plain_data_and_restores_every_rng(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    torch.save({"data": {"epoch": 1}, "rng": rng_state()}, tmp_path / "state.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    set_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_the_cuda_rng_state_restored_is_this_devices():
    """One device's state is saved; an older checkpoint's list of every visible device's gives
    this device's entry, or the first once fewer devices are visible (a per-task binding)."""
    states = [torch.full((8,), i, dtype=torch.uint8) for i in range(4)]
    assert cuda_state_for(states[2], 0) is states[2]
    assert cuda_state_for(states, 3) is states[3]
    assert cuda_state_for(states[:1], 3) is states[0]
    assert "cuda" not in rng_state() or torch.cuda.is_available()  # the CPU's layout as before


def test_a_trainer_state_of_older_mtrain_still_loads(tmp_path):
    """Saved before RNG states were plain lists: numpy's types are allow-listed, no more."""
    old = {"python": random.getstate(), "numpy": np.random.get_state()}
    torch.save({"rng": {**old, "torch": torch.get_rng_state()}}, tmp_path / "old.pt")
    expected = np.random.rand()
    set_rng_state(load_trainer_state(tmp_path / "old.pt")["rng"])
    assert np.random.rand() == expected
    torch.save({"x": SimpleNamespace(a=1)}, tmp_path / "other.pt")
    with pytest.raises(Exception, match="Unsupported global"):
        load_trainer_state(tmp_path / "other.pt")


@pytest.mark.parametrize(("step", "suspect"), [(43, True), (60, False)])
def test_non_finite_loss_soon_after_a_resume_names_the_checkpoint(step, suspect):
    stepper = OptimizerStep(
        ScriptedEngine([float("nan")] * 2, grad_accum=1), "cpu", 1, 2, clips_own=False
    )
    stepper.resumed_from = ("runs/x/checkpoints/step_00000040", 40)
    stepper(micro_batches(), step - 1, StepTimer())
    with pytest.raises(NonFiniteLoss) as stop:
        stepper(micro_batches(), step, StepTimer())
    named = "3 step(s) after resuming from runs/x/checkpoints/step_00000040" in str(stop.value)
    assert named is suspect
    assert "fp16" in str(stop.value)


# ---- the run lock ------------------------------------------------------------------------------
def write_lock(path, age_s: float, **holder) -> None:
    path.write_text(json.dumps({"host": "elsewhere", "pid": 4242, "slurm_job_id": None, **holder}))
    then = time.time() - age_s
    os.utime(path, (then, then))


def test_the_lock_names_its_holder_and_a_second_run_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    first = RunLock(tmp_path / "LOCK", stale_s=300)
    assert first.acquire() is None
    held = json.loads((tmp_path / "LOCK").read_text())
    assert held["host"] == socket.gethostname() and held["pid"] == os.getpid()
    assert held["slurm_job_id"] == "77" and held["started"] <= time.time()
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    refusal = RunLock(tmp_path / "LOCK", stale_s=300).acquire()
    assert f"in use by host {socket.gethostname()} pid {os.getpid()} (Slurm job 77)" in refusal
    assert "heartbeat 0 s ago" in refusal
    first.release()
    assert not (tmp_path / "LOCK").exists()


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path):
    lock = RunLock(tmp_path / "LOCK", stale_s=1)  # a beat every 0.5 s
    assert lock.acquire() is None
    os.utime(tmp_path / "LOCK", (time.time() - 100, time.time() - 100))
    time.sleep(0.7)
    assert lock.holder()["age_s"] < 1
    lock.release()


@pytest.mark.parametrize(
    ("age_s", "holder", "why"),
    [
        (400, {}, "heartbeat is older than trainer.lock_stale_s=300"),
        (5, {"slurm_job_id": "77"}, "our own Slurm job 77 (a requeue)"),
        (5, {"host": socket.gethostname(), "pid": 2**22 + 12345}, "its process is gone"),
    ],
)
def test_a_stale_lock_is_taken_over(tmp_path, monkeypatch, caplog, age_s, holder, why):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    write_lock(tmp_path / "LOCK", age_s, **holder)
    lock = RunLock(tmp_path / "LOCK", stale_s=300)
    assert lock.acquire() is None
    assert why in caplog.text
    assert json.loads((tmp_path / "LOCK").read_text())["token"] == lock.token
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LOCK"]
    lock.release()


def test_a_live_lock_of_another_job_is_kept_and_release_leaves_it(tmp_path):
    write_lock(tmp_path / "LOCK", 5, slurm_job_id="12")
    lock = RunLock(tmp_path / "LOCK", stale_s=300)
    assert "host elsewhere pid 4242 (Slurm job 12), heartbeat 5 s ago" in lock.acquire()
    lock.release()
    assert json.loads((tmp_path / "LOCK").read_text())["pid"] == 4242


def test_checkpoint_dir_knows_where_it_is_moved_aside(tmp_path):
    ckpt = CheckpointDir(tmp_path / "checkpoints" / "step_00000040")
    assert ckpt.damaged.name == "step_00000040.damaged"


def test_a_log_file_on_a_full_disk_is_said_once_and_dropped(capsys):
    """/dev/full fails every write with ENOSPC, as a full disk does."""
    root = logging.getLogger()
    handler = logging.FileHandler("/dev/full")
    root.addHandler(handler)
    try:
        say_log_file_failures_once()
        for n in range(3):
            root.warning("line %d", n)
    finally:
        root.removeHandler(handler)
    err = capsys.readouterr().err
    assert err.count("cannot write the log file /dev/full") == 1, err
    assert "Traceback" not in err and handler not in root.handlers
