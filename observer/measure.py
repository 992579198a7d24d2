"""Measuring a target: its stacks in, an immutable result out (catalogue, diagram, depth, age).

Measurement takes seconds (the age fit more) and runs off the worker thread
live, so it must not touch the night's state: :func:`measurement_request`
copies what it needs under the night's lock, :func:`measure_target` and
:func:`fit_target_age` are pure functions of that copy and the settings, and
the night applies their results under its lock (``Night.apply_measurement``,
``Night.apply_age``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from observer.config import Settings
from observer.session import ExposureGroup, FilterSession, TargetSession, group_label
from observer.state import AgeEstimate, left_out_text
from reduction.catalog import build_catalog
from reduction.exposure_groups import merge_exposure_groups, saturation_magnitude
from reduction.cmd import CmdData, cmd_data
from reduction.photometry import FLAG_BLENDED, FLAG_SATURATED, StackProduct, limiting_magnitude, snr_at

log = logging.getLogger(__name__)

#: The photometry's FWHM is at least this (px): on undersampled stacks (FWHM 1.4-2 px) an aperture
#: of 1.5 FWHM holds a share of the light that depends on where the star falls within its pixel and
#: on the resampling, an error the noise model does not know (measured: pulls of 1.8-2.1 at 1.5 px).
MIN_PHOTOMETRY_FWHM_PX = 2.0
#: Below this many stars with both filters the isochrone fit is not attempted.
MIN_STARS_FOR_AGE = 30


class AgeUnavailable(Exception):
    """No age can be fitted; the message says why (logged once and written to age.json).

    ``stars`` is the star count record (see :func:`age_stars`), so that age.json says how many
    stars the fit had and why the others were left out even when there is no age.
    """

    def __init__(self, reason: str, stars: dict | None = None) -> None:
        super().__init__(reason)
        self.stars = stars or {}


@dataclass(frozen=True)
class MeasureRequest:
    """Copies of one target's stacks, taken at night version ``version``."""

    target: str
    stacks: dict[str, StackProduct]              # each filter's longest exposure group
    completion_mag: float          # where the SNR is judged (nan: not known yet)
    version: int
    groups: dict[str, list[StackProduct]] = field(default_factory=dict)   # every group, longest first


@dataclass(frozen=True)
class Measurement:
    """What measuring a target's stacks found; the night applies it."""

    target: str
    catalog: Table | None          # None without both filters of the colour
    cmd: CmdData | None
    limiting_mag: dict[str, float]
    snr_at_mag: dict[str, float]
    saturation_mag: dict[str, dict[str, float]] = field(default_factory=dict)   # filter -> group label -> mag


@dataclass(frozen=True)
class AgeResult:
    """The age fit: what the dashboard shows and what age.json holds."""

    target: str
    estimate: AgeEstimate
    record: dict


def stack_image(session: ExposureGroup) -> np.ndarray:
    """The stack in ADU per frame of the best transparency (float32, a fresh array).

    The accumulator holds frames normalised to the filter's first frame; the
    best frame seen may be more transparent than that one (a thin cloud over
    the first frame), so the products are scaled to the best frame.
    """
    image = session.accumulator.image()
    return np.multiply(image, session.best_throughput, out=image, dtype=np.float32, casting="unsafe")


def stack_variance(session: ExposureGroup) -> np.ndarray:
    """Per-pixel variance of :func:`stack_image` (same scaling, squared)."""
    variance = session.accumulator.variance()
    return np.multiply(variance, session.best_throughput ** 2, out=variance, dtype=np.float32, casting="unsafe")


def target_wcs(target: TargetSession) -> WCS | None:
    """The reference frame's celestial WCS, when it had one."""
    return WCS(fits.Header(target.wcs_header)) if target.wcs_header else None


def stack_product(target: TargetSession, session: FilterSession, group: ExposureGroup,
                  settings: Settings) -> StackProduct:
    """What the photometry needs of one group's stack (units: ADU per frame of ``exptime``); fresh copies."""
    return StackProduct(filter=session.name, image=stack_image(group), nframes=group.accumulator.nframes(),
                        variance=stack_variance(group), saturated=group.accumulator.saturated(),
                        exptime=group.exptime, gain=group.gain, read_noise=group.read_noise,
                        n_combine=group.n_stacked,
                        fwhm_px=max(session.baseline_fwhm() or settings.reduction.fwhm_guess_px,
                                    MIN_PHOTOMETRY_FWHM_PX),
                        zeropoint=settings.filters.zeropoint(session.name), sky_level=group.sky_level,
                        wcs=target_wcs(target))


