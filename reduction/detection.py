"""Source detection on the stacks.

Detection is a PSF-matched filter with an exact significance map (local maxima of
``conv(image, g) / sqrt(conv(var, g^2))``), rather than DAOStarFinder, because the
stacks have a noise that varies with coverage and with the stars themselves, and
the significance of a peak must mean the same everywhere for the completeness and
spurious-rate promises to hold.  Hot pixels and cosmic rays are rejected by
comparing the single-pixel significance with the matched-filter one: for a star
the matched filter gains (``sqrt(pi) sigma_psf`` times), for a lone pixel it loses.
Positions are Gaussian-windowed centroids (SExtractor's XWIN), which converge to
the centre of any symmetric profile and reach ~0.02 px at S/N 100.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
from astropy.table import Table
from scipy import ndimage
from scipy.spatial import cKDTree

from reduction.deblend import StackResidual, split_pairs
from reduction.kernels import correlate_separable, dilate_labels, dilate_mask, gaussian_blur, maximum_3x3
from reduction.photometry import StackProduct
from reduction.psf import PSF_MODEL_ERROR, SourceModel, source_model_image

log = logging.getLogger(__name__)

#: Width of the light smoothing used to find peaks, in FWHM: narrow enough to separate pairs ~1.2 FWHM apart.
PEAK_KERNEL_FWHM = 0.5
#: The second pass searches no closer than this (FWHM) to a saturated pixel: the clipped core's model is
#: least certain there.
SATURATED_EXCLUSION_FWHM = 1.0
#: A peak next to a brighter one is kept when it rises this many sigma above the saddle between them.
DEBLEND_SIGMA = 4.0


def _gaussian_1d(fwhm: float, radius_sigma: float) -> np.ndarray:
    sigma = fwhm / 2.3548
    r = max(2, int(np.ceil(radius_sigma * sigma)))
    x = np.arange(-r, r + 1)
    return np.exp(-x ** 2 / (2 * sigma ** 2))


def _kernel(fwhm: float, lowered: bool) -> np.ndarray:
    """2-D Gaussian kernel normalised to measure a Gaussian's amplitude; ``lowered`` makes it zero-sum.

    The lowered kernel (DAOFIND's) is the Gaussian minus its mean over the square
    footprint: it estimates the height of a PSF-shaped bump above a locally flat
    background, so the smooth wing of a bright star (many sigma above zero 20 px
    out for a Moffat PSF) gives no response while a star keeps most of its
    matched-filter significance.
    """
    k1 = _gaussian_1d(fwhm, 2.5 if lowered else 3.0)
    g = np.outer(k1, k1)
    k = g - g.mean() if lowered else g
    return k / (k * g).sum()


@dataclass
class _DetectionInput:
    """The signal searched for sources and its variance (stars' Poisson noise included)."""

    image: np.ndarray
    var: np.ndarray
    covered: np.ndarray
    background_var: np.ndarray      # the stack's sky variance alone (weights the centroid image)


def _detection_input(stack: StackProduct, fwhm: float) -> _DetectionInput:
    """Signal and detection variance of ``stack``.

    The variance includes the stars' own Poisson noise so that photon noise on the
    wings of bright stars does not read as faint detections around them.
    """
    # float32 throughout and in place: at 4096^2 each plane is 67 MB, and float64 temporaries doubled that.
    data = np.array(stack.image, np.float32)
    data[~np.isfinite(data)] = 0
    background = stack.background_variance()
    covered = np.isfinite(background)
    var = gaussian_blur(data, fwhm / 2.3548)
    np.clip(var, 0, None, out=var)
    var /= np.float32(stack.gain) * np.clip(stack.nframes, 1, None).astype(np.float32)
    np.add(var, background, out=var, where=covered)
    var[~covered] = 0
    data[~covered] = 0
    return _DetectionInput(data, var, covered, background)


def _subtract_model(inp: _DetectionInput, model: np.ndarray) -> None:
    """Subtract the source models from ``inp`` in place (its first-pass planes are not needed again);
    their relative error PSF_MODEL_ERROR joins the noise."""
    model[~inp.covered] = 0
    inp.image -= model
    model *= np.float32(PSF_MODEL_ERROR)     # the model's buffer becomes its error's variance: no new plane
    model *= model
    inp.var += model


def _fine_map(inp: _DetectionInput, fwhm: float) -> np.ndarray:
    """Significance (unit noise) of the lightly smoothed image: finds peaks and keeps close pairs apart.

    Separable, so a 2048^2 map costs four 1-D passes; the other significances are
    only needed at the candidate peaks and are computed there (:func:`_significance_at`).
    """
    k1 = _gaussian_1d(PEAK_KERNEL_FWHM * fwhm, 3.0)
    num = correlate_separable(inp.image, k1)
    den = correlate_separable(inp.var, k1 ** 2)
    np.clip(den, 0, None, out=den)
    np.sqrt(den, out=den)
    good = inp.covered & (den > 0)
    np.divide(num, den, out=num, where=good)       # float32, in place
    num[~good] = 0
    return num


def _significance_at(inp: _DetectionInput, px: np.ndarray, py: np.ndarray, fwhm: float) -> dict[str, np.ndarray]:
    """Significances at integer pixels: ``lowered`` and ``matched`` filters, brightest single ``pixel`` (3x3)."""
    out: dict[str, np.ndarray] = {}
    for name, kernel in (("lowered", _kernel(fwhm, True)), ("matched", _kernel(fwhm, False))):
        r = kernel.shape[0] // 2
        off = np.arange(-r, r + 1)
        values = np.empty(len(px), np.float32)
        for i in range(0, len(px), 20000):
            gy = py[i:i + 20000, None, None] + off[None, :, None]
            gx = px[i:i + 20000, None, None] + off[None, None, :]
            num = (_gather(inp.image, gy, gx) * kernel).sum(axis=(1, 2))
            den = np.sqrt(np.clip((_gather(inp.var, gy, gx) * kernel ** 2).sum(axis=(1, 2)), 0, None))
            with np.errstate(divide="ignore", invalid="ignore"):
                values[i:i + 20000] = np.where(den > 0, num / den, 0)
        out[name] = values
    best = np.zeros(len(px), np.float32)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            v = _gather(inp.var, py + dy, px + dx)
            with np.errstate(divide="ignore", invalid="ignore"):
                best = np.maximum(best, np.where(v > 0, _gather(inp.image, py + dy, px + dx) / np.sqrt(v), 0))
    out["pixel"] = best
    return out


def _gather(plane: np.ndarray, gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
    """``plane[gy, gx]``, 0 off the plane: a zero-padded read without a padded copy of the plane (67 MB
    per copy at 4096^2)."""
    ny, nx = plane.shape
    inside = (gy >= 0) & (gy < ny) & (gx >= 0) & (gx < nx)
    return np.where(inside, plane[np.clip(gy, 0, ny - 1), np.clip(gx, 0, nx - 1)], 0)


def _drop_saddle_peaks(fine: np.ndarray, px: np.ndarray, py: np.ndarray, radius: float) -> np.ndarray:
    """Keep-mask of peaks: a peak within ``radius`` of a higher one must stand DEBLEND_SIGMA above the saddle.

    The saddle is the lowest value of the lightly smoothed significance map on the
    straight line between the two peaks; noise bumps on a bright star's wing fail
    this, a real neighbour 1.2 FWHM or more away passes.
    """
    keep = np.ones(len(px), bool)
    if len(px) < 2:
        return keep
    pairs = cKDTree(np.column_stack([px, py])).query_pairs(radius, output_type="ndarray")
    if len(pairs) == 0:
        return keep
    height = fine[py, px]
    lo = np.where(height[pairs[:, 0]] < height[pairs[:, 1]], pairs[:, 0], pairs[:, 1])
    hi = np.where(lo == pairs[:, 0], pairs[:, 1], pairs[:, 0])
    t = np.linspace(0, 1, 16)[None, :]
    sx = np.rint(px[lo, None] + t * (px[hi, None] - px[lo, None])).astype(int)
    sy = np.rint(py[lo, None] + t * (py[hi, None] - py[lo, None])).astype(int)
    saddle = fine[sy, sx].min(axis=1)
    weak = height[lo] - saddle < DEBLEND_SIGMA
    keep[lo[weak]] = False
    return keep


def windowed_centroids(image: np.ndarray, x: np.ndarray, y: np.ndarray, fwhm: float,
                       iterations: int = 12, own: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-windowed centroids (SExtractor XWIN/YWIN), vectorised over all sources.

    The fixed point of the iteration is the centre of symmetry of the profile, so it
    is unbiased for any round PSF (and for saturated, clipped cores); sources whose
    iteration wanders off by more than one FWHM keep their starting position.
    With ``own`` (per-source stamps and their lower-left pixels, as
    :meth:`SourceModel.own_stamps` gives), each source is centred on ``image`` plus
    its own stamp: on a residual with every source subtracted, that is the image
    without its neighbours.
    """
    sigma = fwhm / 2.3548
    r = int(np.ceil(4 * sigma))
    pad = np.pad(np.nan_to_num(np.asarray(image, np.float32)), r + 2)     # the map is float32: no float64 copy
    off = np.arange(-r, r + 1)
    x0, y0 = np.asarray(x, float).copy(), np.asarray(y, float).copy()
    xc, yc = x0.copy(), y0.copy()
    rows = np.arange(len(x0))[:, None, None]
    for _ in range(iterations):
        ix, iy = np.rint(xc).astype(int), np.rint(yc).astype(int)
        gx = ix[:, None, None] + off[None, None, :]
        gy = iy[:, None, None] + off[None, :, None]
        stamp = pad[gy + r + 2, gx + r + 2]
        if own is not None:
            stamps, ox, oy = own
            sx, sy = gx - ox[:, None, None], gy - oy[:, None, None]
            size = stamps.shape[1]
            inside = (sx >= 0) & (sx < size) & (sy >= 0) & (sy < size)
            stamp = stamp + np.where(inside, stamps[rows, np.clip(sy, 0, size - 1), np.clip(sx, 0, size - 1)], 0)
        dx, dy = gx - xc[:, None, None], gy - yc[:, None, None]
        w = np.exp(-(dx ** 2 + dy ** 2) / (2 * sigma ** 2)) * stamp
        norm = w.sum(axis=(1, 2))
        ok = norm > 0
        step_x = np.where(ok, 2 * (w * dx).sum(axis=(1, 2)) / np.where(ok, norm, 1), 0)
        step_y = np.where(ok, 2 * (w * dy).sum(axis=(1, 2)) / np.where(ok, norm, 1), 0)
        xc, yc = xc + np.clip(step_x, -1, 1), yc + np.clip(step_y, -1, 1)
        if np.all(np.hypot(step_x, step_y) < 1e-4):
            break
    lost = np.hypot(xc - x0, yc - y0) > fwhm
    xc[lost], yc[lost] = x0[lost], y0[lost]
    return xc, yc


def detect_sources(stack: StackProduct, sigma: float = 5.0, fwhm: float | None = None,
                   min_coverage: float = 0.5) -> Table:
    """Sources of one stack (see :func:`detect_sources_multi`)."""
    return detect_sources_multi([stack], sigma=sigma, fwhm=fwhm, min_coverage=min_coverage)


def detect_sources_multi(stacks: list[StackProduct], sigma: float = 5.0, fwhm: float | None = None,
                         min_coverage: float = 0.5, second_pass: bool = True) -> Table:
    """One master source list from one or several stacks on the same grid.

    ``sigma`` is the significance of the PSF-matched filter (for several stacks, of
    the sum of their significance maps divided by sqrt(n): a star bright in any
    filter is found).  With ``second_pass``, an empirical PSF scaled to every source
    found is subtracted and the residual searched again (DAOPHOT's FIND - ALLSTAR -
    FIND): a faint star on the shoulder of a brighter one 1-2 FWHM away makes no peak
    of its own until its neighbour is removed.  Returns x, y (0-based), ``snr``
    (matched filter), ``nframes`` (smallest over the stacks), ``low_coverage``,
    ``saturated`` (peak inside a saturated region) and ``pass`` (1 or 2; 2 also for the second star of
    a pair closer than 1 FWHM that :func:`reduction.deblend.split_pairs` split), brightest first.
    """
    fwhm = float(fwhm or np.nanmean([s.fwhm_px for s in stacks]))
    nframes = np.minimum.reduce([s.nframes for s in stacks])
    saturated = np.logical_or.reduce([s.saturated for s in stacks])
    labels = _saturated_regions(saturated)
    fine, inputs, weighted = _combined_maps(stacks, fwhm, nframes)
    x, y, snr, lab, n_sharp = _find_peaks(fine, inputs, weighted, labels, nframes, sigma, fwhm)
    npass = np.ones(len(x), np.int8)

    del fine, weighted
    models = _subtract_sources(inputs, x, y, lab > 0, fwhm, saturated) if second_pass and len(x) else None
    if models is not None:
        # Saturated stars are subtracted as fitted on their wings: a neighbour 1 FWHM beyond the clipped
        # core is searched for (at 3 FWHM, as before, the ones 6-10 px from a 12th-magnitude star were lost).
        excluded = dilate_mask(saturated, int(np.ceil(SATURATED_EXCLUSION_FWHM * fwhm)))
        fine2, _, weighted2 = _combined_maps(stacks, fwhm, nframes, inputs)
        x2, y2, snr2, lab2, n_sharp2 = _find_peaks(fine2, inputs, weighted2, labels, nframes, sigma, fwhm)
        n_sharp += n_sharp2
        new = (lab2 == 0) & ~excluded[np.rint(y2).astype(int), np.rint(x2).astype(int)]
        d, _ = cKDTree(np.column_stack([x, y])).query(np.column_stack([x2, y2]))
        new &= d > fwhm
        log.debug("second pass: %d new sources on the PSF-subtracted residual", int(new.sum()))
        x, y = np.r_[x, x2[new]], np.r_[y, y2[new]]
        snr, lab = np.r_[snr, snr2[new]], np.r_[lab, lab2[new]]
        npass = np.r_[npass, np.full(int(new.sum()), 2, np.int8)]
        del fine2, weighted2
        models = _subtract_second_pass(inputs, models, x, y, npass == 2, fwhm)
        modelled = np.flatnonzero(lab == 0)
        painted = (x.copy(), y.copy())
        x[modelled], y[modelled] = _recentred(_weighted_image(inputs, nframes == 0), inputs, models, x, y,
                                              modelled, fwhm)
        residuals = [StackResidual(inp.image, inp.var, m) for inp, m in zip(inputs, models)]
        x, y, sx, sy, ssnr = split_pairs(residuals, painted, x, y, modelled, fwhm)
        x, y, snr = np.r_[x, sx], np.r_[y, sy], np.r_[snr, ssnr]
        lab, npass = np.r_[lab, np.zeros(len(sx), lab.dtype)], np.r_[npass, np.full(len(sx), 2, np.int8)]

    nf = nframes[np.rint(y).astype(int), np.rint(x).astype(int)]
    order = np.argsort(-snr)
    table = Table({"x": x[order], "y": y[order], "snr": snr[order], "nframes": nf[order].astype(np.int32),
                   "low_coverage": (nf < min_coverage * max(nframes.max(), 1))[order],
                   "saturated": (lab > 0)[order], "pass": npass[order]})
    table.meta.update(fwhm_px=fwhm, sigma=sigma, n_rejected_sharp=int(n_sharp))
    log.info("detected %d sources at %.1f sigma (FWHM %.2f px; %d in the second pass)", len(table), sigma, fwhm,
             int((npass == 2).sum()))
    return table



def _saturated_regions(saturated: np.ndarray) -> np.ndarray:
    """Label plane of the saturated cores, each grown by 2 px (a flat top's maxima at its rim are the same
    star). Each core keeps its own label: labelled after dilation, two 11-12 mag stars 13 px apart made one
    region, one source at their midpoint, and the neighbours of the lost one went unflagged."""
    cores, n = ndimage.label(saturated)
    if n == 0:
        return cores
    return dilate_labels(cores, 2)


def _subtract_sources(inputs: list[_DetectionInput], x: np.ndarray, y: np.ndarray, saturated: np.ndarray,
                      fwhm: float, saturated_pixels: np.ndarray) -> list[SourceModel] | None:
    """Subtract every source's empirical PSF model from each input in place, one stack at a time (one
    model plane alive at once); the models with their planes dropped, or None when a stack has too few
    stars for a PSF (no second pass then)."""
    models = []
    for inp in inputs:
        model = source_model_image(inp.image, x, y, saturated, fwhm, saturated_pixels)
        if model is None:
            return None
        _subtract_model(inp, model.image)
        models.append(replace(model, image=np.empty((0, 0), np.float32)))
    return models


def _subtract_second_pass(inputs: list[_DetectionInput], models: list[SourceModel], x: np.ndarray,
                          y: np.ndarray, second: np.ndarray, fwhm: float) -> list[SourceModel]:
    """Fit the second pass's sources (``second``) on each residual with its stack's PSF and subtract them
    too: the models of every source (the amplitudes of both passes), for the centroids."""
    whole = []
    for inp, model in zip(inputs, models):
        found = model.more(inp.image, x[second], y[second], fwhm)
        found.image[~inp.covered] = 0
        inp.image -= found.image
        whole.append(replace(model, amplitude=np.r_[model.amplitude, found.amplitude]))
    return whole


def _recentred(weighted: np.ndarray, inputs: list[_DetectionInput], models: list[SourceModel],
               x: np.ndarray, y: np.ndarray, which: np.ndarray, fwhm: float) -> tuple[np.ndarray, np.ndarray]:
    """Centroids of the modelled sources on the residual's S/N image plus each one's own model, in the
    same S/N units: each star without its neighbours. On the image itself, a brighter star 2-3 FWHM away
    pulled the window: at 6-8 px, stars within 3 FWHM of one were 0.6 px off (median), 17 % beyond 1.5 px.
    In chunks, so that the stamps of thousands of sources at large FWHM stay small."""
    xs, ys = x[which], y[which]
    chunk = 1000
    for start in range(0, len(which), chunk):
        part = slice(start, start + chunk)
        total = None
        for inp, model in zip(inputs, models):
            stamps, ox, oy = model.own_stamps(x, y, which[part])
            size = stamps.shape[1]
            gy = np.clip(oy[:, None, None] + np.arange(size)[None, :, None], 0, weighted.shape[0] - 1)
            gx = np.clip(ox[:, None, None] + np.arange(size)[None, None, :], 0, weighted.shape[1] - 1)
            with np.errstate(invalid="ignore", divide="ignore"):
                scale = 1 / np.sqrt(inp.background_var[gy, gx])
            stamps *= np.where(np.isfinite(scale), scale, 0)
            total = stamps if total is None else total + stamps
        xs[part], ys[part] = windowed_centroids(weighted, xs[part], ys[part], fwhm, own=(total, ox, oy))
    return xs, ys


def _combined_maps(stacks: list[StackProduct], fwhm: float, nframes: np.ndarray,
                   inputs: list[_DetectionInput] | None = None
                   ) -> tuple[np.ndarray, list[_DetectionInput], np.ndarray]:
    """Fine significance map summed over the stacks (unit noise), the per-stack inputs (made from the
    stacks unless given), and the S/N-weighted image for centroids."""
    if inputs is None:
        inputs = [_detection_input(s, fwhm) for s in stacks]
    fine = np.zeros(stacks[0].image.shape, np.float32)
    for inp in inputs:
        fine += _fine_map(inp, fwhm)
    fine *= np.float32(1.0 / np.sqrt(len(stacks)))     # in place: float32, not a float64 copy of the plane
    return fine, inputs, _weighted_image(inputs, nframes == 0)


def _weighted_image(inputs: list[_DetectionInput], uncovered: np.ndarray) -> np.ndarray:
    """The inputs' images in units of their sky noise, summed: the image the centroids are taken on."""
    weighted = np.zeros(uncovered.shape, np.float32)
    for inp in inputs:
        with np.errstate(invalid="ignore", divide="ignore"):
            # One float32 buffer, in place: np.where over a quotient of a square root held four planes.
            snr = np.sqrt(inp.background_var, dtype=np.float32)
            np.divide(inp.image, snr, out=snr)
        snr[uncovered] = 0
        weighted += snr
        del snr
    return weighted


def _find_peaks(fine: np.ndarray, inputs: list[_DetectionInput], weighted: np.ndarray, labels: np.ndarray,
                nframes: np.ndarray, sigma: float, fwhm: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Peaks that are sources: (x, y, snr, saturated-region label, number rejected as sharp)."""
    # The fine map is less efficient than the matched filter, so a looser cut keeps every candidate.
    peaks = (fine == maximum_3x3(fine)) & (fine >= 0.5 * sigma) & (nframes > 0)
    border = 2
    peaks[:border], peaks[-border:], peaks[:, :border], peaks[:, -border:] = False, False, False, False
    py, px = np.nonzero(peaks)
    sig = {"lowered": 0.0, "matched": 0.0, "pixel": 0.0}
    for inp in inputs:
        for name, values in _significance_at(inp, px, py, fwhm).items():
            sig[name] = sig[name] + values / np.sqrt(len(inputs))
    real = sig["lowered"] >= sigma
    px, py = px[real], py[real]
    sig = {k: v[real] for k, v in sig.items()}
    deblended = _drop_saddle_peaks(fine, px, py, 2.5 * fwhm)
    px, py = px[deblended], py[deblended]
    sig = {k: v[deblended] for k, v in sig.items()}
    snr = sig["lowered"]

    # One source per saturated region: the flat clipped top can hold several maxima.
    lab = labels[py, px]
    keep = np.ones(len(px), bool)
    if lab.any():
        order = np.lexsort((-snr, lab))
        first = np.r_[True, lab[order][1:] != lab[order][:-1]]
        keep[order[~first & (lab[order] > 0)]] = False

    # Hot pixels and cosmic rays: a lone pixel is more significant than its matched filter.
    sharp = (sig["pixel"] > sig["matched"] + 3.0) & (lab == 0)
    keep &= ~sharp
    px, py, snr, lab = px[keep], py[keep], snr[keep], lab[keep]

    x, y = windowed_centroids(weighted, px.astype(float), py.astype(float), fwhm)
    # A saturated star's flat top is wider than the window; the centre of its (round) saturated
    # region is where the star is.
    if (lab > 0).any():
        # Centroid of each region's pixels (ndimage.center_of_mass would need a float64 plane of ones).
        ry, rx = np.nonzero(labels)
        rl = labels[ry, rx]
        count = np.bincount(rl)
        use = lab[lab > 0]
        y[lab > 0] = np.bincount(rl, weights=ry)[use] / count[use]
        x[lab > 0] = np.bincount(rl, weights=rx)[use] / count[use]
    ny, nx = fine.shape
    inside = (x >= 0) & (x <= nx - 1) & (y >= 0) & (y <= ny - 1)
    return x[inside], y[inside], snr[inside], lab[inside], int(sharp.sum())


