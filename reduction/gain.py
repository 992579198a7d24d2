"""The camera's gain (e-/ADU) measured from its own frames, for when no header or config gives it.

Why: photometric errors scale with sqrt(electrons); a gain silently taken as 1.0 e-/ADU makes a
0.25 e-/ADU CMOS camera's bright-star errors 2x too small. Two estimators, both pure (arrays in,
a number out, nothing written):

* :func:`photon_transfer_gain`: pairs of flats and two or more biases, the classic photon-transfer
  measurement. The difference of two flats cancels their common pattern (vignetting, dust, pixel
  response); its variance is the photon noise of both plus read noise.
* :func:`sky_noise_gain`: one science frame. The sky's noise against its level, tile by tile; the
  variance is taken from the difference of adjacent pixels (a gradient or vignetting cancels in it)
  and clipped (stars, hot pixels and cosmics are outliers of that difference).

Both work on frames in ADU that are linear in electrons (bias- and dark-subtracted); a flat-fielded
frame is passed with its flat, which rescales signal and noise differently.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy.ndimage import binary_dilation, uniform_filter

from reduction.frames import PLAUSIBLE_GAIN

log = logging.getLogger(__name__)

#: Tile size (px) of the sky-noise estimate: small enough that the sky is flat in a tile's pixel
#: differences, large enough (32 x 31 differences) for a variance good to ~5 %.
SKY_TILE = 32
#: Tiles a side at most (every k-th tile beyond): 32 x 32 tiles of 32 px, ~1 Mpx, keep a 4096 px frame's
#: estimate as cheap as a 1024 px one's (~1 s) and as good (the variance of 1000 tiles is ample).
MAX_TILES = 32
#: Photon transfer uses the central box of at most this many px a side (the flats' pattern cancels in
#: their difference, so the centre is as good as the whole and 16x cheaper at 4096 px).
TRANSFER_BOX = 1024
#: Clipping of pixel differences, in sigma: 4 keeps a Gaussian's variance within 0.1 % (3 would cut it
#: by 1.3 %) while stars, hot pixels and cosmics fall out.
CLIP_SIGMA = 4.0
#: A pixel belongs to a star when its 3x3 mean stands this many sigma (of that mean) above the tile's level;
#: pure noise does so in 3e-5 of the pixels, so the sky's own noise is hardly cut.
STAR_SIGMA = 4.0
#: Star pixels are grown by this many px, to leave out the wings below the threshold too.
STAR_GROW = 2
#: A tile serves when at least this share of its pixels is sky.
MIN_SKY_SHARE = 0.5
#: Without a known bias the gain is the inverse slope of variance against level: it is refused when its
#: 95 % interval is wider than this fraction of it (a sky too flat across the frame to give a slope).
MAX_SLOPE_SPREAD = 0.25


class GainError(ValueError):
    """No usable gain from the frames; the message says why and names ``camera.gain``."""


def _clipped_var(values: np.ndarray, axis: tuple[int, ...], use: np.ndarray | None = None) -> np.ndarray:
    """Variance of ``values`` along ``axis`` (of those where ``use``), iteratively clipped at CLIP_SIGMA
    about the median."""
    use = np.ones(values.shape, bool) if use is None else use
    masked = np.where(use, values, np.nan)
    centre = np.nanmedian(masked, axis=axis, keepdims=True)
    sigma = 1.4826 * np.nanmedian(np.abs(masked - centre), axis=axis, keepdims=True)
    for _ in range(4):
        keep = use & (np.abs(values - centre) <= CLIP_SIGMA * np.maximum(sigma, 1e-6))
        n = np.maximum(keep.sum(axis=axis, keepdims=True), 2)
        centre = np.where(keep, values, 0).sum(axis=axis, keepdims=True) / n
        var = np.where(keep, (values - centre) ** 2, 0).sum(axis=axis, keepdims=True) / (n - 1)
        sigma = np.sqrt(var)
    return np.squeeze(sigma ** 2, axis=axis)


def check_plausible(value: float, source: str) -> float:
    """``value`` when it is an e-/ADU gain (PLAUSIBLE_GAIN), else GainError naming ``camera.gain``."""
    if not (np.isfinite(value) and PLAUSIBLE_GAIN[0] <= value <= PLAUSIBLE_GAIN[1]):
        raise GainError(f"gain estimate {value:.3g} e-/ADU from the {source} is implausible "
                        f"(expected {PLAUSIBLE_GAIN[0]}-{PLAUSIBLE_GAIN[1]}); set camera.gain in config.yaml")
    return float(value)


def _gain_from_variance(signal: np.ndarray | float, variance: np.ndarray | float,
                        read_noise_e: float | None) -> np.ndarray | float:
    """Solve variance = signal/g + (read_noise_e/g)^2 for g (ADU signal and variance, read noise in e-).

    g^2 V - g S - RN^2 = 0; with no read noise this is S / V.
    """
    rn2 = float(read_noise_e or 0.0) ** 2
    signal, variance = np.asarray(signal, float), np.asarray(variance, float)
    return (signal + np.sqrt(signal ** 2 + 4.0 * variance * rn2)) / (2.0 * variance)


def _centre(image: np.ndarray) -> np.ndarray:
    """The central TRANSFER_BOX x TRANSFER_BOX px of ``image`` (all of a smaller one)."""
    ny, nx = image.shape
    y0, x0 = max(0, (ny - TRANSFER_BOX) // 2), max(0, (nx - TRANSFER_BOX) // 2)
    return np.asarray(image)[y0:y0 + TRANSFER_BOX, x0:x0 + TRANSFER_BOX]


def photon_transfer_gain(flats: Sequence[np.ndarray], biases: Sequence[np.ndarray]) -> float:
    """Gain from two or more flats (of one filter) and two or more biases, by photon transfer.

    The flats are paired by level (neighbours in level order). For a pair a, b (bias subtracted,
    r = mean(a)/mean(b)) the difference d = a - r b has no pattern left and variance
    V_a + r^2 V_b = (S_a + r^2 S_b)/g + (1 + r^2) RN^2, with RN^2 (ADU^2) from the difference of two
    biases. So flats of different levels serve as well as a matched pair. The pairs' median is returned
    (not range-checked: see :func:`check_plausible`).
    """
    if len(flats) < 2 or len(biases) < 2:
        raise GainError(f"photon transfer needs two flats and two biases (have {len(flats)} and {len(biases)})")
    stack = np.asarray([_centre(b) for b in biases], np.float64)
    bias = stack.mean(axis=0)
    read_var = float(np.median([_clipped_var(stack[i] - stack[i + 1], (0, 1)) / 2.0
                                for i in range(len(stack) - 1)]))
    signal = [_centre(f).astype(np.float64) - bias for f in flats]
    signal.sort(key=lambda a: float(np.median(a)))
    gains = []
    for a, b in zip(signal[0::2], signal[1::2]):
        r = float(np.mean(a) / np.mean(b))
        d = a - r * b
        var = float(_clipped_var(d, (0, 1)))
        gains.append((np.mean(a) + r * r * np.mean(b)) / (var - (1.0 + r * r) * read_var))
    gain = float(np.median(gains))
    log.debug("photon transfer: read noise %.2f ADU, gains of %d flat pairs %s", np.sqrt(read_var), len(gains),
              ", ".join(f"{g:.3f}" for g in gains))
    return gain


def _tiles(data: np.ndarray) -> np.ndarray:
    """``data`` cut into SKY_TILE tiles, shape (ny, SKY_TILE, nx, SKY_TILE) (a partial edge tile is dropped);
    at most MAX_TILES a side, every k-th (the whole field, for the gradient, at ~1 Mpx of cost)."""
    ny, nx = (s // SKY_TILE for s in data.shape)
    if ny * nx < 4:
        raise GainError(f"frame {data.shape[1]}x{data.shape[0]} too small for a sky-noise gain estimate")
    tiles = np.asarray(data[:ny * SKY_TILE, :nx * SKY_TILE]).reshape(ny, SKY_TILE, nx, SKY_TILE)
    step = max(1, -(-max(ny, nx) // MAX_TILES))
    return tiles[::step, :, ::step, :].astype(np.float64)


def _sky_tiles(data: np.ndarray, flat: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(level, variance) of the frame's sky tiles (ADU, ADU^2, as the camera read them): tiles crowded by
    stars are left out.

    With the ``flat`` ``data`` was divided by, both are scaled back by the tile's mean flat: dividing
    removed the pixel-to-pixel response (which would add (level x PRNU)^2 to the differences: 25 % of
    the variance at 2 e-/ADU, 5000 ADU and 0.5 % PRNU), and the tile mean restores the camera's units.
    """
    img = _tiles(data)
    # Differences of horizontal neighbours within each tile: a gradient or vignetting cancels.
    diff = np.diff(img, axis=3)
    level = np.median(img, axis=(1, 3))
    noise = np.sqrt(_clipped_var(diff, (1, 3)) / 2.0)
    # Stars (and their wings) would add structure to the differences: pixels where the 3x3 mean stands
    # STAR_SIGMA of its own noise above the tile's level, grown by STAR_GROW px, are left out.
    ny, nx = level.shape
    smooth = uniform_filter(img.reshape(ny * SKY_TILE, nx * SKY_TILE), 3, mode="nearest")
    star = smooth.reshape(img.shape) > (level + STAR_SIGMA * noise / 3.0)[:, None, :, None]
    star = binary_dilation(star.reshape(smooth.shape), iterations=STAR_GROW).reshape(img.shape)
    sky_px = ~star
    level = np.nanmedian(np.where(sky_px, img, np.nan), axis=(1, 3))
    var = _clipped_var(diff, (1, 3), use=sky_px[..., 1:] & sky_px[..., :-1]) / 2.0
    if flat is not None:
        scale = _tiles(flat).mean(axis=(1, 3))
        level, var = level * scale, var * scale ** 2
    sky = (sky_px.mean(axis=(1, 3)) >= MIN_SKY_SHARE) & (var > 0)
    if sky.sum() < 4:
        raise GainError("too few star-free sky tiles for a sky-noise gain estimate")
    return level[sky], var[sky]


