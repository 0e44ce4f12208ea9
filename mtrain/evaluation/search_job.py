"""A search, what ``python -m mtrain.search`` runs: the pieces of an index (built by
``mtrain.embed``) nearest to a MIDI file or to one of its pieces, and adding MIDI files to it
without embedding the pieces already there."""

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline import storage
from data_pipeline.errors import require
from data_pipeline.midi_file import MidiFileError, read_score
from data_pipeline.tokenizer import MusicTokenizer
from mtrain.evaluation.pooling import MeanPooler, embedding_model_id
from mtrain.evaluation.search_index import PieceIndex
from mtrain.exported.loading import load_for_inference

log = logging.getLogger(__name__)

MIDI_SUFFIXES = (".mid", ".midi")


@dataclass
class SearchConfig:
    # A directory written by mtrain.embed (index.faiss, index.json, pieces.jsonl).
    index: str = "???"
    # A MIDI file, or the id (or a unique prefix of it) of a piece of the index.
    query: str | None = None
    k: int = 10
    # A MIDI file or a directory of them to add to the index (embedded with its model).
    add: str | None = None
    # The model that embeds queries and added files; None: the one the index records.
    checkpoint: str | None = None
    device: str = "auto"
    batch_size: int = 8

    def __post_init__(self):
        require(
            self,
            "",
            [
                (self.k >= 1, "k", "must be at least 1"),
                (self.query is not None or self.add is not None, "query", "give query= or add="),
            ],
        )


class Embedder:
    """The index's model, checked to be the one that made the index, embedding MIDI files."""

    def __init__(self, index: PieceIndex, cfg: SearchConfig):
        checkpoint = cfg.checkpoint or index.checkpoint
        model, _, self.tokenizer, model_dir = load_for_inference(checkpoint, cfg.device)
        index.check_model(embedding_model_id(model_dir, index.layer))
        self.model, self.layer, self.batch_size = model, index.layer, cfg.batch_size

    def __call__(self, paths: list[str]) -> np.ndarray:
        """[files, d_model] mean hidden states; a file that is not MIDI or has no notes is
        refused in one line (ValueError)."""
        pooler = MeanPooler(self.model, self.layer, self.batch_size)
        for path in paths:
            pooler.add(self.tokenizer.document({}, file_base_ids(self.tokenizer, path), end=False))
        return pooler.means()


def file_base_ids(tokenizer: MusicTokenizer, path: str) -> np.ndarray:
    """A query file's base ids, read and tokenized as prepare reads and tokenizes a file for the
    shards (the same tokens for the same bytes); a file that is not MIDI or has no notes is
    refused in one line (ValueError)."""
    try:
        score = read_score(storage.read_bytes(path))
    except (OSError, MidiFileError) as exc:
        raise ValueError(f"{path} is not a readable MIDI file ({exc})") from exc
    if score.note_num() == 0:
        raise ValueError(f"{path} holds no notes: nothing to compare")
    return tokenizer.midi_to_base_ids(score)


def find_row(index: PieceIndex, query: str) -> int:
    matches = [i for i, row in enumerate(index.rows) if row["id"].startswith(query.lower())]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ValueError(
            f"query={query}: neither a MIDI file nor the id of a piece of the index "
            "(the 'id' field of its pieces.jsonl)"
        )
    raise ValueError(f"query={query}: {len(matches)} pieces' ids start with it; give more of it")


def midi_files(path: str) -> list[str]:
    root = Path(path)
    if root.is_dir():
        return sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES)
    if root.exists():
        return [str(root)]
    raise FileNotFoundError(f"add={path}: no such file or directory")


def add_files(index: PieceIndex, embedder: Embedder, path: str) -> int:
    """Embeds the MIDI files under ``path`` the index lacks (by content hash) and adds them;
    a file that is not MIDI or has no notes is skipped, said and counted."""
    known = {row["id"] for row in index.rows}
    rows, vectors, skipped = [], [], 0
    for file in midi_files(path):
        piece_id = hashlib.sha256(storage.read_bytes(file)).hexdigest()
        if piece_id in known:
            continue
        try:
            vectors.append(embedder([file])[0])
        except ValueError as exc:
            log.warning("skipped %s: %s", file, exc)
            skipped += 1
            continue
        known.add(piece_id)
        rows.append({"id": piece_id, "name": Path(file).name, "labels": {}, "tokens": None})
    if rows:
        index.add(np.stack(vectors), rows)
    log.info("added %d pieces (%d skipped as unreadable or empty)", len(rows), skipped)
    return len(rows)


def search(cfg: SearchConfig) -> dict:
    index = PieceIndex.load(Path(cfg.index))
    embedder = Embedder(index, cfg)
    added = 0
    if cfg.add is not None:
        added = add_files(index, embedder, cfg.add)
        index.save(Path(cfg.index))
    result = {"added": added, "pieces": len(index.rows), "query": cfg.query, "neighbours": []}
    if cfg.query is None:
        return result
    query = str(cfg.query)
    if query.lower().endswith(MIDI_SUFFIXES) or Path(query).is_file():
        scores, found = index.search(embedder([query]), cfg.k)
    else:
        row = find_row(index, query)
        scores, found = index.search_stored(row, cfg.k)
    result["neighbours"] = [
        {**index.rows[i], "score": float(s)}
        for i, s in zip(found[0], scores[0], strict=True)
        if i >= 0
    ]
    return result


def markdown(result: dict) -> str:
    lines = [
        f"{result['pieces']} pieces in the index"
        + (f" ({result['added']} added)" if result["added"] else "")
    ]
    if result["query"] is not None:
        lines += [
            "",
            f"Nearest to {result['query']}:",
            "",
            "| rank | cosine | name | labels | id |",
            "| --- | --- | --- | --- | --- |",
        ]
        for rank, n in enumerate(result["neighbours"], 1):
            labels = ", ".join(f"{k}={v}" for k, v in sorted(n["labels"].items())) or "-"
            lines.append(f"| {rank} | {n['score']:.3f} | {n['name']} | {labels} | {n['id'][:16]} |")
    return "\n".join(lines)
