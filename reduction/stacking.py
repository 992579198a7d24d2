"""Incremental, outlier-rejecting stack of registered frames, one per (target, filter).

Why incremental: the service adds each frame as it arrives. Re-stacking all N
frames with a sigma clip every time costs O(N) per frame and keeps N frames in
memory; this accumulator costs the same for frame 50 as for frame 2 and holds a
fixed set of planes.

State per pixel (``x = data * scale`` is a frame's contribution, ``v =
noise_var * scale**2`` its variance, ``w`` its weight): float32 sums ``sw, swx,
swwv`` (weighted mean swx/sw, variance swwv/sw**2), a uint16 ``count``, and the
largest accepted contribution with its variance and frame slot (the "max
candidate").

Rejection, in two places:

1. At add time, once a pixel has two contributions, a new value is rejected
   when ``|x - m| > reject_sigma * sqrt(v + var(m) + (signal_tolerance * r)**2
   + (gradient_tolerance * |grad r|)**2)``, r being the mean without the max
   candidate. The last two terms leave room for real differences near stars
   (seeing changes a star's peak by tens of per cent; sub-pixel resampling), so
   rejection never eats star light; far from stars only the noise counts. The
   price: a cosmic ray on top of a star can survive.
   Seeing is matched before this test when the frames' FWHMs are known
   (:meth:`StackAccumulator._match_seeing`): a frame twice as sharp as the stack
   has star peaks 4x the stack's, which no tolerance that still rejects a trail
   over faint stars allows (0.25 lost 2-10 % of bright-star flux; 0.6 kept the
   flux but let a trail through at 9.6 sigma).
2. After every add, each pixel's max candidate is tested against the
   mean of the others (seeing matched the same way) and left out of ``image()``
   when it is an outlier. This
   cleans the first two frames, which enter unconditionally: a cosmic ray or a
   satellite trail in frame 1 is its pixels' max candidate and goes as soon as
   a second frame exists.

Growing the rejection (as IRAF imcombine's ``grow``): a satellite trail is
PSF-broadened, so the rejected pixels of a frame are grown by ``grow_radius``
px before the frame is accepted. Only groups of at least ``grow_min_pixels``
connected rejected pixels seed a grow, and only on blank sky (clean mean and
gradient within ``_QUIET_SIGMA``), so star light stays in. For a trail in the
first two frames only the max candidate is known, so the grow removes most,
not all, of its wings (a residual of ~3-4 sigma of the line mean against ~12
without the grow, < 0.5 for a trail in a later frame).

Cost: both tests first apply a cheap full-frame bound (noise alone) and
evaluate the full tolerance only on the few pixels that pass it; an add is a
fixed number of passes over the planes whatever N, and ``image()`` one
division plus a sparse patch.

Where no frame contributes, ``image()`` is 0.0, ``variance()`` +inf and
``nframes()`` 0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

import numpy as np
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

from reduction.kernels import GAUSSIAN_TRUNCATE, gaussian_blur

log = logging.getLogger(__name__)

#: Values at flat pixel indices (None: the whole frame, flat), and where they are usable: a frame's,
#: or a reference's.
_Values = Callable[[np.ndarray | None], tuple[np.ndarray, np.ndarray]]

#: Marks "no max candidate" in the uint16 slot plane.
_NO_SLOT = np.iinfo(np.uint16).max
#: Rows per processing block: keeps the temporaries small enough to stay in cache.
_BLOCK_ROWS = 256
#: Version 2 added grow_radius and grow_min_pixels to the saved parameters (version 1 loads with
#: their defaults); version 3 keeps each frame's count of rejected pixels, not their indices;
#: version 4 each frame's FWHM (older states load with every FWHM unknown: compared unmatched).
_FORMAT_VERSION = 4
#: Frames whose FWHM is within this fraction of the reference's are compared as they are: the
#: peak changes by at most ~10 %, well inside the signal tolerance.
_SEEING_MATCH = 0.05
#: Gaussian FWHM per sigma.
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: A sharper frame's star-core excess is allowed where the reference is concave (a peak) by this
#: many sigma of its Laplacian's noise.  Why significance: on faint stars the Laplacian is noise,
#: and an allowance there would let a trail over them through; their cores carry no flux that
#: matters for the bias.
_PEAK_SIGMA = 2.0
#: The matching blur is evaluated at the candidates alone while they need fewer lookups than this
#: fraction of the frame's pixels; beyond it, two full-frame OpenCV blurs are cheaper.
_SPARSE_BLUR_FRACTION = 0.1
#: The matching blur's sigma is rounded to this step (px): frames of about the same seeing then share
#: one full-frame blur of the reference within an add; the error is < 1 % of the blur.
_SIGMA_STEP = 0.02
#: A grown drop needs its max candidate this many sigma above the other frames.  Why: leaving a
#: pixel's max out biases its mean low, and 1-2 % of pure-noise neighbours clear 2.25 sigma; only a
#: clear excess is trail light.  The price: the faintest wings of a trail in the first two frames.
_GROW_DROP_SIGMA = 2.25
#: ... and lies within this radius (px, at most grow_radius): beyond it the wings are mostly below
#: 2 sigma, and a wider ring drops more noise than trail.
_GROW_DROP_RADIUS = 2.0
#: Where the grow may act: clean mean and its gradient within this many sigma of zero (blank sky).
_QUIET_SIGMA = 2.0
#: 8-connectivity half-neighbourhood (dy, dx): each edge of the pixel graph once.
_HALF_NEIGHBOURS = ((0, 1), (1, -1), (1, 0), (1, 1))


def _disk_offsets(radius: float) -> list[tuple[int, int]]:
    """Offsets (dy, dx) with 0 < dy**2 + dx**2 <= radius**2: the grow's disk, centre excluded."""
    r = int(math.floor(radius))
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)
            if 0 < dy * dy + dx * dx <= radius ** 2]


