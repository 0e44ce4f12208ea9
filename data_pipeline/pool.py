"""A process pool that survives its workers: a crash or a hang costs one item, not the run.

``concurrent.futures`` marks the whole pool broken when one worker dies, and cannot tell which
item killed it. Here every worker has its own pipe and at most ``prefetch`` items in flight, so
the item a dead or overrunning worker held is known: it comes back as a ``TaskFailure``, the
worker is replaced, and the items queued behind it are sent again. Results come back in input
order, so the output does not depend on the number of workers.
"""

import contextlib
import multiprocessing as mp
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

_PREFETCH = 2
# Results that may wait, per worker, behind the one the output order waits for.
_AHEAD = 256


@dataclass(frozen=True)
class TaskFailure:
    """An item the task could not process, and why."""

    reason: str


def _worker_loop(conn: Connection, fn: Callable, initializer: Callable | None, initargs: tuple):
    if initializer is not None:
        initializer(*initargs)
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        index, item = message
        try:
            result = fn(item)
        except Exception as exc:  # the item is bad, the worker is fine
            result = TaskFailure(f"{type(exc).__name__}: {exc}".strip())
            if not str(exc):
                result = TaskFailure(traceback.format_exc(limit=1).strip().splitlines()[-1])
        conn.send((index, result))


class _Feed:
    """The items still to send: first those a failed worker held but never started, then the
    input, drawn lazily and never more than ``limit`` items in."""

    def __init__(self, items: Iterable):
        self._source = enumerate(items)
        self.resend: deque = deque()
        self.drawn = 0
        self.exhausted = False

    def take(self, limit: int) -> tuple[int, Any] | None:
        if self.resend:
            return self.resend.popleft()
        if self.exhausted or self.drawn >= limit:
            return None
        task = next(self._source, None)
        if task is None:
            self.exhausted = True
            return None
        self.drawn += 1
        return task


@dataclass
class _Worker:
    process: Any
    conn: Connection
    in_flight: deque = field(default_factory=deque)
    head_started: float = 0.0


class ResilientPool:
    """Maps ``fn`` over items in ``workers`` processes (spawned, so no state leaks in)."""

    def __init__(
        self,
        fn: Callable,
        workers: int,
        timeout_s: float,
        initializer: Callable | None = None,
        initargs: tuple = (),
    ):
        self._fn, self._initializer, self._initargs = fn, initializer, initargs
        self._timeout_s = timeout_s
        self._ctx = mp.get_context("spawn")
        self._workers = [self._start() for _ in range(max(1, workers))]
        self.restarts = 0

    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_worker_loop,
            args=(child, self._fn, self._initializer, self._initargs),
            daemon=True,
        )
        process.start()
        child.close()
        return _Worker(process, parent)

    def _replace(self, worker: _Worker) -> _Worker:
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join()
        worker.conn.close()
        self.restarts += 1
        fresh = self._start()
        self._workers[self._workers.index(worker)] = fresh
        return fresh

    def imap(self, items: Iterable) -> Iterator:
        """Yields ``fn(item)`` or a ``TaskFailure`` for each item, in input order. Items are
        drawn from ``items`` only as workers free up, so a listing of a million files is never
        held whole, and at most ``_AHEAD`` results per worker wait behind a slow item."""
        feed = _Feed(items)
        done: dict[int, Any] = {}
        next_out = 0
        while True:
            self._dispatch(feed, next_out + _AHEAD * len(self._workers))
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1
            if feed.exhausted and not feed.resend and next_out >= feed.drawn:
                return
            self._collect(feed.resend, done)

    def _dispatch(self, feed: "_Feed", limit: int) -> None:
        for worker in self._workers:
            while len(worker.in_flight) < _PREFETCH and (task := feed.take(limit)) is not None:
                if not self._send(worker, *task):
                    feed.resend.appendleft(task)
                    break

    def _send(self, worker: _Worker, index: int, item: Any) -> bool:
        try:
            worker.conn.send((index, item))
        except (BrokenPipeError, OSError):
            return False  # a dead worker: _collect replaces it, the item goes to another one
        if not worker.in_flight:
            worker.head_started = time.monotonic()
        worker.in_flight.append((index, item))
        return True

    def _collect(self, pending: deque, done: dict) -> None:
        by_handle: dict[Any, _Worker] = {}
        for w in self._workers:
            by_handle[w.conn] = w
            by_handle[w.process.sentinel] = w
        ready = wait(list(by_handle), timeout=0.5)
        # A worker that exits readies its sentinel: no per-worker waitpid on every result.
        exited = set()
        for handle in ready:
            worker = by_handle[handle]
            if handle is worker.conn:
                self._receive(worker, done)
            else:
                exited.add(id(worker))
        now = time.monotonic()
        for worker in list(self._workers):
            if id(worker) in exited:
                worker.process.join()  # reaps it: the exit code is known from here on
                # Results it sent before dying are still in the pipe.
                self._receive(worker, done)
                if worker.in_flight:
                    reason = f"worker process died (exit code {worker.process.exitcode})"
                    self._fail_head(worker, reason, pending, done)
                else:
                    self._replace(worker)
            elif worker.in_flight and now - worker.head_started > self._timeout_s:
                reason = f"timed out after {self._timeout_s:g} s (worker killed)"
                self._fail_head(worker, reason, pending, done)

    def _receive(self, worker: _Worker, done: dict) -> None:
        try:
            while worker.in_flight and worker.conn.poll():
                index, result = worker.conn.recv()
                worker.in_flight.popleft()
                worker.head_started = time.monotonic()
                done[index] = result
        except (EOFError, OSError):
            return

    def _fail_head(self, worker: _Worker, reason: str, pending: deque, done: dict) -> None:
        index, _ = worker.in_flight.popleft()
        done[index] = TaskFailure(reason)
        # The items queued behind the failed one never started: send them again.
        pending.extendleft(reversed(worker.in_flight))
        worker.in_flight.clear()
        self._replace(worker)

    def close(self) -> None:
        for worker in self._workers:
            with contextlib.suppress(BrokenPipeError, OSError):
                worker.conn.send(None)
        for worker in self._workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()

    def __enter__(self) -> "ResilientPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
