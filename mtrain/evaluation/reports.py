"""Musical metrics of sets of pieces, and of a generated set against a reference one: per-piece
values (JSON), per-feature mean/std, mgeval's overlapping area and KL divergence, a histogram
per feature (PNG) and a Markdown table. ``mtrain.evaluate`` runs it on the model's samples
against test-split pieces (measured as scores, written as MIDI files), or on any two folders of
MIDI files (``midi_dir=``, ``reference_dir=``).
"""

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from symusic import Score

from data_pipeline.reader import StoredPiece
from data_pipeline.tokenizer import MusicTokenizer
from mtrain.evaluation.music_metrics import METRICS, compute_all, read_midi_dir
from mtrain.evaluation.set_comparison import compare_sets, finite_values, mean_std
from mtrain.generation.repair import to_midi

log = logging.getLogger(__name__)


@dataclass
class MeasuredSet:
    """The musical metrics of a set of pieces, keyed by file name, the folder that holds their
    MIDI files, and the pieces that failed (no notes, or not a readable MIDI file) with why.
    A failed piece is left out of every metric alike and counted in ``empty_rate``."""

    path: Path
    per_piece: dict[str, dict[str, float]]
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def empty_rate(self) -> float:
        total = len(self.per_piece) + len(self.failed)
        return len(self.failed) / total if total else math.nan

    def describe(self) -> dict:
        return {
            "path": str(self.path),
            "pieces": len(self.per_piece),
            "failed": len(self.failed),
            "empty_rate": self.empty_rate,
        }


def measure(scores: dict[str, Score], path: Path, failed: dict[str, str] | None = None):
    """The metrics of every score that holds notes; the others join ``failed``."""
    failed = dict(failed or {})
    per_piece = {}
    for name, score in scores.items():
        if score.note_num() == 0:
            failed[name] = "empty: no notes"
        else:
            per_piece[name] = compute_all(score)
    return MeasuredSet(path, per_piece, failed)


def reference_scores(
    tokenizer: MusicTokenizer, pieces: Iterable[StoredPiece], count: int, tokens: int
) -> dict[str, Score]:
    """The first ``count`` pieces (all, if there are fewer) as scores keyed by a file name,
    each cut to its first ``tokens`` model tokens after the head: the token budget of a
    generated sample, so that length-bound metrics (pitch range, pitches used) compare like
    with like."""
    scores = {}
    for piece in pieces:
        if len(scores) == count:
            break
        head = len(tokenizer.head(piece.labels))
        doc = tokenizer.document(piece.labels, piece.tokens, end=False)
        score, _ = to_midi(tokenizer, doc[: head + tokens])
        scores[f"{len(scores):03d}-{Path(piece.meta['name']).stem}.mid"] = score
    if len(scores) < count:
        log.warning(
            "the split has %d pieces, fewer than music.num_samples=%d: the reference set is "
            "all of them",
            len(scores),
            count,
        )
    return scores


def save_scores(scores: dict[str, Score], folder: Path) -> MeasuredSet:
    """Writes each score to ``folder`` as a MIDI file, for listening (and for prompts), and
    measures the scores themselves rather than the files read back."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, score in scores.items():
        score.dump_midi(str(folder / name))
    return measure(scores, folder)


def measure_folder(path: Path, key: str) -> MeasuredSet:
    """The metrics of every MIDI file under ``path`` (the folder the config's ``key`` names)."""
    scores, unreadable = read_midi_dir(path)
    if not scores:
        raise ValueError(f"{key}={path}: no readable MIDI files (.mid/.midi) under it")
    return measure(scores, path, unreadable)


def save_metrics(pieces: MeasuredSet, out: Path, name: str) -> None:
    """The per-piece values as ``out/<name>_metrics.json``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}_metrics.json").write_text(json.dumps(pieces.per_piece, indent=1))
    if pieces.failed:
        (out / f"{name}_failed.json").write_text(json.dumps(pieces.failed, indent=1))


def summarize(pieces: MeasuredSet) -> dict[str, dict[str, float]]:
    """Feature -> mean, std and count of its finite values over the pieces."""
    summary = {}
    for feature in METRICS:
        values = finite_values(list(pieces.per_piece.values()), feature)
        mean, std = mean_std(values)
        summary[feature] = {"mean": mean, "std": std, "count": int(values.size)}
    return summary


def compare(generated: MeasuredSet, reference: MeasuredSet, out: Path) -> dict:
    """The generated-vs-reference section of a report, with each set's per-piece values and a
    histogram per feature."""
    save_metrics(generated, out, "generated")
    save_metrics(reference, out, "reference")
    gen, ref = list(generated.per_piece.values()), list(reference.per_piece.values())
    plots = histograms(generated.per_piece, reference.per_piece, out / "plots")
    return {
        "generated": generated.describe(),
        "reference": reference.describe(),
        "features": compare_sets(gen, ref),
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


def pieces_text(described: dict) -> str:
    """'16 pieces', or '14 pieces; 2 of 16 empty or unreadable (12%), left out'."""
    text = f"{described['pieces']} pieces"
    failed = described.get("failed", 0)
    if failed:
        total = failed + described["pieces"]
        text += f"; {failed} of {total} empty or unreadable ({failed / total:.0%}), left out"
    return text


def markdown_comparison(section: dict) -> str:
    lines = [
        f"Generated ({pieces_text(section['generated'])}) vs reference "
        f"({pieces_text(section['reference'])}); OA: overlapping area of the intra-reference "
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
