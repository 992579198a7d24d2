"""Score a catalogue against the simulator's truth (tests and benchmarks share these numbers).

The simulator knows every star it drew, on the same reference grid as the
catalogue (the first science frame), so recovered positions, completeness,
spurious detections, photometric scatter and error honesty are measured
directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree

#: Flags that make a magnitude unreliable (saturated, blended, edge); low coverage is kept.
BAD_FLAGS = 1 | 2 | 4
#: A truth star within this many px of a brighter one is not counted for completeness (unresolvable).
CROWDING_PX = 5.0


def robust_std(values: np.ndarray) -> float:
    """1.4826 x the median absolute deviation: the standard deviation of the Gaussian core."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    return float(1.4826 * np.median(np.abs(values - np.median(values)))) if values.size else float("nan")


@dataclass
class Score:
    n_catalog: int
    n_bright_truth: int
    completeness: float          # bright truth stars found
    spurious_fraction: float     # catalogue entries with no truth star near
    position_rms: float          # px, bright unflagged matched stars
    scatter: dict[str, float]    # mag, per filter and "color", bright unflagged unsaturated stars
    offsets: dict[str, float]    # the one zeropoint offset removed per filter
    error_ratio: dict[str, float]  # robust std of (measured - true - offset) / error
    bright_error_ratio: dict[str, float]  # the same for the bright stars alone (photon noise: the gain's test)


def score_catalog(catalog: Table, truth: Table, filters: tuple[str, str], limits: dict[str, float],
                  shape: tuple[int, int], radius: float = 1.5, margin: float = 20.0,
                  bright_error: float = 0.005) -> Score:
    """Compare ``catalog`` with ``truth``; ``limits`` are the stacks' 5-sigma limiting magnitudes."""
    tx, ty = np.asarray(truth["x"], float), np.asarray(truth["y"], float)
    inside = (tx > margin) & (ty > margin) & (tx < shape[1] - 1 - margin) & (ty < shape[0] - 1 - margin)
    cx, cy = np.asarray(catalog["x"], float), np.asarray(catalog["y"], float)
    cat_inside = (cx > margin) & (cy > margin) & (cx < shape[1] - 1 - margin) & (cy < shape[0] - 1 - margin)

    truth_tree = cKDTree(np.column_stack([tx, ty]))
    dist, idx = truth_tree.query(np.column_stack([cx, cy]), distance_upper_bound=radius)
    matched = np.isfinite(dist)
    spurious = float(np.mean(~matched[cat_inside])) if cat_inside.any() else float("nan")

    total = 10 ** (-0.4 * np.asarray(truth[f"mag_{filters[1]}"], float))
    crowded = np.zeros(len(truth), bool)
    for i, neighbours in enumerate(truth_tree.query_ball_point(np.column_stack([tx, ty]), CROWDING_PX)):
        crowded[i] = any(total[j] > total[i] for j in neighbours if j != i)
    bright = inside & ~crowded
    for f in filters:
        bright &= np.asarray(truth[f"mag_{f}"], float) < limits[f] - 2.0
    if len(catalog):
        found_tree = cKDTree(np.column_stack([cx, cy]))
        fd, _ = found_tree.query(np.column_stack([tx[bright], ty[bright]]), distance_upper_bound=radius)
        completeness = float(np.mean(np.isfinite(fd))) if bright.any() else float("nan")
    else:
        completeness = 0.0

    flags = np.asarray(catalog["flags"], int)
    good = matched & cat_inside & ((flags & BAD_FLAGS) == 0)
    j = np.where(matched, idx, 0)
    bright_cat = good & bright[j]
    position_rms = float(np.sqrt(np.mean((cx[bright_cat] - tx[j[bright_cat]]) ** 2 +
                                         (cy[bright_cat] - ty[j[bright_cat]]) ** 2)))
    scatter, offsets, ratios, bright_ratios = {}, {}, {}, {}
    residuals = {}
    very_bright = good.copy()
    for f in filters:
        err = np.asarray(catalog[f"magerr_{f}"], float)
        very_bright &= err < bright_error
    for f in filters:
        meas = np.asarray(catalog[f"mag_{f}"], float)
        err = np.asarray(catalog[f"magerr_{f}"], float)
        resid = meas - np.asarray(truth[f"mag_{f}"], float)[j]
        offsets[f] = float(np.nanmedian(resid[very_bright]))
        residuals[f] = resid - offsets[f]
        scatter[f] = robust_std(residuals[f][very_bright])
        use = good & np.isfinite(resid) & (err > 0)
        ratios[f] = robust_std(residuals[f][use] / err[use])
        bright_ratios[f] = robust_std(residuals[f][use & bright_cat] / err[use & bright_cat])
    scatter["color"] = robust_std((residuals[filters[0]] - residuals[filters[1]])[very_bright])
    return Score(n_catalog=len(catalog), n_bright_truth=int(bright.sum()), completeness=completeness,
                 spurious_fraction=spurious, position_rms=position_rms, scatter=scatter, offsets=offsets,
                 error_ratio=ratios, bright_error_ratio=bright_ratios)
