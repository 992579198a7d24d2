"""The per-frame path as named, timed steps, BANZAI-style.

A colour camera's file is read once and its colour planes (``reduction.colour``)
then go through the steps after ``load`` one by one, each as a frame of its own
filter with its own record (``FrameRecord.plane``), in the same call: a file's
planes are counted together or not at all.

Each step takes the night's state, the settings and the frame's context and
returns the context, or raises :class:`FrameRejected` with the reason. A step
that finishes the frame early (a calibration or an offset frame) sets
``ctx.done``. :func:`run_frame` times every step through one :func:`timed`
and stops the frame, never the night, on an exception: the file and the step
are named in the log and in the frame's reason (``frames.ecsv``).

The steps change the night's state (a new target's grid, the hot-pixel map,
the stack): they are called only by ``observer.night.Night.process``, on the
worker thread, under the night's lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import Table
from photutils.aperture import ApertureStats, CircularAnnulus, CircularAperture
from scipy.spatial import cKDTree

from observer.config import Settings
from observer.gain import frame_gain
from observer.session import CameraGain, ExposureGroup, FilterSession, HeldFrame, NightState, TargetSession
from observer.snapshot import preview_of
from observer.state import CALIBRATION_KINDS, FrameRecord, Kind, Status
from observer.tagging import TaggingError, Tags, tag_facts
from reduction.background import SkyModel, low_response, offset_sky_shape, sky_model
from reduction.calibration import apply_calibration, combine_masters
from reduction.colour import colour_planes
from reduction.frames import Frame, FrameError, load_frame
from reduction.gain import GainError
from reduction.overscan import correct_overscan
from reduction.defects import find_defects
from reduction.hotpixels import find_hot_pixels, repair_pixels
from reduction.quality import TRAILED, FrameQuality, detect_stars, judge_frame, measure_quality
from reduction.registration import RegistrationError, Transform, find_transform, warp_to_reference
from reduction.stacking import StackAccumulator

log = logging.getLogger(__name__)

#: Stars used as the registration pattern and the flux reference.
REFERENCE_STARS = 300
#: Unsaturated stars (brightest first) of a group's first frame: the flux reference for the transparency.
FLUX_STARS = 150
#: Aperture radius for the transparency, in units of the frame's own FWHM: scaled with the seeing,
#: so that the enclosed fraction (and hence the flux ratio) does not change when the seeing does.
FLUX_APERTURE_FWHM = 2.5
#: Local sky annulus of the transparency photometry, in aperture radii (inner, outer).
SKY_ANNULUS = (1.6, 2.4)


class FrameRejected(Exception):
    """A frame is not stacked; the message is the reason."""


@dataclass
class FrameContext:
    """One frame on its way through the steps: what each step found, for the next ones."""

    path: Path
    record: FrameRecord
    frame: Frame | None = None
    tags: Tags | None = None
    data: np.ndarray | None = None              # the working image (float32, cleaned, then sky-subtracted)
    saturation: float = float("inf")
    pedestal: float = 0.0                       # overscan level subtracted on load (ADU)
    overscan: str = ""                          # what the overscan correction did, for the stack header
    saturated: np.ndarray | None = None         # raw pixels at or above saturation
    defects: np.ndarray | None = None           # zeroed, dead or hot rows and columns of this frame
    flat: np.ndarray | None = None              # the master flat the frame was divided by
    low_response: np.ndarray | None = None      # vignetted pixels, kept out of the stars and the stack
    sky: SkyModel | None = None
    stars: Table | None = None
    quality: FrameQuality | None = None
    target: TargetSession | None = None
    session: FilterSession | None = None
    group: ExposureGroup | None = None
    transform: Transform | None = None
    throughput: float = 1.0
    flux_reference: tuple[np.ndarray, np.ndarray] | None = None   # proposed by a group's first frame
    gain: CameraGain | None = None              # e-/ADU and its source (observer.gain), from ``calibrate``
    raw_preview: np.ndarray | None = None       # the raw frame, downsampled, for the dashboard
    warped: np.ndarray | None = None
    valid: np.ndarray | None = None
    warning: str = ""                           # why the frame is stacked with a warning (its record's reason)
    done: bool = False                          # finished early (calibration, offset)

    @property
    def science(self) -> bool:
        return self.tags is not None and self.tags.kind == Kind.SCIENCE

    def star_xy(self) -> np.ndarray:
        return np.column_stack([np.asarray(self.stars["x"], float), np.asarray(self.stars["y"], float)])


Step = Callable[[NightState, Settings, FrameContext], FrameContext]


@contextlib.contextmanager
def timed(name: str, seconds: dict[str, float]) -> Iterator[None]:
    """Add the wall time of the block to ``seconds[name]`` (the frame log's and the bench's breakdown)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


