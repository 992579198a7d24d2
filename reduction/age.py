"""A star cluster's age from its colour-magnitude diagram, by isochrone fitting.

Why a likelihood and not a by-eye overlay: the observer's diagram holds field
stars, unresolved binaries, saturated bright stars and an incomplete faint end,
and the magnitudes are instrumental (unknown zeropoints) unless the night was
calibrated.  The age must come from the *shape* of the sequence (turn-off,
main-sequence curvature, giants), with honest uncertainties.

Model (per PARSEC isochrone of log age ``a`` and metallicity ``[M/H]``):

* The isochrone is resampled densely along its track and weighted by the IMF
  (differences of ``int_IMF``), so that the sparse turn-off and giant regions are
  correctly sparse in the model.  Unresolved binaries are a second track: each
  primary combined with a secondary of mass ``q * m`` (``q`` uniform in 0..1),
  which spans the binary sequence up to 0.75 mag above the main sequence.
* Both tracks are rendered into images of the (colour, absolute magnitude)
  plane and blurred by an intrinsic width plus the photometric errors.  Stars
  with different errors see differently blurred images (a few error classes).
* A star's likelihood is a mixture: cluster single star, cluster binary, or
  field star (a broad density estimate of the diagram itself); the fractions are
  fitted (EM) for every trial shift, the binary fraction at most 0.6.
* With star positions (optional), a King cluster on an even field fitted to them
  gives each star a prior membership probability, which replaces the one global
  field fraction (the binary fraction is still fitted), and the field density is
  estimated from the likely field stars: a field population with its own sequence
  (an old field's turn-off plume along a younger isochrone) is then recognised as
  field by where its stars are, which the diagram alone cannot do.
* The model is truncated to the observed box (colour range, saturation limit,
  faint limit) and renormalised there, so saturation and faint incompleteness
  do not bias the fit: the model only has to explain what could be observed.
* Shifts: ``mag = M + dmag``, ``colour = k colour_0 + dcolor``.  Calibrated data:
  ``dmag = mu + A_band2 E(B-V)``, ``dcolor = (A_band1 - A_band2) E(B-V)``, k = 1.
  Uncalibrated data: both shifts are free and absorb the zeropoints; the colour
  scale k is fixed (1 by default) or fitted within a range, for filters that are
  not the isochrone's.
* Per age, a global FFT search scores every shift with an approximate,
  box-normalised likelihood; Nelder-Mead refines its best few candidates, and
  an age fitting much worse than a neighbour is refitted from the neighbour's
  shifts.  Ages are scanned every 0.1 dex, then every 0.025 dex (isochrones
  interpolated between the grid's nodes) near the best.  [M/H] is fixed, or
  marginalised under its prior over a few interpolated values near the best age.
  The age is the maximum of that profile, interpolated by a parabola.  The 68 %
  and 95 % intervals are bootstrap percentiles over the stars (``_intervals``),
  the 95 % one also spanning the profile within 3 of its maximum, each widened by
  a systematic floor (0.05 dex, one sigma) in quadrature.

This module is the fit; the model it scores is ``reduction.cmd_model`` and the
spatial membership prior ``reduction.membership``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import optimize
from scipy import fft as sp_fft
from scipy.ndimage import gaussian_filter, maximum_filter

from reduction.cmd_model import (AgeModel, FitData, age_model, component_densities, field_density, full_grid,
                                 mixture_lnl, model_tracks, neg_lnl, prepare, render)
from reduction.isochrones import A_OVER_EBV, LABEL_MAIN_SEQUENCE, MH_EXTRAPOLATION, grid, interpolated_isochrone
from reduction.membership import SPATIAL_MIN_GAIN, SpatialProfile, spatial_profile

log = logging.getLogger(__name__)

ISOCHRONE_SET = "PARSEC v1.2S (uwastro465isos)"

#: Systematic floor (dex, one sigma) added in quadrature to both intervals: the isochrone set's own
#: systematics and the grid step (ages between grid points come from interpolating the likelihood).
AGE_FLOOR_DEX = 0.05
#: Profile-likelihood drop that the 95 % interval always spans: 2 (about 95 % for one parameter)
#: plus 1 for the bumpiness of the profile between neighbouring grid isochrones (pre-main-sequence,
#: hook, a few field stars just above the turn-off that one isochrone explains and its neighbour
#: does not: 2-3 units on pipeline catalogues of a 300 Myr cluster).
PROFILE_DELTA_LNL = 3.0
#: Percentiles of the bootstrap ages that bound the 68 % and the 95 % intervals.
PERCENTILES_68 = (16.0, 84.0)
PERCENTILES_95 = (2.5, 97.5)
#: Gaussian quantile of the 95 % interval (the floor is one sigma).
Z_95 = 1.96
#: [M/H] values marginalised over when there is no prior: the range of open clusters.
MH_SCAN = (-0.6, -0.4, -0.2, 0.0, 0.2)
#: Range of the colour scale k (observed colour = k model colour + c) for a filter set that is not the
#: isochrone's (``color_scale``; the default is 1, Johnson-like filters).
COLOR_SCALE_RANGE = (0.8, 1.2)
#: Ages fitted per grid step of the isochrone set: between nodes the isochrone is interpolated,
#: so the profile near its maximum is sampled at 0.025 dex.
AGE_SUBSTEPS = 2
#: The first scan fits every COARSE_STEP-th age of that axis (0.1 dex) ...
COARSE_STEP = 2 * AGE_SUBSTEPS
#: ... then every age within this many axis steps of the best one.
FINE_HALF_WINDOW = 3 * AGE_SUBSTEPS
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


@dataclass
class AgeFit:
    """Result of an isochrone fit; ``to_json`` is the content of ``age.json``."""

    log_age: float
    log_age_low: float
    log_age_high: float
    age_myr: float
    age_myr_low: float
    age_myr_high: float
    log_age_low95: float
    log_age_high95: float
    distance_modulus: float
    ebv: float
    mh: float
    n_stars: int
    calibrated_zeropoints: bool
    isochrone_set: str
    iso_color: np.ndarray
    iso_mag: np.ndarray
    turnoff: tuple[float, float]
    bands: tuple[str, str] = ("B", "V")
    note: str = ""
    dmag: float = float("nan")          # fitted magnitude shift (absolute -> observed axis)
    dcolor: float = float("nan")        # fitted colour shift
    field_fraction: float = float("nan")
    binary_fraction: float = float("nan")
    mag_limit: float = float("nan")     # faint limit of the stars used
    seconds: float = float("nan")       # wall time of the fit
    profile_log_age: np.ndarray = field(default_factory=lambda: np.empty(0))
    profile_lnl: np.ndarray = field(default_factory=lambda: np.empty(0))
    #: With positions: each input star's spatial prior membership probability (NaN without a
    #: finite position) and its posterior cluster membership (CMD and position; NaN if unused).
    membership_prior: np.ndarray = field(default_factory=lambda: np.empty(0))
    membership: np.ndarray = field(default_factory=lambda: np.empty(0))
    spatial: "SpatialProfile | None" = None
    color_scale: float = 1.0            # fitted k of colour = k (model colour) + colour shift
    color_scale_range: tuple[float, float] = (1.0, 1.0)
    systematic_dex: float = AGE_FLOOR_DEX

    def to_json(self) -> dict:
        """Plain JSON-serialisable record (age.json)."""
        return {
            "log_age": round(float(self.log_age), 4),
            "log_age_low": round(float(self.log_age_low), 4),
            "log_age_high": round(float(self.log_age_high), 4),
            "age_myr": round(float(self.age_myr), 2),
            "age_myr_low": round(float(self.age_myr_low), 2),
            "age_myr_high": round(float(self.age_myr_high), 2),
            "log_age_low95": round(float(self.log_age_low95), 4),
            "log_age_high95": round(float(self.log_age_high95), 4),
            "confidence": {"log_age_low/high": 0.68, "log_age_low95/high95": 0.95},
            "systematic_dex": round(float(self.systematic_dex), 4),
            "color_scale": round(float(self.color_scale), 4),
            "color_scale_range": [float(v) for v in self.color_scale_range],
            "distance_modulus": round(float(self.distance_modulus), 3),
            "ebv": round(float(self.ebv), 4),
            "mh": float(self.mh),
            "n_stars": int(self.n_stars),
            "calibrated_zeropoints": bool(self.calibrated_zeropoints),
            "isochrone_set": self.isochrone_set,
            "bands": list(self.bands),
            "note": self.note,
            "turnoff": [round(float(self.turnoff[0]), 4), round(float(self.turnoff[1]), 4)],
            "magnitude_shift": round(float(self.dmag), 3),
            "color_shift": round(float(self.dcolor), 4),
            "field_fraction": round(float(self.field_fraction), 3),
            "binary_fraction": round(float(self.binary_fraction), 3),
            "mag_limit": round(float(self.mag_limit), 3),
            "fit_seconds": round(float(self.seconds), 2),
            **({"spatial_prior": self.spatial.to_json()} if self.spatial is not None else {}),
        }


def _fft_starts(log_age: float, mh: float, bands: tuple[str, str], data: FitData) -> list[tuple[float, float]]:
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
    single_t, binary_t = model_tracks(log_age, mh, bands)
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
    """Best fit at one age; ``single``/``binary`` are the stars' model densities there (for the bootstrap)."""

    lnl: float
    dcolor: float
    dmag: float
    f_field: float
    f_binary: float
    single: np.ndarray
    binary: np.ndarray
    scale: float = 1.0          # colour scale k: observed colour = k (model colour) + dcolor

    @property
    def start(self) -> tuple[float, float, float]:
        """This solution as a start for another age's fit."""
        return self.dcolor, self.dmag, self.scale


