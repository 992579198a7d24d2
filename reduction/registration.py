"""Register a frame onto the target's reference grid by matching star patterns.

Why pattern matching and not cross-correlation: frames of one target come in
different filters (a blue frame and a green frame show different stars at
different relative brightness), drift by tens of pixels over the night and
rotate by up to a degree, and the detection lists carry hot pixels and cosmic
rays.  Cross-correlation of images handles none of the rotation and is biased
by fixed-pattern hot pixels; geometric patterns of stars are invariant to all
of it.

Method (in the spirit of astroalign, Beroiz et al. 2020):

1. Take the brightest ``n`` points of each list (by flux when given, else the
   list order, which is brightest first for our detector).
2. Form every triangle of those points and describe each by two invariants,
   ``log(L3/L2)`` and ``log(L2/L1)`` for its sorted side lengths: unchanged by
   shift, rotation and scale.  Log ratios make the positional error of the
   invariants roughly uniform.  Triangles with a short side (less than
   ``_MIN_SIDE`` px) are dropped because their invariants are noise-dominated.
3. Match triangles of the frame to triangles of the reference whose invariants
   agree within a tolerance (``scipy.spatial.cKDTree``).  The sorted-side
   order fixes which vertex corresponds to which, so each matched pair is a
   complete similarity-transform hypothesis.
4. Vote: chance triangle matches scatter over all rotations and shifts while
   every triangle of stars common to both lists lands in one (rotation,
   shift) cell, so only the hypotheses of the most-voted cells go on.  Score
   those at once (vectorised): transform the brightest reference points and
   count how many land within ``_SCORE_RADIUS`` px of a frame point.  This is
   RANSAC with deterministic hypotheses.
5. Refine the best few hypotheses by least squares on *all* points matched
   within a shrinking radius (one frame point per reference point), clipping
   at 3 sigma estimated from the median residual (robust to the chance matches
   of spurious points), and keep the one with most matches.
6. Accept only a transform with enough matches (``min_matches``, and more than
   an unrelated field reaches by chance for these point densities with 1e-3
   probability over all the transforms the search can try), a scale
   within ``_MAX_SCALE_DEV`` of 1 and a residual below ``max_rms``.  Chance
   matches of an unrelated field (the offset frame) have an rms near
   ``radius / sqrt(2)`` ~ 1 px and few members, so they are refused with
   :class:`RegistrationError` rather than returned as a wrong transform.

If the brightest ``n`` points are swamped by spurious detections the search is
repeated with more points (``_N_BRIGHT``), then with the shift from FFT phase
correlation of the two star-position images (numpy FFT; every point counts the
same), and last with a vote over all point-pair offsets on a grid of small
rotations (needs no brightness order; rotations up to 3 degrees), so the cheap
case stays cheap.  A short exposure's centroids scatter with photon noise: when
no transform has a residual below ``max_rms``, one fitted on enough stars whose
standard error (rms / sqrt(matches)) is below ``_PRECISION_FRAC * max_rms`` is
accepted, since the transform, not each centroid, is what the stack needs.

Conventions: pixel coordinates are 0-based (x, y) = (column, row).
:class:`Transform` maps REFERENCE-grid (x, y) to FRAME (x, y), which is the
mapping :func:`scipy.ndimage.affine_transform` needs to pull the frame onto the
reference grid.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

log = logging.getLogger(__name__)

#: Numbers of brightest points tried in turn (more only when fewer fail).
_N_BRIGHT: tuple[int, ...] = (30, 50)
#: Triangles with a side shorter than this (px) have noise-dominated invariants.
_MIN_SIDE = 8.0
#: Tolerance on the log side-ratio invariants.
_INV_TOL = 0.01
#: Radius (px) within which a transformed reference point counts as a match when scoring.
_SCORE_RADIUS = 2.0
#: Number of brightest reference points used to score hypotheses.
_N_SCORE = 80
#: Offset-vote fallback: points used, rotation grid, largest shift (fraction of the field), bin.
_OFFSET_NPTS = 300
_OFFSET_MAX_ROT_DEG = 3.0
_OFFSET_ROT_STEP_DEG = 0.5
_OFFSET_MAX_SHIFT_FRAC = 0.25
_OFFSET_BIN_PX = 4.0
#: Phase-correlation fallback: largest side (bins) of the padded point images.
_PHASE_MAX_BINS = 1024
#: A transform whose residual exceeds max_rms is still accepted when its own standard error,
#: rms / sqrt(matches), is below this fraction of max_rms (a short exposure's noisy centroids).
_PRECISION_FRAC = 0.25
#: Hypotheses refined on all points.
_N_REFINE = 5
#: Matching radii (px) of the successive least-squares refinements.
_REFINE_RADII: tuple[float, ...] = (3.0, 1.5, 1.0)
#: Residuals below this (px) are never clipped (centroids are not better than this).
_MIN_CLIP_PX = 0.05
#: Largest accepted |scale - 1|: frames of one camera have the same plate scale.
_MAX_SCALE_DEV = 0.02
#: Cell size of the rotation / shift vote that prunes the hypotheses.
_VOTE_ROT_DEG = 0.5
_VOTE_SHIFT_PX = 4.0
#: Most-voted cells kept, and hypotheses kept per cell, for scoring.
_VOTE_CELLS = 8
_VOTE_PER_CELL = 40


class RegistrationError(Exception):
    """A frame could not be registered; ``str(exc)`` is the reason shown to the observer."""


@dataclass
class Transform:
    """Similarity (or affine) transform from reference-grid (x, y) to frame (x, y).

    ``matrix`` is 2x3: ``[x_f, y_f] = matrix[:, :2] @ [x, y] + matrix[:, 2]``.
    ``center`` is the rotation centre used by :attr:`dx`, :attr:`dy` and
    :attr:`rotation_deg`, ((nx-1)/2, (ny-1)/2) of the frame, so that they follow
    the simulator's frame-log convention::

        x_f = cx + cos(t)(x-cx) - sin(t)(y-cy) + dx
        y_f = cy + sin(t)(x-cx) + cos(t)(y-cy) + dy
    """

    matrix: np.ndarray
    rms_px: float = 0.0
    nmatch: int = 0
    center: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def from_params(cls, dx: float, dy: float, rotation_deg: float = 0.0, scale: float = 1.0,
                    shape: tuple[int, int] | None = None) -> Transform:
        """Build a transform from the frame-log parameters (``shape`` = (ny, nx) gives the centre)."""
        cx, cy = _center(shape)
        t = math.radians(rotation_deg)
        a, b = scale * math.cos(t), scale * math.sin(t)
        m = np.array([[a, -b, cx - a * cx + b * cy + dx],
                      [b, a, cy - b * cx - a * cy + dy]], dtype=np.float64)
        return cls(matrix=m, center=(cx, cy))

    @classmethod
    def identity(cls, shape: tuple[int, int] | None = None) -> Transform:
        """The reference frame's own transform."""
        return cls(matrix=np.eye(2, 3), center=_center(shape))

    def apply(self, xy: np.ndarray) -> np.ndarray:
        """Map reference-grid points (N, 2) to frame points (N, 2)."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        return xy @ self.matrix[:, :2].T + self.matrix[:, 2]

    def inverse_apply(self, xy: np.ndarray) -> np.ndarray:
        """Map frame points (N, 2) back to reference-grid points (N, 2)."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        return np.linalg.solve(self.matrix[:, :2], (xy - self.matrix[:, 2]).T).T

    @property
    def dx(self) -> float:
        """Shift in x of the rotation centre, reference grid to frame (px)."""
        cx, cy = self.center
        return float(self.apply(np.array([[cx, cy]]))[0, 0] - cx)

    @property
    def dy(self) -> float:
        """Shift in y of the rotation centre, reference grid to frame (px)."""
        cx, cy = self.center
        return float(self.apply(np.array([[cx, cy]]))[0, 1] - cy)

    @property
    def rotation_deg(self) -> float:
        """Rotation angle (degrees, counter-clockwise in (x, y)) of the closest similarity."""
        m = self.matrix
        return math.degrees(math.atan2(m[1, 0] - m[0, 1], m[0, 0] + m[1, 1]))

    @property
    def scale(self) -> float:
        """Linear scale factor, sqrt(|det|) of the linear part."""
        return float(math.sqrt(abs(np.linalg.det(self.matrix[:, :2]))))

    def shift_only(self, shape: tuple[int, int], tol_px: float = 1e-3) -> bool:
        """True when, over a frame of ``shape`` (ny, nx), the transform is a pure shift to ``tol_px``."""
        ny, nx = shape
        lin = self.matrix[:, :2] - np.eye(2)
        return float(np.abs(lin).sum(axis=1).max()) * max(nx, ny) <= tol_px


