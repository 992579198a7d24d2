"""Hot pixels: find single-pixel spikes in a frame, repair them, and remember them per camera.

Why not a median filter: a 3x3 ``scipy.ndimage.median_filter`` costs ~1.9 s on a 4096 x 4096 frame,
more than the whole per-frame budget, and the seed's hand-written version padded with zeros, which
flagged (or missed) every pixel on the edges.  A hot pixel is a spike: it stands far above its
neighbours, while even a sharp star (FWHM >= 2 px) has neighbours at >= ~half its peak.  The test
runs in two stages:

1. whole frame, numpy slicing only: ``value - mean(8 neighbours) > sigma * noise`` on a
   reflect-padded copy (reflection mirrors real neighbours onto the missing side, so edge rows,
   columns and the four corners are tested exactly like interior pixels; zeros or 'edge' copies
   would not be).  This keeps every spike and, harmlessly, the cores of bright stars;
2. only for those candidates: the 8 neighbours are sorted, the local background is the median of
   the surrounding ``box`` x ``box`` pixels, and a pixel is hot when it exceeds its *second*
   brightest neighbour by ``sigma`` x the local noise (sky noise plus the Poisson noise of that
   neighbour's level) and by at least ``SPIKE_RATIO`` times that neighbour's height above the
   background.  The second brightest, not the brightest, so that two adjacent hot pixels are both
   found; a star's second brightest neighbour is still >= ~45 % of its peak pixel (ratio <= 0.83
   over all sub-pixel positions for FWHM 2 px). An undersampled star (FWHM 1-1.5 px) can pass
   that test, so a spike must also have almost nothing in its direct neighbours
   (:data:`CROSS_RATIO`): a star's profile puts light there, a hot pixel does not.

Cosmic rays pass the same test and are repaired too; telling them apart is :class:`HotPixelMap`'s job
(hot pixels stay put over frames, cosmic rays and stars do not).
"""
from __future__ import annotations

import logging
import warnings

import numpy as np

from reduction.background import pixel_noise

log = logging.getLogger(__name__)

#: A spike must exceed its second brightest neighbour by this many times that neighbour's own height
#: above the local background.  A star with FWHM >= 2 px reaches at most 0.83; a hot pixel on the
#: sky reaches tens.
SPIKE_RATIO = 2.0

#: ... and its direct neighbours (less the brightest of the four, which may be a hot neighbour) must
#: hold less than this fraction of its height: an undersampled star (FWHM 1-1.5 px, whose second
#: brightest neighbour can be a quarter of its peak) holds 0.2-0.7 there, a hot pixel about nothing.
CROSS_RATIO = 0.15

#: Rows per band in stage 1 (a band's temporaries, ~64 rows x 4096 x 4 bytes each, stay in cache).
_BAND_ROWS = 64

_NEIGHBOURS_8 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
#: Columns of the four direct neighbours in ``_NEIGHBOURS_8``.
_CROSS = [i for i, (dy, dx) in enumerate(_NEIGHBOURS_8) if abs(dy) + abs(dx) == 1]


def _reflect(index: np.ndarray, n: int) -> np.ndarray:
    """Mirror indices that fall off an axis of length ``n`` back inside (numpy 'reflect' rule)."""
    index = np.abs(index)
    return np.where(index > n - 1, 2 * (n - 1) - index, index)


