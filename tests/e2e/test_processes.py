"""Processes of a job die together, and a rank that stops answering is named.

Real launches (torchrun, DeepSpeed on CPU, gloo); every process is found by PID from the
launcher's tree and only those PIDs are signalled.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, kill_tree, launch, losses, train_args

from mtrain.distributed import heartbeats

LONG = ("trainer.max_steps=100000", "trainer.save_every=100000", "data.num_workers=2")


def wait_training(proc, run_dir: Path, steps: int = 2, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (run_dir / "metrics.jsonl").exists() or max(losses(run_dir), default=0) < steps:
        if proc.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(psutil.Error):
                kill_tree(proc)
            raise AssertionError(proc.communicate()[0][-5000:])
        time.sleep(0.1)


def is_fork_server(p: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return "forkserver" in " ".join(p.cmdline())
    return False


def family(pid: int) -> dict[str, list[psutil.Process]]:
    """A launcher's tree: its ranks, their fork servers and the loader workers (the servers'
    children)."""
    launcher = psutil.Process(pid)
    ranks = [p for p in launcher.children() if "mtrain.train" in " ".join(p.cmdline())]
    servers = [c for r in ranks for c in r.children() if is_fork_server(c)]
    workers = [w for s in servers for w in s.children()]
    return {"launcher": [launcher], "ranks": ranks, "servers": servers, "workers": workers}


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def wait_gone(procs: list[psutil.Process], within: float) -> float:
    start = time.monotonic()
    while alive(procs) and time.monotonic() - start < within:
        time.sleep(0.05)
    left = alive(procs)
    assert not left, [(p.pid, " ".join(p.cmdline())[:80]) for p in left]
    return time.monotonic() - start


def reap(proc, procs: list[psutil.Process]) -> None:
    """Whatever of the job is still there: SIGCONT (a stopped rank) and SIGKILL, by PID."""
    for p in alive(procs):
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGCONT)
            p.kill()
    with contextlib.suppress(psutil.Error):
        kill_tree(proc)
    with contextlib.suppress(Exception):
        proc.communicate(timeout=30)


@pytest.mark.slow
def test_killed_rank_takes_its_fork_server_and_workers(bach_dataset, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(train_args(bach_dataset, run_dir, *LONG), ranks=1, torchrun=True)
    procs: list[psutil.Process] = []
    try:
        wait_training(proc, run_dir)
        (rank,) = family(proc.pid)["ranks"]
        servers = [c for c in rank.children() if is_fork_server(c)]
        workers = [w for s in servers for w in s.children()]
        assert len(servers) == 1 and len(workers) == 2, (servers, workers)
        procs = [rank, *servers, *workers]
        rank.kill()  # kill -9 of the rank, nothing else
        took = wait_gone(servers + workers, within=5)
        print(f"fork server and {len(workers)} workers gone {took:.2f} s after kill -9")
    finally:
        reap(proc, procs)


@pytest.mark.slow
def test_killed_launcher_takes_its_ranks_and_everything_below(bach_dataset, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(train_args(bach_dataset, run_dir, *LONG, "data.num_workers=1"), ranks=2)
    procs: list[psutil.Process] = []
    try:
        wait_training(proc, run_dir)
        tree = family(proc.pid)
        assert len(tree["ranks"]) == 2 and len(tree["workers"]) == 2, tree
        procs = [p for group in tree.values() for p in group]
        os.kill(proc.pid, signal.SIGKILL)  # torchrun's own process only
        took = wait_gone(procs, within=8)
        print(f"ranks, fork servers and workers gone {took:.2f} s after torchrun's kill -9")
    finally:
        reap(proc, procs)


@pytest.mark.slow
def test_stopped_rank_is_named_by_the_survivor(bach_dataset, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(
        train_args(bach_dataset, run_dir, *LONG, "data.num_workers=0", "deepspeed.timeout_s=20"),
        ranks=2,
    )
    procs: list[psutil.Process] = []
    try:
        wait_training(proc, run_dir, steps=3)
        tree = family(proc.pid)
        procs = [p for group in tree.values() for p in group]
        stopped = next(r for r in tree["ranks"] if "RANK=1" in _env_line(r))
        stopped.send_signal(signal.SIGSTOP)
        start = time.monotonic()
        out = _read_until(proc, "stopped answering", timeout=60)
        print(f"survivor named the stopped rank {time.monotonic() - start:.1f} s after SIGSTOP")
        print(out[out.find("a collective failed") - 80 :][:1200])
        assert "a collective failed on rank 0: rank 1 stopped answering" in out, out[-3000:]
        assert f"rank 1 (pid {stopped.pid}" in out and "process stopped" in out, out[-3000:]
        # Before the timeout (90% of it) the heartbeat thread already named it in the log.
        assert "rank 0: no forward for 1" in out and "suspected: rank 1" in out, out[-3000:]
    finally:
        reap(proc, procs)


def _env_line(p: psutil.Process) -> str:
    return " ".join(f"{k}={v}" for k, v in p.environ().items() if k == "RANK")


def _read_until(proc, text: str, timeout: float) -> str:
    """The launcher's output up to the first line holding ``text`` (or all of it at exit)."""
    lines: list[str] = []
    done = threading.Event()

    def pump():
        for line in proc.stdout:
            lines.append(line)
            if text in line:
                done.set()
        done.set()

    threading.Thread(target=pump, daemon=True).start()
    done.wait(timeout)
    time.sleep(0.5)  # the lines after it (the heartbeat table)
    return "".join(lines)


