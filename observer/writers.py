"""Write a Night's products (DESIGN.md "Products"), each atomically.

- ``<target>/<filter>/stack.fits``: the stack (float32, ADU per frame of EXPTIME) and ``NFRAMES``;
- ``<target>/catalog.ecsv``, ``<target>/cmd.png`` and ``<target>/age.json``;
- ``frames.ecsv``: one row per file seen.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from observer.advice import completion_mag
from observer.config import settings_to_dict
from observer.products import atomic_write_fits, atomic_write_json, atomic_write_table
from observer.state import FRAME_COLUMNS, AgeEstimate
from reduction.catalog import build_catalog
from reduction.cmd import cmd_data, plot_cmd
from reduction.photometry import StackProduct, limiting_magnitude, snr_at

if TYPE_CHECKING:
    from observer.night import Night
    from observer.session import FilterSession, TargetSession

log = logging.getLogger(__name__)

#: Below this many stars with both filters the isochrone fit is not attempted.
MIN_STARS_FOR_AGE = 30


def write_frames_table(night: "Night") -> list[Path]:
    """frames.ecsv: every file seen, in the order taken (DESIGN.md columns first)."""
    rows = [r.row() for r in night.records]
    table = Table(rows=rows, names=FRAME_COLUMNS) if rows else Table(names=FRAME_COLUMNS, dtype=[
        str, str, str, str, str, float, str, str, float, float, float, int, float, float, float, float, float,
        float, str])
    table.meta["description"] = "observer: one row per file seen; status and reason say what became of it"
    path = night.outdir / "frames.ecsv"
    atomic_write_table(path, table)
    return [path]


def stack_image(session: "FilterSession") -> np.ndarray:
    """The stack in ADU per frame of the best transparency (float32).

    The accumulator holds frames normalised to the filter's first frame; the
    best frame seen may be more transparent than that one (a thin cloud over
    the first frame), so the products are scaled to the best frame.
    """
    image = session.accumulator.image()
    return np.multiply(image, session.best_throughput, out=image, dtype=np.float32, casting="unsafe")


def stack_variance(session: "FilterSession") -> np.ndarray:
    """Per-pixel variance of :func:`stack_image` (same scaling, squared)."""
    variance = session.accumulator.variance()
    return np.multiply(variance, session.best_throughput ** 2, out=variance, dtype=np.float32, casting="unsafe")


def _wcs(target: "TargetSession") -> WCS | None:
    if not target.wcs_header:
        return None
    return WCS(fits.Header(target.wcs_header))


def write_stacks(night: "Night") -> list[Path]:
    """The stacks that changed since the last call."""
    written = []
    for tname, fname in sorted(night.stacks_dirty):
        target = night.targets[tname]
        session = target.filters[fname]
        image = stack_image(session)
        header = fits.Header()
        if target.wcs_header:
            header.update(fits.Header(target.wcs_header))
        header["OBJECT"] = (tname, "target")
        header["FILTER"] = (fname, "canonical filter name")
        header["EXPTIME"] = (session.exptime, "[s] exposure of one frame (the stack's unit)")
        header["NCOMBINE"] = (session.n_stacked, "frames stacked")
        header["BUNIT"] = ("adu", "ADU per frame of EXPTIME, background subtracted")
        header["GAIN"] = (session.gain, "[e-/ADU] of the camera")
        header["RDNOISE"] = (session.read_noise, "[e-] per frame")
        header["SKYLEVEL"] = (session.sky_level, "[ADU] sky removed, per frame")
        header["REFFRAME"] = (Path(target.reference_file).name[:60], "file defining the reference grid")
        header["CREATOR"] = "observer"
        red = settings_to_dict(night.settings)["reduction"]
        for key, value in red.items():
            header[f"HIERARCH OBS {key.upper()}"] = value
        for name in session.inputs:
            header.add_history(f"input {name}")
        nframes = fits.ImageHDU(session.accumulator.nframes().astype(np.int16), name="NFRAMES")
        nframes.header["BUNIT"] = "frames"
        path = night.outdir / tname / fname / "stack.fits"
        atomic_write_fits(path, fits.HDUList([fits.PrimaryHDU(image, header=header), nframes]))
        written.append(path)
    night.stacks_dirty.clear()
    return written


def write_stack_pngs(night: "Night", tname: str) -> list[Path]:
    """``<target>/<filter>/stack.png``: each stack with a zscale stretch, north as on the grid (row 0 at the bottom)."""
    from astropy.visualization import AsinhStretch, ImageNormalize, ZScaleInterval
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from observer.products import atomic_savefig

    written = []
    target = night.targets[tname]
    for fname, session in target.filters.items():
        if not session.n_stacked:
            continue
        image = stack_image(session)
        fig = Figure(figsize=(7, 7), dpi=120)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        norm = ImageNormalize(image, interval=ZScaleInterval(), stretch=AsinhStretch(0.3))
        ax.imshow(image, origin="lower", cmap="gray", norm=norm, interpolation="nearest")
        ax.set_title(f"{tname} {fname}: {session.n_stacked} frames x {session.exptime:g} s")
        ax.set_xlabel("x [px]")
        ax.set_ylabel("y [px]")
        path = night.outdir / tname / fname / "stack.png"
        atomic_savefig(fig, path)
        written.append(path)
    return written


def stack_product(night: "Night", target: "TargetSession", session: "FilterSession") -> StackProduct:
    """What the photometry needs of one filter's stack (units: ADU per frame of ``exptime``)."""
    return StackProduct(filter=session.name, image=stack_image(session), nframes=session.accumulator.nframes(),
                        variance=stack_variance(session), saturated=session.accumulator.saturated(), exptime=session.exptime,
                        gain=session.gain, read_noise=session.read_noise, n_combine=session.n_stacked,
                        fwhm_px=session.baseline_fwhm() or night.settings.reduction.fwhm_guess_px,
                        zeropoint=night.settings.filters.zeropoint(session.name), sky_level=session.sky_level,
                        wcs=_wcs(target))


