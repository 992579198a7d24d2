"""The per-frame path, shared by ``observer watch`` and ``observer reprocess``.

One ``Night`` holds everything learned so far (reference grids, stacks,
calibration masters, hot-pixel maps, the frame records) and takes files one at
a time, in the order the caller gives. Like BANZAI's stages, each step of a
frame is timed and an exception inside a step stops that frame only: it is
recorded with the file name and reason, and the night goes on.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from photutils.aperture import CircularAperture
from scipy.spatial import cKDTree

from observer import advice, checkpoint, writers
from observer.config import Settings
from observer.session import FilterSession, TargetSession
from observer.state import FrameRecord, Snapshot
from observer.tagging import TaggingError, Tags, tag_facts
from reduction.background import offset_sky_shape, sky_model
from reduction.calibration import Masters, apply_calibration, combine_masters
from reduction.frames import Frame, FrameError, load_frame
from reduction.hotpixels import HotPixelMap, find_hot_pixels, repair_pixels
from reduction.quality import detect_stars, judge_frame, measure_quality
from reduction.registration import RegistrationError, Transform, find_transform, warp_to_reference
from reduction.stacking import StackAccumulator

log = logging.getLogger(__name__)

#: Stars used as the registration pattern and the flux reference.
REFERENCE_STARS = 300
#: Unsaturated stars (brightest first) measured for the transparency.
FLUX_STARS = 150
#: Aperture radius for the transparency, in units of the frame's own FWHM: scaled with the seeing,
#: so that the enclosed fraction (and hence the flux ratio) does not change when the seeing does.
FLUX_APERTURE_FWHM = 2.5
#: Matching radius (px) between a frame's stars and the flux reference, after registration.
FLUX_MATCH_RADIUS = 2.0


def total_aperture_flux(data: np.ndarray, xy: np.ndarray, fwhm: float) -> np.ndarray:
    """Star fluxes in apertures of FLUX_APERTURE_FWHM x the frame's FWHM (seeing-independent ratios)."""
    if len(xy) == 0:
        return np.empty(0)
    return np.asarray(CircularAperture(xy, r=FLUX_APERTURE_FWHM * fwhm).do_photometry(data)[0], float)


def saturated_on_grid(saturated: np.ndarray, transform: Transform, shape: tuple[int, int]) -> np.ndarray:
    """A frame's saturated pixels carried onto the reference grid (with a 1 px margin for the resampling).

    Saturated pixels are a few thousand at most: mapping their coordinates costs
    far less than resampling a whole mask plane.
    """
    out = np.zeros(shape, bool)
    ys, xs = np.nonzero(saturated)
    if ys.size == 0:
        return out
    ref = transform.inverse_apply(np.column_stack([xs, ys]).astype(float))
    rx, ry = np.rint(ref[:, 0]).astype(int), np.rint(ref[:, 1]).astype(int)
    for oy in (-1, 0, 1):
        for ox in (-1, 0, 1):
            x, y = rx + ox, ry + oy
            ok = (x >= 0) & (y >= 0) & (x < shape[1]) & (y < shape[0])
            out[y[ok], x[ok]] = True
    return out


class FrameRejected(Exception):
    """A frame is not stacked; the message is the reason."""


