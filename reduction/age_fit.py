"""The age fit: the search over shifts, colour scale, age and [M/H], and the age posterior with its intervals.

* Shifts: ``mag = M + dmag``, ``colour = k colour_0 + dcolor``.  Calibrated data:
  ``dmag = mu + A_band2 E(B-V)``, ``dcolor = k (A_band1 - A_band2) E(B-V)``, ``k`` = 1
  or a configured colour term.  Uncalibrated data: both shifts are free and absorb
  the zeropoints, and ``k`` is free within a range (a filter system that is not
  exactly Johnson B and V).
* Per grid age, a global FFT search scores every shift with an approximate,
  box-normalised likelihood; Nelder-Mead refines its best few candidates, and an
  age fitting much worse than a neighbour is refitted from the neighbour's shifts.
  That scan runs at the [M/H] the prior centres on; at the other [M/H] nodes
  (0.2 dex apart, isochrones interpolated) only the ages along the age-[M/H] ridge
  are fitted, started from the neighbouring node's solutions; around the best cell
  the ages half-way between grid ages are fitted too (isochrones interpolated in age).
* The likelihood, maximised over the shifts, colour scale and the binary and field
  fractions (profiled), times the [M/H] prior, is integrated over [M/H] (linear in
  lnL between nodes) and interpolated in age by a cubic spline: the age posterior.
  The age is its median, the 68 % and 95 % intervals its equal-tailed quantiles,
  widened by a systematic floor added in quadrature (reported separately).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import fft as sp_fft
from scipy import optimize
from scipy.interpolate import CubicSpline
from scipy.ndimage import gaussian_filter, maximum_filter
from scipy.special import logsumexp

from reduction.age_model import (AgeFitError, AgeModel, CmdData, age_model, component_densities, full_grid,
                                 mixture_lnl, plot_isochrone, prepare_data, render, tracks, turnoff_point)
from reduction.isochrones import A_OVER_EBV, grid
from reduction.membership import SpatialProfile, use_positions

__all__ = ["ISOCHRONE_SET", "AgeFit", "AgeFitError", "fit_age"]

log = logging.getLogger(__name__)

ISOCHRONE_SET = "PARSEC v1.2S (uwastro465isos)"

#: Systematic floor (dex) added in quadrature to the statistical interval: the isochrones' own
#: uncertainty (convective overshoot, rotation, the colour-temperature relation), which no fit to
#: one set of models can see.  At 95 % it is scaled by 1.96.
AGE_FLOOR_DEX = 0.05
#: Default range of the colour scale ``k`` (b-g = k (B-V) + c) for instrumental magnitudes.
COLOR_SCALE_RANGE = (0.8, 1.2)
#: Default [M/H] range fitted (the grid ends at 0; up to +0.2 is extrapolated) and its node spacing.
MH_RANGE = (-0.75, 0.25)
MH_STEP = 0.25
#: Coarse scan: every COARSE_STEP-th grid age at the prior's [M/H] with the colour scale fixed; then
#: every grid age within FINE_HALF_WINDOW steps of the best one.
COARSE_STEP = 4
FINE_HALF_WINDOW = 4
#: Ridge fits (colour scale free, every [M/H] node): the ages within RIDGE_HALF_WINDOW steps of the
#: neighbouring node's best one, widened (to RIDGE_MAX_HALF_WINDOW) while an end is within RIDGE_DEPTH
#: of the best lnL, so that the posterior's support is fitted with the same freedom everywhere.
RIDGE_HALF_WINDOW = 2
RIDGE_MAX_HALF_WINDOW = 5
RIDGE_DEPTH = 8.0
#: Half-step refinement: ages half-way between grid ages (interpolated isochrones) within this many
#: grid steps of the best cell, at its [M/H] node.  Why: a cluster between
#: two grid ages is fitted by neither as well as by its own age, by tens of lnL units with ~1000 stars.
REFINE_HALF_WINDOW = 3
#: Global shift search (FFT): field fraction assumed in the approximate likelihood, ladder of
#: log10 box-normalisation levels (first, last, step), neighbourhood of a candidate peak (pixels of
#: the coarse grid: 0.6 mag x 0.2 colour), at most this many candidates, and only those whose
#: approximate lnL is within FFT_SCORE_WINDOW of the best.
FFT_FIELD = 0.2
FFT_LOG_Z = (-2.0, 0.0, 1.0)
FFT_PEAK_SEPARATION_PX = (15, 10)
FFT_MAX_STARTS = 3
FFT_SCORE_WINDOW = 20.0
#: An age is refitted from its neighbour's shifts when the neighbour's lnL is higher by this much.
PROPAGATE_DLNL = 3.0
#: Posterior: lnL below the maximum by more than this is treated as zero probability; fine age step (dex).
POSTERIOR_DEPTH = 60.0
FINE_AGE_STEP = 0.0025
#: Quantiles of the equal-tailed 68 % and 95 % intervals.
QUANTILES_68 = (0.15865, 0.84135)
QUANTILES_95 = (0.025, 0.975)

Start = tuple[float, float, float]      # (dcolor, dmag, colour scale)


@dataclass
class AgeFit:
    """Result of an isochrone fit; ``to_json`` is the content of ``age.json``."""

    log_age: float
    log_age_low: float                  # 68 % interval, systematic floor included
    log_age_high: float
    age_myr: float
    age_myr_low: float
    age_myr_high: float
    distance_modulus: float
    ebv: float
    mh: float                           # posterior median [M/H]
    n_stars: int
    calibrated_zeropoints: bool
    isochrone_set: str
    iso_color: np.ndarray
    iso_mag: np.ndarray
    turnoff: tuple[float, float]
    log_age_low95: float = float("nan")     # 95 % interval, systematic floor included
    log_age_high95: float = float("nan")
    #: Statistical intervals alone (68 % low, high, 95 % low, high) and the floor added to them.
    statistical: tuple[float, float, float, float] = (float("nan"),) * 4
    systematic_floor: float = AGE_FLOOR_DEX
    mh_low: float = float("nan")        # 68 % interval of [M/H]
    mh_high: float = float("nan")
    mh_fitted: bool = True
    mh_prior: str = ""
    color_scale: float = 1.0
    color_scale_fitted: bool = False
    bands: tuple[str, str] = ("B", "V")
    note: str = ""
    dmag: float = float("nan")          # fitted magnitude shift (absolute -> observed axis)
    dcolor: float = float("nan")        # fitted colour shift
    field_fraction: float = float("nan")
    binary_fraction: float = float("nan")
    mag_limit: float = float("nan")     # faint limit of the stars used
    seconds: float = float("nan")       # wall time of the fit
    profile_log_age: np.ndarray = field(default_factory=lambda: np.empty(0))
    profile_lnl: np.ndarray = field(default_factory=lambda: np.empty(0))   # log posterior of the age (grid)
    #: With positions: each input star's spatial prior membership probability (NaN without a
    #: finite position) and its posterior cluster membership (CMD and position; NaN if unused).
    membership_prior: np.ndarray = field(default_factory=lambda: np.empty(0))
    membership: np.ndarray = field(default_factory=lambda: np.empty(0))
    spatial: SpatialProfile | None = None

    @property
    def confidence(self) -> str:
        """What the intervals mean, in words (age.json's ``confidence``)."""
        return (f"log_age_low..log_age_high is a 68% and log_age_low95..log_age_high95 a 95% interval of the "
                f"age posterior (equal-tailed), marginalised over [M/H], the colour scale, the shifts and the "
                f"binary and field fractions, with a {self.systematic_floor:.2f} dex systematic floor for the "
                "isochrones added in quadrature")

    def to_json(self) -> dict:
        """Plain JSON-serialisable record (age.json)."""
        r = lambda v, nd=4: round(float(v), nd)  # noqa: E731
        stat = self.statistical
        return {
            "log_age": r(self.log_age),
            "log_age_low": r(self.log_age_low),
            "log_age_high": r(self.log_age_high),
            "log_age_low95": r(self.log_age_low95),
            "log_age_high95": r(self.log_age_high95),
            "confidence": self.confidence,
            "confidence_levels": [0.68, 0.95],
            "systematic_floor_dex": r(self.systematic_floor, 3),
            "statistical_interval": {"log_age_low": r(stat[0]), "log_age_high": r(stat[1]),
                                     "log_age_low95": r(stat[2]), "log_age_high95": r(stat[3])},
            "age_myr": r(self.age_myr, 2),
            "age_myr_low": r(self.age_myr_low, 2),
            "age_myr_high": r(self.age_myr_high, 2),
            "age_myr_low95": r(10 ** self.log_age_low95 / 1e6, 2),
            "age_myr_high95": r(10 ** self.log_age_high95 / 1e6, 2),
            "distance_modulus": r(self.distance_modulus, 3),
            "ebv": r(self.ebv),
            "mh": r(self.mh, 3),
            "mh_low": r(self.mh_low, 3),
            "mh_high": r(self.mh_high, 3),
            "mh_fitted": bool(self.mh_fitted),
            "mh_prior": self.mh_prior,
            "color_scale": r(self.color_scale),
            "color_scale_fitted": bool(self.color_scale_fitted),
            "n_stars": int(self.n_stars),
            "calibrated_zeropoints": bool(self.calibrated_zeropoints),
            "isochrone_set": self.isochrone_set,
            "bands": list(self.bands),
            "note": self.note,
            "turnoff": [r(self.turnoff[0]), r(self.turnoff[1])],
            "magnitude_shift": r(self.dmag, 3),
            "color_shift": r(self.dcolor),
            "field_fraction": r(self.field_fraction, 3),
            "binary_fraction": r(self.binary_fraction, 3),
            "mag_limit": r(self.mag_limit, 3),
            "fit_seconds": r(self.seconds, 2),
            **({"spatial_prior": self.spatial.to_json()} if self.spatial is not None else {}),
        }


def _neg_lnl(start: Start, model: AgeModel, data: CmdData) -> float:
    """Minus the log-likelihood at the given shifts and colour scale, the fractions maximised."""
    s, b = component_densities(model, data, *start)
    return -mixture_lnl(s, b, data.field, np.ones(data.mag.size), data.field_prior)[0]


def _fft_starts(log_age: float, mh: float, bands: tuple[str, str], data: CmdData) -> list[tuple[float, float]]:
    """Rough (dcolor, dmag) candidates: the best peaks of an approximate likelihood over all shifts.

    Why: with instrumental magnitudes the shifts can be anything; a local optimiser
    started far away would lock onto a wrong part of the sequence.  FFTs on a
    coarse grid score every shift at once; Nelder-Mead with the full likelihood
    (binaries, error classes, fitted fractions) refines the candidates.

    The score is the likelihood's own form, sum_i log(rho(x_i - s) / Z(s) + c), with
    Z(s) the model weight inside the shifted observed box and c a field-star floor.
    Why the normalisation matters: without it the stars are simply pulled onto the
    densest part of the model, the IMF-heavy lower main sequence, and a cluster's
    near-vertical upper main sequence lands on the near-vertical M-dwarf sequence
    (shifts off by ten magnitudes; seen on pipeline catalogues).  Z(s) is one more
    correlation (model with the box); the floor cZ(s) inside the logarithm depends
    on the shift, so the correlation is done for a ladder of Z levels and each shift
    takes the level nearest its own Z.
    """
    g = full_grid(scale=2)
    single_t, binary_t = tracks(log_age, mh, bands)
    sc, sm = data.class_sigma[0]
    mix = gaussian_filter(0.7 * render(single_t, g) + 0.3 * render(binary_t, g),
                          (max(sm / g.dy, 0.7), max(sc / g.dx, 0.7)), mode="constant")
    rho = mix / mix.sum() / (g.dx * g.dy)
    lo_c, hi_c, lo_m, hi_m = data.box
    nx = int(np.ceil((hi_c - lo_c) / g.dx))
    ny = int(np.ceil((hi_m - lo_m) / g.dy))
    hist, _, _ = np.histogram2d(data.mag, data.color, bins=(ny, nx),
                                range=((lo_m, lo_m + ny * g.dy), (lo_c, lo_c + nx * g.dx)))
    n = float(hist.sum())
    shape = (g.ny + ny - 1, g.nx + nx - 1)
    fshape = [sp_fft.next_fast_len(s, real=True) for s in shape]

    def spectrum(img: np.ndarray) -> np.ndarray:
        return sp_fft.rfft2(img.astype(np.float32), fshape)  # single precision: twice as fast, ample here

    def correlate(model_spec: np.ndarray, data_spec: np.ndarray) -> np.ndarray:
        # corr[i, j] pairs data pixel (p, q) with model pixel (p + i - ny + 1, q + j - nx + 1).
        return sp_fft.irfft2(model_spec * data_spec, fshape)[: shape[0], : shape[1]]

    if not data.fft_cache:
        data.fft_cache.update(hist=spectrum(hist[::-1, ::-1]), box=spectrum(np.ones((ny, nx))))
    hist_spec = data.fft_cache["hist"]
    rho_spec = spectrum(rho)
    levels = np.arange(FFT_LOG_Z[0], FFT_LOG_Z[1] + 1e-9, FFT_LOG_Z[2])
    # Z below the ladder is treated as its lowest level: the score then tends to that of field
    # stars only instead of growing without bound as the box loses the model.
    z = np.clip(correlate(rho_spec, data.fft_cache["box"]) * g.dx * g.dy, 10 ** levels[0], None)
    # Field floor: a fraction FFT_FIELD of the stars spread evenly over the box.
    c = FFT_FIELD / (1 - FFT_FIELD) / ((hi_c - lo_c) * (hi_m - lo_m))
    nearest = np.clip(np.rint((np.log10(z) - levels[0]) / FFT_LOG_Z[2]), 0, len(levels) - 1).astype(int)
    score = np.full(shape, -np.inf)
    for k, lz in enumerate(levels):
        sel = nearest == k
        if not sel.any():
            continue
        floor = c * 10 ** lz
        # log(rho + floor) - log(floor) is zero where the model is empty, like the FFT's zero padding.
        corr = correlate(spectrum(np.log1p(rho / floor)), hist_spec)
        score[sel] = corr[sel] + n * (np.log(floor) - np.log(z[sel]))
    # Candidates: local maxima of the score (one per sequence-sized neighbourhood), best first.
    peaks = (score == maximum_filter(score, size=FFT_PEAK_SEPARATION_PX)) & np.isfinite(score)
    idx = np.flatnonzero(peaks)
    idx = idx[np.argsort(score.ravel()[idx])[::-1]]
    best = score.ravel()[idx[0]]
    out = []
    for flat in idx[:FFT_MAX_STARTS]:
        if score.ravel()[flat] < best - FFT_SCORE_WINDOW:
            break
        i, j = np.unravel_index(flat, shape)
        out.append((float(lo_c - g.x0 - (j - nx + 1) * g.dx), float(lo_m - g.y0 - (i - ny + 1) * g.dy)))
    return out


@dataclass
class _AgeResult:
    """Best fit at one (age, [M/H]); ``single``/``binary`` are the stars' model densities there."""

    lnl: float
    dcolor: float
    dmag: float
    scale: float
    f_field: float
    f_binary: float
    single: np.ndarray
    binary: np.ndarray

    @property
    def start(self) -> Start:
        return self.dcolor, self.dmag, self.scale


@dataclass
class _Fixed:
    """Which quantities are fixed, and the map between the optimiser's free parameters and (dcolor, dmag, k)."""

    k_color: float              # colour excess per E(B-V)
    k_mag: float                # extinction in the magnitude band per E(B-V)
    calibrated: bool
    mu: float | None
    ebv: float | None
    scale: float | None         # fixed colour scale; None: free within scale_range
    scale_range: tuple[float, float] = COLOR_SCALE_RANGE

    @property
    def scales(self) -> tuple[float, float]:
        """The colour scales the model window must cover."""
        return (self.scale, self.scale) if self.scale is not None else self.scale_range

    @property
    def scale0(self) -> float:
        return self.scale if self.scale is not None else 0.5 * sum(self.scale_range)

    def to_start(self, p: np.ndarray) -> Start:
        """(dcolor, dmag, k) from the free parameters."""
        it = iter(p)
        if not self.calibrated:
            dc, dm = float(next(it)), float(next(it))
        else:
            # |E(B-V)|: reddening cannot be negative; the reflection keeps Nelder-Mead unconstrained.
            ebv = self.ebv if self.ebv is not None else abs(float(next(it)))
            mu = self.mu if self.mu is not None else float(next(it))
            dc, dm = self.k_color * ebv, mu + self.k_mag * ebv
        k = self.scale
        if k is None:
            # A logistic keeps k inside its range without bounds the simplex could stick to.
            lo, hi = self.scale_range
            k = lo + (hi - lo) / (1.0 + np.exp(-float(next(it))))
        return (dc * k if self.calibrated else dc), dm, float(k)

    def to_params(self, start: Start) -> np.ndarray:
        """Free parameters closest to the given (dcolor, dmag, k) (the optimiser's start)."""
        dcolor, dmag, k = start
        out = []
        if not self.calibrated:
            out += [dcolor, dmag]
        else:
            ebv = self.ebv if self.ebv is not None else dcolor / k / self.k_color
            if self.ebv is None:
                out.append(max(ebv, 0.0))
            if self.mu is None:
                out.append(dmag - self.k_mag * ebv)
        if self.scale is None:
            lo, hi = self.scale_range
            t = np.clip((k - lo) / (hi - lo), 1e-3, 1 - 1e-3)
            out.append(float(np.log(t / (1 - t))))
        return np.array(out)

    def simplex(self, p0: np.ndarray) -> np.ndarray:
        """Initial Nelder-Mead simplex: steps of about the sequence's width, not the default 5 %."""
        steps = []
        if not self.calibrated:
            steps = [0.03, 0.1]
        else:
            if self.ebv is None:
                steps.append(0.03)
            if self.mu is None:
                steps.append(0.1)
        if self.scale is None:
            steps.append(0.5)
        sim = np.tile(p0, (len(p0) + 1, 1))
        for i, st in enumerate(steps):
            sim[i + 1, i] += st
        return sim

    def at_scale(self, scale: float) -> "_Fixed":
        """The same, with the colour scale fixed (the coarse scan's cheaper two-parameter fits)."""
        return replace(self, scale=scale)

    def physical(self, start: Start) -> tuple[float, float]:
        """(distance modulus, E(B-V)) implied by the shifts."""
        dcolor, dmag, k = start
        ebv = dcolor / k / self.k_color
        return dmag - self.k_mag * ebv, ebv


def _fit_start(model: AgeModel, data: CmdData, start: Start, fixed: _Fixed) -> _AgeResult:
    """Best shifts and colour scale for one model, by Nelder-Mead from one start."""
    p0 = fixed.to_params(start)
    if p0.size:
        res = optimize.minimize(lambda p: _neg_lnl(fixed.to_start(p), model, data), p0, method="Nelder-Mead",
                                options={"xatol": 3e-3, "fatol": 0.05, "initial_simplex": fixed.simplex(p0)})
        p0 = res.x
    best = fixed.to_start(p0)
    s, b = component_densities(model, data, *best)
    lnl, ff, fb = mixture_lnl(s, b, data.field, np.ones(data.mag.size), data.field_prior)
    return _AgeResult(lnl, *best, ff, fb, s, b)


def as_float(values) -> np.ndarray:
    """A float array with masked entries (astropy MaskedColumn, numpy masked array) as NaN."""
    return np.ma.asarray(values, dtype=float).filled(np.nan)


def _distinct(start: Start, others: list[Start]) -> bool:
    """True if a start is not within a sequence width of any of the others (it would find the same optimum)."""
    return all(abs(start[0] - o[0]) > 0.05 or abs(start[1] - o[1]) > 0.2 for o in others)


def _fit_one_age(log_age: float, mh: float, bands: tuple[str, str], data: CmdData, fixed: _Fixed,
                 neighbours: list[_AgeResult], search: bool = True) -> _AgeResult:
    """Best shifts at one age, started from the FFT candidates (if ``search``) and neighbouring fits' solutions.

    Each start gets its own model window: candidates can be magnitudes apart, and one
    window spanning them all would cost many times more to blur.
    """
    starts: list[Start] = ([(dc, dm, fixed.scale0) for dc, dm in _fft_starts(log_age, mh, bands, data)]
                           if search else [])
    for r in neighbours:
        if _distinct(r.start, starts):
            starts.append(r.start)
    results = [_fit_start(age_model(log_age, mh, bands, data, [s[:2]], fixed.scales), data, s, fixed)
               for s in starts]
    return max(results, key=lambda r: r.lnl)


def _propagate(ages: np.ndarray, mh: float, bands: tuple[str, str], data: CmdData, fixed: _Fixed,
               results: dict[int, _AgeResult]) -> None:
    """Refit ages from a fitted neighbour's shifts where that neighbour fits much better.

    Why: the profile likelihood is smooth between neighbouring grid ages, so an age
    fitting far worse than its neighbour with quite different shifts has been caught
    in a secondary optimum (the global search is approximate); the neighbour's
    solution is a start that reaches the right one.  Sweeps repeat until nothing
    improves, so a good solution spreads in both directions along the grid.
    """
    for _ in range(len(ages)):
        changed = False
        fitted = sorted(results)
        for a, b in list(zip(fitted[:-1], fitted[1:])) + list(zip(fitted[1:], fitted[:-1])):
            good, poor = results[a], results[b]
            if good.lnl < poor.lnl + PROPAGATE_DLNL or not _distinct(good.start, [poor.start]):
                continue
            refit = _fit_one_age(float(ages[b]), mh, bands, data, fixed, [good], search=False)
            if refit.lnl > poor.lnl + 1e-6:
                results[b] = refit
                changed = True
        if not changed:
            return


def _scan_ages(ages: np.ndarray, mh: float, bands: tuple[str, str], data: CmdData,
               fixed: _Fixed) -> dict[int, _AgeResult]:
    """Fits on every COARSE_STEP-th grid age, then on every grid age near the best one.

    Why coarse to fine: the likelihood varies smoothly on 0.1-0.2 dex scales away from
    the optimum, and each coarse age costs a global search.
    """
    results: dict[int, _AgeResult] = {}
    for i in range(0, len(ages), COARSE_STEP):
        prev = [results[i - COARSE_STEP]] if i >= COARSE_STEP else []
        results[i] = _fit_one_age(float(ages[i]), mh, bands, data, fixed, prev)
    while True:
        _propagate(ages, mh, bands, data, fixed, results)
        best = max(results, key=lambda k: results[k].lnl)
        todo = [i for i in range(max(best - FINE_HALF_WINDOW, 0), min(best + FINE_HALF_WINDOW + 1, len(ages)))
                if i not in results]
        if not todo:
            return results
        for i in todo:
            # Between two fitted ages: their solutions are the starts (the global search ran there).
            near = [results[k] for k in sorted(results, key=lambda k: abs(k - i))[:2] if abs(k - i) < COARSE_STEP]
            results[i] = _fit_one_age(float(ages[i]), mh, bands, data, fixed, near, search=not near)


def _filled_curve(ages: np.ndarray, results: dict[int, _AgeResult]) -> np.ndarray:
    """Profile lnL on the whole grid, linearly interpolated across ages not fitted."""
    idx = np.array(sorted(results))
    return np.interp(np.arange(len(ages)), idx, [results[i].lnl for i in idx])


def _scan_ridge(ages: np.ndarray, mh: float, bands: tuple[str, str], data: CmdData, fixed: _Fixed,
                neighbour: dict[int, _AgeResult]) -> dict[int, _AgeResult]:
    """Fits at one [M/H] along the age-[M/H] ridge: the ages around the neighbouring fits' best one,
    started from their solutions, widened while an end is still near the best lnL.

    Why not a full scan: [M/H] moves the best age by a few grid steps at most, and the
    neighbouring node's shifts are within the optimiser's reach.
    """
    results: dict[int, _AgeResult] = {}
    centre = max(neighbour, key=lambda k: neighbour[k].lnl)
    lo, hi = max(centre - RIDGE_HALF_WINDOW, 0), min(centre + RIDGE_HALF_WINDOW, len(ages) - 1)
    todo = list(range(lo, hi + 1))
    while todo:
        for i in todo:
            near = [neighbour[k] for k in sorted(neighbour, key=lambda k: abs(k - i))[:1]]
            near += [results[k] for k in (i - 1, i + 1) if k in results]
            results[i] = _fit_one_age(float(ages[i]), mh, bands, data, fixed, near, search=False)
        top = max(r.lnl for r in results.values())
        todo = []
        if lo > 0 and centre - lo < RIDGE_MAX_HALF_WINDOW and results[lo].lnl > top - RIDGE_DEPTH:
            lo -= 1
            todo.append(lo)
        if hi < len(ages) - 1 and hi - centre < RIDGE_MAX_HALF_WINDOW and results[hi].lnl > top - RIDGE_DEPTH:
            hi += 1
            todo.append(hi)
    return results


def _mh_nodes(mh: float, fit_mh: bool, mh_range: tuple[float, float]) -> tuple[np.ndarray, int]:
    """The [M/H] values fitted and the index of the one the full age scan runs at (nearest ``mh``)."""
    if not fit_mh:
        return np.array([float(mh)]), 0
    n = int(round((mh_range[1] - mh_range[0]) / MH_STEP)) + 1
    nodes = np.linspace(mh_range[0], mh_range[1], max(n, 2))
    return nodes, int(np.argmin(np.abs(nodes - mh)))


def _scan(ages: np.ndarray, nodes: np.ndarray, first: int, bands: tuple[str, str], data: CmdData,
          fixed: _Fixed) -> tuple[np.ndarray, np.ndarray, dict[tuple[int, int], _AgeResult]]:
    """Profile lnL on (age, [M/H] node) and the fits, keyed (age index, node index).

    The ages are the grid's at half steps: the grid ages' cells come from the scans (-inf
    where not fitted), the half steps' from the refinement around the best cell, elsewhere
    linearly interpolated between the grid ages.
    """
    fits: dict[tuple[int, int], _AgeResult] = {}
    lnl = np.full((len(ages), len(nodes)), -np.inf)
    coarse = _scan_ages(ages, float(nodes[first]), bands, data, fixed.at_scale(fixed.scale0))
    # Ages off the ridge keep the coarse scan's (fixed-scale) lnL: far below the maximum, they only
    # bound the posterior's tails.
    lnl[:, first] = _filled_curve(ages, coarse)
    base = _scan_ridge(ages, float(nodes[first]), bands, data, fixed, coarse)
    for direction in (0, -1, 1):
        neighbour, j = base, first + direction
        while 0 <= j < len(nodes):
            if direction:
                neighbour = _scan_ridge(ages, float(nodes[j]), bands, data, fixed, neighbour)
            for i, r in neighbour.items():
                lnl[i, j], fits[(i, j)] = r.lnl, r
            if not direction:
                break
            j += direction
    fine_ages = np.linspace(ages[0], ages[-1], 2 * len(ages) - 1)
    floor = lnl[np.isfinite(lnl)].min() - 10 * POSTERIOR_DEPTH
    fine = np.stack([np.interp(fine_ages, ages, np.where(np.isfinite(col), col, floor)) for col in lnl.T], axis=1)
    fine_fits = {(2 * i, j): r for (i, j), r in fits.items()}
    bi, bj = max(fits, key=lambda key: fits[key].lnl)
    for j in (bj,):
        for i in range(max(bi - REFINE_HALF_WINDOW, 0), min(bi + REFINE_HALF_WINDOW, len(ages) - 1)):
            near = [fits[k] for k in ((i, j), (i + 1, j)) if k in fits]
            if near:
                r = _fit_one_age(float(fine_ages[2 * i + 1]), float(nodes[j]), bands, data, fixed, near, search=False)
                fine[2 * i + 1, j], fine_fits[(2 * i + 1, j)] = r.lnl, r
    return fine_ages, fine, fine_fits


def _mh_log_prior(mh: np.ndarray, centre: float, sigma: float | None) -> np.ndarray:
    """log prior of [M/H]: flat over the fitted range, or Gaussian."""
    if sigma is None or sigma <= 0:
        return np.zeros_like(mh)
    return -0.5 * ((mh - centre) / sigma) ** 2


def _quantiles(x: np.ndarray, logp: np.ndarray, q: tuple[float, ...]) -> np.ndarray:
    """Quantiles of a density given on a fine, even grid ``x`` (log density, any offset)."""
    p = np.exp(logp - logp.max())
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (p[1:] + p[:-1]))])
    cdf /= cdf[-1]
    return np.interp(q, cdf, x)