def sky_noise_gain(data: np.ndarray, read_noise_e: float | None = None, offset_known: bool = True,
                   flat: np.ndarray | None = None) -> float:
    """Gain from the sky noise of one science frame (ADU, linear in electrons; divided by ``flat`` if given).

    ``offset_known``: the frame's zero is the bias (a master bias or the overscan was subtracted); the gain
    is then each sky tile's level over its variance, less read noise (``read_noise_e``, e-, when known),
    median over tiles. Without a known bias the level holds an unknown pedestal: the gain is then the
    inverse slope of variance against level across the tiles (the sky's gradient gives the lever arm;
    pedestal and read noise drop out), refused (GainError) when the sky is too flat to give a slope.
    Not range-checked: see :func:`check_plausible`.
    """
    level, var = _sky_tiles(data, flat)
    if offset_known:
        if not np.median(level) > 0:
            raise GainError(f"sky level {np.median(level):.1f} ADU above the bias: no sky-noise gain estimate")
        return float(np.median(_gain_from_variance(level, var, read_noise_e)))
    from scipy.stats import theilslopes     # here: scipy.stats costs ~0.25 s to import, and only this needs it

    slope, _, low, high = theilslopes(var, level)
    if not slope > 0 or (high - low) > MAX_SLOPE_SPREAD * slope:
        raise GainError(f"the sky varies too little across the frame ({level.min():.0f}-{level.max():.0f} ADU) "
                        "to measure the gain without a bias; take bias frames or set camera.gain in config.yaml")
    return float(1.0 / slope)