def _fit_shifts(model: AgeModel, data: FitData, start: tuple[float, ...], fixed: "_Fixed") -> _AgeResult:
    """Best shifts (and colour scale) for one age: Nelder-Mead from ``start``."""
    weights = np.ones(data.mag.size)
    p0 = fixed.to_params(*start)
    if p0.size:         # else everything is fixed (calibrated, distance and reddening given)
        warm = [(0.2, 0.3)]
        p0 = optimize.minimize(
            lambda p: neg_lnl(np.array(fixed.to_shifts(p)), model, data, weights, warm), p0,
            method="Nelder-Mead",
            options={"xatol": 4e-3, "fatol": 0.02, "initial_simplex": fixed.simplex(p0)}).x
    dc, dm, k = fixed.to_shifts(p0)
    s, b = component_densities(model, data, dc, dm, k)
    lnl, ff, fb = mixture_lnl(s, b, data.field, weights, data.field_prior)
    return _AgeResult(lnl, dc, dm, ff, fb, s, b, k)


@dataclass
class _Fixed:
    """Which physical quantities are fixed, and the map between free parameters and shifts."""

    k_color: float              # colour excess per E(B-V)
    k_mag: float                # extinction in the magnitude band per E(B-V)
    calibrated: bool
    mu: float | None
    ebv: float | None
    #: Range of the colour scale k (colour = k model colour + dcolor); equal ends fix it.
    scales: tuple[float, float] = (1.0, 1.0)
    #: Observed colour the scale pivots about in the free parameters (the data's median): scaling
    #: about the middle of the sequence leaves its position alone, so k and the colour shift are
    #: nearly independent and Nelder-Mead can walk k (about colour 0, a 7 % scale moves the
    #: whole sequence by a few of its widths and the optimiser stalls in a local optimum).
    pivot: float = 0.0

    @property
    def free_scale(self) -> bool:
        return self.scales[1] > self.scales[0]

    @property
    def _mid_half(self) -> tuple[float, float]:
        """Middle and half-width of the colour scale's range."""
        return 0.5 * (self.scales[0] + self.scales[1]), 0.5 * (self.scales[1] - self.scales[0])

    def _scale(self, p: float) -> float:
        # k = middle + half-range * tanh(p): bounded, and smooth for Nelder-Mead.
        mid, half = self._mid_half
        return float(mid + half * np.tanh(p))

    def to_shifts(self, p: np.ndarray) -> tuple[float, float, float]:
        """(dcolor, dmag, colour scale) from the free parameters."""
        k = self._scale(p[-1]) if self.free_scale else self.scales[0]
        if not self.calibrated:
            # p[0] is the colour shift at k = 1 about the pivot: colour = k (model - pivot + p0) + pivot
            return self.pivot - k * (self.pivot - float(p[0])), float(p[1]), k
        it = iter(p)
        # |E(B-V)|: reddening cannot be negative; the reflection keeps Nelder-Mead unconstrained.
        ebv = self.ebv if self.ebv is not None else abs(float(next(it)))
        mu = self.mu if self.mu is not None else float(next(it))
        return self.k_color * ebv, mu + self.k_mag * ebv, k

    def to_params(self, dcolor: float, dmag: float, scale: float | None = None) -> np.ndarray:
        """Free parameters closest to the given shifts and scale (the optimiser's start)."""
        mid, half = self._mid_half
        k = scale if scale is not None and self.free_scale else mid
        if not self.calibrated:
            out = [self.pivot - (self.pivot - dcolor) / k, dmag]
        else:
            ebv = self.ebv if self.ebv is not None else dcolor / self.k_color
            out = []
            if self.ebv is None:
                out.append(max(ebv, 0.0))
            if self.mu is None:
                out.append(dmag - self.k_mag * ebv)
        if self.free_scale:
            out.append(float(np.arctanh(np.clip((k - mid) / half, -0.95, 0.95))))
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
        if self.free_scale:
            steps.append(0.3)           # about 0.06 in k over 0.8-1.2
        sim = np.tile(p0, (len(p0) + 1, 1))
        for i, st in enumerate(steps):
            sim[i + 1, i] += st
        return sim

    def physical(self, dcolor: float, dmag: float) -> tuple[float, float]:
        """(distance modulus, E(B-V)) implied by the shifts."""
        ebv = dcolor / self.k_color
        return dmag - self.k_mag * ebv, ebv


