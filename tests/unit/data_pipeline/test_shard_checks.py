"""Shards checked against their card (size and SHA-256) on a local disk, and files written
for others to read respecting the umask."""

import os
from pathlib import Path

import pytest
from support.datasets import write_shards

from data_pipeline import storage
from data_pipeline.reader import CorruptShardError, ShardReader, shard_shares

# --- shards checked against the card ---------------------------------------------------------


@pytest.fixture
def local_shards(tmp_path) -> tuple[Path, list[dict]]:
    return tmp_path, write_shards(str(tmp_path), shards=2, per_shard=5)


def test_a_shard_whose_bytes_differ_from_the_card_is_damaged(local_shards):
    root, entries = local_shards
    shard = root / entries[0]["name"]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF  # the tar's end padding: the tar still reads whole
    shard.write_bytes(bytes(raw))
    skipping = ShardReader(on_corrupt="skip")
    pieces = list(skipping.pieces(shard_shares(str(root), entries)))
    assert len(pieces) == 10  # every piece was read (and checked) before the digest differed
    assert skipping.corrupt.value == 1 and skipping.damaged == {str(shard)}
    with pytest.raises(CorruptShardError, match=r"train-000000\.tar is damaged \(SHA-256"):
        list(ShardReader().pieces(shard_shares(str(root), entries)))


@pytest.mark.parametrize("change", ["truncated", "extended"])
def test_a_shard_of_another_size_than_the_card_is_damaged(local_shards, change):
    root, entries = local_shards
    shard = root / entries[1]["name"]
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-512] if change == "truncated" else raw + bytes(512))
    size = len(raw) - 512 if change == "truncated" else len(raw) + 512
    with pytest.raises(
        CorruptShardError, match=rf"train-000001\.tar is damaged \({size} bytes, dataset.json"
    ):
        list(ShardReader().pieces(shard_shares(str(root), entries)))
    skipping = ShardReader(on_corrupt="skip")
    assert len(list(skipping.pieces(shard_shares(str(root), entries)))) == 5
    assert skipping.corrupt.value == 1


def test_cards_without_sizes_still_read(local_shards):
    root, entries = local_shards
    old = [{"name": e["name"], "pieces": e["pieces"]} for e in entries]
    assert len(list(ShardReader().pieces(shard_shares(str(root), old)))) == 10


# --- files for others to read --------------------------------------------------------------


def test_shards_and_cards_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        entries = write_shards(str(tmp_path / "ds"), shards=1, per_shard=2)
        storage.write_bytes(str(tmp_path / "ds" / "dataset.json"), b"{}")
    finally:
        os.umask(old)
    for name in (entries[0]["name"], "dataset.json"):
        assert (tmp_path / "ds" / name).stat().st_mode & 0o777 == 0o644, name
