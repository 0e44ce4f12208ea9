"""Reading and writing local paths and object-storage URLs through one fsspec interface.

Endpoints and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID`` ...) or ``~/.aws``; they never appear in a config and are never logged.

Every read and write here is retried on transient failures (``data_pipeline.retries``); the
clients' own retries are turned off so that every retry is logged, counted and bounded by one
clock. ``MTRAIN_STORAGE_TIMEOUT_S`` sets the S3 connect and read timeouts (the
time after which a stalled connection counts as failed; botocore's 60 s when unset).
"""

import contextlib
import os
import shutil
from collections.abc import Iterator
from typing import IO

import fsspec
from fsspec.core import url_to_fs

from data_pipeline.retries import with_retries

TIMEOUT_ENV = "MTRAIN_STORAGE_TIMEOUT_S"
# Bytes fetched per ranged read of a shard (tests make it small, to break reads mid-shard).
BLOCK_ENV = "MTRAIN_STORAGE_BLOCK_BYTES"


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
    as full URLs (or absolute paths, for a local ``url``), sorted."""
    return list(iter_files(url, suffixes))


def iter_files(url: str, suffixes: tuple[str, ...]) -> Iterator[str]:
    """``list_files`` one at a time: below a local directory a walk in the same order, so a
    million-file corpus is never listed whole in memory (object storage lists in one go)."""
    if not is_remote(url):
        yield from _sorted_walk(os.path.abspath(url.removeprefix("file://")), suffixes)
        return
    fs, root = filesystem(url)
    listed = with_retries("list", url, lambda: fs.find(root))
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    yield from sorted(f"{protocol}://{p}" for p in listed if p.lower().endswith(suffixes))


def _sorted_walk(directory: str, suffixes: tuple[str, ...]) -> Iterator[str]:
    # A directory sorts as its name plus "/": the walk yields full paths in sorted order.
    with os.scandir(directory) as entries:
        keyed = sorted((e.name + "/" if e.is_dir() else e.name, e.path) for e in entries)
    for key, path in keyed:
        if key.endswith("/"):
            yield from _sorted_walk(path, suffixes)
        elif key.lower().endswith(suffixes):
            yield path


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
