"""A camera that observes a simulated star cluster: the stand-in for the telescope.

The demo, the tests and the benchmarks all feed on this, so it aims at the things a
real night throws at a pipeline rather than at a clean textbook image:

* a cluster drawn from a real PARSEC isochrone (initial mass function, unresolved
  binaries, giants where the age has them) plus field stars at other distances;
* a Moffat PSF whose seeing wanders from frame to frame, integrated over pixels so
  that a star's total counts match its magnitude through the configured zeropoint;
* a graded, drifting sky (light pollution), Poisson and read noise, a bias
  pedestal, saturation at 65535 and uint16 storage with BZERO = 32768;
* detector defects at fixed positions (hot pixels, corners and edges included),
  cosmic rays, a satellite trail, one trailed frame and one thin-cloud frame;
* a tracking drift and a slow field rotation, logged per frame in the transform
  convention of truth_frames.ecsv (reference grid = the first science frame);
* files that appear and grow as a camera writes them, never renamed into place.

Everything random comes from generators seeded by ``(seed, stream)`` so that the same
seed gives byte-identical files whatever the wall clock says.

Files, in writing (and DATE-OBS) order: with ``calibration``, ``bias_NNN.fits``,
``dark_NNN.fits`` (5 per distinct science exposure time) and ``flat_<filter>_NNN.fits``;
then per filter ``<TARGET>_<filter>_NNN.fits`` and ``<TARGET>_offset_<filter>.fits``.
The truth (``truth.ecsv``) and the frame log (``<truth stem>_frames.ecsv``) go next
to, never inside, the camera folder; the log says which frame is trailed, clouded
or crossed by the satellite (never the first frame of a filter).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from observer.config import ConfigError
from reduction.isochrones import A_OVER_EBV, Isochrone, get_isochrone, interpolated_isochrone

log = logging.getLogger(__name__)

#: ADC ceiling of a 16-bit camera.
ADC_MAX = 65535
#: Random streams (second element of the generator seed) so each part of the night is
#: reproducible on its own: adding a frame never changes the stars or the detector.
_STREAM_STARS, _STREAM_DETECTOR, _STREAM_PLAN, _STREAM_OFFSET_STARS, _STREAM_FRAME = 0, 1, 2, 3, 1000
#: Streams of the rich-field and optics options (their own, so the default night is unchanged by them).
_STREAM_RICH, _STREAM_OPTICS = 4, 5
#: PSF tiles per axis when the PSF changes across the field.
_PSF_TILES = 4
#: Old field populations (log age, [M/H]) the foreground/background stars are drawn from.
_FIELD_POPULATIONS = ((8.8, 0.0), (9.3, 0.0), (9.7, -0.5), (10.0, -0.5))
#: Relative seeing per band: the atmosphere blurs blue light a little more (FWHM ~ lambda^-0.2).
_SEEING_BAND_FACTOR = {"U": 1.08, "B": 1.045, "V": 1.0, "R": 0.97, "I": 0.94}
#: Time between exposures (readout, download) and for a filter change / slew, seconds.
_READOUT_S, _FILTER_CHANGE_S, _SLEW_S = 8.0, 20.0, 90.0


@dataclass
class SimSettings:
    """Everything that defines a simulated night; the defaults are an M35-like night.

    Sizes scale with the frame: the cluster core and the star margin are fractions
    of ``size`` so that a 256 px test frame looks like a shrunken 2048 px one (use
    fewer stars for small frames, the counts are absolute).
    """

    target: str = "M35"
    filters: tuple[str, ...] = ("blue", "green")
    frames: int = 10
    short_frames: int = 0                   # short frames per filter after the long ones (for the bright stars)
    short_exptime: float = 3.0
    size: int = 2048                        # frame width in pixels
    height: int = 0                         # frame height; 0: square (``size``); cameras are rarely square
    cadence: float = 0.0
    seed: int = 1
    age_myr: float = 150.0
    distance_modulus: float = 10.3
    ebv: float = 0.2
    mh: float = 0.0
    n_members: int = 600
    n_field: int = 300
    binary_fraction: float = 0.3
    faint_limit_mag: float = 22.5          # faintest star simulated (V), below any single-frame limit
    calibration: bool = False
    zeropoints: dict[str, float] = field(default_factory=lambda: {"blue": 25.0, "green": 25.0, "red": 25.0})
    default_zeropoint: float = 25.0
    bands: dict[str, str] = field(default_factory=lambda: {"blue": "B", "green": "V", "red": "R"})
    # Dark-ish suburban sky; the brightest edge is ~30 % above this (light pollution).
    sky_mag_arcsec2: dict[str, float] = field(default_factory=lambda: {"blue": 20.3, "green": 19.6,
                                                                       "red": 19.0})
    gain: float = 1.5                       # e-/ADU
    gain_keyword: bool = True               # write GAIN/EGAIN (False: a camera whose driver writes no gain)
    read_noise: float = 9.0                 # e-
    bias_level: float = 1000.0              # ADU
    exptime_range: tuple[float, float] = (30.0, 60.0)
    seeing_range: tuple[float, float] = (2.5, 4.5)   # FWHM, px
    moffat_beta: float = 3.0
    # Optics the pipeline does not assume (issue 13): the night's Moffat beta drawn from beta_range, the
    # PSF growing and elongating towards the corners by psf_field_variation, vignetting and dust donuts
    # in the science frames (the flats carry them too, and correct them, on calibration nights).
    realistic_optics: bool = False
    beta_range: tuple[float, float] = (2.5, 4.5)
    psf_field_variation: float = 0.12
    # A rich field: rich_pairs companions 1-3 px from random stars and rich_neighbours stars within
    # 3-10 px of the brightest ones (use with n_members/n_field in the thousands).
    rich_pairs: int = 0
    rich_neighbours: int = 0
    drift_px: float = 14.0                  # tracking drift by the last science frame
    rotation_deg: float = 0.3               # field rotation by the last science frame (at most)
    bad_frames: bool = True                 # one trailed frame (first filter), one thin-cloud frame (second)
    # "trailed", "cloud" or "sharp": instead of the bad frames above, the first frame of every filter is
    # trailed, clouded or very sharp (FIRST_SHARP_FACTOR of the seeing): where pipelines take their reference.
    first_bad: str = ""
    cloud_transparency: float = 0.5
    trail_px: float = 6.0
    satellite: bool = True
    fill_seconds: float = 0.3               # a file grows over this time when written
    start_time: str = "2026-01-15T20:30:00"  # UTC of the first science exposure (never the wall clock)
    site_lat_deg: float = 52.2
    site_lon_deg: float = 0.1
    ra_deg: float = 92.225                  # M35
    dec_deg: float = 24.333
    offset_arcmin: float = 20.0             # offset frames point this far north
    pixel_size_um: float = 9.0
    focal_length_mm: float = 2000.0
    aperture_mm: float = 500.0
    instrument: str = "Simulated CCD (observer)"
    telescope: str = "0.5 m reflector (simulated)"

    def __post_init__(self) -> None:
        """Refuse impossible nights with ConfigError (a ValueError the CLI turns into exit code 2)."""
        self.filters = tuple(self.filters)
        if not self.filters or len(set(self.filters)) != len(self.filters):
            raise ConfigError(f"filters: expected distinct filter names, got {self.filters!r}")
        self.height = self.height or self.size
        if self.frames < 1 or min(self.size, self.height) < 64:
            raise ConfigError(f"expected frames >= 1 and a frame of at least 64 x 64 px, got frames={self.frames}, "
                              f"{self.size} x {self.height} px")
        if self.cadence < 0 or self.fill_seconds < 0:
            raise ConfigError("cadence and fill_seconds must be >= 0")
        if self.short_frames < 0 or not self.short_exptime > 0:
            raise ConfigError(f"expected short_frames >= 0 and short_exptime > 0, got {self.short_frames} and "
                              f"{self.short_exptime}")
        if self.first_bad not in FIRST_BAD:
            raise ConfigError(f"first_bad: expected one of {', '.join(FIRST_BAD[1:])}, got {self.first_bad!r}")
        if not self.gain > 0:
            raise ConfigError(f"gain: expected > 0 e-/ADU, got {self.gain}")
        if not 0 < self.exptime_range[0] <= self.exptime_range[1]:
            raise ConfigError(f"exptime_range: expected 0 < low <= high, got {self.exptime_range}")

    def zeropoint(self, filt: str) -> float:
        return float(self.zeropoints.get(filt, self.default_zeropoint))

    def band(self, filt: str) -> str:
        """Johnson band a filter stands for (V for an unknown filter, e.g. luminance)."""
        return self.bands.get(filt, "V")

    @property
    def shape(self) -> tuple[int, int]:
        """Frame (rows, columns): (height, size)."""
        return self.height, self.size

    @property
    def centre(self) -> tuple[float, float]:
        """Frame centre (x, y) in pixel coordinates: the rotation centre and the cluster's."""
        return (self.size - 1) / 2.0, (self.height - 1) / 2.0

    @property
    def plate_scale_arcsec(self) -> float:
        return 206.265 * self.pixel_size_um / self.focal_length_mm


