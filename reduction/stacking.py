"""Incremental, outlier-rejecting stack of registered frames, one per (target, filter).

Why incremental: the service adds each frame as it arrives.  Re-stacking all N
frames with a sigma clip every time (the student pipeline's way) costs O(N) per
frame and keeps N frames in memory; this accumulator costs the same for frame 50
as for frame 2 and holds a fixed set of planes.

State (per pixel; ``x = data * scale`` is a frame's contribution, ``v =
noise_var * scale**2`` its variance, ``w = weight`` its quality weight):

- ``sw, swx, swwv`` (float32): sums of w, w*x and w**2*v over the accepted
  contributions, so the weighted mean is swx/sw and its variance swwv/sw**2;
- ``count`` (uint16): accepted contributions;
- ``xmax, vmax`` (float32) and ``mslot`` (uint16): the largest accepted
  contribution, its variance and which frame gave it (the "max candidate").

Outlier rejection happens in two places, which together are order-free enough
for the first frames and cheap for all of them:

1. *At add time*, once a pixel has two accepted contributions, the new value is
   compared with the current clean mean: it is rejected (not summed) when
   ``|x - m| > reject_sigma * sqrt(v + var(m) + (signal_tolerance * m)**2
   + (gradient_tolerance * |grad m|)**2)``.
   The last two terms are the room given to real differences between frames
   near stars (seeing changes the peak of a star by tens of per cent and its
   wings by more; sub-pixel resampling differences), so that rejection never
   eats star light and star fluxes stay unbiased; far from stars only the
   noise counts.  A cosmic ray on top of a star can therefore survive: the
   price of unbiased photometry.
2. *At read-out* (``image()``), the max candidate is tested against the mean of
   the other contributions with the same criterion and left out when it is an
   outlier.  This is what cleans the first two frames of a pixel, which enter
   unconditionally because there is nothing yet to compare them with: a cosmic
   ray or a satellite trail in frame 1 is the max candidate of its pixels and is
   taken out as soon as a second frame exists.  The clean mean of step 1 is this
   same read-out, so frame 3 is already judged against a clean reference.

Cosmic rays, satellite trails and aircraft lights are positive, so one
candidate per pixel suffices unless two such events hit the same pixel in the
first two frames covering it; negative outliers are caught from the third
frame on (hot/dead pixels are removed upstream).

``remove()`` subtracts the frame's accepted contributions (its pixels rejected
at add time are remembered as a sparse index list, the only per-frame state:
a few hundred to a few thousand int32 per frame) and clears the max candidate
where the frame held it.  The result equals never having added the frame to
float32 rounding, except in pixels where the removed frame changed a later
frame's accept/reject decision at the 5-sigma boundary (of order 1e-6 of the
pixels) or where it held the max candidate while a second outlier also entered
unconditionally (two outliers in the first two frames of a pixel).

Where no frame contributes, ``image()`` is 0.0, ``variance()`` +inf and
``nframes()`` 0.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: Marks "no max candidate" in the uint16 slot plane.
_NO_SLOT = np.iinfo(np.uint16).max
#: Rows per processing block: keeps the temporaries small enough to stay in cache.
_BLOCK_ROWS = 256
_FORMAT_VERSION = 1


class StackAccumulator:
    """Weighted-mean stack with incremental outlier rejection (see module docstring)."""

    def __init__(self, shape: tuple[int, int], reject_sigma: float = 5.0,
                 signal_tolerance: float = 0.25, gradient_tolerance: float = 0.5) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.reject_sigma = float(reject_sigma)
        self.signal_tolerance = float(signal_tolerance)
        self.gradient_tolerance = float(gradient_tolerance)
        self._sw = np.zeros(self.shape, np.float32)
        self._swx = np.zeros(self.shape, np.float32)
        self._swwv = np.zeros(self.shape, np.float32)
        self._count = np.zeros(self.shape, np.uint16)
        self._xmax = np.full(self.shape, -np.inf, np.float32)
        self._vmax = np.zeros(self.shape, np.float32)
        self._mslot = np.full(self.shape, _NO_SLOT, np.uint16)
        self._satcount: np.ndarray | None = None      # allocated at the first saturation mask
        # weight of the frame in each slot; index _NO_SLOT -> 0 so lookups need no masking
        self._slot_w = np.zeros(int(_NO_SLOT) + 1, np.float32)
        self._slots: dict[str, int] = {}
        self._frame_ids: list[str] = []
        self._rejected: dict[str, np.ndarray] = {}
        self._cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    # ------------------------------------------------------------------ public API
    @property
    def frame_ids(self) -> list[str]:
        """Identifiers of the stacked frames, in the order they were added."""
        return list(self._frame_ids)

    @property
    def n_frames(self) -> int:
        """Number of stacked frames."""
        return len(self._frame_ids)

    def add(self, frame_id: str, data: np.ndarray, *, noise_var: float | np.ndarray,
            valid: np.ndarray | None, scale: float = 1.0, weight: float = 1.0,
            saturated: np.ndarray | None = None) -> None:
        """Add a registered, background-subtracted frame (ADU) to the stack in place.

        ``scale`` multiplies the data (transparency / exposure normalisation), ``noise_var``
        is the variance of ``data`` before scaling (scalar or per-pixel array), ``weight`` the
        frame's quality weight, ``valid`` the pixels that carry data (None: all),
        ``saturated`` the frame's saturated pixels on the reference grid.
        """
        frame_id = str(frame_id)
        if frame_id in self._slots:
            raise ValueError(f"frame {frame_id!r} is already in the stack")
        if weight <= 0 or not np.isfinite(weight):
            raise ValueError(f"weight must be positive and finite, got {weight}")
        slot = self._free_slot()
        self._slot_w[slot] = np.float32(weight)
        rejected: list[np.ndarray] = []
        for r0, r1, x, v, ok in self._blocks(data, noise_var, valid, scale):
            rej = self._reject_block(r0, r1, x, v) & ok
            acc = ok & ~rej
            self._accumulate(r0, r1, x, v, acc, np.float32(weight), +1)
            bs = np.s_[r0:r1]
            newmax = acc & (x > self._xmax[bs])
            self._xmax[bs][newmax] = x[newmax]
            self._vmax[bs][newmax] = (v[newmax] if np.ndim(v) else v)
            self._mslot[bs][newmax] = slot
            if rej.any():
                rejected.append(np.flatnonzero(rej).astype(np.int64) + r0 * self.shape[1])
        self._rejected[frame_id] = (np.concatenate(rejected).astype(np.int32) if rejected
                                    else np.empty(0, np.int32))
        self._update_saturation(saturated, +1)
        self._slots[frame_id] = slot
        self._frame_ids.append(frame_id)
        self._cache = None
        log.debug("stacked %s: %d pixels rejected, %d frames", frame_id,
                  len(self._rejected[frame_id]), self.n_frames)

    def remove(self, frame_id: str, data: np.ndarray, *, noise_var: float | np.ndarray,
               valid: np.ndarray | None, scale: float = 1.0, weight: float = 1.0,
               saturated: np.ndarray | None = None) -> None:
        """Take a frame out again; pass exactly the arguments given to :meth:`add`."""
        frame_id = str(frame_id)
        if frame_id not in self._slots:
            raise KeyError(f"frame {frame_id!r} is not in the stack")
        slot = self._slots[frame_id]
        rej_flat = np.zeros(self.shape[0] * self.shape[1], bool)
        rej_flat[self._rejected[frame_id]] = True
        rej_plane = rej_flat.reshape(self.shape)
        for r0, r1, x, v, ok in self._blocks(data, noise_var, valid, scale):
            acc = ok & ~rej_plane[r0:r1]
            self._accumulate(r0, r1, x, v, acc, np.float32(weight), -1)
            bs = np.s_[r0:r1]
            held = self._mslot[bs] == slot
            self._xmax[bs][held] = -np.inf
            self._vmax[bs][held] = 0.0
            self._mslot[bs][held] = _NO_SLOT
        self._update_saturation(saturated, -1)
        self._slot_w[slot] = 0.0
        del self._slots[frame_id], self._rejected[frame_id]
        self._frame_ids.remove(frame_id)
        self._cache = None

    def image(self) -> np.ndarray:
        """The stack: float32 weighted mean of the accepted contributions (ADU per frame)."""
        return self._combined()[0].copy()

    def variance(self) -> np.ndarray:
        """Per-pixel variance of :meth:`image` (ADU**2) from the frames' ``noise_var``.

        It is the variance of the frames' own pixels; resampling smooths pixel noise but keeps
        the variance of sums over apertures, which is what photometry errors need.
        """
        return self._combined()[1].copy()

    def nframes(self) -> np.ndarray:
        """Per-pixel number of frames contributing to :meth:`image` (uint16)."""
        return self._combined()[2].copy()

    def saturated(self) -> np.ndarray:
        """Pixels saturated in any stacked frame (OR of the frames' masks)."""
        if self._satcount is None:
            return np.zeros(self.shape, bool)
        return self._satcount > 0

    def rejected_pixels(self, frame_id: str) -> int:
        """Number of this frame's pixels rejected as outliers when it was added."""
        return int(len(self._rejected[str(frame_id)]))

    def nbytes(self) -> int:
        """Memory held by the accumulator's planes and per-frame lists (bytes)."""
        planes = [self._sw, self._swx, self._swwv, self._count, self._xmax, self._vmax,
                  self._mslot, self._slot_w]
        if self._satcount is not None:
            planes.append(self._satcount)
        return sum(p.nbytes for p in planes) + sum(r.nbytes for r in self._rejected.values())

    def save(self, path: str | os.PathLike) -> None:
        """Write the exact state to ``path`` (.npz) atomically: temp file in the same folder + rename."""
        path = Path(path)
        ids = self._frame_ids
        rej = [self._rejected[f] for f in ids]
        arrays = dict(
            version=np.array(_FORMAT_VERSION), shape=np.array(self.shape),
            params=np.array([self.reject_sigma, self.signal_tolerance, self.gradient_tolerance]),
            sw=self._sw, swx=self._swx, swwv=self._swwv, count=self._count,
            xmax=self._xmax, vmax=self._vmax, mslot=self._mslot, slot_w=self._slot_w,
            frame_ids=np.array(ids, dtype=str), slots=np.array([self._slots[f] for f in ids], np.int64),
            rej_index=np.concatenate(rej) if rej else np.empty(0, np.int32),
            rej_len=np.array([len(r) for r in rej], np.int64))
        if self._satcount is not None:
            arrays["satcount"] = self._satcount
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> StackAccumulator:
        """Restore an accumulator written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != _FORMAT_VERSION:
                raise ValueError(f"{path}: unsupported stack state version {int(z['version'])}")
            self = cls(tuple(int(n) for n in z["shape"]), *(float(p) for p in z["params"]))
            for name in ("sw", "swx", "swwv", "count", "xmax", "vmax", "mslot", "slot_w"):
                setattr(self, f"_{name}", z[name].copy())
            if "satcount" in z:
                self._satcount = z["satcount"].copy()
            ids = [str(f) for f in z["frame_ids"]]
            self._frame_ids = ids
            self._slots = dict(zip(ids, (int(s) for s in z["slots"]), strict=True))
            bounds = np.concatenate([[0], np.cumsum(z["rej_len"])]).astype(np.int64)
            rej_index = z["rej_index"]
            self._rejected = {f: rej_index[bounds[i]:bounds[i + 1]].copy() for i, f in enumerate(ids)}
        return self

    # ------------------------------------------------------------------ internals
    def _free_slot(self) -> int:
        used = set(self._slots.values())
        for slot in range(int(_NO_SLOT)):
            if slot not in used:
                return slot
        raise RuntimeError("stack holds the maximum number of frames (65535)")

    def _blocks(self, data: np.ndarray, noise_var: float | np.ndarray, valid: np.ndarray | None,
                scale: float):
        """Yield (r0, r1, x, v, ok) row blocks: scaled data, scaled variance, usable pixels."""
        if data.shape != self.shape:
            raise ValueError(f"frame shape {data.shape} differs from the stack's {self.shape}")
        s = np.float32(scale)
        nv = np.asarray(noise_var, np.float32)
        for r0 in range(0, self.shape[0], _BLOCK_ROWS):
            r1 = min(r0 + _BLOCK_ROWS, self.shape[0])
            x = data[r0:r1].astype(np.float32) * s
            v = nv[r0:r1] * (s * s) if nv.ndim else nv * (s * s)
            ok = np.isfinite(x)
            if valid is not None:
                ok &= valid[r0:r1]
            yield r0, r1, x, v, ok

    def _accumulate(self, r0: int, r1: int, x: np.ndarray, v: np.ndarray | np.float32,
                    acc: np.ndarray, w: np.float32, sign: int) -> None:
        """Add (sign=+1) or subtract (-1) the accepted contributions of one block."""
        bs = np.s_[r0:r1]
        ufunc = np.add if sign > 0 else np.subtract
        ufunc(self._sw[bs], w, out=self._sw[bs], where=acc)
        ufunc(self._swx[bs], w * x, out=self._swx[bs], where=acc)
        ufunc(self._swwv[bs], (w * w) * v, out=self._swwv[bs], where=acc)
        ufunc(self._count[bs], np.uint16(1), out=self._count[bs], where=acc)
        if sign < 0:
            # a pixel back to no contributions gets exact zeros, not rounding residue
            empty = acc & (self._count[bs] == 0)
            for plane in (self._sw, self._swx, self._swwv):
                plane[bs][empty] = 0.0

    def _structure(self, m: np.ndarray) -> np.ndarray:
        """Variance allowance for real frame-to-frame differences of the signal ``m``.

        ``signal_tolerance * m`` covers a star's peak changing with the seeing;
        ``gradient_tolerance * |grad m|`` (px) covers its wings and any sub-pixel misregistration,
        where the signal changes fastest.  Both vanish on blank sky, so there the
        rejection is set by the noise alone.  The gradient uses the rows of ``m`` only: callers
        pass one extra row on each side and trim it.
        """
        g = np.zeros_like(m)
        g[:, 1:-1] = np.abs(m[:, 2:] - m[:, :-2])
        g[1:-1] += np.abs(m[2:] - m[:-2])
        g *= 0.5 * self.gradient_tolerance
        return (self.signal_tolerance * m) ** 2 + g * g

    def _clean_block(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mean, its variance and the contributor count of rows r0:r1, max candidate tested."""
        a, b = max(r0 - 1, 0), min(r1 + 1, self.shape[0])      # one row of context for the gradient
        bs = np.s_[a:b]
        sw, swx, swwv, cnt = self._sw[bs], self._swx[bs], self._swwv[bs], self._count[bs]
        xm, vm = self._xmax[bs], self._vmax[bs]
        wm = self._slot_w[self._mslot[bs]]
        has = (cnt >= 2) & (wm > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean_all = np.where(cnt > 0, swx / sw, 0.0).astype(np.float32)
            sw_r = sw - wm
            mean_r = np.where(has, (swx - wm * np.where(has, xm, 0)) / sw_r, mean_all).astype(np.float32)
            var_r = (swwv - wm * wm * vm) / (sw_r * sw_r)
            dev = xm - mean_r
            tol = vm + var_r + self._structure(mean_r)
            drop = has & (dev > 0) & (dev * dev > self.reject_sigma ** 2 * tol)
            mean = np.where(drop, mean_r, mean_all)
            var = np.where(drop, var_r, swwv / (sw * sw))
        n = cnt - drop.astype(np.uint16)
        var[n == 0] = np.inf
        trim = np.s_[r0 - a:r0 - a + (r1 - r0)]
        return mean[trim].astype(np.float32), var[trim].astype(np.float32), n[trim]

    def _reject_block(self, r0: int, r1: int, x: np.ndarray, v: np.ndarray | np.float32) -> np.ndarray:
        """New-frame pixels deviating from the clean mean by more than reject_sigma (count >= 2)."""
        a, b = max(r0 - 1, 0), min(r1 + 1, self.shape[0])
        mean, var, _ = self._clean_block(a, b)
        structure = self._structure(mean)
        trim = np.s_[r0 - a:r0 - a + (r1 - r0)]
        mean, var, structure = mean[trim], var[trim], structure[trim]
        established = self._count[r0:r1] >= 2
        dev = x - mean
        tol = v + var + structure
        with np.errstate(invalid="ignore"):
            return established & (dev * dev > self.reject_sigma ** 2 * tol)

    def _combined(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._cache is None:
            img = np.empty(self.shape, np.float32)
            var = np.empty(self.shape, np.float32)
            n = np.empty(self.shape, np.uint16)
            for r0 in range(0, self.shape[0], _BLOCK_ROWS):
                r1 = min(r0 + _BLOCK_ROWS, self.shape[0])
                img[r0:r1], var[r0:r1], n[r0:r1] = self._clean_block(r0, r1)
            self._cache = (img, var, n)
        return self._cache

    def _update_saturation(self, saturated: np.ndarray | None, sign: int) -> None:
        if saturated is None:
            return
        if self._satcount is None:
            self._satcount = np.zeros(self.shape, np.uint16)
        sat = np.asarray(saturated, bool)
        if sign > 0:
            self._satcount[sat] += 1
        else:
            np.subtract(self._satcount, 1, out=self._satcount, where=sat & (self._satcount > 0))
