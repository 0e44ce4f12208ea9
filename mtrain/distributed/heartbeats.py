"""Per-rank heartbeats, and the rank they name when a collective fails: stopped, gone or
killed for memory."""

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from mtrain.distributed.host_memory import (
    MemoryCgroup,
    memory_available,
    memory_cgroup,
    oom_kills,
)
from mtrain.distributed.processes import process_state
from mtrain.runs.run_dir import RunDir

log = logging.getLogger(__name__)

BEAT_EVERY_S = 1.0
# A heartbeat older than this is a rank that stopped answering (a healthy one beats every
# BEAT_EVERY_S even while it waits inside a collective).
STALE_AFTER_S = 5.0

# A dead rank whose last beat saw less memory left on the machine than this share of its own
# size: a kill for memory where the kernel's counters cannot be read (a rank grows by a
# gradient bucket or a gathered block within one beat).
LOW_MEMORY_SHARE = 0.25


def heartbeat_path(run_root: Path, rank: int) -> Path:
    return RunDir(run_root).heartbeat(rank)


class Heartbeat:
    """This rank's heartbeat file, rewritten every ``BEAT_EVERY_S`` by a daemon thread;
    ``step(n)`` records the step reached at each forward (cheap: two attribute stores).

    When a collective times out or a peer's socket closes, every surviving rank only learns that
    *something* failed (gloo: "Timed out waiting ... for recv", "Connection reset by peer";
    NCCL: a watchdog timeout). To name the culprit, each rank keeps ``<run>/heartbeat/rank<r>``
    fresh: its pid, host, last step and the time of the beat. A thread, not the training loop,
    beats, because a rank blocked in a collective waiting for a peer is healthy and must keep
    beating, while a frozen (SIGSTOP, swapped out, stuck holding the GIL), killed or OOM-killed
    rank stops.

    ``stall_after_s``: when no forward has run for that long (a collective stuck longer than
    most of its timeout), the thread logs the suspects once. NCCL's watchdog ends a process
    without a Python exception at the timeout, so this line is what names the culprit there."""

    def __init__(
        self,
        run_root: Path,
        rank: int,
        interval_s: float = BEAT_EVERY_S,
        world_size: int = 1,
        stall_after_s: float | None = None,
    ):
        self.path, self.rank, self.interval_s = heartbeat_path(run_root, rank), rank, interval_s
        self.run_root, self.world_size = Path(run_root), world_size
        self.stall_after_s = stall_after_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.last_step = 0
        self.last_forward = time.monotonic()
        self.stall_reported = False
        # Waiting on purpose outside any collective (``no_stall_while``): no stall to report.
        self.stall_check_off = False
        self.process = psutil.Process()
        self.cgroup = memory_cgroup()
        self._stop = threading.Event()
        self.beat()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-rank{rank}", daemon=True)
        self._thread.start()

    def step(self, step: int) -> None:
        self.last_step, self.last_forward = step, time.monotonic()
        self.stall_reported = False

    def beat(self) -> None:
        record = {
            "rank": self.rank,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "step": self.last_step,
            "time": time.time(),
            # What an OOM kill leaves behind: this rank's size and what the machine had left.
            "rss": self.process.memory_info().rss,
            "available": memory_available(),
        }
        if self.cgroup is not None:  # the kernel's own verdict, read by a survivor
            record |= {
                "cgroup": str(self.cgroup.path),
                "cgroup_version": self.cgroup.version,
                "limit": self.cgroup.limit,
                "cgroup_oom_kills": self.cgroup.oom_kills,
            }
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(self.path)  # a reader never sees half a record

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(OSError):  # a full or vanished disk must not kill training
                self.beat()
            self._check_stall()

    def _check_stall(self) -> None:
        idle = time.monotonic() - self.last_forward
        if self.stall_after_s is None or self.stall_reported or self.stall_check_off:
            return
        if idle < self.stall_after_s:
            return
        self.stall_reported = True
        with contextlib.suppress(Exception):
            named, lines = suspects(self.run_root, self.world_size, self.rank)
            log.error(
                "rank %d: no forward for %.0f s (step %d); suspected: %s\n  %s",
                self.rank,
                idle,
                self.last_step,
                ", ".join(f"rank {r}" for r in named) or "none",
                "\n  ".join(lines),
            )

    def stop(self) -> None:
        self._stop.set()


