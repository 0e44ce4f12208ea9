"""Datasets for tests: prepared in this process from the config ``data_pipeline.prepare``
composes, or shards of random tokens written directly; read back piece by piece."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data_pipeline import prepare as prepare_app
from data_pipeline.app import CONF_DIR
from data_pipeline.reader import ShardReader, ShardShare, load_card, shard_shares
from data_pipeline.shards import ShardWriter


def prepare(source: Path, output: Path, *overrides: str) -> Path:
    """``python -m data_pipeline.prepare source=... output=... <overrides>`` without the
    process: the config the app composes, the app's own run (its file workers still start)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        raw = compose("prepare", [f"source={source}", f"output={output}", *overrides])
    prepare_app.run(OmegaConf.to_object(raw), list(overrides))
    return output


def shard_urls(output: str, split: str, card: dict | None = None) -> list[str]:
    """The URLs of a split's shards, in card order."""
    card = card or load_card(output)
    return [share.url for share in shard_shares(output, card["splits"][split]["shards"])]


def iter_pieces(urls: list[str]) -> Iterator[tuple[np.ndarray, dict]]:
    """(base token ids, metadata) of every piece in the shards, in order, read by the one
    shard reader (checked, but not against a card's piece counts)."""
    for piece in ShardReader().pieces(ShardShare(url) for url in urls):
        yield piece.tokens, piece.meta


def comparable(card: dict) -> dict:
    """What of a dataset card must not depend on how it was made (slices, workers, hosts):
    split counts with the pieces in shards added up, files, failures, labels, tokenizer."""
    splits = {
        name: {k: v for k, v in split.items() if k != "shards"}
        | {"shard_pieces": sum(s["pieces"] for s in split["shards"])}
        for name, split in card["splits"].items()
    }
    return {
        "splits": splits,
        "files": card["files"],
        "failures": card["failures"],
        "labels": card["labels"],
        "tokenizer": card["tokenizer"],
    }


def write_shards(output: str, shards: int = 3, per_shard: int = 10) -> list[dict]:
    """``shards`` train shards of ``per_shard`` pieces of random tokens (500 to 2500 each, the
    same every time); their card entries."""
    rng = np.random.default_rng(0)
    writer = ShardWriter(output, "train", 1 << 30, per_shard)
    for i in range(shards * per_shard):
        tokens = rng.integers(4, 300, size=int(rng.integers(500, 2500)), dtype=np.int16)
        writer.write(f"{i:064x}", tokens, {"labels": {}, "i": i})
    return writer.close()
