"""Product writers (README "Products"): data in, files out, each through one atomic write.

- ``<target>/<filter>/stack.fits``: the stack (float32, ADU per frame of EXPTIME) and ``NFRAMES``;
- ``<target>/catalog.ecsv``, ``<target>/stars.reg``, ``<target>/cmd.png``, ``<target>/age.json``, ``<target>/<filter>/stack.png``;
- ``frames.ecsv``: one row per file seen.

They read what they are given and change nothing: the night decides what to
write and when (``observer.night``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales
from regions import CirclePixelRegion, CircleSkyRegion, PixCoord, RegionMeta, Regions, RegionVisual

from observer.config import Settings, settings_to_dict
from observer.figures import plot_cmd, plot_stack
from observer.measure import stack_image
from observer.products import atomic_link, atomic_write_bytes, atomic_write_fits, atomic_write_json, atomic_write_table
from observer.session import ExposureGroup, TargetSession
from observer.state import FRAME_COLUMNS, AgeEstimate, CmdData, FrameRecord, TargetState
from reduction.photometry import FLAG_BLENDED, FLAG_EDGE, FLAG_LOW_COVERAGE, FLAG_SATURATED

_FRAME_DTYPES = [str, str, str, str, str, float, str, str, float, float, float, int, float, float, float, float,
                 float, float, str, str]


def write_frames_table(outdir: Path, records: Sequence[FrameRecord]) -> Path:
    """frames.ecsv: every file seen (a colour file: one row per plane), in the order taken (README "Products"
    columns first)."""
    rows = [r.row() for r in records]
    table = Table(rows=rows, names=FRAME_COLUMNS) if rows else Table(names=FRAME_COLUMNS, dtype=_FRAME_DTYPES)
    table.meta["description"] = "observer: one row per file seen; status and reason say what became of it"
    return atomic_write_table(outdir / "frames.ecsv", table)


def write_stacks(outdir: Path, target: TargetSession, fname: str, label: str, settings: Settings) -> list[Path]:
    """One exposure group's stack: ``stack_<EXPTIME>s.fits`` when the filter has several groups, and
    ``stack.fits`` when it is the longest group (the only one, usually)."""
    session = target.filters[fname]
    group = next(g for g in session.groups if g.label == label)
    hdul = _stack_hdus(target, fname, group, settings)
    folder = outdir / target.name / fname
    main = folder / "stack.fits"
    if len(session.groups) == 1:
        return [atomic_write_fits(main, hdul)]
    path = atomic_write_fits(folder / f"stack_{label}.fits", hdul)
    if group is session.main:       # the same bytes under the other name: linked, not written twice
        return [path, atomic_link(path, main)]
    return [path]


def _stack_hdus(target: TargetSession, fname: str, session: ExposureGroup, settings: Settings) -> fits.HDUList:
    """The stack with its header (what, how many, how reduced) and the NFRAMES extension."""
    header = fits.Header()
    if target.wcs_header:
        header.update(fits.Header(target.wcs_header))
    header["OBJECT"] = (target.name, "target")
    header["FILTER"] = (fname, "canonical filter name")
    header["EXPTIME"] = (session.exptime, "[s] exposure of one frame (the stack's unit)")
    header["NCOMBINE"] = (session.n_stacked, "frames stacked")
    header["BUNIT"] = ("adu", "ADU per frame of EXPTIME, background subtracted")
    header["GAIN"] = (session.gain, "[e-/ADU] of the camera")
    header["GAINSRC"] = (session.gain_source, "where GAIN came from")
    header["RDNOISE"] = (session.read_noise, "[e-] per frame")
    header["SKYLEVEL"] = (session.sky_level, "[ADU] sky removed, per frame")
    header["REFFRAME"] = (Path(target.reference_file).name[:60], "file defining the reference grid")
    header["CREATOR"] = "observer"
    for key, value in settings_to_dict(settings)["reduction"].items():
        header[f"HIERARCH OBS {key.upper()}"] = value
    if session.overscan:
        header["OVERSCAN"] = (True, "overscan subtracted, trimmed (HISTORY)")
        header.add_history(session.overscan)
    for name in session.inputs:
        header.add_history(f"input {name}")
    nframes = fits.ImageHDU(session.accumulator.nframes().astype(np.int16), name="NFRAMES")
    nframes.header["BUNIT"] = "frames"
    return fits.HDUList([fits.PrimaryHDU(stack_image(session), header=header), nframes])


def write_stack_pngs(outdir: Path, target: TargetSession) -> list[Path]:
    """``<target>/<filter>/stack.png`` for every filter with frames stacked."""
    return [plot_stack(stack_image(s.main), outdir / target.name / fname / "stack.png",
                       title=f"{target.name} {fname}: {s.n_stacked} frames x {s.exptime:g} s")
            for fname, s in target.filters.items() if s.n_stacked]


def write_catalog(outdir: Path, tname: str, catalog: Table) -> Path:
    """``<target>/catalog.ecsv``."""
    return atomic_write_table(outdir / tname / "catalog.ecsv", catalog)


#: DS9 colour of a star by its worst flag, most serious first; a clean star is green.
REGION_COLOURS = ((FLAG_SATURATED, "red"), (FLAG_BLENDED, "orange"), (FLAG_EDGE | FLAG_LOW_COVERAGE, "yellow"))
CLEAN_COLOUR = "green"


def region_colour(flags: int) -> str:
    """The colour a star is drawn in: its flag says how far to trust its magnitude."""
    return next((colour for bits, colour in REGION_COLOURS if flags & bits), CLEAN_COLOUR)


def write_regions(outdir: Path, tname: str, catalog: Table, magnitude: str, wcs: WCS | None = None) -> Path:
    """``<target>/stars.reg``: a DS9 circle (the photometry aperture) per star, labelled id and magnitude.

    Image coordinates for the stacks; with ``ra, dec`` and a celestial WCS also
    sky circles (tag ``sky``, unlabelled) so the file overlays any image of the field.
    Written through ``regions`` so that DS9 and astropy read back what we meant.
    """
    radius = float(max(catalog.meta.get("aperture_radius_px", {}).values(), default=3.0))
    mags = np.asarray(catalog[f"mag_{magnitude}"], float) if f"mag_{magnitude}" in catalog.colnames \
        else np.full(len(catalog), np.nan)
    colours = [region_colour(int(f)) for f in catalog["flags"]]
    regions = [CirclePixelRegion(PixCoord(float(row["x"]), float(row["y"])), radius,
                                 meta=RegionMeta({"text": f"{row['id']} {mag:.2f}", "tag": ["image"]}),
                                 visual=RegionVisual({"color": colour}))
               for row, mag, colour in zip(catalog, mags, colours)]
    if wcs is not None and wcs.has_celestial and {"ra", "dec"} <= set(catalog.colnames):
        scale = float(np.mean(proj_plane_pixel_scales(wcs.celestial))) * u.deg
        sky = SkyCoord(np.asarray(catalog["ra"], float), np.asarray(catalog["dec"], float), unit="deg")
        regions += [CircleSkyRegion(centre, (radius * scale).to(u.arcsec), meta=RegionMeta({"tag": ["sky"]}),
                                    visual=RegionVisual({"color": colour}))
                    for centre, colour in zip(sky, colours)]
    text = Regions(regions).serialize(format="ds9")
    return atomic_write_bytes(outdir / tname / "stars.reg", text.encode("utf-8"))


def write_cmd_figure(outdir: Path, tname: str, cmd: CmdData, age: AgeEstimate | None) -> Path:
    """cmd.png, with the fitted isochrone and turn-off when there is a fit."""
    png = outdir / tname / "cmd.png"
    plot_cmd(cmd, png, isochrone=(age.isochrone_color, age.isochrone_mag) if age else None,
             turnoff=age.turnoff if age else None, title=tname,
             age_text=f"age {age.age_myr:.0f} Myr (log {age.log_age:.2f} "
                      f"[{age.log_age_low:.2f}, {age.log_age_high:.2f}])" if age else None)
    return png


def gain_record(target: TargetSession | None) -> dict | None:
    """age.json's ``gain``: ``{"value", "source"}`` of the target's stacks (their first stacked exposure
    group: one camera gives every filter the same), None before anything is stacked."""
    groups = [g for s in (target.filters.values() if target else ()) for g in s.groups if g.n_stacked]
    return {"value": round(groups[0].gain, 4), "source": groups[0].gain_source} if groups else None


def write_age(outdir: Path, tname: str, record: dict) -> Path:
    """``<target>/age.json``: the fit's record, or ``{"target", "fitted": false, "log_age": null,
    "age_myr": null, "reason"}`` when there is none (scripts that read ``log_age`` get null, not a KeyError)."""
    return atomic_write_json(outdir / tname / "age.json", record)


def status_record(state: TargetState) -> dict:
    """status.json's content (without ``updated``): the verdict for schedulers and scripts."""
    return {
        "target": state.name,
        "verdict": "done" if state.done else "keep going",
        "reasons": list(state.reasons),
        "filters": {f: {"frames": s.n_stacked, "rejected": s.n_rejected, "exposure_s": s.total_exptime,
                        "limiting_mag": _finite(s.limiting_mag), "snr_at_mag": _finite(s.snr_at_mag),
                        "saturation_mag": _finite(s.saturation_mag),
                        "groups": [{"exptime": e, "frames": n} for e, n in s.groups]}
                    for f, s in state.filters.items()},
        "suggested": [{"filter": g.filter, "exptime": g.exptime, "count": g.count, "why": g.why}
                      for g in state.suggested],
    }


def write_status(outdir: Path, record: dict) -> Path:
    """``<target>/status.json``, stamped with the time it changed."""
    stamped = {**record, "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return atomic_write_json(outdir / record["target"] / "status.json", stamped)


def _finite(value: float) -> float | None:
    """JSON has no NaN: an unknown figure is null."""
    return round(float(value), 4) if np.isfinite(value) else None
