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
* Shifts: ``mag = M + dmag``, ``colour = colour_0 + dcolor``.  Calibrated data:
  ``dmag = mu + A_band2 E(B-V)``, ``dcolor = (A_band1 - A_band2) E(B-V)``.
  Uncalibrated data: both shifts are free and absorb the zeropoints.
* Per age, a global FFT search scores every shift with an approximate,
  box-normalised likelihood; Nelder-Mead refines its best few candidates, and
  an age fitting much worse than a neighbour is refitted from the neighbour's
  shifts.  The age is the maximum of the profile likelihood, interpolated
  by a parabola between grid ages.  The interval is the union of a bootstrap over
  stars (16-84 %), the ages whose profile likelihood is within 3 of the best
  (about 95 % plus the grid's bumpiness) and a systematic floor of one grid step (0.05 dex).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize
from scipy import fft as sp_fft
from scipy.ndimage import gaussian_filter, maximum_filter

from reduction.isochrones import A_OVER_EBV, LABEL_MAIN_SEQUENCE, get_isochrone, grid

log = logging.getLogger(__name__)

ISOCHRONE_SET = "PARSEC v1.2S (uwastro465isos)"

#: Intrinsic width of the sequence (mag): differential reddening, model and calibration scatter.
INTRINSIC_WIDTH = 0.025
#: Pixel size of the model images (colour, magnitude); well below INTRINSIC_WIDTH.
PIX_COLOR = 0.01
PIX_MAG = 0.02
#: Absolute-plane extent of the model images (colour, magnitude).
COLOR_RANGE = (-0.8, 3.2)
MAG_RANGE = (-9.0, 18.0)
#: Secondary-to-primary mass ratios of the binary track (midpoints of 10 equal bins in 0..1).
BINARY_Q = (np.arange(10) + 0.5) / 10.0
#: Error classes: stars grouped by total colour blur in steps of this factor, at most
#: MAX_ERROR_CLASSES groups (each costs one blurred image per track and age).
ERROR_CLASS_RATIO = 1.5
MAX_ERROR_CLASSES = 5
#: Broad smoothing (colour, mag) of the field-star density estimated from the diagram itself.
FIELD_SMOOTH = (0.15, 0.6)
#: Median colour error (mag) beyond which faint stars are not used by default.
MAX_COLOR_ERR = 0.1
#: Systematic floor of the reported interval (dex): the isochrone grid step; ages between grid
#: points come from interpolating the likelihood, not from interpolated isochrones.
AGE_FLOOR_DEX = 0.05
#: Profile-likelihood drop defining the interval: 2 (about 95 % for one parameter) plus 1 for the
#: bumpiness of the profile between neighbouring grid isochrones (pre-main-sequence, hook, a few
#: field stars just above the turn-off that one isochrone explains and its neighbour does not:
#: 2-3 units on pipeline catalogues of a 300 Myr cluster, enough to move the maximum by 0.25 dex).
PROFILE_DELTA_LNL = 3.0
#: Percentiles of the bootstrap ages that bound the interval.
BOOTSTRAP_PERCENTILES = (16.0, 84.0)
#: Half-width (grid steps) of the window around the best age where every grid age is fitted.
FINE_HALF_WINDOW = 4
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
#: Upper bound of the fitted binary fraction: observed cluster binary fractions are 0.2-0.5 (plus
#: unflagged blends and field stars next to the sequence, which the binary band also absorbs).
#: Why bound it: with ~0.9 the binary band can stand in for the main sequence and an isochrone
#: shifted a quarter magnitude bluer fits as well (a 2 Gyr fit to a 300 Myr pipeline catalogue).
MAX_BINARY_FRACTION = 0.6
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
class AgeFit:
    """Result of an isochrone fit; ``to_json`` is the content of ``age.json``."""

    log_age: float
    log_age_low: float
    log_age_high: float
    age_myr: float
    age_myr_low: float
    age_myr_high: float
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

    def to_json(self) -> dict:
        """Plain JSON-serialisable record (age.json)."""
        return {
            "log_age": round(float(self.log_age), 4),
            "log_age_low": round(float(self.log_age_low), 4),
            "log_age_high": round(float(self.log_age_high), 4),
            "age_myr": round(float(self.age_myr), 2),
            "age_myr_low": round(float(self.age_myr_low), 2),
            "age_myr_high": round(float(self.age_myr_high), 2),
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


# --------------------------------------------------------------------------- model tracks

@dataclass(frozen=True)
class _Track:
    """An isochrone's points in the (colour, absolute magnitude) plane with IMF weights."""

    color: np.ndarray
    mag: np.ndarray
    weight: np.ndarray


def _resample(color: np.ndarray, mag: np.ndarray, cum_weight: np.ndarray) -> _Track:
    """Points every half pixel along a polyline; each segment's IMF weight spread evenly.

    Why: the PARSEC track is sampled in mass, so points crowd on the lower main
    sequence and jump across the fast phases (subgiant branch, hook); rendering
    the jumps as dots would leave gaps that a star could fall into.
    """
    dw = np.clip(np.diff(cum_weight), 0.0, None)
    dc, dm = np.diff(color), np.diff(mag)
    # Segments that would hold 1e-8 of the stars (thermal pulses, jumps between stages) are
    # invisible in any catalogue; dropping them keeps the cached tracks small.
    keep = dw > 1e-8 * dw.sum()
    color, mag, dw, dc, dm = color[:-1][keep], mag[:-1][keep], dw[keep], dc[keep], dm[keep]
    length = np.hypot(dc / PIX_COLOR, dm / PIX_MAG)
    n = np.clip(np.ceil(length / 0.5).astype(int), 1, 4000)
    seg = np.repeat(np.arange(len(dw)), n)
    start = np.cumsum(n) - n
    frac = (np.arange(seg.size) - start[seg] + 0.5) / n[seg]
    return _Track((color[seg] + frac * dc[seg]).astype(np.float32), (mag[seg] + frac * dm[seg]).astype(np.float32),
                  (dw[seg] / n[seg]).astype(np.float32))


def _combine(m1: np.ndarray, m2: np.ndarray) -> np.ndarray:
    """Magnitude of two unresolved stars."""
    return -2.5 * np.log10(10 ** (-0.4 * m1) + 10 ** (-0.4 * m2))


@functools.lru_cache(maxsize=80)
def _tracks(log_age: float, mh: float, bands: tuple[str, str]) -> tuple[_Track, _Track]:
    """Single-star and binary tracks for one isochrone (cached: they do not depend on the data)."""
    iso = get_isochrone(log_age, mh)
    keep = iso.label < 9                      # post-AGB: negligible IMF weight, wild colours
    mini, cum = iso.mini[keep], iso.int_imf[keep]
    b1, b2 = iso.mags[bands[0]][keep], iso.mags[bands[1]][keep]
    single = _resample(b1 - b2, b2, cum)
    # Secondary magnitudes by interpolation in initial mass along the same isochrone.
    inc = np.concatenate([[True], np.diff(mini) > 0])
    parts = []
    for q in BINARY_Q:
        m2 = q * mini
        faint = m2 < mini[0]                  # below the track's lowest mass: adds no light
        s1 = np.where(faint, 99.0, np.interp(m2, mini[inc], b1[inc]))
        s2 = np.where(faint, 99.0, np.interp(m2, mini[inc], b2[inc]))
        c1, c2 = _combine(b1, s1), _combine(b2, s2)
        parts.append(_resample(c1 - c2, c2, cum))
    binary = _Track(np.concatenate([p.color for p in parts]), np.concatenate([p.mag for p in parts]),
                    np.concatenate([p.weight for p in parts]) / len(BINARY_Q))
    return single, binary


@dataclass(frozen=True)
class _Grid:
    """A pixel grid in the (colour, magnitude) plane; (x0, y0) is the first pixel's lower-left corner."""

    x0: float
    y0: float
    dx: float
    dy: float
    nx: int
    ny: int


def _full_grid(scale: int = 1) -> _Grid:
    dx, dy = PIX_COLOR * scale, PIX_MAG * scale
    return _Grid(COLOR_RANGE[0], MAG_RANGE[0], dx, dy, int(round((COLOR_RANGE[1] - COLOR_RANGE[0]) / dx)),
                 int(round((MAG_RANGE[1] - MAG_RANGE[0]) / dy)))


def _window(c_lo: float, c_hi: float, m_lo: float, m_hi: float) -> _Grid:
    """The part of the fine model grid covering a box (snapped to pixels, clipped to the full grid).

    Why: blurring and integrating only where shifted data can fall makes the
    model images several times cheaper than the full diagram.
    """
    full = _full_grid()
    i0 = int(np.clip(np.floor((c_lo - full.x0) / full.dx), 0, full.nx - 2))
    i1 = int(np.clip(np.ceil((c_hi - full.x0) / full.dx), i0 + 2, full.nx))
    j0 = int(np.clip(np.floor((m_lo - full.y0) / full.dy), 0, full.ny - 2))
    j1 = int(np.clip(np.ceil((m_hi - full.y0) / full.dy), j0 + 2, full.ny))
    return _Grid(full.x0 + i0 * full.dx, full.y0 + j0 * full.dy, full.dx, full.dy, i1 - i0, j1 - j0)


def _render(track: _Track, g: _Grid) -> np.ndarray:
    """Track weights summed into the (mag row, colour column) pixels of a grid."""
    ix = np.floor((track.color - g.x0) / g.dx).astype(int)
    iy = np.floor((track.mag - g.y0) / g.dy).astype(int)
    ok = (ix >= 0) & (ix < g.nx) & (iy >= 0) & (iy < g.ny)
    img = np.bincount(iy[ok] * g.nx + ix[ok], weights=track.weight[ok], minlength=g.nx * g.ny)
    return img.reshape(g.ny, g.nx)


class _ImageStack:
    """Blurred model images (one per error class) and the cumulative integral for box normalisation.

    The box integral is taken of the unblurred track: blurring moves as much
    weight into the box across an edge as out of it (to second order), and one
    cumulative table instead of one per error class halves the cost of a model.
    """

    def __init__(self, counts: np.ndarray, sigmas: list[tuple[float, float]], rows: list[tuple[int, int]],
                 g: _Grid):
        # Each class's blur: intrinsic width and that class's photometric errors, computed only
        # over the band of rows where that class's stars can fall (error grows with magnitude,
        # so the bands are narrow and the blurs several times cheaper than whole images).
        counts32 = counts.astype(np.float32)
        height = max(r1 - r0 for r0, r1 in rows)
        self.density = np.zeros((len(sigmas), height, g.nx), np.float32)
        for k, ((sc, sm), (r0, r1)) in enumerate(zip(sigmas, rows)):
            pad = int(np.ceil(3.0 * sm / g.dy)) + 1
            p0, p1 = max(r0 - pad, 0), min(r1 + pad, g.ny)
            band = gaussian_filter(counts32[p0:p1], (sm / g.dy, sc / g.dx), mode="constant", truncate=3.0)
            self.density[k, : r1 - r0] = band[r0 - p0: r1 - p0]
        self.density /= np.float32(g.dx * g.dy)
        self.row0 = np.array([r0 for r0, _ in rows])
        self.rows = np.array([r1 - r0 for r0, r1 in rows])
        self.grid = g
        self.cum = np.zeros((g.ny + 1, g.nx + 1))
        self.cum[1:, 1:] = counts.cumsum(0).cumsum(1)

    def at(self, klass: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Bilinear interpolation of each star's class image at (x, y); 0 outside its band."""
        g = self.grid
        fx = (x - g.x0) / g.dx - 0.5
        fy = (y - g.y0) / g.dy - 0.5 - self.row0[klass]
        ix = np.floor(fx).astype(int)
        iy = np.floor(fy).astype(int)
        tx, ty = fx - ix, fy - iy
        ok = (ix >= 0) & (ix < g.nx - 1) & (iy >= 0) & (iy < self.rows[klass] - 1)
        ix, iy = np.where(ok, ix, 0), np.where(ok, iy, 0)
        d = self.density
        val = ((1 - ty) * ((1 - tx) * d[klass, iy, ix] + tx * d[klass, iy, ix + 1])
               + ty * ((1 - tx) * d[klass, iy + 1, ix] + tx * d[klass, iy + 1, ix + 1]))
        return np.where(ok, val, 0.0)

    def integral(self, x_lo: float, x_hi: float, y_lo: float, y_hi: float) -> float:
        """Model weight inside a box (cumulative table interpolated at its corners)."""
        g = self.grid
        fx = np.clip((np.array([x_lo, x_hi, x_lo, x_hi]) - g.x0) / g.dx, 0, g.nx)
        fy = np.clip((np.array([y_lo, y_lo, y_hi, y_hi]) - g.y0) / g.dy, 0, g.ny)
        ix = np.minimum(fx.astype(int), g.nx - 1)
        iy = np.minimum(fy.astype(int), g.ny - 1)
        tx, ty = fx - ix, fy - iy
        c = self.cum
        v = ((1 - ty) * ((1 - tx) * c[iy, ix] + tx * c[iy, ix + 1])
             + ty * ((1 - tx) * c[iy + 1, ix] + tx * c[iy + 1, ix + 1]))
        return float(v[3] - v[2] - v[1] + v[0])


# --------------------------------------------------------------------------- data

@dataclass
class _Data:
    """The stars used in the fit and the observed box."""

    color: np.ndarray
    mag: np.ndarray
    klass: np.ndarray                        # error class per star
    class_sigma: list[tuple[float, float]]   # total blur (colour, mag) per class
    field: np.ndarray                        # field-star density at each star (normalised on the box)
    box: tuple[float, float, float, float]   # colour lo, hi, mag bright, faint
    used: np.ndarray                         # which input stars these are (bool mask)
    #: Per-star prior probability of being a field star (from the positions); None: one global fraction.
    field_prior: np.ndarray | None = None
    #: Spectra of the data histogram and of the box for the global shift search (the same at every age).
    fft_cache: dict = field(default_factory=dict)


def _default_mag_limit(mag: np.ndarray, color_err: np.ndarray) -> float:
    """Faint limit of the stars used: the 90th percentile of the magnitudes, brighter if need be
    so that the median colour error stays below MAX_COLOR_ERR.

    Why: the faint end of a stacked catalogue is incomplete (and in a colour-dependent
    way, since a red star drops out of the blue stack first); the model is
    renormalised to the magnitudes used, so cutting where the catalogue is still
    nearly complete and precise removes that bias at little cost in information.
    """
    limit = float(np.percentile(mag, 90))
    order = np.argsort(mag)
    m, e = mag[order], color_err[order]
    n = min(max(len(m) // 20, 10), len(m))
    running = np.median(np.lib.stride_tricks.sliding_window_view(e, n), axis=1)
    too_noisy = np.flatnonzero(running > MAX_COLOR_ERR)
    if too_noisy.size:
        limit = min(limit, float(m[too_noisy[0] + n // 2]))
    return limit


def _prepare(color, mag, color_err, mag_err, usable, mag_limit, bright_limit) -> _Data:
    color, mag = np.asarray(color, float), np.asarray(mag, float)
    color_err, mag_err = np.asarray(color_err, float), np.asarray(mag_err, float)
    finite = np.isfinite(color) & np.isfinite(mag)
    use = finite & np.asarray(usable, bool)
    use &= np.isfinite(color_err) & np.isfinite(mag_err)
    if use.sum() < 20:
        raise ValueError(f"isochrone fit needs at least 20 usable stars, got {int(use.sum())}")
    if mag_limit is None:
        mag_limit = _default_mag_limit(mag[use], color_err[use])
    if bright_limit is None:
        # Excluded (e.g. saturated) stars brighter than most usable ones mean the bright end is
        # cut by saturation: truncate the model there.  Otherwise the absence of brighter stars
        # is information (the main sequence ends) and the box extends well above.
        excluded = finite & ~np.asarray(usable, bool)
        saturated = excluded & (mag < np.percentile(mag[use], 5))
        brightest = float(mag[use].min())
        bright_limit = brightest - 0.05 if saturated.any() else brightest - 1.0
    use &= (mag <= mag_limit) & (mag >= bright_limit)
    if use.sum() < 20:
        raise ValueError(f"isochrone fit needs at least 20 usable stars between magnitudes {bright_limit:.2f} "
                         f"and {mag_limit:.2f}, got {int(use.sum())}")
    c, m = color[use], mag[use]
    ce, me = np.abs(color_err[use]), np.abs(mag_err[use])
    box = (float(c.min()) - 0.1, float(c.max()) + 0.1, float(bright_limit), float(mag_limit))

    # Error classes: total colour blur in steps of ERROR_CLASS_RATIO, so that no star is
    # modelled with a blur far from its own (a too-narrow model for the faintest, noisiest
    # stars drags the fit towards isochrones whose lower sequence is broader or redder).
    sig_c = np.hypot(ce, INTRINSIC_WIDTH)
    steps = np.floor(np.log(sig_c / sig_c.min()) / np.log(ERROR_CLASS_RATIO)).astype(int)
    present, klass = np.unique(np.minimum(steps, MAX_ERROR_CLASSES - 1), return_inverse=True)
    class_sigma = []
    for k in range(len(present)):
        sel = klass == k
        # RMS, not median: the blur must cover the class's larger errors too.
        class_sigma.append((float(np.sqrt(np.mean(ce[sel] ** 2) + INTRINSIC_WIDTH ** 2)),
                            float(np.sqrt(np.mean(me[sel] ** 2) + INTRINSIC_WIDTH ** 2))))

    return _Data(c, m, klass, class_sigma, _field_density(c, m, box), box, use)


def _field_density(c: np.ndarray, m: np.ndarray, box: tuple[float, float, float, float],
                   weights: np.ndarray | None = None) -> np.ndarray:
    """Field-star density at each star: the diagram itself, broadly smoothed, plus a uniform floor.

    ``weights`` (each star's field probability from its position) make it the diagram of
    the likely field stars: a field population with its own sequence (an old field's
    turn-off plume) is then modelled as field where it lies, instead of being smeared
    with the cluster's sequence into a broad density that a wrong isochrone beats.
    """
    nx = max(int((box[1] - box[0]) / 0.02), 1)
    ny = max(int((box[3] - box[2]) / 0.05), 1)
    hist, xe, ye = np.histogram2d(m, c, bins=(ny, nx), range=((box[2], box[3]), (box[0], box[1])),
                                  weights=weights)
    smooth = gaussian_filter(hist, (FIELD_SMOOTH[1] / 0.05, FIELD_SMOOTH[0] / 0.02), mode="nearest")
    smooth = smooth / smooth.sum() + 0.2 / smooth.size
    area = (box[1] - box[0]) * (box[3] - box[2])
    dens = smooth / smooth.sum() * smooth.size / area
    iy = np.clip(np.searchsorted(ye, m) - 1, 0, ny - 1)
    ix = np.clip(np.searchsorted(xe, c) - 1, 0, nx - 1)
    return dens[iy, ix]


# --------------------------------------------------------------------------- spatial membership prior

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
    edge = 1.0 / np.sqrt(1.0 + (tidal / core) ** 2)
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
        core = float(np.exp(lo_a + (hi_a - lo_a) / (1.0 + np.exp(-p[2]))))
        return float(p[0]), float(p[1]), core, core * (1.0 + float(np.exp(p[3]))), float(1 / (1 + np.exp(-p[4])))

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


# --------------------------------------------------------------------------- likelihood

@dataclass
class _AgeModel:
    """Blurred single-star and binary images of one isochrone, for each error class of the data."""

    single: _ImageStack
    binary: _ImageStack


#: Margins (colour, mag) of the model window around the shifted data box: room for the optimiser.
WINDOW_MARGIN = (0.2, 0.6)


def _age_model(log_age: float, mh: float, bands: tuple[str, str], data: _Data,
               starts: list[tuple[float, float]]) -> _AgeModel:
    """Model images over the window where the data can fall for shifts near ``starts``."""
    lo_c, hi_c, lo_m, hi_m = data.box
    dcs = [s[0] for s in starts]
    dms = [s[1] for s in starts]
    g = _window(lo_c - max(dcs) - WINDOW_MARGIN[0], hi_c - min(dcs) + WINDOW_MARGIN[0],
                lo_m - max(dms) - WINDOW_MARGIN[1], hi_m - min(dms) + WINDOW_MARGIN[1])
    rows = []
    for k in range(len(data.class_sigma)):
        mags = data.mag[data.klass == k]
        r0 = int(np.floor((mags.min() - max(dms) - WINDOW_MARGIN[1] - g.y0) / g.dy))
        r1 = int(np.ceil((mags.max() - min(dms) + WINDOW_MARGIN[1] - g.y0) / g.dy)) + 1
        r0 = min(max(r0, 0), g.ny - 2)
        rows.append((r0, max(min(r1, g.ny), r0 + 2)))
    single_t, binary_t = _tracks(log_age, mh, bands)
    return _AgeModel(_ImageStack(_render(single_t, g), data.class_sigma, rows, g),
                     _ImageStack(_render(binary_t, g), data.class_sigma, rows, g))


def _component_densities(model: _AgeModel, data: _Data, dcolor: float, dmag: float
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Single and binary densities at each star for the given shifts, normalised on the observed box."""
    x, y = data.color - dcolor, data.mag - dmag
    lo_c, hi_c, lo_m, hi_m = data.box
    out = []
    for img in (model.single, model.binary):
        z = img.integral(lo_c - dcolor, hi_c - dcolor, lo_m - dmag, hi_m - dmag)
        out.append(img.at(data.klass, x, y) / max(z, 1e-300))
    return out[0], out[1]


def _mixture_lnl(s: np.ndarray, b: np.ndarray, f: np.ndarray, weights: np.ndarray,
                 field_prior: np.ndarray | None = None, iterations: int = 15) -> tuple[float, float, float]:
    """Maximise over the field and binary fractions by EM; returns (lnL, f_field, f_binary).

    Why EM inside the shift optimiser: the fractions enter linearly, so a few EM
    steps find them far more cheaply than adding two dimensions to Nelder-Mead.
    With ``field_prior`` (per star, from the positions) each star's field weight is
    fixed to it and only the binary fraction is fitted; f_field is then the mean
    posterior field probability.
    """
    ff, fb = 0.2, 0.3
    if field_prior is not None:
        ff = field_prior
    wsum = weights.sum()
    for _ in range(iterations):
        ps = (1 - ff) * (1 - fb) * s
        pb = (1 - ff) * fb * b
        pf = ff * f
        wt = weights / (ps + pb + pf + 1e-300)
        rs, rb, rf = wt @ ps, wt @ pb, wt @ pf
        if field_prior is None:
            ff = min(max(rf / wsum, 1e-4), 0.95)
        fb = min(max(rb / max(rs + rb, 1e-300), 0.0), MAX_BINARY_FRACTION)
    tot = (1 - ff) * ((1 - fb) * s + fb * b) + ff * f
    if field_prior is not None:
        return float(weights @ np.log(tot + 1e-300)), float(weights @ (ff * f / (tot + 1e-300)) / wsum), fb
    return float(weights @ np.log(tot + 1e-300)), ff, fb


def _neg_lnl(shift: np.ndarray, model: _AgeModel, data: _Data, weights: np.ndarray) -> float:
    """Minus the log-likelihood at the given shifts, the fractions maximised."""
    s, b = _component_densities(model, data, shift[0], shift[1])
    return -_mixture_lnl(s, b, data.field, weights, data.field_prior)[0]


def _fft_starts(log_age: float, mh: float, bands: tuple[str, str], data: _Data) -> list[tuple[float, float]]:
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
    g = _full_grid(scale=2)
    single_t, binary_t = _tracks(log_age, mh, bands)
    sc, sm = data.class_sigma[0]
    mix = gaussian_filter(0.7 * _render(single_t, g) + 0.3 * _render(binary_t, g),
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


def _fit_shifts(model: _AgeModel, data: _Data, starts: list[tuple[float, float]], fixed: "_Fixed") -> _AgeResult:
    """Best shifts for one age: Nelder-Mead from each start, keep the best."""
    weights = np.ones(data.mag.size)
    best: _AgeResult | None = None
    for start in starts:
        p0 = fixed.to_params(*start)
        if p0.size == 0:
            dc, dm = fixed.to_shifts(p0)
            nll = _neg_lnl(np.array([dc, dm]), model, data, weights)
        else:
            res = optimize.minimize(
                lambda p: _neg_lnl(np.array(fixed.to_shifts(p)), model, data, weights), p0,
                method="Nelder-Mead",
                options={"xatol": 2e-3, "fatol": 0.02, "initial_simplex": fixed.simplex(p0)})
            p0, nll = res.x, float(res.fun)
            dc, dm = fixed.to_shifts(p0)
        if best is None or -nll > best.lnl:
            s, b = _component_densities(model, data, dc, dm)
            lnl, ff, fb = _mixture_lnl(s, b, data.field, weights, data.field_prior)
            best = _AgeResult(lnl, dc, dm, ff, fb, s, b)
    assert best is not None
    return best


@dataclass
class _Fixed:
    """Which physical quantities are fixed, and the map between free parameters and shifts."""

    k_color: float              # colour excess per E(B-V)
    k_mag: float                # extinction in the magnitude band per E(B-V)
    calibrated: bool
    mu: float | None
    ebv: float | None

    def to_shifts(self, p: np.ndarray) -> tuple[float, float]:
        """(dcolor, dmag) from the free parameters."""
        if not self.calibrated:
            return float(p[0]), float(p[1])
        it = iter(p)
        # |E(B-V)|: reddening cannot be negative; the reflection keeps Nelder-Mead unconstrained.
        ebv = self.ebv if self.ebv is not None else abs(float(next(it)))
        mu = self.mu if self.mu is not None else float(next(it))
        return self.k_color * ebv, mu + self.k_mag * ebv

    def to_params(self, dcolor: float, dmag: float) -> np.ndarray:
        """Free parameters closest to the given shifts (the optimiser's start)."""
        if not self.calibrated:
            return np.array([dcolor, dmag])
        ebv = self.ebv if self.ebv is not None else dcolor / self.k_color
        out = []
        if self.ebv is None:
            out.append(max(ebv, 0.0))
        if self.mu is None:
            out.append(dmag - self.k_mag * ebv)
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


def _as_float(values) -> np.ndarray:
    """A float array with masked entries (astropy MaskedColumn, numpy masked array) as NaN."""
    return np.ma.asarray(values, dtype=float).filled(np.nan)


def _plot_isochrone(log_age: float, mh: float, bands: tuple[str, str], dcolor: float, dmag: float,
                    mag: np.ndarray, turnoff_mag: float) -> tuple[np.ndarray, np.ndarray]:
    """The fitted isochrone on the observed axes, for drawing over the diagram.

    Stages up to the early AGB (the thermal pulses are a scribble of negligible weight), and
    only the magnitudes the diagram shows (its stars' range and the turn-off, a little beyond),
    so that a plot scaled to the isochrone is scaled to the data.
    """
    iso = get_isochrone(log_age, mh)
    c = iso.mags[bands[0]] - iso.mags[bands[1]] + dcolor
    m = iso.mags[bands[1]] + dmag
    finite = mag[np.isfinite(mag)]
    keep = (iso.label <= 7) & (m >= min(finite.min(), turnoff_mag) - 1.0) & (m <= finite.max() + 0.5)
    return c[keep], m[keep]


def _turnoff(log_age: float, mh: float, bands: tuple[str, str], dcolor: float, dmag: float
             ) -> tuple[float, float]:
    """Bluest main-sequence point of the isochrone (the turn-off), on the observed axes."""
    iso = get_isochrone(log_age, mh)
    c = iso.mags[bands[0]] - iso.mags[bands[1]]
    ms = iso.label == LABEL_MAIN_SEQUENCE
    if not ms.any():
        ms = np.ones_like(c, bool)
    idx = np.flatnonzero(ms)[np.argmin(c[ms])]
    return float(c[idx] + dcolor), float(iso.mags[bands[1]][idx] + dmag)


def _distinct(start: tuple[float, float], others: list[tuple[float, float]]) -> bool:
    """True if a start is not within a sequence width of any of the others (it would find the same optimum)."""
    return all(abs(start[0] - o[0]) > 0.05 or abs(start[1] - o[1]) > 0.2 for o in others)


def _fit_one_age(log_age: float, mh: float, bands: tuple[str, str], data: _Data, fixed: _Fixed,
                 neighbours: list[_AgeResult], search: bool = True) -> _AgeResult:
    """Best shifts at one age, started from the FFT candidates (if ``search``) and neighbouring ages' solutions.

    Each start gets its own model window: candidates can be magnitudes apart, and one
    window spanning them all would cost many times more to blur.
    """
    starts: list[tuple[float, float]] = _fft_starts(log_age, mh, bands, data) if search else []
    for r in neighbours:
        if _distinct((r.dcolor, r.dmag), starts):
            starts.append((r.dcolor, r.dmag))
    best: _AgeResult | None = None
    for start in starts:
        result = _fit_shifts(_age_model(log_age, mh, bands, data, [start]), data, [start], fixed)
        if best is None or result.lnl > best.lnl:
            best = result
    assert best is not None
    return best


def _propagate(ages: np.ndarray, mh: float, bands: tuple[str, str], data: _Data, fixed: _Fixed,
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
            if good.lnl < poor.lnl + PROPAGATE_DLNL or not _distinct((good.dcolor, good.dmag),
                                                                    [(poor.dcolor, poor.dmag)]):
                continue
            refit = _fit_one_age(float(ages[b]), mh, bands, data, fixed, [good], search=False)
            if refit.lnl > poor.lnl + 1e-6:
                results[b] = refit
                changed = True
        if not changed:
            return


def _scan_ages(ages: np.ndarray, mh: float, bands: tuple[str, str], data: _Data,
               fixed: _Fixed) -> dict[int, _AgeResult]:
    """Fits on every other grid age, then on every grid age near the best one.

    Why coarse to fine: the likelihood varies smoothly on 0.1 dex scales away from
    the optimum; halving the ages scanned halves the cost of the fit.
    """
    results: dict[int, _AgeResult] = {}
    for i in range(0, len(ages), 2):
        prev = [results[i - 2]] if i >= 2 else []
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


def _filled_curve(ages: np.ndarray, results: dict[int, _AgeResult]) -> np.ndarray:
    """Profile lnL on the whole grid, linearly interpolated across ages not fitted."""
    idx = np.array(sorted(results))
    return np.interp(np.arange(len(ages)), idx, [results[i].lnl for i in idx])


def fit_age(color, mag, color_err, mag_err, usable, bands: tuple[str, str] = ("B", "V"),
            mh: float = 0.0, fit_mh: bool = False, distance_modulus: float | None = None,
            ebv: float | None = None, calibrated: bool = False, bootstrap: int = 30,
            rng: np.random.Generator | int | None = None, mag_limit: float | None = None,
            bright_limit: float | None = None, x: np.ndarray | None = None,
            y: np.ndarray | None = None) -> AgeFit:
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
    ``fit_mh`` scans the five [M/H] of the grid (five times the cost).
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
    data = _prepare(color, mag, color_err, mag_err, usable, mag_limit, bright_limit)
    n = data.mag.size
    spatial, prior = None, np.empty(0)
    if x is not None and y is not None:
        spatial, prior = _use_positions(data, _as_float(x), _as_float(y), usable)
    notes = []
    if not calibrated and (distance_modulus is not None or ebv is not None):
        notes.append("distance modulus / E(B-V) given but zeropoints uncalibrated: ignored")
        distance_modulus = ebv = None
    fixed = _Fixed(A_OVER_EBV[bands[0]] - A_OVER_EBV[bands[1]], A_OVER_EBV[bands[1]], calibrated,
                   distance_modulus, ebv)
    ages, mhs = grid()
    mh_values = [float(v) for v in mhs] if fit_mh else [float(mhs[np.argmin(np.abs(mhs - mh))])]

    best_mh, best_curve, best_results = None, None, None
    for met in mh_values:
        results = _scan_ages(ages, met, bands, data, fixed)
        curve = _filled_curve(ages, results)
        if best_curve is None or curve.max() > best_curve.max():
            best_mh, best_curve, best_results = met, curve, results
    assert best_curve is not None and best_results is not None and best_mh is not None
    i_best = int(np.argmax(best_curve))
    log_age = _profile(ages, best_curve)
    p_lo, p_hi = _profile_interval(ages, best_curve, PROFILE_DELTA_LNL)
    best = best_results[i_best]

    # Bootstrap: resample stars (multinomial weights) and re-maximise over all the ages fitted.
    # The shifts stay at each age's full-data optimum (re-optimising them changes the maximum
    # only to second order) while the fractions are refitted; this makes a resample cost a few
    # milliseconds, so it can roam the whole grid: when the data hold little age information
    # (e.g. a saturated turn-off) the likelihood is a plateau and the interval must show it.
    boot = []
    fitted = np.array(sorted(best_results))
    for _ in range(bootstrap):
        w = rng.multinomial(n, np.full(n, 1.0 / n)).astype(float)
        lnl = [_mixture_lnl(best_results[i].single, best_results[i].binary, data.field, w, data.field_prior)[0]
               for i in fitted]
        boot.append(_profile(ages, np.interp(np.arange(len(ages)), fitted, lnl)))
    low, high = min(p_lo, log_age - AGE_FLOOR_DEX), max(p_hi, log_age + AGE_FLOOR_DEX)
    if boot:
        b16, b84 = np.percentile(boot, BOOTSTRAP_PERCENTILES)
        log.debug("bootstrap log ages: %s", np.round(np.sort(boot), 3))
        low, high = min(low, float(b16)), max(high, float(b84))

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
    turnoff = _turnoff(float(ages[i_best]), best_mh, bands, best.dcolor, best.dmag)
    if turnoff[1] < data.box[2]:
        # Why say so: without the turn-off the age rests on the main sequence's curvature (or the
        # pre-main sequence), which a few field stars or 0.01 mag colour errors can bend; on
        # pipeline catalogues such fits were off by up to 0.25 dex with the interval just short.
        notes.append(f"the fitted turn-off ({bands[1]} = {turnoff[1]:.2f}) is brighter than the brightest star "
                     f"used ({data.box[2]:.2f}, saturation): the age comes from the sequence below the turn-off "
                     "(main-sequence curvature, pre-main-sequence turn-on) and may be less certain than the interval says")
    iso_c, iso_m = _plot_isochrone(float(ages[i_best]), best_mh, bands, best.dcolor, best.dmag, mag, turnoff[1])
    membership = np.full(mag.size, np.nan)
    prior_field = best.f_field if data.field_prior is None else data.field_prior
    cluster = (1 - prior_field) * ((1 - best.f_binary) * best.single + best.f_binary * best.binary)
    membership[data.used] = cluster / (cluster + prior_field * data.field + 1e-300)
    seconds = time.perf_counter() - t0
    log.info("age fit: log age %.3f (%.3f..%.3f) from %d stars in %.2f s", log_age, low, high, n, seconds)
    return AgeFit(
        log_age=log_age, log_age_low=low, log_age_high=high,
        age_myr=10 ** log_age / 1e6, age_myr_low=10 ** low / 1e6, age_myr_high=10 ** high / 1e6,
        distance_modulus=mu, ebv=ebv_fit, mh=best_mh, n_stars=n, calibrated_zeropoints=bool(calibrated),
        isochrone_set=ISOCHRONE_SET, iso_color=iso_c, iso_mag=iso_m,
        turnoff=turnoff,
        bands=bands, note="; ".join(notes), dmag=best.dmag, dcolor=best.dcolor,
        field_fraction=best.f_field, binary_fraction=best.f_binary, mag_limit=data.box[3],
        seconds=seconds, profile_log_age=np.asarray(ages, float), profile_lnl=best_curve,
        membership_prior=prior, membership=membership, spatial=spatial)


def _use_positions(data: _Data, x: np.ndarray, y: np.ndarray, usable: np.ndarray
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
    data.field = _field_density(data.color, data.mag, data.box, data.field_prior)
    return spatial, prior


def synthetic_cmd(log_age: float, n_members: int = 1000, *, mh: float = 0.0, bands: tuple[str, str] = ("B", "V"),
                  distance_modulus: float = 10.0, ebv: float = 0.2, zeropoint: tuple[float, float] = (0.0, 0.0),
                  binary_fraction: float = 0.3, field_fraction: float = 0.0, faint_limit: float = 20.0,
                  saturation: float | None = None, rng: np.random.Generator | int | None = None) -> dict:
    """A simulated cluster diagram straight from the isochrones, with known truth.

    Why here: the tests and the peer benchmark need the same catalogue recipe.
    Members sample the IMF (inverse CDF of ``int_IMF``), a fraction are unresolved
    binaries (``q`` uniform), errors grow from 0.005 mag (bright) to 0.05 mag at
    ``faint_limit``; distance, reddening and a zeropoint offset (band2, colour) are
    applied; field stars are uniform in the members' box.  Stars brighter than
    ``saturation`` get garbage magnitudes and ``usable`` False, as a saturated star would.
    Returns arrays color, mag, color_err, mag_err, usable, member.
    """
    rng = np.random.default_rng(rng)
    iso = get_isochrone(log_age, mh)
    keep = iso.label < 9
    mini, cum = iso.mini[keep], iso.int_imf[keep]
    inc = np.concatenate([[True], np.diff(cum) > 0])
    b1, b2 = iso.mags[bands[0]][keep], iso.mags[bands[1]][keep]
    k1, k2 = A_OVER_EBV[bands[0]], A_OVER_EBV[bands[1]]
    shift1 = distance_modulus + k1 * ebv + zeropoint[0] + zeropoint[1]
    shift2 = distance_modulus + k2 * ebv + zeropoint[0]
    chunks1, chunks2 = [], []
    got = 0
    while got < n_members:
        u = rng.uniform(cum[0], cum[-1], 20 * n_members)
        m = np.interp(u, cum[inc], mini[inc])
        inc_m = np.concatenate([[True], np.diff(mini) > 0])
        p1 = np.interp(m, mini[inc_m], b1[inc_m])
        p2 = np.interp(m, mini[inc_m], b2[inc_m])
        binary = rng.random(m.size) < binary_fraction
        m2 = rng.random(m.size) * m
        ok2 = binary & (m2 >= mini[0])
        p1[ok2] = _combine(p1[ok2], np.interp(m2[ok2], mini[inc_m], b1[inc_m]))
        p2[ok2] = _combine(p2[ok2], np.interp(m2[ok2], mini[inc_m], b2[inc_m]))
        vis = p2 + shift2 < faint_limit
        chunks1.append(p1[vis] + shift1)
        chunks2.append(p2[vis] + shift2)
        got += int(vis.sum())
    mag1 = np.concatenate(chunks1)[:n_members]
    mag2 = np.concatenate(chunks2)[:n_members]
    member = np.ones(n_members, bool)
    n_field = int(round(field_fraction / max(1 - field_fraction, 1e-9) * n_members))
    if n_field:
        col = mag1 - mag2
        fc = rng.uniform(col.min(), col.max(), n_field)
        fm = rng.uniform(mag2.min(), faint_limit, n_field)
        mag1 = np.concatenate([mag1, fm + fc])
        mag2 = np.concatenate([mag2, fm])
        member = np.concatenate([member, np.zeros(n_field, bool)])

    def err(m: np.ndarray) -> np.ndarray:
        return np.hypot(0.005, 0.05 * 10 ** (0.4 * (m - faint_limit)))

    e1, e2 = err(mag1), err(mag2)
    obs1 = mag1 + rng.normal(0, 1, mag1.size) * e1
    obs2 = mag2 + rng.normal(0, 1, mag2.size) * e2
    usable = np.ones(mag2.size, bool)
    if saturation is not None:
        sat = mag2 < saturation
        usable[sat] = False
        obs2[sat] = saturation + rng.uniform(0, 0.3, sat.sum())
        obs1[sat] = obs2[sat] + rng.uniform(-0.5, 1.5, sat.sum())
    return {"color": obs1 - obs2, "mag": obs2, "color_err": np.hypot(e1, e2), "mag_err": e2,
            "usable": usable, "member": member}
