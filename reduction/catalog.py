"""The star catalogue: one detection list, forced photometry at the same positions in every filter.

Forcing the positions makes the colours those of the same stars (no cross-match
radius to tune, no mismatches in the cluster core) and keeps a star that is faint
in one filter in the catalogue with an honest, possibly negative, flux there.
Rows are never dropped for a non-positive flux: the flux and its error stay, the
magnitudes become NaN (a CMD reads them as "not measured in this filter").

Columns (DESIGN.md): ``id, x, y``, then per filter ``flux_<f>, fluxerr_<f>, mag_<f>,
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
from reduction.photometry import FLAG_BITS, StackProduct, forced_photometry, limiting_magnitude

log = logging.getLogger(__name__)


def build_catalog(stacks: dict[str, StackProduct], color: tuple[str, str] = ("blue", "green"),
                  detect_on: str | None = None, detect_sigma: float = 5.0, aperture_fwhm: float = 1.5,
                  annulus_fwhm: tuple[float, float] = (4.0, 6.0), min_coverage: float = 0.5) -> Table:
    """Detect once, measure in every filter, and assemble the catalogue.

    ``detect_on`` names the filter to detect on; None detects on the sum of the
    filters' significance maps, which finds a star bright in any of them (a red
    giant faint in blue, a blue straggler faint in red) at no cost in spurious
    detections.  ``detect_sigma`` is the significance of the PSF-matched filter
    (see :func:`reduction.detection.detect_sources_multi`).  All stacks must share
    the reference grid.
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
    for name, stack in stacks.items():
        phot = forced_photometry(stack, sources, aperture_fwhm=aperture_fwhm, annulus_fwhm=annulus_fwhm,
                                 min_coverage=min_coverage)
        for col in ("flux", "fluxerr", "mag", "magerr"):
            table[f"{col}_{name}"] = phot[col]
        flags |= np.asarray(phot["flags"], np.int64)
        meta_phot[name] = {k: phot.meta[k] for k in ("aperture_radius_px", "aperture_correction",
                                                      "aperture_correction_scatter", "aperture_correction_nstars")}
        meta_phot[name]["limiting_mag"] = limiting_magnitude(
            stack, 5.0, aperture_fwhm, annulus_fwhm, phot.meta["aperture_correction"])
    table["color"] = table[f"mag_{color[0]}"] - table[f"mag_{color[1]}"]
    table["flags"] = flags
    _add_sky_coordinates(table, stacks)

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