# --------------------------------------------------------------------- the steps
def load(state: NightState, settings: Settings, ctx: FrameContext) -> FrameContext:
    """Read the file into float32 (overscan-corrected and trimmed) and fill the header columns of its record
    (a colour plane: already read)."""
    if ctx.frame is None:
        ctx.frame, ctx.pedestal, ctx.overscan = read_frame(ctx.path, settings)
    facts = ctx.frame.facts
    ctx.record.date_obs = facts.date_obs.isot if facts.date_obs is not None else ""
    ctx.record.exptime = float(facts.exptime) if facts.exptime is not None else float("nan")
    return ctx


def tag(state: NightState, settings: Settings, ctx: FrameContext) -> FrameContext:
    """Kind, target and filter; calibration frames go to the masters and end here."""
    pointings = {name: t.pointing for name, t in state.targets.items() if t.pointing is not None}
    ctx.tags = tags = tag_facts(ctx.path, ctx.frame.facts, settings, pointings)
    ctx.record.kind, ctx.record.target, ctx.record.filter = tags.kind, tags.target, tags.filter
    if tags.kind in CALIBRATION_KINDS and ctx.record.plane:
        raise FrameRejected(f"{tags.kind} frame of a colour camera: calibrating colour planes is not supported yet")
    if tags.kind in CALIBRATION_KINDS:
        key = tags.kind if tags.kind != Kind.FLAT else f"flat:{tags.filter}"
        if tags.kind == Kind.FLAT and key not in state.calibration_files:
            _warn_late_flat(state, tags.filter, ctx.path)
        state.calibration_files.setdefault(key, []).append(str(ctx.path))
        rebuild_masters(state, settings)
        ctx.record.status, ctx.record.reason = Status.CALIBRATION, f"{tags.kind} frame for the masters"
        ctx.done = True
        return ctx
    if tags.kind == Kind.SCIENCE:
        _check_science(state, settings, ctx)
    return ctx


def _check_science(state: NightState, settings: Settings, ctx: FrameContext) -> None:
    """A science frame needs an exposure time and the target's frame shape; note its saturated pixels."""
    facts = ctx.frame.facts
    if facts.exptime is None or not facts.exptime > 0:
        raise FrameRejected("no usable exposure time (EXPTIME/EXPOSURE)")
    target = state.targets.get(ctx.tags.target)
    shape = ctx.frame.data.shape
    if target is not None and shape != target.shape:
        raise FrameRejected(f"shape {shape[1]}x{shape[0]} does not match the "
                            f"target's {target.shape[1]}x{target.shape[0]} frames")
    empty = _no_sky_noise(ctx.frame.data)
    if empty:       # before the hot-pixel and defect repair, which would make such a frame emptier still
        raise FrameRejected(empty)
    ctx.target = target
    red = settings.reduction
    # The raw levels saturate: after the overscan, the pedestal is no longer in the pixels.
    ctx.saturation = (facts.saturate if facts.saturate else red.saturation_adu) - ctx.pedestal
    ctx.saturated = ctx.frame.data >= _saturation_threshold(settings, ctx.frame, ctx.pedestal)
    ctx.raw_preview = preview_of(ctx.frame.data)


def calibrate(state: NightState, settings: Settings, ctx: FrameContext) -> FrameContext:
    """Bias, dark and flat, when the night has masters for this filter (or bias/dark only); the gain."""
    masters = state.masters.get(ctx.tags.filter) or state.masters.get("")
    frame = ctx.frame
    date = frame.facts.date_obs
    ctx.data = frame.data if masters is None else apply_calibration(
        frame.data, frame.facts.exptime or 0.0, masters, date_mjd=date.mjd if date is not None else None)
    ctx.flat = masters.flat if masters is not None else None
    try:
        ctx.gain = frame_gain(state, settings, frame, ctx.data, masters, bool(ctx.overscan),
                              lambda p: read_frame(p, settings)[0].data)
    except GainError as exc:
        raise FrameRejected(str(exc)) from None
    return ctx


def hotpixels(state: NightState, settings: Settings, ctx: FrameContext) -> FrameContext:
    """This frame's spikes, the camera's persistent map and defective lines, repaired from their neighbours.

    The defective lines are also kept out of the stack (repaired values are no measurement).
    """
    red = settings.reduction
    spikes = find_hot_pixels(ctx.data, sigma=red.hot_pixel_sigma, box=red.hot_pixel_box,
                             gain=ctx.gain.value)
    hot_map = state.hot_map(ctx.data.shape)
    hot_map.update(spikes)
    ctx.defects = find_defects(ctx.data)
    ctx.data = repair_pixels(ctx.data, spikes | hot_map.mask | ctx.defects)
    # Past this step nothing reads the raw pixels (saturation and the raw preview are taken): the frame
    # holds the working image, so the raw plane is freed (67 MB at 4096 px).
    ctx.frame.data = ctx.data
    return ctx


