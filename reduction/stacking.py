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
2. After every add, each pixel's max candidate is tested against the
   mean of the others and left out of ``image()`` when it is an outlier. This
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
from collections.abc import Mapping

import numpy as np
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

log = logging.getLogger(__name__)

#: Marks "no max candidate" in the uint16 slot plane.
_NO_SLOT = np.iinfo(np.uint16).max
#: Rows per processing block: keeps the temporaries small enough to stay in cache.
_BLOCK_ROWS = 256
#: Version 2 added grow_radius and grow_min_pixels to the saved parameters (version 1 loads with
#: their defaults); version 3 keeps each frame's count of rejected pixels, not their indices.
_FORMAT_VERSION = 3
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
        w = np.float32(weight)
        # decide all rejections against the state before this frame, then accumulate
        rejected = self._grow_rejected(self._reject(data, noise_var, valid, scale), data, noise_var, valid,
                                       scale)
        rej_flat = np.zeros(self.shape[0] * self.shape[1], bool)
        rej_flat[rejected] = True
        rej_plane = rej_flat.reshape(self.shape)
        self._slot_w[slot] = w
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

    def image(self) -> np.ndarray:
        """The stack: float32 weighted mean of the accepted contributions (ADU per frame)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            img = np.where(self._count > 0, self._swx / self._sw, np.float32(0.0))
        if len(self._drop):
            img.ravel()[self._drop] = self._stats_at(self._drop)[0]
        return img

    def variance(self) -> np.ndarray:
        """Per-pixel variance of :meth:`image` (ADU**2) from the frames' ``noise_var``.

        It is the variance of the frames' own pixels; resampling smooths pixel noise but keeps
        the variance of sums over apertures, which is what photometry errors need.
        """
        with np.errstate(divide="ignore", invalid="ignore"):
            var = np.where(self._count > 0, self._swwv / (self._sw * self._sw), np.float32(np.inf))
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
                  self._mslot, self._slot_w]
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
            xmax=self._xmax, vmax=self._vmax, mslot=self._mslot, slot_w=self._slot_w,
            frame_ids=np.array(ids, dtype=str), slots=np.array([self._slots[f] for f in ids], np.int64),
            rej_len=np.array([self._rejected[f] for f in ids], np.int64))
        if self._satcount is not None:
            arrays["satcount"] = self._satcount
        return arrays

    @classmethod
    def from_state(cls, z: Mapping[str, np.ndarray]) -> StackAccumulator:
        """Restore an accumulator from :meth:`state`'s arrays (copied: the source may be a closing npz)."""
        if int(z["version"]) not in (1, 2, _FORMAT_VERSION):
            raise ValueError(f"unsupported stack state version {int(z['version'])}")
        self = cls(tuple(int(n) for n in z["shape"]), *(float(p) for p in z["params"]))
        for name in ("sw", "swx", "swwv", "count", "xmax", "vmax", "mslot", "slot_w"):
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
        m, g2 = self._signal_at(idx)
        g = np.float32(0.5 * self.gradient_tolerance) * g2
        return (np.float32(self.signal_tolerance) * m) ** 2 + g * g

    def _signal_at(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """At ``idx``: the mean without the max candidate m, and |dm/dx| + |dm/dy| times 2."""
        ny, nx = self.shape
        last = ny * nx - 1
        yy, xx = np.divmod(idx, nx)

        def ref(j: np.ndarray) -> np.ndarray:
            return self._stats_at(np.clip(j, 0, last))[0]

        m = ref(idx)
        gx = np.where((xx > 0) & (xx < nx - 1), np.abs(ref(idx + 1) - ref(idx - 1)), np.float32(0.0))
        gy = np.where((yy > 0) & (yy < ny - 1), np.abs(ref(idx + nx) - ref(idx - nx)), np.float32(0.0))
        return m, gx + gy

    def _reject(self, data: np.ndarray, noise_var: float | np.ndarray, valid: np.ndarray | None,
                scale: float) -> np.ndarray:
        """Flat indices of the new frame's pixels deviating from the clean mean by > reject_sigma.

        Only pixels with two or more contributions are judged.  A cheap full-frame bound
        (deviation against the frame's own noise) picks the few candidates; the full
        tolerance, with the stack's variance and the structure allowance, is evaluated there.
        """
        k2 = np.float32(self.reject_sigma ** 2)
        nx = self.shape[1]
        cand, dev2, vcand = [], [], []
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
            dev2.append(d2.ravel()[local])
            vcand.append(v.ravel()[local] if np.ndim(v) else np.full(len(local), v, np.float32))
        idx = np.concatenate(cand)
        if len(idx) == 0:
            return idx
        mean_r, var_r, mean_all, var_all = self._stats_at(idx)
        dropped = np.isin(idx, self._drop, assume_unique=True)
        var = np.where(dropped, var_r, var_all)
        tol = np.concatenate(vcand) + var + self._structure_at(idx)
        return idx[np.concatenate(dev2) > k2 * tol]

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
            dev = self._xmax.ravel()[idx] - mean_r
            tol = self._vmax.ravel()[idx] + var_r + self._structure_at(idx)
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
        m, g2 = self._signal_at(idx)
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
