"""Reading a prepared dataset back: its card, its shards and, checked, the pieces they hold."""

import hashlib
import io
import json
import logging
import multiprocessing as mp
import re
import struct
import sys
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import repeat

import numpy as np

from data_pipeline import retries, storage
from data_pipeline.errors import InputError

log = logging.getLogger(__name__)

CARD_NAME = "dataset.json"
SKIP, RAISE = "skip", "raise"
# What a damaged shard raises while it is read or decoded.
SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, KeyError, ValueError)


def load_card(output: str) -> dict:
    url = storage.join(output, CARD_NAME)
    if not storage.exists(url):
        raise FileNotFoundError(
            f"{url} not found: {output} is not a complete dataset. Build it with "
            f"`python -m data_pipeline.prepare output={output}` (or run the merge step "
            "if it was prepared in slices)"
        )
    return json.loads(storage.read_bytes(url))


class _Mismatch(Exception):
    """A shard whose bytes are not those the card describes."""


class CorruptShardError(InputError):
    """A shard that cannot be read whole, read with on_corrupt=raise (or every shard damaged)."""


@dataclass(frozen=True)
class StoredPiece:
    """A piece as a shard stores it: its key (the MIDI file's content hash), its base token
    ids and its metadata (hash, name, labels, notes, duration_s, tracks, programs)."""

    key: str
    tokens: np.ndarray
    meta: dict

    @property
    def labels(self) -> dict[str, str]:
        return self.meta["labels"]


@dataclass(frozen=True)
class ShardShare:
    """Every ``stride``-th piece of a shard from ``offset`` on: a reader's share of it (the
    whole shard by default). ``pieces``, ``bytes`` and ``sha256`` are the shard's piece count,
    size and digest on the dataset card; each one None is not checked (cards written before
    sizes were recorded, tools holding bare URLs)."""

    url: str
    pieces: int | None = None
    offset: int = 0
    stride: int = 1
    bytes: int | None = None
    sha256: str | None = None

    @property
    def size(self) -> int:
        return len(range(self.offset, self.pieces, self.stride))


def shard_shares(output: str, shards: list[dict]) -> list[ShardShare]:
    """Whole shards, from a card's entries for them, with their piece counts."""
    return [
        ShardShare(
            storage.join(output, s["name"]),
            s["pieces"],
            bytes=s.get("bytes"),
            sha256=s.get("sha256"),
        )
        for s in shards
    ]


def split_shares(output: str, split: str, card: dict) -> list[ShardShare]:
    """The whole shards of ``split``, in card order; refused when the split has none."""
    shards = card["splits"][split]["shards"]
    if not shards:
        raise ValueError(f"split {split!r} of dataset {output} has no pieces")
    return shard_shares(output, shards)


# The header np.save writes for a 1-D integer array (format 1.0): parsed by a pattern, where
# np.load parses it as a Python literal (ast), a third of the time a loader worker spends on
# a piece's file. Anything else goes to np.load, which reads (or refuses) every .npy file.
_NPY_MAGIC = b"\x93NUMPY\x01\x00"
_NPY_1D_INT = re.compile(
    rb"\{'descr': '([<>|][iu][1248])', 'fortran_order': False, 'shape': \((\d+),\), \} *\n"
)


def npy_tokens(data: bytes) -> np.ndarray:
    """The array in the bytes of a .npy file (a view of them where it can be)."""
    if data.startswith(_NPY_MAGIC) and len(data) >= 10:
        (header_len,) = struct.unpack_from("<H", data, 8)
        header = _NPY_1D_INT.fullmatch(data, 10, 10 + header_len)
        if header is not None:
            dtype, count = np.dtype(header[1].decode()), int(header[2])
            if len(data) == 10 + header_len + count * dtype.itemsize:
                return np.frombuffer(data, dtype, count, 10 + header_len)
    return np.load(io.BytesIO(data), allow_pickle=False)