def sky(state: NightState, settings: Settings, ctx: FrameContext) -> FrameContext:
    """An offset frame gives the sky's shape (and ends here); a science frame loses its sky."""
    red = settings.reduction
    key = (ctx.tags.target, ctx.tags.filter)
    target = state.targets.get(ctx.tags.target)
    session = target.filters.get(ctx.tags.filter) if target else None
    if not ctx.science:
        shape = offset_sky_shape(ctx.data, box=red.background_box, filter_size=red.background_filter)
        if session is not None:
            session.offset_shape = shape
        else:
            state.pending_offsets[key] = shape
        ctx.record.status, ctx.record.reason = Status.OFFSET, "sky shape for the background model"
        ctx.done = True
        return ctx
    offset_shape = session.offset_shape if session else state.pending_offsets.get(key)
    ctx.sky = sky_model(ctx.data, box=red.background_box, filter_size=red.background_filter, shape=offset_shape)
    if not ctx.sky.rms > 0:
        raise FrameRejected(_no_sky_noise(ctx.data) or "no sky noise (rms 0): not a camera's exposure")
    ctx.low_response = low_response(ctx.data, ctx.sky, red.min_response, ctx.flat)
    ctx.data -= ctx.sky.model
    ctx.session = session
    return ctx


def _no_sky_noise(data: np.ndarray) -> str | None:
    """Why a frame has no sky noise, if most of its pixels hold one exact value (then the median's).

    A camera's sky has read and photon noise: no value covers more than a fraction of the pixels.
    Judged on every 4th pixel of every 4th row (the median of a full 4096 px frame costs ~0.1 s).
    """
    sample = data[::4, ::4]
    level = float(np.median(sample))
    share = np.count_nonzero(sample == level) / sample.size
    if share <= 0.5:
        return None
    return (f"no sky noise: {share:.0%} of pixels are exactly {level:g}: an empty or synthetic frame, "
            "not a camera's exposure")


def detect(state: NightState, settings: Settings, ctx: FrameContext) -> FrameContext:
    """Stars (the registration pattern and the flux reference) and the frame's quality figures."""
    red = settings.reduction
    seeing = ctx.session.baseline_fwhm() if ctx.session else None
    ctx.stars = detect_stars(ctx.data, ctx.sky.rms, fwhm_guess=seeing or red.fwhm_guess_px, sigma=red.detect_sigma,
                             max_stars=REFERENCE_STARS, saturation=ctx.saturation, sky=ctx.sky.model)
    if ctx.low_response is not None:
        ix = np.clip(np.rint(np.asarray(ctx.stars["x"], float)).astype(int), 0, ctx.data.shape[1] - 1)
        iy = np.clip(np.rint(np.asarray(ctx.stars["y"], float)).astype(int), 0, ctx.data.shape[0] - 1)
        ctx.stars = ctx.stars[~ctx.low_response[iy, ix]]
    ctx.quality = quality = measure_quality(ctx.data, ctx.sky, ctx.stars)
    record = ctx.record
    record.fwhm, record.elongation = quality.fwhm_px, quality.elongation
    record.sky, record.nstars = quality.sky, quality.nstars
    scale_arcsec = ctx.frame.facts.plate_scale_arcsec or settings.camera.plate_scale_arcsec
    if scale_arcsec:
        record.fwhm_arcsec = quality.fwhm_px * scale_arcsec
    return ctx


def register(state: NightState, settings: Settings, ctx: FrameContext) -> FrameContext:
    """The transform onto the target's grid; the target's first frame defines that grid.

    A colour file's other planes are registered like any frame: their sites sit up to half a
    pixel from the first plane's.
    """
    red = settings.reduction
    frame_xy, frame_flux = ctx.star_xy(), np.asarray(ctx.stars["flux"], float)
    if ctx.target is None:
        if len(frame_xy) < red.registration_min_matches:
            raise FrameRejected(f"only {len(frame_xy)} star{'s' if len(frame_xy) != 1 else ''}: "
                                "cannot serve as the target's reference frame")
        ctx.target = _new_target(state, settings, ctx.tags.target, ctx.frame, frame_xy, frame_flux)
        ctx.transform = Transform.identity()     # the grid's own frame (a colour file: its first plane)
    else:
        target = ctx.target
        try:
            ctx.transform = find_transform(frame_xy, target.ref_xy, frame_flux=frame_flux,
                                           ref_flux=target.ref_flux, shape=target.shape,
                                           min_matches=red.registration_min_matches,
                                           max_rms=red.registration_max_rms_px)
        except RegistrationError as exc:
            # A trailed or defocused frame often fails to match: its shape is the real reason.
            reason, warning = _quality_reason(settings, ctx, target.filters.get(ctx.tags.filter), None)
            shape = reason or warning
            raise FrameRejected(f"{shape}; registration failed" if shape else f"registration failed: {exc}") from exc
    t, record = ctx.transform, ctx.record
    record.dx, record.dy, record.rotation, record.reg_rms = t.dx, t.dy, t.rotation_deg, t.rms_px
    return ctx


