"""Reading and writing local paths and object-storage URLs through one fsspec interface.

Endpoints and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID`` ...) or ``~/.aws``; they never appear in a config and are never logged.

Object storage fails for a while now and then (refused or reset connections, stalls, 5xx,
throttling). Every read and write here is retried on such errors with exponential backoff and
jitter until it works or an outage has lasted ``MTRAIN_STORAGE_RETRY_S`` seconds (default 600;
``configure`` sets it per run); each retry is logged once with the URL and counted. The
clients' own retries are turned off so that every retry is this module's: logged, counted and
bounded by one clock. ``MTRAIN_STORAGE_TIMEOUT_S`` sets the S3 connect and read timeouts (the
time after which a stalled connection counts as failed; botocore's 60 s when unset).
"""

import contextlib
import logging
import os
import random
import shutil
import socket
import time
from collections.abc import Callable
from typing import IO, TypeVar

import fsspec
from fsspec.core import url_to_fs

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_ENV, TIMEOUT_ENV = "MTRAIN_STORAGE_RETRY_S", "MTRAIN_STORAGE_TIMEOUT_S"
# Bytes fetched per ranged read of a shard (tests make it small, to break reads mid-shard).
BLOCK_ENV = "MTRAIN_STORAGE_BLOCK_BYTES"
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
    return float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S))


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


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding ``url`` and the path inside it."""
    if not url.startswith(("s3://", "s3a://")):
        return url_to_fs(url)
    # botocore retries nothing itself (max_attempts counts the first try): Backoff does.
    config = {"retries": {"max_attempts": 1}}
    if os.environ.get(TIMEOUT_ENV):
        timeout = float(os.environ[TIMEOUT_ENV])
        config |= {"connect_timeout": timeout, "read_timeout": timeout}
    fs, path = url_to_fs(url, config_kwargs=config)
    fs.retries = 1  # s3fs's own retry loop: one attempt
    return fs, path


def file_mode() -> int:
    """The mode a new file gets under the current umask (0o644 under the usual 022): for files
    made with mkstemp (always 0o600) that others on shared storage must read."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def make_readable(path: str) -> None:
    """Gives a file made private (mkstemp, safetensors: 0o600), or every file below a
    directory, the mode the umask gives any new file."""
    mode = file_mode()
    if not os.path.isdir(path):
        os.chmod(path, mode)
        return
    for folder, _, names in os.walk(path):
        for name in names:
            os.chmod(os.path.join(folder, name), mode)


def join(url: str, *names: str) -> str:
    return "/".join([url.rstrip("/"), *names])


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return with_retries("read", url, lambda: fs.cat_file(path))


def write_bytes(url: str, data: bytes) -> None:
    """Write whole or not at all: a reader never sees half a file."""
    fs, path = filesystem(url)
    if is_remote(url):
        # An object-storage PUT is atomic: the object appears complete or not at all, so a
        # failed one is simply made again.
        with_retries("write", url, lambda: fs.pipe_file(path, data))
        return
    fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # Written beside the target and renamed over it: a rename within a filesystem is atomic.
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    # s3fs's exists() answers False on any error: info() tells a missing object from an outage.
    if not is_remote(url):
        return fs.exists(path)

    def probe() -> bool:
        try:
            fs.info(path)
        except FileNotFoundError:
            return False
        return True

    return with_retries("check", url, probe)


def list_files(url: str, suffixes: tuple[str, ...]) -> list[str]:
    """Every file below ``url`` whose name ends with one of ``suffixes`` (case-insensitive),
    as full URLs (or paths, for a local ``url``), sorted."""
    fs, root = filesystem(url)
    listed = with_retries("list", url, lambda: fs.find(root)) if is_remote(url) else fs.find(root)
    found = [p for p in listed if p.lower().endswith(suffixes)]
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if is_remote(url):
        return sorted(f"{protocol}://{p}" for p in found)
    return sorted(found)


def publish_file(local_path: str, url: str) -> None:
    """Move (or upload) a finished local file to ``url`` in one step, so a reader sees it
    complete or not at all."""
    fs, path = filesystem(url)
    if is_remote(url):
        with_retries("upload", url, lambda: fs.put_file(local_path, path))
        os.remove(local_path)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    shutil.move(local_path, path)


def open_input(url: str) -> tuple[IO, int]:
    """``url`` opened for reading, and its size. Not retried here: a caller that reads the
    stream retries the open along with the reads (``Backoff``)."""
    if not is_remote(url):
        f = open(url.removeprefix("file://"), "rb")  # noqa: SIM115 - the caller closes it
        return f, os.fstat(f.fileno()).st_size
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    block = int(os.environ.get(BLOCK_ENV, 8 * 1024 * 1024))
    f = fs.open(path, "rb", block_size=block)
    return f, f.size


def _open_through_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_: object) -> IO:
    fs, path = filesystem(url)
    return fs.open(path, mode, block_size=max(bufsize, 8 * 1024 * 1024))


def register_webdataset_schemes() -> None:
    """Let WebDataset open ``s3://`` (and other fsspec) shard URLs directly.

    WebDataset 1.0 has no object-storage handler of its own; ``pipe:aws s3 cp`` pays seconds
    of CLI start-up per shard, while fsspec streams the same bytes in-process.
    """
    # Imported here: webdataset pulls in torch, which tokenizer workers never need.
    import webdataset as wds

    for scheme in ("s3", "gs", "gcs", "az", "abfs"):
        wds.gopen_schemes[scheme] = _open_through_fsspec
