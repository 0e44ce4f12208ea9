"""Failures of a long run, injected into real trainings (DeepSpeed on CPU, real files): damaged
checkpoints, a second job on the same run directory, a restart with another config, a full
disk. Each run must survive, or refuse with one line, and lose no more than it has to."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from support.trainings import launch, losses, run, train_args


def scribble(path: Path) -> None:
    """Random bytes over the middle of a file, its size unchanged (the marker is kept)."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(os.urandom(64))


def steps_logged(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def test_damaged_checkpoints_are_moved_aside_and_the_run_finishes(bach_dataset, tmp_path):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"

    def train(max_steps: int) -> str:
        args = train_args(
            bach_dataset,
            run_dir,
            f"trainer.max_steps={max_steps}",
            "trainer.save_every=2",
            "trainer.keep_last=3",
            "deepspeed.zero_stage=2",
            "logger.mode=disabled",
        )
        code, out = run(args)
        assert code == 0, out[-4000:]
        assert not (run_dir / "LOCK").exists()  # released at the end
        return out

    # A lock left by a job on another host whose heartbeat stopped long ago.
    run_dir.mkdir()
    (run_dir / "LOCK").write_text(json.dumps({"host": "node9", "pid": 1, "slurm_job_id": "5"}))
    os.utime(run_dir / "LOCK", (time.time() - 3600, time.time() - 3600))
    out = train(4)
    assert "taking over the lock" in out and "node9" in out
    state = torch.load(ckpts / "step_00000004" / "trainer_state_rank1.pt", weights_only=True)
    assert set(state) == {"data", "rng"}

    scribble(ckpts / "step_00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    out = train(6)
    assert "resumed from" in out and "step_00000002 at step 2 (skipped step_00000004: " in out
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt has CRC-32" in out
    assert (ckpts / "step_00000004.damaged").is_dir()
    assert steps_logged(run_dir) == [1, 2, 3, 4, 5, 6]  # the rows after step 2 were dropped

    scribble(ckpts / "step_00000006" / "mp_rank_00_model_states.pt")
    out = train(6)
    assert "step_00000004 at step 4 (skipped step_00000006: mp_rank_00_model_states.pt" in out
    assert (ckpts / "step_00000006.damaged").is_dir()

    # That restart was also a requeue after the first damage: only the newly damaged one was
    # moved aside, step_00000004.damaged was left alone, and each step is logged once.
    assert out.count("is damaged (") == 1
    assert steps_logged(run_dir) == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in ckpts.glob("step_*")) == [
        "step_00000002",
        "step_00000004",
        "step_00000004.damaged",
        "step_00000006",
        "step_00000006.damaged",
    ]


def test_a_second_job_and_a_changed_config_are_refused_with_nothing_changed(bach_dataset, tmp_path):
    run_dir = tmp_path / "run"
    args = train_args(
        bach_dataset,
        run_dir,
        "trainer.save_every=1000",
        "deepspeed.zero_stage=0",
        "logger.mode=disabled",
    )
    first = launch([*args, "trainer.max_steps=500"], ranks=1)
    deadline = time.monotonic() + 180
    while not (run_dir / "metrics.jsonl").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()[-3000:]
        time.sleep(0.2)
    second = launch([*args, "trainer.max_steps=500"], ranks=1)
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 2, out[-3000:]
    assert f"is in use by host {os.uname().nodename} pid {first.pid} (Slurm job None)" in out
    first.send_signal(signal.SIGUSR1)  # preempted: it checkpoints, exits 75, releases the lock
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 75, out[-3000:]
    assert not (run_dir / "LOCK").exists()

    kept = [run_dir / "model_config.json", *sorted((run_dir / "tokenizer").iterdir())]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in kept}
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    code, out = run([*args, "trainer.max_steps=500", "model.n_layer=1"], ranks=1)
    assert code == 2 and "model.n_layer: run 2, now 1" in out, out[-3000:]
    assert "init_from=" in out and "init_distributed" not in out
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in kept} == before
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics
    assert not (run_dir / "LOCK").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of its own (resized by the test), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def resize(mount: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)


def test_a_full_disk_ends_the_save_with_one_line_and_a_restart_resumes(bach_dataset, small_disk):
    run_dir = small_disk / "run"
    args = train_args(
        bach_dataset,
        run_dir,
        "trainer.save_every=2",
        "trainer.keep_last=2",
        "deepspeed.zero_stage=0",
        "logger.mode=disabled",
    )
    code, out = run([*args, "trainer.max_steps=2"], ranks=1)
    assert code == 0, out[-3000:]
    ckpt_size = sum(p.stat().st_size for p in (run_dir / "checkpoints" / "step_00000002").iterdir())
    used = os.statvfs(small_disk).f_blocks - os.statvfs(small_disk).f_bfree
    # Room for one more checkpoint and a half: step 4 fits, step 6 (two kept) does not.
    resize(small_disk, used * os.statvfs(small_disk).f_frsize + ckpt_size * 3 // 2)

    code, out = run([*args, "trainer.max_steps=8"], ranks=1)
    assert code == 2, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out[-3000:]
    assert "no space left on the device writing" in errors[0] and "step_00000006" in errors[0]
    assert "the last complete checkpoint step_00000004 takes" in errors[0]
    assert "Traceback" not in out and "Logging error" not in out
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert names == ["step_00000002", "step_00000004"]
    assert not (run_dir / "LOCK").exists()

    resize(small_disk, 64 << 20)  # space freed
    code, out = run([*args, "trainer.max_steps=8"], ranks=1)
    assert code == 0, out[-3000:]
    assert "step_00000004 at step 4" in out
    assert sorted(losses(run_dir)) == list(range(1, 9))
    assert steps_logged(run_dir) == list(range(1, 9))