def judge(state: NightState, settings: Settings, ctx: FrameContext) -> FrameContext:
    """Transparency against the filter's flux reference, then seeing, shape and stars against the night."""
    red = settings.reduction
    ctx.session = session = _filter_session(state, ctx.target, ctx.tags.filter)
    ctx.group = group = _exposure_group(settings, ctx.target, session, ctx.frame, ctx.gain)
    ctx.record.group = group.label
    quality, facts = ctx.quality, ctx.frame.facts
    fwhm = quality.fwhm_px if np.isfinite(quality.fwhm_px) else red.fwhm_guess_px
    ctx.throughput = _throughput(ctx, group, FLUX_APERTURE_FWHM * fwhm, facts.exptime)
    ctx.record.transparency = ctx.throughput / max(group.best_throughput, ctx.throughput)
    reason, shape = _quality_reason(settings, ctx, session, ctx.record.transparency)
    session.last_raw_preview = ctx.raw_preview
    if reason:
        session.n_rejected += 1
        raise FrameRejected(reason)
    if shape:
        ctx.warning = f"{shape}; stacked with a warning: the filter's first frame is not rejected on shape alone"
        log.warning("%s: %s", ctx.path.name, ctx.warning)
    return ctx


def warp(state: NightState, settings: Settings, ctx: FrameContext) -> FrameContext:
    """Resample the frame onto the target's grid; vignetted pixels (NaN) are no measurement there."""
    if ctx.low_response is not None:
        ctx.data[ctx.low_response] = np.nan        # nothing reads the working image after the warp
    ctx.warped, ctx.valid = warp_to_reference(ctx.data, ctx.transform, ctx.target.shape)
    if ctx.defects is not None and ctx.defects.any():
        ctx.valid = ctx.valid & ~mask_on_grid(ctx.defects, ctx.transform, ctx.target.shape)
    return ctx


def accumulate(state: NightState, settings: Settings, ctx: FrameContext) -> FrameContext:
    """Add the frame to its exposure group's stack, normalised to the group's unit frame and transparency.

    A group's first ``quality.baseline_frames`` frames are stacked provisionally and kept
    (:class:`HeldFrame`); with the last of them the group is settled (:func:`_settle`).
    """
    group, facts, sky_fit, quality = ctx.group, ctx.frame.facts, ctx.sky, ctx.quality
    frame = HeldFrame(path=ctx.record.path, plane=ctx.record.plane, frame_id=ctx.record.sha256 or str(ctx.frame.path),
                      name=Path(ctx.frame.path).name, warped=ctx.warped, valid=ctx.valid,
                      saturated=mask_on_grid(ctx.saturated, ctx.transform, ctx.target.shape),
                      exptime=float(facts.exptime), throughput=ctx.throughput,
                      gain=ctx.gain.value, sky_rms=float(sky_fit.rms),
                      sky_level=float(sky_fit.level), fwhm=float(quality.fwhm_px),
                      elongation=float(quality.elongation), nstars=int(quality.nstars),
                      plate_scale_arcsec=facts.plate_scale_arcsec or settings.camera.plate_scale_arcsec,
                      overscan=ctx.overscan, warning=ctx.warning)
    stack_frame(group, frame)
    if ctx.flux_reference is not None and not ctx.warning:
        # A frame stacked despite its shape is no yardstick: the next clear frame sets the flux reference.
        group.ref_xy, group.ref_flux = ctx.flux_reference
    ctx.session.fwhm_history.append(frame.fwhm)
    ctx.session.elongation_history.append(frame.elongation)
    ctx.record.status, ctx.record.reason = Status.STACKED, ctx.warning
    if not group.settled:
        group.held.append(frame)
        if len(group.held) >= settings.quality.baseline_frames:
            _settle(state, settings, ctx)
    group.stack_preview = preview_of(group.accumulator.image())     # once the group is settled, if it was
    return ctx