# ---- heartbeats without processes -----------------------------------------------------------


def test_heartbeat_names_stale_or_gone_ranks(tmp_path):
    host = socket.gethostname()
    me = heartbeats.Heartbeat(tmp_path, 0, interval_s=0.05)
    me.step(7)
    time.sleep(0.2)
    now = time.time()
    stale = {"rank": 1, "pid": os.getpid(), "host": "elsewhere", "step": 7, "time": now - 30}
    heartbeats.heartbeat_path(tmp_path, 1).write_text(json.dumps(stale))
    gone = {"rank": 2, "pid": 2**22 + 12345, "host": host, "step": 7, "time": now - 1}
    heartbeats.heartbeat_path(tmp_path, 2).write_text(json.dumps(gone))
    named, lines = heartbeats.suspects(tmp_path, 3, me=0)
    assert named == [2], lines  # a process known gone first
    heartbeats.heartbeat_path(tmp_path, 2).unlink()
    named, lines = heartbeats.suspects(tmp_path, 3, me=0)
    assert named == [1, 2] and "no heartbeat file" in lines[2], lines
    behind = {**stale, "host": host, "time": time.time(), "step": 5}
    heartbeats.heartbeat_path(tmp_path, 1).write_text(json.dumps(behind))
    named, _ = heartbeats.suspects(tmp_path, 2, me=0)
    assert named == [1]  # all fresh and alive: the rank behind in steps
    assert json.loads(heartbeats.heartbeat_path(tmp_path, 0).read_text())["step"] == 7
    me.stop()


def test_a_stalled_rank_logs_its_suspects_once(tmp_path, caplog):
    stale = {"rank": 1, "pid": 2**22 + 12345, "host": "elsewhere", "step": 3, "time": 0.0}
    heartbeats.heartbeat_path(tmp_path, 1).parent.mkdir(parents=True)
    heartbeats.heartbeat_path(tmp_path, 1).write_text(json.dumps(stale))
    beat = heartbeats.Heartbeat(tmp_path, 0, interval_s=0.05, world_size=2, stall_after_s=0.3)
    beat.step(4)
    time.sleep(0.8)
    beat.stop()
    stalls = [r.getMessage() for r in caplog.records if "no forward for" in r.getMessage()]
    assert len(stalls) == 1 and "suspected: rank 1" in stalls[0], stalls


def test_only_collective_errors_are_renamed(tmp_path, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    heartbeats.Heartbeat(tmp_path, 0).stop()
    not_collective = RuntimeError("1 micro batches gave a non-finite loss")
    heartbeats.raise_naming_suspects(not_collective, tmp_path)
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [::1]:1")
    with pytest.raises(heartbeats.RankStoppedAnswering, match="rank 1 stopped answering") as info:
        heartbeats.raise_naming_suspects(gloo, tmp_path)
    assert info.value.__cause__ is gloo and "no heartbeat file" in str(info.value)


def test_die_with_parent_is_available_here():
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    code = (
        "import os, time, subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'from mtrain.distributed import processes; "
        "processes.die_with_parent(); import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    child = psutil.Process(int(parent.stdout.readline()))
    time.sleep(1.0)  # the child has set its parent-death signal
    parent.kill()
    parent.wait()
    wait_gone([child], within=5)
