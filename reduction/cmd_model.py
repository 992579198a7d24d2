"""The model of a cluster's colour-magnitude diagram that the age fit scores stars against.

Why a module of its own: the fit (``reduction.age``) searches shifts and ages; this is
what it evaluates at each: an isochrone's single-star and unresolved-binary tracks,
IMF-weighted and rendered into blurred images of the (colour, absolute magnitude)
plane per error class, the field-star density from the diagram itself, and the
mixture likelihood of each star, normalised on the observed box.  The reasoning
behind each choice is in ``reduction.age``'s opening docstring.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter

from reduction.isochrones import interpolated_isochrone
from reduction.kernels import gaussian_blur_zero

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
#: Upper bound of the fitted binary fraction: observed cluster binary fractions are 0.2-0.5 (plus
#: unflagged blends and field stars next to the sequence, which the binary band also absorbs).
#: Why bound it: with ~0.9 the binary band can stand in for the main sequence and an isochrone
#: shifted a quarter magnitude bluer fits as well (a 2 Gyr fit to a 300 Myr pipeline catalogue).
MAX_BINARY_FRACTION = 0.6

# --------------------------------------------------------------------------- model tracks

@dataclass(frozen=True)
class Track:
    """An isochrone's points in the (colour, absolute magnitude) plane with IMF weights."""

    color: np.ndarray
    mag: np.ndarray
    weight: np.ndarray


def _resample(color: np.ndarray, mag: np.ndarray, cum_weight: np.ndarray) -> Track:
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
    return Track((color[seg] + frac * dc[seg]).astype(np.float32), (mag[seg] + frac * dm[seg]).astype(np.float32),
                  (dw[seg] / n[seg]).astype(np.float32))


def combine_magnitudes(m1: np.ndarray, m2: np.ndarray) -> np.ndarray:
    """Magnitude of two unresolved stars."""
    return -2.5 * np.log10(10 ** (-0.4 * m1) + 10 ** (-0.4 * m2))


@functools.lru_cache(maxsize=400)
def model_tracks(log_age: float, mh: float, bands: tuple[str, str]) -> tuple[Track, Track]:
    """Single-star and binary tracks for one isochrone (cached: they do not depend on the data).

    Between the grid's nodes (ages at half steps, [M/H] anywhere) the isochrone is interpolated.
    """
    iso = interpolated_isochrone(log_age, mh)
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
        c1, c2 = combine_magnitudes(b1, s1), combine_magnitudes(b2, s2)
        parts.append(_resample(c1 - c2, c2, cum))
    binary = Track(np.concatenate([p.color for p in parts]), np.concatenate([p.mag for p in parts]),
                    np.concatenate([p.weight for p in parts]) / len(BINARY_Q))
    return single, binary


@dataclass(frozen=True)
class Grid:
    """A pixel grid in the (colour, magnitude) plane; (x0, y0) is the first pixel's lower-left corner."""

    x0: float
    y0: float
    dx: float
    dy: float
    nx: int
    ny: int


def full_grid(scale: int = 1) -> Grid:
    dx, dy = PIX_COLOR * scale, PIX_MAG * scale
    return Grid(COLOR_RANGE[0], MAG_RANGE[0], dx, dy, int(round((COLOR_RANGE[1] - COLOR_RANGE[0]) / dx)),
                 int(round((MAG_RANGE[1] - MAG_RANGE[0]) / dy)))


def window_grid(c_lo: float, c_hi: float, m_lo: float, m_hi: float) -> Grid:
    """The part of the fine model grid covering a box (snapped to pixels, clipped to the full grid).

    Why: blurring and integrating only where shifted data can fall makes the
    model images several times cheaper than the full diagram.
    """
    full = full_grid()
    i0 = int(np.clip(np.floor((c_lo - full.x0) / full.dx), 0, full.nx - 2))
    i1 = int(np.clip(np.ceil((c_hi - full.x0) / full.dx), i0 + 2, full.nx))
    j0 = int(np.clip(np.floor((m_lo - full.y0) / full.dy), 0, full.ny - 2))
    j1 = int(np.clip(np.ceil((m_hi - full.y0) / full.dy), j0 + 2, full.ny))
    return Grid(full.x0 + i0 * full.dx, full.y0 + j0 * full.dy, full.dx, full.dy, i1 - i0, j1 - j0)