def stack_frame(group: ExposureGroup, frame: HeldFrame) -> None:
    """Add one frame to its group's stack and totals: by :func:`accumulate`, and again when a group is rebuilt."""
    noise_var = np.clip(frame.warped, 0, None)         # sky + Poisson variance, in one plane
    noise_var *= np.float32(1.0 / frame.gain)
    noise_var += np.float32(frame.sky_rms ** 2)
    scale = (group.exptime / frame.exptime) / frame.throughput
    weight = 1.0 / (frame.sky_rms ** 2 * scale ** 2)
    group.accumulator.add(frame.frame_id, frame.warped, noise_var=noise_var, valid=frame.valid, scale=scale,
                          weight=weight, saturated=frame.saturated, fwhm=frame.fwhm)
    group.best_throughput = max(group.best_throughput, frame.throughput)
    group.total_exptime += frame.exptime
    n = len(group.inputs)
    group.sky_level = (group.sky_level * n + frame.sky_level) / (n + 1)   # mean sky of the stacked frames
    group.inputs.append(frame.name)
    group.overscan = frame.overscan or group.overscan


def _settle(state: NightState, settings: Settings, ctx: FrameContext) -> None:
    """Judge a group's provisionally stacked first frames together, now that they make a baseline.

    Why: each of them was judged against the frames before it, and the first against nothing (its
    transparency is 1 by definition, and it proposed the flux reference). Now the flux reference
    moves to the clearest of them (the reference stars' fluxes scaled by its throughput, so every
    transparency, theirs and the later frames', is relative to it), the seeing baseline is the
    filter's median FWHM (one exceptional frame cannot set it), and a frame that fails either is
    rejected after all: its record says why, and the stack is rebuilt from the others, which is
    exactly the stack of never having added it; when all are kept, the provisional stack is only
    rescaled to the moved reference (:meth:`StackAccumulator.rescale`, the same stack). Shape is not
    judged again (a trail was rejected on arrival; coma or defocus of a first frame only warn).
    """
    group, session, target = ctx.group, ctx.session, ctx.target
    held, group.held, group.settled = group.held, [], True
    best = max(h.throughput for h in held)
    baseline = session.baseline_fwhm()
    records = {(r.path, r.plane): r for r in state.records
               if r.status == Status.STACKED and r.target == target.name and r.filter == session.name}
    records[(ctx.record.path, ctx.record.plane)] = ctx.record
    kept = []
    for frame in held:
        frame.throughput /= best
        reason = judge_frame(frame.fwhm, frame.elongation, frame.throughput, frame.nstars, baseline,
                             **_limits(settings, session, frame.plate_scale_arcsec), check_shape=False)
        old = records[(frame.path, frame.plane)]
        new = old if old is ctx.record else dataclasses.replace(old)
        new.transparency = frame.throughput
        if reason:
            new.status, new.reason = Status.REJECTED, f"{reason}; judged with the group's first {len(held)} frames"
            session.n_rejected += 1
            _forget(session.fwhm_history, frame.fwhm)
            _forget(session.elongation_history, frame.elongation)
            log.warning("%s: rejected after all: %s", frame.name, new.reason)
        else:
            kept.append(frame)
        if new is not old:
            state.replace_record(old, new)
    if len(kept) == len(held) and best == 1.0:
        return                                  # nothing changed: the provisional stack is the stack
    if group.ref_flux is not None:
        group.ref_flux = group.ref_flux * best
    if len(kept) == len(held):
        # Only the flux reference moved: every frame's scale is multiplied by best (and its weight,
        # 1/(sky_rms * scale)**2, divided by best**2), which is the provisional stack rescaled.
        group.accumulator.rescale(best)
        group.best_throughput = max(h.throughput for h in held)
    else:
        group.accumulator = _new_accumulator(settings, target)
        group.best_throughput, group.total_exptime, group.sky_level, group.inputs, group.overscan = \
            1.0, 0.0, 0.0, [], ""
        for frame in kept:
            stack_frame(group, frame)
    state.restacked.add((target.name, session.name, group.label))
    log.info("%s %s %s: first %d frames judged together: %d stacked, flux reference x%.3f", target.name,
             session.name, group.label, len(held), len(kept), best)


def _forget(history: list[float], value: float) -> None:
    """Take one occurrence of ``value`` (NaN included) out of a filter's history."""
    for i, v in enumerate(history):
        if v == value or (np.isnan(v) and np.isnan(value)):
            del history[i]
            return


#: The per-frame path, in order (the names are the frame log's and the bench's step names).
STEPS: tuple[tuple[str, Step], ...] = (
    ("load", load), ("tag", tag), ("calibrate", calibrate), ("hotpixels", hotpixels), ("sky", sky),
    ("detect", detect), ("register", register), ("judge", judge), ("warp", warp), ("accumulate", accumulate))


