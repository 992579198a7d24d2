"""The stack's point-spread function: empirical models and PSF photometry."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse import linalg as splinalg
from scipy.spatial import cKDTree

from reduction.kernels import dilate_mask

log = logging.getLogger(__name__)

#: Relative error of the empirical PSF model, added to the noise of the residual image
#: so that imperfect subtraction of bright stars is not read as new faint sources.
PSF_MODEL_ERROR = 0.05


def nearest_distance(xy: np.ndarray) -> np.ndarray:
    """Distance to the closest other source (inf when alone)."""
    if len(xy) < 2:
        return np.full(len(xy), np.inf)
    d, _ = cKDTree(xy).query(xy, k=2)
    return d[:, 1]


#: Reach (FWHM) of a saturated star's radial model: its wing is many sigma above the sky that far out.
SATURATED_MODEL_FWHM = 10.0


#: Sub-pixel steps per pixel of the shifted PSFs a source model is painted with: 1/16 px places a model
#: within 0.03 px, and a table of them costs 17 x 17 spline shifts where one per source cost 6 s of a
#: 4096^2 detection (painting, then each star's own part for its centroid).
PHASES = 16


class PhaseTable:
    """``psf`` shifted by every (dx, dy) in -0.5..0.5 px, in steps of 1/PHASES (cubic spline, zero outside),
    made once per PSF: a source's model and its own part for the centroids are the same stamp."""

    def __init__(self, psf: np.ndarray):
        steps = np.arange(-PHASES // 2, PHASES // 2 + 1) / PHASES
        self.table = np.array([[ndimage.shift(psf, (dy, dx), order=3, mode="constant") for dx in steps]
                               for dy in steps], np.float32)
        self.half = psf.shape[0] // 2

    def __call__(self, dx: float | np.ndarray, dy: float | np.ndarray) -> np.ndarray:
        """The stamp(s) for sub-pixel shifts (dx, dy): one, or one per element."""
        return self.table[np.rint(np.asarray(dy) * PHASES).astype(int) + PHASES // 2,
                          np.rint(np.asarray(dx) * PHASES).astype(int) + PHASES // 2]

    def at(self, dx: float, dy: float, h: int) -> np.ndarray:
        """The PSF centred at (dx, dy) px from a stamp's centre pixel, on that stamp's (2h+1)^2 pixels
        (zeros if it reaches beyond the table's stamp): bilinear between the 1/PHASES px shifts, so that a
        fit of positions (:mod:`reduction.deblend`) sees a continuous model."""
        ix, iy = int(np.floor(dx + 0.5)), int(np.floor(dy + 0.5))
        fx, fy = (dx - ix) * PHASES, (dy - iy) * PHASES
        jx, jy = int(np.floor(fx)), int(np.floor(fy))
        tx, ty = fx - jx, fy - jy
        half, c = self.half, PHASES // 2
        out = np.zeros((2 * h + 1, 2 * h + 1))
        # The table's rows are shifts in y, its columns in x; a stamp of the table has its centre at ``half``.
        y0, x0 = half - h - iy, half - h - ix
        if y0 < 0 or x0 < 0 or y0 + 2 * h + 1 > 2 * half + 1 or x0 + 2 * h + 1 > 2 * half + 1:
            return out
        for ky, wy in ((jy, 1 - ty), (jy + 1, ty)):
            for kx, wx in ((jx, 1 - tx), (jx + 1, tx)):
                if wy * wx == 0:
                    continue
                sy, sx = min(max(ky + c, 0), PHASES), min(max(kx + c, 0), PHASES)
                out += wy * wx * self.table[sy, sx, y0:y0 + 2 * h + 1, x0:x0 + 2 * h + 1]
        return out


@dataclass
class SourceModel:
    """All sources' model image (float32), each source's amplitude (0 where not painted: saturated
    sources, whose models are their radial profiles, and fits that came out negative) and the shifted
    empirical PSFs it was painted with (normalised, ``2 * half + 1`` square)."""

    image: np.ndarray
    amplitude: np.ndarray
    shifted: PhaseTable

    def own_stamps(self, x: np.ndarray, y: np.ndarray, which: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sources ``which``'s own parts of the image as painted (``x``, ``y``: every source's position
        then), float32 stamps with their lower-left pixels (x0, y0): the image minus the other sources
        is the residual plus a source's own stamp."""
        half = self.shifted.half
        ix, iy = np.rint(x[which]).astype(int), np.rint(y[which]).astype(int)
        stamps = self.shifted(x[which] - ix, y[which] - iy) * self.amplitude[which, None, None].astype(np.float32)
        return stamps, ix - half, iy - half

    def more(self, residual: np.ndarray, x: np.ndarray, y: np.ndarray, fwhm: float) -> SourceModel:
        """The sources found on the ``residual`` this model left (``x``, ``y``), fitted with the same PSF:
        their model image and amplitudes."""
        half = self.shifted.half
        pad = np.pad(np.nan_to_num(np.asarray(residual, np.float32)), half + 2)
        return _fitted(pad, np.zeros_like(pad), half, self.shifted, x, y, np.zeros(len(x), bool), fwhm)


def source_model_image(image: np.ndarray, x: np.ndarray, y: np.ndarray, saturated: np.ndarray,
                       fwhm: float, saturated_pixels: np.ndarray | None = None) -> SourceModel | None:
    """Image of all sources, each an empirical PSF scaled to its core (brightest first).

    The PSF is the median of bright isolated stars' stamps, each shifted to a
    common centre and normalised; a source's amplitude is the least-squares fit
    of that PSF within 1 FWHM of its centre on the image minus the brighter
    sources already modelled, which is enough to uncover a fainter neighbour.
    A saturated source is modelled by its own azimuthal median profile
    (:func:`_radial_model`) when the plane of ``saturated_pixels`` is given, and
    not at all otherwise. Returns None when too few stars make a PSF.
    """
    half = int(np.ceil(4 * fwhm))
    size = 2 * half + 1
    ny, nx = image.shape
    pad = np.zeros((ny + 2 * half + 4, nx + 2 * half + 4), np.float32)        # float32 planes: 67 MB at 4096^2
    img = pad[half + 2:half + 2 + ny, half + 2:half + 2 + nx]
    img[...] = image
    np.nan_to_num(img, copy=False)
    nearest = nearest_distance(np.column_stack([x, y]))
    inner = (x > half + 2) & (x < nx - half - 3) & (y > half + 2) & (y < ny - half - 3)
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    peak = pad[iy + half + 2, ix + half + 2]
    cand = np.nonzero(~saturated & inner & (nearest > 3 * fwhm))[0]
    cand = cand[np.argsort(-peak[cand])][:40]
    stamps = []
    for i in cand:
        stamp = img[iy[i] - half:iy[i] + half + 1, ix[i] - half:ix[i] + half + 1].astype(np.float64)
        shifted = ndimage.shift(stamp, (iy[i] - y[i], ix[i] - x[i]), order=3, mode="nearest")
        total = shifted.sum()
        if total > 0:
            stamps.append(shifted / total)
    if len(stamps) < 5:
        return None
    psf = np.median(np.array(stamps), axis=0)
    psf /= psf.sum()
    model = np.zeros((ny + size + 4, nx + size + 4), np.float32)
    if saturated_pixels is not None:
        model[half + 2:half + 2 + ny, half + 2:half + 2 + nx] = saturated_wing_model(
            img, saturated_pixels, np.column_stack([x, y])[saturated], fwhm)
    return _fitted(pad, model, half, PhaseTable(psf), x, y, saturated, fwhm)


def _fitted(pad: np.ndarray, model: np.ndarray, half: int, shifted: PhaseTable, x: np.ndarray, y: np.ndarray,
            skip: np.ndarray, fwhm: float) -> SourceModel:
    """Fit the PSF (``shifted``) to every source but ``skip``, brightest first, within 1 FWHM of its centre on the
    image (``pad``, padded by ``half + 2``) minus the model so far, and paint it into ``model`` (the
    same padding)."""
    size = 2 * half + 1
    ny, nx = pad.shape[0] - 2 * half - 4, pad.shape[1] - 2 * half - 4
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    peak = pad[iy + half + 2, ix + half + 2]
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    core = np.hypot(xx, yy) <= fwhm
    amplitude = np.zeros(len(x))
    for i in np.argsort(-peak):
        if skip[i]:
            continue
        stamp = shifted(x[i] - ix[i], y[i] - iy[i])
        sl = (slice(iy[i] + 2, iy[i] + 2 + size), slice(ix[i] + 2, ix[i] + 2 + size))
        data = pad[sl] - model[sl]
        p = stamp[core]
        amp = float((p * data[core]).sum() / (p * p).sum())
        if amp > 0:
            model[sl] += amp * stamp
            amplitude[i] = amp
    return SourceModel(model[half + 2:half + 2 + ny, half + 2:half + 2 + nx], amplitude, shifted)


def saturated_wing_model(image: np.ndarray, saturated_pixels: np.ndarray, xy: np.ndarray, fwhm: float
                         ) -> np.ndarray:
    """Image (float32) of the saturated stars at ``xy``, each its own azimuthal median profile out to
    SATURATED_MODEL_FWHM (:func:`_radial_model`): what their wings put on their neighbours, measured and
    not assumed (a profile extrapolated beyond 3.5 FWHM put ten times a Moffat's light 8 FWHM out)."""
    model = np.zeros(image.shape, np.float32)
    clipped = dilate_mask(saturated_pixels, 1)
    for x, y in xy:
        _radial_model(image, clipped, x, y, SATURATED_MODEL_FWHM * fwhm, model)
    return model


def _radial_model(image: np.ndarray, clipped: np.ndarray, x: float, y: float, reach: float,
                  model: np.ndarray) -> None:
    """Add a saturated star's azimuthal median profile (1 px rings out to ``reach``) to ``model`` in place.

    Its own profile, not the PSF scaled to its wing: in the stack the wing next to the clipped core
    comes from the frames that did not saturate there, and the empirical PSF (cut at 4 FWHM) fell to
    half the wing's light 8-12 px out, which hid the neighbours 6-10 px from a 12th-magnitude star. A
    median ring ignores the neighbours themselves, which are left in the residual to be found. Inside
    the clipped core the model is the image itself (nothing is searched there).
    """
    ny, nx = image.shape
    r_max = int(np.ceil(reach))
    x0, x1 = max(int(x) - r_max, 0), min(int(x) + r_max + 2, nx)
    y0, y1 = max(int(y) - r_max, 0), min(int(y) + r_max + 2, ny)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    r = np.hypot(xx - x, yy - y)
    ring = r.astype(int)
    data = image[y0:y1, x0:x1] - model[y0:y1, x0:x1]
    inside = ring < r_max
    lost = clipped[y0:y1, x0:x1] & inside
    free = inside & ~lost
    # Each ring's median and mean radius in one sort (by ring, then value), not a pass over the box per
    # ring: with a pass per ring, 3000 saturated stars took 15 s of a 4096^2 catalogue.
    k, values = ring[free], data[free]
    radius_sum = np.bincount(k, weights=r[free], minlength=r_max)
    order = np.lexsort((values, k))
    k, values = k[order], values[order]
    counts = np.bincount(k, minlength=r_max)
    starts = np.cumsum(counts) - counts
    use = counts >= 4
    if not use.any():
        return
    lo, hi = starts[use] + (counts[use] - 1) // 2, starts[use] + counts[use] // 2
    levels = 0.5 * (values[lo].astype(np.float64) + values[hi])
    radii = radius_sum[use] / counts[use]
    # Interpolated between the rings' mean radii, not constant in each ring: on a 12th-magnitude star's
    # steep wing the 1 px steps of a constant ring left ridges that read as sources 3 FWHM out.
    add = np.interp(r, np.r_[radii, float(r_max)], np.r_[levels, 0.0]).astype(np.float32)
    add[~inside] = 0
    add[lost] = data[lost]
    np.clip(add, 0, None, out=add)
    model[y0:y1, x0:x1] += add


# --------------------------------------------------------------------------- the stack's PSF

#: Fewest clean stars for an empirical PSF; below it, aperture photometry alone (noted in the metadata).
MIN_PSF_STARS = 8
#: Oversampling of the empirical PSF: 2 resolves FWHM >= 2.5 px stacks with few stars.
PSF_OVERSAMPLING = 2
#: Clean stars per PSF region at least: regions per axis grow with the star count (1, 2 or 3).
STARS_PER_REGION = 25
#: Relative difference of the regions' second moments above which one PSF per region is used.
PSF_VARIATION = 0.03


@dataclass(frozen=True)
class EmpiricalPSF:
    """Oversampled empirical PSF(s) of one stack: one per region of an ``ny x nx`` grid (1 x 1: one PSF).

    Why not the fitted Moffat of the quality step: real PSFs are not Moffats of the
    beta assumed (beta varies night to night, optics add coma and elongation), and a
    wrong profile leaves residuals of several per cent on the neighbours' light.
    """

    data: tuple[np.ndarray, ...]       # per region, unit sum at native sampling
    oversampling: int
    grid: tuple[int, int]               # regions (ny, nx)
    shape: tuple[int, int]              # image shape the grid divides
    nstars: int
    fwhm_px: float

    def region_of(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Index of the region holding each position."""
        gy, gx = self.grid
        ry = np.clip((np.asarray(y) / self.shape[0] * gy).astype(int), 0, gy - 1)
        rx = np.clip((np.asarray(x) / self.shape[1] * gx).astype(int), 0, gx - 1)
        return ry * gx + rx

    def render(self, x: np.ndarray, y: np.ndarray, half: int, derivatives: bool = False
               ) -> tuple[np.ndarray, ...]:
        """Unit-flux PSF stamps ``(n, 2 half + 1, 2 half + 1)`` on the native grid at integer centres
        ``rint(x), rint(y)``; with ``derivatives`` also d/dx and d/dy (per pixel of shift of the star)."""
        ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
        off = np.arange(-half, half + 1)
        o = self.oversampling
        out = [np.zeros((len(x), 2 * half + 1, 2 * half + 1)) for _ in range(3 if derivatives else 1)]
        region = self.region_of(x, y)
        for r, data in enumerate(self.data):
            sel = np.nonzero(region == r)[0]
            if not len(sel):
                continue
            c = (np.array(data.shape) - 1) / 2.0
            dy = off[None, :, None] - (y[sel] - iy[sel])[:, None, None]
            dx = off[None, None, :] - (x[sel] - ix[sel])[:, None, None]
            cy = np.broadcast_to(c[0] + o * dy, (len(sel), 2 * half + 1, 2 * half + 1))
            cx = np.broadcast_to(c[1] + o * dx, (len(sel), 2 * half + 1, 2 * half + 1))
            planes = [data] if not derivatives else [data, *np.gradient(data)[::-1]]
            for k, plane in enumerate(planes):
                v = ndimage.map_coordinates(plane, [cy.ravel(), cx.ravel()], order=3, mode="constant")
                # A shift of the star by +1 px moves the sampling point by -o oversampled pixels.
                out[k][sel] = v.reshape(cy.shape) * (1.0 if k == 0 else -o)
        return tuple(out)


def build_psf(image: np.ndarray, x: np.ndarray, y: np.ndarray, usable: np.ndarray, fwhm: float,
              min_stars: int = MIN_PSF_STARS) -> tuple[EmpiricalPSF | None, str]:
    """Empirical PSF from the bright ``usable`` stars (isolated, unsaturated, inside), per region when the
    data show a variation across the field; (None, reason) with too few stars."""
    cand = np.nonzero(usable)[0]
    if len(cand) < min_stars:
        return None, f"{len(cand)} clean stars (< {min_stars}) for a PSF model: aperture photometry only"
    half = int(np.ceil(3.5 * fwhm))
    whole = _epsf(image, x[cand], y[cand], half)
    if whole is None:
        return None, "the PSF builder failed: aperture photometry only"
    per_axis = int(np.clip(np.sqrt(len(cand) / STARS_PER_REGION), 1, 3))
    psf = EmpiricalPSF((whole,), PSF_OVERSAMPLING, (1, 1), image.shape, len(cand), fwhm)
    if per_axis > 1:
        grid = (per_axis, per_axis)
        probe = EmpiricalPSF((whole,) * per_axis ** 2, PSF_OVERSAMPLING, grid, image.shape, len(cand), fwhm)
        region = probe.region_of(x[cand], y[cand])
        parts = [_epsf(image, x[cand][region == r], y[cand][region == r], half) for r in range(per_axis ** 2)]
        if all(p is not None for p in parts):
            ref = _second_moments(whole)
            moments = np.array([_second_moments(p) for p in parts])
            variation = float(max(np.max(np.abs(moments[:, 0] / ref[0] - 1)), np.max(np.abs(moments[:, 1:] - ref[1:]))))
            if variation > PSF_VARIATION:
                psf = EmpiricalPSF(tuple(parts), PSF_OVERSAMPLING, grid, image.shape, len(cand), fwhm)
                log.info("PSF varies across the field by %.1f%%: %d x %d regions", 100 * variation, *grid)
    return psf, f"empirical PSF from {len(cand)} stars, {psf.grid[0]} x {psf.grid[1]} region(s)"


def _epsf(image: np.ndarray, x: np.ndarray, y: np.ndarray, half: int) -> np.ndarray | None:
    """Oversampled effective PSF: every stamp pixel binned by its offset from its star's centre, the median
    of each bin (Anderson & King's ePSF without their iteration); unit sum at native sampling.

    photutils' EPSFBuilder gives the same model but costs ~30 s per region at 100 stars
    (its missing-data interpolation and per-star fits), which the live service cannot pay.
    """
    if len(x) < 3:
        return None
    img = np.nan_to_num(np.asarray(image, float))
    ny, nx = img.shape
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    inside = (ix >= half) & (ix < nx - half) & (iy >= half) & (iy < ny - half)
    ix, iy, x, y = ix[inside], iy[inside], x[inside], y[inside]
    if len(x) < 3:
        return None
    off = np.arange(-half, half + 1)
    stamps = img[iy[:, None, None] + off[None, :, None], ix[:, None, None] + off[None, None, :]]
    radius = np.hypot(*np.meshgrid(off, off))
    total = (stamps * (radius <= half)).sum(axis=(1, 2))
    inner = (stamps * (radius <= 0.43 * half)).sum(axis=(1, 2))         # 1.5 FWHM (half is 3.5 FWHM)
    # A stamp whose light beyond the core is not the others' (a bright or saturated neighbour in it, or one
    # over-subtracted in a crowded field) is left out: normalised by a total near zero, one such stamp of 25
    # turned a crowded field's PSF into a hole of -6 times its peak.
    spread = np.where(inner > 0, total / np.where(inner > 0, inner, 1), np.nan)
    typical = np.nanmedian(spread) if np.isfinite(spread).any() else np.nan
    ok = (total > 0) & (inner > 0) & (np.abs(np.log(np.where(spread > 0, spread, 1e-9) / typical)) < np.log(1.5))
    if ok.sum() < 3:
        return None
    stamps, x, y, ix, iy, total = stamps[ok], x[ok], y[ok], ix[ok], iy[ok], total[ok]
    o = PSF_OVERSAMPLING
    dx = off[None, None, :] - (x - ix)[:, None, None]
    dy = off[None, :, None] - (y - iy)[:, None, None]
    size = 2 * half * o + 1
    bx = np.rint(np.broadcast_to(dx, stamps.shape) * o).astype(int) + half * o
    by = np.rint(np.broadcast_to(dy, stamps.shape) * o).astype(int) + half * o
    use = (bx >= 0) & (bx < size) & (by >= 0) & (by < size)
    values = (stamps / total[:, None, None])[use]
    cell = (by * size + bx)[use]
    order = np.lexsort((values, cell))
    cell, values = cell[order], values[order]
    starts = np.r_[0, np.nonzero(np.diff(cell))[0] + 1]
    counts = np.diff(np.r_[starts, len(cell)])
    median = 0.5 * (values[starts + (counts - 1) // 2] + values[starts + counts // 2])
    data = np.full(size * size, np.nan)
    data[cell[starts]] = median
    data = data.reshape(size, size)
    missing = ~np.isfinite(data)
    if missing.any():       # cells no star sampled: the mean of their sampled neighbours
        filled = ndimage.uniform_filter(np.nan_to_num(data), 3)
        weight = ndimage.uniform_filter((~missing).astype(float), 3)
        data[missing] = np.where(weight[missing] > 0, filled[missing] / np.maximum(weight[missing], 1e-9), 0)
    # Beyond the circle the stamps hold little of the star and much of its neighbours: over-subtracted ones
    # in a crowded field read -3 times the peak there. A star's light is not negative. (Zeroed, the corners'
    # true light went missing: isolated stars' PSF fluxes 0.004 mag faint.)
    grid = (np.arange(size) - half * o) / o
    corners = np.hypot(*np.meshgrid(grid, grid)) > half
    data[corners] = np.clip(data[corners], 0, None)
    total = data.sum() / o ** 2
    return data / total if total > 0 else None


def _second_moments(data: np.ndarray) -> np.ndarray:
    """Size (Ixx + Iyy) and ellipticity components of the core of a PSF array."""
    yy, xx = np.indices(data.shape, dtype=float)
    w = np.clip(data, 0, None)
    w = np.where(w > 0.05 * w.max(), w, 0)
    cx, cy = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
    ixx = (w * (xx - cx) ** 2).sum() / w.sum()
    iyy = (w * (yy - cy) ** 2).sum() / w.sum()
    ixy = (w * (xx - cx) * (yy - cy)).sum() / w.sum()
    size = ixx + iyy
    return np.array([size, (ixx - iyy) / size, 2 * ixy / size])


@dataclass(frozen=True)
class PSFFit:
    """Joint PSF fit of all stars of one stack (fluxes in ADU per frame, total PSF flux)."""

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray
    separable: np.ndarray      # the fit tells the star from its neighbours (overlap loses < 3/4 of its information)
    stamps: np.ndarray         # unit-flux PSF of each star, centred at rint(x), rint(y)
    model: np.ndarray          # image of all fitted stars
    model_sigma: np.ndarray    # image of sum_j flux_err_j * PSF_j (the models' uncertainty, correlated sum)

    def model_of(self, selected: np.ndarray) -> np.ndarray:
        """Image of the ``selected`` stars' models only (e.g. a star's neighbours, to measure it without them)."""
        sel = np.asarray(selected, bool)
        return _paint(self.model.shape, self.x[sel], self.y[sel], self.stamps[sel] * self.flux[sel, None, None])


def fit_psf(image: np.ndarray, variance: np.ndarray, psf: EmpiricalPSF, x: np.ndarray, y: np.ndarray,
            masked: np.ndarray, fit_radius: float, fit_positions: np.ndarray | None = None,
            iterations: int = 3) -> PSFFit:
    """All stars at once by linear least squares (fluxes; positions linearised for ``fit_positions``).

    With the positions fixed, a PSF fit is linear in the fluxes, so every star of the
    field is fitted in one sparse solve and neighbours' overlaps are exact (no
    grouping to tune, which photutils' PSFPhotometry needs and pays for with one
    nonlinear fit per group: minutes at thousands of stars).  ``masked`` pixels
    (saturated cores) are left out of the fit: a saturated star is measured on its
    wings.  Positions of ``fit_positions`` stars move by the linearised PSF
    gradient (Gauss-Newton), a few iterations.
    """
    x, y = np.asarray(x, float).copy(), np.asarray(y, float).copy()
    n = len(x)
    ny, nx = image.shape
    half = int(np.ceil(3.5 * psf.fwhm_px))
    move = np.zeros(n, bool) if fit_positions is None else np.asarray(fit_positions, bool)
    data = np.nan_to_num(np.asarray(image, float)).ravel()
    with np.errstate(divide="ignore"):
        weight = np.where(np.isfinite(variance) & (variance > 0) & ~masked, 1.0 / variance, 0.0).ravel()
    flux, flux_err = np.zeros(n), np.full(n, np.inf)
    for it in range(iterations if move.any() else 1):
        stamps = psf.render(x, y, half, derivatives=move.any())
        ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
        off = np.arange(-half, half + 1)
        gx = ix[:, None, None] + off[None, None, :]
        gy = iy[:, None, None] + off[None, :, None]
        r2 = (gx - x[:, None, None]) ** 2 + (gy - y[:, None, None]) ** 2
        inside = (gx >= 0) & (gx < nx) & (gy >= 0) & (gy < ny) & (r2 <= fit_radius ** 2)
        pix = (np.clip(gy, 0, ny - 1) * nx + np.clip(gx, 0, nx - 1))
        cols = [np.arange(n)]
        planes = [stamps[0]]
        if move.any():
            cols += [n + np.arange(n), 2 * n + np.arange(n)]
            planes += [stamps[1] * move[:, None, None], stamps[2] * move[:, None, None]]
        rows, colv, vals = [], [], []
        for c, plane in zip(cols, planes):
            sel = inside & (plane != 0)
            star = np.broadcast_to(np.arange(n)[:, None, None], sel.shape)[sel]
            rows.append(pix[sel])
            colv.append(c[star])
            vals.append(plane[sel])
        rows, colv, vals = np.concatenate(rows), np.concatenate(colv), np.concatenate(vals)
        ncol = len(cols) * n
        used, rows = np.unique(rows, return_inverse=True)
        a = sparse.csr_matrix((vals * np.sqrt(weight[used][rows]), (rows, colv)), shape=(len(used), ncol))
        b = data[used] * np.sqrt(weight[used])
        normal = (a.T @ a).tocsc() + sparse.identity(ncol, format="csc") * 1e-12
        diag = normal.diagonal()
        fittable = diag > 1e-10
        normal = normal[fittable][:, fittable]
        solution = np.zeros(ncol)
        solution[fittable] = splinalg.spsolve(normal, a.T[fittable] @ b)
        flux = solution[:n]
        if move.any():
            with np.errstate(divide="ignore", invalid="ignore"):
                dx = np.where(flux > 0, solution[n:2 * n] / flux, 0)
                dy = np.where(flux > 0, solution[2 * n:] / flux, 0)
            step = move & np.isfinite(dx) & np.isfinite(dy)
            x[step] += np.clip(dx[step], -0.5, 0.5)
            y[step] += np.clip(dy[step], -0.5, 0.5)
    # Marginal flux errors (the inverse of the normal matrix): a close pair's errors grow with its overlap.
    flux_err, separable = _flux_errors(normal, fittable, n)
    stamps = psf.render(x, y, half)[0]
    model = _paint(image.shape, x, y, stamps * flux[:, None, None])
    model_sigma = _paint(image.shape, x, y, stamps * np.where(np.isfinite(flux_err), flux_err, 0)[:, None, None])
    return PSFFit(x, y, flux, flux_err, separable, stamps.astype(np.float32), model, model_sigma)


def _flux_errors(normal: sparse.csc_matrix, fittable: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Flux errors with each overlapping neighbour marginalised in turn (pairwise Schur complements).

    Exact for isolated stars and pairs; an exact inverse of the normal matrix costs
    minutes at thousands of stars for a correction only in groups of three or more.
    """
    index = np.cumsum(fittable) - 1
    keep = np.nonzero(fittable[:n])[0]
    flux_normal = normal[index[keep]][:, index[keep]].tocoo()
    diag = flux_normal.diagonal()
    off = flux_normal.row != flux_normal.col
    i, j, v = flux_normal.row[off], flux_normal.col[off], flux_normal.data[off]
    loss = np.zeros(len(keep))
    np.add.at(loss, i, v ** 2 / diag[j])
    err = np.full(n, np.inf)
    err[keep] = 1.0 / np.sqrt(np.clip(diag - loss, 1e-3 * diag, None))
    separable = np.zeros(n, bool)
    separable[keep] = loss < 0.75 * diag
    return err, separable


def _paint(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, stamps: np.ndarray) -> np.ndarray:
    """Sum of stamps centred at rint(x), rint(y) into an image (clipped at the borders)."""
    half = stamps.shape[1] // 2
    ny, nx = shape
    out = np.zeros((ny + 2 * half, nx + 2 * half))
    off = np.arange(-half, half + 1)
    gy = np.rint(y).astype(int)[:, None, None] + off[None, :, None] + half
    gx = np.rint(x).astype(int)[:, None, None] + off[None, None, :] + half
    gy, gx = np.broadcast_arrays(gy, gx)
    ok = (gx >= 0) & (gx < nx + 2 * half) & (gy >= 0) & (gy < ny + 2 * half)
    np.add.at(out, (gy[ok], gx[ok]), stamps[ok])
    return out[half:half + ny, half:half + nx]