_current: Heartbeat | None = None
_oom_kills_at_start: int | None = None


def start(
    run_root: Path, rank: int, world_size: int = 1, stall_after_s: float | None = None
) -> Heartbeat:
    """Starts (once per process) this rank's heartbeat; ``record_step`` then records steps."""
    global _current, _oom_kills_at_start
    _oom_kills_at_start = oom_kills()
    if _current is None or _current.path != heartbeat_path(run_root, rank):
        if _current is not None:
            _current.stop()
        _current = Heartbeat(run_root, rank, world_size=world_size, stall_after_s=stall_after_s)
    return _current


def record_step(step: int) -> None:
    if _current is not None:
        _current.step(step)


@contextlib.contextmanager
def no_stall_while() -> Iterator[None]:
    """Work of this rank outside any collective that may outlast the stall limit (a
    checkpoint's conversion, waiting for it): no stall is reported meanwhile, and the clock
    starts again after it. The heartbeat keeps beating."""
    beat = _current
    if beat is None:
        yield
        return
    beat.stall_check_off = True
    try:
        yield
    finally:
        beat.stall_check_off = False
        beat.step(beat.last_step)


def read_heartbeats(run_root: Path, world_size: int) -> dict[int, dict | None]:
    """Each rank's last record (None: no file, i.e. the rank never started)."""
    beats: dict[int, dict | None] = {}
    for rank in range(world_size):
        try:
            beats[rank] = json.loads(heartbeat_path(run_root, rank).read_text())
        except (OSError, ValueError):
            beats[rank] = None
    return beats


def suspects(
    run_root: Path, world_size: int, me: int, now: float | None = None
) -> tuple[list[int], list[str]]:
    """(ranks suspected of having stopped answering, one line per rank saying why or how it
    looks). Same-host ranks whose process is gone/stopped first; else stale heartbeats; else
    the ranks with the fewest steps."""
    now = time.time() if now is None else now
    host = socket.gethostname()
    beats = read_heartbeats(run_root, world_size)
    dead, stale, lines = [], [], []
    for rank, beat in beats.items():
        if beat is None:
            stale.append(rank)
            lines.append(f"rank {rank}: no heartbeat file")
            continue
        age = now - beat["time"]
        where = f"pid {beat['pid']} on {beat['host']}"
        state = process_state(beat["pid"]) if beat["host"] == host else "unknown"
        if rank != me and state in ("gone", "stopped", "zombie", "dying"):
            dead.append(rank)
        elif rank != me and age > STALE_AFTER_S:
            stale.append(rank)
        gone = state in ("gone", "zombie", "dying")
        oom = killed_for_memory(beat) if rank != me and gone else None
        lines.append(
            f"rank {rank} ({where}, process {state}): last heartbeat {age:.1f} s ago "
            f"at step {beat['step']}" + (f"; {oom}" if oom else "")
        )
    named = dead or stale
    if not named:
        steps = {r: b["step"] for r, b in beats.items() if b is not None and r != me}
        mine = beats[me]["step"] if beats.get(me) else None
        if steps and mine is not None and min(steps.values()) < mine:
            named = [r for r, s in steps.items() if s == min(steps.values())]
    return named, lines


class RankStoppedAnswering(RuntimeError):
    """A collective failed; the message names the rank(s) suspected of causing it."""


_COLLECTIVE_SIGNS = (
    "gloo",
    "nccl",
    "timed out",
    "timeout",
    "connection reset",
    "connection closed",
    "broken pipe",
    "peer",
)


