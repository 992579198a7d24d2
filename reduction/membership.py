"""A star's prior cluster membership from where it sits: a King cluster on an even field.

Why a module of its own: the age fit (``reduction.age``) uses it only as a prior that
replaces one global field fraction; it needs positions and nothing of the diagram.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize
from scipy.special import expit

log = logging.getLogger(__name__)

#: Spatial membership prior: cells per side of the grid that integrates the cluster profile over the
#: area the stars cover, and bounds of the profile's core radius as fractions of that area's side
#: (below a few cells the grid integral is inaccurate; far above the side a profile is flat = field).
SPATIAL_GRID = 96
SPATIAL_SCALE_BOUNDS = (0.03, 2.0)
#: Starting values of log(tidal / core radius - 1) for the spatial fit (concentrated to loose).
SPATIAL_TIDAL_STARTS = (0.0, 1.0, 2.0)
#: The spatial prior is used only if the cluster profile raises the positions' lnL by this much over
#: an even spread: fixed per-star priors from a profile fitted to noise (e.g. a cluster filling the
#: frame) would set a wrong field share that the diagram could not correct.  Evenly spread stars
#: gain 0-9 (300-3000 stars, 15 trials: five free parameters); pipeline catalogues of the simulated
#: cluster 11-120.
SPATIAL_MIN_GAIN = 12.0


@dataclass
class SpatialProfile:
    """A King (1962) cluster on a uniform field, fitted to star positions by maximum likelihood.

    The field is spread evenly over the stars' bounding box and the cluster profile is
    normalised on that box (a grid integral), so a cluster cut by the frame edges is
    not mistaken for a smaller one.
    """

    x0: float
    y0: float
    core: float                               # King core radius (px)
    tidal: float                              # King tidal radius (px): no members beyond
    cluster_fraction: float                   # of the stars the profile was fitted to
    box: tuple[float, float, float, float]    # x lo, x hi, y lo, y hi (px)
    gain: float                               # lnL over an even spread of all the stars

    @property
    def area(self) -> float:
        return max(self.box[1] - self.box[0], 1.0) * max(self.box[3] - self.box[2], 1.0)

    def cluster_density(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The cluster profile at (x, y), per px^2, integrating to 1 over the box."""
        gx, gy, cell = _spatial_grid(self.box)
        z = _king(gx[None, :] - self.x0, gy[:, None] - self.y0, self.core, self.tidal).sum() * cell
        return _king(x - self.x0, y - self.y0, self.core, self.tidal) / max(z, 1e-300)

    def membership(self, x: np.ndarray, y: np.ndarray, iterations: int = 100) -> tuple[np.ndarray, float]:
        """Prior cluster membership p = cluster / (cluster + field density) of the stars at (x, y),
        and the cluster fraction among them, refitted (EM) with the profile's shape fixed.

        Why refit the fraction: the shape is best measured on every star with a position, but
        the stars used in the diagram (a magnitude range) can hold a different share of field stars.
        """
        c, f = self.cluster_density(x, y), 1.0 / self.area
        fc = self.cluster_fraction
        for _ in range(iterations):
            p = fc * c / (fc * c + (1 - fc) * f)
            fc = float(np.clip(p.mean(), 1e-3, 1 - 1e-3))
        return fc * c / (fc * c + (1 - fc) * f), fc

    def to_json(self) -> dict:
        return {"center_px": [round(self.x0, 1), round(self.y0, 1)], "core_px": round(self.core, 1),
                "tidal_px": round(self.tidal, 1), "cluster_fraction": round(self.cluster_fraction, 3),
                "lnl_gain": round(self.gain, 1)}


def _king(dx: np.ndarray, dy: np.ndarray, core: float, tidal: float) -> np.ndarray:
    """King (1962) surface density profile, unnormalised, zero beyond the tidal radius."""
    r2 = (dx * dx + dy * dy) / (core * core)
    # 1 / sqrt(1 + (tidal / core)^2), written so that a tidal radius the simplex has sent far out
    # cannot overflow (it did: "OverflowError: Numerical result out of range" ended an age fit).
    edge = core / math.hypot(core, tidal)
    return np.clip(1.0 / np.sqrt(1.0 + r2) - edge, 0.0, None) ** 2


