"""Chinchilla's parametric law L(N, D) = E + A/N^alpha + B/D^beta, fitted as Hoffmann et al.
(2022, approach 3) fit it: the Huber loss of the log-loss residuals, minimised by L-BFGS from a
grid of starting points, with scipy.
"""

import itertools
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

# Hoffmann et al.'s Huber delta and grid of starts: e = log E, a = log A, b = log B.
HUBER_DELTA = 1e-3
GRID = {
    "a": np.arange(0.0, 30.0, 5.0),
    "b": np.arange(0.0, 30.0, 5.0),
    "e": np.arange(-1.0, 1.5, 0.5),
    "alpha": np.arange(0.0, 2.5, 0.5),
    "beta": np.arange(0.0, 2.5, 0.5),
}
# L-BFGS runs from this many of the grid's 4,500 starts, those where the objective is lowest
# already (Hoffmann et al. ran it from every one: minutes here, where these take seconds).
STARTS = 16


@dataclass(frozen=True)
class ChinchillaLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n, d):
        """The predicted loss of N parameters trained on D tokens (arrays broadcast)."""
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    @property
    def compute_optimal_exponents(self) -> tuple[float, float]:
        """(a, b) of N_opt ∝ C^a and D_opt ∝ C^b under C ∝ N·D: beta/(alpha+beta) and
        alpha/(alpha+beta)."""
        total = self.alpha + self.beta
        return self.beta / total, self.alpha / total

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LawFit:
    law: ChinchillaLaw
    objective: float  # the Huber loss at the minimum, summed over the points
    starts: int  # L-BFGS runs made
    converged: int  # of which scipy reported success


def _objective(theta: np.ndarray, log_n, log_d, log_loss, delta: float):
    """Summed Huber loss of the log-loss residuals and its gradient, over delta² so that the
    quadratic zone is of order one (L-BFGS's stopping tests are absolute)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    predicted = logsumexp(terms, axis=0)
    r = predicted - log_loss
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum()
    dr = np.where(small, r, delta * np.sign(r))  # d huber / d r
    weights = np.exp(terms - predicted)  # d predicted / d (each term)
    grad = np.array(
        [
            (dr * weights[0]).sum(),
            (dr * weights[1]).sum(),
            (dr * weights[2]).sum(),
            (dr * weights[0] * -log_n).sum(),
            (dr * weights[1] * -log_d).sum(),
        ]
    )
    return value / delta**2, grad / delta**2


def _grid_values(grid: np.ndarray, log_n, log_d, log_loss, delta: float) -> np.ndarray:
    """The objective at every start of ``grid`` (one per row) at once."""
    a, b, e, alpha, beta = (grid[:, [i]] for i in range(5))
    by_n, by_d = a - alpha * log_n, b - beta * log_d
    terms = np.stack([by_n, by_d, np.broadcast_to(e, by_n.shape)])
    r = np.abs(logsumexp(terms, axis=0) - log_loss)
    return np.where(r <= delta, 0.5 * r**2, delta * (r - 0.5 * delta)).sum(axis=1)


def fit_law(n, d, loss, delta: float = HUBER_DELTA, starts: int = STARTS) -> LawFit:
    """The law that best explains losses ``loss`` of models of ``n`` parameters trained on ``d``
    tokens; needs at least 5 points (5 parameters)."""
    log_n, log_d = np.log(np.asarray(n, float)), np.log(np.asarray(d, float))
    log_loss = np.log(np.asarray(loss, float))
    if log_n.size < 5:
        raise ValueError(
            f"a Chinchilla fit needs at least 5 points (5 parameters), not {log_n.size}"
        )
    grid = np.array(list(itertools.product(*(GRID[k] for k in ("a", "b", "e", "alpha", "beta")))))
    scores = _grid_values(grid, log_n, log_d, log_loss, delta)
    best, converged = None, 0
    for theta in grid[np.argsort(scores)[:starts]]:
        found = minimize(
            _objective,
            theta,
            args=(log_n, log_d, log_loss, delta),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": 10_000, "ftol": 1e-15, "gtol": 1e-12},
        )
        converged += bool(found.success)
        if best is None or found.fun < best.fun:
            best = found
    a, b, e, alpha, beta = best.x
    law = ChinchillaLaw(
        E=float(np.exp(e)),
        A=float(np.exp(a)),
        B=float(np.exp(b)),
        alpha=float(alpha),
        beta=float(beta),
    )
    return LawFit(law, float(best.fun) * delta**2, min(starts, len(grid)), converged)