def raise_naming_suspects(error: BaseException, run_root: Path) -> None:
    """Raises ``RankStoppedAnswering`` from ``error`` naming the suspected rank(s) when
    ``error`` looks like a failed collective and a process group exists; else returns."""
    import torch.distributed as dist

    text = str(error).lower()
    if not dist.is_initialized() or not any(sign in text for sign in _COLLECTIVE_SIGNS):
        return
    me, world = dist.get_rank(), dist.get_world_size()
    named, lines = suspects(run_root, world, me)
    who = (
        f"rank {', '.join(map(str, named))} stopped answering"
        if named
        else "no rank's heartbeat is stale (a network problem?)"
    )
    if any("killed for memory" in line for line in lines):
        _record_memory_kill(run_root, world, me)
        who += (
            " - killed for memory, not a network fault: lower the memory per rank "
            "(python -m mtrain.plan says what fits)"
        )
    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    folder = heartbeat_path(run_root, 0).parent
    message = (
        f"a collective failed on rank {me}: {who}. Heartbeats ({folder}):"
        + "".join(f"\n  {line}" for line in lines)
        + f"\nthe error: {first}"
    )
    log.error(message)
    new = RankStoppedAnswering(message)
    new.suspects = named  # type: ignore[attr-defined]
    raise new from error


def _record_memory_kill(run_root: Path, world_size: int, me: int) -> None:
    """Writes which rank the kernel killed for memory, and its cgroup's limit, for the next
    attempt (``RunDir.memory_kill``)."""
    for rank, beat in read_heartbeats(run_root, world_size).items():
        if rank == me or beat is None:
            continue
        if process_state(beat["pid"]) not in ("gone", "zombie", "dying"):
            continue
        if killed_for_memory(beat) is None:
            continue
        path = RunDir(run_root).memory_kill
        keys = ("rank", "step", "rss", "available", "limit", "cgroup")
        tmp = path.with_name(f".{path.name}.{me}.tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps({k: beat.get(k) for k in keys} | {"time": time.time()}))
            tmp.replace(path)
        return


def last_memory_kill(run_root: Path) -> dict | None:
    """The rank the kernel last killed for memory in this run (``_record_memory_kill``)."""
    try:
        return json.loads(RunDir(run_root).memory_kill.read_text())
    except (OSError, ValueError):
        return None


def _cgroup_verdict(beat: dict) -> str | None:
    """The kernel's count of OOM kills in the rank's memory cgroup, risen since its last
    beat: it was killed there, at its limit."""
    if beat.get("cgroup") is None:
        return None
    now = MemoryCgroup(Path(beat["cgroup"]), beat["cgroup_version"]).oom_kills
    before = beat.get("cgroup_oom_kills")
    if now is None or before is None or now <= before:
        return None
    limit = beat.get("limit")
    at = f"its limit {limit / 2**30:.2f} GiB" if limit else "no limit of its own"
    return (
        f"the kernel's OOM killer ended it in its memory cgroup {beat['cgroup']} at {at} "
        f"(oom_kill {before} -> {now})"
    )


def killed_for_memory(beat: dict) -> str | None:
    """Why a rank that is gone was (likely) killed for memory: the kernel's OOM-kill count in
    its memory cgroup, or the machine's since this rank started, and the rank's last
    heartbeat; None without such evidence."""
    rss, available = beat.get("rss"), beat.get("available")
    known = rss is not None and available is not None
    tight = known and available < LOW_MEMORY_SHARE * rss
    verdict = _cgroup_verdict(beat)
    now = oom_kills()
    counted = now is not None and _oom_kills_at_start is not None and now > _oom_kills_at_start
    if not (verdict or counted or tight):
        return None
    evidence = [verdict] if verdict else []
    if counted and not verdict:
        evidence.append(f"the kernel's OOM-kill count rose {_oom_kills_at_start} -> {now}")
    if known:
        evidence.append(f"its last RSS {rss / 2**30:.2f} GiB with {available / 2**30:.2f} GiB left")
    return "killed for memory (" + "; ".join(evidence) + ")"