def _center(shape: tuple[int, int] | None) -> tuple[float, float]:
    """Rotation centre ((nx-1)/2, (ny-1)/2) for a numpy (ny, nx) shape; origin when unknown."""
    if shape is None:
        return 0.0, 0.0
    ny, nx = shape[:2]
    return (nx - 1) / 2.0, (ny - 1) / 2.0


def _brightest(xy: np.ndarray, flux: np.ndarray | None, n: int) -> np.ndarray:
    """The ``n`` brightest points (list order when no flux: brightest first by convention)."""
    if flux is None:
        return xy[:n]
    order = np.argsort(-np.asarray(flux, dtype=np.float64), kind="stable")
    return xy[order[:n]]


@functools.lru_cache(maxsize=8)
def _triplets(n: int) -> np.ndarray:
    """Index triples of all triangles of n points (cached: built once per n, not per frame)."""
    idx = np.fromiter(itertools.chain.from_iterable(itertools.combinations(range(n), 3)), dtype=np.intp)
    idx = idx.reshape(-1, 3)
    idx.flags.writeable = False
    return idx


def _triangles(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All triangles of ``pts``: invariants (T, 2) and vertex indices (T, 3) in canonical order.

    Canonical vertex order: vertex 0 is opposite the shortest side, 1 opposite the
    middle side, 2 opposite the longest, so that matched triangles give matched points.
    """
    n = len(pts)
    if n < 3:
        return np.empty((0, 2)), np.empty((0, 3), dtype=np.intp)
    idx = _triplets(n)
    p = pts[idx]                                    # (T, 3, 2)
    # side k is opposite vertex k
    sides = np.stack([np.hypot(*(p[:, 1] - p[:, 2]).T),
                      np.hypot(*(p[:, 0] - p[:, 2]).T),
                      np.hypot(*(p[:, 0] - p[:, 1]).T)], axis=1)
    order = np.argsort(sides, axis=1)
    s = np.take_along_axis(sides, order, axis=1)
    keep = s[:, 0] >= _MIN_SIDE
    s, order, idx = s[keep], order[keep], idx[keep]
    inv = np.stack([np.log(s[:, 2] / s[:, 1]), np.log(s[:, 1] / s[:, 0])], axis=1)
    verts = np.take_along_axis(idx, order, axis=1)
    return inv, verts


def _fit_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity dst ~ M src, batched: src, dst (..., K, 2) -> (..., 2, 3)."""
    ms, md = src.mean(axis=-2, keepdims=True), dst.mean(axis=-2, keepdims=True)
    s, d = src - ms, dst - md
    sxx = (s ** 2).sum(axis=(-1, -2))
    a = (s[..., 0] * d[..., 0] + s[..., 1] * d[..., 1]).sum(axis=-1) / sxx
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(axis=-1) / sxx
    msx, msy = ms[..., 0, 0], ms[..., 0, 1]
    tx = md[..., 0, 0] - (a * msx - b * msy)
    ty = md[..., 0, 1] - (b * msx + a * msy)
    return np.stack([np.stack([a, -b, tx], axis=-1), np.stack([b, a, ty], axis=-1)], axis=-2)


def _apply(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ m[:, :2].T + m[:, 2]


def _hypotheses(frame_pts: np.ndarray, ref_pts: np.ndarray) -> np.ndarray:
    """Similarity transforms (H, 2, 3) ref -> frame from triangle pairs with matching invariants."""
    inv_f, tri_f = _triangles(frame_pts)
    inv_r, tri_r = _triangles(ref_pts)
    if len(inv_f) == 0 or len(inv_r) == 0:
        return np.empty((0, 2, 3))
    pairs = cKDTree(inv_r).sparse_distance_matrix(cKDTree(inv_f), _INV_TOL, output_type="ndarray")
    if len(pairs) == 0:
        return np.empty((0, 2, 3))
    m = _fit_similarity(ref_pts[tri_r[pairs["i"]]], frame_pts[tri_f[pairs["j"]]])
    scale = np.hypot(m[:, 0, 0], m[:, 1, 0])
    return m[np.abs(scale - 1.0) <= 5 * _MAX_SCALE_DEV]


def _vote(hyp: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Indices of the hypotheses in the most-voted cells of (rotation, shift of ``center``).

    Chance triangle matches scatter over all rotations and shifts; the true transform
    gathers every triangle of stars common to both lists in one cell.  This prunes
    tens of thousands of hypotheses to a few hundred before they are scored.
    """
    rot = np.arctan2(hyp[:, 1, 0], hyp[:, 0, 0])
    shift = np.einsum("hij,j->hi", hyp[:, :, :2], center) + hyp[:, :, 2] - center
    keys = np.stack([np.floor(np.degrees(rot) / _VOTE_ROT_DEG),
                     np.floor(shift[:, 0] / _VOTE_SHIFT_PX),
                     np.floor(shift[:, 1] / _VOTE_SHIFT_PX)], axis=1).astype(np.int64)
    _, cell, votes = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    cell = cell.ravel()
    top_cells = np.argsort(-votes, kind="stable")[:_VOTE_CELLS]
    chosen = [np.flatnonzero(cell == c)[:_VOTE_PER_CELL] for c in top_cells]
    return np.concatenate(chosen)


def _score(hyp: np.ndarray, ref_pts: np.ndarray, tree: cKDTree) -> np.ndarray:
    """Number of reference points landing within _SCORE_RADIUS of a frame point, per hypothesis."""
    pred = np.einsum("hij,kj->hki", hyp[:, :, :2], ref_pts) + hyp[:, None, :, 2]
    dist, _ = tree.query(pred.reshape(-1, 2), k=1, distance_upper_bound=_SCORE_RADIUS)
    return np.isfinite(dist).reshape(len(hyp), -1).sum(axis=1)


def _triangle_candidates(frame_xy: np.ndarray, ref_xy: np.ndarray, frame_flux: np.ndarray | None,
                         ref_flux: np.ndarray | None, n: int, tree: cKDTree) -> np.ndarray:
    """Best few hypotheses (H, 2, 3) from triangles of the ``n`` brightest points of each list."""
    hyp = _hypotheses(_brightest(frame_xy, frame_flux, n), _brightest(ref_xy, ref_flux, n))
    if len(hyp) == 0:
        return hyp
    hyp = hyp[_vote(hyp, 0.5 * (ref_xy.min(axis=0) + ref_xy.max(axis=0)))]
    score = _score(hyp, _brightest(ref_xy, ref_flux, _N_SCORE), tree)
    return hyp[np.argsort(-score, kind="stable")[:_N_REFINE]]


def _offset_candidates(frame_xy: np.ndarray, ref_xy: np.ndarray, frame_flux: np.ndarray | None,
                       ref_flux: np.ndarray | None) -> np.ndarray:
    """Fallback hypotheses from a vote over all point-pair offsets, on a grid of small rotations.

    Needs no brightness order at all, so it still works when spurious detections crowd the
    brightest stars out of the triangle search; it covers rotations up to
    ``_OFFSET_MAX_ROT_DEG`` and shifts up to ``_OFFSET_MAX_SHIFT_FRAC`` of the field.
    """
    f = _brightest(frame_xy, frame_flux, _OFFSET_NPTS)
    r = _brightest(ref_xy, ref_flux, _OFFSET_NPTS)
    c = 0.5 * (ref_xy.min(axis=0) + ref_xy.max(axis=0))
    half = _OFFSET_MAX_SHIFT_FRAC * float(np.max(ref_xy.max(axis=0) - ref_xy.min(axis=0)))
    nb = int(math.ceil(2 * half / _OFFSET_BIN_PX))
    peaks = []
    for deg in np.arange(-_OFFSET_MAX_ROT_DEG, _OFFSET_MAX_ROT_DEG + 1e-9, _OFFSET_ROT_STEP_DEG):
        t = math.radians(deg)
        rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        rr = (r - c) @ rot.T + c
        d = (f[None, :, :] - rr[:, None, :]).reshape(-1, 2)
        d = d[(np.abs(d) < half).all(axis=1)]
        if len(d) == 0:
            continue
        ij = ((d + half) / _OFFSET_BIN_PX).astype(np.int64).clip(0, nb - 1)
        counts = np.bincount(ij[:, 0] * nb + ij[:, 1], minlength=nb * nb)
        k = int(np.argmax(counts))
        near = (np.abs(ij[:, 0] - k // nb) <= 1) & (np.abs(ij[:, 1] - k % nb) <= 1)
        shift = np.median(d[near], axis=0)
        m = np.hstack([rot, (c + shift - rot @ c)[:, None]])
        peaks.append((int(counts[k]), m))
    peaks.sort(key=lambda p: -p[0])
    return np.array([m for _, m in peaks[:_N_REFINE]]).reshape(-1, 2, 3)


def _phase_candidates(frame_xy: np.ndarray, ref_xy: np.ndarray, frame_flux: np.ndarray | None,
                      ref_flux: np.ndarray | None) -> np.ndarray:
    """Translation hypothesis (1, 2, 3) from FFT phase correlation of the two star-position images.

    Every point counts the same and no triangle has to survive, so a short exposure with a few
    bright stars among many noise detections still finds its shift; the refinement on matched
    stars then makes it sub-pixel (and the rotation search follows if this fails).
    """
    f = _brightest(frame_xy, frame_flux, _OFFSET_NPTS)
    r = _brightest(ref_xy, ref_flux, _OFFSET_NPTS)
    lo = np.minimum(f.min(axis=0), r.min(axis=0))
    extent = float(np.max(np.maximum(f.max(axis=0), r.max(axis=0)) - lo)) + 1.0
    # padded to twice the field so that a shift does not wrap onto another
    bin_px = max(1.0, 2.0 * extent / _PHASE_MAX_BINS)
    n = int(math.ceil(2.0 * extent / bin_px))

    def image(pts: np.ndarray) -> np.ndarray:
        img = np.zeros((n, n))
        ij = ((pts - lo) / bin_px).astype(np.int64).clip(0, n - 1)
        np.add.at(img, (ij[:, 1], ij[:, 0]), 1.0)
        return img

    cross = np.fft.rfft2(image(f)) * np.conj(np.fft.rfft2(image(r)))
    # a Gaussian taper (sigma ~ 1 bin) keeps the whitened peak from being one noisy pixel
    ky, kx = np.meshgrid(np.fft.fftfreq(n), np.fft.rfftfreq(n), indexing="ij")
    taper = np.exp(-2.0 * math.pi ** 2 * (kx ** 2 + ky ** 2))
    corr = np.fft.irfft2(cross / np.maximum(np.abs(cross), 1e-12) * taper, s=(n, n))
    iy, ix = np.unravel_index(int(np.argmax(corr)), corr.shape)
    shift = np.array([ix if ix < n // 2 else ix - n, iy if iy < n // 2 else iy - n], float) * bin_px
    return np.array([[[1.0, 0.0, shift[0]], [0.0, 1.0, shift[1]]]])


def _refine(m: np.ndarray, frame_xy: np.ndarray, ref_xy: np.ndarray, tree: cKDTree
            ) -> tuple[np.ndarray, int, float]:
    """Least-squares refit on all points matched within shrinking radii; (matrix, nmatch, rms)."""
    nmatch, rms = 0, math.inf
    for radius in _REFINE_RADII:
        pred = _apply(m, ref_xy)
        dist, j = tree.query(pred, k=1, distance_upper_bound=radius)
        ok = np.isfinite(dist)
        # one frame point may serve only one reference point: keep the closest
        order = np.argsort(dist[ok])
        _, first = np.unique(j[ok][order], return_index=True)
        sel = np.flatnonzero(ok)[order[first]]
        if len(sel) < 3:
            return m, len(sel), math.inf
        for _ in range(5):
            m = _fit_similarity(ref_xy[sel], frame_xy[j[sel]])
            res = np.hypot(*(_apply(m, ref_xy[sel]) - frame_xy[j[sel]]).T)
            rms = float(np.sqrt(np.mean(res ** 2)))
            # clip at 3 sigma of a 2-D Gaussian (Rayleigh-distributed radii, median = 1.177 sigma):
            # the median resists the chance matches of spurious points, which an rms does not
            keep = res <= max(3.0 * float(np.median(res)) / 1.1774, _MIN_CLIP_PX)
            if keep.all() or keep.sum() < 3:
                break
            sel = sel[keep]
        nmatch = len(sel)
    return m, nmatch, rms


def _needed_matches(frame_xy: np.ndarray, ref_xy: np.ndarray, radius: float) -> int:
    """Fewest matches that an unrelated field reaches with probability below 1e-3.

    For uniformly scattered points a given transform collects Poisson(``chance``) coincidences
    within ``radius``; the search effectively tries every distinguishable transform (shifts on
    a ``radius`` grid over the field, rotations on a ``radius / field size`` grid), so the
    threshold is the Poisson tail that stays below 1e-3 after that many trials.
    """
    lo, hi = frame_xy.min(axis=0), frame_xy.max(axis=0)
    size = max(float(np.max(hi - lo)), 1.0)
    area = max(float(np.prod(hi - lo)), 1.0)
    chance = len(ref_xy) * len(frame_xy) * math.pi * radius ** 2 / area
    trials = area / (math.pi * radius ** 2) * (2 * math.pi * size / radius)
    k, term = 0, math.exp(-chance)
    tail = 1.0                                      # P(X >= k)
    while tail * trials > 1e-3:
        tail -= term
        k += 1
        term *= chance / k
    return k


def _finite(xy: np.ndarray, flux: np.ndarray | None, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, 2) float positions and fluxes with non-finite rows dropped."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    ok = np.isfinite(xy).all(axis=1)
    if flux is not None:
        flux = np.asarray(flux, dtype=np.float64).ravel()
        if len(flux) != len(xy):
            raise ValueError(f"{name}_flux and {name}_xy differ in length")
        ok &= np.isfinite(flux)
        flux = flux[ok]
    return xy[ok], flux


def find_transform(frame_xy: np.ndarray, ref_xy: np.ndarray, frame_flux: np.ndarray | None = None,
                   ref_flux: np.ndarray | None = None, shape: tuple[int, int] | None = None,
                   min_matches: int = 6, max_rms: float = 0.5) -> Transform:
    """Find the similarity transform mapping reference-grid (x, y) onto the frame's (x, y).

    Parameters
    ----------
    frame_xy, ref_xy : (N, 2) arrays of star positions (x, y) in the frame and on the reference grid.
    frame_flux, ref_flux : optional fluxes used to pick the brightest stars; without them the
        lists are taken as sorted brightest first.
    shape : (ny, nx) of the frame, for the rotation centre of ``dx``, ``dy``, ``rotation_deg``.
    min_matches : fewest matched stars accepted.
    max_rms : largest accepted rms residual (px) of the matched stars.

    Raises
    ------
    RegistrationError
        When no star pattern is shared with enough matches, a scale near 1 and a low residual
        (e.g. an unrelated field): never a wrong transform.
    """
    frame_xy, frame_flux = _finite(frame_xy, frame_flux, "frame")
    ref_xy, ref_flux = _finite(ref_xy, ref_flux, "ref")
    if len(frame_xy) < min_matches or len(ref_xy) < min_matches:
        raise RegistrationError(f"no consistent star pattern match (only {len(frame_xy)} stars in the "
                                f"frame and {len(ref_xy)} on the reference, need {min_matches})")
    tree_all = cKDTree(frame_xy)
    # the final radius decides how many coincidences an unrelated field gets
    need = max(min_matches, _needed_matches(frame_xy, ref_xy, _REFINE_RADII[-1]))
    best: tuple[int, float, np.ndarray] = (0, math.inf, np.eye(2, 3))
    searches = [lambda n=n: _triangle_candidates(frame_xy, ref_xy, frame_flux, ref_flux, n, tree_all)
                for n in _N_BRIGHT if n <= max(len(frame_xy), len(ref_xy)) or n == _N_BRIGHT[0]]
    searches.append(lambda: _phase_candidates(frame_xy, ref_xy, frame_flux, ref_flux))
    searches.append(lambda: _offset_candidates(frame_xy, ref_xy, frame_flux, ref_flux))
    noisy: list[tuple[int, float, np.ndarray]] = []
    for search in searches:
        for hyp in search():
            m, nmatch, rms = _refine(hyp, frame_xy, ref_xy, tree_all)
            if abs(math.hypot(m[0, 0], m[1, 0]) - 1.0) > _MAX_SCALE_DEV:
                continue
            if rms <= max_rms and (nmatch, -rms) > (best[0], -best[1]):
                best = (nmatch, rms, m)
            elif nmatch >= need and rms / math.sqrt(nmatch) <= _PRECISION_FRAC * max_rms:
                noisy.append((nmatch, rms, m))
        if best[0] >= need:
            break
    if best[0] < need and noisy:
        # A short exposure's centroids scatter with their photon noise, so its residual exceeds
        # max_rms although the transform, fitted on many stars, is precise: accept it on that.
        best = max(noisy, key=lambda c: (c[0], -c[1]))
        log.info("registered on noisy centroids: rms %.2f px over %d stars", best[1], best[0])
    nmatch, rms, m = best
    if nmatch < need:
        raise RegistrationError(
            f"no consistent star pattern match (best {nmatch} matched stars, rms "
            f"{rms:.2f} px, need {need} within {_REFINE_RADII[-1]} px and rms <= {max_rms} px; "
            f"{len(frame_xy)} frame / {len(ref_xy)} reference stars)")
    t = Transform(matrix=m, rms_px=rms, nmatch=nmatch, center=_center(shape))
    log.debug("registered: dx=%.2f dy=%.2f rot=%.3f deg scale=%.5f rms=%.3f px n=%d",
              t.dx, t.dy, t.rotation_deg, t.scale, rms, nmatch)
    return t


def warp_to_reference(data: np.ndarray, transform: Transform, ref_shape: tuple[int, int],
                      order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Resample ``data`` (a frame) onto the reference grid.

    Returns ``(image, valid)``: float32 image on the reference grid and a bool mask of the
    pixels whose source position lies inside the frame and is not NaN (a masked pixel, e.g.
    vignetted; bilinear spreads it to its neighbours); the others are 0.0 in ``image``.

    Bilinear (``order=1``) is the default, through OpenCV's ``warpAffine`` (15x faster
    than ``scipy.ndimage.affine_transform`` on a 2048 px float32 frame: 7 ms against 100 ms;
    it places sub-pixel positions on a 1/32 px table, far below the centroid errors).
    It does not ring around sharp stars or hot pixels; its price is a smoothing of the
    pixel noise for fractional shifts (the per-pixel variance of a frame shifted by half
    a pixel in x and y falls to 0.25x ... up to 1x for whole-pixel shifts) while aperture
    sums keep their variance, so stack noise should be judged in apertures, not from the
    pixel-to-pixel scatter. ``order=3`` (a cubic spline, scipy) is there for comparisons.
    A pure whole-pixel shift is done by slicing (exact, no interpolation, no smoothing).
    """
    data = np.asarray(data)
    ny, nx = ref_shape
    m = transform.matrix
    src = data if data.dtype == np.float32 else data.astype(np.float32)
    if transform.shift_only(src.shape):
        tx, ty = float(m[0, 2]), float(m[1, 2])
        if abs(tx - round(tx)) <= 1e-3 and abs(ty - round(ty)) <= 1e-3:
            return _integer_shift(src, int(round(tx)), int(round(ty)), ref_shape)
    if order == 1:
        # the matrix maps reference (x, y) to frame (x, y): OpenCV's inverse map
        out = cv2.warpAffine(src, np.asarray(m[:2, :3], np.float64), (nx, ny),
                             flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=float("nan"))
        return _finish(out)
    # scipy works in (row, col): frame (row, col) = M @ (row, col)_ref + offset
    mat = np.array([[m[1, 1], m[1, 0]], [m[0, 1], m[0, 0]]])
    offset = np.array([m[1, 2], m[0, 2]])
    out = ndimage.affine_transform(src, mat, offset=offset, output_shape=(ny, nx), output=np.float32,
                                   order=order, mode="constant", cval=np.nan, prefilter=order > 1)
    return _finish(out)


def _finish(out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Turn the NaN fill of pixels from outside the frame into (image with 0.0, valid mask)."""
    valid = ~np.isnan(out)
    out[~valid] = 0.0
    return out, valid


def _integer_shift(data: np.ndarray, tx: int, ty: int, ref_shape: tuple[int, int]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Whole-pixel shift by slicing: out[y, x] = data[y + ty, x + tx]."""
    ny, nx = ref_shape
    out = np.full((ny, nx), np.nan, dtype=np.float32)
    fy, fx = data.shape
    y0, y1 = max(0, -ty), min(ny, fy - ty)
    x0, x1 = max(0, -tx), min(nx, fx - tx)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = data[y0 + ty:y1 + ty, x0 + tx:x1 + tx]
    return _finish(out)
