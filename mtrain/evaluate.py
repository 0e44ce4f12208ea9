"""Evaluate a trained model: ``python -m mtrain.evaluate checkpoint=<export or run dir>
data_path=<dataset> output=<dir>``.

Writes ``report.json`` and ``report.md``: NLL and perplexity per token, bits per note and per
second of music, and the NLL by token type, on a split of the prepared dataset.
"""

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore

from data_pipeline.reader import load_card
from data_pipeline.tokenizer import MusicTokenizer
from mtrain.export import exported_model_dir, load_exported
from mtrain.likelihood import evaluate_split

log = logging.getLogger(__name__)


@dataclass
class EvaluateConfig:
    # An exported model directory, or a run directory (its newest checkpoint is exported).
    checkpoint: str = "???"
    # The prepared dataset to score (a directory or URL written by data_pipeline.prepare).
    data_path: str = "data/bach"
    output: str = "???"
    split: str = "test"
    batch_size: int = 8
    max_pieces: int | None = None


def markdown(report: dict) -> str:
    lines = [
        f"# Evaluation: {report['checkpoint']} on {report['data_path']} ({report['split']})",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    for key in (
        "pieces",
        "tokens",
        "notes",
        "seconds",
        "perplexity",
        "bits_per_token",
        "bits_per_note",
        "bits_per_second",
    ):
        value = report["likelihood"][key]
        lines.append(
            f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
        )
    lines += [
        "",
        "| token type | tokens | NLL (nats) | share of bits |",
        "| --- | --- | --- | --- |",
    ]
    for kind, row in report["likelihood"]["by_token_type"].items():
        lines.append(
            f"| {kind} | {row['tokens']} | {row['nll_nats']:.3f} | {row['share_of_bits']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def run(cfg: EvaluateConfig) -> dict:
    model_dir = exported_model_dir(cfg.checkpoint)
    model, meta = load_exported(model_dir)
    tokenizer = MusicTokenizer.load(str(model_dir / "tokenizer"))
    card = load_card(cfg.data_path)
    if card["tokenizer"]["hash"] != tokenizer.hash:
        raise ValueError(
            f"data_path={cfg.data_path} was tokenized with tokenizer "
            f"{card['tokenizer']['hash'][:12]}, the model with {tokenizer.hash[:12]}: evaluate "
            "on data prepared with the model's tokenizer"
        )
    report = {
        "checkpoint": str(model_dir),
        "step": meta["step"],
        "data_path": cfg.data_path,
        "split": cfg.split,
        "likelihood": evaluate_split(
            model, tokenizer, cfg.data_path, cfg.split, cfg.batch_size, cfg.max_pieces
        ),
    }
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: EvaluateConfig) -> None:
    try:
        report = run(cfg)
    except (FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        sys.exit(2)
    print(markdown(report))


ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)

if __name__ == "__main__":
    main()