def measurement_request(target: TargetSession, settings: Settings, completion_mag: float,
                        version: int) -> MeasureRequest:
    """Copies of a target's stacks for measuring on another thread (call under the night's lock)."""
    groups = {f: [stack_product(target, s, g, settings) for g in s.groups if g.n_stacked]
              for f, s in target.filters.items() if s.n_stacked > 0}
    return MeasureRequest(target=target.name, stacks={f: g[0] for f, g in groups.items()},
                          completion_mag=completion_mag, version=version,
                          groups={f: g for f, g in groups.items() if len(g) > 1})


def measure_target(request: MeasureRequest, settings: Settings) -> Measurement:
    """Catalogue, CMD, depth and SNR of one target from its stacks (pure)."""
    color = settings.cmd.color_filters
    phot = settings.photometry
    stacks = request.stacks
    catalog, cmd = None, None
    apcorr: dict[str, float] = {}
    if all(f in stacks for f in color):
        catalog = build_catalog(stacks, color=color, detect_sigma=phot.detect_sigma,
                                aperture_fwhm=phot.aperture_fwhm, annulus_fwhm=tuple(phot.annulus_fwhm),
                                min_coverage=phot.min_coverage, psf=phot.psf, blend_level=phot.blend_level)
        apcorr = dict(catalog.meta["aperture_correction"])
        if request.groups:
            catalog = merge_exposure_groups(
                catalog, {f: request.groups.get(f, [s]) for f, s in stacks.items()}, color=color,
                saturation_adu=settings.reduction.saturation_adu, nonlinear_fraction=phot.nonlinear_fraction,
                aperture_fwhm=phot.aperture_fwhm, annulus_fwhm=tuple(phot.annulus_fwhm),
                min_coverage=phot.min_coverage, detect_sigma=phot.detect_sigma)
        cmd = cmd_data(catalog, color=color, magnitude=settings.cmd.magnitude)
    # Depth and SNR of every stack (aperture-corrected once a catalogue has measured the correction).
    annulus = tuple(phot.annulus_fwhm)
    limits = {f: float(limiting_magnitude(p, aperture_fwhm=phot.aperture_fwhm, annulus_fwhm=annulus,
                                          aperture_correction=apcorr.get(f, 1.0))) for f, p in stacks.items()}
    completion = request.completion_mag
    snr = {f: float(snr_at(p, completion, aperture_fwhm=phot.aperture_fwhm, annulus_fwhm=annulus,
                           aperture_correction=apcorr.get(f, 1.0))) if np.isfinite(completion) else float("nan")
           for f, p in stacks.items()}
    saturation = {f: {group_label(p.exptime): saturation_magnitude(p, catalog, settings.reduction.saturation_adu)
                      for p in request.groups.get(f, [stack])} for f, stack in stacks.items()} \
        if catalog is not None else {}
    return Measurement(target=request.target, catalog=catalog, cmd=cmd, limiting_mag=limits, snr_at_mag=snr,
                       saturation_mag=saturation)