@dataclass
class NightTruth:
    """What was simulated: the star truth, the frame log, and where everything went."""

    stars: Table
    frames: Table
    truth_path: Path
    frames_path: Path
    files: list[Path]
    hot_pixels: np.ndarray          # (N, 2) int (x, y) detector positions


# --------------------------------------------------------------------------- stars


def _combine(m1: np.ndarray, m2: np.ndarray) -> np.ndarray:
    """Magnitude of two unresolved stars (NaN companion = no companion)."""
    f2 = np.where(np.isfinite(m2), 10 ** (-0.4 * np.nan_to_num(m2, nan=99.0)), 0.0)
    return -2.5 * np.log10(10 ** (-0.4 * m1) + f2)


def _draw_population(iso: Isochrone, n: int, bands: set[str], dm: np.ndarray | float, ebv: np.ndarray | float,
                     rng: np.random.Generator, binary_fraction: float,
                     mass_low: float | None = None) -> dict[str, np.ndarray]:
    """Stars drawn from one isochrone: primary masses follow the isochrone's IMF.

    Primaries are sampled by inverting the cumulative IMF (``int_IMF``) and their
    magnitudes interpolated in that same variable: short phases (giants) occupy a
    tiny IMF interval, so they turn up about as rarely as in a real cluster.
    Companions (mass ratio uniform 0.2-1) add their flux; below the isochrone's
    lowest mass they are too faint to matter.
    """
    imf = np.maximum.accumulate(iso.int_imf)
    lo = imf[0] if mass_low is None else float(np.interp(mass_low, iso.mini, imf))
    u = rng.uniform(lo, imf[-1], n)
    mass = np.interp(u, imf, iso.mini)
    idx = np.clip(np.searchsorted(imf, u), 0, len(imf) - 1)
    binary = rng.random(n) < binary_fraction
    q = rng.uniform(0.2, 1.0, n)
    m2 = mass * q
    has_companion = binary & (m2 >= iso.mini[0])
    # Companions are less massive than the primary: main-sequence-like, interpolate in mass
    # over the part of the track before the mass becomes degenerate (giant phases).
    ms = np.concatenate([[True], np.diff(iso.mini) > 1e-6])
    mags = {}
    for band in bands:
        track = iso.mag(band)
        extinct = dm + A_OVER_EBV[band] * ebv
        primary = np.interp(u, imf, track) + extinct
        companion = np.where(has_companion, np.interp(m2, iso.mini[ms], track[ms]) + extinct, np.nan)
        mags[band] = _combine(primary, companion)
    return {"mass": mass, "stage": iso.label[idx].astype(np.int16), "binary": binary, "mags": mags}