def run_frame(state: NightState, settings: Settings, path: Path, sha256: str = "") -> list[FrameRecord]:
    """Take one file through :data:`STEPS`: one record, or one per colour plane (R, G, B).

    Never raises: a failure is the record's status and reason. A colour file
    is loaded once; each plane then runs the steps as its own frame.
    """
    ctx = _run_steps(state, settings, FrameContext(path=path, record=FrameRecord(path=str(path), sha256=sha256)),
                     STEPS[:1])
    if ctx.record.status:
        return [_finished(ctx.record)]
    try:
        planes = colour_planes(ctx.frame, saturation=_saturation_threshold(settings, ctx.frame, ctx.pedestal))
    except FrameError as exc:
        ctx.record.status, ctx.record.reason = Status.REJECTED, str(exc)
        return [_finished(ctx.record)]
    records = []
    for colour, frame in planes:
        # The file's load time is in its first record only, so that sums over records stay true.
        seconds = ctx.record.step_seconds if not records else {}
        record = FrameRecord(path=str(path), sha256=sha256, plane=colour, step_seconds=dict(seconds))
        plane_ctx = _run_steps(state, settings, FrameContext(path=path, record=record, frame=frame,
                                                             pedestal=ctx.pedestal, overscan=ctx.overscan), STEPS)
        records.append(_finished(plane_ctx.record))
    return records


def _run_steps(state: NightState, settings: Settings, ctx: FrameContext,
               steps: tuple[tuple[str, Step], ...]) -> FrameContext:
    """Run ``steps`` (timed) until one rejects the frame or finishes it early; the record says which."""
    record, path = ctx.record, ctx.path
    for name, step in steps:
        try:
            with timed(name, record.step_seconds):
                ctx = step(state, settings, ctx)
        except (FrameRejected, FrameError, TaggingError) as exc:
            record.status, record.reason = Status.REJECTED, str(exc)
            break
        except Exception as exc:  # noqa: BLE001 - one bad frame must never stop the night
            log.exception("%s: step %s failed", path, name)
            record.status, record.reason = Status.REJECTED, \
                f"internal error in step {name}: {type(exc).__name__}: {exc}"
            break
        if ctx.done:
            break
    return ctx


def _finished(record: FrameRecord) -> FrameRecord:
    record.seen_at = time.time()
    return record


# --------------------------------------------------------------------- helpers of the steps
def _quality_reason(settings: Settings, ctx: FrameContext, session: FilterSession | None,
                    transparency: float | None) -> tuple[str | None, str]:
    """(why the frame's seeing, shape, stars or transparency rule it out, if they do; what is wrong with its
    shape when that alone would have).

    Seeing and shape are judged against the filter's accepted frames (``session``) once it has some.
    A filter's first frame is not rejected on its shape alone (it may be the night's only one, and
    comatic or defocused optics shape every frame): it is stacked, and the shape's reason is its warning.
    The exception is a trail (the stars' position angles aligned across the field): a tracking or
    wind fault of that exposure, not the optics, which would smear every star of the stack.
    """
    baseline_fwhm = session.baseline_fwhm(settings.quality.baseline_frames) if session else None
    quality = ctx.quality
    scale_arcsec = ctx.frame.facts.plate_scale_arcsec or settings.camera.plate_scale_arcsec
    args = (quality.fwhm_px, quality.elongation, transparency, quality.nstars, baseline_fwhm)
    kwargs = dict(_limits(settings, session, scale_arcsec), shape=quality)
    reason = judge_frame(*args, **kwargs)
    if reason is None or (session is not None and session.n_stacked) or reason.startswith(TRAILED):
        return reason, ""
    without_shape = judge_frame(*args, **kwargs, check_shape=False)
    if without_shape == reason:
        return reason, ""
    return without_shape, reason


def _limits(settings: Settings, session: FilterSession | None, scale_arcsec: float | None) -> dict:
    """The config's quality limits and the filter's elongation baselines, as ``judge_frame`` takes them."""
    q = settings.quality
    return dict(max_fwhm_ratio=q.max_fwhm_ratio, max_elongation=q.max_elongation,
                min_transparency=q.min_transparency, min_stars=q.min_stars,
                max_fwhm_px=(q.max_fwhm_arcsec / scale_arcsec) if q.max_fwhm_arcsec and scale_arcsec else None,
                baseline_elongation=session.baseline_elongation() if session else None,
                night_elongation=session.baseline_elongation(min_frames=1) if session else None)


