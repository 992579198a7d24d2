"""The published snapshot: each target's status and the advice for the observer.

The verdict follows the completion criteria of the config: enough frames per
filter, an offset frame per filter, and the wanted signal-to-noise at the
completion magnitude (or the wanted depth). Signal-to-noise of a background-
limited stack grows as sqrt(N), which gives the estimate of how many more
frames are needed. The snapshot is built from the night's state under the
night's lock (``observer.night.Night.snapshot``), so it is always consistent.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np

from observer.config import Settings
from observer.session import FilterSession, NightState, TargetSession
from observer.state import FilterStatus, Kind, Snapshot, Suggestion, TargetState

#: Free space below which the observer is warned (bytes).
LOW_DISK_BYTES = 2 * 1024 ** 3
#: Side of the downsampled previews the dashboard draws.
PREVIEW_SIDE = 192


def preview_of(image: np.ndarray, side: int = PREVIEW_SIDE) -> np.ndarray:
    """Block-averaged small copy of an image for the dashboard (float32): NaN pixels are left out of
    their block's mean, and a block of NaN only is NaN.

    Why not ``np.nanmean`` over the blocks: it costs ~22 ms on a 2048 px frame, every frame; these
    float64 block sums cost ~4 ms (~11 ms with NaN pixels) and are nearer the exact mean.
    """
    factor = max(1, int(np.ceil(max(image.shape) / side)))
    ny, nx = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    image = image[:ny, :nx]
    nan = np.isnan(image) if image.dtype.kind == "f" else None
    if nan is None or not nan.any():
        return (_block_sums(image, factor) / factor ** 2).astype(np.float32)
    with np.errstate(invalid="ignore"):             # 0 / 0: a block of NaN only
        return (_block_sums(np.where(nan, 0, image), factor) / _block_sums(~nan, factor)).astype(np.float32)


def _block_sums(image: np.ndarray, factor: int) -> np.ndarray:
    """Float64 sums over ``factor`` x ``factor`` blocks (the shape a multiple of ``factor``): whole rows
    are added first, a contiguous pass, and the columns then on the ``factor`` times smaller result."""
    ny, nx = image.shape
    rows = image.reshape(ny // factor, factor, nx).sum(axis=1, dtype=np.float64)
    return rows.reshape(ny // factor, nx // factor, factor).sum(axis=2)


def completion_mag(state: NightState, settings: Settings, tname: str) -> float:
    """The magnitude at which the stack's SNR is judged (nan: not known yet).

    The config's ``snr_at_mag`` when given; otherwise ``depth_below_turnoff``
    below the fitted turn-off, since the age rests on the main sequence below
    it. Before the first age fit there is no such magnitude and only the frame
    count and offsets are judged.
    """
    completion = settings.completion
    if completion.snr_at_mag is not None:
        return completion.snr_at_mag
    age = state.age.get(tname)
    if age is not None:
        return float(age.turnoff[1]) + completion.depth_below_turnoff
    return float("nan")


def frames_still_needed(session: FilterSession, settings: Settings) -> int:
    """More frames this filter needs to meet the completion criteria (0 when it meets them)."""
    completion = settings.completion
    n = session.n_stacked
    needed = max(0, completion.min_frames - n)
    if n > 0 and math.isfinite(session.snr_at_mag) and session.snr_at_mag > 0:
        wanted = n * (completion.target_snr / session.snr_at_mag) ** 2
        needed = max(needed, math.ceil(wanted - n - 1e-9))
    if completion.limiting_mag is not None and n > 0 and session.limiting_mag_history:
        deficit = completion.limiting_mag - session.limiting_mag_history[-1]
        if deficit > 0:
            needed = max(needed, math.ceil(n * (10 ** (0.8 * deficit) - 1)))
    return needed


def _warnings(state: NightState, settings: Settings, target: TargetSession, low_disk: bool) -> list[str]:
    notes = []
    colour = settings.cmd.color_filters
    for fname in dict.fromkeys([*colour, *target.filters]):
        session = target.filters.get(fname)
        if session is None:
            notes.append(f"no {fname} frames yet")
            continue
        if session.offset_shape is None:
            notes.append(f"no offset frame for {fname} yet")
        history = session.fwhm_history
        if len(history) >= 4 and np.mean(history[-2:]) > 1.25 * np.median(history[:-2]):
            notes.append(f"seeing degrading in {fname}: FWHM {history[-1]:.1f} px vs {np.median(history):.1f}")
    recent = [r for r in state.records if r.target == target.name and r.kind == Kind.SCIENCE][-3:]
    if recent and all(math.isfinite(r.transparency) and r.transparency < 0.85 for r in recent):
        notes.append("transparency dropping: the last frames are dimmer (cloud?)")
    shifts = [math.hypot(r.dx, r.dy) for r in recent if math.isfinite(r.dx)]
    if shifts and max(shifts) > 0.05 * max(target.shape):
        notes.append(f"drift growing: {max(shifts):.0f} px from the reference pointing")
    if low_disk:
        notes.append("disk space low in the output folder")
    return notes


def target_state(state: NightState, settings: Settings, target: TargetSession, low_disk: bool = False
                 ) -> TargetState:
    """What the dashboard shows of one target: per-filter progress, the diagram, the verdict."""
    mag = completion_mag(state, settings, target.name)
    statuses = {}
    needed = 0
    for fname, session in target.filters.items():
        statuses[fname] = FilterStatus(
            filter=fname, n_stacked=session.n_stacked, n_rejected=session.n_rejected,
            total_exptime=session.total_exptime, has_offset=session.offset_shape is not None,
            limiting_mag=session.limiting_mag_history[-1] if session.limiting_mag_history else float("nan"),
            limiting_mag_history=tuple(session.limiting_mag_history), snr_at_mag=session.snr_at_mag,
            stack_preview=session.stack_preview, raw_preview=session.last_raw_preview,
            saturation_mag=session.saturation_mag.get(session.main.label, float("nan")) if session.groups
            else float("nan"),
            groups=tuple((g.exptime, g.n_stacked) for g in session.groups))
        needed = max(needed, frames_still_needed(session, settings))
    missing = [f for f in settings.cmd.color_filters if f not in target.filters]
    no_offset = [f for f, s in target.filters.items() if s.offset_shape is None] \
        if settings.completion.require_offset else []
    if missing:
        needed = max(needed, settings.completion.min_frames)
    turnoff_reason, suggested = turnoff_advice(state, settings, target)
    reasons = []
    if needed:
        reasons.append(f"about {needed} more frame{'s' if needed != 1 else ''} per filter")
    if missing:
        reasons.append(f"no {', '.join(missing)} frames yet")
    if no_offset:
        reasons.append(f"take an offset frame in {', '.join(no_offset)}")
    if turnoff_reason:
        reasons.append(turnoff_reason)
    done = not reasons
    verdict = "done: move to the next target" if done else "keep going: " + "; ".join(reasons) + " to reach the goal"
    return TargetState(name=target.name, filters=statuses, cmd=state.cmd.get(target.name),
                       age=state.age.get(target.name), done=done, verdict=verdict,
                       frames_needed=None if done else needed,
                       warnings=tuple(_warnings(state, settings, target, low_disk)),
                       completion_mag=mag, reasons=tuple(reasons), suggested=tuple(suggested),
                       age_reason=state.age_reason.get(target.name, ""))


#: Exposure times an observer would pick (s); a suggestion is rounded down to one of them. None is
#: below 1 s: a mechanical shutter's opening and closing make shorter exposures uneven over the field.
NICE_EXPTIMES = (1.0, 2.0, 3.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0)


def turnoff_advice(state: NightState, settings: Settings, target: TargetSession) -> tuple[str | None,
                                                                                           list[Suggestion]]:
    """Is the turn-off saturated? Then the reason, and per filter the short exposure that measures it.

    The turn-off counts as saturated when it is brighter than the saturation
    magnitude of the shortest exposure group and more than
    ``completion.turnoff_saturated_fraction`` of the stars within 2 mag of that
    saturation level are saturated (a saturated star's magnitude is only a
    limit, so they pile up there; a young cluster that simply has no star at its
    fitted turn-off is no reason for short frames). The short exposure keeps a star ``short_margin_mag`` brighter
    than the turn-off below saturation (from the measured saturation magnitude of
    the filter's shortest group); the count reaches ``target_snr`` at the
    turn-off by the CCD equation, and at least ``min_short_frames``.
    """
    completion = settings.completion
    age, cmd = state.age.get(target.name), state.cmd.get(target.name)
    if not completion.require_turnoff or age is None or cmd is None or not cmd.n:
        return None, []
    to_color, to_mag = (float(v) for v in age.turnoff)
    saturated = np.asarray(cmd.saturated, bool)
    mags = np.asarray(cmd.mag, float)
    session = target.filters.get(settings.cmd.magnitude)
    sat_mag = session.saturation_mag.get(session.groups[-1].label, float("nan")) \
        if session is not None and session.groups else float("nan")
    if not math.isfinite(sat_mag):
        sat_mag = float(mags[~saturated].min()) if (~saturated).any() else float("inf")
    upper = mags <= sat_mag + 2.0
    fraction = float(saturated[upper].mean()) if upper.any() else 0.0
    if to_mag >= sat_mag or fraction <= completion.turnoff_saturated_fraction:
        return None, []
    label = f"turn-off saturated ({cmd.mag_label} < {sat_mag:.1f})"
    suggested = [s for f in settings.cmd.color_filters
                 if (s := _short_exposure(settings, target, f, _in_filter(settings, f, to_mag, to_color), label))]
    if not suggested:
        return f"{label}: take short frames", []
    by_plan: dict[tuple[int, float], list[str]] = {}
    for s in suggested:
        by_plan.setdefault((s.count, s.exptime), []).append(s.filter)
    plans = ", ".join(f"{count} x {exptime:g} s in {' and '.join(filters)}"
                      for (count, exptime), filters in by_plan.items())
    return f"{label}: take {plans}", suggested


def _in_filter(settings: Settings, fname: str, mag: float, color: float) -> float:
    """The turn-off's magnitude in ``fname``, from its CMD magnitude and colour (nan: not a colour filter)."""
    first, second = settings.cmd.color_filters
    magnitude = settings.cmd.magnitude
    if fname == magnitude:
        return mag
    if fname == first and magnitude == second:
        return mag + color
    if fname == second and magnitude == first:
        return mag - color
    return float("nan")


def _short_exposure(settings: Settings, target: TargetSession, fname: str, mag: float,
                    why: str) -> Suggestion | None:
    session = target.filters.get(fname)
    if session is None or not session.groups or not math.isfinite(mag):
        return None
    shortest = session.groups[-1]
    sat_mag = session.saturation_mag.get(shortest.label, float("nan"))
    if not math.isfinite(sat_mag):
        return None
    wanted = mag - settings.completion.short_margin_mag
    exptime = shortest.exptime * 10 ** (0.4 * (wanted - sat_mag))
    exptime = max([t for t in NICE_EXPTIMES if t <= exptime], default=NICE_EXPTIMES[0])
    gain = shortest.gain or 1.0
    signal = 10 ** (-0.4 * (mag - settings.filters.zeropoint(fname))) * exptime * gain
    fwhm = session.baseline_fwhm() or settings.reduction.fwhm_guess_px
    npix = math.pi * (settings.photometry.aperture_fwhm * fwhm) ** 2
    sky = shortest.sky_level * exptime / shortest.exptime * gain
    snr = signal / math.sqrt(signal + npix * (sky + shortest.read_noise ** 2))
    count = max(settings.completion.min_short_frames, math.ceil((settings.completion.target_snr / snr) ** 2))
    return Suggestion(filter=fname, exptime=exptime, count=count, why=why)


def build_snapshot(state: NightState, settings: Settings, outdir: Path, queue_length: int = 0) -> Snapshot:
    """The immutable state the dashboard and the headless log read."""
    low_disk = shutil.disk_usage(outdir).free < LOW_DISK_BYTES   # asked once per snapshot
    targets = {name: target_state(state, settings, t, low_disk) for name, t in state.targets.items()}
    messages = ("disk space low in the output folder",) if low_disk else ()
    return Snapshot(version=state.version, frames=tuple(state.records), targets=targets,
                    outdir=str(outdir), busy=queue_length > 0, queue_length=queue_length,
                    messages=messages)