def measure_target(night: "Night", tname: str, stacks: dict[str, StackProduct]) -> tuple[Table | None, list[Path]]:
    """Catalogue, CMD, depth and SNR of one target from its stacks; the catalogue is None without the colour."""
    settings = night.settings
    color = settings.cmd.color_filters
    target = night.targets[tname]
    phot = settings.photometry
    written: list[Path] = []
    catalog = None
    apcorr: dict[str, float] = {}
    if all(f in stacks for f in color):
        catalog = build_catalog(stacks, color=color, detect_sigma=phot.detect_sigma,
                                aperture_fwhm=phot.aperture_fwhm, annulus_fwhm=tuple(phot.annulus_fwhm),
                                min_coverage=phot.min_coverage)
        apcorr = dict(catalog.meta["aperture_correction"])
        target.catalog_rows = len(catalog)
        path = night.outdir / tname / "catalog.ecsv"
        atomic_write_table(path, catalog)
        written.append(path)
        night.cmd_cache[tname] = cmd_data(catalog, color=color, magnitude=settings.cmd.magnitude)
        written.append(write_cmd_figure(night, tname))
    # Depth and SNR of every stack (aperture-corrected once a catalogue has measured the correction).
    for fname, product in stacks.items():
        session = target.filters[fname]
        limit = float(limiting_magnitude(product, aperture_fwhm=phot.aperture_fwhm,
                                         annulus_fwhm=tuple(phot.annulus_fwhm),
                                         aperture_correction=apcorr.get(fname, 1.0)))
        if not session.limiting_mag_history or session.limiting_mag_history[-1] != limit:
            session.limiting_mag_history.append(limit)
    completion = completion_mag(night, tname)
    for fname, product in stacks.items():
        target.filters[fname].snr_at_mag = float(snr_at(
            product, completion, aperture_fwhm=phot.aperture_fwhm, annulus_fwhm=tuple(phot.annulus_fwhm),
            aperture_correction=apcorr.get(fname, 1.0))) if np.isfinite(completion) else float("nan")
    night.version += 1
    return catalog, written