# --------------------------------------------------------------------------- the fit

def _profile(ages: np.ndarray, lnl: np.ndarray) -> float:
    """Maximum of the profile likelihood, parabolic between grid ages."""
    i = int(np.argmax(lnl))
    if 0 < i < len(ages) - 1:
        a, b, c = lnl[i - 1], lnl[i], lnl[i + 1]
        denom = a - 2 * b + c
        if denom < 0:
            # Vertex of the parabola through the three points, in grid steps from the best one.
            offset = float(np.clip(0.5 * (a - c) / denom, -0.5, 0.5))
            return float(ages[i] + offset * (ages[i + 1] - ages[i]))
    return float(ages[i])


def _profile_interval(ages: np.ndarray, lnl: np.ndarray, delta: float) -> tuple[float, float]:
    """Youngest and oldest ages whose profile likelihood is within ``delta`` of the maximum.

    Not only the contiguous run around the maximum: neighbouring grid isochrones
    differ in details (pre-main-sequence, hook) that make the profile bumpy by a
    unit or two, and when the data hold little age information (a saturated
    turn-off) the profile is a bumpy plateau; every age on it must be in the interval.
    The ends are interpolated linearly to where the profile crosses the cut.
    """
    cut = lnl.max() - delta
    inside = np.flatnonzero(lnl >= cut)
    j, k = inside[0], inside[-1]
    lo = float(ages[j]) if j == 0 else float(np.interp(cut, [lnl[j - 1], lnl[j]], [ages[j - 1], ages[j]]))
    hi = float(ages[k]) if k == len(ages) - 1 else float(
        np.interp(cut, [lnl[k + 1], lnl[k]], [ages[k + 1], ages[k]]))
    return lo, hi


