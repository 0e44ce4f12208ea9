"""Reading a prepared dataset back: its card, its shard URLs and its pieces."""

import io
import json
from collections.abc import Iterator

import numpy as np
import webdataset as wds

from data_pipeline import storage

CARD_NAME = "dataset.json"


def load_card(output: str) -> dict:
    url = storage.join(output, CARD_NAME)
    if not storage.exists(url):
        raise FileNotFoundError(
            f"{url} not found: {output} is not a complete dataset. Build it with "
            f"`python -m data_pipeline.prepare output={output}` (or run the merge step "
            "if it was prepared in slices)"
        )
    return json.loads(storage.read_bytes(url))


def shard_urls(output: str, split: str, card: dict | None = None) -> list[str]:
    card = card or load_card(output)
    return [storage.join(output, s["name"]) for s in card["splits"][split]["shards"]]


def decode_tokens(npy: bytes) -> np.ndarray:
    return np.load(io.BytesIO(npy), allow_pickle=False)


def iter_pieces(urls: list[str]) -> Iterator[tuple[np.ndarray, dict]]:
    """(base token ids, metadata) of every piece in the shards, in order."""
    storage.register_webdataset_schemes()
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        yield decode_tokens(sample["tokens.npy"]), json.loads(sample["json"])
