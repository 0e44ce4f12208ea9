"""An evaluation job, what ``python -m mtrain.evaluate`` runs: a trained model, or any folder
of MIDI files.

``checkpoint=<export or run dir> data_path=<dataset> output=<dir>``
scores a split of the prepared dataset (NLL and perplexity per token, bits per note and per
second of music, NLL by token type), then generates ``music.num_samples`` pieces and compares
their musical metrics with as many pieces of the split (mean/std per feature, mgeval's
overlapping area and KL divergence, a histogram per feature).

``baseline=ngram data_path=<dataset> output=<dir>`` scores the split with no model: a
Kneser-Ney n-gram model counted on the train split, the floor any model must beat.

``midi_dir=<folder> output=<dir> [reference_dir=<folder>]`` computes
the same metrics for every MIDI file under a folder, and compares it with a reference folder
when one is given: the code path the model's samples go through.

Writes ``report.json``, ``report.md``, per-file ``*_metrics.json`` and ``plots/*.png``; logs
them to wandb with ``logger.mode=offline|online``.
"""

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from enum import Enum
from itertools import islice
from pathlib import Path

from data_pipeline import storage
from data_pipeline.app import config_dict
from data_pipeline.errors import ConfigError, require
from data_pipeline.reader import ShardReader, load_card, split_shares
from data_pipeline.tokenizer import MusicTokenizer
from mtrain.data.fill_in_middle import check_infillable
from mtrain.evaluation import reports
from mtrain.evaluation.infill import InfillEvalConfig, evaluate_infilling, infill_markdown
from mtrain.evaluation.likelihood import evaluate_pieces
from mtrain.evaluation.ngram import evaluate_floor
from mtrain.exported.loading import load_for_data
from mtrain.exported.model_card import record_evaluation
from mtrain.generation.compose import DEFAULT_MIN_P, compose
from mtrain.generation.prompts import build_prompt, parse_labels
from mtrain.generation.sampling import SamplingConfig
from mtrain.runs.tracking import LoggerConfig, WandbMode, log_report, table

log = logging.getLogger(__name__)


@dataclass
class MusicEvalConfig:
    """The generated-vs-reference comparison of a model evaluation."""

    # Pieces generated, and reference pieces taken from the split; 0 skips the comparison.
    num_samples: int = 16
    batch_size: int = 8
    # Conditioning labels for the samples (kind:value+...); none: the model picks its own.
    label: str | None = None
    # max_new_tokens is also the token budget each reference piece is cut to.
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(max_new_tokens=384, min_p=DEFAULT_MIN_P)
    )

    def __post_init__(self):
        require(
            self,
            "music",
            [
                (self.num_samples >= 0, "num_samples", "must be at least 0 (0: no comparison)"),
                (self.batch_size >= 1, "batch_size", "must be at least 1"),
            ],
        )


class Baseline(Enum):
    none = "none"
    # A Kneser-Ney n-gram model counted on the train split (order: ngram_order).
    ngram = "ngram"


@dataclass
class EvaluateConfig:
    # An exported model directory, or a run directory (its newest checkpoint is exported).
    checkpoint: str | None = None
    # The prepared dataset to score (a directory or URL written by data_pipeline.prepare).
    data_path: str = "data/bach"
    output: str = "???"
    split: str = "test"
    batch_size: int = 8
    max_pieces: int | None = None
    music: MusicEvalConfig = field(default_factory=MusicEvalConfig)
    # infill.bars=2: fill 2 bars in the middle of each piece (a model trained with
    # data.infill_rate > 0), NLL with and without the suffix, filled vs true bars' metrics.
    infill: InfillEvalConfig = field(default_factory=InfillEvalConfig)
    # Where the model runs: auto (the GPU when there is one), cpu, cuda, cuda:1, ...
    device: str = "auto"
    # Metrics only, no model: every MIDI file under midi_dir, against reference_dir if given.
    midi_dir: str | None = None
    reference_dir: str | None = None
    # No model: a baseline scores the split, on the same documents and targets as a model.
    baseline: Baseline = Baseline.none
    ngram_order: int = 5
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(mode=WandbMode.disabled))

    def __post_init__(self):
        given = [bool(self.checkpoint), bool(self.midi_dir), self.baseline != Baseline.none]
        if sum(given) != 1:
            raise ConfigError(
                "give checkpoint=<export or run dir> to evaluate a model, baseline=ngram for the "
                "n-gram floor of data_path, or midi_dir=<folder> for the musical metrics of "
                "MIDI files (one of them)"
            )
        require(
            self,
            "",
            [
                (self.batch_size >= 1, "batch_size", "must be at least 1"),
                (self.max_pieces is None or self.max_pieces >= 1, "max_pieces", "must be >= 1"),
                (self.ngram_order >= 1, "ngram_order", "must be at least 1"),
            ],
        )