def _bootstrap(ages: np.ndarray, by_mh: dict[float, dict[int, _AgeResult]], log_prior: dict[float, float],
               data: FitData, n: int, rng: np.random.Generator) -> np.ndarray:
    """Best ages of ``n`` resamples of the stars (multinomial weights), over all the ages and [M/H] fitted.

    The shifts and colour scale stay at each fit's full-data optimum (re-optimising them changes
    the maximum only to second order) while the fractions are refitted, and [M/H] is marginalised
    as in the fit; this makes a resample cost a few milliseconds, so it can roam the whole grid:
    when the data hold little age information (e.g. a saturated turn-off) the likelihood is a
    plateau and the interval must show it.
    """
    stars = data.mag.size
    boot = []
    for _ in range(n):
        w = rng.multinomial(stars, np.full(stars, 1.0 / stars)).astype(float)
        resampled = {met: {i: replace(r, lnl=mixture_lnl(r.single, r.binary, data.field, w, data.field_prior)[0])
                           for i, r in results.items()} for met, results in by_mh.items()}
        boot.append(_profile(ages, _marginal_curve(ages, resampled, log_prior)[0]))
    log.debug("bootstrap log ages: %s", np.round(np.sort(boot), 3))
    return np.array(boot)


def _metallicities(mh: float, mh_sigma: float | None, fit_mh: bool) -> tuple[list[float], dict[float, float]]:
    """The [M/H] values the fit tries, each with its log prior weight (normalised).

    Without a fit, ``mh`` alone. With a prior (``mh_sigma``), mh and 1 and 2 sigma either side
    (within the isochrones' reach); without one, ``MH_SCAN`` evenly (open clusters' range).
    """
    if not fit_mh:
        return [float(mh)], {float(mh): 0.0}
    _, nodes = grid()
    lo, hi = nodes[0] - MH_EXTRAPOLATION, nodes[-1] + MH_EXTRAPOLATION
    if mh_sigma is None or mh_sigma <= 0:
        values = [float(v) for v in MH_SCAN]
        weights = np.zeros(len(values))
    else:
        values = sorted({round(float(np.clip(mh + k * mh_sigma, lo, hi)), 3) for k in (-2, -1, 0, 1, 2)})
        weights = -0.5 * ((np.array(values) - mh) / mh_sigma) ** 2
    weights = weights - np.logaddexp.reduce(weights)
    return values, dict(zip(values, (float(w) for w in weights)))