def fit_target_age(target: str, catalog: Table, settings: Settings) -> AgeResult:
    """Fit the cluster's age to the catalogue (pure); :class:`AgeUnavailable` says why when it cannot."""
    from reduction.age import fit_age   # the isochrone grid is heavy: loaded when the first fit is due

    first, second = settings.cmd.color_filters
    mag_filter = settings.cmd.magnitude
    color = np.asarray(catalog["color"], float)
    mag = np.asarray(catalog[f"mag_{mag_filter}"], float)
    color_err = np.hypot(np.asarray(catalog[f"magerr_{first}"], float),
                         np.asarray(catalog[f"magerr_{second}"], float))
    mag_err = np.asarray(catalog[f"magerr_{mag_filter}"], float)
    usable, left_out = age_stars(color, mag, np.asarray(catalog["flags"]))
    stars = {"catalogue": len(catalog), "usable": int(usable.sum()), "left_out": left_out}
    if usable.sum() < MIN_STARS_FOR_AGE:
        # Poor seeing or a rich cluster: the blend flag takes most stars; PSF photometry measures them.
        hint = "; photometry.psf: true measures blended stars with their neighbours subtracted" \
            if not settings.photometry.psf and left_out["blended"] > max(left_out["saturated"], usable.sum()) else ""
        raise AgeUnavailable(f"{int(usable.sum())} usable stars, too few for an age fit "
                             f"(at least {MIN_STARS_FOR_AGE} unsaturated, unblended stars with both filters; "
                             f"left out: {left_out_text(left_out)}){hint}", stars)
    bands = (settings.filters.bands.get(first, "B"), settings.filters.bands.get(second, "V"))
    age = settings.age
    try:
        fit = fit_age(color, mag, color_err, mag_err, usable, bands=bands, mh=age.metallicity,
                      fit_mh=age.fit_metallicity, mh_sigma=age.metallicity_sigma,
                      color_scale=(age.color_scale[0], age.color_scale[1]), systematic=age.systematic_dex,
                      distance_modulus=age.distance_modulus, ebv=age.ebv,
                      calibrated=age.calibrated_zeropoints, bootstrap=age.bootstrap,
                      rng=np.random.default_rng(0),
                      # Members crowd towards the cluster's centre, field stars do not: positions weigh in.
                      x=np.asarray(catalog["x"], float), y=np.asarray(catalog["y"], float))
    except ValueError as exc:       # the fit's own "cannot": too few stars in its magnitude window, ...
        raise AgeUnavailable(str(exc), stars) from exc
    left_out = {**left_out, "outside the fitted magnitude range": int(usable.sum()) - int(fit.n_stars)}
    estimate = AgeEstimate(
        log_age=fit.log_age, log_age_low=fit.log_age_low, log_age_high=fit.log_age_high, age_myr=fit.age_myr,
        distance_modulus=fit.distance_modulus, ebv=fit.ebv, n_stars=fit.n_stars,
        isochrone_color=np.asarray(fit.iso_color), isochrone_mag=np.asarray(fit.iso_mag),
        turnoff=tuple(fit.turnoff), left_out=tuple((k, v) for k, v in left_out.items() if v))
    record = fit.to_json()
    record["stars"] = {**stars, "fitted": int(fit.n_stars), "left_out": left_out}
    record["exposure_groups"] = groups_used(catalog, usable, settings)
    return AgeResult(target=target, estimate=estimate, record=record)


def age_stars(color: np.ndarray, mag: np.ndarray, flags: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """Which stars the age fit may use, and how many were left out for each reason.

    A star with several faults is counted once, under the first: without a colour, saturated,
    blended (edge and low-coverage stars are kept: their photometry is only noisier, and its
    error says so).
    """
    reasons = {"no colour": ~(np.isfinite(color) & np.isfinite(mag)),
               "saturated": (flags & FLAG_SATURATED) != 0,
               "blended": (flags & FLAG_BLENDED) != 0}
    left = np.zeros(len(color), bool)
    counts = {}
    for reason, bad in reasons.items():
        counts[reason] = int((bad & ~left).sum())
        left |= bad
    return ~left, counts


def groups_used(catalog: Table, usable: np.ndarray, settings: Settings) -> list[dict]:
    """Which exposure groups gave the magnitudes of the stars the fit could use, and over what range."""
    used = []
    for fname in settings.cmd.color_filters:
        mags = np.asarray(catalog[f"mag_{fname}"], float)
        exptimes = np.asarray(catalog[f"exptime_{fname}"], float) if f"exptime_{fname}" in catalog.colnames \
            else np.full(len(catalog), float(catalog.meta.get("exptime", {}).get(fname, np.nan)))
        for exptime in sorted({float(e) for e in exptimes[usable] if np.isfinite(e)}, reverse=True):
            sel = usable & (exptimes == exptime) & np.isfinite(mags)
            if sel.any():
                used.append({"filter": fname, "exptime": exptime, "n_stars": int(sel.sum()),
                             "mag_range": [round(float(mags[sel].min()), 3), round(float(mags[sel].max()), 3)]})
    return used
