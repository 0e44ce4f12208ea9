"""Dealing a large dataset's shards to many ranks x loader workers (no files: the shard
descriptions of a card are enough): each piece once per epoch, every stream within one
shard's worth of pieces of every other."""

import numpy as np
import pytest

from data_pipeline.reader import shard_shares, split_shares
from mtrain.data.dealing import check_enough_pieces, stream_shares

RANKS, WORKERS = 64, 4


def card_of(pieces: list[int]) -> dict:
    shards = [{"name": f"train-{i:06d}.tar", "pieces": n} for i, n in enumerate(pieces)]
    return {"splits": {"train": {"shards": shards}}}


def dealt(shards, epoch: int, streams: int) -> tuple[list[int], set]:
    """Pieces per stream, and every (shard, piece) dealt, checking none is dealt twice."""
    seen, sizes = set(), []
    for stream in range(streams):
        shares = stream_shares(shards, epoch, 0, stream, streams)
        pieces = [(s.url, i) for s in shares for i in range(s.offset, s.pieces, s.stride)]
        assert seen.isdisjoint(pieces), f"stream {stream} is dealt pieces another one has"
        seen.update(pieces)
        sizes.append(len(pieces))
    return sizes, seen


@pytest.mark.parametrize(
    "pieces",
    [
        # 1200 shards cut at a byte size (200-260 pieces each), the last of each of 32 slices
        # short: what a 1M-file corpus prepared by a 32-task array looks like.
        [
            int(n) if i % 40 else int(n) // 7
            for i, n in enumerate(np.random.default_rng(0).integers(200, 261, 1200))
        ],
        # Fewer shards than streams: streams share a shard piece by piece.
        [int(n) for n in np.random.default_rng(1).integers(900, 1100, 100)],
    ],
    ids=["1200-shards", "100-shards"],
)
def test_every_piece_once_per_epoch_and_streams_within_a_shard(pieces):
    shards = split_shares("ds", "train", card_of(pieces))
    assert shards == shard_shares("ds", card_of(pieces)["splits"]["train"]["shards"])
    streams = RANKS * WORKERS
    check_enough_pieces(shards, streams)
    everything = {(s.url, i) for s in shards for i in range(s.pieces)}
    for epoch in (0, 1):
        sizes, seen = dealt(shards, epoch, streams)
        assert seen == everything  # none skipped
        assert max(sizes) - min(sizes) <= max(pieces), (min(sizes), max(sizes))