def _scan_metallicities(ages: np.ndarray, metallicities: list[float], bands: tuple[str, str], data: FitData,
                        fixed: _Fixed) -> dict[float, dict[int, _AgeResult]]:
    """Fits at every [M/H]: the whole age scan at the middle one, the others near its best age only.

    Why not a full scan per [M/H]: [M/H] moves the best age by a few hundredths of a dex per
    0.1 dex, so the other metallicities matter only within the fine window, where each age
    starts from the middle metallicity's solution (no global search): a fraction of the cost.
    """
    middle = metallicities[len(metallicities) // 2]
    by_mh = {middle: _scan_ages(ages, middle, bands, data, fixed)}
    centre = max(by_mh[middle], key=lambda i: by_mh[middle][i].lnl)
    # grid nodes only (no interpolation in age on top of the one in [M/H]), one beyond either end
    reach = FINE_HALF_WINDOW + AGE_SUBSTEPS - 1
    window = [i for i in range(max(centre - reach, 0), min(centre + reach + 1, len(ages)))
              if i in by_mh[middle] and i % AGE_SUBSTEPS == 0]
    for met in metallicities:
        if met != middle:
            by_mh[met] = {i: _fit_one_age(float(ages[i]), met, bands, data, fixed, [by_mh[middle][i]], search=False)
                          for i in window}
    return by_mh


def _marginal_curve(ages: np.ndarray, by_mh: dict[float, dict[int, _AgeResult]], log_prior: dict[float, float]
                    ) -> tuple[np.ndarray, float, int]:
    """Profile lnL over the age axis with [M/H] marginalised under its prior, and the best fit's
    ([M/H], age index).

    Each metallicity's lnL is interpolated linearly across the ages it skipped, within the ages
    it was fitted over; beyond them (outside the window of ``_scan_metallicities``) the sum runs
    over the metallicities that reach there: far from the best age a lower bound, all it needs.
    """
    axis = np.arange(len(ages))
    terms = []
    for met, results in by_mh.items():
        fitted = np.array(sorted(results))
        term = np.full(len(ages), -np.inf)
        reach = (axis >= fitted[0]) & (axis <= fitted[-1])
        term[reach] = np.interp(axis[reach], fitted, [results[i].lnl for i in fitted]) + log_prior[met]
        terms.append(term)
    best_mh, i_best = max(((met, i) for met, results in by_mh.items() for i in results),
                          key=lambda key: by_mh[key[0]][key[1]].lnl + log_prior[key[0]])
    return np.logaddexp.reduce(terms, axis=0), best_mh, i_best


def _intervals(log_age: float, boot: np.ndarray, profile95: tuple[float, float], systematic: float
               ) -> tuple[tuple[float, float], tuple[float, float]]:
    """The 68 % and 95 % intervals: bootstrap percentiles, the systematic floor added in quadrature.

    Each side is widened on its own: ``sqrt(stat**2 + (z systematic)**2)`` from the best age, z = 1
    for 68 % and 1.96 for 95 %.  The 95 % interval also spans the ages whose profile likelihood is
    within ``PROFILE_DELTA_LNL`` of the best (``profile95``), which holds when the resamples are
    few or the profile is a plateau the resamples do not roam.
    """
    def widen(lo: float, hi: float, z: float) -> tuple[float, float]:
        below, above = max(log_age - lo, 0.0), max(hi - log_age, 0.0)
        return (log_age - float(np.hypot(below, z * systematic)), log_age + float(np.hypot(above, z * systematic)))

    if boot.size:
        lo68, hi68 = np.percentile(boot, PERCENTILES_68)
        lo95, hi95 = np.percentile(boot, PERCENTILES_95)
    else:
        lo68 = hi68 = log_age
        lo95, hi95 = profile95
    lo95, hi95 = min(lo95, profile95[0]), max(hi95, profile95[1])
    return widen(min(lo68, log_age), max(hi68, log_age), 1.0), widen(min(lo95, log_age), max(hi95, log_age), Z_95)


def _as_float(values) -> np.ndarray:
    """A float array with masked entries (astropy MaskedColumn, numpy masked array) as NaN."""
    return np.ma.asarray(values, dtype=float).filled(np.nan)


def _plot_isochrone(log_age: float, mh: float, bands: tuple[str, str], best: _AgeResult,
                    mag: np.ndarray, turnoff_mag: float) -> tuple[np.ndarray, np.ndarray]:
    """The fitted isochrone on the observed axes, for drawing over the diagram.

    Stages up to the early AGB (the thermal pulses are a scribble of negligible weight), and
    only the magnitudes the diagram shows (its stars' range and the turn-off, a little beyond),
    so that a plot scaled to the isochrone is scaled to the data.
    """
    iso = interpolated_isochrone(log_age, mh)
    c = best.scale * (iso.mags[bands[0]] - iso.mags[bands[1]]) + best.dcolor
    m = iso.mags[bands[1]] + best.dmag
    finite = mag[np.isfinite(mag)]
    keep = (iso.label <= 7) & (m >= min(finite.min(), turnoff_mag) - 1.0) & (m <= finite.max() + 0.5)
    return c[keep], m[keep]


def _turnoff(log_age: float, mh: float, bands: tuple[str, str], best: _AgeResult) -> tuple[float, float]:
    """Bluest main-sequence point of the isochrone (the turn-off), on the observed axes."""
    iso = interpolated_isochrone(log_age, mh)
    c = iso.mags[bands[0]] - iso.mags[bands[1]]
    ms = iso.label == LABEL_MAIN_SEQUENCE
    if not ms.any():
        ms = np.ones_like(c, bool)
    idx = np.flatnonzero(ms)[np.argmin(c[ms])]
    return float(best.scale * c[idx] + best.dcolor), float(iso.mags[bands[1]][idx] + best.dmag)


def _distinct(start: tuple[float, ...], others: list[tuple[float, ...]]) -> bool:
    """True if a start is not within a sequence width of any of the others (it would find the same optimum)."""
    return all(abs(start[0] - o[0]) > 0.05 or abs(start[1] - o[1]) > 0.2 for o in others)


def _fit_one_age(log_age: float, mh: float, bands: tuple[str, str], data: FitData, fixed: _Fixed,
                 neighbours: list[_AgeResult], search: bool = True) -> _AgeResult:
    """Best shifts at one age, started from the FFT candidates (if ``search``) and neighbouring ages' solutions.

    Each start gets its own model window: candidates can be magnitudes apart, and one
    window spanning them all would cost many times more to blur.
    """
    starts: list[tuple[float, ...]] = list(_fft_starts(log_age, mh, bands, data)) if search else []
    for r in neighbours:
        if _distinct(r.start, starts):
            starts.append(r.start)
    best: _AgeResult | None = None
    for start in starts:
        result = _fit_shifts(age_model(log_age, mh, bands, data, [start[:2]], fixed.scales), data, start, fixed)
        if best is None or result.lnl > best.lnl:
            best = result
    assert best is not None
    return best


def _propagate(ages: np.ndarray, mh: float, bands: tuple[str, str], data: FitData, fixed: _Fixed,
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


def _scan_ages(ages: np.ndarray, mh: float, bands: tuple[str, str], data: FitData,
               fixed: _Fixed) -> dict[int, _AgeResult]:
    """Fits on every other grid age, then on every grid age near the best one.

    Why coarse to fine: the likelihood varies smoothly on 0.1 dex scales away from
    the optimum; halving the ages scanned halves the cost of the fit.
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
            near = [results[k] for k in (i - 1, i + 1) if k in results]
            results[i] = _fit_one_age(float(ages[i]), mh, bands, data, fixed, near, search=not near)


def fit_age(color, mag, color_err, mag_err, usable, bands: tuple[str, str] = ("B", "V"),
            mh: float = 0.0, fit_mh: bool = False, mh_sigma: float | None = None,
            distance_modulus: float | None = None,
            ebv: float | None = None, calibrated: bool = False, bootstrap: int = 30,
            rng: np.random.Generator | int | None = None, mag_limit: float | None = None,
            bright_limit: float | None = None, x: np.ndarray | None = None,
            y: np.ndarray | None = None, color_scale: tuple[float, float] = (1.0, 1.0),
            systematic: float = AGE_FLOOR_DEX) -> AgeFit:
    """Fit a PARSEC isochrone to a colour-magnitude diagram; see the module docstring.

    color = mag(bands[0]) - mag(bands[1]), mag = mag(bands[1]), with their errors;
    ``usable`` is False for stars to ignore (saturated, blended, flagged).  With
    ``calibrated`` False the magnitudes may carry any zeropoint: the fitted shifts
    then mix distance, reddening and zeropoints, and only the age (from the
    shape) is physical.  ``distance_modulus``/``ebv`` fix those quantities
    (only used when calibrated).  ``mag_limit`` is the faint limit of the stars
    used (default: the 90th percentile, brighter if the median colour error
    exceeds 0.1 mag before); the model is renormalised to it, so it must not be
    fainter than where the catalogue is complete.  ``bright_limit`` (default:
    the brightest usable star if excluded stars brighter than it show
    saturation, else 1 mag above it) truncates the model at the bright end.
    ``fit_mh`` marginalises [M/H] (``_metallicities``): over ``MH_SCAN`` evenly, or with
    ``mh_sigma`` over a Gaussian prior of mean ``mh``; without it [M/H] is fixed at ``mh``.
    ``x``, ``y`` (pixel positions on one grid, e.g. the catalogue's reference grid)
    add a spatial membership prior: a King cluster on a uniform field is fitted to
    the positions of the usable stars (``spatial_profile``) and each star's prior
    field probability replaces the one global field fraction; the field-star density
    in the diagram is then estimated from the likely field stars.  Stars without a
    finite position get the fitted cluster fraction as their prior.  Without a
    significant concentration the positions are not used.  The result then holds
    ``spatial`` (the profile), ``membership_prior`` and ``membership`` (per input star).
    Raises ValueError with fewer than 20 usable stars.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(rng)
    bands = (str(bands[0]), str(bands[1]))
    color, mag, color_err, mag_err = (_as_float(v) for v in (color, mag, color_err, mag_err))
    usable = np.ma.asarray(usable).filled(False).astype(bool)
    data = prepare(color, mag, color_err, mag_err, usable, mag_limit, bright_limit)
    n = data.mag.size
    spatial, prior = None, np.empty(0)
    if x is not None and y is not None:
        spatial, prior = _use_positions(data, _as_float(x), _as_float(y), usable)
    notes = []
    if not calibrated and (distance_modulus is not None or ebv is not None):
        notes.append("distance modulus / E(B-V) given but zeropoints uncalibrated: ignored")
        distance_modulus = ebv = None
    # Calibrated magnitudes are on the isochrone's system: no colour scale to fit.
    scales = (1.0, 1.0) if calibrated else (float(color_scale[0]), float(color_scale[1]))
    fixed = _Fixed(A_OVER_EBV[bands[0]] - A_OVER_EBV[bands[1]], A_OVER_EBV[bands[1]], calibrated,
                   distance_modulus, ebv, scales, float(np.median(data.color)))
    nodes, _ = grid()
    ages = np.round(np.linspace(nodes[0], nodes[-1], AGE_SUBSTEPS * (len(nodes) - 1) + 1), 4)
    metallicities, log_prior = _metallicities(mh, mh_sigma, fit_mh)
    by_mh = _scan_metallicities(ages, metallicities, bands, data, fixed)
    curve, best_mh, i_best = _marginal_curve(ages, by_mh, log_prior)
    log_age = _profile(ages, curve)
    best = by_mh[best_mh][i_best]

    boot = _bootstrap(ages, by_mh, log_prior, data, bootstrap, rng)
    (low, high), (low95, high95) = _intervals(log_age, boot, _profile_interval(ages, curve, PROFILE_DELTA_LNL),
                                              systematic)

    mu, ebv_fit = fixed.physical(best.dcolor, best.dmag)
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
    turnoff = _turnoff(float(ages[i_best]), best_mh, bands, best)
    if turnoff[1] < data.box[2]:
        # Why say so: without the turn-off the age rests on the main sequence's curvature (or the
        # pre-main sequence), which a few field stars or 0.01 mag colour errors can bend; on
        # pipeline catalogues such fits were off by up to 0.25 dex with the interval just short.
        notes.append(f"the fitted turn-off ({bands[1]} = {turnoff[1]:.2f}) is brighter than the brightest star "
                     f"used ({data.box[2]:.2f}, saturation): the age comes from the sequence below the turn-off "
                     "(main-sequence curvature, pre-main-sequence turn-on) and may be less certain than the interval says")
    iso_c, iso_m = _plot_isochrone(float(ages[i_best]), best_mh, bands, best, mag, turnoff[1])
    membership = np.full(mag.size, np.nan)
    prior_field = best.f_field if data.field_prior is None else data.field_prior
    cluster = (1 - prior_field) * ((1 - best.f_binary) * best.single + best.f_binary * best.binary)
    membership[data.used] = cluster / (cluster + prior_field * data.field + 1e-300)
    seconds = time.perf_counter() - t0
    log.info("age fit: log age %.3f (%.3f..%.3f) from %d stars in %.2f s", log_age, low, high, n, seconds)
    return AgeFit(
        log_age=log_age, log_age_low=low, log_age_high=high,
        age_myr=10 ** log_age / 1e6, age_myr_low=10 ** low / 1e6, age_myr_high=10 ** high / 1e6,
        log_age_low95=low95, log_age_high95=high95,
        distance_modulus=mu, ebv=ebv_fit, mh=best_mh, n_stars=n, calibrated_zeropoints=bool(calibrated),
        isochrone_set=ISOCHRONE_SET, iso_color=iso_c, iso_mag=iso_m,
        turnoff=turnoff,
        bands=bands, note="; ".join(notes), dmag=best.dmag, dcolor=best.dcolor,
        field_fraction=best.f_field, binary_fraction=best.f_binary, mag_limit=data.box[3],
        seconds=seconds, profile_log_age=np.asarray(ages, float), profile_lnl=curve,
        membership_prior=prior, membership=membership, spatial=spatial, color_scale=best.scale,
        color_scale_range=scales, systematic_dex=systematic)


def _use_positions(data: FitData, x: np.ndarray, y: np.ndarray, usable: np.ndarray
                   ) -> tuple[SpatialProfile | None, np.ndarray]:
    """Set the per-star field priors and the field density of ``data`` from the stars' positions.

    The profile's shape is fitted to every usable star with a position (the faint ones
    too: more stars, a better measured profile), the cluster fraction then refitted to
    the stars in the diagram's box.  Returns the profile (None if not used) and every
    input star's prior membership (NaN where not computed); with fewer than 20
    positioned stars in the box or no significant concentration (``SPATIAL_MIN_GAIN``)
    the positions are not used.
    """
    if x.shape != data.used.shape or y.shape != data.used.shape:
        raise ValueError("x and y must have one entry per star")
    placed = np.isfinite(x) & np.isfinite(y)
    prior = np.full(x.size, np.nan)
    in_box = data.used & placed
    if in_box.sum() < 20:
        log.info("age fit: %d stars with positions, too few for a spatial membership prior", int(in_box.sum()))
        return None, prior
    spatial = spatial_profile(x[usable & placed], y[usable & placed])
    if spatial.gain < SPATIAL_MIN_GAIN:
        log.info("age fit: no cluster concentration in the positions (lnL gain %.1f), spatial prior not used",
                 spatial.gain)
        return None, prior
    p_box, fraction = spatial.membership(x[in_box], y[in_box])
    prior[in_box] = p_box
    p = np.where(placed[data.used], prior[data.used], fraction)
    p = np.clip(p, 1e-3, 1 - 1e-3)     # no star certain either way from its position alone
    data.field_prior = 1.0 - p
    data.field = field_density(data.color, data.mag, data.box, data.field_prior)
    return spatial, prior
