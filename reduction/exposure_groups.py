"""Short and long exposures in one catalogue: each star from the deepest group where it is unsaturated.

On a small telescope the turn-off and the giants, which the age rests on,
saturate in the 30-60 s frames that reach the main sequence; observers take a
few short frames for them. Each exposure group is stacked on its own (same
grid); here the long groups' catalogue is completed from the shorter ones:

- positions stay those of the catalogue (detected on the deepest stacks), and
  every shorter group is measured there by forced photometry;
- a star whose measurement in the longer group is saturated, or peaks above
  ``nonlinear_fraction`` of the saturation level (non-linear before it clips),
  takes the shorter group's measurement when that one is clean;
- the shorter group is put on the longer one's scale by the median magnitude
  offset of the stars both measure well (fitted on stars, not assumed from the
  exposure-time ratio: shutter timing and non-linearity make it differ), and
  that offset's error is added to the taken magnitudes' errors;
- a star is flagged saturated only when it is saturated in every group.
"""

from __future__ import annotations

import logging

import numpy as np
from astropy.table import Table, vstack
from scipy.spatial import cKDTree

from reduction.detection import detect_sources_multi
from reduction.photometry import FLAG_BLENDED, FLAG_SATURATED, StackProduct, forced_photometry

log = logging.getLogger(__name__)

#: Stars both groups measure better than this (mag) tie the groups' scales together.
TIE_MAX_MAGERR = 0.03
#: A shorter group's measurement replaces a saturated one only when it is this good (mag).
TAKE_MAX_MAGERR = 0.1
#: A short group's star within this many FWHM of a catalogue star is that star (saturated centroids
#: of the long stacks can be off by a few px); the short group's position is then the better one.
SAME_STAR_FWHM = 1.5
#: At least this many tie stars, or the offset is taken as 0 (and said so in the metadata).
TIE_MIN_STARS = 5
#: Half-size (px) of the box in which a star's peak is read.
PEAK_HALF_BOX = 2