def _spatial_grid(box: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray, float]:
    """Cell centres (x, y) and cell area of the grid integrating a profile over the box."""
    xlo, xhi, ylo, yhi = box
    gx = xlo + (np.arange(SPATIAL_GRID) + 0.5) * (xhi - xlo) / SPATIAL_GRID
    gy = ylo + (np.arange(SPATIAL_GRID) + 0.5) * (yhi - ylo) / SPATIAL_GRID
    return gx, gy, max(xhi - xlo, 1.0) * max(yhi - ylo, 1.0) / SPATIAL_GRID ** 2


def spatial_profile(x, y) -> SpatialProfile:
    """Fit a King cluster on a uniform field to positions (px) by maximum likelihood.

    Why a radial model: members crowd towards the cluster centre while field stars
    are spread evenly, so where a star sits says how likely it is a member, whatever
    its colour; the diagram alone cannot tell a field population that happens to lie
    along a younger isochrone from that isochrone's members.  Why King rather than
    Plummer: its tidal radius lets the frame's outskirts be field, where a Plummer's
    long tail takes the even field for a broad cluster (on pipeline catalogues of
    the simulator it gave field stars a prior membership of 0.9).  The centre starts
    at a shrinking-circle centroid (robust to the field); centre, core and tidal radii
    and the cluster fraction are then fitted together by Nelder-Mead from a few
    tidal-to-core ratios.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    box = (float(x.min()), float(x.max()), float(y.min()), float(y.max()))
    side = max(box[1] - box[0], box[3] - box[2], 1.0)
    area = max(box[1] - box[0], 1.0) * max(box[3] - box[2], 1.0)
    gx, gy, cell = _spatial_grid(box)
    cx, cy = float(np.median(x)), float(np.median(y))
    radius = 0.5 * side
    while radius > side / 8:
        near = np.hypot(x - cx, y - cy) < radius
        if near.sum() >= 10:
            cx, cy = float(x[near].mean()), float(y[near].mean())
        radius *= 0.7
    lo_a, hi_a = np.log(SPATIAL_SCALE_BOUNDS[0] * side), np.log(SPATIAL_SCALE_BOUNDS[1] * side)

    def unpack(p: np.ndarray) -> tuple[float, float, float, float, float]:
        # Unconstrained parameters squashed into range: the core radius between its bounds,
        # the tidal radius beyond it, the fraction in 0..1.
        # (expit, not 1 / (1 + exp(-p)): the simplex can wander far out, where exp overflows.)
        core = float(np.exp(lo_a + (hi_a - lo_a) * expit(p[2])))
        return float(p[0]), float(p[1]), core, core * (1.0 + float(np.exp(p[3]))), float(expit(p[4]))

    def nll(p: np.ndarray) -> float:
        x0, y0, core, tidal, fc = unpack(p)
        z = _king(gx[None, :] - x0, gy[:, None] - y0, core, tidal).sum() * cell
        c = fc * _king(x - x0, y - y0, core, tidal) / max(z, 1e-300)
        return -float(np.log(c + (1.0 - fc) / area).sum())

    core0 = 0.1 * side
    t0 = np.log((np.log(core0) - lo_a) / (hi_a - np.log(core0)))
    best = None
    for log_ratio in SPATIAL_TIDAL_STARTS:
        p0 = np.array([cx, cy, t0, log_ratio, 0.0])
        sim = np.tile(p0, (6, 1))
        sim[1:] += np.diag([0.05 * side, 0.05 * side, 0.5, 0.5, 1.0])
        res = optimize.minimize(nll, p0, method="Nelder-Mead",
                                options={"initial_simplex": sim, "xatol": 0.01, "fatol": 1e-3, "maxiter": 3000})
        if best is None or res.fun < best.fun:
            best = res
    x0, y0, core, tidal, fc = unpack(best.x)
    log.debug("spatial profile: centre (%.0f, %.0f), core %.0f px, tidal %.0f px, cluster fraction %.2f",
              x0, y0, core, tidal, fc)
    return SpatialProfile(x0, y0, core, tidal, fc, box, float(x.size * np.log(area) - best.fun))
