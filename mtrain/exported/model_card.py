"""The model card every export carries (``hf/README.md``): the data and its card's hash, the
tokenizer, the tokens trained, the shape, test bits per note once measured, and the command.

The facts are gathered at export (``card_facts``) and kept in the export's ``config.json``; an
evaluation on the test split adds its figures (``record_evaluation``) and renders the card again.
"""

import hashlib
import json
import logging
import shlex
from pathlib import Path

from omegaconf import OmegaConf

from data_pipeline import storage
from data_pipeline.reader import CARD_NAME
from mtrain.model import GPTConfig
from mtrain.runs.run_dir import CheckpointDir, model_shape
from mtrain.training.flops import param_count

log = logging.getLogger(__name__)
CARD = "README.md"


def card_facts(found: CheckpointDir, step: int) -> dict:
    """What the card says of a checkpoint's run: its data (path, source and the SHA-256 of its
    dataset card), the tokens trained to ``step`` and the command that trained it."""
    run = found.run
    config = _yaml(run.train_config) or {}
    data_path = (config.get("data") or {}).get("path")
    overrides = _yaml(run.train_config.with_name("overrides.yaml")) or []
    return {
        "data": _data_facts(data_path),
        "tokens_trained": _tokens_seen(run.metrics, step),
        "command": shlex.join(["python", "-m", "mtrain.train", *(overrides or [])]),
    }


def _yaml(path: Path):
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.exists() else None


def _data_facts(data_path: str | None) -> dict:
    if not data_path:
        return {"path": None}
    try:
        raw = storage.read_bytes(storage.join(data_path, CARD_NAME))
    except (OSError, ValueError):
        return {"path": data_path}  # moved or gone since training: the card says so
    card = json.loads(raw)
    return {
        "path": data_path,
        "card_sha256": hashlib.sha256(raw).hexdigest(),
        "source": card.get("source"),
        "train_tokens": card["splits"]["train"]["tokens"],
        "train_pieces": card["splits"]["train"]["pieces"],
    }


def _tokens_seen(metrics: Path, step: int) -> int | None:
    if not metrics.exists():
        return None
    seen = None
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if row.get("step", 0) <= step and "train/tokens_seen" in row:
            seen = row["train/tokens_seen"]
    return seen


def render(meta: dict) -> str:
    """The card of an export, from its ``config.json``."""
    model = GPTConfig(**model_shape(meta["model"]))
    facts = meta.get("card", {})
    data = facts.get("data", {})
    tokenizer = meta.get("tokenizer", {})
    tokens = facts.get("tokens_trained")
    lines = [
        "---",
        "library_name: transformers",
        "tags: [music, midi, symbolic-music, mtrain]",
        "---",
        "",
        f"# mtrain model: {model.n_layer} layers, {param_count(model) / 1e6:.2f}M parameters",
        "",
        "A GPT over MIDI tokens, trained with mtrain and exported from "
        f"step {meta.get('step')} (`{Path(meta.get('checkpoint', '?')).name}`).",
        "",
        "## Data",
        "",
        f"- dataset: `{data.get('path')}`"
        + (f" (source `{data['source']}`)" if data.get("source") else ""),
        "- dataset card SHA-256: "
        + (f"`{data['card_sha256']}`" if "card_sha256" in data else "unknown (data not found)"),
    ]
    if "train_tokens" in data:
        lines.append(f"- train split: {data['train_pieces']} pieces, {data['train_tokens']} tokens")
    lines += [
        "",
        "## Tokenizer",
        "",
        f"- hash `{meta.get('tokenizer_hash')}` (the artifact is in `../tokenizer/`)",
    ]
    if tokenizer:
        learned = tokenizer.get("learned_vocab_size")
        lines.append(
            f"- {tokenizer.get('kind')}, base vocabulary {tokenizer.get('base_vocab_size')}"
            + (f", learned vocabulary {learned}" if learned else "")
            + f", model vocabulary {model.vocab_size} ({len(tokenizer.get('labels', {}))} label "
            "tokens)"
        )
    lines += [
        "",
        "## Training",
        "",
        f"- tokens trained: {tokens if tokens is not None else 'unknown (no metrics.jsonl)'}",
        f"- command: `{facts.get('command', 'unknown')}`",
        "",
        "## Shape",
        "",
        "| key | value |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in meta["model"].items()),
        f"| parameters | {param_count(model)} |",
        f"| transformers class | {meta.get('hf_architecture')} |",
        "",
        "## Results",
        "",
    ]
    results = meta.get("results", {})
    if not results:
        lines.append(
            "Test bits per note: not measured yet (`python -m mtrain.evaluate "
            "checkpoint=<this export> data_path=<dataset> split=test` records them here)."
        )
    # The training data's own split first; then others (another corpus, the same pieces
    # tokenized anew), each kept under its own dataset rather than the last one replacing it.
    trained_on = data.get("path")
    for key, row in sorted(
        results.items(), key=lambda kv: (kv[1]["data_path"] != trained_on, kv[0])
    ):
        split = row.get("split", key)
        lines += [
            *([""] if lines[-1] else []),
            f"On the {split} split of `{row['data_path']}` ({row['pieces']} pieces, "
            f"{row['notes']} notes): **{row['bits_per_note']:.3f} bits per note**, "
            f"{row['bits_per_second']:.2f} bits per second, perplexity {row['perplexity']:.3f}.",
        ]
        collections = row.get("by_collection", {})
        if len(collections) > 1:
            lines += ["", "| collection | pieces | bits per note | bits per second |"]
            lines.append("| --- | --- | --- | --- |")
            lines += [
                f"| {name} | {c['pieces']} | {c['bits_per_note']:.3f} | "
                f"{c['bits_per_second']:.2f} |"
                for name, c in collections.items()
            ]
    return "\n".join(lines) + "\n"


def write_card(model_dir: Path) -> Path:
    """Renders ``hf/README.md`` from the export's ``config.json``."""
    meta = json.loads((model_dir / "config.json").read_text())
    path = model_dir / "hf" / CARD
    path.write_text(render(meta))
    return path


def record_evaluation(model_dir: Path, data_path: str, split: str, likelihood: dict) -> None:
    """Keeps an evaluation's figures in the export's ``config.json`` and renders the card
    again; an export one may not write to keeps its card (a warning says so)."""
    config = model_dir / "config.json"
    try:
        meta = json.loads(config.read_text())
        keep = ("pieces", "notes", "bits_per_note", "bits_per_second", "perplexity")
        meta.setdefault("results", {})[f"{data_path}#{split}"] = {
            "split": split,
            "data_path": data_path,
            **{k: likelihood[k] for k in keep},
            "by_collection": likelihood.get("by_collection", {}),
        }
        config.write_text(json.dumps(meta, indent=2))
        write_card(model_dir)
    except OSError as exc:
        log.warning("could not record the evaluation in %s's model card: %s", model_dir, exc)
