"""Hot pixels: find single-pixel spikes in a frame, repair them, and remember them per camera.

Why not a median filter: a 3x3 ``scipy.ndimage.median_filter`` costs ~1.9 s on a 4096 x 4096 frame,
more than the whole per-frame budget, and the seed's hand-written version padded with zeros, which
flagged (or missed) every pixel on the edges.  A hot pixel is a spike: it stands far above *all* of
its 8 neighbours, while even a sharp star (FWHM >= 2 px) has neighbours at >= half its peak.  So the
test is done in two stages:

1. whole frame, numpy slicing only: ``excess = value - max(8 neighbours)`` on a reflect-padded copy
   (reflection mirrors real neighbours onto the missing side, so edge rows, columns and the four
   corners are tested exactly like interior pixels; zeros or 'edge' copies would not be);
2. only for the few candidates above ``sigma`` x the sky noise: the local background is the median
   of the surrounding ``box`` x ``box`` pixels, the local noise adds the Poisson noise of the
   neighbours' level, and the spike must also be at least twice as high above its brightest
   neighbour as that neighbour is above the background (which a star's core never is).

Cosmic rays pass the same test and are repaired too; telling them apart is :class:`HotPixelMap`'s job
(hot pixels stay put over frames, cosmic rays and stars do not).
"""
from __future__ import annotations

import logging
import warnings

import numpy as np

from reduction.background import pixel_noise

log = logging.getLogger(__name__)

#: A spike must exceed its brightest neighbour by this many times that neighbour's own height above
#: the local background.  A star with FWHM >= 2 px reaches a ratio of at most ~1 (its neighbours
#: are >= 50% of its peak); a hot pixel on the sky reaches tens.
SPIKE_RATIO = 2.0

_NEIGHBOURS_8 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _reflect(index: np.ndarray, n: int) -> np.ndarray:
    """Mirror indices that fall off an axis of length ``n`` back inside (numpy 'reflect' rule)."""
    index = np.abs(index)
    return np.where(index > n - 1, 2 * (n - 1) - index, index)


def _neighbour_max(data: np.ndarray) -> np.ndarray:
    """Maximum of each pixel's 8 neighbours, with reflected (never zero) edges."""
    p = np.pad(data, 1, mode="reflect")
    h, w = data.shape
    out = p[0:h, 0:w].copy()
    for dy, dx in _NEIGHBOURS_8[1:]:
        np.maximum(out, p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w], out=out)
    return out


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

    nmax = _neighbour_max(data)
    excess = data - nmax
    ys, xs = np.nonzero(excess > sigma * noise)
    mask = np.zeros(data.shape, dtype=bool)
    if ys.size == 0:
        return mask

    ring = _gather(data, ys, xs, _ring_offsets(min(box, 2 * (min(data.shape) - 1) + 1)))
    bg = np.median(ring, axis=1)
    top = nmax[ys, xs]
    lift = np.maximum(top - bg, 0.0)
    local_noise = np.sqrt(noise * noise + lift / g)
    exc = excess[ys, xs]
    hot = (exc > sigma * local_noise) & (exc > SPIKE_RATIO * lift)
    mask[ys[hot], xs[hot]] = True
    log.debug("hot pixels: %d candidates, %d flagged (noise %.2f)", ys.size, int(hot.sum()), noise)
    return mask


def repair_pixels(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A float32 copy of ``data`` with masked pixels replaced by the median of their unmasked neighbours.

    The 8 neighbours are used first; a pixel whose neighbours are all masked (a cluster) takes the
    median of the unmasked pixels of its 5 x 5, then 9 x 9 box, and as a last resort the frame's median.
    """
    if mask.shape != data.shape:
        raise ValueError(f"mask shape {mask.shape} differs from data shape {data.shape}")
    out = np.array(data, dtype=np.float32, copy=True)
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return out
    todo = np.arange(ys.size)
    for box in (3, 5, 9):
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
        """Mark pixels more than ``sigma`` robust standard deviations above a master dark's median.

        Returns the number of newly marked pixels.  Works on a dark in ADU or ADU/s alike.
        """
        self._check(dark)
        sample = dark[:: max(1, dark.shape[0] // 512), :: max(1, dark.shape[1] // 512)]
        med = float(np.median(sample))
        std = 1.4826 * float(np.median(np.abs(sample - med)))
        if std <= 0:
            std = float(np.std(sample)) or 1e-12
        hot = dark > med + sigma * std
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
        """Plain numpy arrays for a checkpoint (``np.savez``-able)."""
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