@dataclass(frozen=True)
class _Posterior:
    """The marginal posteriors: age (on the grid, and its quantiles) and [M/H] (median and 68 %), best cell."""

    log_post: np.ndarray                    # log marginal posterior of the age at the grid ages
    age_q: np.ndarray                       # quantiles 0.025, 0.159, 0.5, 0.841, 0.975
    mh_q: np.ndarray                        # [M/H] quantiles 0.159, 0.5, 0.841
    best: tuple[int, int]                   # (age index, node index) of the highest posterior cell


def _log_spline(x: np.ndarray, logp: np.ndarray, at: np.ndarray) -> np.ndarray:
    """A log density through the nodes ``x`` evaluated at ``at``: cubic, cut POSTERIOR_DEPTH below the
    maximum (-inf there), its overshoot bounded so that it cannot invent a peak."""
    top = float(np.max(logp))
    out = CubicSpline(x, np.maximum(logp, top - POSTERIOR_DEPTH))(at)
    out = np.minimum(out, top + 5.0)
    return np.where(out < top - POSTERIOR_DEPTH, -np.inf, out)


def _posterior(ages: np.ndarray, nodes: np.ndarray, lnl: np.ndarray, mh_centre: float,
               mh_sigma: float | None) -> _Posterior:
    """Marginalise lnL(age, [M/H]) over [M/H] (prior times likelihood, lnL a cubic spline between
    nodes) and interpolate in age by a cubic spline of the log posterior.

    Why splines of the log: with hundreds of stars the likelihood is narrower than the nodes'
    spacing, and a piecewise-linear log would put every maximum on a node.
    """
    if len(nodes) > 1:
        mh_fine = np.linspace(nodes[0], nodes[-1], 10 * (len(nodes) - 1) + 1)
        fine = np.stack([_log_spline(nodes, row, mh_fine) for row in lnl])
    else:
        mh_fine, fine = nodes, lnl
    logj = fine + _mh_log_prior(mh_fine, mh_centre, mh_sigma)[None, :]
    log_age = logsumexp(logj, axis=1)
    log_mh = logsumexp(logj, axis=0)
    top = log_age.max()
    x = np.arange(ages[0], ages[-1] + 1e-9, FINE_AGE_STEP)
    logp = _log_spline(ages, log_age, x)
    age_q = _quantiles(x, logp, (QUANTILES_95[0], QUANTILES_68[0], 0.5, QUANTILES_68[1], QUANTILES_95[1]))
    mh_q = (_quantiles(mh_fine, log_mh, (QUANTILES_68[0], 0.5, QUANTILES_68[1])) if len(nodes) > 1
            else np.repeat(nodes[0], 3))
    cell = lnl + _mh_log_prior(nodes, mh_centre, mh_sigma)[None, :]
    best = np.unravel_index(int(np.argmax(cell)), cell.shape)
    return _Posterior(log_age - top, age_q, mh_q, (int(best[0]), int(best[1])))


