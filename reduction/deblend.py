"""Pairs closer than about one FWHM, split by a two-PSF fit (DAOPHOT's ALLSTAR on a star that is two).

Two stars 0.5-1 FWHM apart make one peak: no saddle separates them, the first
pass finds one source at their light-weighted centre, and its PSF model leaves
two lobes along the pair's axis that the second pass cannot take as sources
(they lie within 1 FWHM of the one it has). At FWHM 7 px such pairs were most
of the unsaturated stars not found away from saturated ones: the centre sits
1.5-3 px from either star. Here a modelled source whose residual is far above
its noise is fitted again as two PSFs, jointly in every stack (shared positions,
amplitudes per stack), and kept as two when the fit is much better and both
parts are significant. A pair the passes did find as two is re-centred the same way,
both stars together: each had been centred with the other's model painted where
the other was first found, off its star.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares
from scipy.spatial import cKDTree

from reduction.psf import PhaseTable, SourceModel

log = logging.getLogger(__name__)

#: Radius (FWHM) of the disc over which a source's single and pair fits are scored.
SPLIT_RADIUS_FWHM = 1.5
#: A source is tried as a pair when its residual chi^2 over that disc is this many sigma above the noise's.
SPLIT_EXCESS_SIGMA = 6.0
#: ... and its residual has a lobe this many sigma above the residual beside it (at right angles).
SPLIT_LOBE_SIGMA = 5.0
#: A pair is kept when its chi^2 is lower than the single source's by at least this much (its 2 more
#: positions and 1 more amplitude per stack would take ~4 of pure noise)...
SPLIT_MIN_DCHI2 = 50.0
#: ... the pair leaves at most this chi^2 per pixel: where the PSF model itself misses by more (bright stars
#: of an undersampled colour plane left 17-35 times the noise's, split or not), a split explains the
#: model's error, not a second star ...
SPLIT_MAX_CHI2 = 6.0
#: ... each part has this S/N (all stacks together) ...
SPLIT_MIN_SNR = 5.0
#: ... and the parts are this far apart (FWHM): closer, the two are one blended source.
SPLIT_SEPARATION_FWHM = (0.5, 1.5)
#: A pair the passes found already moves at most this far (FWHM, each coordinate) when re-centred.
REFIT_LIMIT_FWHM = 0.5


@dataclass
class StackResidual:
    """One stack's view for the split: its residual (every source's model subtracted), the residual's
    variance (the models' error included) and the sources' model (its PSF and amplitudes; the image
    itself is not needed)."""

    residual: np.ndarray
    variance: np.ndarray
    model: SourceModel


def split_pairs(stacks: list[StackResidual], painted: tuple[np.ndarray, np.ndarray], x: np.ndarray,
                y: np.ndarray, which: np.ndarray, fwhm: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Try the sources ``which`` as pairs (``painted``: every source's position when its model was
    painted; ``x``, ``y``: where it is now); returns (x, y) of every source (a split source moves to its
    brighter part), and the positions and S/N of the fainter parts of the sources that split.

    The other sources near one are fitted with it (at their positions, amplitudes free): a neighbour
    whose model was painted off its star leaves a lobe that is not a second star."""
    x, y = x.copy(), y.copy()
    new_x, new_y, new_snr = [], [], []
    radius = SPLIT_RADIUS_FWHM * fwhm
    h = int(np.ceil(radius)) + 1
    yy, xx = np.mgrid[-h:h + 1, -h:h + 1]
    tree = cKDTree(np.column_stack(painted))
    modelled = np.logical_or.reduce([s.model.amplitude > 0 for s in stacks])     # saturated ones: radial profiles
    done = np.zeros(len(x), bool)
    refitted = 0
    limit = SPLIT_SEPARATION_FWHM[1] * fwhm
    for i in which:
        if done[i]:
            continue
        near = [j for j in tree.query_ball_point([painted[0][i], painted[1][i]], radius + h)
                if j != i and modelled[j]]
        fit = _Stamp.cut(stacks, painted, [i, *near], h)
        if fit is None:
            continue
        disc = np.hypot(xx + fit.cx - x[i], yy + fit.cy - y[i]) <= radius
        gap = np.hypot(x[near] - x[i], y[near] - y[i]) if near else np.empty(0)
        if len(gap) and gap.min() <= limit:
            # A pair the passes found already: both re-centred together (each was centred with the
            # other's model painted where the other was first found, off its star).
            j = near[int(np.argmin(gap))]
            rest = [k for k in near if k != j]
            both = fit.problem(np.column_stack([x[rest], y[rest]]).ravel(), disc)
            residual = both.solve(np.r_[x[i], y[i], x[j], y[j]])[0]
            done[j] = True
            if _excess(residual) < SPLIT_EXCESS_SIGMA:
                continue
            p, chi2 = both.best(np.r_[x[i], y[i], x[j], y[j]], REFIT_LIMIT_FWHM * fwhm, 30)
            if float((residual ** 2).sum()) - chi2 >= SPLIT_MIN_DCHI2 and chi2 <= SPLIT_MAX_CHI2 * len(residual):
                x[i], y[i], x[j], y[j] = p
                refitted += 1
            continue
        problem = fit.problem(np.column_stack([x[near], y[near]]).ravel(), disc)
        px, py = xx[disc] + fit.cx, yy[disc] + fit.cy
        residual = problem.solve(np.r_[x[i], y[i]])[0]
        # Cheap tests first (most bright stars exceed their noise a little: the PSF model is not exact):
        # the excess and the lobe at the centroid, then the same at the best single position.
        if _excess(residual) < SPLIT_EXCESS_SIGMA or _pair_start(_snr(residual, len(stacks)), px, py, x[i], y[i],
                                                                 fwhm) is None:
            continue
        # The pair is weighed against the best single source (its position fitted the same way), not the
        # centroid's: a PSF a little off the model would otherwise split.
        centre, single = problem.best(np.r_[x[i], y[i]], 0.5 * fwhm, 20)
        residual = problem.solve(centre)[0]
        if _excess(residual) < SPLIT_EXCESS_SIGMA:
            continue
        start = _pair_start(_snr(residual, len(stacks)), px, py, x[i], y[i], fwhm)
        if start is None:
            continue
        pair = problem.best_pair(start, fwhm)
        (x1, y1, x2, y2), chi2, snr = pair
        separation = np.hypot(x2 - x1, y2 - y1) / fwhm
        if (single - chi2 < SPLIT_MIN_DCHI2 or chi2 > SPLIT_MAX_CHI2 * len(residual)
                or min(snr) < SPLIT_MIN_SNR or not SPLIT_SEPARATION_FWHM[0] <= separation <= SPLIT_SEPARATION_FWHM[1]):
            continue
        bright = 0 if snr[0] >= snr[1] else 1
        (bx, by), (fx, fy) = ((x1, y1), (x2, y2)) if bright == 0 else ((x2, y2), (x1, y1))
        x[i], y[i] = bx, by
        new_x.append(fx), new_y.append(fy), new_snr.append(snr[1 - bright])
    log.debug("%d sources split into pairs, %d close pairs re-centred together", len(new_x), refitted)
    return x, y, np.array(new_x, float), np.array(new_y, float), np.array(new_snr, float)


@dataclass
class _Stamp:
    """A source's neighbourhood in every stack: the data (the residual plus the models of the source and
    of its neighbours), the variance and the PSF tables, centred on pixel (cx, cy), half-width ``h``."""

    data: list[np.ndarray]
    var: list[np.ndarray]
    tables: list[PhaseTable]
    cx: int
    cy: int
    h: int

    @classmethod
    def cut(cls, stacks: list[StackResidual], painted: tuple[np.ndarray, np.ndarray], sources: list[int], h: int
            ) -> _Stamp | None:
        """The stamp around ``sources[0]`` with the models of all ``sources`` put back; None at the edge or
        where a stack does not cover it."""
        cx, cy = int(np.rint(painted[0][sources[0]])), int(np.rint(painted[1][sources[0]]))
        ny, nx = stacks[0].residual.shape
        if cx - h < 0 or cy - h < 0 or cx + h >= nx or cy + h >= ny:
            return None
        sl = (slice(cy - h, cy + h + 1), slice(cx - h, cx + h + 1))
        data, var, tables = [], [], []
        for s in stacks:
            v = np.asarray(s.variance[sl], float)
            if not np.all(np.isfinite(v) & (v > 0)):
                return None
            d = np.asarray(s.residual[sl], float)
            for j in sources:
                d = d + s.model.amplitude[j] * s.model.shifted.at(painted[0][j] - cx, painted[1][j] - cy, h)
            data.append(d)
            var.append(v)
            tables.append(s.model.shifted)
        return cls(data, var, tables, cx, cy, h)

    def problem(self, others: np.ndarray, disc: np.ndarray) -> _Problem:
        """The fit over ``disc`` of free PSFs plus the neighbours at ``others`` (x1, y1, x2, y2, ...)."""
        weights, data, fixed = [], [], []
        for d, v, table in zip(self.data, self.var, self.tables):
            w = 1 / np.sqrt(v[disc])
            weights.append(w)
            data.append(d[disc] * w)
            fixed.append(self.columns(table, others, disc, w))
        return _Problem(self, disc, weights, data, fixed)

    def columns(self, table: PhaseTable, p: np.ndarray, disc: np.ndarray, w: np.ndarray) -> np.ndarray:
        """The weighted PSF columns (pixels of ``disc`` x sources) of sources at positions ``p``."""
        return np.column_stack([table.at(p[2 * j] - self.cx, p[2 * j + 1] - self.cy, self.h)[disc] * w
                                for j in range(len(p) // 2)]) if len(p) else np.empty((int(disc.sum()), 0))


@dataclass
class _Problem:
    """Free PSFs and fixed neighbours fitted to one stamp's disc: each stack's weights, weighted data and
    the neighbours' weighted columns, made once (they do not move while the free ones are fitted)."""

    stamp: _Stamp
    disc: np.ndarray
    weights: list[np.ndarray]
    data: list[np.ndarray]
    fixed: list[np.ndarray]

    def solve(self, p: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """Weighted residuals (every stack's, one after the other) of the best amplitudes of free PSFs at
        ``p`` (x1, y1, ...) and the neighbours, with each stack's amplitudes and their covariance (the free
        sources first)."""
        out, amps, covs = [], [], []
        for w, b, fixed, table in zip(self.weights, self.data, self.fixed, self.stamp.tables):
            a = np.column_stack([self.stamp.columns(table, p, self.disc, w), fixed])
            k = a.shape[1]
            try:
                cov = np.linalg.inv(a.T @ a)
            except np.linalg.LinAlgError:
                cov = np.full((k, k), np.inf)
                amp = np.zeros(k)
            else:
                amp = cov @ (a.T @ b)
            out.append(b - a @ amp)
            amps.append(amp)
            covs.append(cov)
        return np.concatenate(out), amps, covs

    def best(self, start: np.ndarray, limit: float, max_nfev: int) -> tuple[np.ndarray, float]:
        """The free positions that fit best from ``start``, each coordinate within ``limit`` px of it, and
        their chi^2."""
        # Fitted as offsets from the start: least_squares' finite-difference step is relative to the
        # parameters, and positions of hundreds of pixels would step by pixels.
        try:
            result = least_squares(lambda q: self.solve(start + q)[0], np.zeros(len(start)), bounds=(-limit, limit),
                                   diff_step=0.02, x_scale=0.5, max_nfev=max_nfev)
        except ValueError:
            return start, float((self.solve(start)[0] ** 2).sum())
        return start + result.x, float((result.fun ** 2).sum())

    def best_pair(self, start: np.ndarray, fwhm: float
                  ) -> tuple[tuple[float, float, float, float], float, tuple[float, float]]:
        """The two-PSF fit from ``start`` (x1, y1, x2, y2): positions, chi^2 and each part's S/N."""
        p, chi2 = self.best(start, SPLIT_SEPARATION_FWHM[1] * fwhm, 30)
        _, amps, covs = self.solve(p)
        snr = []
        for k in range(2):
            a = np.array([amp[k] for amp in amps])
            s = np.sqrt(np.array([cov[k, k] for cov in covs]))
            ok = np.isfinite(s) & (s > 0)
            # As detection combines its stacks: the sum of the parts' significances over sqrt(n).
            snr.append(float(np.sum(a[ok] / s[ok]) / np.sqrt(len(a))) if ok.any() else 0.0)
        return (float(p[0]), float(p[1]), float(p[2]), float(p[3])), chi2, (snr[0], snr[1])


def _snr(residual: np.ndarray, n_stacks: int) -> np.ndarray:
    """A fit's weighted residuals (every stack's, one after the other) as one S/N per pixel."""
    return residual.reshape(n_stacks, -1).sum(axis=0) / np.sqrt(n_stacks)


def _excess(residual: np.ndarray) -> float:
    """How many sigma a fit's chi^2 (``residual``: its weighted residuals) lies above pure noise's."""
    n = len(residual)
    return float(((residual ** 2).sum() - n) / np.sqrt(2 * n))


def _pair_start(snr: np.ndarray, px: np.ndarray, py: np.ndarray, x: float, y: float, fwhm: float
                ) -> np.ndarray | None:
    """Where to start a pair's fit, from the single fit's residual (S/N at pixels ``px``, ``py``), or None
    when it does not look like a pair: a second star leaves a lobe on the pair's axis and little beside
    it, where a PSF that is merely wider or narrower than the model leaves a ring."""
    k = int(np.argmax(snr))
    vx, vy = px[k] - x, py[k] - y
    if np.hypot(vx, vy) < SPLIT_SEPARATION_FWHM[0] * fwhm:
        return None

    def at(dx: float, dy: float) -> float:
        return float(snr[np.argmin((px - x - dx) ** 2 + (py - y - dy) ** 2)])

    beside = 0.5 * (at(-vy, vx) + at(vy, -vx))
    if snr[k] - beside < SPLIT_LOBE_SIGMA:
        return None
    if at(-vx, -vy) > 0.5 * snr[k]:       # lobes on both sides: two stars of about equal light
        return np.array([x - 0.5 * vx, y - 0.5 * vy, x + 0.5 * vx, y + 0.5 * vy])
    return np.array([x, y, x + vx, y + vy])