def _saturation_threshold(settings: Settings, frame: Frame, pedestal: float = 0.0) -> float:
    """ADU from which a pixel counts as saturated: the header's SATURATE, capped by the config's level
    (both raw levels: less the overscan ``pedestal`` subtracted on load)."""
    red = settings.reduction
    return min(frame.facts.saturate or red.saturation_adu, red.saturation_adu) - pedestal


def _warn_late_flat(state: NightState, filter_name: str, path: Path) -> None:
    """Say once, when a filter's first flat comes after science frames were stacked, that those stay as they are
    (dawn flats, live): a stack only grows, and only ``observer reprocess`` takes the flats first."""
    stacked = sum(t.filters[filter_name].n_stacked for t in state.targets.values() if filter_name in t.filters)
    if stacked:
        log.warning("%s: first %s flat after %d %s frames were stacked without one: those keep their vignetting "
                    "and dust; `observer reprocess` applies the flats to every frame", Path(path).name, filter_name,
                    stacked, filter_name)


def rebuild_masters(state: NightState, settings: Settings) -> None:
    """Masters from every calibration file so far (re-read from disk: a handful of files, cheap)."""
    def stack_of(key: str) -> list[Frame]:
        return [read_frame(p, settings)[0] for p in state.calibration_files.get(key, [])]

    bias = stack_of("bias")
    darks = stack_of("dark")
    filters = {k.split(":", 1)[1] for k in state.calibration_files if k.startswith("flat:")}
    base = combine_masters(bias=bias, darks=darks, flats=[])
    state.masters = {"": base}
    if base.dark_per_s is not None:
        # Hot pixels are hottest in a dark: they join the camera's persistent map at once.
        state.hot_map(base.dark_per_s.shape).add_dark(base.dark_per_s)
    for name in filters:
        state.masters[name] = combine_masters(bias=bias, darks=darks, flats=stack_of(f"flat:{name}"))


def read_frame(path: str | Path, settings: Settings) -> tuple[Frame, float, str]:
    """A file as every step sees it: overscan-subtracted and trimmed when its header has the sections.

    Returns the frame, the overscan level subtracted (ADU) and what was done ("" when nothing was).
    Calibration frames pass here too, so the masters have the science frames' shape and zero point.
    """
    frame = load_frame(path, settings.header.keywords())
    result = correct_overscan(frame.data, frame.header)
    if result is None:
        return frame, 0.0, ""
    frame.data = result.data
    if frame.facts.wcs is not None and any(result.origin):
        frame.facts.wcs.wcs.crpix -= np.asarray(result.origin, float)
    log.debug("%s: %s (level %.1f ADU)", Path(path).name, result.note, result.level)
    return frame, result.level, result.note


def mask_on_grid(mask: np.ndarray, transform: Transform, shape: tuple[int, int]) -> np.ndarray:
    """A frame's masked pixels (saturated, defective) carried onto the reference grid, with a 1 px margin
    for the resampling.

    They are a few thousand at most: mapping their coordinates costs far less
    than resampling a whole mask plane.
    """
    out = np.zeros(shape, bool)
    ys, xs = np.nonzero(mask)
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


def _new_target(state: NightState, settings: Settings, name: str, frame: Frame, xy: np.ndarray,
                flux: np.ndarray) -> TargetSession:
    facts = frame.facts
    pointing = (facts.ra_deg, facts.dec_deg) if facts.ra_deg is not None and facts.dec_deg is not None \
        else None
    wcs_header = dict(facts.wcs.to_header()) if facts.wcs is not None else None
    target = TargetSession(name=name, shape=frame.data.shape, ref_xy=xy, ref_flux=flux, pointing=pointing,
                           reference_file=str(frame.path), wcs_header=wcs_header,
                           plate_scale_arcsec=facts.plate_scale_arcsec or settings.camera.plate_scale_arcsec)
    state.targets[name] = target
    log.info("target %s: reference grid from %s (%d stars)", name, Path(frame.path).name, len(xy))
    return target


def _filter_session(state: NightState, target: TargetSession, name: str) -> FilterSession:
    session = target.filters.get(name)
    if session is None:
        session = FilterSession(name=name, offset_shape=state.pending_offsets.pop((target.name, name), None))
        target.filters[name] = session
    return session


def _exposure_group(settings: Settings, target: TargetSession, session: FilterSession,
                    frame: Frame, gain: CameraGain) -> ExposureGroup:
    """The frame's exposure group: one within ``reduction.exposure_group_factor`` of its EXPTIME, or a new one."""
    red, facts = settings.reduction, frame.facts
    group = session.group_for(float(facts.exptime), red.exposure_group_factor)
    if group is None:
        group = session.add_group(ExposureGroup(
            exptime=float(facts.exptime), accumulator=_new_accumulator(settings, target),
            gain=gain.value, gain_source=gain.source,
            read_noise=facts.read_noise or settings.camera.read_noise or 0.0))
        if len(session.groups) > 1:
            log.info("%s %s: exposure group %s (frames of %s)", target.name, session.name, group.label,
                     ", ".join(g.label for g in session.groups))
    return group


