"""The scaling job: a sweep's points -> the Chinchilla law, the IsoFLOP minima and the held-out
check -> ``law.json``, ``law.md``, the figures, and one wandb run in the sweep's group."""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.app import config_dict
from data_pipeline.errors import InputError, require
from mtrain.runs.tracking import LoggerConfig, log_report, table
from mtrain.scaling_laws import plots
from mtrain.scaling_laws.chinchilla import HUBER_DELTA, STARTS, fit_law
from mtrain.scaling_laws.isoflop import isoflop_minima, optimal_scaling
from mtrain.scaling_laws.points import Sweep, SweepPoint, read_sweep

log = logging.getLogger(__name__)

# The law needs 5 points for its 5 parameters.
MIN_POINTS = 5
DEFINITIONS = {
    "N": "parameters a token is multiplied by: non-embedding weights plus the output "
    "projection onto the vocabulary (mtrain.training.flops.matmul_params)",
    "D": "tokens trained on (optimizer steps x trainer.global_batch_tokens)",
    "C": "training FLOPs spent: D x flops_per_token (6N + 12·L·H·Q·T, as MFU counts them)",
    "loss": "validation loss after the last step, nats per token",
}
# Published exponents to read ours beside. Chinchilla (Hoffmann et al. 2022): approach 3's
# fit, and approaches 1-2's compute-optimal a and b of about 0.5.
REFERENCES = {
    "chinchilla": {"alpha": 0.34, "beta": 0.28, "a": 0.50, "b": 0.50},
}


@dataclass
class ScalingConfig:
    # A folder of budgeted runs: a multirun's run_dir, or a folder holding several.
    sweep_dir: str = "???"
    # Where law.json, law.md and the figures go.
    output: str = "???"
    huber_delta: float = HUBER_DELTA
    # L-BFGS starts, the grid's best (mtrain.scaling_laws.chinchilla).
    starts: int = STARTS
    # Points of fewer optimizer steps are left out of the fit (0: none is): a large model on a
    # small budget takes a handful of steps, and its loss measures the warmup, not its size.
    min_steps: int = 0
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self):
        require(
            self,
            "",
            [
                (self.huber_delta > 0, "huber_delta", "must be above 0"),
                (self.starts >= 1, "starts", "must be at least 1"),
                (self.min_steps >= 0, "min_steps", "must be at least 0"),
            ],
        )


def fit_points(points: list[SweepPoint], cfg: ScalingConfig):
    return fit_law(
        [p.params for p in points],
        [p.tokens for p in points],
        [p.loss for p in points],
        cfg.huber_delta,
        cfg.starts,
    )


def holdout(points: list[SweepPoint], cfg: ScalingConfig) -> tuple[dict, object | None]:
    """The law fitted without the largest budget, and how well it predicts that budget's best
    loss (over the sizes trained on it): the relative error of the prediction."""
    budgets = sorted({p.budget for p in points})
    largest = budgets[-1]
    fitted_on = [p for p in points if p.budget < largest]
    if len(budgets) < 2 or len(fitted_on) < MIN_POINTS:
        return {"skipped": f"needs 2 budgets and {MIN_POINTS} points below the largest"}, None
    fit = fit_points(fitted_on, cfg)
    held = [p for p in points if p.budget == largest]
    predicted = [float(fit.law.loss(p.params, p.tokens)) for p in held]
    best_predicted, best_measured = min(predicted), min(p.loss for p in held)
    return {
        "budget": largest,
        "fitted_on_budgets": budgets[:-1],
        "law": fit.law.as_dict(),
        "predicted_best_loss": best_predicted,
        "measured_best_loss": best_measured,
        "rel_error": (best_predicted - best_measured) / best_measured,
        "points": [
            {"params": p.params, "tokens": p.tokens, "measured": p.loss, "predicted": q}
            for p, q in zip(held, predicted, strict=True)
        ],
    }, fit


