"""Heartbeats without processes: a stale, gone or lagging rank is named, a stalled rank logs
its suspects once, and only collective errors are renamed for the rank that stopped answering."""

import json
import os
import socket
import time

import pytest

from mtrain.distributed import heartbeats


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


def test_no_stall_is_reported_while_a_rank_waits_on_purpose(tmp_path, caplog, monkeypatch):
    beat = heartbeats.Heartbeat(tmp_path, 0, interval_s=0.05, world_size=1, stall_after_s=0.3)
    monkeypatch.setattr(heartbeats, "_current", beat)  # this process's heartbeat
    beat.step(2)
    with heartbeats.no_stall_while():
        before = heartbeats.heartbeat_path(tmp_path, 0).read_text()
        time.sleep(0.6)
        assert heartbeats.heartbeat_path(tmp_path, 0).read_text() != before  # still beating
    time.sleep(0.1)  # the clock started again at the end of the wait
    stalls = [r for r in caplog.records if "no forward for" in r.getMessage()]
    assert stalls == []
    time.sleep(0.5)
    beat.stop()
    stalls = [r for r in caplog.records if "no forward for" in r.getMessage()]
    assert len(stalls) == 1  # and a stall after it is reported as before