def _new_accumulator(settings: Settings, target: TargetSession) -> StackAccumulator:
    return StackAccumulator(target.shape, reject_sigma=settings.reduction.stack_reject_sigma)


def _throughput(ctx: FrameContext, group: ExposureGroup, radius: float, exptime: float) -> float:
    """This frame's star fluxes per second relative to its group's flux reference (the first frame).

    The first stacked frame of a group defines the reference (throughput 1): its brightest
    unsaturated stars, their reference-grid positions and fluxes. A later frame is measured
    on those same stars, by forced photometry where the registration puts them, so that a
    dimmer frame compares like with like (its own brightest stars would be another magnitude
    slice, and a neighbour matched by position another star). Stars saturated in this frame,
    or near its edge, are left out. A thin-cloud frame comes out below 1, and the stack
    divides by it so clouds do not dim the stars. The reference is only proposed here
    (``ctx.flux_reference``): it is set when the frame is stacked, so that a first frame
    rejected for its shape does not become every later frame's yardstick.
    """
    if group.ref_xy is None:
        # Saturated stars' fluxes depend on the seeing: they take no part in the transparency.
        bright = np.flatnonzero(~np.asarray(ctx.stars["saturated"], bool) & _isolated(ctx, 2 * radius))[:FLUX_STARS]
        xy = ctx.star_xy()[bright]
        ctx.flux_reference = (ctx.transform.inverse_apply(xy), _aperture_sums(ctx.data, xy, radius) / exptime)
        return 1.0
    xy = ctx.transform.apply(group.ref_xy)
    ny, nx = ctx.data.shape
    inside = (xy[:, 0] > radius) & (xy[:, 0] < nx - 1 - radius) & (xy[:, 1] > radius) & (xy[:, 1] < ny - 1 - radius)
    # Saturated pixels are a few thousand: the nearest one to each star, not a dilated full-frame mask.
    saturated = np.argwhere(ctx.saturated)[:, ::-1] if ctx.saturated is not None else np.empty((0, 2))
    clipped = np.isfinite(cKDTree(saturated).query(xy, distance_upper_bound=radius)[0]) if len(saturated) \
        else np.zeros(len(xy), bool)
    use = np.flatnonzero(inside & ~clipped)
    if use.size < 3:
        raise FrameRejected(f"only {use.size} of the filter's flux reference stars measurable in this frame "
                            "(off the frame or saturated): no transparency")
    ratios = _aperture_sums(ctx.data, xy[use], radius) / exptime / group.ref_flux[use]
    # The brightest reference stars carry the transparency; faint ones only add noise.
    order = np.argsort(group.ref_flux[use])[::-1][:50]
    return float(np.median(ratios[order]))


def _isolated(ctx: FrameContext, distance: float) -> np.ndarray:
    """Stars with no detected neighbour brighter than a tenth of them within ``distance`` px.

    Why: a neighbour's light in the aperture or the annulus depends on the seeing, so crowded
    stars would read a seeing change as a transparency change.
    """
    xy, flux = ctx.star_xy(), np.asarray(ctx.stars["flux"], float)
    if len(xy) < 2:
        return np.ones(len(xy), bool)
    pairs = cKDTree(xy).query_pairs(distance, output_type="ndarray")
    crowded = np.zeros(len(xy), bool)
    for i, j in ((pairs[:, 0], pairs[:, 1]), (pairs[:, 1], pairs[:, 0])):
        crowded[i[flux[j] > 0.1 * flux[i]]] = True
    return ~crowded


def _aperture_sums(data: np.ndarray, xy: np.ndarray, radius: float) -> np.ndarray:
    """Star fluxes in circles of ``radius`` px, less the median of an annulus around each.

    Why a local sky on top of the sky model: in a cluster's crowded centre the 2-D model
    takes up some star light, and how much changes with the seeing (measured: stars there
    came out 30-50 % dimmer in a frame at FWHM 3.0 px than at 3.6 px, which read as cloud).
    """
    if not len(xy):
        return np.empty(0)
    sums = np.asarray(CircularAperture(xy, r=radius).do_photometry(data)[0], float)
    annulus = CircularAnnulus(xy, r_in=SKY_ANNULUS[0] * radius, r_out=SKY_ANNULUS[1] * radius)
    sky = np.asarray(ApertureStats(data, annulus).median, float)
    return sums - np.nan_to_num(sky) * np.pi * radius ** 2
