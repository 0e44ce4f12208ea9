"""Resuming on another number of ranks, as arithmetic: the data position is the pieces each
stream consumed of the epoch, and a new dealing over the rest reads each piece once."""

import numpy as np
import pytest

from data_pipeline.reader import ShardShare
from mtrain.data.dealing import Dealing, as_ranges, in_ranges

SHARDS = [ShardShare(f"s{i}.tar", pieces) for i, pieces in enumerate([5, 7, 3, 6, 4, 9, 2])]
ALL = sum(s.pieces for s in SHARDS)


def test_ranges_round_trip_and_membership():
    numbers = np.array([9, 3, 4, 5, 11, 12, 0])
    ranges = as_ranges(numbers)
    assert ranges == [[0, 1], [3, 6], [9, 10], [11, 13]]
    assert in_ranges(np.arange(14), ranges).nonzero()[0].tolist() == sorted(numbers.tolist())
    assert as_ranges(np.zeros(0, dtype=np.int64)) == [] and not in_ranges(numbers, []).any()


def consume(dealing: Dealing, epoch: int, stream: int, streams: int, at: dict) -> list[int]:
    """What a stream reads of ``epoch`` up to position ``at``, in reading order."""
    slots, size = dealing.slots(epoch, stream, streams), dealing.shuffle_buffer
    read = []
    for block in range(-(-len(slots) // size)):
        pieces = slots[block * size : (block + 1) * size]
        order = dealing.block_order(epoch, stream, block, len(pieces))
        last = (epoch, block) == (at["epoch"], at["block"])
        read += pieces[order[: at["done"]] if last else order].tolist()
        if last:
            break
    return read


@pytest.mark.parametrize(("old", "new"), [(2, 1), (1, 2), (2, 4), (3, 8)])
def test_a_new_dealing_reads_each_piece_of_the_epoch_once(old, new):
    """Old streams stop anywhere in epoch 0 (mid-block too); the position they leave, dealt
    to another number of streams, reads every other piece of the epoch exactly once."""
    dealing = Dealing(SHARDS, seed=3, shuffle_buffer=4, skip={})
    rng = np.random.default_rng(old * 10 + new)
    before, states = [], []
    for stream in range(old):
        slots = len(dealing.slots(0, stream, old))
        stop = int(rng.integers(0, slots))
        at = {"epoch": 0, "block": stop // 4, "done": stop % 4, "carry": [stream]}
        before += consume(dealing, 0, stream, old, at)
        states.append(at)
    consumed = as_ranges(
        np.concatenate([dealing.consumed(0, s, old, at) for s, at in enumerate(states)])
    )
    assert sorted(before) == [n for a, b in consumed for n in range(a, b)]
    after = Dealing(SHARDS, seed=3, shuffle_buffer=4, skip={0: consumed})
    rest = [n for s in range(new) for n in after.slots(0, s, new).tolist()]
    assert sorted(before + rest) == list(range(ALL))
