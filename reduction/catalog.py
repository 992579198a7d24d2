"""The star catalogue: one detection list, forced photometry at the same positions in every filter.

Forcing the positions makes the colours those of the same stars (no cross-match
radius to tune, no mismatches in the cluster core) and keeps a star that is faint
in one filter in the catalogue with an honest, possibly negative, flux there.
Rows are never dropped for a non-positive flux: the flux and its error stay, the
magnitudes become NaN (a CMD reads them as "not measured in this filter").

Columns (README "Products"): ``id, x, y``, then per filter ``flux_<f>, fluxerr_<f>, mag_<f>,
magerr_<f>``, then ``color`` (``mag_<a> - mag_<b>`` of the configured colour) and
``flags`` (OR over filters of :data:`reduction.photometry.FLAG_BITS`); when a stack
carries a celestial WCS, ``ra, dec`` (deg, ICRS as the WCS says) follow.  Fluxes are
aperture-corrected ADU/s, so ``mag = zeropoint - 2.5 log10(flux)``.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from astropy.table import Table

from reduction.detection import detect_sources_multi
from reduction.kernels import dilate_mask
from reduction.photometry import (BLEND_CONTAMINATION, FLAG_BITS, FLAG_EDGE, FLAG_SATURATED, StackProduct,
                                  forced_photometry, limiting_magnitude)
from reduction.psf import EmpiricalPSF, PSFFit, build_psf, fit_psf, nearest_distance

log = logging.getLogger(__name__)

#: Isolated bright stars enough for the stack's PSF; with fewer the field counts as crowded and the PSF comes
#: from this many of the least contaminated bright stars, their neighbours subtracted.
CROWDED_PSF_STARS = 25
#: ... each with at most this fraction of its aperture flux from neighbours (before their subtraction).
CROWDED_PSF_CONTAMINATION = 0.1


def build_catalog(stacks: dict[str, StackProduct], color: tuple[str, str] = ("blue", "green"),
                  detect_on: str | None = None, detect_sigma: float = 5.0, aperture_fwhm: float = 1.5,
                  annulus_fwhm: tuple[float, float] = (4.0, 6.0), min_coverage: float = 0.5,
                  psf: bool = True, blend_level: float = BLEND_CONTAMINATION) -> Table:
    """Detect once, measure in every filter, and assemble the catalogue.

    ``detect_on`` names the filter to detect on; None detects on the sum of the
    filters' significance maps, which finds a star bright in any of them (a red
    giant faint in blue, a blue straggler faint in red) at no cost in spurious
    detections.  ``detect_sigma`` is the significance of the PSF-matched filter
    (see :func:`reduction.detection.detect_sources_multi`).  All stacks must share
    the reference grid.

    With ``psf``, each stack gets an empirical PSF (:mod:`reduction.psf`); the
    positions of crowded and saturated stars come from a joint PSF fit on the
    deepest stack, and every filter is measured with the neighbours' models
    subtracted (``method_<f>``, ``contamination_<f>`` columns; ``contamination``
    is the largest over the filters).  A stack with too few stars for a PSF falls
    back to plain aperture photometry, said in ``meta['psf']``.
    """
    if not stacks:
        raise ValueError("build_catalog needs at least one stack")
    shapes = {s.image.shape for s in stacks.values()}
    if len(shapes) != 1:
        raise ValueError(f"stacks are not on one grid: shapes {sorted(shapes)}")
    missing = [f for f in color if f not in stacks]
    if missing:
        raise ValueError(f"colour {color[0]} - {color[1]} needs stacks for {', '.join(missing)}")
    t0 = time.perf_counter()
    detect_from = [stacks[detect_on]] if detect_on else list(stacks.values())
    sources = detect_sources_multi(detect_from, sigma=detect_sigma, min_coverage=min_coverage)
    t_detect = time.perf_counter() - t0

    table = Table()
    table["id"] = np.arange(1, len(sources) + 1, dtype=np.int32)
    table["x"] = np.asarray(sources["x"], float)
    table["y"] = np.asarray(sources["y"], float)
    flags = np.zeros(len(sources), np.int64)
    meta_phot: dict[str, dict] = {}
    aperture = {name: forced_photometry(stack, sources, aperture_fwhm=aperture_fwhm, annulus_fwhm=annulus_fwhm,
                                        min_coverage=min_coverage, blend_level=blend_level)
                for name, stack in stacks.items()}
    fits, psf_notes = (_psf_fits(stacks, aperture, table, blend_level) if psf and len(sources)
                       else ({}, {f: "PSF photometry off" for f in stacks}))
    contamination = np.zeros(len(sources))
    extra: dict[str, np.ndarray] = {}
    for name, stack in stacks.items():
        phot = aperture[name] if name not in fits else forced_photometry(
            stack, table, aperture_fwhm=aperture_fwhm, annulus_fwhm=annulus_fwhm, min_coverage=min_coverage,
            psf_fit=fits[name], blend_level=blend_level)
        for col in ("flux", "fluxerr", "mag", "magerr"):
            table[f"{col}_{name}"] = phot[col]
        extra[f"method_{name}"] = phot["method"]
        extra[f"contamination_{name}"] = phot["contamination"]
        contamination = np.maximum(contamination, np.asarray(phot["contamination"], float))
        flags |= np.asarray(phot["flags"], np.int64)
        meta_phot[name] = {k: phot.meta[k] for k in ("aperture_radius_px", "aperture_correction",
                                                      "aperture_correction_scatter", "aperture_correction_nstars",
                                                      "psf_to_total")}
        meta_phot[name]["limiting_mag"] = limiting_magnitude(
            stack, 5.0, aperture_fwhm, annulus_fwhm, phot.meta["aperture_correction"])
    table["color"] = table[f"mag_{color[0]}"] - table[f"mag_{color[1]}"]
    table["flags"] = flags
    _add_sky_coordinates(table, stacks)
    table["contamination"] = contamination
    for col, values in extra.items():
        table[col] = values

    table.meta.update(
        filters=list(stacks),
        zeropoints={f: float(s.zeropoint) for f, s in stacks.items()},
        exptime={f: float(s.exptime) for f, s in stacks.items()},
        n_combine={f: int(s.n_combine) for f, s in stacks.items()},
        fwhm_px={f: float(s.fwhm_px) for f, s in stacks.items()},
        color=f"mag_{color[0]} - mag_{color[1]}",
        color_filters=list(color),
        detected_on=detect_on or "+".join(stacks),
        detect_sigma=detect_sigma,
        aperture_fwhm=aperture_fwhm,
        annulus_fwhm=list(annulus_fwhm),
        aperture_radius_px={f: m["aperture_radius_px"] for f, m in meta_phot.items()},
        aperture_correction={f: m["aperture_correction"] for f, m in meta_phot.items()},
        aperture_correction_scatter={f: m["aperture_correction_scatter"] for f, m in meta_phot.items()},
        aperture_correction_nstars={f: m["aperture_correction_nstars"] for f, m in meta_phot.items()},
        limiting_mag_5sigma={f: m["limiting_mag"] for f, m in meta_phot.items()},
        flag_bits={str(bit): name for bit, name in FLAG_BITS.items()},
        psf=psf_notes,
        blend_level=blend_level,
        psf_to_total={f: m["psf_to_total"] for f, m in meta_phot.items()},
        flux_unit="ADU/s, aperture-corrected (mag = zeropoint - 2.5 log10(flux))",
        nan_magnitudes="a non-positive flux in a filter gives NaN mag/magerr there; the row is kept",
    )
    log.info("catalogue: %d stars in %s (detection %.2f s, total %.2f s)", len(table), ", ".join(stacks),
             t_detect, time.perf_counter() - t0)
    return table


def _add_sky_coordinates(table: Table, stacks: dict[str, StackProduct]) -> None:
    """Add ``ra, dec`` from the first stack with a celestial WCS (all share the reference grid)."""
    wcs = next((s.wcs for s in stacks.values() if s.wcs is not None and getattr(s.wcs, "has_celestial", False)),
               None)
    if wcs is None:
        return
    ra, dec = wcs.celestial.pixel_to_world_values(np.asarray(table["x"]), np.asarray(table["y"]))
    table["ra"] = np.asarray(ra, float)
    table["dec"] = np.asarray(dec, float)
    table["ra"].unit = table["dec"].unit = "deg"


def _psf_fits(stacks: dict[str, StackProduct], aperture: dict[str, Table], table: Table, blend_level: float
              ) -> tuple[dict[str, PSFFit], dict[str, str]]:
    """PSF fits of every stack that supports a PSF model; ``table``'s x, y of crowded and saturated stars
    move to their PSF positions on the deepest stack first.  Returns the fits and a note per filter."""
    psfs: dict[str, EmpiricalPSF] = {}
    notes: dict[str, str] = {}
    xy = np.column_stack([np.asarray(table["x"], float), np.asarray(table["y"], float)])
    nearest = nearest_distance(xy)
    for name, stack in stacks.items():
        model, notes[name] = _stack_psf(stack, aperture[name], xy, nearest, blend_level)
        if model is None:
            log.warning("%s: %s", name, notes[name])
        else:
            psfs[name] = model
    if not psfs:
        return {}, notes
    deep = max(psfs, key=lambda f: float(np.nanmedian(np.sort(np.asarray(aperture[f]["snr"]))[-50:])))
    crowded = (np.asarray(aperture[deep]["contamination"]) > blend_level) | \
        ((np.asarray(aperture[deep]["flags"]) & FLAG_SATURATED) > 0)
    first = _fit(stacks[deep], psfs[deep], xy, crowded & (np.asarray(aperture[deep]["snr"]) > 10))
    moved = np.hypot(first.x - xy[:, 0], first.y - xy[:, 1]) < 0.5 * stacks[deep].fwhm_px
    table["x"][moved] = first.x[moved]
    table["y"][moved] = first.y[moved]
    fits = {deep: first} if moved.all() else {}
    xy = np.column_stack([np.asarray(table["x"], float), np.asarray(table["y"], float)])
    for name in psfs:
        if name not in fits:
            fits[name] = _fit(stacks[name], psfs[name], xy, None)
    log.info("PSF photometry: %d crowded or saturated stars repositioned on %s", int((crowded & moved).sum()), deep)
    return fits, notes


def _stack_psf(stack: StackProduct, phot: Table, xy: np.ndarray, nearest: np.ndarray, blend_level: float
               ) -> tuple[EmpiricalPSF | None, str]:
    """The stack's empirical PSF: from isolated bright stars, or, in a field too crowded for enough of them
    (a rich cluster in 8 px seeing has none 3 FWHM from its neighbours), from the least contaminated
    bright stars with their neighbours' models subtracted (DAOPHOT's PSF - ALLSTAR - PSF loop, once)."""
    fwhm = stack.fwhm_px
    bright = ((np.asarray(phot["flags"]) & (FLAG_SATURATED | FLAG_EDGE)) == 0) & (np.asarray(phot["snr"]) > 30)
    contamination = np.asarray(phot["contamination"], float)
    clean = bright & (nearest > 3 * fwhm) & (contamination < 0.2 * blend_level)
    if clean.sum() >= CROWDED_PSF_STARS:
        return build_psf(stack.image, xy[:, 0], xy[:, 1], clean, fwhm)
    pool = np.nonzero(bright & (nearest > fwhm) & (contamination < CROWDED_PSF_CONTAMINATION))[0]
    chosen = pool[np.argsort(contamination[pool])][:max(CROWDED_PSF_STARS, int(clean.sum()))]
    usable = np.zeros(len(xy), bool)
    usable[chosen] = True
    first, _ = build_psf(stack.image, xy[:, 0], xy[:, 1], usable, fwhm)
    if first is None:
        return build_psf(stack.image, xy[:, 0], xy[:, 1], clean, fwhm)      # its note says why
    fit = _fit(stack, first, xy, None)
    others = ~usable & np.isfinite(fit.flux)
    neighbours = fit.model_of(others)
    model, note = build_psf(stack.image - neighbours, xy[:, 0], xy[:, 1], usable, fwhm)
    log.info("%s: crowded field: PSF from the %d least contaminated stars (up to %.0f%%), neighbours subtracted",
             stack.filter, len(chosen), 100 * contamination[chosen].max())
    return model, f"{note}, neighbours subtracted (crowded field)"


def _fit(stack: StackProduct, psf: EmpiricalPSF, xy: np.ndarray, move: np.ndarray | None) -> PSFFit:
    """Joint PSF fit of one stack at ``xy`` (saturated pixels, grown by a pixel, left out)."""
    variance = stack.variance if stack.variance is not None and stack.variance_has_source else None
    if variance is None:
        smooth = np.clip(np.nan_to_num(stack.image), 0, None)
        variance = stack.background_variance() + stack.source_variance(smooth, stack.nframes)
    masked = dilate_mask(stack.saturated, 1)
    return fit_psf(stack.image, variance, psf, xy[:, 0], xy[:, 1], masked, max(1.5 * stack.fwhm_px, 3.0),
                   fit_positions=move)