def target_stacks(night: "Night", tname: str) -> dict[str, StackProduct]:
    """Fresh copies of a target's stacks for measurement (safe to hand to another thread)."""
    target = night.targets[tname]
    return {f: stack_product(night, target, s) for f, s in target.filters.items() if s.n_stacked > 0}


def write_cmd_figure(night: "Night", tname: str) -> Path:
    """cmd.png from the cached diagram data, with the fitted isochrone and turn-off when there is a fit."""
    age = night.age_cache.get(tname)
    png = night.outdir / tname / "cmd.png"
    plot_cmd(night.cmd_cache[tname], png,
             isochrone=(age.isochrone_color, age.isochrone_mag) if age else None,
             turnoff=age.turnoff if age else None, title=tname,
             age_text=f"age {age.age_myr:.0f} Myr (log {age.log_age:.2f} "
                      f"[{age.log_age_low:.2f}, {age.log_age_high:.2f}])" if age else None)
    return png


class Measurements:
    """Measures the stacks (catalogue, CMD, depth) and fits the age: in the caller's thread or in the background.

    Live, measuring a 2048 px pair of stacks takes seconds and the age fit a few
    more: neither may hold back the next frame. In the background, one thread
    takes the newest stacks of each target (older ones waiting are replaced), at
    most every ``service.product_throttle_seconds``, then fits the age from the
    newest catalogue at most every ``age.throttle_seconds``: the newest data are
    always measured in the end. ``observer reprocess`` measures synchronously so
    that every product exists when it exits. ``listeners`` hear the paths written.
    """

    def __init__(self, background: bool = False):
        self.background = background
        self.listeners: list = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pending: dict[str, tuple["Night", dict[str, StackProduct]]] = {}
        self._age_pending: dict[str, tuple["Night", Table]] = {}
        self._catalog_last = float("-inf")
        self._age_last = float("-inf")
        self._hurry = False

    @property
    def busy(self) -> bool:
        """Measurements waiting or running (the products are not yet current)."""
        with self._lock:
            return self._thread is not None

    def submit(self, night: "Night", tname: str, stacks: dict[str, StackProduct]) -> list[Path]:
        """Measure a target's stacks; returns the paths written (none yet when in the background)."""
        if not self.background:
            catalog, written = _measure_safely(night, tname, stacks)
            if catalog is not None and night.settings.age.enabled:
                written += fit_and_write_age(night, tname, catalog)
            return written
        with self._lock:
            self._pending[tname] = (night, stacks)
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, name="observer-measure", daemon=True)
                self._thread.start()
        return []

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until nothing is waiting or running; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.busy:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def finish(self, timeout: float | None = None) -> bool:
        """Measure what is waiting now, without the throttle waits (at shutdown); False on timeout."""
        self._hurry = True
        try:
            return self.wait(timeout)
        finally:
            self._hurry = False

    def _next_job(self) -> tuple:
        """The next job under the lock: ("catalog"|"age", night, target, data), ("wait", s) or ("done",)."""
        now = float("inf") if self._hurry else time.monotonic()
        if self._pending:
            return self._take(self._pending, "_catalog_last", lambda s: s.service.product_throttle_seconds,
                              "catalog", now)
        if self._age_pending:
            return self._take(self._age_pending, "_age_last", lambda s: s.age.throttle_seconds, "age", now)
        self._thread = None
        return ("done",)

    def _take(self, pending: dict, last: str, throttle, kind: str, now: float) -> tuple:
        """One job of a kind from ``pending`` once its throttle (since ``self.<last>``) has passed."""
        night = next(iter(pending.values()))[0]
        gap = getattr(self, last) + throttle(night.settings) - now
        if gap > 0:
            return ("wait", gap)
        tname, (night, data) = pending.popitem()
        setattr(self, last, time.monotonic())
        return (kind, night, tname, data)

    def _drain(self) -> None:
        while True:
            with self._lock:
                job = self._next_job()
            if job[0] == "done":
                return
            if job[0] == "wait":
                time.sleep(min(job[1], 0.25))   # new stacks arriving meanwhile replace the waiting ones
                continue
            kind, night, tname, data = job
            if kind == "catalog":
                catalog, written = _measure_safely(night, tname, data)
                if catalog is not None and night.settings.age.enabled:
                    with self._lock:
                        self._age_pending[tname] = (night, catalog)
            else:
                written = fit_and_write_age(night, tname, data)
            for listener in list(self.listeners):
                listener(written)


