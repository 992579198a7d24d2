"""Forced aperture photometry and depth on the per-filter stacks (detection: :mod:`reduction.detection`,
PSF model and PSF photometry: :mod:`reduction.psf`).

Units, fixed here because every error bar depends on them:

* ``StackProduct.image`` is the weighted mean of N registered, background-subtracted
  frames, in ADU *per frame* (each frame of ``exptime`` seconds).  A star of total
  flux F [ADU per frame] therefore delivered ``N * F * gain`` electrons over the night.
* Fluxes leaving this module are aperture-corrected count rates in ADU/s
  (``flux_per_frame * aperture_correction / exptime``), so that
  ``mag = zeropoint - 2.5 log10(flux)`` holds column by column (README "Products").
* Errors follow the CCD equation for a mean of N frames (N = local ``nframes``):
  ``var(F) = F / (g N) + npix (1 + (pi/2) npix / nsky) * b / N`` with the per-frame,
  per-pixel background variance ``b = (sky_level g + rn^2) / g^2`` [ADU^2]; the
  ``pi/2`` is the variance of a median relative to a mean for the annulus sky.
  When the stack carries a variance plane, ``sum(variance in aperture)`` replaces
  the first two terms: by default (``variance_has_source=True``) the plane is the
  full variance of the image, stars' Poisson noise included, as the accumulator
  propagates it; set ``variance_has_source=False`` for a background-only plane
  and the ``F / (g N)`` term is added.
  The variance is the propagated (nominal) one on purpose: registration
  interpolation smooths the noise of single pixels, but an aperture sum keeps the
  full variance of the frames, so an empirical per-pixel variance would
  understate aperture errors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from astropy.table import Table
from photutils.aperture import CircularAperture, aperture_photometry
from scipy.spatial import cKDTree

from reduction.kernels import block_median
from reduction.psf import PSF_MODEL_ERROR, SATURATED_MODEL_FWHM, PSFFit, nearest_distance, saturated_wing_model

log = logging.getLogger(__name__)

#: Bit values of the ``flags`` column (OR-ed over filters in the catalogue).
FLAG_SATURATED = 1      # a saturated pixel (in any frame) lies inside the aperture
FLAG_BLENDED = 2        # neighbours' light left in the aperture (after subtraction of their PSF models, when
                        # fitted) above blend_level of the flux, or a pair the PSF fit cannot separate
FLAG_EDGE = 4           # aperture or annulus leaves the image or touches pixels no frame covered
FLAG_LOW_COVERAGE = 8   # nframes at the star < min_coverage * max(nframes)
FLAG_BITS = {FLAG_SATURATED: "saturated", FLAG_BLENDED: "blended", FLAG_EDGE: "edge",
             FLAG_LOW_COVERAGE: "low coverage"}

#: Default blend level: fraction of a star's aperture flux from its neighbours (issue 20).
BLEND_CONTAMINATION = 0.02
#: Relative error of a saturated star's flux fitted on its wings (the PSF's wings are the least known part).
SATURATED_PSF_ERROR = 0.1
#: Radius (in FWHM) of the "total flux" aperture of the curve of growth; inside the sky annulus.
APCORR_RADIUS_FWHM = 3.5
#: Radii (in FWHM) at which the curve of growth is sampled (also gives the PSF profile for blending).
COG_RADII_FWHM = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, APCORR_RADIUS_FWHM)
#: Variance of the median of n Gaussian values relative to that of their mean.
MEDIAN_VARIANCE_FACTOR = np.pi / 2
#: Stars for the curve of growth when too few are isolated: this many of the most isolated bright ones.
COG_CROWDED_STARS = 30
#: ... of which those whose neighbours leave less than this fraction of their light within the curve's last
#: radius (the 5 least contaminated at least).
COG_CROWDED_SPILL = 0.05


@dataclass
class StackProduct:
    """One filter's stack as measurement needs it (see the module docstring for units).

    ``variance`` is the per-pixel variance of ``image`` in ADU^2 (everything, the
    stars' Poisson noise included; set ``variance_has_source=False`` if it holds the
    background and read noise only), or None to derive it from gain, read noise,
    ``sky_level`` and ``nframes`` (the CCD equation).
    """

    filter: str
    image: np.ndarray
    nframes: np.ndarray
    variance: np.ndarray | None
    saturated: np.ndarray
    exptime: float
    gain: float
    read_noise: float
    n_combine: int
    fwhm_px: float
    zeropoint: float = 25.0
    sky_level: float = 0.0
    wcs: object | None = None
    variance_has_source: bool = True
    _background: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def background_variance(self) -> np.ndarray:
        """Per-pixel variance of the image without the stars [ADU^2]; inf where no frame covers.

        Computed once per stack and returned read-only: detection, both photometry passes and the
        depth figures ask for it, and its block median costs 0.2 s at 4096^2 (14 calls were 3.2 s
        of a 4096^2 night's 24 s).
        """
        if self._background is None:
            self._background = self._compute_background_variance()
            self._background.setflags(write=False)
        return self._background

    def _compute_background_variance(self) -> np.ndarray:
        n = self.nframes.astype(np.float32)
        if self.variance is not None and not self.variance_has_source:
            var = np.asarray(self.variance, dtype=np.float32).copy()
        elif self.variance is not None:
            # The plane holds the stars' own noise: a coarse block median keeps the sky part only.
            var = block_median(np.asarray(self.variance, dtype=np.float32), 64)
        else:
            per_frame = (max(self.sky_level, 0.0) * self.gain + self.read_noise ** 2) / self.gain ** 2
            with np.errstate(divide="ignore"):
                var = (per_frame / n).astype(np.float32)
        var[(n <= 0) | ~np.isfinite(var)] = np.inf
        return var

    def source_variance(self, flux: np.ndarray, nframes: np.ndarray) -> np.ndarray:
        """Poisson variance [ADU^2 per frame] of a mean of N frames with signal ``flux`` [ADU per frame]."""
        if self.variance is not None and self.variance_has_source:
            return np.zeros_like(np.asarray(flux, dtype=float))
        return np.clip(flux, 0, None) / (self.gain * np.clip(nframes, 1, None))


# --------------------------------------------------------------------------- photometry

def _positions_array(positions) -> np.ndarray:
    if isinstance(positions, Table):
        return np.column_stack([np.asarray(positions["x"], float), np.asarray(positions["y"], float)])
    return np.atleast_2d(np.asarray(positions, float))


def _sums(data: np.ndarray, apertures: list) -> list[np.ndarray]:
    """Exact aperture sums of ``data`` for each aperture (one photutils call)."""
    t = aperture_photometry(data, apertures, method="exact")
    return [np.asarray(t[f"aperture_sum_{i}"], float) for i in range(len(apertures))]


def _nanmedian_rows(values: np.ndarray) -> np.ndarray:
    """Median of each row ignoring NaN (NaN for an empty row); a sort, not numpy's per-row Python loop."""
    ordered = np.sort(values, axis=1)
    count = np.isfinite(values).sum(axis=1)
    rows = np.arange(len(values))
    lo = ordered[rows, np.clip((count - 1) // 2, 0, None)]
    hi = ordered[rows, np.clip(count // 2, 0, values.shape[1] - 1)]
    return np.where(count > 0, 0.5 * (lo + hi), np.nan)


def _clipped_median_rows(values: np.ndarray, clip: float, iterations: int, floor: np.ndarray | None = None
                         ) -> np.ndarray:
    """Median of each row after sigma clipping ``values`` in place (NaN: left out) at ``clip`` times the
    robust spread (1.4826 MAD, with ``floor`` per row in quadrature); NaN for an empty row."""
    for _ in range(iterations):
        med = _nanmedian_rows(values)
        std = 1.4826 * _nanmedian_rows(np.abs(values - med[:, None]))
        if floor is not None:
            std = np.hypot(std, floor)
        with np.errstate(invalid="ignore"):
            out = np.abs(values - med[:, None]) > clip * np.maximum(std, 1e-12)[:, None]
        if not out.any():
            break
        values[out] = np.nan
    return _nanmedian_rows(values)


def _annulus_sky(image: np.ndarray, bgvar: np.ndarray, mask: np.ndarray, xy: np.ndarray, r_in: float,
                 r_out: float, clip: float = 3.0, iterations: int = 5, floor: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sigma-clipped median sky, number of sky pixels used, and mean background variance, per annulus.

    ``floor`` (per source) joins the clipping's spread in quadrature: on a noiseless model image it is
    the sky noise of the real one, so that the model is clipped as the image would be.

    Vectorised over all sources on square cutouts (pixel centres decide membership),
    which is ~20x faster than photutils' ApertureStats with a SigmaClip per source at
    a thousand stars; a median does not need partial-pixel weights.
    """
    if len(xy) > 500:     # bound the memory of the cutouts (n x (2 r_out)^2 values)
        parts = [_annulus_sky(image, bgvar, mask, xy[i:i + 500], r_in, r_out, clip, iterations,
                              None if floor is None else floor[i:i + 500]) for i in range(0, len(xy), 500)]
        return tuple(np.concatenate(p) for p in zip(*parts))
    r = int(np.ceil(r_out)) + 1
    off = np.arange(-r, r + 1)
    ix, iy = np.rint(xy[:, 0]).astype(int), np.rint(xy[:, 1]).astype(int)
    gx = ix[:, None, None] + off[None, None, :]
    gy = iy[:, None, None] + off[None, :, None]
    d2 = (gx - xy[:, 0, None, None]) ** 2 + (gy - xy[:, 1, None, None]) ** 2
    ny, nx = image.shape
    inside = (gx >= 0) & (gx < nx) & (gy >= 0) & (gy < ny)
    gxc, gyc = np.clip(gx, 0, nx - 1), np.clip(gy, 0, ny - 1)
    ring = (d2 >= r_in ** 2) & (d2 <= r_out ** 2) & inside
    n = len(xy)
    shape = (n, (2 * r + 1) ** 2)
    ring_all = np.broadcast_to(ring, (n, 2 * r + 1, 2 * r + 1)).reshape(shape)
    usable = ring_all & ~mask[gyc, gxc].reshape(shape)
    # Fall back to the unmasked ring where neighbours cover most of it.
    sparse = usable.sum(axis=1) < 0.2 * ring_all.sum(axis=1)
    usable[sparse] = ring_all[sparse]
    values = np.where(usable, image[gyc, gxc].reshape(shape), np.nan)
    sky = np.nan_to_num(_clipped_median_rows(values, clip, iterations, floor))
    nsky = np.isfinite(values).sum(axis=1).astype(float)
    var_ring = np.where(ring_all, bgvar[gyc, gxc].reshape(shape), np.nan)
    with np.errstate(invalid="ignore"):
        var_mean = np.nan_to_num(np.nanmean(var_ring, axis=1))
    nsky = np.where(nsky > 0, nsky, np.pi * (r_out ** 2 - r_in ** 2))
    return sky, nsky, var_mean


def _mask_radii(positions, n: int, fwhm: float) -> np.ndarray:
    """Radius around each source kept out of the sky annuli: wider for brighter stars."""
    snr = np.asarray(positions["snr"], float) if isinstance(positions, Table) and "snr" in positions.colnames \
        else np.full(n, 10.0)
    return fwhm * np.clip(1.0 + 0.75 * np.log10(np.clip(snr, 1, None)), 1.5, 4.0)


def _source_mask(shape: tuple[int, int], xy: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Boolean mask of disks around the sources.

    Faint neighbours in an annulus bias even a clipped median upwards (about one
    faint star per annulus in a cluster field), which shows as fluxes too low by a
    good fraction of their error; masking the known sources removes most of it.
    """
    mask = np.zeros(shape, bool)
    ny, nx = shape
    for (x, y), r in zip(xy, radii):
        x0, x1 = max(int(x - r), 0), min(int(x + r) + 2, nx)
        y0, y1 = max(int(y - r), 0), min(int(y + r) + 2, ny)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        mask[y0:y1, x0:x1] |= (xx - x) ** 2 + (yy - y) ** 2 <= r * r
    return mask


def _psf_profile(cog_r: np.ndarray, cog_ee: np.ndarray):
    """Surface brightness of a unit-flux star at distance r, from the measured curve of growth (dEE /
    d(pi r^2)), extrapolated as r^-3 beyond its last radius (a real PSF's scattered-light aureole falls
    about so; a Moffat's wing falls faster, so the far light is if anything overestimated)."""
    mid = 0.5 * (cog_r[1:] + cog_r[:-1])
    sb = np.clip(np.diff(cog_ee) / (np.pi * np.diff(cog_r ** 2)), 1e-8, None)

    def profile(r: np.ndarray) -> np.ndarray:
        r = np.asarray(r, float)
        inner = np.exp(np.interp(r, mid, np.log(sb)))
        return np.where(r > mid[-1], sb[-1] * (mid[-1] / np.maximum(r, 1e-6)) ** 3, inner)

    return profile


@dataclass(frozen=True)
class _Wings:
    """The saturated stars' wings (:func:`reduction.psf.saturated_wing_model`) and the other stars within
    their reach, annulus included (only those are measured on the model: at 4096^2 measuring all 12000
    stars on it doubled the photometry's time)."""

    model: np.ndarray
    touched: np.ndarray


def _saturated_wings(image: np.ndarray, saturated: np.ndarray, xy: np.ndarray, peaked: np.ndarray, fwhm: float,
                     r_out: float) -> _Wings | None:
    """:class:`_Wings` of the stars ``peaked`` (saturated at their centre); None without any."""
    if not peaked.any():
        return None
    d, _ = cKDTree(xy[peaked]).query(xy, distance_upper_bound=SATURATED_MODEL_FWHM * fwhm + r_out + 2)
    return _Wings(saturated_wing_model(image, saturated, xy[peaked], fwhm), np.nonzero(np.isfinite(d) & ~peaked)[0])


def _wing_light(wings: _Wings | None, bgvar: np.ndarray, sky_mask: np.ndarray, xy: np.ndarray,
                radius: float, annulus: tuple[float, float], noise: np.ndarray) -> np.ndarray:
    """Saturated stars' light (``wings``) each star keeps within ``radius`` after its annulus sky took its
    share: the model's sum there minus the area times the model's annulus median, masked and clipped as
    the image's is (at the sky ``noise``). Negative where the annulus took more than the aperture holds
    (a saturated star in the annulus: the star reads faint by it). Zero at the saturated stars
    themselves, whose own wings the model is, and beyond the wings' reach.

    Their clipped aperture sums made a 12th-magnitude star's light on a 17th-magnitude neighbour 6 px
    away read as 0.02 of its flux where it was 0.3 (the neighbour went unflagged, 0.27 mag bright).
    """
    left = np.zeros(len(xy))
    if wings is None or not len(wings.touched):
        return left
    near = xy[wings.touched]
    level = _annulus_sky(wings.model, bgvar, sky_mask, near, *annulus, floor=noise[wings.touched])[0]
    left[wings.touched] = _sums(wings.model, [CircularAperture(near, radius)])[0] - np.pi * radius ** 2 * level
    return left


def _neighbour_contamination(xy: np.ndarray, own: np.ndarray, light: np.ndarray, r_ap: float,
                             annulus: tuple[float, float], mask_radii: np.ndarray, noise: np.ndarray,
                             reach: float, profile, wing_light: np.ndarray) -> np.ndarray:
    """Fraction of each star's aperture flux ``own`` that its neighbours within ``reach`` leave in it,
    with the saturated stars' ``wing_light`` (:func:`_wing_light`) on top.

    ``light`` is each unsaturated star's flux in the units of ``profile`` (:func:`_psf_profile`). A
    neighbour puts the profile's surface brightness at its distance times the aperture area into the
    aperture, and the star's own annulus sky (``annulus`` radii, the neighbour's disc of ``mask_radii``
    left out and clipped at the sky ``noise`` per pixel, as :func:`_annulus_sky` does) takes away its
    clipped median over the annulus: only the excess is left. Counting it all flagged the stars of a
    crowded centre on the smooth wings of saturated stars 20-30 px away, with magnitudes right to 0.001.
    The fraction is of the net light's size: a saturated star's wing in the annulus takes more than it
    leaves (``wing_light`` < 0), and at 6-8 px stars 0.05-0.10 mag faint from it went unflagged.
    """
    n = len(xy)
    contamination = np.asarray(wing_light, float).copy()
    pairs = cKDTree(xy).query_pairs(reach, output_type="ndarray") if n > 1 else np.zeros((0, 2), int)
    light = np.clip(np.nan_to_num(light), 0, None)
    samples, disc = _annulus_samples(*annulus), _disc_samples(r_ap)
    for chunk in range(0, len(pairs), 20000):        # bounds the pairs x samples arrays
        i, j = pairs[chunk:chunk + 20000].T
        offset = xy[j] - xy[i]
        in_aperture = _disc_mean(disc, offset, profile)
        for target, source, towards in ((i, j, offset), (j, i, -offset)):
            level = _annulus_level(samples, towards, mask_radii[source], profile, light[source], noise[target])
            np.add.at(contamination, target, np.clip(light[source] * in_aperture - level, 0, None) * np.pi * r_ap ** 2)
    own = np.clip(own, 0, None)
    contamination = np.abs(contamination)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(own > 0, contamination / own, np.inf)
    frac[contamination == 0] = 0.0
    return frac


def _curve_contamination(wings: _Wings | None, bgvar: np.ndarray, sky_mask: np.ndarray, xy: np.ndarray,
                         flux_aper: np.ndarray, annulus: tuple[float, float], mask_radii: np.ndarray,
                         noise: np.ndarray, cog_r: np.ndarray, fwhm: float, peaked: np.ndarray) -> np.ndarray:
    """Fraction of each star's flux its neighbours leave within the curve of growth's last radius,
    before any curve is measured: the unsaturated neighbours' profile is a Moffat's (beta 3) of the
    stack's FWHM, the saturated ones are their ``wings``."""
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / 3) - 1))
    profile = _psf_profile(cog_r, 1 - (1 + (cog_r / alpha) ** 2) ** -2)
    wing = _wing_light(wings, bgvar, sky_mask, xy, cog_r[-1], annulus, noise)
    return _neighbour_contamination(xy, flux_aper, np.where(peaked, 0.0, flux_aper), cog_r[-1], annulus,
                                    mask_radii, noise, cog_r[-1] + 4 * fwhm, profile, wing)


def _polar_points(radii: np.ndarray, n_angles: int) -> np.ndarray:
    """Points on rings of ``radii`` at ``n_angles`` equal angles, as offsets from their centre."""
    a = np.arange(n_angles) * (2 * np.pi / n_angles)
    return np.column_stack([(radii[:, None] * np.cos(a)).ravel(), (radii[:, None] * np.sin(a)).ravel()])


def _distances(points: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Distance of each of ``points`` (columns) from each of ``offsets`` (rows)."""
    return np.hypot(points[None, :, 0] - offsets[:, None, 0], points[None, :, 1] - offsets[:, None, 1])


def _disc_samples(radius: float) -> np.ndarray:
    """Equal-area points over a disc (6 rings x 24 angles), as offsets from its centre."""
    return _polar_points(radius * np.sqrt((np.arange(6) + 0.5) / 6), 24)


def _disc_mean(disc: np.ndarray, offset: np.ndarray, profile) -> np.ndarray:
    """Mean surface brightness over an aperture (``disc`` samples) of a unit star at each ``offset``.

    Why not the profile at the centre: a wing is steep, and the aperture's near side sees far more of
    it. At 7 px FWHM a neighbour 18 px away (2.5 FWHM, aperture radius 10.7 px) put 3-4 times the
    central value into the aperture, and a star 0.06 mag bright went unflagged at 1.7 % contamination.
    The disc is symmetric, so either star of a pair may be the centre."""
    return profile(_distances(disc, offset)).mean(axis=1)


def _annulus_samples(r_in: float, r_out: float) -> np.ndarray:
    """Points spread over an annulus (3 radii x 32 angles), as offsets from its centre."""
    return _polar_points(r_in + (np.arange(3) + 0.5) * (r_out - r_in) / 3, 32)


def _annulus_level(samples: np.ndarray, towards: np.ndarray, mask_radius: np.ndarray, profile,
                   light: np.ndarray, noise: np.ndarray, clip: float = 3.0, iterations: int = 5) -> np.ndarray:
    """What a star's annulus sky takes of one neighbour's light per pixel: the neighbour (total ``light``)
    at offset ``towards``, its disc of ``mask_radius`` left out, over the annulus ``samples``, with the
    clipping of :func:`_annulus_sky` at the star's sky ``noise`` per pixel (a bright wing's steep side
    is clipped there: a plain median read the sky of a star 8 px from an 11.6 mag one high, and left it
    unflagged 0.14 mag bright). 0 where the mask leaves no sample."""
    d = _distances(samples, towards)
    values = np.where(d > mask_radius[:, None], light[:, None] * profile(d), np.nan)
    some = np.isfinite(values).any(axis=1)
    out = np.zeros(len(towards))
    out[some] = np.nan_to_num(_clipped_median_rows(values[some], clip, iterations, noise[some]))
    return out


def forced_photometry(stack: StackProduct, positions, aperture_fwhm: float = 1.5,
                      annulus_fwhm: tuple[float, float] = (4.0, 6.0), min_coverage: float = 0.5,
                      aperture_correction: float | None = None, psf_fit: PSFFit | None = None,
                      blend_level: float = BLEND_CONTAMINATION) -> Table:
    """Aperture photometry of ``stack`` at fixed ``positions`` (Table with x, y, or an (N, 2) array).

    With ``psf_fit`` (:func:`reduction.psf.fit_psf` at the same positions) every
    star is measured with its neighbours' models subtracted (their uncertainty and
    PSF_MODEL_ERROR of their light join the error), and saturated stars take the
    PSF flux of their unsaturated wings (SATURATED_PSF_ERROR joins the error).
    ``contamination`` is the fraction of the aperture flux the neighbours put there;
    a star is flagged blended when what is left of it after subtraction (or, without
    a PSF fit, all of it) exceeds ``blend_level``, or when the fit cannot tell it
    from its neighbour.  ``method`` says what measured each star: ``aperture``,
    ``subtracted`` (aperture after neighbour subtraction) or ``psf``.

    Columns: x, y, flux, fluxerr (aperture-corrected ADU/s), mag, magerr, flags,
    flux_aper (ADU per frame in the aperture, no correction), sky (local residual
    sky, ADU per frame per pixel), nframes, snr.  Non-positive fluxes give NaN
    magnitudes.  ``meta`` carries the aperture radius, the aperture correction
    (median ratio of the flux within APCORR_RADIUS_FWHM to that in the aperture for
    bright isolated unsaturated stars), its scatter and the number of stars used;
    pass ``aperture_correction`` to impose one instead.
    """
    xy = _positions_array(positions)
    n = len(xy)
    fwhm = float(stack.fwhm_px)
    r_ap = aperture_fwhm * fwhm
    r_in, r_out = annulus_fwhm[0] * fwhm, annulus_fwhm[1] * fwhm
    image = np.where(np.isfinite(stack.image), stack.image, 0).astype(np.float64)
    ny, nx = image.shape
    nmax = max(int(stack.nframes.max()), 1)
    ix = np.clip(np.rint(xy[:, 0]).astype(int), 0, nx - 1) if n else np.zeros(0, int)
    iy = np.clip(np.rint(xy[:, 1]).astype(int), 0, ny - 1) if n else np.zeros(0, int)
    nf = stack.nframes[iy, ix].astype(float)

    if n == 0:
        return _empty_table(stack, r_ap)

    aperture = CircularAperture(xy, r_ap)
    outer = CircularAperture(xy, r_out)
    bgvar = stack.background_variance()
    bgvar_finite = np.where(np.isfinite(bgvar), bgvar, 0.0)
    mask_radii = _mask_radii(positions, n, fwhm)
    sky_mask = (stack.nframes == 0) | _source_mask(image.shape, xy, mask_radii)
    model = psf_fit.model if psf_fit is not None else 0.0
    sky, nsky, sky_var_mean = _annulus_sky(image - model, bgvar_finite, sky_mask, xy, r_in, r_out)
    npix = np.pi * r_ap ** 2
    sky_noise = np.sqrt(sky_var_mean)

    cog_r = np.array(COG_RADII_FWHM) * fwhm
    raw = _sums(image, [aperture])[0]
    sat_sum = _sums(stack.saturated.astype(float), [aperture])[0]
    uncovered = _sums((stack.nframes == 0).astype(float), [outer])[0]
    full_plane = stack.variance is not None and stack.variance_has_source
    aperture_var = np.where(np.isfinite(stack.variance), stack.variance, 0) if full_plane else bgvar_finite
    var_sum = _sums(np.asarray(aperture_var, float), [aperture])[0]
    neighbours, neighbours_var = _neighbour_light(psf_fit, aperture, r_ap, n)
    flux_aper = raw - neighbours - sky * npix

    # Flags that do not depend on the fluxes of the neighbours.
    flags = np.zeros(n, np.int64)
    flags[sat_sum > 0] |= FLAG_SATURATED
    off_image = (xy[:, 0] - r_out < -0.5) | (xy[:, 0] + r_out > nx - 0.5) | \
                (xy[:, 1] - r_out < -0.5) | (xy[:, 1] + r_out > ny - 0.5)
    flags[off_image | (uncovered > 0)] |= FLAG_EDGE
    flags[nf < min_coverage * nmax] |= FLAG_LOW_COVERAGE

    # Errors (see the module docstring): background in the aperture, the annulus median, the star.
    var = (var_sum + MEDIAN_VARIANCE_FACTOR * npix ** 2 * np.nan_to_num(sky_var_mean) / nsky
           + stack.source_variance(flux_aper, nf) + neighbours_var)
    err_aper = np.sqrt(var)

    # Curve of growth on bright isolated unsaturated stars -> aperture correction and PSF profile.
    nearest = nearest_distance(xy)
    snr = np.divide(flux_aper, err_aper, out=np.zeros_like(flux_aper, dtype=float), where=err_aper > 0)
    candidates = np.nonzero((flags == 0) & (nearest > r_out) & (snr > 50))[0]
    crowded = len(candidates) < 5
    peaked = stack.saturated[iy, ix]
    wings = _saturated_wings(image, stack.saturated, xy, peaked, fwhm, r_out) if crowded or psf_fit is None else None
    if crowded:
        # Crowded, or poor seeing (r_out is 50 px at FWHM 8.5): the most isolated of the bright stars, for
        # the median curve to be a star's and not its neighbours' (all of them gave corrections of 2).
        # Ranked by the light their neighbours leave within the curve's last radius, a saturated star's
        # from its wings: by the nearest detection alone, stars on a saturated star's wing were taken and
        # corrections of 4-12 came out on a colour camera's crowded half-resolution planes.
        pool = np.nonzero(((flags & (FLAG_SATURATED | FLAG_EDGE)) == 0) & (snr > 20))[0]
        spill = _curve_contamination(wings, bgvar_finite, sky_mask, xy, flux_aper, (r_in, r_out), mask_radii,
                                     sky_noise, cog_r, fwhm, peaked)
        least = pool[np.argsort(spill[pool])]
        candidates = least[:max(5, int((spill[least[:COG_CROWDED_STARS]] < COG_CROWDED_SPILL).sum()))]
    candidates = candidates[np.argsort(-snr[candidates])][:100]
    cog_ee = np.interp(cog_r, [0, cog_r[-1]], [0, 1])  # placeholder profile when no star qualifies
    ratio_used = np.array([])
    if len(candidates):
        sub = xy[candidates]
        sums = _sums(image, [CircularAperture(sub, r) for r in cog_r])
        curves = np.array([s - sky[candidates] * np.pi * r ** 2 for s, r in zip(sums, cog_r)]).T
        total = curves[:, -1]
        good = total > 0
        curves = curves[good] / total[good, None]
        if len(curves):
            cog_ee = np.median(curves, axis=0)
            at_ap = np.array([np.interp(r_ap, cog_r, c) for c in curves])
            ratio_used = 1.0 / at_ap[at_ap > 0]
    if crowded and psf_fit is not None and len(candidates):
        # The fitted PSF's own curve of growth at the same stars: no neighbour light in it (measured on
        # the image, neighbours within 3.5 FWHM raised the correction from 1.1 to 1.8 at FWHM 8.5 px).
        # Only when crowded: on isolated stars the image's curves are unbiased, and the model's, through
        # its interpolation, 0.3% high.
        inner = _aperture_fractions(psf_fit, r_ap)[candidates]
        whole = _aperture_fractions(psf_fit, cog_r[-1])[candidates]
        ratio_used = whole[inner > 0] / inner[inner > 0]
    if aperture_correction is not None:
        apcorr, apcorr_err = float(aperture_correction), 0.0
    elif len(ratio_used):
        apcorr = float(np.median(ratio_used))
        apcorr_err = float(1.4826 * np.median(np.abs(ratio_used - apcorr)))
    else:
        apcorr, apcorr_err = 1.0, float("nan")
        log.warning("%s: no star fit for an aperture correction; using 1.0", stack.filter)

    method = np.full(n, "aperture", dtype="<U10")
    with np.errstate(divide="ignore", invalid="ignore"):
        if psf_fit is None:
            profile = _psf_profile(cog_r, cog_ee)
            wing = _wing_light(wings, bgvar_finite, sky_mask, xy, r_ap, (r_in, r_out), sky_noise)
            contamination = _neighbour_contamination(xy, flux_aper, np.where(peaked, 0.0, flux_aper * apcorr),
                                                     r_ap, (r_in, r_out), mask_radii, sky_noise,
                                                     r_ap + 2 * cog_r[-1], profile, wing)
            left = contamination
        else:
            contamination = np.where(flux_aper > 0, np.clip(neighbours, 0, None) / flux_aper, np.inf)
            left = np.where(flux_aper > 0, np.sqrt(neighbours_var) / flux_aper, np.inf)
            method[(contamination > blend_level) & np.isfinite(contamination)] = "subtracted"
    contamination[~np.isfinite(contamination)] = 1.0
    blended = left > blend_level
    rate = flux_aper * apcorr / stack.exptime
    if psf_fit is None:
        # The neighbour light an unflagged star keeps (up to blend_level of its flux) is not subtracted:
        # its size is an error. Without it, stars 1-2 % contaminated at FWHM 2 px were 0.01-0.02 mag
        # bright on errors of 0.0015 (a pull of 1.64).
        err_aper = np.hypot(err_aper, np.clip(left, 0, blend_level) * np.abs(flux_aper))
    rate_err = err_aper * apcorr / stack.exptime
    if psf_fit is not None:
        blended |= ~psf_fit.separable & (contamination > blend_level)
        rate, rate_err, scale = _saturated_from_psf(psf_fit, stack.saturated[iy, ix], candidates, flux_aper * apcorr,
                                                    rate, rate_err, stack.exptime, method)
    flags[blended] |= FLAG_BLENDED
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.where(rate > 0, stack.zeropoint - 2.5 * np.log10(np.where(rate > 0, rate, 1)), np.nan)
        magerr = np.where(rate > 0, 2.5 / np.log(10) * rate_err / np.where(rate > 0, rate, 1), np.nan)

    table = Table({"x": xy[:, 0], "y": xy[:, 1], "flux": rate, "fluxerr": rate_err, "mag": mag,
                   "magerr": magerr, "flags": flags, "flux_aper": flux_aper, "sky": sky,
                   "nframes": nf.astype(np.int32), "snr": snr, "contamination": contamination,
                   "method": method})
    table["flux"].unit = table["fluxerr"].unit = "adu / s"
    table.meta.update(filter=stack.filter, zeropoint=stack.zeropoint, exptime=stack.exptime,
                      aperture_radius_px=r_ap, annulus_px=(r_in, r_out), fwhm_px=fwhm,
                      aperture_correction=apcorr, aperture_correction_scatter=apcorr_err,
                      aperture_correction_nstars=int(len(ratio_used)),
                      psf_to_total=float(scale) if psf_fit is not None else float("nan"),
                      curve_of_growth={"radius_px": cog_r.tolist(), "fraction": np.asarray(cog_ee).tolist()})
    return table


def _neighbour_light(psf_fit: PSFFit | None, aperture: CircularAperture, r_ap: float, n: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Neighbours' modelled light in each aperture and its variance (their flux errors, correlated, and
    PSF_MODEL_ERROR of it for the PSF's own imperfection); zeros without a PSF fit."""
    if psf_fit is None:
        return np.zeros(n), np.zeros(n)
    own = _aperture_fractions(psf_fit, r_ap)
    err = np.where(np.isfinite(psf_fit.flux_err), psf_fit.flux_err, 0.0)
    total, sigma = _sums(psf_fit.model, [aperture])[0], _sums(psf_fit.model_sigma, [aperture])[0]
    light = total - psf_fit.flux * own
    light_sigma = np.clip(sigma - err * own, 0, None)
    return light, light_sigma ** 2 + (PSF_MODEL_ERROR * light) ** 2


def _aperture_fractions(psf_fit: PSFFit, r_ap: float) -> np.ndarray:
    """Exact fraction of each star's own unit PSF stamp inside its aperture."""
    half = psf_fit.stamps.shape[1] // 2
    out = np.zeros(len(psf_fit.x))
    for i, mask in enumerate(CircularAperture(np.column_stack([psf_fit.x, psf_fit.y]), r_ap).to_mask(method="exact")):
        x0 = int(np.rint(psf_fit.x[i])) - half
        y0 = int(np.rint(psf_fit.y[i])) - half
        sy = slice(mask.bbox.iymin - y0, mask.bbox.iymax - y0)
        sx = slice(mask.bbox.ixmin - x0, mask.bbox.ixmax - x0)
        stamp = psf_fit.stamps[i][sy, sx]
        if stamp.shape == mask.data.shape:
            out[i] = float((stamp * mask.data).sum())
    return out


def _saturated_from_psf(psf_fit: PSFFit, core_saturated: np.ndarray, reference: np.ndarray, total_flux: np.ndarray,
                        rate: np.ndarray, rate_err: np.ndarray, exptime: float, method: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, float]:
    """Rates of the stars saturated at their centre from their wings' PSF flux, on the aperture-corrected
    scale of the ``reference`` (bright isolated) stars; returns the new rates, errors and the PSF-to-total
    scale.  A star with only a neighbour's saturated pixels in its aperture keeps its (subtracted) aperture."""
    good = reference[(psf_fit.flux[reference] > 0) & (total_flux[reference] > 0)]
    if not len(good):
        return rate, rate_err, float("nan")
    scale = float(np.median(total_flux[good] / psf_fit.flux[good]))
    use = core_saturated & (psf_fit.flux > 0) & np.isfinite(psf_fit.flux_err)
    rate, rate_err = rate.copy(), rate_err.copy()
    rate[use] = psf_fit.flux[use] * scale / exptime
    rate_err[use] = np.hypot(psf_fit.flux_err[use] * scale / exptime, SATURATED_PSF_ERROR * rate[use])
    method[use] = "psf"
    return rate, rate_err, scale


def _empty_table(stack: StackProduct, r_ap: float) -> Table:
    cols = {"x": float, "y": float, "flux": float, "fluxerr": float, "mag": float, "magerr": float,
            "flags": np.int64, "flux_aper": float, "sky": float, "nframes": np.int32, "snr": float,
            "contamination": float, "method": "<U10"}
    table = Table({k: np.zeros(0, dtype=v) for k, v in cols.items()})
    table.meta.update(filter=stack.filter, zeropoint=stack.zeropoint, aperture_radius_px=r_ap,
                      aperture_correction=1.0, aperture_correction_scatter=float("nan"),
                      aperture_correction_nstars=0)
    return table


# --------------------------------------------------------------------------- depth

def _aperture_background_variance(stack: StackProduct, aperture_fwhm: float,
                                  annulus_fwhm: tuple[float, float]) -> tuple[float, float]:
    """(background variance of an aperture sum [ADU^2], typical nframes) over the covered field."""
    covered = stack.nframes > 0
    if not covered.any():
        return float("inf"), 0.0
    n_typ = float(np.median(stack.nframes[covered]))
    bg = stack.background_variance()
    pix_var = float(np.median(bg[covered]))
    r_ap = aperture_fwhm * stack.fwhm_px
    npix = np.pi * r_ap ** 2
    nsky = np.pi * stack.fwhm_px ** 2 * (annulus_fwhm[1] ** 2 - annulus_fwhm[0] ** 2)
    return npix * pix_var * (1 + MEDIAN_VARIANCE_FACTOR * npix / nsky), n_typ


def snr_at(stack: StackProduct, mag: float, aperture_fwhm: float = 1.5,
           annulus_fwhm: tuple[float, float] = (4.0, 6.0), aperture_correction: float = 1.0) -> float:
    """S/N of a star of magnitude ``mag`` in the stack (CCD equation at the typical coverage).

    ``aperture_correction`` (total / aperture flux, the catalogue meta value) converts
    the total magnitude to the flux actually inside the aperture.
    """
    bvar, n_typ = _aperture_background_variance(stack, aperture_fwhm, annulus_fwhm)
    if n_typ <= 0:
        return 0.0
    flux = 10 ** (-0.4 * (mag - stack.zeropoint)) * stack.exptime / aperture_correction
    var = bvar + max(flux, 0.0) / (stack.gain * n_typ)
    return float(flux / np.sqrt(var))


def limiting_magnitude(stack: StackProduct, sigma: float = 5.0, aperture_fwhm: float = 1.5,
                       annulus_fwhm: tuple[float, float] = (4.0, 6.0), aperture_correction: float = 1.0) -> float:
    """Magnitude of a point source detected at ``sigma`` in the aperture (inverse of :func:`snr_at`)."""
    bvar, n_typ = _aperture_background_variance(stack, aperture_fwhm, annulus_fwhm)
    if n_typ <= 0 or not np.isfinite(bvar):
        return float("nan")
    # F^2 = s^2 (a F + B) with a = 1/(g N) for the star's own Poisson noise.
    a = 1.0 / (stack.gain * n_typ)
    s2 = sigma ** 2
    flux = 0.5 * (s2 * a + np.sqrt((s2 * a) ** 2 + 4 * s2 * bvar))
    rate = flux * aperture_correction / stack.exptime
    return float(stack.zeropoint - 2.5 * np.log10(rate))
