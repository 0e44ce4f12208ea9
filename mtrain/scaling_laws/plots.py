"""The figures of a fitted sweep, as PNG files: loss against FLOPs per size with the frontier,
the IsoFLOP curves, and the law's predictions against the measured losses."""

from pathlib import Path

import numpy as np

from mtrain.scaling_laws.chinchilla import ChinchillaLaw
from mtrain.scaling_laws.isoflop import IsoFlopMinimum, PowerLaw
from mtrain.scaling_laws.points import SweepPoint


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def sizes(points: list[SweepPoint]) -> dict[int, float]:
    """Each size N swept and its FLOPs per token (C / D of its points)."""
    return {p.params: p.flops / p.tokens for p in points}


def frontier(law: ChinchillaLaw, points: list[SweepPoint], flops) -> np.ndarray:
    """The law's best loss at each of ``flops`` over the sizes swept."""
    per_size = [law.loss(n, np.asarray(flops) / f) for n, f in sizes(points).items()]
    return np.min(per_size, axis=0)


def loss_against_flops(
    points: list[SweepPoint], law: ChinchillaLaw, minima: list[IsoFlopMinimum], out: Path
) -> Path:
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    for n in sorted(sizes(points)):
        mine = sorted((p for p in points if p.params == n), key=lambda p: p.flops)
        depth = mine[0].depth
        label = f"N={n / 1e6:.2f}M" + (f" (depth {depth})" if depth else "")
        ax.plot([p.flops for p in mine], [p.loss for p in mine], "o-", label=label, alpha=0.8)
    flops = np.geomspace(min(p.flops for p in points) / 1.5, max(p.flops for p in points) * 1.5)
    ax.plot(flops, frontier(law, points, flops), "k--", label="fitted frontier")
    found = [m for m in minima if m.loss is not None]
    ax.plot([m.budget for m in found], [m.loss for m in found], "k*", ms=12, label="IsoFLOP minima")
    ax.set(xscale="log", xlabel="training FLOPs (C)", ylabel="validation loss (nats/token)")
    ax.set_title("Loss against compute, per model size")
    ax.legend(fontsize=7)
    return _save(fig, out / "loss_vs_flops.png")


def isoflop_curves(
    points: list[SweepPoint],
    minima: list[IsoFlopMinimum],
    n_opt: PowerLaw | None,
    out: Path,
) -> Path:
    fig, (left, right) = _pyplot().subplots(1, 2, figsize=(11, 4.5))
    for m in minima:
        mine = sorted((p for p in points if p.budget == m.budget), key=lambda p: p.params)
        ns = np.array([p.params for p in mine])
        line = left.plot(ns, [p.loss for p in mine], "o", label=f"C={m.budget:.0e}")[0]
        if len(mine) >= 3:
            fit = np.polyfit(np.log(ns), [p.loss for p in mine], 2)
            grid = np.geomspace(ns.min() / 1.3, ns.max() * 1.3)
            left.plot(grid, np.polyval(fit, np.log(grid)), "-", color=line.get_color())
        if m.params is not None:
            left.plot(
                m.params,
                m.loss,
                "*",
                ms=12,
                color=line.get_color(),
                mfc="none" if not m.interior else line.get_color(),
            )
    left.set(
        xscale="log",
        xlabel="parameters (N)",
        ylabel="validation loss (nats/token)",
        title="IsoFLOP curves (open star: vertex outside the sizes)",
    )
    left.legend(fontsize=7)
    inside = [m for m in minima if m.interior]
    right.set(xlabel="training FLOPs (C)", ylabel="N_opt", title="Compute-optimal size")
    if not inside:
        right.text(
            0.5,
            0.5,
            "no budget has its minimum\ninside the sizes trained",
            ha="center",
            va="center",
            transform=right.transAxes,
        )
        return _save(fig, out / "isoflop.png")
    right.plot([m.budget for m in inside], [m.params for m in inside], "k*", ms=12)
    if n_opt is not None:
        grid = np.geomspace(min(m.budget for m in minima), max(m.budget for m in minima))
        right.plot(grid, n_opt(grid), "k--", label=f"N_opt ∝ C^{n_opt.exponent:.2f}")
        right.legend()
    right.set(xscale="log", yscale="log")
    return _save(fig, out / "isoflop.png")


def predicted_against_measured(
    points: list[SweepPoint], law: ChinchillaLaw, held_out: list[SweepPoint], out: Path
) -> Path:
    """Every point as the law fitted without ``held_out`` predicts it (held-out points
    marked)."""
    fig, ax = _pyplot().subplots(figsize=(5, 5))
    fitted = [p for p in points if p not in held_out]
    for group, style, label in ((fitted, "o", "fitted on"), (held_out, "s", "held out")):
        if group:
            measured = [p.loss for p in group]
            ax.plot(
                measured,
                law.loss([p.params for p in group], [p.tokens for p in group]),
                style,
                label=label,
                alpha=0.8,
            )
    span = [min(p.loss for p in points) * 0.97, max(p.loss for p in points) * 1.03]
    ax.plot(span, span, "k:", lw=1)
    ax.set(
        xlabel="measured validation loss",
        ylabel="predicted by the law",
        title="Predicted against measured",
    )
    ax.legend()
    return _save(fig, out / "predicted_vs_measured.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path