class Night:
    """All state of one night's reduction; see the module docstring."""

    def __init__(self, settings: Settings, outdir: str | Path):
        self.settings = settings
        self.outdir = Path(outdir)
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.records: list[FrameRecord] = []
        self.targets: dict[str, TargetSession] = {}
        self.hot_maps: dict[tuple[int, int], HotPixelMap] = {}
        self.calibration_files: dict[str, list[str]] = {"bias": [], "dark": [], "flat": []}
        self.masters: dict[str, Masters] = {}     # by filter ("" for bias/dark only)
        self.pending_offsets: dict[tuple[str, str], np.ndarray] = {}
        self.version = 0
        self._catalog_dirty = False
        self.measurements = writers.Measurements(background=False)   # the live service measures in the background
        self.cmd_cache: dict = {}
        self.age_cache: dict = {}
        self._snapshot: Snapshot | None = None
        self._snapshot_key: tuple[int, int] | None = None
        self.dirty_state: set[str] = set()                 # state files the next checkpoint must rewrite
        self.stacks_dirty: set[tuple[str, str]] = set()    # (target, filter) stacks to write as products

    # ----------------------------------------------------------------- bookkeeping
    def seen(self, sha256: str) -> bool:
        """True when a file with these bytes has already been taken (exactly once, whatever its name)."""
        return any(r.sha256 == sha256 and sha256 for r in self.records)

    def record_skipped(self, path: str | Path, sha256: str, status: str, reason: str) -> FrameRecord:
        """Record a file that is not reduced (quarantined, ignored, unreadable) with its reason."""
        record = FrameRecord(path=str(path), sha256=sha256, status=status, reason=reason, seen_at=time.time())
        self._append(record)
        return record

    def mark_catalog_dirty(self) -> None:
        """The catalogue and CMD are out of date (written at the next unthrottled product update)."""
        self._catalog_dirty = True

    def _append(self, record: FrameRecord) -> None:
        """Add a record; a file quarantined earlier and taken now replaces its quarantine row."""
        if record.status != "quarantined":
            self.records = [r for r in self.records if not (r.path == record.path and r.status == "quarantined")]
        self.records.append(record)
        self.version += 1

    # ----------------------------------------------------------------- the per-frame path
    def process(self, path: str | Path, sha256: str = "") -> FrameRecord:
        """Tag, reduce and (for science frames) stack one file. Never raises: failures are recorded."""
        path = Path(path)
        record = FrameRecord(path=str(path), sha256=sha256)
        steps: dict[str, float] = {}
        try:
            start = time.perf_counter()
            frame = load_frame(path, self.settings.header.keywords())
            steps["load"] = time.perf_counter() - start
            self._fill_header_columns(record, frame)
            tags = self._tag(path, frame)
            record.kind, record.target, record.filter = tags.kind, tags.target, tags.filter
            if tags.kind in ("bias", "dark", "flat"):
                self._take_calibration(path, tags)
                record.status, record.reason = "calibration", f"{tags.kind} frame for the masters"
            elif tags.kind == "offset":
                self._take_offset(frame, tags, steps)
                record.status, record.reason = "offset", "sky shape for the background model"
            else:
                self._take_science(frame, tags, record, steps)
        except FrameRejected as exc:
            record.status, record.reason = "rejected", str(exc)
        except (FrameError, TaggingError) as exc:
            record.status, record.reason = "rejected", str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad frame must never stop the night
            log.exception("%s: unexpected failure", path)
            record.status, record.reason = "rejected", f"internal error: {type(exc).__name__}: {exc}"
        record.step_seconds = steps
        record.seen_at = time.time()
        if record.status in ("stacked", "offset"):
            self.mark_catalog_dirty()
        if record.status == "stacked":
            self.stacks_dirty.add((record.target, record.filter))
        checkpoint.mark_changed(self, record)
        log.info("%s: %s %s %s -> %s %s", path.name, record.kind, record.target, record.filter,
                 record.status, record.reason)
        self._append(record)
        return record

    def _fill_header_columns(self, record: FrameRecord, frame: Frame) -> None:
        facts = frame.facts
        record.date_obs = facts.date_obs.isot if facts.date_obs is not None else ""
        record.exptime = float(facts.exptime) if facts.exptime is not None else float("nan")

    def _tag(self, path: Path, frame: Frame) -> Tags:
        pointings = {name: t.pointing for name, t in self.targets.items() if t.pointing is not None}
        return tag_facts(path, frame.facts, self.settings, pointings)

    # ----------------------------------------------------------------- calibration and offsets
    def _take_calibration(self, path: Path, tags: Tags) -> None:
        key = tags.kind if tags.kind != "flat" else f"flat:{tags.filter}"
        self.calibration_files.setdefault(key, []).append(str(path))
        self._rebuild_masters()

    def _rebuild_masters(self) -> None:
        """Masters from every calibration file so far (re-read from disk: a handful of files, cheap)."""
        def stack_of(key: str) -> list[Frame]:
            return [load_frame(p) for p in self.calibration_files.get(key, [])]

        bias = stack_of("bias")
        darks = stack_of("dark")
        filters = {k.split(":", 1)[1] for k in self.calibration_files if k.startswith("flat:")}
        base = combine_masters(bias=bias, darks=darks, flats=[])
        self.masters = {"": base}
        if base.dark_per_s is not None:
            # Hot pixels are hottest in a dark: they join the camera's persistent map at once.
            hot_map = self.hot_maps.setdefault(base.dark_per_s.shape, HotPixelMap(base.dark_per_s.shape))
            hot_map.add_dark(base.dark_per_s)
        for name in filters:
            self.masters[name] = combine_masters(bias=bias, darks=darks, flats=stack_of(f"flat:{name}"))

    def _calibrate(self, frame: Frame, filter_name: str) -> np.ndarray:
        masters = self.masters.get(filter_name) or self.masters.get("")
        if masters is None:
            return frame.data
        return apply_calibration(frame.data, frame.facts.exptime or 0.0, masters)

    def _clean(self, frame: Frame, filter_name: str, steps: dict[str, float]) -> np.ndarray:
        """Calibration, then hot pixels (this frame's spikes and the camera's persistent map)."""
        start = time.perf_counter()
        data = self._calibrate(frame, filter_name)
        steps["calibrate"] = time.perf_counter() - start
        start = time.perf_counter()
        red = self.settings.reduction
        spikes = find_hot_pixels(data, sigma=red.hot_pixel_sigma, box=red.hot_pixel_box,
                                 gain=frame.facts.gain or self.settings.camera.gain)
        hot_map = self.hot_maps.setdefault(data.shape, HotPixelMap(data.shape))
        hot_map.update(spikes)
        data = repair_pixels(data, spikes | hot_map.mask)
        steps["hotpixels"] = time.perf_counter() - start
        return data

    def _take_offset(self, frame: Frame, tags: Tags, steps: dict[str, float]) -> None:
        data = self._clean(frame, tags.filter, steps)
        start = time.perf_counter()
        red = self.settings.reduction
        shape = offset_sky_shape(data, box=red.background_box, filter_size=red.background_filter)
        steps["sky"] = time.perf_counter() - start
        target = self.targets.get(tags.target)
        if target is not None and tags.filter in target.filters:
            target.filters[tags.filter].offset_shape = shape
        else:
            self.pending_offsets[(tags.target, tags.filter)] = shape

    # ----------------------------------------------------------------- science frames
    def _take_science(self, frame: Frame, tags: Tags, record: FrameRecord, steps: dict[str, float]) -> None:
        red, settings = self.settings.reduction, self.settings
        facts = frame.facts
        if facts.exptime is None or not facts.exptime > 0:
            raise FrameRejected("no usable exposure time (EXPTIME/EXPOSURE)")
        target = self.targets.get(tags.target)
        if target is not None and frame.data.shape != target.shape:
            raise FrameRejected(f"shape {frame.data.shape[1]}x{frame.data.shape[0]} does not match the "
                                f"target's {target.shape[1]}x{target.shape[0]} frames")
        saturation = facts.saturate if facts.saturate else red.saturation_adu
        saturated = frame.data >= min(saturation, red.saturation_adu)
        data = self._clean(frame, tags.filter, steps)

        start = time.perf_counter()
        session = target.filters.get(tags.filter) if target else None
        offset_shape = session.offset_shape if session else self.pending_offsets.get((tags.target, tags.filter))
        sky = sky_model(data, box=red.background_box, filter_size=red.background_filter, shape=offset_shape)
        data -= sky.model
        steps["sky"] = time.perf_counter() - start

        start = time.perf_counter()
        seeing = session.baseline_fwhm() if session else None
        stars = detect_stars(data, sky.rms, fwhm_guess=seeing or red.fwhm_guess_px, sigma=red.detect_sigma,
                             max_stars=REFERENCE_STARS, saturation=saturation, sky=sky.model)
        quality = measure_quality(data, sky, stars)
        steps["detect"] = time.perf_counter() - start
        record.fwhm, record.elongation = quality.fwhm_px, quality.elongation
        record.sky, record.nstars = quality.sky, quality.nstars
        scale_arcsec = facts.plate_scale_arcsec or settings.camera.plate_scale_arcsec
        if scale_arcsec:
            record.fwhm_arcsec = quality.fwhm_px * scale_arcsec
        frame_xy = np.column_stack([np.asarray(stars["x"], float), np.asarray(stars["y"], float)])
        frame_flux = np.asarray(stars["flux"], float)
        # Saturated stars' fluxes depend on the seeing: they take no part in the transparency.
        unsaturated = ~np.asarray(stars["saturated"], bool)

        if target is None:
            if len(frame_xy) < red.registration_min_matches:
                raise FrameRejected(f"only {len(frame_xy)} stars: cannot serve as the target's reference frame")
            target = self._new_target(tags.target, frame, frame_xy, frame_flux)
        start = time.perf_counter()
        if target.reference_file == str(frame.path):
            transform = Transform.identity()
        else:
            try:
                transform = find_transform(frame_xy, target.ref_xy, frame_flux=frame_flux,
                                           ref_flux=target.ref_flux, shape=target.shape,
                                           min_matches=red.registration_min_matches,
                                           max_rms=red.registration_max_rms_px)
            except RegistrationError as exc:
                raise FrameRejected(f"registration failed: {exc}") from exc
        steps["register"] = time.perf_counter() - start
        record.dx, record.dy = transform.dx, transform.dy
        record.rotation, record.reg_rms = transform.rotation_deg, transform.rms_px

        session = self._filter_session(target, tags.filter, facts)
        bright = np.flatnonzero(unsaturated)[:FLUX_STARS]
        fwhm = quality.fwhm_px if np.isfinite(quality.fwhm_px) else red.fwhm_guess_px
        total_flux = total_aperture_flux(data, frame_xy[bright], fwhm)
        throughput = self._throughput(session, transform, frame_xy[bright], total_flux, facts.exptime)
        transparency = throughput / max(session.best_throughput, throughput)
        record.transparency = transparency
        q = settings.quality
        reason = judge_frame(quality.fwhm_px, quality.elongation, transparency, quality.nstars,
                             session.baseline_fwhm(), max_fwhm_ratio=q.max_fwhm_ratio,
                             max_elongation=q.max_elongation, min_transparency=q.min_transparency,
                             min_stars=q.min_stars,
                             max_fwhm_px=(q.max_fwhm_arcsec / scale_arcsec) if q.max_fwhm_arcsec and scale_arcsec
                             else None)
        session.last_raw_preview = advice.preview_of(frame.data)
        if reason:
            session.n_rejected += 1
            raise FrameRejected(reason)

        start = time.perf_counter()
        warped, valid = warp_to_reference(data, transform, target.shape)
        gain = facts.gain or settings.camera.gain or 1.0
        noise_var = sky.rms ** 2 + np.clip(warped, 0, None) / gain
        scale = (session.exptime / facts.exptime) / throughput
        weight = 1.0 / (sky.rms ** 2 * scale ** 2)
        session.accumulator.add(record.sha256 or str(frame.path), warped, noise_var=noise_var,
                                valid=valid, scale=scale, weight=weight,
                                saturated=saturated_on_grid(saturated, transform, target.shape))
        session.stack_preview = advice.preview_of(session.accumulator.image())
        steps["stack"] = time.perf_counter() - start
        session.best_throughput = max(session.best_throughput, throughput)
        session.fwhm_history.append(quality.fwhm_px)
        session.total_exptime += facts.exptime
        n = len(session.inputs)
        session.sky_level = (session.sky_level * n + sky.level) / (n + 1)   # mean sky of the stacked frames
        session.inputs.append(Path(frame.path).name)
        record.status = "stacked"
        record.reason = ""

    def _new_target(self, name: str, frame: Frame, xy: np.ndarray, flux: np.ndarray) -> TargetSession:
        facts = frame.facts
        pointing = (facts.ra_deg, facts.dec_deg) if facts.ra_deg is not None and facts.dec_deg is not None \
            else None
        wcs_header = dict(facts.wcs.to_header()) if facts.wcs is not None else None
        target = TargetSession(name=name, shape=frame.data.shape, ref_xy=xy, ref_flux=flux, pointing=pointing,
                               reference_file=str(frame.path), wcs_header=wcs_header,
                               plate_scale_arcsec=facts.plate_scale_arcsec or
                               self.settings.camera.plate_scale_arcsec)
        self.targets[name] = target
        log.info("target %s: reference grid from %s (%d stars)", name, Path(frame.path).name, len(xy))
        return target

    def _filter_session(self, target: TargetSession, name: str, facts) -> FilterSession:
        session = target.filters.get(name)
        if session is None:
            red = self.settings.reduction
            session = FilterSession(name=name, accumulator=StackAccumulator(target.shape,
                                                                             reject_sigma=red.stack_reject_sigma),
                                    exptime=float(facts.exptime), gain=facts.gain or self.settings.camera.gain or 1.0,
                                    read_noise=facts.read_noise or self.settings.camera.read_noise or 0.0,
                                    offset_shape=self.pending_offsets.pop((target.name, name), None))
            target.filters[name] = session
        return session

    def _throughput(self, session: FilterSession, transform: Transform, xy: np.ndarray, flux: np.ndarray,
                    exptime: float) -> float:
        """This frame's star fluxes per second relative to the filter's flux reference (the first frame).

        The first stacked frame of a filter defines the reference (throughput 1);
        a thin-cloud frame comes out below 1, and the stack divides by it so
        clouds do not dim the stars.
        """
        ref_grid = transform.inverse_apply(xy)
        per_second = flux / exptime
        if session.ref_xy is None:
            bright = np.argsort(per_second)[::-1][:REFERENCE_STARS]
            session.ref_xy, session.ref_flux = ref_grid[bright], per_second[bright]
            return 1.0
        dist, idx = cKDTree(session.ref_xy).query(ref_grid, distance_upper_bound=FLUX_MATCH_RADIUS)
        ok = np.isfinite(dist) & (per_second > 0)
        if ok.sum() < 3:
            raise FrameRejected(f"only {int(ok.sum())} stars match the filter's flux reference: no transparency")
        ratios = per_second[ok] / session.ref_flux[idx[ok]]
        # The brightest matched stars carry the transparency; faint ones only add noise.
        order = np.argsort(session.ref_flux[idx[ok]])[::-1][:50]
        return float(np.median(ratios[order]))

    # ----------------------------------------------------------------- products and state
    def write_products(self, force: bool = False) -> list[Path]:
        """Stacks and frames.ecsv now; the catalogue, CMD and age when forced, or always when measuring live.

        Live (``measurements.background``) the stacks are handed to the
        background measurer after every change, which throttles itself; offline
        they are measured only when forced (at the end of ``reprocess``).
        """
        written = writers.write_frames_table(self)
        written += writers.write_stacks(self)
        if self._catalog_dirty and (force or self.measurements.background):
            self._catalog_dirty = False
            for tname in self.targets:
                written += self.measurements.submit(self, tname, writers.target_stacks(self, tname))
        return written

    def save_pngs(self, target: str) -> list[Path]:
        """Snapshot figures for the observer: every stack of ``target`` as PNG, and its current CMD."""
        if target not in self.targets:
            return []
        self.write_products(force=True)
        written = writers.write_stack_pngs(self, target)
        if target in self.cmd_cache:
            written.append(writers.write_cmd_figure(self, target))
        return written

    def checkpoint(self) -> None:
        """Save everything needed to resume, atomically (see observer.checkpoint)."""
        checkpoint.save(self)

    @classmethod
    def restore(cls, settings: Settings, outdir: str | Path) -> "Night":
        """The night as of its last checkpoint in ``outdir``, or a fresh one."""
        night = cls(settings, outdir)
        checkpoint.load(night)
        return night

    def snapshot(self, queue_length: int = 0) -> Snapshot:
        """The published state; rebuilt only when something changed (the dashboard polls it)."""
        key = (self.version, queue_length)
        if self._snapshot is None or self._snapshot_key != key:
            self._snapshot = advice.build_snapshot(self, queue_length=queue_length)
            self._snapshot_key = key
        return self._snapshot
