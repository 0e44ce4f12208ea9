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
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import webdataset as wds

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


class ShardWriter:
    """Writes one split's shards ``{prefix}-000000.tar``, ``{prefix}-000001.tar`` ... under
    ``output`` (a directory or URL)."""

    def __init__(self, output: str, prefix: str, max_bytes: int, max_pieces: int):
        self.output, self.prefix = output, prefix
        self.max_bytes, self.max_pieces = max_bytes, max_pieces
        self.shards: list[ShardInfo] = []
        self._tar: wds.TarWriter | None = None
        self._file = None
        self._path = ""
        self._pieces = self._tokens = 0

    @property
    def current_name(self) -> str:
        return f"{self.prefix}-{len(self.shards):06d}.tar"

    def write(self, key: str, tokens: np.ndarray, meta: dict) -> str:
        """Adds one piece; returns the name of the shard that holds it."""
        if self._tar is None:
            self._open()
        name = self.current_name
        self._tar.write(
            {"__key__": key, "tokens.npy": npy_bytes(tokens), "json": json.dumps(meta).encode()}
        )
        self._pieces += 1
        self._tokens += len(tokens)
        if self._file.tell() >= self.max_bytes or self._pieces >= self.max_pieces:
            self._publish()
        return name

    def _open(self) -> None:
        fd, self._path = tempfile.mkstemp(suffix=".tar.partial")
        storage.make_readable(self._path)  # mkstemp's 0o600 would follow it to shared storage
        self._file = os.fdopen(fd, "wb")
        # An integer mtime: a float one makes tar write ~1 KB of extended header per member.
        self._tar = wds.TarWriter(self._file, mtime=0)

    def _publish(self) -> None:
        self._tar.close()
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
        self._tar = None
        self._pieces = self._tokens = 0

    def close(self) -> list[dict]:
        if self._tar is not None and self._pieces:
            self._publish()
        return [asdict(s) for s in self.shards]