def _plummer_xy(n: int, s: SimSettings, margin: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Cluster members concentrated to the field centre (Plummer profile, scale 0.15 x the shorter side)."""
    a = 0.15 * min(s.shape)
    cx, cy = s.centre
    xs, ys = np.empty(0), np.empty(0)
    while xs.size < n:
        m = 2 * (n - xs.size) + 16
        u = rng.uniform(1e-6, 1.0, m)
        r = a / np.sqrt(u ** (-2.0 / 3.0) - 1.0)
        phi = rng.uniform(0, 2 * np.pi, m)
        x, y = cx + r * np.cos(phi), cy + r * np.sin(phi)
        keep = (x > -margin) & (x < s.size - 1 + margin) & (y > -margin) & (y < s.height - 1 + margin)
        xs, ys = np.concatenate([xs, x[keep]]), np.concatenate([ys, y[keep]])
    return xs[:n], ys[:n]


def _field_stars(n: int, s: SimSettings, bands: set[str], margin: float,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Foreground/background stars: old populations spread uniformly in volume along the line of sight.

    Distance moduli 7-15 with density proportional to volume (p ~ 10^(0.6 DM)),
    reddening growing with distance; only stars above the faint limit are kept.
    """
    isos = [get_isochrone(age, mh) for age, mh in _FIELD_POPULATIONS]
    parts: list[dict[str, np.ndarray]] = []
    have = 0
    while have < n:
        batch = 2 * (n - have) + 32
        which = rng.integers(0, len(isos), batch)
        # Inverse CDF of p(DM) ~ 10^(0.6 DM) on [7, 15].
        lo, hi = 10 ** (0.6 * 7.0), 10 ** (0.6 * 15.0)
        dm = np.log10(lo + rng.random(batch) * (hi - lo)) / 0.6
        ebv = s.ebv * np.clip(10 ** ((dm - s.distance_modulus) / 5.0), 0.0, 1.5)
        for k, iso in enumerate(isos):
            sel = which == k
            if not sel.any():
                continue
            pop = _draw_population(iso, int(sel.sum()), bands | {"V"}, dm[sel], ebv[sel], rng, s.binary_fraction)
            ok = pop["mags"]["V"] <= s.faint_limit_mag
            parts.append({"mass": pop["mass"][ok], "stage": pop["stage"][ok], "binary": pop["binary"][ok],
                          **{f"mag_{b}": pop["mags"][b][ok] for b in bands}})
            have += int(ok.sum())
    # Shuffle before trimming the surplus so that no population is cut preferentially.
    order = rng.permutation(have)[:n]
    out = {key: np.concatenate([p[key] for p in parts])[order] for key in parts[0]}
    out["x"] = rng.uniform(-margin, s.size - 1 + margin, n)
    out["y"] = rng.uniform(-margin, s.height - 1 + margin, n)
    return out


def _margin(s: SimSettings) -> float:
    """Stars are simulated this far beyond the reference frame: tracking drift brings them in."""
    return 0.04 * max(s.shape) + 24.0


def make_stars(s: SimSettings) -> Table:
    """The truth catalogue: cluster members then field stars, on the reference grid.

    Includes stars up to ``_margin`` px outside the reference frame (they drift in
    and out); select ``0 <= x <= size - 1``, ``0 <= y <= height - 1`` for stars on the reference grid.
    """
    rng = np.random.default_rng([s.seed, _STREAM_STARS])
    bands = {s.band(f) for f in s.filters}
    iso = interpolated_isochrone(math.log10(s.age_myr * 1e6), s.mh)   # the truth off the grid
    v_app = iso.mag("V") + s.distance_modulus + A_OVER_EBV["V"] * s.ebv
    visible = iso.mini[v_app <= s.faint_limit_mag]
    mass_low = float(visible.min()) if visible.size else None
    members = _draw_population(iso, s.n_members, bands | {"V"}, s.distance_modulus, s.ebv, rng,
                               s.binary_fraction, mass_low=mass_low)
    margin = _margin(s)
    mx, my = _plummer_xy(s.n_members, s, margin, rng)
    field_ = _field_stars(s.n_field, s, bands, margin, rng)
    if s.rich_pairs or s.rich_neighbours:
        _add_close_companions(s, members, mx, my)
        mx, my = members.pop("x"), members.pop("y")
    table = Table()
    n_members = len(mx)
    table["id"] = np.arange(1, n_members + len(field_["x"]) + 1, dtype=np.int32)
    table["x"] = np.concatenate([mx, field_["x"]])
    table["y"] = np.concatenate([my, field_["y"]])
    for f in s.filters:
        b = s.band(f)
        table[f"mag_{f}"] = np.concatenate([members["mags"][b], field_[f"mag_{b}"]])
    table["member"] = np.concatenate([np.ones(n_members, bool), np.zeros(len(field_["x"]), bool)])
    table["binary"] = np.concatenate([members["binary"], field_["binary"]])
    table["mass"] = np.concatenate([members["mass"], field_["mass"]])
    table["stage"] = np.concatenate([members["stage"], field_["stage"]])
    for name in table.colnames:
        if table[name].dtype.kind == "f":
            table[name] = np.round(table[name], 5)
    table.meta.update({
        "target": s.target, "age_myr": float(round(10 ** (iso.log_age - 6), 3)), "log_age": float(iso.log_age),
        "age_myr_requested": float(s.age_myr), "distance_modulus": float(s.distance_modulus),
        "ebv": float(s.ebv), "mh": float(iso.mh), "bands": {f: s.band(f) for f in s.filters},
        "zeropoints": {f: s.zeropoint(f) for f in s.filters}, "gain": float(s.gain),
        "read_noise": float(s.read_noise), "bias_level": float(s.bias_level), "saturation": ADC_MAX,
        "seed": int(s.seed), "size": int(s.size), "height": int(s.height), "moffat_beta": night_beta(s), "plate_scale_arcsec": round(s.plate_scale_arcsec, 4),
        "stage_labels": "PARSEC: 0 pre-MS, 1 MS, 2 SGB, 3 RGB, 4-6 core He burning, 7-8 AGB, 9 post-AGB",
    })
    return table


def _add_close_companions(s: SimSettings, members: dict, mx: np.ndarray, my: np.ndarray) -> None:
    """Rich-field companions, as cluster members: ``rich_pairs`` 1-3 px from random members and
    ``rich_neighbours`` 3-10 px from the brightest tenth, 0-3 mag fainter (``members`` gains x, y)."""
    rng = np.random.default_rng([s.seed, _STREAM_RICH])
    vmag = members["mags"]["V"]
    bright = np.argsort(vmag)[:max(len(vmag) // 10, 1)]
    hosts = np.r_[rng.integers(0, len(vmag), s.rich_pairs), rng.choice(bright, s.rich_neighbours)]
    dist = np.r_[rng.uniform(1.0, 3.0, s.rich_pairs), rng.uniform(3.0, 10.0, s.rich_neighbours)]
    phi = rng.uniform(0, 2 * np.pi, len(hosts))
    dmag = rng.uniform(0.0, 3.0, len(hosts))
    members["x"] = np.r_[mx, mx[hosts] + dist * np.cos(phi)]
    members["y"] = np.r_[my, my[hosts] + dist * np.sin(phi)]
    for band in members["mags"]:
        members["mags"][band] = np.r_[members["mags"][band], members["mags"][band][hosts] + dmag]
    for key in ("mass", "stage", "binary"):
        members[key] = np.r_[members[key], members[key][hosts]]


# --------------------------------------------------------------------------- PSF


@dataclass(frozen=True)
class Psf:
    """An elliptical Moffat, optionally smeared along a straight trail (tracking error)."""

    fwhm: float                 # geometric-mean FWHM, px
    beta: float = 3.0
    axis_ratio: float = 1.0     # major/minor >= 1
    angle: float = 0.0          # of the major axis, radians from +x
    trail_px: float = 0.0
    trail_angle: float = 0.0

    def alphas(self) -> tuple[float, float]:
        alpha = self.fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / self.beta) - 1.0))
        root = math.sqrt(self.axis_ratio)
        return alpha * root, alpha / root

    def offsets(self, oversample: int) -> np.ndarray:
        """Sample points (dx, dy) within a pixel (and along the trail) averaged to integrate the PSF."""
        sub = (np.arange(oversample) + 0.5) / oversample - 0.5
        ox, oy = np.meshgrid(sub, sub)
        pts = np.column_stack([ox.ravel(), oy.ravel()])
        if self.trail_px <= 0:
            return pts
        steps = np.linspace(-0.5, 0.5, int(math.ceil(self.trail_px)) + 1) * self.trail_px
        trail = np.column_stack([steps * math.cos(self.trail_angle), steps * math.sin(self.trail_angle)])
        return (pts[:, None, :] + trail[None, :, :]).reshape(-1, 2)