def scale(cfg: ScalingConfig, overrides: list[str]) -> dict:
    """Reads the sweep, fits, writes the report and figures into ``cfg.output``; returns the
    report (law.json's content)."""
    sweep = read_sweep(cfg.sweep_dir, cfg.min_steps)
    points = sweep.points
    if len(points) < MIN_POINTS:
        raise InputError(
            f"sweep_dir={cfg.sweep_dir}: {len(points)} finished point(s), "
            f"{len(sweep.set_aside)} set aside ({set_aside_said(sweep)}); the law needs at "
            f"least {MIN_POINTS} finished budgeted runs"
        )
    for aside in sweep.set_aside:
        log.warning("left out of the fit: %s: %s", aside.run_dir, aside.reason)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    fit = fit_points(points, cfg)
    minima = isoflop_minima(points)
    n_opt, d_opt = optimal_scaling(minima)
    held, held_fit = holdout(points, cfg)
    a, b = fit.law.compute_optimal_exponents
    report = {
        "sweep_dir": str(cfg.sweep_dir),
        "min_steps": cfg.min_steps,
        "definitions": DEFINITIONS,
        "law": fit.law.as_dict()
        | {"objective": fit.objective, "starts": fit.starts, "converged": fit.converged}
        | {"compute_optimal": {"a": a, "b": b}},
        "isoflop": {
            "minima": [m.as_dict() for m in minima],
            "a": None if n_opt is None else n_opt.exponent,
            "b": None if d_opt is None else d_opt.exponent,
            "n_opt": None if n_opt is None else n_opt.as_dict(),
            "d_opt": None if d_opt is None else d_opt.as_dict(),
        },
        "holdout": held,
        "references": REFERENCES,
        "points": [
            vars(p) | {"predicted": float(fit.law.loss(p.params, p.tokens))} for p in points
        ],
        "set_aside": [vars(s) for s in sweep.set_aside],
    }
    law_for_plot = held_fit.law if held_fit is not None else fit.law
    held_points = [p for p in points if p.budget == held.get("budget")]
    figures = {
        "loss_vs_flops": plots.loss_against_flops(points, fit.law, minima, out),
        "isoflop": plots.isoflop_curves(points, minima, n_opt, out),
        "predicted_vs_measured": plots.predicted_against_measured(
            points, law_for_plot, held_points, out
        ),
    }
    report["figures"] = {name: path.name for name, path in figures.items()}
    (out / "law.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "law.md").write_text(markdown(report))
    _log_to_wandb(cfg, overrides, report, figures)
    return report


def point_loss(point: dict) -> str:
    """A point's loss for law.md: with the spread of its runs when there are several."""
    if point["runs"] == 1:
        return f"{point['loss']:.4f}"
    return f"{point['loss']:.4f} ± {point['loss_std']:.4f}"


def set_aside_said(sweep: Sweep) -> str:
    return "; ".join(f"{Path(s.run_dir).name}: {s.reason}" for s in sweep.set_aside) or "none"


def _log_to_wandb(cfg: ScalingConfig, overrides: list[str], report: dict, figures: dict) -> None:
    """One run in the sweep's group (its points' runs are there already): the headline numbers
    in its summary, the points as a table, the figures as images."""
    sweep = Path(cfg.sweep_dir).resolve().name
    cfg.logger.group = cfg.logger.group or sweep
    law, held = report["law"], report["holdout"]
    summary = {f"law/{k}": law[k] for k in ("E", "A", "B", "alpha", "beta")}
    summary |= {f"law/{k}": v for k, v in law["compute_optimal"].items()}
    summary |= {f"isoflop/{k}": report["isoflop"][k] for k in ("a", "b")}
    if "rel_error" in held:
        summary["holdout/rel_error"] = held["rel_error"]

    def media() -> dict:
        import wandb

        return {
            "scaling/points": table(report["points"]),
            **{f"scaling/{name}": wandb.Image(str(path)) for name, path in figures.items()},
        }

    log_report(
        cfg.logger, f"{sweep}-law", Path(cfg.output), config_dict(cfg), overrides, summary, media
    )


def markdown(report: dict) -> str:
    law, iso, held = report["law"], report["isoflop"], report["holdout"]
    ref = report["references"]["chinchilla"]

    def num(value, spec=".3f"):
        return "-" if value is None else format(value, spec)

    lines = [
        f"# Scaling law of {report['sweep_dir']}",
        "",
        f"L(N, D) = {law['E']:.4f} + {law['A']:.4g} / N^{law['alpha']:.4f} "
        f"+ {law['B']:.4g} / D^{law['beta']:.4f}",
        "",
        "| exponent | this sweep | Chinchilla |",
        "|---|---|---|",
        f"| alpha (N) | {law['alpha']:.3f} | {ref['alpha']} |",
        f"| beta (D) | {law['beta']:.3f} | {ref['beta']} |",
        f"| a (N_opt ∝ C^a), from the law | {law['compute_optimal']['a']:.3f} | {ref['a']} |",
        f"| b (D_opt ∝ C^b), from the law | {law['compute_optimal']['b']:.3f} | {ref['b']} |",
        f"| a, IsoFLOP minima | {num(iso['a'])} | {ref['a']} |",
        f"| b, IsoFLOP minima | {num(iso['b'])} | {ref['b']} |",
        "",
        "## Held-out check",
        "",
    ]
    if "rel_error" in held:
        lines += [
            f"Fitted on budgets {', '.join(f'{c:.0e}' for c in held['fitted_on_budgets'])}, the "
            f"law predicts the best loss at {held['budget']:.0e} FLOPs as "
            f"{held['predicted_best_loss']:.4f}; measured {held['measured_best_loss']:.4f}: "
            f"relative error {held['rel_error']:+.2%}.",
        ]
    else:
        lines += [f"Skipped: {held['skipped']}."]
    lines += [
        "",
        "## IsoFLOP minima",
        "",
        "| budget (FLOPs) | sizes | N_opt | D_opt | loss | inside the sizes |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {m['budget']:.0e} | {m['sizes']} | {num(m['params'], '.3g')} | "
        f"{num(m['tokens'], '.3g')} | {num(m['loss'], '.4f')} | "
        f"{'yes' if m['interior'] else 'no'} |"
        for m in iso["minima"]
    ]
    lines += [
        "",
        "## Points",
        "",
        "| budget | depth | N | D | C | loss (mean ± std over runs) | runs | predicted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {p['budget']:.0e} | {p['depth'] or '-'} | {p['params']:,} | {p['tokens']:,} | "
        f"{p['flops']:.3g} | {point_loss(p)} | {p['runs']} | {p['predicted']:.4f} |"
        for p in sorted(report["points"], key=lambda p: (p["budget"], p["params"]))
    ]
    if report["set_aside"]:
        lines += ["", "## Left out of the fit", ""]
        lines += [f"- {s['run_dir']}: {s['reason']}" for s in report["set_aside"]]
    lines += ["", "## Definitions", ""]
    lines += [f"- {k}: {v}" for k, v in report["definitions"].items()]
    lines += ["", *(f"![{name}]({path})" for name, path in report["figures"].items()), ""]
    return "\n".join(lines)
