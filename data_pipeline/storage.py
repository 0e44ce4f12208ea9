"""Reading and writing local paths and object-storage URLs through one fsspec interface.

Endpoints and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID`` ...) or ``~/.aws``; they never appear in a config and are never logged.
"""

import contextlib
import os
import shutil
from typing import IO

import fsspec
from fsspec.core import url_to_fs


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding ``url`` and the path inside it."""
    return url_to_fs(url)


def join(url: str, *names: str) -> str:
    return "/".join([url.rstrip("/"), *names])


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def write_bytes(url: str, data: bytes) -> None:
    """Write whole or not at all: a reader never sees half a file."""
    fs, path = filesystem(url)
    if is_remote(url):
        # An object-storage PUT is atomic: the object appears complete or not at all.
        fs.pipe_file(path, data)
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
    return fs.exists(path)


def list_files(url: str, suffixes: tuple[str, ...]) -> list[str]:
    """Every file below ``url`` whose name ends with one of ``suffixes`` (case-insensitive),
    as full URLs (or paths, for a local ``url``), sorted."""
    fs, root = filesystem(url)
    found = [p for p in fs.find(root) if p.lower().endswith(suffixes)]
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if is_remote(url):
        return sorted(f"{protocol}://{p}" for p in found)
    return sorted(found)


def publish_file(local_path: str, url: str) -> None:
    """Move (or upload) a finished local file to ``url`` in one step, so a reader sees it
    complete or not at all."""
    fs, path = filesystem(url)
    if is_remote(url):
        fs.put_file(local_path, path)
        os.remove(local_path)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    shutil.move(local_path, path)


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