class StackAccumulator:
    """Weighted-mean stack with incremental outlier rejection (see module docstring)."""

    def __init__(self, shape: tuple[int, int], reject_sigma: float = 5.0,
                 signal_tolerance: float = 0.25, gradient_tolerance: float = 0.2,
                 grow_radius: float = 3.0, grow_min_pixels: int = 3) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.reject_sigma = float(reject_sigma)
        self.signal_tolerance = float(signal_tolerance)
        self.gradient_tolerance = float(gradient_tolerance)
        self.grow_radius = float(grow_radius)
        self.grow_min_pixels = int(grow_min_pixels)
        self._disk = _disk_offsets(self.grow_radius)
        self._drop_disk = _disk_offsets(min(self.grow_radius, _GROW_DROP_RADIUS))
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
        # FWHM (px) of the frame in each slot; NaN: unknown (then its comparisons are unmatched)
        self._slot_fwhm = np.full(int(_NO_SLOT) + 1, np.nan, np.float32)
        self._slots: dict[str, int] = {}
        self._frame_ids: list[str] = []
        #: each frame's number of rejected pixels (outliers and their grow), for the frame log
        self._rejected: dict[str, int] = {}
        #: flat indices of the pixels whose max candidate is currently left out (an outlier)
        self._drop = np.empty(0, np.int64)

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
            saturated: np.ndarray | None = None, fwhm: float | None = None) -> None:
        """Add a registered, background-subtracted frame (ADU) to the stack in place.

        ``scale`` multiplies the data (transparency / exposure normalisation), ``noise_var``
        is the variance of ``data`` before scaling (scalar or per-pixel array), ``weight`` the
        frame's quality weight, ``valid`` the pixels that carry data (None: all),
        ``saturated`` the frame's saturated pixels on the reference grid, ``fwhm`` its star
        FWHM (px; None or NaN: unknown), with which the rejection matches the seeing of the
        frame and the stack (see :meth:`_match_seeing`).
        """
        frame_id = str(frame_id)
        if frame_id in self._slots:
            raise ValueError(f"frame {frame_id!r} is already in the stack")
        if weight <= 0 or not np.isfinite(weight):
            raise ValueError(f"weight must be positive and finite, got {weight}")
        slot = self._free_slot()
        w = np.float32(weight)
        fwhm = float(fwhm) if fwhm is not None and np.isfinite(fwhm) and fwhm > 0 else math.nan
        # decide all rejections against the state before this frame, then accumulate
        rejected = self._grow_rejected(self._reject(data, noise_var, valid, scale, fwhm, slot), data,
                                       noise_var, valid, scale)
        rej_flat = np.zeros(self.shape[0] * self.shape[1], bool)
        rej_flat[rejected] = True
        rej_plane = rej_flat.reshape(self.shape)
        self._slot_w[slot] = w
        self._slot_fwhm[slot] = fwhm
        for r0, r1, x, v, ok in self._blocks(data, noise_var, valid, scale):
            bs = np.s_[r0:r1]
            acc = ok & ~rej_plane[bs]
            self._accumulate(bs, x, v, acc, w)
            newmax = acc & (x > self._xmax[bs])
            np.copyto(self._xmax[bs], x, where=newmax)
            np.copyto(self._vmax[bs], v, where=newmax)
            np.copyto(self._mslot[bs], np.uint16(slot), where=newmax)
        self._rejected[frame_id] = int(len(rejected))
        self._update_drops()
        self._update_saturation(saturated)
        self._slots[frame_id] = slot
        self._frame_ids.append(frame_id)
        log.debug("stacked %s: %d pixels rejected, %d frames", frame_id, self._rejected[frame_id], self.n_frames)

    def rescale(self, factor: float) -> None:
        """Make the stack the one every frame's ``scale * factor`` and ``weight / factor**2`` would have
        given (the weights of inverse-variance weighting, 1/(sky_rms * scale)**2, do just that).

        Why: when a group's flux reference moves, all its frames' scales move together; this costs
        one pass over the planes instead of re-adding every frame.  Every plane is homogeneous in
        the factor (x and the means by f; v, the variances and the structure allowance by f**2;
        sw and the slot weights by 1/f**2, swx by 1/f, swwv by 1/f**2), and so is every rejection
        and grow test: both sides of each scale alike, so the same pixels are rejected and dropped
        (up to float32 rounding at a threshold) and counts, slots, saturation, FWHMs, the
        rejected-pixel counts and the dropped max candidates stay as they are.
        """
        f = float(factor)
        if not (f > 0 and math.isfinite(f)):
            raise ValueError(f"factor must be positive and finite, got {factor}")
        w, f2 = np.float32(1.0 / (f * f)), np.float32(f * f)
        for plane, by in ((self._sw, w), (self._swx, np.float32(1.0 / f)), (self._swwv, w),
                          (self._xmax, np.float32(f)), (self._vmax, f2), (self._slot_w, w)):
            plane *= by

    def image(self) -> np.ndarray:
        """The stack: float32 weighted mean of the accepted contributions (ADU per frame)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            img = self._swx / self._sw
        img[self._count == 0] = 0.0             # a pass less than np.where: the same values
        if len(self._drop):
            img.ravel()[self._drop] = self._stats_at(self._drop)[0]
        return img

    def variance(self) -> np.ndarray:
        """Per-pixel variance of :meth:`image` (ADU**2) from the frames' ``noise_var``.

        It is the variance of the frames' own pixels; resampling smooths pixel noise but keeps
        the variance of sums over apertures, which is what photometry errors need.
        """
        with np.errstate(divide="ignore", invalid="ignore"):
            var = self._swwv / (self._sw * self._sw)
        var[self._count == 0] = np.inf
        if len(self._drop):
            var.ravel()[self._drop] = self._stats_at(self._drop)[1]
        return var

    def nframes(self) -> np.ndarray:
        """Per-pixel number of frames contributing to :meth:`image` (uint16)."""
        n = self._count.copy()
        n.ravel()[self._drop] -= 1
        return n

    def saturated(self) -> np.ndarray:
        """Pixels saturated in any stacked frame (OR of the frames' masks)."""
        if self._satcount is None:
            return np.zeros(self.shape, bool)
        return self._satcount > 0

    def rejected_pixels(self, frame_id: str) -> int:
        """Number of this frame's pixels rejected when it was added (outliers and their grow)."""
        return self._rejected[str(frame_id)]

    def nbytes(self) -> int:
        """Memory held by the accumulator's planes (bytes)."""
        planes = [self._sw, self._swx, self._swwv, self._count, self._xmax, self._vmax,
                  self._mslot, self._slot_w, self._slot_fwhm]
        if self._satcount is not None:
            planes.append(self._satcount)
        return sum(p.nbytes for p in planes)

    def state(self) -> dict[str, np.ndarray]:
        """The exact state as named arrays (the caller persists them; see :meth:`from_state`)."""
        ids = self._frame_ids
        arrays = dict(
            version=np.array(_FORMAT_VERSION), shape=np.array(self.shape),
            params=np.array([self.reject_sigma, self.signal_tolerance, self.gradient_tolerance,
                             self.grow_radius, self.grow_min_pixels]),
            sw=self._sw, swx=self._swx, swwv=self._swwv, count=self._count,
            xmax=self._xmax, vmax=self._vmax, mslot=self._mslot, slot_w=self._slot_w, slot_fwhm=self._slot_fwhm,
            frame_ids=np.array(ids, dtype=str), slots=np.array([self._slots[f] for f in ids], np.int64),
            rej_len=np.array([self._rejected[f] for f in ids], np.int64))
        if self._satcount is not None:
            arrays["satcount"] = self._satcount
        return arrays

    @classmethod
    def from_state(cls, z: Mapping[str, np.ndarray]) -> StackAccumulator:
        """Restore an accumulator from :meth:`state`'s arrays (copied: the source may be a closing npz)."""
        if int(z["version"]) not in (1, 2, 3, _FORMAT_VERSION):
            raise ValueError(f"unsupported stack state version {int(z['version'])}")
        self = cls(tuple(int(n) for n in z["shape"]), *(float(p) for p in z["params"]))
        for name in ("sw", "swx", "swwv", "count", "xmax", "vmax", "mslot", "slot_w", "slot_fwhm"):
            if name in z:                       # slot_fwhm from version 4 on; before, all unknown
                setattr(self, f"_{name}", np.array(z[name]))
        if "satcount" in z:
            self._satcount = np.array(z["satcount"])
        ids = [str(f) for f in z["frame_ids"]]
        self._frame_ids = ids
        self._slots = dict(zip(ids, (int(s) for s in z["slots"]), strict=True))
        self._rejected = dict(zip(ids, (int(n) for n in z["rej_len"]), strict=True))
        self._update_drops()
        return self

    # ------------------------------------------------------------------ internals
    def _free_slot(self) -> int:
        slot = max(self._slots.values(), default=-1) + 1
        if slot >= int(_NO_SLOT):
            raise RuntimeError("stack holds the maximum number of frames (65535)")
        return slot

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

    def _accumulate(self, bs: slice, x: np.ndarray, v: np.ndarray | np.float32,
                    acc: np.ndarray, w: np.float32) -> None:
        """Add the accepted contributions of one block of rows."""
        np.add(self._sw[bs], w, out=self._sw[bs], where=acc)
        np.add(self._swx[bs], w * x, out=self._swx[bs], where=acc)
        np.add(self._swwv[bs], (w * w) * v, out=self._swwv[bs], where=acc)
        np.add(self._count[bs], np.uint16(1), out=self._count[bs], where=acc)

    def _stats_at(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """At flat pixel indices: (mean, variance) without the max candidate, and with it.

        Where there is no candidate or fewer than two contributions, both pairs are the plain
        weighted mean and its variance.
        """
        sw, swx, swwv = self._sw.ravel()[idx], self._swx.ravel()[idx], self._swwv.ravel()[idx]
        cnt, xm, vm = self._count.ravel()[idx], self._xmax.ravel()[idx], self._vmax.ravel()[idx]
        wm = self._slot_w[self._mslot.ravel()[idx]]
        has = (cnt >= 2) & (wm > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean_all = np.where(cnt > 0, swx / sw, np.float32(0.0))
            var_all = np.where(cnt > 0, swwv / (sw * sw), np.float32(np.inf))
            swr = np.where(has, sw - wm, np.float32(1.0))
            wm = np.where(has, wm, np.float32(0.0))
            xm = np.where(has, xm, np.float32(0.0))
            mean_r = np.where(has, (swx - wm * xm) / swr, mean_all)
            var_r = np.where(has, (swwv - wm * wm * vm) / (swr * swr), var_all)
        return mean_r, var_r, mean_all, var_all

    def _structure_at(self, idx: np.ndarray) -> np.ndarray:
        """Variance allowance for real frame-to-frame differences of the signal at ``idx``.

        ``signal_tolerance * m`` covers a star's peak changing with the seeing;
        ``gradient_tolerance * |grad m|`` (px, central differences) covers its wings and any
        sub-pixel misregistration, where the signal changes fastest.  Both vanish on blank
        sky, so there the rejection is set by the noise alone.  ``m`` is the mean without
        the max candidate, so an outlier does not widen its own tolerance.
        """
        m, g2, _ = self._signal_at(idx)
        g = np.float32(0.5 * self.gradient_tolerance) * g2
        return (np.float32(self.signal_tolerance) * m) ** 2 + g * g

    def _signal_at(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """At ``idx``: the mean without the max candidate m, |dm/dx| + |dm/dy| times 2, and the
        5-point Laplacian of m (0 on the frame's edge)."""
        ny, nx = self.shape
        last = ny * nx - 1
        yy, xx = np.divmod(idx, nx)

        def ref(j: np.ndarray) -> np.ndarray:
            return self._stats_at(np.clip(j, 0, last))[0]

        m = ref(idx)
        inx, iny = (xx > 0) & (xx < nx - 1), (yy > 0) & (yy < ny - 1)
        right, left, down, up = ref(idx + 1), ref(idx - 1), ref(idx + nx), ref(idx - nx)
        gx = np.where(inx, np.abs(right - left), np.float32(0.0))
        gy = np.where(iny, np.abs(down - up), np.float32(0.0))
        lap = np.where(inx & iny, right + left + down + up - 4 * m, np.float32(0.0))
        return m, gx + gy, lap

    def _reject(self, data: np.ndarray, noise_var: float | np.ndarray, valid: np.ndarray | None,
                scale: float, fwhm: float, slot: int) -> np.ndarray:
        """Flat indices of the new frame's pixels deviating from the clean mean by > reject_sigma.

        Only pixels with two or more contributions are judged.  A cheap full-frame bound
        (deviation against the frame's own noise) picks the few candidates; there the
        deviation is taken with the seeing matched (``fwhm`` is the frame's, ``slot`` its
        slot, not yet counted in the stack) and the full tolerance, with the stack's variance
        and the structure allowance, is evaluated.
        """
        k2 = np.float32(self.reject_sigma ** 2)
        nx = self.shape[1]
        cand, devs, vcand = [], [], []
        for r0, r1, x, v, ok in self._blocks(data, noise_var, valid, scale):
            bs = np.s_[r0:r1]
            with np.errstate(divide="ignore", invalid="ignore"):
                mean = self._swx[bs] / self._sw[bs]
            lo, hi = np.searchsorted(self._drop, (r0 * nx, r1 * nx))
            if hi > lo:
                mean.ravel()[self._drop[lo:hi] - r0 * nx] = self._stats_at(self._drop[lo:hi])[0]
            dev = x - mean
            d2 = dev * dev
            hit = ok & (self._count[bs] >= 2) & (d2 > k2 * v)
            local = np.flatnonzero(hit)
            cand.append(local + r0 * nx)
            devs.append(dev.ravel()[local])
            vcand.append(v.ravel()[local] if np.ndim(v) else np.full(len(local), v, np.float32))
        idx = np.concatenate(cand)
        if len(idx) == 0:
            return idx
        mean_r, var_r, mean_all, var_all = self._stats_at(idx)
        dropped = np.isin(idx, self._drop, assume_unique=True)
        var = np.where(dropped, var_r, var_all)
        mean = np.where(dropped, mean_r, mean_all)          # the clean mean the bound compared with
        tol = np.concatenate(vcand) + var + self._structure_at(idx)
        s = np.float32(scale)

        def frame(j: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
            x = (np.ravel(data) if j is None else np.ravel(data)[j]).astype(np.float32) * s
            ok = np.isfinite(x)
            if valid is not None:
                ok &= np.ravel(valid) if j is None else np.ravel(valid)[j]
            return np.where(ok, x, np.float32(0.0)), ok

        dev = self._match_seeing(idx, np.concatenate(devs) + mean, mean, fwhm,
                                 float(self._ref_fwhm(np.array([slot]))[0]), var_r, tol,
                                 self._clean_mean_values, frame)
        return idx[dev * dev > k2 * tol]

    def _ref_fwhm(self, slots: np.ndarray) -> np.ndarray:
        """The effective FWHM of the stack without each of ``slots``' frames (px; NaN: unknown).

        A weighted mean of profiles of equal flux has its peak at the weighted mean of the
        peaks, and a peak scales as 1/FWHM**2 (Gaussian, Moffat of any beta), so the stack's
        1/FWHM**2 is the weighted mean of its frames'.  Frames of unknown FWHM are left out.
        """
        w, f = self._slot_w.astype(np.float64), self._slot_fwhm.astype(np.float64)
        known = (w > 0) & np.isfinite(f)
        wk, ik = np.where(known, w, 0.0), np.where(known, w / np.where(known, f, 1.0) ** 2, 0.0)
        sw, si = wk.sum() - wk[slots], ik.sum() - ik[slots]
        ok = (sw > 1e-6 * max(wk.sum(), 1e-30)) & (si > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(ok, np.sqrt(sw / np.where(ok, si, 1.0)), np.nan)

    def _match_seeing(self, idx: np.ndarray, x: np.ndarray, m: np.ndarray, fwhm: float, ref_fwhm: float,
                      var_r: np.ndarray, tol: np.ndarray, reference: _Values, frame: _Values,
                      cache: dict | None = None) -> np.ndarray:
        """``x - m`` at ``idx`` with the deviation a seeing difference makes taken out.

        ``x`` comes from a frame of ``fwhm``, ``m`` is the reference of ``ref_fwhm`` (NaN:
        unknown, then nothing is matched), ``tol`` the variance the caller judges ``x - m``
        against; ``reference`` and ``frame`` give the reference's and the frame's values at
        any pixels; ``cache`` keeps full-frame blurs of the reference for the caller's next call.  Why: a frame twice as sharp as the stack has star peaks 4x the stack's,
        far beyond any signal tolerance that still rejects a trail over faint stars.

        - Frame blurrier: the deviation is taken against the reference blurred to the frame's
          seeing (Gaussian of sqrt(fwhm**2 - ref_fwhm**2) / 2.355 sigma, at ``idx`` only).  A
          trail or a cosmic ray in the frame is not blurred, so it stays an outlier.
        - Frame sharper: a star's peak may exceed the reference by (ref_fwhm / fwhm)**2 - 1
          times it.  That much positive deviation is not counted where the reference is a
          significant peak (Laplacian below -_PEAK_SIGMA times its noise) and the frame,
          blurred to the reference's seeing, agrees with it within ``tol``: a trail stays
          (blurred, it is still there), a cosmic ray on sky or on a faint star stays (no
          peak); one on a bright star's core survives, as it could before.  Elsewhere a
          sharper frame is below the reference, by less than the reference itself, which the
          signal tolerance covers.
        """
        dev = x - m
        if not (np.isfinite(fwhm) and np.isfinite(ref_fwhm)) or abs(fwhm / ref_fwhm - 1) <= _SEEING_MATCH:
            return dev
        k2 = np.float32(self.reject_sigma ** 2)
        # only what the unmatched test rejects is looked at again: matching rescues star light, it
        # never rejects more (and it costs only on these few pixels)
        j = np.flatnonzero(dev * dev > k2 * tol)
        if fwhm < ref_fwhm:
            j = j[dev[j] > 0]
        if len(j) == 0:
            return dev
        sigma = max(round(math.sqrt(abs(fwhm ** 2 - ref_fwhm ** 2)) / _FWHM_PER_SIGMA / _SIGMA_STEP), 1) * _SIGMA_STEP
        if fwhm > ref_fwhm:
            dev[j] = x[j] - self._sparse_blur(idx[j], sigma, reference, cache)
            return dev
        j = j[-self._signal_at(idx[j])[2] > np.float32(_PEAK_SIGMA) * np.sqrt(np.float32(20.0) * var_r[j])]
        matched = self._sparse_blur(idx[j], sigma, frame) - m[j]
        j = j[matched * matched <= k2 * tol[j]]
        excess = np.float32((ref_fwhm / fwhm) ** 2 - 1) * np.maximum(m[j], np.float32(0.0))
        dev[j] -= np.minimum(dev[j], excess)
        return dev

    def _sparse_blur(self, idx: np.ndarray, sigma: float, values: _Values, cache: dict | None = None) -> np.ndarray:
        """``values`` blurred by a Gaussian of ``sigma`` px (truncated as kernels.gaussian_blur),
        normalised over the usable pixels, at ``idx``.

        Why two ways: the candidates of a test are usually few, and a lookup per kernel pixel
        and candidate beats blurring the frame; when a whole field of stars is judged (a frame
        much blurrier than the stack) two full-frame OpenCV blurs, of the values and of the
        usable mask, are cheaper.  ``cache`` (None: none) keeps the full-frame blur by sigma, for
        callers that blur the same values again.
        """
        ny, nx = self.shape
        reach = GAUSSIAN_TRUNCATE * sigma
        r = int(math.floor(reach))
        offsets = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx <= reach ** 2]
        if len(idx) * len(offsets) > _SPARSE_BLUR_FRACTION * ny * nx:
            blurred = None if cache is None else cache.get(sigma)
            if blurred is None:
                val, ok = values(None)
                if ok.all():                    # the usual case: nothing to normalise
                    blurred = gaussian_blur(val.reshape(self.shape), sigma)
                else:
                    okf = ok.reshape(self.shape).astype(np.float32)
                    blurred = gaussian_blur(val.reshape(self.shape) * okf, sigma) / np.maximum(
                        gaussian_blur(okf, sigma), np.float32(1e-30))
                if cache is not None:
                    cache[sigma] = blurred
            return blurred.ravel()[idx]
        yy, xx = np.divmod(idx, nx)
        acc = np.zeros(len(idx), np.float32)
        wsum = np.zeros(len(idx), np.float32)
        for dy, dx in offsets:
            inside = (yy + dy >= 0) & (yy + dy < ny) & (xx + dx >= 0) & (xx + dx < nx)
            val, ok = values(np.where(inside, idx + (dy * nx + dx), idx))
            k = np.where(inside & ok, np.float32(math.exp(-0.5 * (dy * dy + dx * dx) / sigma ** 2)), np.float32(0.0))
            acc += k * val
            wsum += k
        return acc / np.maximum(wsum, np.float32(1e-30))

    def _all(self, j: np.ndarray | None) -> np.ndarray:
        """Flat indices ``j``, or every pixel for None."""
        return np.arange(self._count.size) if j is None else j

    def _clean_mean_values(self, j: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The clean mean (what :meth:`image` shows) at flat indices ``j``, and where it has data."""
        if j is None:
            return self.image().ravel(), self._count.ravel() > 0
        mean_r, _, mean_all, _ = self._stats_at(j)
        pos = np.minimum(np.searchsorted(self._drop, j), max(len(self._drop) - 1, 0))
        dropped = (self._drop[pos] == j) if len(self._drop) else np.zeros(len(j), bool)
        return np.where(dropped, mean_r, mean_all), self._count.ravel()[j] > 0

    def _others_values(self, j: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The mean without the max candidate at flat indices ``j``, and where it has data."""
        if j is None:                   # the whole frame as whole planes: 10x faster than by index
            cnt, sw, swx = self._count, self._sw, self._swx
            wm = np.take(self._slot_w, self._mslot)
            has = (cnt >= 2) & (wm > 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                mean = np.where(has, (swx - wm * np.where(has, self._xmax, np.float32(0.0))) / (sw - wm), swx / sw)
            return np.where(cnt > 0, mean, np.float32(0.0)).ravel(), cnt.ravel() > 0
        return self._stats_at(j)[0], self._count.ravel()[j] > 0

    def _candidate_values(self, slot: int) -> _Values:
        """The values of ``slot``'s frame as far as the stack knows them: its max candidates, and
        the clean mean where another frame's value is the max."""
        def values(j: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
            mean, ok = self._clean_mean_values(j)
            j = self._all(j)
            mine = self._mslot.ravel()[j] == slot
            return np.where(mine, self._xmax.ravel()[j], mean), ok
        return values

    def _update_drops(self) -> None:
        """Re-decide, for every pixel, whether its max candidate is an outlier to leave out.

        A cheap full-frame bound (candidate above the others' mean by more than reject_sigma
        times its own noise) selects the few pixels where the full test is needed.
        """
        k2 = np.float32(self.reject_sigma ** 2)
        nx = self.shape[1]
        cand = []
        for r0 in range(0, self.shape[0], _BLOCK_ROWS):
            bs = np.s_[r0:min(r0 + _BLOCK_ROWS, self.shape[0])]
            sw, xm = self._sw[bs], self._xmax[bs]
            wm = np.take(self._slot_w, self._mslot[bs])
            swr = sw - wm
            with np.errstate(invalid="ignore"):
                d = xm * sw - self._swx[bs]              # = sw * (xm - mean), > 0 for a high candidate
                hit = (self._count[bs] >= 2) & (wm > 0) & (d > 0) & (d * d > k2 * self._vmax[bs] * swr * swr)
            cand.append(np.flatnonzero(hit) + r0 * nx)
        idx = np.concatenate(cand)
        if len(idx):
            mean_r, var_r, _, _ = self._stats_at(idx)
            slots = self._mslot.ravel()[idx]
            dev = self._xmax.ravel()[idx] - mean_r
            tol = self._vmax.ravel()[idx] + var_r + self._structure_at(idx)
            present, cache = np.unique(slots), {}
            for slot, ref_fwhm in zip(present, self._ref_fwhm(present), strict=True):
                j = np.flatnonzero(slots == slot)
                dev[j] = self._match_seeing(idx[j], self._xmax.ravel()[idx[j]], mean_r[j],
                                            float(self._slot_fwhm[slot]), float(ref_fwhm), var_r[j], tol[j],
                                            self._others_values, self._candidate_values(int(slot)), cache)
            idx = idx[(dev > 0) & (dev * dev > k2 * tol)]
        self._drop = self._grow_drops(idx.astype(np.int64))

    def _frame_at(self, idx: np.ndarray, data: np.ndarray, noise_var: float | np.ndarray,
                  valid: np.ndarray | None, scale: float) -> tuple[np.ndarray, np.ndarray]:
        """At flat indices: the new frame's scaled variance and usable flag, as :meth:`_blocks` makes them."""
        s = np.float32(scale)
        nv = np.asarray(noise_var, np.float32)
        v = (nv.ravel()[idx] if nv.ndim else np.full(len(idx), nv, np.float32)) * (s * s)
        ok = np.isfinite(np.ravel(data)[idx].astype(np.float32) * s)
        if valid is not None:
            ok &= np.ravel(valid)[idx]
        return v, ok

    def _quiet(self, idx: np.ndarray, var: np.ndarray) -> np.ndarray:
        """Blank sky, where a grow cannot eat star light: the clean mean and its gradient (per px)
        within ``_QUIET_SIGMA`` of the noise of the frame's pixel and of the mean.

        Deliberately not the rejection's structure allowance: that allowance shrinks with
        smaller tolerances, and the grow must stay off star wings whatever they are set to.
        """
        m, g2, _ = self._signal_at(idx)
        var_r = self._stats_at(idx)[1]
        g = np.float32(0.5) * g2
        return m * m + g * g < np.float32(_QUIET_SIGMA ** 2) * (var + var_r)

    def _group_size(self, idx: np.ndarray) -> np.ndarray:
        """For sorted flat indices: the size of the 8-connected group of ``idx`` each one belongs to.

        The graph has only the given pixels as nodes, so this costs O(len(idx) log len(idx)),
        not a full-frame labelling.
        """
        nx, n = self.shape[1], len(idx)
        xs = idx % nx
        rows, cols = [], []
        for dy, dx in _HALF_NEIGHBOURS:
            nb = idx + (dy * nx + dx)
            pos = np.minimum(np.searchsorted(idx, nb), n - 1)
            hit = (idx[pos] == nb) & (xs + dx >= 0) & (xs + dx < nx)
            rows.append(np.flatnonzero(hit))
            cols.append(pos[hit])
        r, c = np.concatenate(rows), np.concatenate(cols)
        _, labels = connected_components(coo_array((np.ones(len(r), np.int8), (r, c)), shape=(n, n)),
                                         directed=False)
        return np.bincount(labels)[labels]

    def _grow_seeds(self, idx: np.ndarray, var: np.ndarray) -> np.ndarray:
        """The pixels of ``idx`` (sorted) that seed a grow: in a big enough group, on quiet sky."""
        seeds = idx[self._group_size(idx) >= self.grow_min_pixels]
        return seeds[self._quiet(seeds, var[np.searchsorted(idx, seeds)])]

    def _neighbourhood(self, seeds: np.ndarray, exclude: np.ndarray, disk: list[tuple[int, int]]
                       ) -> np.ndarray:
        """Sorted flat indices at the ``disk`` offsets from the seeds, less ``exclude``."""
        ny, nx = self.shape
        ys, xs = np.divmod(seeds, nx)
        mark = np.zeros(ny * nx, bool)
        for dy, dx in disk:
            inside = (ys + dy >= 0) & (ys + dy < ny) & (xs + dx >= 0) & (xs + dx < nx)
            mark[seeds[inside] + (dy * nx + dx)] = True
        mark[exclude] = False
        return np.flatnonzero(mark)

    def _grow_rejected(self, rejected: np.ndarray, data: np.ndarray, noise_var: float | np.ndarray,
                       valid: np.ndarray | None, scale: float) -> np.ndarray:
        """The new frame's rejected pixels plus their grow: every judged, quiet pixel within
        ``grow_radius`` of a seed, whatever its value (see the module docstring)."""
        if not self._disk or len(rejected) < self.grow_min_pixels:
            return rejected
        seeds = self._grow_seeds(rejected, self._frame_at(rejected, data, noise_var, valid, scale)[0])
        if len(seeds) == 0:
            return rejected
        cand = self._neighbourhood(seeds, exclude=rejected, disk=self._disk)
        v, ok = self._frame_at(cand, data, noise_var, valid, scale)
        judged = ok & (self._count.ravel()[cand] >= 2)
        cand, v = cand[judged], v[judged]
        return np.union1d(rejected, cand[self._quiet(cand, v)])

    def _grow_drops(self, dropped: np.ndarray) -> np.ndarray:
        """The dropped max candidates plus their grow: around each frame's group of dropped pixels,
        the quiet neighbours within ``_GROW_DROP_RADIUS`` whose max candidate comes from that same
        frame and stands ``_GROW_DROP_SIGMA`` above the others (see those constants for why)."""
        if not self._drop_disk or len(dropped) < self.grow_min_pixels:
            return dropped
        slots, vmax, mslot = self._mslot.ravel()[dropped], self._vmax.ravel(), self._mslot.ravel()
        grown = [dropped]
        for slot in np.unique(slots):
            mine = dropped[slots == slot]
            seeds = self._grow_seeds(mine, vmax[mine])
            if len(seeds) == 0:
                continue
            cand = self._neighbourhood(seeds, exclude=dropped, disk=self._drop_disk)
            cand = cand[(mslot[cand] == slot) & (self._count.ravel()[cand] >= 2)]
            cand = cand[self._quiet(cand, vmax[cand])]
            mean_r, var_r, _, _ = self._stats_at(cand)
            dev = self._xmax.ravel()[cand] - mean_r
            k2 = np.float32(_GROW_DROP_SIGMA ** 2)
            grown.append(cand[(dev > 0) & (dev * dev > k2 * (vmax[cand] + var_r))])
        return np.unique(np.concatenate(grown))

    def _update_saturation(self, saturated: np.ndarray | None) -> None:
        if saturated is None:
            return
        if self._satcount is None:
            self._satcount = np.zeros(self.shape, np.uint16)
        self._satcount[np.asarray(saturated, bool)] += 1