def _with_floor(centre: float, lo: float, hi: float, floor: float) -> tuple[float, float]:
    """An interval's sides widened by a systematic floor in quadrature."""
    return centre - float(np.hypot(centre - lo, floor)), centre + float(np.hypot(hi - centre, floor))


def fit_age(color, mag, color_err, mag_err, usable, bands: tuple[str, str] = ("B", "V"),
            mh: float = 0.0, fit_mh: bool = True, distance_modulus: float | None = None,
            ebv: float | None = None, calibrated: bool = False, mag_limit: float | None = None,
            bright_limit: float | None = None, x: np.ndarray | None = None,
            y: np.ndarray | None = None, *, mh_sigma: float | None = None,
            mh_range: tuple[float, float] = MH_RANGE, color_scale: float | None = None,
            color_scale_range: tuple[float, float] = COLOR_SCALE_RANGE,
            systematic_floor: float = AGE_FLOOR_DEX) -> AgeFit:
    """Fit PARSEC isochrones to a colour-magnitude diagram; see the module docstrings.

    color = mag(bands[0]) - mag(bands[1]), mag = mag(bands[1]), with their errors;
    ``usable`` is False for stars to ignore (saturated, blended, flagged).  With
    ``calibrated`` False the magnitudes may carry any zeropoint: the fitted shifts
    then mix distance, reddening and zeropoints, and only the age (from the
    shape) is physical.  ``distance_modulus``/``ebv`` fix those quantities
    (only used when calibrated).

    [M/H]: with ``fit_mh`` it is fitted over ``mh_range`` and marginalised, under a
    Gaussian prior ``mh`` +- ``mh_sigma`` (flat over the range without ``mh_sigma``);
    without, it is fixed at ``mh`` (interpolated between the grid's values).
    Colour scale ``k`` (observed colour = k (B-V) + c): ``color_scale`` fixes it (a
    configured colour term); otherwise it is free within ``color_scale_range`` for
    instrumental magnitudes and 1 for calibrated ones.  ``systematic_floor`` (dex) is
    added in quadrature to the statistical intervals.

    ``mag_limit`` is the faint limit of the stars used (default: the 90th percentile,
    brighter if the median colour error exceeds 0.1 mag before); the model is
    renormalised to it, so it must not be fainter than where the catalogue is complete.
    ``bright_limit`` (default: the brightest usable star if excluded stars brighter
    than it show saturation, else 1 mag above it) truncates the model at the bright end.
    ``x``, ``y`` (pixel positions on one grid) add a spatial membership prior
    (``reduction.membership``); the result then holds ``spatial``, ``membership_prior``
    and ``membership`` (per input star).
    Raises AgeFitError (a ValueError) when no age can be fitted, with the reason.
    """
    t0 = time.perf_counter()
    bands = (str(bands[0]), str(bands[1]))
    color, mag, color_err, mag_err = (as_float(v) for v in (color, mag, color_err, mag_err))
    usable = np.ma.asarray(usable).filled(False).astype(bool)
    data = prepare_data(color, mag, color_err, mag_err, usable, mag_limit, bright_limit)
    n = data.mag.size
    spatial, prior = None, np.empty(0)
    if x is not None and y is not None:
        spatial, prior = use_positions(data, as_float(x), as_float(y), usable)
    notes = []
    if not calibrated and (distance_modulus is not None or ebv is not None):
        notes.append("distance modulus / E(B-V) given but zeropoints uncalibrated: ignored")
        distance_modulus = ebv = None
    scale_free = color_scale is None and not calibrated
    fixed = _Fixed(A_OVER_EBV[bands[0]] - A_OVER_EBV[bands[1]], A_OVER_EBV[bands[1]], calibrated,
                   distance_modulus, ebv, None if scale_free else (color_scale or 1.0), tuple(color_scale_range))
    ages, _ = grid()
    nodes, first = _mh_nodes(mh, fit_mh, mh_range)
    ages, lnl, fits = _scan(ages, nodes, first, bands, data, fixed)
    post = _posterior(ages, nodes, lnl, mh, mh_sigma if fit_mh else None)
    lo95, lo68, log_age, hi68, hi95 = (float(v) for v in post.age_q)
    low, high = _with_floor(log_age, lo68, hi68, systematic_floor)
    low95, high95 = _with_floor(log_age, lo95, hi95, 1.96 * systematic_floor)
    mh_fit = float(post.mh_q[1])
    # The reported solution (shifts, fractions, drawn isochrone) at the posterior's age and [M/H].
    best = _fit_one_age(log_age, mh_fit, bands, data, fixed, [fits[post.best]], search=False)

    mu, ebv_fit = fixed.physical(best.start)
    if calibrated:
        notes.insert(0, "calibrated zeropoints: distance modulus and E(B-V) are physical")
    else:
        band_m, colour = bands[1], f"{bands[0]}-{bands[1]}"
        notes.insert(0, f"instrumental magnitudes (zeropoints not calibrated): the fitted shifts are "
                        f"{band_m} shift = apparent distance modulus + {band_m} zeropoint = {best.dmag:.3f} and "
                        f"{colour} shift = colour excess + colour zeropoint = {best.dcolor:.3f}; distance_modulus "
                        f"(= {band_m} shift - {fixed.k_mag:.2f} ebv) and ebv (from the {colour} shift) include "
                        "the unknown zeropoints and are not physical; the age comes from the shape of the "
                        "sequence (turn-off, main-sequence curvature, giants)")
    turnoff = turnoff_point(log_age, mh_fit, bands, best.dcolor, best.dmag, best.scale)
    if turnoff[1] < data.box[2]:
        # Why say so: without the turn-off the age rests on the main sequence's curvature (or the
        # pre-main sequence), which a few field stars or 0.01 mag colour errors can bend; on
        # pipeline catalogues such fits were off by up to 0.25 dex with the interval just short.
        notes.append(f"the fitted turn-off ({bands[1]} = {turnoff[1]:.2f}) is brighter than the brightest star "
                     f"used ({data.box[2]:.2f}, saturation): the age comes from the sequence below the turn-off "
                     "(main-sequence curvature, pre-main-sequence turn-on) and may be less certain than the interval says")
    iso_c, iso_m = plot_isochrone(log_age, mh_fit, bands, best.dcolor, best.dmag, best.scale, mag, turnoff[1])
    membership = np.full(mag.size, np.nan)
    prior_field = best.f_field if data.field_prior is None else data.field_prior
    cluster = (1 - prior_field) * ((1 - best.f_binary) * best.single + best.f_binary * best.binary)
    membership[data.used] = cluster / (cluster + prior_field * data.field + 1e-300)
    if not fit_mh:
        mh_prior = f"fixed at {mh:+.2f}"
    elif mh_sigma:
        mh_prior = f"Gaussian {mh:+.2f} +- {mh_sigma:.2f}, within {mh_range[0]:+.2f}..{mh_range[1]:+.2f}"
    else:
        mh_prior = f"flat over {mh_range[0]:+.2f}..{mh_range[1]:+.2f}"
    seconds = time.perf_counter() - t0
    log.info("age fit: log age %.3f (68%% %.3f..%.3f, 95%% %.3f..%.3f), [M/H] %+.2f, colour scale %.3f, "
             "from %d stars in %.2f s", log_age, low, high, low95, high95, mh_fit, best.scale, n, seconds)
    return AgeFit(
        log_age=log_age, log_age_low=low, log_age_high=high,
        age_myr=10 ** log_age / 1e6, age_myr_low=10 ** low / 1e6, age_myr_high=10 ** high / 1e6,
        distance_modulus=mu, ebv=ebv_fit, mh=mh_fit, n_stars=n, calibrated_zeropoints=bool(calibrated),
        isochrone_set=ISOCHRONE_SET, iso_color=iso_c, iso_mag=iso_m, turnoff=turnoff,
        log_age_low95=low95, log_age_high95=high95, statistical=(lo68, hi68, lo95, hi95),
        systematic_floor=float(systematic_floor), mh_low=float(post.mh_q[0]), mh_high=float(post.mh_q[2]),
        mh_fitted=bool(fit_mh), mh_prior=mh_prior, color_scale=best.scale, color_scale_fitted=scale_free,
        bands=bands, note="; ".join(notes), dmag=best.dmag, dcolor=best.dcolor,
        field_fraction=best.f_field, binary_fraction=best.f_binary, mag_limit=data.box[3],
        seconds=seconds, profile_log_age=np.asarray(ages, float), profile_lnl=post.log_post,
        membership_prior=prior, membership=membership, spatial=spatial)
