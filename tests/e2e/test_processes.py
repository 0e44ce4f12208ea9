"""Processes of a job die together, and a rank that stops answering is named.

Real launches (torchrun, DeepSpeed on CPU, gloo); every process is found by PID from the
launcher's tree and only those PIDs are signalled.
"""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from support.apps import REPO
from support.trainings import kill_tree, launch, losses, train_args

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
    assert alive([child]), "the child ended before its parent did"
    parent.kill()
    parent.wait()
    wait_gone([child], within=5)
