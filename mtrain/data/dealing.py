"""Shards dealt to streams (one DataLoader worker of one rank each), epoch by epoch, and the
position in the data that survives a change in the number of streams.

- Every epoch the shard list is reshuffled from (seed, epoch), the same on every rank, and
  dealt to the streams; with fewer shards than streams, streams share a shard and each takes
  every n-th piece of it.
- Shuffling is by blocks of ``shuffle_buffer`` pieces, permuted by an RNG seeded from
  (seed, epoch, stream, block), so a stream's order is arithmetic, known without reading.
- Another number of ranks (or workers): the old streams' positions are turned into a
  world-size-free ``DataPosition``, the pieces of each epoch consumed, numbered in card order
  (an in-flight block's consumed pieces are known from its seeded permutation). The new streams
  deal each such epoch anew and skip those pieces; the tokens the old streams had read but not
  yet packed are handed to new streams. No piece is repeated or skipped, and no token lost.
"""

import heapq
from dataclasses import dataclass

import numpy as np

from data_pipeline.reader import ShardShare


def stream_shares(
    shards: list[ShardShare], epoch: int, seed: int, stream: int, num_streams: int
) -> list[ShardShare]:
    """What ``stream`` reads in ``epoch``: its whole shards in this epoch's order or, with
    fewer shards than streams, its every n-th piece of the one shard it shares."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    shards = [shards[i] for i in order]
    if len(shards) >= num_streams:
        # Each shard to the stream with the fewest pieces so far: streams end an epoch within
        # one shard's worth of each other, however the shards' sizes differ (round robin left
        # two shards' worth between 64 ranks x 4 workers over 1200 shards).
        loads = [(0, s) for s in range(num_streams)]
        mine = []
        for shard in shards:
            pieces, owner = heapq.heappop(loads)
            if owner == stream:
                mine.append(shard)
            heapq.heappush(loads, (pieces + shard.pieces, owner))
        return mine
    shard = shards[stream % len(shards)]
    readers = len(range(stream % len(shards), num_streams, len(shards)))
    return [ShardShare(shard.url, shard.pieces, stream // len(shards), readers)]


def check_enough_pieces(shards: list[ShardShare], num_streams: int) -> None:
    """Every stream must get a piece each epoch, or its worker would spin forever."""
    if len(shards) >= num_streams:
        return
    readers = -(-num_streams // len(shards))
    smallest = min(s.pieces for s in shards)
    if smallest < readers:
        raise ValueError(
            f"{len(shards)} shards for {num_streams} streams (ranks x workers): up to "
            f"{readers} streams share a shard, but one holds only {smallest} pieces; use "
            "fewer data.num_workers or prepare the dataset with smaller shards"
        )


# A set of pieces as sorted, disjoint [start, end) ranges of their numbers in card order (the
# train shards' pieces counted shard after shard): the same set whatever the number of ranks.
Ranges = list[list[int]]


def as_ranges(numbers: np.ndarray) -> Ranges:
    numbers = np.unique(numbers)
    cuts = np.flatnonzero(np.diff(numbers) != 1) + 1
    return [[int(run[0]), int(run[-1]) + 1] for run in np.split(numbers, cuts) if len(run)]


def in_ranges(numbers: np.ndarray, ranges: Ranges) -> np.ndarray:
    """Which of ``numbers`` the ranges hold, as a boolean mask."""
    if not ranges:
        return np.zeros(len(numbers), dtype=bool)
    starts, ends = np.asarray(ranges).T
    i = np.searchsorted(starts, numbers, side="right") - 1
    return (i >= 0) & (numbers < ends[np.maximum(i, 0)])


def range_numbers(ranges: Ranges) -> np.ndarray:
    return np.concatenate([np.arange(a, b) for a, b in ranges] or [np.zeros(0, dtype=np.int64)])


@dataclass
class DataPosition:
    """Where training stands in the data whatever the number of ranks: the pieces consumed of
    each epoch from the first one unfinished on, and the tokens the old streams had read but
    not yet packed into a window, in old stream order."""

    consumed: dict[int, Ranges]
    carries: list[list[int]]

    def __str__(self) -> str:
        return ", ".join(
            f"{sum(b - a for a, b in ranges)} pieces of epoch {epoch}"
            for epoch, ranges in sorted(self.consumed.items())
        )


@dataclass
class Dealing:
    """What a stream's share of an epoch is and in which order it reads it, as piece numbers:
    the same arithmetic ``TrainStream`` reads by, without reading. ``skip``: the pieces of each
    epoch consumed before this dealing began (under another number of streams)."""

    shards: list[ShardShare]
    seed: int
    shuffle_buffer: int
    skip: dict[int, Ranges]

    def __post_init__(self):
        firsts = np.cumsum([0] + [s.pieces for s in self.shards])
        self.first = {s.url: int(f) for s, f in zip(self.shards, firsts, strict=False)}

    def numbers(self, share: ShardShare) -> np.ndarray:
        return self.first[share.url] + np.arange(share.offset, share.pieces, share.stride)

    def kept(self, share: ShardShare, epoch: int) -> np.ndarray:
        """Which of the share's pieces this dealing reads in ``epoch``."""
        return ~in_ranges(self.numbers(share), self.skip.get(epoch, []))

    def slots(self, epoch: int, stream: int, num_streams: int) -> np.ndarray:
        """The numbers of the pieces ``stream`` reads in ``epoch``, in slot order."""
        shares = stream_shares(self.shards, epoch, self.seed, stream, num_streams)
        parts = [self.numbers(s)[self.kept(s, epoch)] for s in shares]
        return np.concatenate(parts or [np.zeros(0, dtype=np.int64)])

    def block_order(self, epoch: int, stream: int, block: int, length: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, stream, block]).permutation(length)

    def consumed(self, epoch: int, stream: int, num_streams: int, at: dict) -> np.ndarray:
        """The pieces ``stream`` had consumed of ``epoch`` at position ``at`` (a TrainStream
        state), besides those this dealing skips."""
        slots = self.slots(epoch, stream, num_streams)
        if epoch < at["epoch"]:
            return slots
        start = at["block"] * self.shuffle_buffer
        block = slots[start : start + self.shuffle_buffer]
        order = self.block_order(epoch, stream, at["block"], len(block))
        return np.concatenate([slots[:start], block[order[: at["done"]]]])


def handed_over(carries: list[list[int]], stream: int, num_streams: int) -> list[int]:
    """The old streams' unpacked tokens a new stream starts with: those of the old streams
    congruent to it modulo the new number of streams, in order."""
    return [token for old in carries[stream::num_streams] for token in old]