class _HashingReader:
    """A read-only stream that hashes and counts the bytes read through it: the SHA-256 of a
    shard costs CPU only, over bytes the reader reads anyway."""

    def __init__(self, raw):
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Reads to the end: tar stops at its end marker, before the record padding."""
        while self.read(1 << 20):
            pass


class ShardReader:
    """Reads pieces out of shard shares, checking each: a 1-D integer array of base ids below
    ``base_vocab_size`` (when given), with its metadata, from a shard whose piece count, size
    and SHA-256 are the card's. A damaged shard (unreadable, cut short, holding bad samples or
    differing from the card) raises CorruptShardError naming it with ``on_corrupt=raise``;
    with ``skip`` the rest of it is skipped, with a warning and a count in ``corrupt``, a
    process-shared Value from ``context`` (the context the DataLoader workers that share it
    start from). A read that object storage breaks off (refused, reset, stalled, 5xx,
    throttled) is retried for up to ``retry_s`` seconds (``retries.retry_budget_s()`` when
    None), reopening the shard and going on after the last piece read; ``retries`` counts
    the retries the same way ``corrupt`` counts damage."""

    def __init__(
        self,
        base_vocab_size: int | None = None,
        on_corrupt: str = RAISE,
        context: mp.context.BaseContext | None = None,
        retry_s: float | None = None,
    ):
        self.base_vocab_size, self.on_corrupt = base_vocab_size, on_corrupt
        self.retry_s = retry_s
        self.corrupt = (context or mp).Value("l", 0)
        self.retries = (context or mp).Value("l", 0)
        self.damaged: set[str] = set()

    def read(self, share: ShardShare, start: int = 0) -> Iterator[StoredPiece | None]:
        """The share's pieces from its ``start``-th on. With a piece count, one item per piece
        the card records: None for each one lost to damage, so positions stay the card's."""
        end = sys.maxsize if share.pieces is None else share.pieces
        wanted = range(share.offset + start * share.stride, end, share.stride)
        done = found = 0
        differs: list[str] = []
        try:
            for index, sample in self._samples(share, differs):
                found = index + 1
                if index in wanted:
                    yield self._piece(sample)
                    done += 1
        except SHARD_ERRORS as err:
            # WebDataset appends the stream and URL to the arguments: the first one says it.
            self._damaged(share.url, f"{type(err).__name__}: {err.args[0] if err.args else ''}")
        except _Mismatch as err:
            self._damaged(share.url, str(err))
        else:
            # Garbage in the middle of a tar ends it silently: only the count tells.
            if share.pieces is not None and found != share.pieces:
                self._damaged(share.url, f"{found} pieces, dataset.json says {share.pieces}")
            elif differs:
                # Read whole, but not the bytes the card describes (the pieces already given
                # were checked one by one; the rest of the run counts the shard as damaged).
                self._damaged(share.url, differs[0])
        if share.pieces is not None:
            yield from repeat(None, len(wanted) - done)

    def _samples(self, share: ShardShare, differs: list[str]) -> Iterator[tuple[int, dict]]:
        """(index, sample) for every sample of the shard, each once and in order, however
        often storage breaks the stream off: a retry reopens the shard and skips the samples
        already given. Raises _Mismatch when the stored size is not the card's, before any
        sample; says in ``differs`` when the bytes read were not the card's."""
        # Imported here: webdataset pulls in torch, which reading a card never needs.
        from webdataset.tariterators import group_by_keys, tar_file_expander

        backoff = retries.Backoff(share.url, "read", self.retry_s, self.retries)
        given = 0
        while True:
            try:
                stream, size = storage.open_input(share.url)
                with stream:
                    if share.bytes is not None and size != share.bytes:
                        raise _Mismatch(f"{size} bytes, dataset.json says {share.bytes}")
                    hashed = _HashingReader(stream)
                    files = tar_file_expander([{"url": share.url, "stream": hashed}])
                    for index, sample in enumerate(group_by_keys(files)):
                        if index >= given:
                            given = index + 1
                            backoff.ok()
                            yield index, sample
                    hashed.drain()
            except _Mismatch:
                raise
            except Exception as err:
                backoff.failed(err)  # raises what is not worth another try
                continue
            break
        if share.bytes is not None and hashed.size != share.bytes:
            differs.append(f"{hashed.size} bytes read, dataset.json says {share.bytes}")
        elif share.sha256 is not None and hashed.sha.hexdigest() != share.sha256:
            differs.append(
                f"SHA-256 {hashed.sha.hexdigest()[:16]}..., dataset.json says "
                f"{share.sha256[:16]}..."
            )

    def pieces(self, shares: Iterable[ShardShare]) -> Iterator[StoredPiece]:
        """Every piece of ``shares`` in order; with ``skip``, those a damage lost left out."""
        for share in shares:
            yield from (piece for piece in self.read(share) if piece is not None)

    def _piece(self, sample: dict) -> StoredPiece:
        key = sample["__key__"]
        tokens = npy_tokens(sample["tokens.npy"])
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ValueError(f"piece {key} is not a 1-D integer array")
        limit = self.base_vocab_size
        if tokens.size and (tokens.min() < 0 or (limit is not None and tokens.max() >= limit)):
            raise ValueError(f"piece {key} holds ids outside the base vocabulary")
        return StoredPiece(key, tokens.astype(np.int64), json.loads(sample["json"]))

    def _damaged(self, url: str, why: str) -> None:
        if self.on_corrupt == RAISE:
            raise CorruptShardError(f"shard {url} is damaged ({why})")
        self.damaged.add(url)
        with self.corrupt.get_lock():
            self.corrupt.value += 1
        log.warning("skipping the rest of damaged shard %s (%s)", url, why)
