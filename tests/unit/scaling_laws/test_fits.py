"""The fits on points from known laws: Chinchilla's parameters recovered, the IsoFLOP vertex and
the power laws through the minima."""

import numpy as np
import pytest

from mtrain.scaling_laws.chinchilla import ChinchillaLaw, fit_law
from mtrain.scaling_laws.isoflop import isoflop_minima, optimal_scaling, power_law
from mtrain.scaling_laws.points import SweepPoint

TRUE = ChinchillaLaw(E=0.9, A=60.0, B=900.0, alpha=0.36, beta=0.31)
SIZES = np.array([3e4, 1.3e5, 3.8e5, 8.5e5, 1.6e6])
BUDGETS = np.array([1e11, 3e11, 1e12, 3e12])


def grid(law: ChinchillaLaw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, c = (a.ravel() for a in np.meshgrid(SIZES, BUDGETS))
    d = c / (6 * n)
    return n, d, law.loss(n, d)


def test_the_fit_recovers_a_noise_free_law_within_one_percent():
    n, d, loss = grid(TRUE)
    fit = fit_law(n, d, loss, starts=2)
    for key, want in TRUE.as_dict().items():
        assert getattr(fit.law, key) == pytest.approx(want, rel=0.01), key


def test_one_wild_point_barely_moves_the_robust_fit():
    n, d, loss = grid(TRUE)
    loss = loss.copy()
    loss[3] *= 1.5  # a point gone wrong, say a spike at its last step
    fit = fit_law(n, d, loss, starts=2)
    others = np.arange(len(n)) != 3
    predicted = fit.law.loss(n[others], d[others])
    assert np.max(np.abs(predicted / loss[others] - 1)) < 0.01


def test_the_compute_optimal_exponents_follow_from_alpha_and_beta():
    a, b = TRUE.compute_optimal_exponents
    assert a == pytest.approx(0.31 / 0.67)
    assert a + b == pytest.approx(1.0)


def test_fewer_points_than_parameters_are_refused():
    with pytest.raises(ValueError, match="at least 5 points"):
        fit_law([1e5] * 4, [1e6] * 4, [2.0] * 4)


def point(budget: float, params: float, loss: float) -> SweepPoint:
    tokens = int(budget / (6 * params))
    return SweepPoint("run", None, budget, int(params), tokens, budget, loss, tokens // 256)


def test_the_isoflop_vertex_is_the_parabola_minimum_and_the_power_laws_go_through_it():
    # Parabolas in log N with their vertex at N_opt = 1e-2 * C^0.5 (a = 0.5, b = 0.5).
    points = []
    for c in BUDGETS:
        n_opt = 1e-2 * c**0.5
        for n in n_opt * np.array([0.25, 0.5, 1.3, 3.0]):
            points.append(point(c, n, 1.0 + 0.1 * np.log(n / n_opt) ** 2))
    minima = isoflop_minima(points)
    assert [m.budget for m in minima] == sorted(BUDGETS)
    for m in minima:
        assert m.interior
        assert m.params == pytest.approx(1e-2 * m.budget**0.5, rel=0.01)
        assert m.tokens == pytest.approx(m.budget / (6 * m.params), rel=0.01)
        assert m.loss == pytest.approx(1.0, abs=1e-3)
    n_opt, d_opt = optimal_scaling(minima)
    assert n_opt.exponent == pytest.approx(0.5, abs=0.01)
    assert d_opt.exponent == pytest.approx(0.5, abs=0.01)


def test_a_vertex_outside_the_sizes_is_no_minimum_of_the_power_law():
    # Loss still falling at the smallest size: the vertex is below it.
    points = [point(1e12, n, 1.0 + 0.05 * np.log(n / 1e3)) for n in (1e5, 3e5, 1e6)]
    points[1] = point(1e12, 3e5, points[1].loss - 0.01)  # convex all the same
    (minimum,) = isoflop_minima(points)
    assert minimum.params < 1e5
    assert not minimum.interior
    assert optimal_scaling([minimum]) == (None, None)


def test_two_sizes_make_no_curve():
    (minimum,) = isoflop_minima([point(1e12, 1e5, 1.2), point(1e12, 1e6, 1.1)])
    assert minimum.params is None and not minimum.interior


def test_a_power_law_through_exact_points():
    x = np.array([1e10, 1e11, 1e12])
    law = power_law(x, 3.0 * x**0.7)
    assert law.exponent == pytest.approx(0.7)
    assert law.coefficient == pytest.approx(3.0)