def markdown(report: dict) -> str:
    """The report as Markdown: the likelihood tables of a model, then the musical metrics."""
    lines = []
    if "likelihood" in report:
        lines += likelihood_markdown(report)
    if "metrics" in report:
        lines += [f"# Musical metrics of {report['midi_dir']} ({reports.pieces_text(report)})", ""]
        lines.append(reports.markdown_summary(report["metrics"]))
    if "music" in report:
        lines += ["## Musical metrics: generated vs reference", ""]
        lines.append(reports.markdown_comparison(report["music"]))
    if "infill" in report:
        lines += infill_markdown(report["infill"])
    return "\n".join(lines) + "\n"


def likelihood_markdown(report: dict) -> list[str]:
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
    collections = report["likelihood"].get("by_collection", {})
    if len(collections) > 1:
        lines += [
            "",
            "| collection | pieces | notes | bits per note | bits per second |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, row in collections.items():
            lines.append(
                f"| {name} | {row['pieces']} | {row['notes']} | {row['bits_per_note']:.3f} | "
                f"{row['bits_per_second']:.2f} |"
            )
    return [*lines, ""]


def evaluate_model(cfg: EvaluateConfig, out: Path) -> dict:
    model, meta, tokenizer, card, model_dir = load_for_data(
        cfg.checkpoint, cfg.data_path, cfg.split, cfg.device
    )
    # A damaged shard stops the evaluation, named: a score over part of a split would mislead.
    reader = ShardReader(len(tokenizer.base))
    shares = split_shares(cfg.data_path, cfg.split, card)
    report = {
        "checkpoint": str(model_dir),
        "step": meta["step"],
        "data_path": cfg.data_path,
        "split": cfg.split,
        "likelihood": evaluate_pieces(
            model, tokenizer, islice(reader.pieces(shares), cfg.max_pieces), cfg.batch_size
        ),
    }
    if cfg.max_pieces is None:
        # A whole split measured: the export's model card shows it from now on.
        record_evaluation(model_dir, cfg.data_path, cfg.split, report["likelihood"])
    m = cfg.music
    if m.num_samples:
        log.info("generating %d pieces to compare with the %s split", m.num_samples, cfg.split)
        prompt = build_prompt(tokenizer, parse_labels(m.label), None)
        # The budget both sets are held to: what fits in the model's context after the head.
        budget = min(m.sampling.max_new_tokens, model.config.max_seq_len - len(prompt))
        sampling = dataclasses.replace(m.sampling, max_new_tokens=budget)
        pieces = compose(model, tokenizer, prompt, m.num_samples, sampling, m.batch_size)
        generated = {f"sample-{i:03d}.mid": piece.score for i, piece in enumerate(pieces)}
        reference = reports.reference_scores(
            tokenizer, reader.pieces(shares), m.num_samples, budget
        )
        report["music"] = reports.compare(
            reports.save_scores(generated, out / "generated"),
            reports.save_scores(reference, out / "reference"),
            out,
        )
        report["music"]["repairs"] = sum(p.repairs for p in pieces)
    if cfg.infill.bars:
        check_infillable(tokenizer, f"infill.bars={cfg.infill.bars}", meta)
        log.info(
            "filling %d bars in %d pieces of %s", cfg.infill.bars, cfg.infill.max_pieces, cfg.split
        )
        pieces = islice(reader.pieces(shares), cfg.infill.max_pieces)
        report["infill"] = evaluate_infilling(model, tokenizer, pieces, cfg.infill)
    return report


def evaluate_baseline(cfg: EvaluateConfig) -> dict:
    """The n-gram floor: counted on the train split of ``data_path``, scored on ``split``."""
    card = load_card(cfg.data_path)
    if cfg.split not in card["splits"]:
        splits = ", ".join(card["splits"])
        raise ValueError(f"split={cfg.split}: {cfg.data_path} has splits {splits}")
    tokenizer = MusicTokenizer.load(storage.join(cfg.data_path, card["tokenizer"]["path"]))
    reader = ShardReader(len(tokenizer.base))
    train = reader.pieces(split_shares(cfg.data_path, "train", card))
    pieces = islice(reader.pieces(split_shares(cfg.data_path, cfg.split, card)), cfg.max_pieces)
    return {
        "checkpoint": f"baseline: Kneser-Ney {cfg.ngram_order}-gram (train split)",
        "data_path": cfg.data_path,
        "split": cfg.split,
        "likelihood": evaluate_floor(tokenizer, train, pieces, cfg.ngram_order),
    }


def evaluate_midi(cfg: EvaluateConfig, out: Path) -> dict:
    report = {"midi_dir": cfg.midi_dir}
    pieces = reports.measure_folder(Path(cfg.midi_dir), "midi_dir")
    if cfg.reference_dir:
        reference = reports.measure_folder(Path(cfg.reference_dir), "reference_dir")
        report["music"] = reports.compare(pieces, reference, out)
    else:
        reports.save_metrics(pieces, out, "midi_dir")
        report["metrics"] = reports.summarize(pieces)
        report["pieces"] = len(pieces.per_piece)
        report["failed"] = len(pieces.failed)
        report["empty_rate"] = pieces.empty_rate
    return report


def evaluate(cfg: EvaluateConfig, overrides: list[str] = ()) -> dict:
    for key in ("midi_dir", "reference_dir"):
        if getattr(cfg, key) and not Path(getattr(cfg, key)).is_dir():
            raise FileNotFoundError(f"{key}={getattr(cfg, key)} is not a directory")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.checkpoint:
        report = evaluate_model(cfg, out)
    elif cfg.baseline != Baseline.none:
        report = evaluate_baseline(cfg)
    else:
        report = evaluate_midi(cfg, out)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    log_to_wandb(cfg, out, report, overrides)
    return report


def log_to_wandb(cfg: EvaluateConfig, out: Path, report: dict, overrides) -> None:
    """Headline numbers to the summary, the feature comparison as a table, the plots as
    images."""
    summary = {
        f"likelihood/{k}": v
        for k, v in report.get("likelihood", {}).items()
        if isinstance(v, int | float)
    }
    features = report.get("music", {}).get("features", {})
    summary |= {f"music/{name}/oa": row["oa"] for name, row in features.items()}
    summary |= {f"music/{name}/kl": row["kl"] for name, row in features.items()}
    if "music" in report:
        summary["music/empty_rate"] = report["music"]["generated"]["empty_rate"]

    def media() -> dict:
        if "music" not in report:
            return {}
        import wandb

        rows = [{"feature": name, **row} for name, row in features.items()]
        plots = report["music"]["plots"].items()
        return {
            "music/comparison": table(rows),
            **{f"music/plots/{name}": wandb.Image(path) for name, path in plots},
        }

    config = config_dict(cfg)
    log_report(cfg.logger, f"evaluate-{out.name}", out, config, overrides, summary, media)
