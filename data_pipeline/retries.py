"""Retrying object storage: which failures are transient, and backoff with jitter bounded by
one clock.

Object storage fails for a while now and then (refused or reset connections, stalls, 5xx,
throttling). ``Backoff`` retries such errors with exponential backoff and jitter until the
operation works or an outage has lasted ``MTRAIN_STORAGE_RETRY_S`` seconds (default 600;
``configure`` sets it per run); each retry is logged once with the URL and counted. Missing
objects, denied access and damaged data are not retried.
"""

import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from typing import TypeVar

import fsspec

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_ENV = "MTRAIN_STORAGE_RETRY_S"
DEFAULT_RETRY_S = 600.0
FIRST_WAIT_S, LONGEST_WAIT_S = 0.5, 30.0
# S3 error codes (and HTTP statuses) that mean "try again later", not "this is wrong".
RETRYABLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "TooManyRequests",
    "RequestLimitExceeded",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "ServiceUnavailable",
    "InternalError",
    "OperationAborted",
}
_budget_s: float | None = None
# Retries made by this process (all operations); the loader keeps a count shared with its workers.
retries_total = 0


def _transient_types() -> tuple[type[BaseException], ...]:
    """Exception types of a connection refused, reset or timed out, whichever client raised it."""
    import asyncio

    found: list[type[BaseException]] = [
        ConnectionError,  # refused, reset, aborted, broken pipe
        TimeoutError,
        socket.timeout,
        asyncio.TimeoutError,
        fsspec.exceptions.FSTimeoutError,
    ]
    with contextlib.suppress(ImportError):
        import botocore.exceptions as bx

        # EndpointConnectionError, ConnectionClosedError, Connect/ReadTimeoutError, ...
        found += [bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError]
        from botocore.parsers import ResponseParserError

        found += [ResponseParserError]  # throttling replies can come as bad XML
    with contextlib.suppress(ImportError):
        import aiohttp

        # ClientPayloadError (cut mid-body), ServerDisconnectedError, ClientConnectorError ...
        found += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    return tuple(found)


_TRANSIENT: tuple[type[BaseException], ...] | None = None


def retryable(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is a transient failure of the storage service:
    a refused, reset or stalled connection, a 5xx reply or throttling. A missing object,
    denied access or damaged data is not."""
    global _TRANSIENT
    if _TRANSIENT is None:
        _TRANSIENT = _transient_types()
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, (FileNotFoundError, PermissionError)):
            return False
        if isinstance(err, _TRANSIENT):
            return True
        response = getattr(err, "response", None)
        if isinstance(response, dict) and "Error" in response:  # botocore ClientError
            code = str(response["Error"].get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if code.isdigit():
                status = status or int(code)
            return code in RETRYABLE_CODES or status >= 500 or status == 429
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def configure(retry_s: float | None = None) -> None:
    """Sets how long an outage may last before an operation of this process gives up."""
    global _budget_s
    _budget_s = retry_s


def retry_budget_s() -> float:
    if _budget_s is not None:
        return _budget_s
    return configured_budget_s(None)


def configured_budget_s(retry_s: float | None) -> float:
    """The budget a config's ``storage_retry_s`` gives: its own, else $MTRAIN_STORAGE_RETRY_S,
    else 600 s."""
    return retry_s if retry_s is not None else float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S))


class StorageUnavailable(RuntimeError):
    """Object storage failed for longer than the retry budget allows."""


class Backoff:
    """Retry bookkeeping for one operation on ``url``: waits with exponential backoff and full
    jitter after each transient failure; gives up once failures have gone on for
    ``budget_s`` seconds since the last success (``ok()``). ``counter`` (a process-shared
    Value) counts the retries, alongside this process's ``retries_total``."""

    def __init__(self, url: str, what: str, budget_s: float | None = None, counter=None):
        self.url, self.what, self.counter = url, what, counter
        self.budget_s = retry_budget_s() if budget_s is None else budget_s
        self.attempt, self.since = 0, None

    def ok(self) -> None:
        self.attempt, self.since = 0, None

    def failed(self, err: BaseException) -> None:
        """Returns after a wait when ``err`` is worth another try; raises otherwise."""
        global retries_total
        if not retryable(err):
            raise err
        now = time.monotonic()
        self.since = self.since or now
        left = self.since + self.budget_s - now
        wait = min(LONGEST_WAIT_S, FIRST_WAIT_S * 2**self.attempt) * random.uniform(0.5, 1.0)
        if left <= 0:
            raise StorageUnavailable(
                f"{self.what} {self.url} failed for {now - self.since:.0f} s "
                f"({_describe(err)}); gave up after {self.attempt} retries "
                f"({RETRY_ENV} / data.storage_retry_s = {self.budget_s:g} s)"
            ) from err
        self.attempt += 1
        retries_total += 1
        if self.counter is not None:
            with self.counter.get_lock():
                self.counter.value += 1
        log.warning(
            "storage: %s %s failed (%s); retry %d in %.1f s (%.0f s left of %g s)",
            self.what,
            self.url,
            _describe(err),
            self.attempt,
            wait,
            left,
            self.budget_s,
        )
        time.sleep(min(wait, max(left, 0.0)))

    def call(self, fn: Callable[[], T]) -> T:
        while True:
            try:
                result = fn()
            except Exception as err:
                self.failed(err)
            else:
                self.ok()
                return result


def _describe(err: BaseException) -> str:
    text = str(err.args[0]) if err.args else str(err)
    return f"{type(err).__name__}: {text[:200]}"


def with_retries(what: str, url: str, fn: Callable[[], T], counter=None) -> T:
    return Backoff(url, what, counter=counter).call(fn)
