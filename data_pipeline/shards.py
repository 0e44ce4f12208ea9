"""WebDataset tar shards: one sample per piece, rolled over at a target size.

A sample is ``<hash>.tokens.npy`` (base token ids, integer dtype, no pickle) and
``<hash>.json`` (labels and measurements). Each shard is written to a local temporary file and
published (renamed or uploaded) only when complete, with its piece count, token count, size and
SHA-256 recorded for the dataset card, so a reader can tell a damaged shard from a whole one.
"""

import hashlib
import io
import json
import os
import tarfile
import tempfile
from dataclasses import asdict, dataclass

import numpy as np

from data_pipeline import storage


@dataclass
class ShardInfo:
    name: str
    pieces: int
    tokens: int
    bytes: int
    sha256: str


def npy_bytes(tokens: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, tokens, allow_pickle=False)
    return buf.getvalue()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _member(name: str, data: bytes) -> bytes:
    """One tar member, byte for byte as WebDataset's TarWriter writes it with ``mtime=0``
    (an integer mtime: a float one makes tar write ~1 KB of extended header per member)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uname = info.gname = "bigdata"
    header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    return header + data + bytes(-len(data) % tarfile.BLOCKSIZE)


def sample_bytes(key: str, tokens: np.ndarray, meta: dict) -> bytes:
    """A piece as the tar members of one sample. Built in the prepare workers, so the process
    that writes the shards only appends bytes (its per-piece work caps the parallel speed-up)."""
    return _member(f"{key}.json", json.dumps(meta).encode()) + _member(
        f"{key}.tokens.npy", npy_bytes(tokens)
    )


class ShardWriter:
    """Writes one split's shards ``{prefix}-000000.tar``, ``{prefix}-000001.tar`` ... under
    ``output`` (a directory or URL)."""

    def __init__(self, output: str, prefix: str, max_bytes: int, max_pieces: int):
        self.output, self.prefix = output, prefix
        self.max_bytes, self.max_pieces = max_bytes, max_pieces
        self.shards: list[ShardInfo] = []
        self._file = None
        self._path = ""
        self._pieces = self._tokens = 0

    @property
    def current_name(self) -> str:
        return f"{self.prefix}-{len(self.shards):06d}.tar"

    def write(self, key: str, tokens: np.ndarray, meta: dict) -> str:
        """Adds one piece; returns the name of the shard that holds it."""
        return self.append(sample_bytes(key, tokens, meta), len(tokens))

    def append(self, sample: bytes, tokens: int) -> str:
        """Adds one piece already made into ``sample_bytes`` of ``tokens`` tokens."""
        if self._file is None:
            self._open()
        name = self.current_name
        self._file.write(sample)
        self._pieces += 1
        self._tokens += tokens
        if self._file.tell() >= self.max_bytes or self._pieces >= self.max_pieces:
            self._publish()
        return name

    def _open(self) -> None:
        fd, self._path = tempfile.mkstemp(suffix=".tar.partial")
        storage.make_readable(self._path)  # mkstemp's 0o600 would follow it to shared storage
        self._file = os.fdopen(fd, "wb")

    def _publish(self) -> None:
        # The end of a tar: two zero blocks, then zeros up to a whole record.
        end = 2 * tarfile.BLOCKSIZE
        self._file.write(bytes(end + -(self._file.tell() + end) % tarfile.RECORDSIZE))
        self._file.close()
        info = ShardInfo(
            self.current_name,
            self._pieces,
            self._tokens,
            os.path.getsize(self._path),
            file_sha256(self._path),
        )
        storage.publish_file(self._path, storage.join(self.output, info.name))
        self.shards.append(info)
        self._file = None
        self._pieces = self._tokens = 0

    def close(self) -> list[dict]:
        if self._file is not None and self._pieces:
            self._publish()
        return [asdict(s) for s in self.shards]