def _candidates(data: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixels whose value exceeds the mean of their 8 neighbours by ``threshold`` (stage 1).

    Edges are reflected (never zero-padded).  The frame is processed in bands of rows so that the
    few temporaries stay in the CPU cache: the same arithmetic over whole 4096 x 4096 temporaries
    is memory-bound and ~3x slower.
    """
    h, w = data.shape
    ys_out, xs_out = [], []
    limit = np.float32(8.0 * threshold)
    for r0 in range(0, h, _BAND_ROWS):
        r1 = min(h, r0 + _BAND_ROWS)
        band = data[_reflect(np.arange(r0 - 1, r1 + 1), h)]
        p = np.pad(band, ((0, 0), (1, 1)), mode="reflect")
        rows = p[:-2] + p[1:-1]
        rows += p[2:]
        box = rows[:, :-2] + rows[:, 1:-1]
        box += rows[:, 2:]
        # value - (box - value) / 8 > threshold  <=>  9 value - box > 8 threshold
        box -= np.float32(9.0) * band[1:-1]
        ys, xs = np.nonzero(box < -limit)
        ys_out.append(ys + r0)
        xs_out.append(xs)
    return np.concatenate(ys_out), np.concatenate(xs_out)


def _gather(data: np.ndarray, ys: np.ndarray, xs: np.ndarray, offsets: list[tuple[int, int]]) -> np.ndarray:
    """Values at (ys + dy, xs + dx) for each offset, reflected at the edges: shape (N, len(offsets))."""
    h, w = data.shape
    oy = np.array([o[0] for o in offsets])
    ox = np.array([o[1] for o in offsets])
    yy = _reflect(ys[:, None] + oy[None, :], h)
    xx = _reflect(xs[:, None] + ox[None, :], w)
    return data[yy, xx]


def _ring_offsets(box: int) -> list[tuple[int, int]]:
    r = box // 2
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if (dy, dx) != (0, 0)]


def find_hot_pixels(data: np.ndarray, sigma: float = 6.0, box: int = 5, *,
                    gain: float | None = None, rms: float | None = None) -> np.ndarray:
    """Boolean mask of single-pixel spikes (hot pixels, cosmic-ray hits), edges and corners included.

    ``sigma``: detection threshold in units of the local noise.  ``box``: side of the neighbourhood
    whose median is the local background (odd, >= 3).  ``gain`` (e-/ADU) sets the Poisson term of
    the local noise; without it 1 e-/ADU is assumed, which overestimates the noise of a camera with
    a higher gain and so errs towards not flagging.  ``rms``: the sky noise per pixel if already
    known (else measured from pixel-to-pixel differences).
    """
    if data.ndim != 2 or min(data.shape) < 3:
        raise ValueError(f"need a 2-D image of at least 3 x 3 pixels, got shape {data.shape}")
    if box < 3 or box % 2 == 0:
        raise ValueError(f"box must be an odd integer >= 3, got {box}")
    noise = float(rms) if rms is not None else pixel_noise(data)
    g = float(gain) if gain else 1.0

    ys, xs = _candidates(data, sigma * noise)
    mask = np.zeros(data.shape, dtype=bool)
    ring = _ring_offsets(min(box, 2 * (min(data.shape) - 1) + 1))
    hot = _spikes(data, mask, ys, xs, sigma, noise, g, ring)
    mask[ys[hot], xs[hot]] = True
    # Second look next to what was found: a weak hot pixel beside a strong one is hidden in stage 1
    # (the strong one lifts its neighbour mean), but not once the strong one is set aside.
    ny, nx = _unflagged_neighbours(mask, ys[hot], xs[hot])
    more = _spikes(data, mask, ny, nx, sigma, noise, g, ring)
    mask[ny[more], nx[more]] = True
    log.debug("hot pixels: %d candidates, %d flagged (noise %.2f)", ys.size, int(mask.sum()), noise)
    return mask


def _unflagged_neighbours(mask: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = mask.shape
    oy = np.array([o[0] for o in _NEIGHBOURS_8])
    ox = np.array([o[1] for o in _NEIGHBOURS_8])
    yy = (ys[:, None] + oy[None, :]).ravel()
    xx = (xs[:, None] + ox[None, :]).ravel()
    inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    flat = np.unique(yy[inside] * w + xx[inside])
    flat = flat[~mask.ravel()[flat]]
    return flat // w, flat % w


def _spikes(data: np.ndarray, mask: np.ndarray, ys: np.ndarray, xs: np.ndarray, sigma: float,
            noise: float, gain: float, ring: list[tuple[int, int]]) -> np.ndarray:
    """Stage 2 for candidate pixels: which of them are spikes (see the module docstring).

    Neighbours off the frame or already flagged do not count (a reflected copy of a hot neighbour
    at an edge would otherwise hide the pixel next to it).
    """
    if ys.size == 0:
        return np.zeros(0, dtype=bool)
    h, w = data.shape
    oy = np.array([o[0] for o in _NEIGHBOURS_8])
    ox = np.array([o[1] for o in _NEIGHBOURS_8])
    yy = ys[:, None] + oy[None, :]
    xx = xs[:, None] + ox[None, :]
    inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    yy, xx = np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)
    neigh = np.where(inside & ~mask[yy, xx], data[yy, xx], -np.inf)
    second = np.sort(neigh, axis=1)[:, -2]
    bg = np.median(_gather(data, ys, xs, ring), axis=1)
    second = np.where(np.isfinite(second), second, bg)
    lift = np.maximum(second - bg, 0.0)
    exc = data[ys, xs] - second
    # The profile test: the three faintest of the four direct neighbours, above the background.
    cross = np.sort(np.where(np.isfinite(neigh[:, _CROSS]), neigh[:, _CROSS], bg[:, None]), axis=1)[:, :3]
    profile = np.maximum(cross - bg[:, None], 0.0).sum(axis=1)
    height = data[ys, xs] - bg
    return (exc > sigma * np.sqrt(noise * noise + lift / gain)) & (exc > SPIKE_RATIO * lift) \
        & (profile < CROSS_RATIO * height)


def repair_pixels(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A float32 copy of ``data`` with masked pixels replaced by the median of their unmasked neighbours.

    The 8 neighbours are used first; a pixel whose neighbours are all masked (a cluster) takes the
    median of the unmasked pixels of a growing box (5, 9, 17, 33 px), and as a last resort the
    frame's median.
    """
    if mask.shape != data.shape:
        raise ValueError(f"mask shape {mask.shape} differs from data shape {data.shape}")
    out = np.array(data, dtype=np.float32, copy=True)
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return out
    todo = np.arange(ys.size)
    for box in (3, 5, 9, 17, 33):
        if todo.size == 0:
            break
        offsets = _ring_offsets(box)
        vals = _gather(data, ys[todo], xs[todo], offsets).astype(np.float32)
        bad = _gather(mask, ys[todo], xs[todo], offsets)
        vals[bad] = np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows are handled next round
            med = np.nanmedian(vals, axis=1)
        ok = np.isfinite(med)
        out[ys[todo[ok]], xs[todo[ok]]] = med[ok]
        todo = todo[~ok]
    if todo.size:
        out[ys[todo], xs[todo]] = np.float32(np.median(data[~mask])) if (~mask).any() else 0.0
    return out


class HotPixelMap:
    """Per-camera (per frame shape) memory of hot pixels, built from frames and master darks.

    Hot pixels stay put while stars and cosmic rays move, so a pixel flagged in at least
    ``min_fraction`` of the frames (once ``min_frames`` frames are seen) is hot.  A pixel far above
    the master dark's level is hot from the start.  The state is plain numpy arrays, so a
    checkpoint round-trips exactly.
    """

    def __init__(self, shape: tuple[int, int], min_frames: int = 3, min_fraction: float = 0.5) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.min_frames = int(min_frames)
        self.min_fraction = float(min_fraction)
        self.counts = np.zeros(self.shape, dtype=np.uint16)
        self.n_frames = 0
        self.dark_mask = np.zeros(self.shape, dtype=bool)

    def _check(self, array: np.ndarray) -> None:
        if array.shape != self.shape:
            raise ValueError(f"shape {array.shape} does not match this camera's {self.shape}")

    def update(self, mask: np.ndarray) -> None:
        """Count one frame's flagged pixels (the output of :func:`find_hot_pixels`)."""
        self._check(mask)
        if self.n_frames >= np.iinfo(np.uint16).max:
            return  # 65535 frames are plenty of evidence; stop counting rather than overflow
        self.counts += mask.astype(np.uint16)
        self.n_frames += 1

    def add_dark(self, dark: np.ndarray, sigma: float = 5.0) -> int:
        """Mark the spikes of a master dark (in ADU or ADU/s): pixels ``sigma`` x its noise above their
        neighbours, found by :func:`find_hot_pixels`.

        Spikes, not everything above the dark's median: amplifier glow makes whole corners bright
        but smooth, and the dark subtraction handles it; flagging it would replace real sky.
        Returns the number of newly marked pixels.
        """
        self._check(dark)
        hot = find_hot_pixels(np.asarray(dark, dtype=np.float32), sigma=sigma)
        new = int(np.count_nonzero(hot & ~self.dark_mask))
        self.dark_mask |= hot
        log.info("hot-pixel map: %d pixels hot in the master dark (%d new)", int(hot.sum()), new)
        return new

    @property
    def mask(self) -> np.ndarray:
        """Pixels known to be hot: persistent over frames, or hot in a master dark."""
        out = self.dark_mask.copy()
        if self.n_frames >= self.min_frames:
            out |= self.counts >= self.min_fraction * self.n_frames
        return out

    def state(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays for a checkpoint (persisted by the caller)."""
        return {
            "shape": np.array(self.shape, dtype=np.int64),
            "counts": self.counts.copy(),
            "n_frames": np.array(self.n_frames, dtype=np.int64),
            "dark_mask": self.dark_mask.copy(),
            "params": np.array([self.min_frames, self.min_fraction], dtype=np.float64),
        }

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "HotPixelMap":
        """Rebuild a map from :meth:`state` output, exactly."""
        min_frames, min_fraction = (float(v) for v in state["params"])
        out = cls(tuple(int(v) for v in state["shape"]), int(min_frames), min_fraction)
        out.counts = np.array(state["counts"], dtype=np.uint16)
        out.n_frames = int(state["n_frames"])
        out.dark_mask = np.array(state["dark_mask"], dtype=bool)
        return out
