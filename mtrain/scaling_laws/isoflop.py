"""IsoFLOP minima (Hoffmann et al. 2022, approach 2): at each compute budget, a parabola of
the loss in log N through the sizes trained on it; its vertex is N_opt (and D_opt the tokens
that budget buys there); then N_opt ∝ C^a and D_opt ∝ C^b over the budgets.
"""

from dataclasses import asdict, dataclass

import numpy as np

from mtrain.scaling_laws.points import SweepPoint

# A parabola through fewer sizes than this says nothing about where its vertex is.
MIN_SIZES = 3


@dataclass(frozen=True)
class IsoFlopMinimum:
    budget: float
    sizes: int  # points on the curve
    params: float | None  # N_opt: the vertex (None where the curve opens downward)
    tokens: float | None  # D_opt: the tokens the budget buys at N_opt
    loss: float | None  # the parabola's value at N_opt
    # Whether N_opt lies between the smallest and the largest size trained: a vertex outside
    # is an extrapolation, kept out of the power laws.
    interior: bool

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PowerLaw:
    """y = coefficient · x^exponent, fitted by least squares in log-log."""

    exponent: float
    coefficient: float
    points: int

    def __call__(self, x):
        return self.coefficient * np.asarray(x, dtype=float) ** self.exponent

    def as_dict(self) -> dict:
        return asdict(self)


def isoflop_minimum(budget: float, points: list[SweepPoint]) -> IsoFlopMinimum:
    """The vertex of the parabola through one budget's points (log N against loss)."""
    log_n = np.log([p.params for p in points])
    losses = np.array([p.loss for p in points])
    if len(points) < MIN_SIZES:
        return IsoFlopMinimum(budget, len(points), None, None, None, False)
    c2, c1, c0 = np.polyfit(log_n, losses, 2)
    if c2 <= 0:
        return IsoFlopMinimum(budget, len(points), None, None, None, False)
    x = -c1 / (2 * c2)
    # D follows N along the budget (D = C / FLOPs per token): a line in log-log through the
    # points, exact where FLOPs per token is a power of N.
    slope, intercept = np.polyfit(log_n, np.log([p.tokens for p in points]), 1)
    interior = bool(log_n.min() <= x <= log_n.max())
    loss = float(c0 + c1 * x + c2 * x * x)
    return IsoFlopMinimum(
        budget, len(points), float(np.exp(x)), float(np.exp(intercept + slope * x)), loss, interior
    )


def isoflop_minima(points: list[SweepPoint]) -> list[IsoFlopMinimum]:
    """One minimum per budget, smallest budget first."""
    budgets = sorted({p.budget for p in points})
    return [isoflop_minimum(c, [p for p in points if p.budget == c]) for c in budgets]


def power_law(x, y) -> PowerLaw | None:
    """The power law through (x, y), None with fewer than 2 points."""
    if len(x) < 2:
        return None
    exponent, log_coefficient = np.polyfit(np.log(x), np.log(y), 1)
    return PowerLaw(float(exponent), float(np.exp(log_coefficient)), len(x))


def optimal_scaling(minima: list[IsoFlopMinimum]) -> tuple[PowerLaw | None, PowerLaw | None]:
    """N_opt ∝ C^a and D_opt ∝ C^b through the interior minima."""
    inside = [m for m in minima if m.interior]
    budgets = [m.budget for m in inside]
    return (
        power_law(budgets, [m.params for m in inside]),
        power_law(budgets, [m.tokens for m in inside]),
    )
