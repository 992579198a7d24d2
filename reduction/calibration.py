"""Master calibration frames (bias, dark per second, flat) and their application to a frame.

Why sigma-clipped means: a mean keeps the noise of N frames down by sqrt(N), the clipping removes
what a mean would smear in (cosmic rays in darks, a star or a satellite in a sky flat).  The stack
is combined in bands of rows so that even ten 4096 x 4096 frames never need more than a few tens
of MB beyond the inputs.

Calibration is optional: a night without bias, dark or flat frames is reduced without them, and any
subset works (e.g. only a flat).  Without a bias the dark still holds the bias level; it is then
applied as "bias + dark", which is right when the darks match the science exposure time (the usual
amateur practice) and is logged as a warning otherwise.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy.stats import sigma_clip

log = logging.getLogger(__name__)

#: Rows per band when combining (keeps the clipped stack of one band small).
_BAND_ROWS = 128
#: Flat-field values below this (dead or vignetted to black) are set to 1 instead of dividing by ~0.
_MIN_FLAT = 0.05


@dataclass
class Masters:
    """Master frames for one camera (and, for ``flat``, one filter); any of them may be None.

    ``bias`` in ADU; ``dark_per_s`` in ADU/s, bias-subtracted when a bias exists (else it includes
    the bias: see ``dark_includes_bias``); ``flat`` normalised to median 1.
    """

    bias: np.ndarray | None = None
    dark_per_s: np.ndarray | None = None
    flat: np.ndarray | None = None
    dark_includes_bias: bool = False
    dark_exptime: float | None = None  # typical exposure of the darks, for the no-bias case
    flat_mjd: float | None = None  # mean MJD of the flats, to say how old they are when applied


def _clipped_mean(frames: Sequence[np.ndarray], sigma: float) -> np.ndarray:
    """Per-pixel sigma-clipped mean of equally shaped frames, computed band by band."""
    if len(frames) == 0:
        raise ValueError("no frames to combine")
    shape = frames[0].shape
    for f in frames:
        if f.shape != shape:
            raise ValueError(f"frames differ in shape: {f.shape} vs {shape}")
    out = np.empty(shape, dtype=np.float32)
    if len(frames) < 3:
        # Clipping needs at least three values to say which one is odd.
        np.mean(np.stack([np.asarray(f, dtype=np.float32) for f in frames]), axis=0, out=out)
        return out
    for r0 in range(0, shape[0], _BAND_ROWS):
        band = np.stack([np.asarray(f[r0:r0 + _BAND_ROWS], dtype=np.float32) for f in frames])
        clipped = sigma_clip(band, sigma=sigma, axis=0, maxiters=3, cenfunc="median",
                             stdfunc="std", masked=True, copy=False)
        out[r0:r0 + _BAND_ROWS] = clipped.mean(axis=0).filled(np.nan)
    bad = ~np.isfinite(out)
    if bad.any():  # every value clipped: fall back to the plain median there
        out[bad] = np.median(np.stack([np.asarray(f, dtype=np.float32)[bad] for f in frames]), axis=0)
    return out


def combine_bias(frames: Sequence[np.ndarray], sigma: float = 3.0) -> np.ndarray:
    """Master bias (ADU): sigma-clipped mean of the bias frames."""
    return _clipped_mean(frames, sigma)


def combine_dark(frames: Sequence[np.ndarray], exptimes: Sequence[float | None], bias: np.ndarray | None = None,
                 sigma: float = 3.0) -> np.ndarray:
    """Master dark current in ADU/s: each dark bias-subtracted (if a bias exists) and divided by its time."""
    if len(frames) != len(exptimes):
        raise ValueError("need one exposure time per dark frame")
    if any(t is None or not t > 0 for t in exptimes):
        raise ValueError(f"dark exposure times must be > 0, got {list(exptimes)}")
    per_s = [(np.asarray(f, dtype=np.float32) - (bias if bias is not None else 0.0)) / np.float32(t)
             for f, t in zip(frames, exptimes)]
    return _clipped_mean(per_s, sigma)


def combine_flat(frames: Sequence[np.ndarray], exptimes: Sequence[float] | None = None,
                 bias: np.ndarray | None = None, dark_per_s: np.ndarray | None = None,
                 sigma: float = 3.0) -> np.ndarray:
    """Master flat normalised to median 1: each flat calibrated and scaled to median 1, then combined.

    Scaling each flat first lets twilight flats of different brightness be combined.
    """
    scaled = []
    for i, f in enumerate(frames):
        g = np.asarray(f, dtype=np.float32)
        if bias is not None:
            g = g - bias
        if dark_per_s is not None and exptimes is not None:
            g = g - dark_per_s * np.float32(exptimes[i])
        med = float(np.median(g[:: max(1, g.shape[0] // 512), :: max(1, g.shape[1] // 512)]))
        if not med > 0:
            raise ValueError(f"flat frame {i} has median {med:.3g} after bias/dark subtraction")
        scaled.append(g / np.float32(med))
    flat = _clipped_mean(scaled, sigma)
    flat /= np.float32(np.median(flat))
    low = ~(flat >= _MIN_FLAT)
    if low.any():
        log.warning("master flat: %d pixels below %.2f set to 1 (not corrected)", int(low.sum()), _MIN_FLAT)
        flat[low] = 1.0
    return flat


def _arrays_and_times(items: Sequence[Any], exptimes: Sequence[float] | None
                      ) -> tuple[list[np.ndarray], list[float | None]]:
    """Frames (``reduction.frames.Frame``: data and header exposure) or plain arrays (with ``exptimes``)."""
    arrays = [np.asarray(getattr(it, "data", it)) for it in items]
    if exptimes is not None:
        if len(exptimes) != len(arrays):
            raise ValueError("need one exposure time per frame")
        times = [float(t) for t in exptimes]
    else:
        times = [getattr(getattr(it, "facts", None), "exptime", None) for it in items]
    return arrays, times


Geometry = tuple[tuple[int, ...], tuple[int, int]]


def _geometry(item: Any) -> Geometry:
    """(shape, (xbin, ybin)) of a frame or array: masters mix only frames of one geometry."""
    facts = getattr(item, "facts", None)
    return np.shape(getattr(item, "data", item)), (getattr(facts, "xbin", 1), getattr(facts, "ybin", 1))


def _same_geometry(groups: dict[str, Sequence[Any]], geometry: Geometry | None) -> dict[str, list[int]]:
    """Indices of each group's frames of ``geometry`` (default: the commonest over all groups); the
    rest are logged.

    A 2x2-binned bias or a subframe flat in the folder must not be averaged into (or break) the
    masters of the full-frame 1x1 science frames.
    """
    every = [_geometry(it) for items in groups.values() for it in items]
    if not every:
        return {name: [] for name in groups}
    if geometry is None:
        geometry = max(set(every), key=every.count)
    out = {}
    for name, items in groups.items():
        out[name] = [i for i, it in enumerate(items) if _geometry(it) == geometry]
        if len(out[name]) < len(items):
            log.info("%s: %d of %d frames left out of the master: not of shape %s and binning %dx%d",
                     name, len(items) - len(out[name]), len(items), geometry[0], *geometry[1])
    return out


def _mean_mjd(items: Sequence[Any]) -> float | None:
    dates = [d.mjd for it in items if (d := getattr(getattr(it, "facts", None), "date_obs", None)) is not None]
    return float(np.mean(dates)) if dates else None


def combine_masters(bias: Sequence[Any] = (), darks: Sequence[Any] = (), flats: Sequence[Any] = (), *,
                    dark_exptimes: Sequence[float] | None = None, flat_exptimes: Sequence[float] | None = None,
                    sigma: float = 3.0, geometry: Geometry | None = None) -> Masters:
    """Build whichever masters the given frames allow (flats: one filter per call).

    Items are loaded frames (``Frame``: the exposure time comes from its header facts) or plain
    arrays (then pass ``dark_exptimes``/``flat_exptimes``).  Empty inputs give ``None`` masters.
    Only frames of one ``geometry`` ((ny, nx), (xbin, ybin)) are combined: the given one (the
    science frame's), else the commonest among the inputs.
    """
    keep = _same_geometry({"bias": bias, "dark": darks, "flat": flats}, geometry)

    def kept(name: str, values: Sequence[Any] | None) -> list[Any] | None:
        return None if values is None else [values[i] for i in keep[name]]

    bias, darks, flats = kept("bias", bias), kept("dark", darks), kept("flat", flats)
    dark_exptimes, flat_exptimes = kept("dark", dark_exptimes), kept("flat", flat_exptimes)
    bias_arrays, _ = _arrays_and_times(bias, None)
    dark_arrays, dark_times = _arrays_and_times(darks, dark_exptimes)
    flat_arrays, flat_times = _arrays_and_times(flats, flat_exptimes)
    master_bias = combine_bias(bias_arrays, sigma) if bias_arrays else None
    master_dark = combine_dark(dark_arrays, dark_times, master_bias, sigma) if dark_arrays else None
    if master_dark is not None and any(t is None for t in flat_times):
        log.warning("flat frames without exposure time: dark not subtracted from the flats")
    master_flat = (combine_flat(flat_arrays, None if any(t is None for t in flat_times) else flat_times,
                                master_bias, master_dark, sigma) if flat_arrays else None)
    if master_dark is not None and master_bias is None:
        log.warning("darks without a bias: the dark includes the bias and is exact only for "
                    "exposures matching the darks' (%s s)", sorted(set(dark_times)))
    return Masters(bias=master_bias, dark_per_s=master_dark, flat=master_flat,
                   dark_includes_bias=master_dark is not None and master_bias is None,
                   dark_exptime=float(np.median(dark_times)) if dark_arrays else None,
                   flat_mjd=_mean_mjd(flats))


#: Flats older (or younger) than this many days are from another night: their age is logged.
FLAT_AGE_NOTE_DAYS = 0.5


def apply_calibration(data: np.ndarray, exptime: float | None, masters: Masters | None,
                      date_mjd: float | None = None) -> np.ndarray:
    """Bias-, dark- and flat-correct a frame: a new float32 array (``data`` itself when nothing applies).

    ``exptime`` (s) scales the dark; without it the dark is skipped (logged).  With the frame's
    ``date_mjd``, a flat from another night is applied with a log line giving its age (dust moves:
    the observer should know the flat is not tonight's).
    """
    if masters is None or (masters.bias is None and masters.dark_per_s is None and masters.flat is None):
        return data
    for name in ("bias", "dark_per_s", "flat"):
        m = getattr(masters, name)
        if m is not None and m.shape != data.shape:
            raise ValueError(f"master {name} shape {m.shape} does not match the frame's {data.shape}")
    out = np.array(data, dtype=np.float32, copy=True)
    if masters.bias is not None:
        out -= masters.bias
    if masters.dark_per_s is not None:
        if exptime is None:
            log.warning("no exposure time: dark not subtracted")
        else:
            if masters.dark_includes_bias and masters.dark_exptime and \
                    abs(exptime - masters.dark_exptime) > 0.01 * masters.dark_exptime:
                log.warning("dark (with bias) taken at %.1f s applied to a %.1f s frame",
                            masters.dark_exptime, exptime)
            out -= masters.dark_per_s * np.float32(exptime)
    if masters.flat is not None:
        if date_mjd is not None and masters.flat_mjd is not None and \
                abs(date_mjd - masters.flat_mjd) > FLAT_AGE_NOTE_DAYS:
            log.info("flat field from another night applied: %.1f days %s the frame",
                     abs(date_mjd - masters.flat_mjd), "before" if masters.flat_mjd < date_mjd else "after")
        out /= masters.flat
    return out