def render_stars(image: np.ndarray, x: np.ndarray, y: np.ndarray, flux: np.ndarray, psf: Psf,
                 oversample: int = 3) -> None:
    """Add stars of total ``flux`` (image units) centred at (x, y) into ``image``, in place.

    Each star is a stamp of the PSF averaged over ``oversample``^2 points per pixel
    (an integral over the pixel, not a sample at its centre). The stamp radius grows
    with brightness until the wing falls below ~0.3 counts, and is at least
    4.5 alpha, which leaves < 0.3 % of a Moffat(beta=3)'s flux outside: totals are
    right to better than 1 %. Stars partly off the frame are simply cut.
    """
    ny, nx = image.shape
    a1, a2 = psf.alphas()
    beta = psf.beta
    c, s = math.cos(psf.angle), math.sin(psf.angle)
    # Quadratic form of the rotated ellipse: (x'/a1)^2 + (y'/a2)^2 = qa x^2 + qb x y + qc y^2.
    qa = c * c / a1 ** 2 + s * s / a2 ** 2
    qb = 2 * c * s * (1 / a1 ** 2 - 1 / a2 ** 2)
    qc = s * s / a1 ** 2 + c * c / a2 ** 2
    norm = (beta - 1.0) / (math.pi * a1 * a2)
    half_trail = psf.trail_px / 2.0
    base = int(math.ceil(4.5 * a1 + half_trail))
    # Radius where norm*F*(1+r^2/a^2)^-beta drops to 0.3 counts.
    level = np.maximum(norm * np.asarray(flux, float) / 0.3, 1.0)
    wing = a1 * np.sqrt(np.maximum(level ** (1.0 / beta) - 1.0, 0.0)) + half_trail
    radius = np.clip(np.ceil(wing), base, 160).astype(int)
    # Bucket radii (base, 2 base, 4 base, ...) so stamps are batched.
    bucket = base * 2 ** np.ceil(np.log2(radius / base)).astype(int)
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    onframe = (ix + bucket >= 0) & (ix - bucket < nx) & (iy + bucket >= 0) & (iy - bucket < ny) & (flux > 0)
    offsets = psf.offsets(oversample if psf.trail_px <= 0 else 2)
    for r in np.unique(bucket[onframe]):
        sel = np.flatnonzero(onframe & (bucket == r))
        u = np.arange(-r, r + 1, dtype=np.float32)
        fx = (x[sel] - ix[sel]).astype(np.float32)[:, None, None]
        fy = (y[sel] - iy[sel]).astype(np.float32)[:, None, None]
        acc = np.zeros((sel.size, u.size, u.size), np.float32)
        for ox, oy in offsets:
            dx = u[None, None, :] + np.float32(ox) - fx
            dy = u[None, :, None] + np.float32(oy) - fy
            t = 1.0 / (1.0 + (qa * dx * dx + qb * dx * dy + qc * dy * dy))
            acc += t ** beta if beta != 3.0 else t * t * t
        acc *= (np.float32(norm / len(offsets)) * flux[sel].astype(np.float32))[:, None, None]
        for k, i in enumerate(sel):
            x0, y0 = ix[i] - r, iy[i] - r
            xa, ya = max(x0, 0), max(y0, 0)
            xb, yb = min(x0 + u.size, nx), min(y0 + u.size, ny)
            if xa < xb and ya < yb:
                image[ya:yb, xa:xb] += acc[k, ya - y0:yb - y0, xa - x0:xb - x0]


def psf_elongation(psf: Psf) -> float:
    """Elongation (major/minor from second moments) of the PSF core above 10 % of its peak.

    This is the figure a segmentation-based measurement of a bright star gives; a
    round Moffat gives 1.0, the trailed frame ~1.5.
    """
    r = int(math.ceil(3 * psf.fwhm + psf.trail_px))
    stamp = np.zeros((2 * r + 1, 2 * r + 1), np.float32)
    render_stars(stamp, np.array([float(r)]), np.array([float(r)]), np.array([1.0]), psf)
    yy, xx = np.mgrid[:stamp.shape[0], :stamp.shape[1]]
    w = np.where(stamp >= 0.1 * stamp.max(), stamp, 0.0)
    mx, my = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
    cxx = (w * (xx - mx) ** 2).sum() / w.sum()
    cyy = (w * (yy - my) ** 2).sum() / w.sum()
    cxy = (w * (xx - mx) * (yy - my)).sum() / w.sum()
    ev = np.linalg.eigvalsh(np.array([[cxx, cxy], [cxy, cyy]]))
    return float(math.sqrt(ev[1] / ev[0]))


# --------------------------------------------------------------------------- detector


@dataclass
class Detector:
    """The camera's fixed properties: the same in every frame of the night."""

    bias: np.ndarray                # ADU, pedestal + faint column pattern
    hot_xy: np.ndarray              # (N, 2) int x, y
    hot_rate: np.ndarray            # e-/s for each hot pixel
    dark_rate: np.ndarray | None    # e-/s per pixel (calibration nights only; amp glow corner)
    flats: dict[str, np.ndarray]    # relative response per filter (calibration nights only)
    sky_shape: np.ndarray           # light-pollution gradient, median 1
    illumination: np.ndarray | None = None   # vignetting and dust of the optics (no flats: left in the data)