def _measure_safely(night: "Night", tname: str, stacks: dict[str, StackProduct]) -> tuple[Table | None, list[Path]]:
    """measure_target that never raises: a failed measurement must not stop the night."""
    try:
        return measure_target(night, tname, stacks)
    except Exception:  # noqa: BLE001
        log.exception("%s: measuring the stacks failed", tname)
        return None, []


def fit_and_write_age(night: "Night", tname: str, catalog: Table) -> list[Path]:
    """Fit the age, write age.json and redraw cmd.png with the isochrone; never raises."""
    try:
        return _write_age(night, tname, catalog)
    except Exception:  # noqa: BLE001 - an age fit failure must not stop the night
        log.exception("%s: age fit failed", tname)
        return []


def _write_age(night: "Night", tname: str, catalog: Table) -> list[Path]:
    """Fit the cluster's age to the catalogue and write age.json (skipped with a log line when too few stars)."""
    from reduction.age import fit_age

    settings = night.settings
    first, second = settings.cmd.color_filters
    mag_filter = settings.cmd.magnitude
    color = np.asarray(catalog["color"], float)
    mag = np.asarray(catalog[f"mag_{mag_filter}"], float)
    color_err = np.hypot(np.asarray(catalog[f"magerr_{first}"], float),
                         np.asarray(catalog[f"magerr_{second}"], float))
    mag_err = np.asarray(catalog[f"magerr_{mag_filter}"], float)
    usable = np.isfinite(color) & np.isfinite(mag) & (np.asarray(catalog["flags"]) & 3 == 0)
    if usable.sum() < MIN_STARS_FOR_AGE:
        log.info("%s: %d usable stars, too few for an age fit", tname, int(usable.sum()))
        return []
    bands = (settings.filters.bands.get(first, "B"), settings.filters.bands.get(second, "V"))
    age = settings.age
    fit = fit_age(color, mag, color_err, mag_err, usable, bands=bands, mh=age.metallicity,
                  fit_mh=age.fit_metallicity, distance_modulus=age.distance_modulus, ebv=age.ebv,
                  calibrated=age.calibrated_zeropoints, bootstrap=age.bootstrap,
                  rng=np.random.default_rng(0),
                  # Members crowd towards the cluster's centre, field stars do not: positions weigh in.
                  x=np.asarray(catalog["x"], float), y=np.asarray(catalog["y"], float))
    night.age_cache[tname] = AgeEstimate(
        log_age=fit.log_age, log_age_low=fit.log_age_low, log_age_high=fit.log_age_high, age_myr=fit.age_myr,
        distance_modulus=fit.distance_modulus, ebv=fit.ebv, n_stars=fit.n_stars,
        isochrone_color=np.asarray(fit.iso_color), isochrone_mag=np.asarray(fit.iso_mag),
        turnoff=tuple(fit.turnoff))
    path = night.outdir / tname / "age.json"
    atomic_write_json(path, fit.to_json())
    written = [path, write_cmd_figure(night, tname)]
    night.version += 1
    log.info("%s: age %.0f Myr (log %.2f, %.2f-%.2f) from %d stars", tname, fit.age_myr, fit.log_age,
             fit.log_age_low, fit.log_age_high, fit.n_stars)
    return written
