"""The points of a sweep: every run directory under a folder, read into (N, D, C, final
validation loss), or set aside with the reason (unfinished, diverged, no budget).

N, D and C are those the trainer worked with (``compute_budget.plan`` again, from the run's
own config and model shape): N the weights a token is multiplied by (non-embedding parameters
plus the output projection), D the tokens trained, C the FLOPs spent on them.
"""

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_pipeline.app import one_line
from data_pipeline.errors import InputError
from mtrain.model import GPTConfig
from mtrain.runs.run_dir import RunDir, model_shape
from mtrain.training.compute_budget import plan
from mtrain.training.config import TrainerConfig

# A run whose final validation loss is this far above its training loss at its best has
# diverged, even where every value stayed finite (a spike the run recovers from is none).
DIVERGED_RISE = 1.5


@dataclass(frozen=True)
class SweepPoint:
    run_dir: str
    depth: int | None
    budget: float  # trainer.flops_budget, the IsoFLOP group the point belongs to
    params: int  # N
    tokens: int  # D
    flops: float  # C, within half a step of the budget
    loss: float  # the validation loss after the last step (the mean over ``runs``)
    steps: int  # optimizer steps taken
    runs: int = 1  # runs of this size on this budget (repeats under other seeds), averaged
    loss_std: float = 0.0  # the spread of their losses (population std; 0 for one run)


@dataclass(frozen=True)
class SetAside:
    run_dir: str
    reason: str


@dataclass(frozen=True)
class Sweep:
    points: list[SweepPoint]
    set_aside: list[SetAside]

    @property
    def budgets(self) -> list[float]:
        return sorted({p.budget for p in self.points})


def run_dirs(root: Path) -> list[Path]:
    """Every run directory under ``root`` (itself included): a folder that holds the training
    config as Hydra wrote it (``hydra/config.yaml``)."""
    found = [p.parent.parent for p in root.rglob("config.yaml") if p.parent.name == "hydra"]
    return sorted(d for d in found if RunDir(d).train_config.exists())


def read_sweep(root: str | Path, min_steps: int = 0) -> Sweep:
    """Every point under ``root``; an absent, empty or foreign folder is refused in one line
    naming what is missing. A point of fewer than ``min_steps`` optimizer steps is set aside:
    its loss says more about the warmup than about the size. Runs of one size on one budget
    are one point (``repeats_averaged``)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"sweep_dir={root} is not a directory")
    dirs = run_dirs(root)
    if not dirs:
        raise InputError(
            f"sweep_dir={root} holds no training run: a run directory has hydra/config.yaml, "
            "model_config.json and metrics.jsonl (python -m mtrain.train -m model=scaling "
            f"model.depth=... trainer.flops_budget=... run_dir={root})"
        )
    points, set_aside = [], []
    for d in dirs:
        found = read_point(RunDir(d))
        if isinstance(found, SweepPoint) and found.steps < min_steps:
            found = SetAside(
                found.run_dir, f"{found.steps} steps, fewer than min_steps={min_steps}"
            )
        (points if isinstance(found, SweepPoint) else set_aside).append(found)
    return Sweep(repeats_averaged(points), set_aside)


def repeats_averaged(points: list[SweepPoint]) -> list[SweepPoint]:
    """Runs of the same N and D on one budget (repeats under other seeds) as one point at their
    mean loss: the law is fitted to, and the held-out check compares with, a size's expected
    loss, not the luckiest of its draws. The point keeps the first run's directory."""
    repeats: dict[tuple, list[SweepPoint]] = {}
    for point in points:
        repeats.setdefault((point.budget, point.params, point.tokens), []).append(point)
    averaged = []
    for runs in repeats.values():
        found = [p.loss for p in runs]
        averaged.append(
            replace(
                runs[0],
                loss=float(np.mean(found)),
                runs=len(runs),
                loss_std=float(np.std(found)),
            )
        )
    return averaged


def read_point(run: RunDir) -> SweepPoint | SetAside:
    """The point a run directory holds, or why it is set aside."""
    where = str(run.root)
    try:
        recorded = OmegaConf.load(run.train_config)
        trainer_cfg = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(TrainerConfig), recorded.get("trainer") or {})
        )
    except (ValueError, OmegaConfBaseException) as exc:
        return SetAside(where, f"not a training config this mtrain reads: {one_line(str(exc))}")
    budget = trainer_cfg.flops_budget
    if budget is None:
        return SetAside(where, "no trainer.flops_budget: not a point of a compute grid")
    if not run.model_config.exists():
        return SetAside(where, "unfinished: never started training (no model_config.json)")
    model = GPTConfig(**model_shape(json.loads(run.model_config.read_text())))
    found = plan(model, budget, trainer_cfg.global_batch_tokens)
    rows = read_metrics(run.metrics)
    last = rows[-1]["step"] if rows else 0
    bad = [r["step"] for r in rows if not all(map(math.isfinite, losses(r)))]
    if bad:
        return SetAside(where, f"diverged: non-finite loss at step {bad[0]}")
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    if last < found.steps:
        return SetAside(where, f"unfinished: step {last} of {found.steps}")
    final = next(
        (r["val/loss"] for r in rows if r["step"] == found.steps and "val/loss" in r), None
    )
    if final is None:
        return SetAside(where, f"no validation loss at its last step {found.steps}")
    if train and final >= train[0]:
        return SetAside(
            where, f"diverged: final validation loss {final:.3f} is no lower than at the start"
        )
    best = best_tenth(train)
    if best is not None and final > DIVERGED_RISE * best:
        return SetAside(
            where,
            f"diverged: final validation loss {final:.3f} is {final / best:.1f}x the training "
            f"loss of its best tenth of the run ({best:.3f})",
        )
    return SweepPoint(
        where, model.depth, budget, found.params, found.tokens, found.flops, final, found.steps
    )


def best_tenth(train: list[float]) -> float | None:
    """The lowest mean training loss over a tenth of the run (None without any). Means over
    tenths, and the check against the validation loss, because one stream's training loss
    climbs for hundreds of steps on a long piece unlike the rest (a sweep reads one stream),
    while the model is fine."""
    if not train:
        return None
    tenth = max(1, len(train) // 10)
    return min(
        float(np.mean(train[i : i + tenth])) for i in range(0, len(train) - tenth + 1, tenth)
    )


def losses(row: dict) -> list[float]:
    return [row[k] for k in ("train/loss", "val/loss") if row.get(k) is not None]


def read_metrics(path: Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` (none when absent); a line cut short by a crash is
    skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows
