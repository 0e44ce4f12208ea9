"""Generated vs reference sets of per-piece features, compared as mgeval does (Yang & Lerch 2018).

For each feature, the distances between pieces of the reference set (intra-set: |r_i - r_j| over
the pairs i < j) and between a generated and a reference piece (inter-set: |g_i - r_j| over all
pairs) are smoothed into densities by a Gaussian KDE with Scott's bandwidth, as
``scipy.stats.gaussian_kde`` does. If generated pieces sit among the reference pieces as the
reference pieces sit among themselves, the two densities agree:

- ``oa``: their overlapping area, the integral of min(intra, inter), in [0, 1];
- ``kl``: KL(intra || inter) in nats, both densities taken on one grid with ``EPSILON`` added
  to each cell's mass so that an empty inter-set cell keeps the divergence finite. (mgeval's
  ``kl_dist`` samples each density on its own grid; that pairs unrelated points, so we don't.)

mgeval also reports the generated set's own intra-set density against the inter-set one; we keep
the reference's, so that every model is measured against the same yardstick. Non-finite values
are dropped per feature; with fewer than two pieces left in either set ``oa`` and ``kl`` are NaN.
"""

import math

import numpy as np

GRID_POINTS = 2048
# Densities are taken this many bandwidths past the extreme distances, where their tails vanish.
TAIL_BANDWIDTHS = 4
EPSILON = 1e-10


def _intra_set_distances(values: np.ndarray) -> np.ndarray:
    return np.abs(values[:, None] - values[None, :])[np.triu_indices(values.size, k=1)]


def _inter_set_distances(generated: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return np.abs(generated[:, None] - reference[None, :]).ravel()


def _scott_bandwidth(sample: np.ndarray) -> float:
    """Sample standard deviation times n^(-1/5); 0 for a sample without spread."""
    if sample.size < 2:
        return 0.0
    return float(np.std(sample, ddof=1) * sample.size ** (-1 / 5))


def _cell_masses(sample: np.ndarray, bandwidth: float, grid: np.ndarray) -> np.ndarray:
    """Gaussian KDE as a probability per grid cell. The sample is first rounded to its nearest
    grid point, so the kernel sum is one convolution whatever the sample's size; the masses are
    normalized on the grid, so a kernel narrower than a cell still carries its whole weight."""
    step = grid[1] - grid[0]
    counts = np.bincount(np.rint((sample - grid[0]) / step).astype(np.int64), minlength=grid.size)
    offsets = np.arange(1 - grid.size, grid.size) * step
    density = np.convolve(counts, np.exp(-0.5 * (offsets / bandwidth) ** 2), mode="valid")
    return density / density.sum()


def overlap_and_divergence(intra: np.ndarray, inter: np.ndarray) -> tuple[float, float]:
    """Overlapping area and KL(intra || inter) of the two distance samples' KDEs."""
    pooled = _scott_bandwidth(np.concatenate([intra, inter]))
    if pooled == 0:  # every distance is the same: two identical point masses
        return 1.0, 0.0
    # A sample without spread (a feature all reference pieces share) borrows the pooled width.
    bandwidths = [_scott_bandwidth(intra) or pooled, _scott_bandwidth(inter) or pooled]
    margin = TAIL_BANDWIDTHS * max(bandwidths)
    low = min(intra.min(), inter.min()) - margin
    high = max(intra.max(), inter.max()) + margin
    grid = np.linspace(low, high, GRID_POINTS)
    p, q = (
        _cell_masses(sample, bandwidth, grid)
        for sample, bandwidth in zip((intra, inter), bandwidths, strict=True)
    )
    overlap = float(np.minimum(p, q).sum())
    p, q = p + EPSILON, q + EPSILON
    p, q = p / p.sum(), q / q.sum()
    return overlap, float(np.sum(p * np.log(p / q)))


def finite_values(pieces: list[dict[str, float]], feature: str) -> np.ndarray:
    values = np.array([piece.get(feature, math.nan) for piece in pieces], dtype=np.float64)
    return values[np.isfinite(values)]


def mean_std(values: np.ndarray) -> tuple[float, float]:
    return (float(values.mean()), float(values.std())) if values.size else (math.nan, math.nan)


def compare_sets(
    generated: list[dict[str, float]], reference: list[dict[str, float]]
) -> dict[str, dict[str, float]]:
    """Feature -> gen_mean, gen_std, ref_mean, ref_std (population std), oa and kl."""
    features = dict.fromkeys(name for piece in (*generated, *reference) for name in piece)
    comparison = {}
    for feature in features:
        gen, ref = finite_values(generated, feature), finite_values(reference, feature)
        oa, kl = math.nan, math.nan
        if gen.size >= 2 and ref.size >= 2:
            oa, kl = overlap_and_divergence(
                _intra_set_distances(ref), _inter_set_distances(gen, ref)
            )
        gen_mean, gen_std = mean_std(gen)
        ref_mean, ref_std = mean_std(ref)
        comparison[feature] = {
            "gen_mean": gen_mean,
            "gen_std": gen_std,
            "ref_mean": ref_mean,
            "ref_std": ref_std,
            "oa": oa,
            "kl": kl,
        }
    return comparison