def _hot_pixels(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A few hundred hot pixels (scaled with area), always including the four corners and edge pixels."""
    ny, nx = shape
    n_random = max(24, int(round(200 * nx * ny / 2048 ** 2)))
    lx, ly = nx - 1, ny - 1
    corners = [(0, 0), (lx, 0), (0, ly), (lx, ly)]
    edge = []
    for _ in range(3):
        edge += [(int(rng.integers(1, lx)), 0), (int(rng.integers(1, lx)), ly),
                 (0, int(rng.integers(1, ly))), (lx, int(rng.integers(1, ly)))]
    flat_idx = rng.choice(nx * ny, n_random, replace=False)
    inner = list(zip((flat_idx % nx).tolist(), (flat_idx // nx).tolist()))
    unique = dict.fromkeys(corners + edge + inner)
    return np.array(list(unique), dtype=np.int32)


def _donut(shape: tuple[int, int], cx: float, cy: float, radius: float, depth: float) -> np.ndarray:
    """Shadow of an out-of-focus dust speck: a soft ring (the secondary mirror makes the hole)."""
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    r = np.hypot(xx - cx, yy - cy)
    outer = 1.0 / (1.0 + np.exp(np.clip((r - radius) / 1.5, -50, 50)))
    inner = 1.0 / (1.0 + np.exp(np.clip((r - 0.45 * radius) / 1.5, -50, 50)))
    return (1.0 - depth * (outer - inner)).astype(np.float32)


def make_detector(s: SimSettings) -> Detector:
    """Bias pattern, hot pixels, sky gradient and (for calibration nights) dark and flat patterns."""
    rng = np.random.default_rng([s.seed, _STREAM_DETECTOR])
    ny, nx = shape = s.shape
    side = min(shape)                   # dust shadows scale with the shorter side
    wh = np.array([nx, ny], float)

    def ramp(n: int) -> np.ndarray:
        return np.arange(n, dtype=np.float32) / np.float32(n - 1) - np.float32(0.5)

    # Coordinates in [-0.5, 0.5] as a row and a column: broadcasting keeps 4096^2 frames light.
    xx, yy = ramp(nx)[None, :], ramp(ny)[:, None]
    columns = rng.normal(0.0, 1.5, nx).astype(np.float32)
    bias = np.float32(s.bias_level) + columns[None, :] + np.float32(3.0) * (yy + np.float32(0.5))
    hot = _hot_pixels(shape, rng)
    hot_rate = (np.exp(rng.uniform(np.log(20.0), np.log(2000.0), len(hot))) * s.gain).astype(np.float32)
    # Light pollution: brighter towards one edge, gently curved.
    phi = rng.uniform(0, 2 * np.pi)
    p = np.float32(math.cos(phi)) * xx + np.float32(math.sin(phi)) * yy
    sky_shape = 1.0 + np.float32(0.3) * p + np.float32(0.1) * p * p
    sky_shape /= np.median(sky_shape[::4, ::4])
    dark_rate, flats, illumination = None, {}, None
    if s.realistic_optics and not s.calibration:
        # The same optics as a calibration night's flats show, drawn from their own stream.
        orng = np.random.default_rng([s.seed, _STREAM_OPTICS, 1])
        illumination = ((1.0 - 0.3 * (xx * xx + yy * yy))
                        * _donut(shape, *orng.uniform(0.2, 0.8, 2) * wh, 0.02 * side + 6, 0.05)).astype(np.float32)
    if s.calibration:
        corner = np.hypot(xx + 0.5, yy + 0.5)
        dark_rate = (0.05 + 2.0 * np.exp(-corner / 0.12)).astype(np.float32)
        vignette = (1.0 - 0.3 * (xx * xx + yy * yy)).astype(np.float32)
        prnu = rng.normal(1.0, 0.005, shape).astype(np.float32)
        common = vignette * prnu * _donut(shape, *rng.uniform(0.2, 0.8, 2) * wh, 0.02 * side + 6, 0.05)
        for f in s.filters:
            own = _donut(shape, *rng.uniform(0.15, 0.85, 2) * wh, 0.03 * side + 8, 0.04)
            flats[f] = common * own
    return Detector(bias=bias, hot_xy=hot, hot_rate=hot_rate, dark_rate=dark_rate, flats=flats,
                    sky_shape=sky_shape.astype(np.float32), illumination=illumination)


# --------------------------------------------------------------------------- night plan


@dataclass
class FramePlan:
    """One file of the night: what it is and every true parameter it is rendered with."""

    index: int
    file: str
    kind: str                       # science, offset, bias, dark, flat
    filter: str
    date_obs: datetime
    exptime: float
    psf: Psf | None = None
    dx: float = math.nan
    dy: float = math.nan
    rotation_deg: float = math.nan
    sky_rate: float = 0.0           # ADU/s/px at the median of the gradient
    transparency: float = math.nan
    flat_level: float = 0.0         # ADU, flats only
    trailed: bool = False
    clouded: bool = False
    satellite: bool = False
    ccd_temp: float = -15.0
    n_cosmics: int = 0
    ra_deg: float = 0.0
    dec_deg: float = 0.0
    object: str = ""


def _sky_rate(s: SimSettings, filt: str) -> float:
    """Sky ADU/s per pixel from the sky surface brightness through the zeropoint."""
    mu = s.sky_mag_arcsec2.get(filt, 19.5)
    return 10 ** (-0.4 * (mu - s.zeropoint(filt))) * s.plate_scale_arcsec ** 2


def _exptimes(s: SimSettings, rng: np.random.Generator) -> dict[str, float]:
    """One exposure time per filter, a round multiple of 5 s within the range (as observers pick them)."""
    lo, hi = s.exptime_range
    choices = np.arange(math.ceil(lo / 5) * 5, hi + 1e-9, 5.0)
    if choices.size == 0:
        choices = np.array([lo])
    return {f: float(rng.choice(choices)) for f in s.filters}


Slot = tuple[int, int]   # (filter index, frame index) of a special frame

#: SimSettings.first_bad: "" (the usual bad frames) or what the first frame of every filter is.
FIRST_BAD = ("", "trailed", "cloud", "sharp")
#: A "sharp" first frame's FWHM against the seeing of the night's other frames.
FIRST_SHARP_FACTOR = 0.5


def _bad_frame_slots(s: SimSettings) -> tuple[set[Slot], set[Slot], set[Slot], Slot | None]:
    """(filter index, frame index) of the trailed, clouded, sharp and satellite frames.

    Never the first frame of a filter (that is where pipelines take their reference), unless
    ``first_bad`` asks for exactly that: then the first frame of every filter is the only bad one.
    """
    mid = max(1, s.frames // 2)
    trailed: set[Slot] = set()
    clouded: set[Slot] = set()
    sharp: set[Slot] = set()
    if s.first_bad:
        firsts = {(fi, 0) for fi in range(len(s.filters))}
        {"trailed": trailed, "cloud": clouded, "sharp": sharp}[s.first_bad].update(firsts)
    elif s.bad_frames and s.frames >= 2:
        trailed.add((0, mid))
        if len(s.filters) >= 2:
            clouded.add((1, mid))
        elif s.frames >= 3:
            clouded.add((0, mid + 1 if mid + 1 < s.frames else mid - 1))
    satellite = None
    if s.satellite:
        last = len(s.filters) - 1
        for k in (2, 1, s.frames - 1):        # never the first frame: a clean reference
            if 1 <= k < s.frames and (last, k) not in trailed | clouded:
                satellite = (last, k)
                break
    return trailed, clouded, sharp, satellite


def _sexagesimal(value: float, hours: bool) -> str:
    """'HH MM SS.s' for RA (from degrees), '+DD MM SS' for Dec, as acquisition programs write them."""
    if hours:
        total = round((value % 360.0) / 15.0 * 36000)  # tenths of a second
        h, rest = divmod(total, 36000)
        m, t = divmod(rest, 600)
        return f"{h % 24:02d} {m:02d} {t // 10:02d}.{t % 10}"
    sign = "-" if value < 0 else "+"
    total = round(abs(value) * 3600)
    d, rest = divmod(total, 3600)
    m, sec = divmod(rest, 60)
    return f"{sign}{d:02d} {m:02d} {sec:02d}"


def plan_night(s: SimSettings) -> list[FramePlan]:
    """Every file of the night in writing order, with all its true parameters drawn up front.

    Order: calibration (bias, darks per science exposure time, flats per filter;
    taken an hour before), then per filter the science frames and that filter's
    offset frame. The first science frame has exactly zero shift and rotation.
    """
    rng = np.random.default_rng([s.seed, _STREAM_PLAN])
    exptimes = _exptimes(s, rng)
    start = datetime.fromisoformat(s.start_time)
    plans: list[FramePlan] = []

    def add(**kw) -> FramePlan:
        plan = FramePlan(index=len(plans), **kw)
        plans.append(plan)
        return plan

    def temp() -> float:
        return round(-15.0 + rng.normal(0.0, 0.08), 2)

    def cosmics(exptime: float) -> int:
        """A few dozen hits per 2048^2 frame and 45 s."""
        return int(rng.poisson(35.0 * s.size * s.height / 2048 ** 2 * exptime / 45.0))

    if s.calibration:
        t = start - timedelta(hours=1)
        n_cal = 5
        for k in range(n_cal):
            add(file=f"bias_{k + 1:03d}.fits", kind="bias", filter="", date_obs=t, exptime=0.0, object="Bias")
            t += timedelta(seconds=_READOUT_S)
        dark_no = 0
        for exptime in sorted(set(exptimes.values())):
            for _ in range(n_cal):
                dark_no += 1
                add(file=f"dark_{dark_no:03d}.fits", kind="dark", filter="", date_obs=t, exptime=exptime,
                    object="Dark", n_cosmics=cosmics(exptime))
                t += timedelta(seconds=exptime + _READOUT_S)
        for f in s.filters:
            for k in range(n_cal):
                add(file=f"flat_{f}_{k + 1:03d}.fits", kind="flat", filter=f, date_obs=t, exptime=3.0,
                    flat_level=float(rng.uniform(22000, 28000)), object="Flat")
                t += timedelta(seconds=3.0 + _READOUT_S)

    # Science timeline (seconds after the first science exposure).
    times: dict[tuple[int, int], float] = {}
    offset_times: dict[int, float] = {}
    t_s = 0.0
    def exptime_of(f: str, k: int) -> float:
        return exptimes[f] if k < s.frames else s.short_exptime

    for fi, f in enumerate(s.filters):
        for k in range(s.frames + s.short_frames):
            times[(fi, k)] = t_s
            t_s += exptime_of(f, k) + _READOUT_S
        offset_times[fi] = t_s + _SLEW_S
        t_s = offset_times[fi] + exptimes[f] + _READOUT_S + _SLEW_S + _FILTER_CHANGE_S
    span = max(max(times.values()), 1.0)      # the science frames: tracking is logged over these
    night = t_s                               # the whole sequence: the sky drifts over it

    # Tracking: a linear drift, periodic error of the worm gear, slow field rotation.
    drift_angle = rng.uniform(0, 2 * np.pi)
    drift_total = s.drift_px * rng.uniform(0.85, 1.0)
    pe_amp, pe_period, pe_phase = rng.uniform(0.3, 0.7), rng.uniform(400, 600), rng.uniform(0, 2 * np.pi)
    rot_total = s.rotation_deg * rng.uniform(0.7, 1.0) * rng.choice([-1.0, 1.0])

    def tracking(tt: float) -> tuple[float, float, float]:
        pe = pe_amp * (math.sin(2 * math.pi * tt / pe_period + pe_phase) - math.sin(pe_phase))
        frac = tt / span
        # "+ 0.0" turns the -0.0 of a negative rate at t = 0 into 0.0 for the log.
        return (float(drift_total * frac * math.cos(drift_angle) + pe) + 0.0,
                float(drift_total * frac * math.sin(drift_angle)) + 0.0, float(rot_total * frac) + 0.0)

    seeing0 = rng.uniform(0.25, 0.55) * (s.seeing_range[1] - s.seeing_range[0]) + s.seeing_range[0]
    beta = night_beta(s)
    walk = 0.0
    trailed, clouded, sharp, satellite = _bad_frame_slots(s)
    trail_angle = rng.uniform(0, np.pi)

    def psf_for(f: str, trail: bool, is_sharp: bool = False) -> Psf:
        nonlocal walk
        walk = 0.6 * walk + rng.normal(0.0, 0.06)
        fwhm = float(np.clip(seeing0 * _SEEING_BAND_FACTOR.get(s.band(f), 1.0) * (1.0 + walk), *s.seeing_range))
        fwhm *= FIRST_SHARP_FACTOR if is_sharp else 1.0
        axis_ratio = round(1.0 + min(abs(rng.normal(0, 0.03)), 0.08), 4)     # optics: slightly oval stars
        return Psf(fwhm=round(fwhm, 3), beta=beta, axis_ratio=axis_ratio,
                   angle=float(rng.uniform(0, np.pi)), trail_px=s.trail_px if trail else 0.0, trail_angle=trail_angle)

    def sky_drift(tt: float) -> float:
        return 1.12 - 0.12 * tt / night + rng.normal(0.0, 0.01)

    for fi, f in enumerate(s.filters):
        for k in range(s.frames + s.short_frames):
            tt = times[(fi, k)]
            dx, dy, rot = tracking(tt)
            is_cloud = (fi, k) in clouded
            name = f"{s.target}_{f}_{k + 1:03d}" if k < s.frames else f"{s.target}_{f}_short_{k - s.frames + 1:03d}"
            add(file=f"{name}.fits", kind="science", filter=f,
                date_obs=start + timedelta(seconds=tt), exptime=exptime_of(f, k),
                psf=psf_for(f, (fi, k) in trailed, (fi, k) in sharp),
                dx=round(dx, 4), dy=round(dy, 4), rotation_deg=round(rot, 5),
                sky_rate=_sky_rate(s, f) * sky_drift(tt) * (1.25 if is_cloud else 1.0),
                transparency=s.cloud_transparency if is_cloud else round(1.0 - abs(rng.normal(0, 0.015)), 4),
                trailed=(fi, k) in trailed, clouded=is_cloud, satellite=(fi, k) == satellite, ccd_temp=temp(),
                n_cosmics=cosmics(exptime_of(f, k)), ra_deg=s.ra_deg, dec_deg=s.dec_deg, object=s.target)
        tt = offset_times[fi]
        add(file=f"{s.target}_offset_{f}.fits", kind="offset", filter=f, date_obs=start + timedelta(seconds=tt),
            exptime=exptimes[f], psf=psf_for(f, False), sky_rate=_sky_rate(s, f) * sky_drift(tt),
            transparency=round(1.0 - abs(rng.normal(0, 0.015)), 4), ccd_temp=temp(),
            n_cosmics=cosmics(exptimes[f]), ra_deg=s.ra_deg, dec_deg=s.dec_deg + s.offset_arcmin / 60.0,
            object=f"{s.target} offset")
    first = next(p for p in plans if p.kind == "science")
    assert first.dx == 0.0 and first.dy == 0.0 and first.rotation_deg == 0.0
    return plans


def night_beta(s: SimSettings) -> float:
    """The night's Moffat beta: ``moffat_beta``, or with ``realistic_optics`` one drawn from ``beta_range``."""
    if not s.realistic_optics:
        return s.moffat_beta
    return round(float(np.random.default_rng([s.seed, _STREAM_OPTICS]).uniform(*s.beta_range)), 3)


def field_psf(psf: Psf, s: SimSettings, xc: float, yc: float) -> Psf:
    """The PSF at frame position (xc, yc): wider and radially elongated towards the corners (field curvature
    and coma of a small telescope), by ``psf_field_variation`` at the corner; unchanged without
    ``realistic_optics``."""
    if not s.realistic_optics:
        return psf
    cx, cy = s.centre
    r2 = ((xc - cx) ** 2 + (yc - cy) ** 2) / (cx * cx + cy * cy)
    grow = s.psf_field_variation * r2
    return dataclasses.replace(psf, fwhm=psf.fwhm * (1 + grow), axis_ratio=psf.axis_ratio * (1 + grow),
                               angle=math.atan2(yc - cy, xc - cx) if r2 > 0.01 else psf.angle)


def _render_field(light: np.ndarray, x: np.ndarray, y: np.ndarray, flux: np.ndarray, psf: Psf,
                  s: SimSettings) -> None:
    """Stars with the PSF of their part of the field (tiles of _PSF_TILES per axis with realistic optics)."""
    if not s.realistic_optics:
        render_stars(light, x, y, flux, psf)
        return
    sx, sy = s.size / _PSF_TILES, s.height / _PSF_TILES
    tx = np.clip((x // sx).astype(int), 0, _PSF_TILES - 1)
    ty = np.clip((y // sy).astype(int), 0, _PSF_TILES - 1)
    for j in range(_PSF_TILES):
        for i in range(_PSF_TILES):
            sel = (tx == i) & (ty == j)
            if sel.any():
                render_stars(light, x[sel], y[sel], flux[sel], field_psf(psf, s, (i + 0.5) * sx, (j + 0.5) * sy))


# --------------------------------------------------------------------------- rendering


def transform_xy(x: np.ndarray, y: np.ndarray, centre: tuple[float, float], dx: float, dy: float,
                 rotation_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Reference-grid (x, y) -> frame (x, y), the frame-log convention of truth_frames.ecsv: a rotation
    about the frame's ``centre`` (:attr:`SimSettings.centre`), then the shift."""
    cx, cy = centre
    t = math.radians(rotation_deg)
    ct, st = math.cos(t), math.sin(t)
    return cx + ct * (x - cx) - st * (y - cy) + dx, cy + st * (x - cx) + ct * (y - cy) + dy


def _add_satellite(image: np.ndarray, fwhm: float, rng: np.random.Generator) -> None:
    """A sunlit satellite crossing the whole frame during the exposure: a straight bright line."""
    ny, nx = image.shape
    px, py = rng.uniform(0.3, 0.7, 2) * np.array([nx, ny], float)
    psi = rng.uniform(0, np.pi)
    peak = np.float32(rng.uniform(1500, 3000))
    sigma = max(fwhm / 2.355, 0.8)
    yy = np.arange(ny, dtype=np.float32)[:, None] - np.float32(py)
    xx = np.arange(nx, dtype=np.float32)[None, :] - np.float32(px)
    d = xx * np.float32(math.sin(psi)) - yy * np.float32(math.cos(psi))
    image += peak * np.exp(-(d * d) / np.float32(2 * sigma * sigma))


def _add_cosmics(electrons: np.ndarray, count: int, rng: np.random.Generator) -> None:
    """Cosmic-ray hits: 40 % single pixels, the rest short straight tracks of 2-8 px."""
    ny, nx = electrons.shape
    for _ in range(count):
        x0, y0 = rng.uniform(0, [nx - 1, ny - 1])
        length = 0.0 if rng.random() < 0.4 else rng.uniform(2, 8)
        ang = rng.uniform(0, 2 * np.pi)
        steps = np.linspace(0, length, max(1, int(length * 2) + 1))
        xs = np.rint(x0 + steps * math.cos(ang)).astype(int)
        ys = np.rint(y0 + steps * math.sin(ang)).astype(int)
        pix = np.unique(np.column_stack([xs, ys]), axis=0)
        pix = pix[(pix[:, 0] >= 0) & (pix[:, 0] < nx) & (pix[:, 1] >= 0) & (pix[:, 1] < ny)]
        electrons[pix[:, 1], pix[:, 0]] += rng.uniform(800, 6000, len(pix)).astype(np.float32)


def offset_field_stars(s: SimSettings) -> Table:
    """The offset field: other stars only (no cluster), uniform over the frame."""
    rng = np.random.default_rng([s.seed, _STREAM_OFFSET_STARS])
    bands = {s.band(f) for f in s.filters}
    stars = _field_stars(s.n_field, s, bands, _margin(s), rng)
    return Table({"x": stars["x"], "y": stars["y"], **{f"mag_{f}": stars[f"mag_{s.band(f)}"] for f in s.filters}})


def _star_flux(mags: np.ndarray, s: SimSettings, plan: FramePlan) -> np.ndarray:
    """Total ADU of each star in this exposure: mag = zp - 2.5 log10(ADU/s), dimmed by transparency."""
    return 10 ** (-0.4 * (np.asarray(mags, float) - s.zeropoint(plan.filter))) * plan.exptime * plan.transparency


def median_sky(plan: FramePlan, s: SimSettings, det: Detector) -> float:
    """Median sky (flat illumination for flats) of a file in ADU above bias, as the frame log reports it."""
    if plan.kind in ("science", "offset"):
        sky = det.sky_shape[::4, ::4] * np.float32(plan.sky_rate * plan.exptime)
        if s.calibration:
            sky = sky * det.flats[plan.filter][::4, ::4]
        elif det.illumination is not None:
            sky = sky * det.illumination[::4, ::4]
        return float(np.median(sky))
    if plan.kind == "flat":
        return float(np.median(det.flats[plan.filter][::4, ::4]) * plan.flat_level)
    return 0.0


def render_frame(plan: FramePlan, s: SimSettings, det: Detector, stars: Table, offset_stars: Table) -> np.ndarray:
    """The raw uint16 image of one file: light and dark electrons, Poisson and read noise, bias, ADC."""
    rng = np.random.default_rng([s.seed, _STREAM_FRAME + plan.index])
    electrons = np.zeros(s.shape, np.float32)
    if plan.kind in ("science", "offset"):
        assert plan.psf is not None
        light = det.sky_shape * np.float32(plan.sky_rate * plan.exptime)
        if plan.kind == "science":
            x, y = transform_xy(np.asarray(stars["x"]), np.asarray(stars["y"]), s.centre, plan.dx, plan.dy,
                                plan.rotation_deg)
            mags = stars[f"mag_{plan.filter}"]
        else:
            x, y = np.asarray(offset_stars["x"]), np.asarray(offset_stars["y"])
            mags = offset_stars[f"mag_{plan.filter}"]
        _render_field(light, x, y, _star_flux(mags, s, plan), plan.psf, s)
        if plan.satellite:
            _add_satellite(light, plan.psf.fwhm, rng)
        if s.calibration:
            light *= det.flats[plan.filter]
        elif det.illumination is not None:
            light *= det.illumination
        electrons += light * np.float32(s.gain)
    elif plan.kind == "flat":
        electrons += det.flats[plan.filter] * np.float32(plan.flat_level * s.gain)
    if det.dark_rate is not None:
        electrons += det.dark_rate * np.float32(plan.exptime)
    hx, hy = det.hot_xy[:, 0], det.hot_xy[:, 1]
    electrons[hy, hx] += det.hot_rate * np.float32(plan.exptime)
    _add_cosmics(electrons, plan.n_cosmics, rng)
    counts = rng.poisson(electrons).astype(np.float32)
    counts += rng.standard_normal(s.shape, dtype=np.float32) * np.float32(s.read_noise)
    counts /= np.float32(s.gain)
    counts += det.bias
    np.rint(counts, out=counts)
    np.clip(counts, 0, ADC_MAX, out=counts)
    return counts.astype(np.uint16)


# --------------------------------------------------------------------------- files


def _airmass(s: SimSettings, when: datetime, ra_deg: float, dec_deg: float) -> float | None:
    """Plane-parallel airmass from a low-precision sidereal time (good to ~0.01): what a logger writes."""
    jd = 2440587.5 + (when - datetime(1970, 1, 1)).total_seconds() / 86400.0
    gmst = 280.46061837 + 360.98564736629 * (jd - 2451545.0)
    ha = math.radians((gmst + s.site_lon_deg - ra_deg) % 360.0)
    lat, dec = math.radians(s.site_lat_deg), math.radians(dec_deg)
    sin_alt = math.sin(lat) * math.sin(dec) + math.cos(lat) * math.cos(dec) * math.cos(ha)
    return round(1.0 / sin_alt, 4) if sin_alt > 0.05 else None


def frame_header(plan: FramePlan, s: SimSettings) -> fits.Header:
    """Header keywords as a typical acquisition program (MaxIm DL / N.I.N.A. style) writes them."""
    imagetyp = {"science": "Light Frame", "offset": "Light Frame", "bias": "Bias Frame",
                "dark": "Dark Frame", "flat": "Flat Field"}[plan.kind]
    h = fits.Header()
    h["IMAGETYP"] = (imagetyp, "Type of image")
    h["OBJECT"] = (plan.object, "Target name")
    if plan.filter:
        h["FILTER"] = (plan.filter, "Filter used when taking image")
    h["EXPTIME"] = (plan.exptime, "[s] Exposure time")
    h["EXPOSURE"] = (plan.exptime, "[s] Exposure time")
    h["DATE-OBS"] = (plan.date_obs.isoformat(timespec="milliseconds"), "[UTC] Start of exposure")
    if plan.kind in ("science", "offset"):
        h["RA"] = (round(plan.ra_deg, 6), "[deg] Telescope pointing RA (J2000)")
        h["DEC"] = (round(plan.dec_deg, 6), "[deg] Telescope pointing Dec (J2000)")
        h["OBJCTRA"] = (_sexagesimal(plan.ra_deg, hours=True), "[hms] Object RA (J2000)")
        h["OBJCTDEC"] = (_sexagesimal(plan.dec_deg, hours=False), "[dms] Object Dec (J2000)")
        h["EQUINOX"] = (2000.0, "Equinox of the coordinates")
        airmass = _airmass(s, plan.date_obs, plan.ra_deg, plan.dec_deg)
        if airmass is not None:
            h["AIRMASS"] = (airmass, "Airmass at start of exposure")
    if s.gain_keyword:
        h["GAIN"] = (s.gain, "[e-/ADU] Electronic gain")
        h["EGAIN"] = (s.gain, "[e-/ADU] Electronic gain")
    h["RDNOISE"] = (s.read_noise, "[e-] Read noise")
    h["XBINNING"] = (1, "Binning factor in width")
    h["YBINNING"] = (1, "Binning factor in height")
    h["XPIXSZ"] = (s.pixel_size_um, "[um] Pixel width including binning")
    h["YPIXSZ"] = (s.pixel_size_um, "[um] Pixel height including binning")
    h["CCD-TEMP"] = (plan.ccd_temp, "[C] Sensor temperature at start of exposure")
    h["SET-TEMP"] = (-15.0, "[C] Sensor set-point temperature")
    h["FOCALLEN"] = (s.focal_length_mm, "[mm] Focal length")
    h["APTDIA"] = (s.aperture_mm, "[mm] Aperture diameter")
    h["SITELAT"] = (s.site_lat_deg, "[deg] Observatory latitude")
    h["SITELONG"] = (s.site_lon_deg, "[deg] Observatory longitude, east positive")
    h["SATURATE"] = (ADC_MAX, "[ADU] Saturation level")
    h["INSTRUME"] = (s.instrument, "Camera")
    h["TELESCOP"] = (s.telescope, "Telescope")
    h["SWCREATE"] = ("observer-simulator", "Software that created the file")
    return h


def fits_bytes(data: np.ndarray, header: fits.Header) -> tuple[bytes, int]:
    """The whole FITS file in memory (uint16 -> BITPIX 16 + BZERO 32768) and its header length."""
    hdu = fits.PrimaryHDU(data, header=header)
    buf = io.BytesIO()
    hdu.writeto(buf)
    raw = buf.getvalue()
    data_len = -(-data.nbytes // 2880) * 2880
    return raw, len(raw) - data_len


def write_like_camera(path: Path, raw: bytes, header_len: int, fill_seconds: float, chunks: int = 4) -> None:
    """Write a file the way a camera driver does: it appears, then grows over ``fill_seconds``.

    Header first, then the data in ``chunks`` pieces, each flushed so that a watcher
    sees a partial file. Deliberately not temp-file + rename: the service must cope
    with files that are still being written.
    """
    if fill_seconds <= 0:
        with open(path, "wb") as fh:
            fh.write(raw)
        return
    pause = fill_seconds / chunks
    bounds = np.linspace(header_len, len(raw), chunks + 1).astype(int)
    with open(path, "wb") as fh:
        fh.write(raw[:header_len])
        fh.flush()
        for k in range(chunks):
            time.sleep(pause)
            fh.write(raw[bounds[k]:bounds[k + 1]])
            fh.flush()


def _frame_log(plans: list[FramePlan], s: SimSettings, det: Detector) -> Table:
    """The true parameters of every file (NaN shift/rotation: not on the reference grid)."""
    rows = [{
        "file": p.file, "kind": p.kind, "filter": p.filter,
        "date_obs": p.date_obs.isoformat(timespec="milliseconds"), "exptime": p.exptime,
        "dx": p.dx, "dy": p.dy, "rotation_deg": p.rotation_deg,
        "fwhm_px": p.psf.fwhm if p.psf else math.nan, "sky_adu": round(median_sky(p, s, det), 2),
        "transparency": p.transparency, "elongation": round(psf_elongation(p.psf), 4) if p.psf else math.nan,
        "trailed": p.trailed, "clouded": p.clouded, "satellite": p.satellite,
        "n_cosmics": p.n_cosmics,
    } for p in plans]
    return Table(rows=rows)


def _atomic_write_table(table: Table, path: Path) -> None:
    """Truth files live outside the camera folder, so a temp file + rename is fine (and safer) there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    table.write(tmp, format="ascii.ecsv", overwrite=True)
    os.replace(tmp, path)


def _check_truth_path(camdir: Path, truth_path: Path) -> None:
    """The truth must not be in the watched folder: the service would pick it up as a camera file."""
    cam, truth = camdir.resolve(), truth_path.resolve()
    if truth == cam or cam in truth.parents:
        raise ConfigError(f"truth path (--truth) {truth_path} is inside the camera folder {camdir}: the service "
                          "would see it; expected a path outside (default: <camdir>/../truth.ecsv)")


def simulate_night(camdir: str | os.PathLike, settings: SimSettings, truth_path: str | os.PathLike | None = None,
                   progress: bool = False, stop: threading.Event | None = None) -> NightTruth:
    """Simulate a night into ``camdir`` file by file, as a camera would write it.

    The truth catalogue and the frame log are written first (outside ``camdir``), so
    whoever watches the night can already compare against them. With
    ``settings.cadence > 0`` the files start ``cadence`` seconds apart. Setting
    ``stop`` (e.g. when a live demo quits) ends the night after the file being
    written; the returned ``files`` are those written.
    """
    s = settings
    camdir = Path(camdir)
    truth = Path(truth_path) if truth_path is not None else camdir.resolve().parent / "truth.ecsv"
    _check_truth_path(camdir, truth)
    camdir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    stars = make_stars(s)
    offset_stars = offset_field_stars(s)
    det = make_detector(s)
    plans = plan_night(s)
    stars.meta["hot_pixels_x"] = det.hot_xy[:, 0].tolist()
    stars.meta["hot_pixels_y"] = det.hot_xy[:, 1].tolist()
    frames = _frame_log(plans, s, det)
    frames_path = truth.with_name(f"{truth.stem}_frames.ecsv")
    _atomic_write_table(stars, truth)
    _atomic_write_table(frames, frames_path)
    files: list[Path] = []
    log.info("simulating %d files of %s into %s (%d stars, truth %s)", len(plans), s.target, camdir,
             len(stars), truth)
    stop = stop or threading.Event()
    for k, plan in enumerate(plans):
        if stop.is_set():
            log.info("simulation stopped after %d of %d files", k, len(plans))
            break
        data = render_frame(plan, s, det, stars, offset_stars)
        raw, header_len = fits_bytes(data, frame_header(plan, s))
        if s.cadence > 0 and stop.wait(max(0.0, t_start + k * s.cadence - time.monotonic())):
            continue
        path = camdir / plan.file
        write_like_camera(path, raw, header_len, s.fill_seconds)
        files.append(path)
        log.info("wrote %s", path)
        if progress:
            sys.stderr.write(f"[{k + 1:3d}/{len(plans)}] {plan.file}\n")
            sys.stderr.flush()
    log.info("simulated night done in %.1f s", time.monotonic() - t_start)
    return NightTruth(stars=stars, frames=frames, truth_path=truth, frames_path=frames_path, files=files,
                      hot_pixels=det.hot_xy.copy())