def star_peaks(stack: StackProduct, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Highest raw level (stack pixel + the sky removed) in a small box at each position, in ADU per frame."""
    ny, nx = stack.image.shape
    xi = np.clip(np.rint(x).astype(int), 0, nx - 1)
    yi = np.clip(np.rint(y).astype(int), 0, ny - 1)
    peak = np.full(len(xi), -np.inf)
    for dy in range(-PEAK_HALF_BOX, PEAK_HALF_BOX + 1):
        for dx in range(-PEAK_HALF_BOX, PEAK_HALF_BOX + 1):
            peak = np.maximum(peak, stack.image[np.clip(yi + dy, 0, ny - 1), np.clip(xi + dx, 0, nx - 1)])
    return peak + stack.sky_level


def saturation_magnitude(stack: StackProduct, catalog: Table, saturation_adu: float) -> float:
    """The magnitude at which a star's peak reaches saturation in this stack's unit frame (nan: unknown).

    A star's peak scales with its flux for a given PSF, so the flux at
    saturation is ``flux * (saturation - sky) / peak`` over the catalogue's clean
    stars whose peaks this stack measures well (between 5% and 70% of saturation).
    """
    name = stack.filter
    x, y = np.asarray(catalog["x"], float), np.asarray(catalog["y"], float)
    flux = np.asarray(catalog[f"flux_{name}"], float)
    peak = star_peaks(stack, x, y) - stack.sky_level
    clean = (np.asarray(catalog["flags"]) == 0) & (flux > 0) & np.isfinite(flux)
    ok = clean & (peak > 0.05 * saturation_adu) & (peak < 0.7 * saturation_adu)
    if ok.sum() < 3:
        return float("nan")
    flux_per_peak = float(np.median(flux[ok] / peak[ok]))
    return float(stack.zeropoint - 2.5 * np.log10(flux_per_peak * (saturation_adu - stack.sky_level)))


def merge_exposure_groups(catalog: Table, groups: dict[str, list[StackProduct]], *, color: tuple[str, str],
                          saturation_adu: float, nonlinear_fraction: float = 0.8, aperture_fwhm: float = 1.5,
                          annulus_fwhm: tuple[float, float] = (4.0, 6.0), min_coverage: float = 0.5,
                          detect_sigma: float = 5.0) -> Table:
    """The catalogue of the longest groups completed from the shorter ones (see the module docstring).

    ``groups`` maps every filter of the catalogue to its groups' stacks, longest
    first (the first is the one ``catalog`` was measured on). Adds
    ``exptime_<filter>`` (the group each magnitude came from) and
    ``meta["exposure_groups"]``.
    """
    out = _with_short_detections(catalog, groups, detect_sigma=detect_sigma, min_coverage=min_coverage)
    new = np.asarray(out["id"]) > len(catalog)
    x, y = np.asarray(out["x"], float), np.asarray(out["y"], float)
    positions = np.column_stack([x, y])
    level = nonlinear_fraction * saturation_adu
    saturated = np.zeros(len(out), bool)
    meta: dict[str, list[dict]] = {}
    for fname, stacks in groups.items():
        long = stacks[0]
        phot = forced_photometry(long, positions, aperture_fwhm=aperture_fwhm, annulus_fwhm=annulus_fwhm,
                                 min_coverage=min_coverage,
                                 aperture_correction=catalog.meta["aperture_correction"][fname])
        flagged = (np.asarray(phot["flags"]) & FLAG_SATURATED) > 0
        for col in ("flux", "fluxerr", "mag", "magerr"):      # the stars only the short groups found
            out[f"{col}_{fname}"][new] = np.asarray(phot[col], float)[new]
        out["flags"][new] |= np.asarray(phot["flags"], np.int64)[new]
        out[f"exptime_{fname}"] = np.full(len(out), long.exptime)
        if len(stacks) == 1:            # nothing to take instead: the flag alone, as without groups
            saturated |= flagged
            continue
        bad = flagged | (star_peaks(long, x, y) >= level)
        meta[fname] = [{"exptime": long.exptime, "n_stars": int(np.sum(np.isfinite(phot["mag"]) & ~bad)),
                        "offset": 0.0, "offset_err": 0.0, "n_tie": 0}]
        for short in stacks[1:]:
            sphot = forced_photometry(short, positions, aperture_fwhm=aperture_fwhm, annulus_fwhm=annulus_fwhm,
                                      min_coverage=min_coverage)
            sbad = ((np.asarray(sphot["flags"]) & FLAG_SATURATED) > 0) | (star_peaks(short, x, y) >= level)
            smag, serr = np.asarray(sphot["mag"], float), np.asarray(sphot["magerr"], float)
            lmag, lerr = np.asarray(out[f"mag_{fname}"], float), np.asarray(out[f"magerr_{fname}"], float)
            blended = ((np.asarray(sphot["flags"]) | np.asarray(out["flags"])) & FLAG_BLENDED) > 0
            tie = ~bad & ~sbad & ~blended & np.isfinite(smag) & np.isfinite(lmag) & (serr < TIE_MAX_MAGERR) \
                & (lerr < TIE_MAX_MAGERR)
            offset, offset_err = _tie_offset(lmag[tie] - smag[tie])
            take = bad & ~sbad & np.isfinite(smag) & (serr < TAKE_MAX_MAGERR)
            scale = 10 ** (-0.4 * offset)
            out[f"mag_{fname}"][take] = smag[take] + offset
            out[f"magerr_{fname}"][take] = np.hypot(serr[take], offset_err if np.isfinite(offset_err) else 0.0)
            out[f"flux_{fname}"][take] = np.asarray(sphot["flux"], float)[take] * scale
            out[f"fluxerr_{fname}"][take] = np.asarray(sphot["fluxerr"], float)[take] * scale
            out[f"exptime_{fname}"][take] = short.exptime
            meta[fname].append({"exptime": short.exptime, "n_stars": int(take.sum()), "offset": offset,
                                "offset_err": offset_err, "n_tie": int(tie.sum())})
            log.info("exposure groups %s: %d stars from %g s (offset %+.4f +- %.4f mag from %d stars)", fname,
                     int(take.sum()), short.exptime, offset, offset_err, int(tie.sum()))
            bad &= ~take
        saturated |= bad
    flags = np.asarray(out["flags"], np.int64)
    out["flags"] = (flags & ~FLAG_SATURATED) | np.where(saturated, FLAG_SATURATED, 0)
    out["color"] = out[f"mag_{color[0]}"] - out[f"mag_{color[1]}"]
    out.meta["exposure_groups"] = meta
    return out


def _with_short_detections(catalog: Table, groups: dict[str, list[StackProduct]], detect_sigma: float,
                           min_coverage: float) -> Table:
    """The catalogue with the bright stars as the shortest stacks see them.

    A saturated star's centroid in a long stack is the centre of a flat-topped
    blob, and two saturated neighbours merge into one; the shortest stacks
    resolve both. Their detections move a saturated catalogue star to the short
    position, and stars the long stacks missed become new rows (ids after the
    catalogue's, measurements NaN until forced photometry fills them).
    """
    shortest = [stacks[-1] for stacks in groups.values() if len(stacks) > 1]
    out = catalog.copy()
    if not shortest:
        return out
    found = detect_sources_multi(shortest, sigma=detect_sigma, min_coverage=min_coverage)
    if len(found) == 0:
        return out
    fwhm = float(np.nanmean([s.fwhm_px for s in shortest]))
    sxy = np.column_stack([np.asarray(found["x"], float), np.asarray(found["y"], float)])
    cxy = np.column_stack([np.asarray(out["x"], float), np.asarray(out["y"], float)])
    saturated = (np.asarray(out["flags"]) & FLAG_SATURATED) > 0
    matched = np.zeros(len(sxy), bool)
    if len(cxy):
        # One to one: each catalogue star takes its nearest short detection; a second detection near it
        # is a neighbour the long stacks merged into the saturated blob, and becomes a star of its own.
        dist, idx = cKDTree(sxy).query(cxy, distance_upper_bound=SAME_STAR_FWHM * fwhm)
        for row in np.argsort(dist):
            if not np.isfinite(dist[row]) or matched[idx[row]]:
                continue
            matched[idx[row]] = True
            if saturated[row]:
                out["x"][row], out["y"][row] = sxy[idx[row]]
        near, _ = cKDTree(cxy).query(sxy)
        matched |= near < 0.5 * fwhm          # within half a FWHM of a catalogue star: that star
    extra = sxy[~matched]
    if len(extra):
        rows = Table({name: np.full(len(extra), np.nan if out[name].dtype.kind == "f" else 0,
                                    dtype=out[name].dtype) for name in out.colnames})
        rows["x"], rows["y"] = extra[:, 0], extra[:, 1]
        rows["id"] = np.arange(len(out) + 1, len(out) + 1 + len(extra), dtype=out["id"].dtype)
        rows["flags"] = 0
        out = vstack([out, rows], metadata_conflicts="silent")
        out.meta = dict(catalog.meta)
        log.info("exposure groups: %d stars found only in the short stacks", len(extra))
    return out


def _tie_offset(diff: np.ndarray) -> tuple[float, float]:
    """Median offset between two groups' magnitudes of the same stars, and its (robust) error.

    With fewer than ``TIE_MIN_STARS`` stars the offset is 0 and its error nan:
    the groups are then tied by their exposure times alone.
    """
    diff = diff[np.isfinite(diff)]
    if diff.size < TIE_MIN_STARS:
        return 0.0, float("nan")
    median = float(np.median(diff))
    sigma = 1.4826 * float(np.median(np.abs(diff - median)))
    return median, float(1.2533 * sigma / np.sqrt(diff.size))
