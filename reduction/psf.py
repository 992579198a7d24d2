"""The stack's point-spread function: empirical models and PSF photometry."""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from reduction.photometry import nearest_distance

log = logging.getLogger(__name__)

#: Relative error of the empirical PSF model, added to the noise of the residual image
#: so that imperfect subtraction of bright stars is not read as new faint sources.
PSF_MODEL_ERROR = 0.05


def source_model_image(image: np.ndarray, x: np.ndarray, y: np.ndarray, saturated: np.ndarray,
                       fwhm: float) -> np.ndarray | None:
    """Image of all unsaturated sources, each an empirical PSF scaled to its core (brightest first).

    The PSF is the median of bright isolated stars' stamps, each shifted to a
    common centre and normalised; a source's amplitude is the least-squares fit
    of that PSF within 1 FWHM of its centre on the image minus the brighter
    sources already modelled, which is enough to uncover a fainter neighbour.
    Returns None when too few stars make a PSF.
    """
    half = int(np.ceil(4 * fwhm))
    size = 2 * half + 1
    ny, nx = image.shape
    img = np.nan_to_num(np.asarray(image, np.float64))
    pad = np.pad(img, half + 2)
    nearest = nearest_distance(np.column_stack([x, y]))
    inner = (x > half + 2) & (x < nx - half - 3) & (y > half + 2) & (y < ny - half - 3)
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    peak = pad[iy + half + 2, ix + half + 2]
    cand = np.nonzero(~saturated & inner & (nearest > 3 * fwhm))[0]
    cand = cand[np.argsort(-peak[cand])][:40]
    stamps = []
    for i in cand:
        stamp = img[iy[i] - half:iy[i] + half + 1, ix[i] - half:ix[i] + half + 1]
        shifted = ndimage.shift(stamp, (iy[i] - y[i], ix[i] - x[i]), order=3, mode="nearest")
        total = shifted.sum()
        if total > 0:
            stamps.append(shifted / total)
    if len(stamps) < 5:
        return None
    psf = np.median(np.array(stamps), axis=0)
    psf /= psf.sum()
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    core = np.hypot(xx, yy) <= fwhm

    model = np.zeros((ny + size + 4, nx + size + 4))
    for i in np.argsort(-peak):
        if saturated[i]:
            continue
        shifted = ndimage.shift(psf, (y[i] - iy[i], x[i] - ix[i]), order=3, mode="constant")
        sl = (slice(iy[i] + 2, iy[i] + 2 + size), slice(ix[i] + 2, ix[i] + 2 + size))
        data = pad[sl] - model[sl]
        p = shifted[core]
        amp = float((p * data[core]).sum() / (p * p).sum())
        if amp > 0:
            model[sl] += amp * shifted
    return model[half + 2:half + 2 + ny, half + 2:half + 2 + nx].astype(np.float32)


