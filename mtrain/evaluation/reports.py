"""Musical metrics of folders of MIDI files, and of a generated folder against a reference one:
per-file values (JSON), per-feature mean/std, mgeval's overlapping area and KL divergence,
a histogram per feature (PNG) and a Markdown table. ``mtrain.evaluate`` runs it on the model's
samples against test-split pieces, or on any two folders (``midi_dir=``, ``reference_dir=``).
"""

import json
import logging
import math
from pathlib import Path

import numpy as np

from data_pipeline.reader import iter_pieces, load_card, shard_urls
from data_pipeline.tokenizer import MusicTokenizer
from mtrain.data import document
from mtrain.evaluation.music_metrics import METRICS, metrics_for_midi_dir
from mtrain.evaluation.set_comparison import compare_sets, finite_values, mean_std
from mtrain.generation.repair import to_midi

log = logging.getLogger(__name__)


def write_reference(
    tokenizer: MusicTokenizer, data_path: str, split: str, count: int, tokens: int, out: Path
) -> list[Path]:
    """The first ``count`` pieces of ``split`` (all, if it has fewer) as MIDI files, each cut
    to its first ``tokens`` model tokens after the head: the token budget of a generated
    sample, so that length-bound metrics (pitch range, pitches used) compare like with like."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for tokens_ids, meta in iter_pieces(shard_urls(data_path, split, load_card(data_path))):
        if len(paths) == count:
            break
        doc = document(tokenizer, meta["labels"], tokens_ids)[:-1]
        head = 1 + len(tokenizer.label_ids(meta["labels"]))
        score, _ = to_midi(tokenizer, doc[: head + tokens])
        path = out / f"{len(paths):03d}-{Path(meta['name']).stem}.mid"
        score.dump_midi(str(path))
        paths.append(path)
    if not paths:
        raise ValueError(f"split {split!r} of {data_path} has no pieces to compare with")
    if len(paths) < count:
        log.warning(
            "split %r of %s has %d pieces, fewer than music.num_samples=%d: the reference set "
            "is all of them",
            split,
            data_path,
            len(paths),
            count,
        )
    return paths


def summarize(per_file: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Feature -> mean, std and count of its finite values over the files."""
    summary = {}
    for feature in METRICS:
        values = finite_values(list(per_file.values()), feature)
        mean, std = mean_std(values)
        summary[feature] = {"mean": mean, "std": std, "count": int(values.size)}
    return summary


def folder_metrics(path: Path, out: Path, name: str) -> dict[str, dict[str, float]]:
    """Metrics of every MIDI file under ``path``, written to ``out/<name>_metrics.json``."""
    per_file = metrics_for_midi_dir(path)
    if not per_file:
        raise ValueError(f"{name}: no readable MIDI files (.mid/.midi) under {path}")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}_metrics.json").write_text(json.dumps(per_file, indent=1))
    return per_file


def compare_folders(generated: Path, reference: Path, out: Path) -> dict:
    """The generated-vs-reference section of a report, with a histogram per feature."""
    gen = folder_metrics(generated, out, "generated")
    ref = folder_metrics(reference, out, "reference")
    comparison = compare_sets(list(gen.values()), list(ref.values()))
    plots = histograms(gen, ref, out / "plots")
    return {
        "generated": {"path": str(generated), "pieces": len(gen)},
        "reference": {"path": str(reference), "pieces": len(ref)},
        "features": comparison,
        "plots": {k: str(v) for k, v in plots.items()},
    }


def histograms(
    generated: dict[str, dict[str, float]], reference: dict[str, dict[str, float]], out: Path
) -> dict[str, Path]:
    """One PNG per feature: the two sets' value histograms on shared bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for feature in METRICS:
        sets = {
            name: finite_values(list(per_file.values()), feature)
            for name, per_file in (("generated", generated), ("reference", reference))
        }
        both = np.concatenate(list(sets.values()))
        if both.size == 0:
            continue
        bins = np.histogram_bin_edges(both, bins=min(20, max(5, both.size // 2)))
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        for name, values in sets.items():
            ax.hist(values, bins=bins, alpha=0.55, label=f"{name} (n={values.size})")
        ax.set_title(feature)
        ax.legend(fontsize="small")
        fig.tight_layout()
        paths[feature] = out / f"{feature}.png"
        fig.savefig(paths[feature])
        plt.close(fig)
    return paths


def _fmt(value: float) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3g}"


def markdown_summary(summary: dict[str, dict[str, float]]) -> str:
    lines = ["| feature | mean | std | pieces |", "| --- | --- | --- | --- |"]
    for feature, row in summary.items():
        lines.append(f"| {feature} | {_fmt(row['mean'])} | {_fmt(row['std'])} | {row['count']} |")
    return "\n".join(lines) + "\n"


def markdown_comparison(section: dict) -> str:
    lines = [
        f"Generated ({section['generated']['pieces']} pieces) vs reference "
        f"({section['reference']['pieces']} pieces); OA: overlapping area of the intra-reference "
        "and inter-set distance densities (1 = alike), KL: KL(intra || inter) in nats (0 = "
        "alike).",
        "",
        "| feature | generated mean ± std | reference mean ± std | OA | KL |",
        "| --- | --- | --- | --- | --- |",
    ]
    for feature, row in section["features"].items():
        lines.append(
            f"| {feature} | {_fmt(row['gen_mean'])} ± {_fmt(row['gen_std'])} | "
            f"{_fmt(row['ref_mean'])} ± {_fmt(row['ref_std'])} | {_fmt(row['oa'])} | "
            f"{_fmt(row['kl'])} |"
        )
    return "\n".join(lines) + "\n"