def render(track: Track, g: Grid) -> np.ndarray:
    """Track weights summed into the (mag row, colour column) pixels of a grid."""
    ix = np.floor((track.color - g.x0) / g.dx).astype(int)
    iy = np.floor((track.mag - g.y0) / g.dy).astype(int)
    ok = (ix >= 0) & (ix < g.nx) & (iy >= 0) & (iy < g.ny)
    img = np.bincount(iy[ok] * g.nx + ix[ok], weights=track.weight[ok], minlength=g.nx * g.ny)
    return img.reshape(g.ny, g.nx)


class ImageStack:
    """Blurred model images (one per error class) and the cumulative integral for box normalisation.

    The box integral is taken of the unblurred track: blurring moves as much
    weight into the box across an edge as out of it (to second order), and one
    cumulative table instead of one per error class halves the cost of a model.
    """

    def __init__(self, counts: np.ndarray, sigmas: list[tuple[float, float]], rows: list[tuple[int, int]],
                 g: Grid):
        # Each class's blur: intrinsic width and that class's photometric errors, computed only
        # over the band of rows where that class's stars can fall (error grows with magnitude,
        # so the bands are narrow and the blurs several times cheaper than whole images).
        counts32 = counts.astype(np.float32)
        height = max(r1 - r0 for r0, r1 in rows)
        self.density = np.zeros((len(sigmas), height, g.nx), np.float32)
        for k, ((sc, sm), (r0, r1)) in enumerate(zip(sigmas, rows)):
            pad = int(np.ceil(3.0 * sm / g.dy)) + 1
            p0, p1 = max(r0 - pad, 0), min(r1 + pad, g.ny)
            band = gaussian_blur_zero(counts32[p0:p1], (sm / g.dy, sc / g.dx), truncate=3.0)
            self.density[k, : r1 - r0] = band[r0 - p0: r1 - p0]
        self.density /= np.float32(g.dx * g.dy)
        self.row0 = np.array([r0 for r0, _ in rows])
        self.rows = np.array([r1 - r0 for r0, r1 in rows])
        self.grid = g
        self.cum = np.zeros((g.ny + 1, g.nx + 1))
        self.cum[1:, 1:] = counts.cumsum(0).cumsum(1)

    def locate(self, klass: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
        """Where each star's bilinear interpolation reads: flat index of the lower-left pixel in
        ``density``, the fractions, and whether it is inside its band.  Images built on the same
        grid and rows (a model's single and binary tracks) share it."""
        g = self.grid
        fx = (x - g.x0) / g.dx - 0.5
        fy = (y - g.y0) / g.dy - 0.5 - self.row0[klass]
        ix = np.floor(fx).astype(np.intp)
        iy = np.floor(fy).astype(np.intp)
        tx, ty = fx - ix, fy - iy
        ok = (ix >= 0) & (ix < g.nx - 1) & (iy >= 0) & (iy < self.rows[klass] - 1)
        flat = np.where(ok, (klass * self.density.shape[1] + iy) * g.nx + ix, 0)
        return flat, tx, ty, ok

    def at(self, where: tuple[np.ndarray, ...]) -> np.ndarray:
        """Bilinear interpolation of each star's class image at the places ``locate`` found; 0 outside."""
        flat, tx, ty, ok = where
        d, nx = self.density.ravel(), self.grid.nx
        val = ((1 - ty) * ((1 - tx) * d[flat] + tx * d[flat + 1])
               + ty * ((1 - tx) * d[flat + nx] + tx * d[flat + nx + 1]))
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
class FitData:
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


def prepare(color, mag, color_err, mag_err, usable, mag_limit, bright_limit) -> FitData:
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

    return FitData(c, m, klass, class_sigma, field_density(c, m, box), box, use)


def field_density(c: np.ndarray, m: np.ndarray, box: tuple[float, float, float, float],
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


# --------------------------------------------------------------------------- likelihood

@dataclass
class AgeModel:
    """Blurred single-star and binary images of one isochrone, for each error class of the data."""

    single: ImageStack
    binary: ImageStack


#: Margins (colour, mag) of the model window around the shifted data box: room for the optimiser.
WINDOW_MARGIN = (0.2, 0.6)


def age_model(log_age: float, mh: float, bands: tuple[str, str], data: FitData,
               starts: list[tuple[float, float]], scales: tuple[float, float] = (1.0, 1.0)) -> AgeModel:
    """Model images over the window where the data can fall for shifts near ``starts``.

    ``scales`` is the range of colour scales the fit may try: the data's colours map to
    ``(colour - dcolor) / scale`` on the model's axis, so the window covers both ends.
    """
    lo_c, hi_c, lo_m, hi_m = data.box
    dcs = [s[0] for s in starts]
    dms = [s[1] for s in starts]
    c_lo = min((lo_c - max(dcs)) / k for k in scales)
    c_hi = max((hi_c - min(dcs)) / k for k in scales)
    g = window_grid(c_lo - WINDOW_MARGIN[0], c_hi + WINDOW_MARGIN[0],
                    lo_m - max(dms) - WINDOW_MARGIN[1], hi_m - min(dms) + WINDOW_MARGIN[1])
    rows = []
    for k in range(len(data.class_sigma)):
        mags = data.mag[data.klass == k]
        r0 = int(np.floor((mags.min() - max(dms) - WINDOW_MARGIN[1] - g.y0) / g.dy))
        r1 = int(np.ceil((mags.max() - min(dms) + WINDOW_MARGIN[1] - g.y0) / g.dy)) + 1
        r0 = min(max(r0, 0), g.ny - 2)
        rows.append((r0, max(min(r1, g.ny), r0 + 2)))
    single_t, binary_t = model_tracks(log_age, mh, bands)
    return AgeModel(ImageStack(render(single_t, g), data.class_sigma, rows, g),
                     ImageStack(render(binary_t, g), data.class_sigma, rows, g))


def component_densities(model: AgeModel, data: FitData, dcolor: float, dmag: float, scale: float = 1.0
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Single and binary densities at each star for the given shifts, normalised on the observed box.

    ``scale`` is the colour scale k of ``colour = k (model colour) + dcolor``: a filter system
    that is not exactly the isochrone's stretches the diagram's colours.  The densities are per
    unit of observed colour, hence the 1/k.
    """
    where = model.single.locate(data.klass, (data.color - dcolor) / scale, data.mag - dmag)
    lo_c, hi_c, lo_m, hi_m = data.box
    out = []
    for img in (model.single, model.binary):
        z = img.integral((lo_c - dcolor) / scale, (hi_c - dcolor) / scale, lo_m - dmag, hi_m - dmag)
        out.append(img.at(where) / max(z * scale, 1e-300))
    return out[0], out[1]


def mixture_lnl(s: np.ndarray, b: np.ndarray, f: np.ndarray, weights: np.ndarray,
                field_prior: np.ndarray | None = None, iterations: int = 15,
                start: tuple[float, float] = (0.2, 0.3)) -> tuple[float, float, float]:
    """Maximise over the field and binary fractions by EM; returns (lnL, f_field, f_binary).

    Why EM inside the shift optimiser: the fractions enter linearly, so a few EM
    steps find them far more cheaply than adding two dimensions to Nelder-Mead.
    With ``field_prior`` (per star, from the positions) each star's field weight is
    fixed to it and only the binary fraction is fitted; f_field is then the mean
    posterior field probability.
    """
    ff, fb = start
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


#: EM steps per likelihood inside the shift optimiser, started from the previous evaluation's
#: fractions: neighbouring simplex points have nearly the same fractions, so a few steps converge
#: (the optimum's own likelihood is then recomputed from scratch with the full count).
WARM_ITERATIONS = 6


def neg_lnl(shift: np.ndarray, model: AgeModel, data: FitData, weights: np.ndarray,
            warm: list[tuple[float, float]] | None = None) -> float:
    """Minus the log-likelihood at the given shifts (dcolor, dmag[, colour scale]), the fractions maximised.

    ``warm`` (a one-element list) holds the fractions of the previous call: EM starts there and
    stores its result back, so an optimiser's run of calls costs fewer EM steps.
    """
    s, b = component_densities(model, data, *shift)
    if warm is None:
        return -mixture_lnl(s, b, data.field, weights, data.field_prior)[0]
    lnl, ff, fb = mixture_lnl(s, b, data.field, weights, data.field_prior, WARM_ITERATIONS, warm[0])
    warm[0] = (ff if data.field_prior is None else warm[0][0], fb)
    return -lnl
