"""Load camera FITS files into float32 frames and read the header facts the pipeline needs.

Why this module exists: acquisition programs write FITS in many small variations (unsigned 16-bit
with BZERO=32768, signed or floating data, gzip or tile compression, colour cubes, a dozen spellings
of the same keyword).  Everything downstream works on one representation -- a 2-D float32 array
and a :class:`HeaderFacts` record -- so every variation is resolved here, once, and a file that
cannot be used is refused with a :class:`FrameError` whose message is shown to the observer.
"""
from __future__ import annotations

import fnmatch
import gzip
import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from astropy import units as u
from astropy.coordinates import Angle
from astropy.io import fits
from astropy.time import Time
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import proj_plane_pixel_scales

from reduction.keywords import DEFAULT_KEYWORDS

log = logging.getLogger(__name__)

#: More than this fraction of non-finite pixels makes a frame useless (the rest is probably garbage too).
MAX_NONFINITE_FRACTION = 0.5
#: arcsec per radian / 1000: plate scale ["/px] = pixel size [um] / focal length [mm] * 206.265.
_ARCSEC_PER_UM_PER_MM = 206.264806
#: A gain outside this range is not e-/ADU (some cameras write a driver setting, 0-600, under GAIN).
PLAUSIBLE_GAIN = (0.05, 20.0)
#: Filter-wheel positions that hold no filter: a second wheel reading 'Open' says nothing.
_EMPTY_WHEEL = {"clear", "open", "empty", "none", "air", "blank", "no filter", "nofilter", "-", "---"}


class FrameError(Exception):
    """A file that cannot be used as an image; ``str(exc)`` is the reason shown to the observer."""


@dataclass
class HeaderFacts:
    """What the pipeline needs from a header, each read with the fallbacks acquisition programs use.

    Values that are missing or unreadable are ``None`` (never a guess); units are in the names.
    ``filter`` and ``imagetyp`` are raw header strings: normalising them is the tagger's job.
    """

    exptime: float | None = None
    filter: str | None = None
    object: str | None = None
    imagetyp: str | None = None
    date_obs: Time | None = None
    gain: float | None = None  # e-/ADU
    read_noise: float | None = None  # e-
    xbin: int = 1
    ybin: int = 1
    ra_deg: float | None = None
    dec_deg: float | None = None
    plate_scale_arcsec: float | None = None  # arcsec per (binned) pixel
    saturate: float | None = None  # ADU
    wcs: WCS | None = None  # celestial part only
    instrument: str | None = None
    #: fact name ('filter', 'kind', 'exposure', 'gain', ...) -> the keyword it was read from.
    sources: dict[str, str] = field(default_factory=dict)
    #: every (keyword, value) holding a filter name, so the tagger can see contradictions.
    filter_cards: tuple[tuple[str, str], ...] = ()


@dataclass
class Frame:
    """One loaded image: float32 2-D data (or 3 colour planes), its header and the facts read from it.

    ``nonfinite`` counts the NaN/inf pixels that were replaced by the frame's median on load.
    """

    path: str
    data: np.ndarray
    header: fits.Header
    facts: HeaderFacts
    nonfinite: int = 0
    hdu_index: int = 0
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def _first_bytes(path: Path, n: int = 80) -> bytes:
    """The first bytes of the (decompressed, for gzip) file: enough to see whether it is FITS."""
    with open(path, "rb") as fh:
        head = fh.read(n)
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as gz:
                return gz.read(n)
        except (OSError, EOFError) as exc:
            raise FrameError(f"corrupt gzip file ({exc})") from exc
    return head


def _image_hdu_index(hdul: fits.HDUList) -> int:
    """Index of the first image HDU that carries data (primary, image extension or tile-compressed)."""
    for i, hdu in enumerate(hdul):
        if not hdu.is_image:
            continue
        shape = hdu.shape if isinstance(hdu, fits.CompImageHDU) else tuple(
            hdu.header.get(f"NAXIS{k}", 0) for k in range(hdu.header.get("NAXIS", 0), 0, -1))
        if len(shape) > 0 and all(int(s) > 0 for s in shape):
            return i
    raise FrameError("no image data (header only)")


def _reduce_to_2d(data: np.ndarray) -> np.ndarray:
    """Apply the 3-D rule (see :func:`load_frame`) and refuse anything else that is not 2-D or 3 planes."""
    if data.ndim > 3:
        # Degenerate leading axes (NAXIS4 = 1 etc.) carry no information.
        while data.ndim > 3 and data.shape[0] == 1:
            data = data[0]
        if data.ndim > 3:
            raise FrameError(f"{data.ndim}-D data of shape {data.shape}; expected a 2-D image")
    if data.ndim == 3:
        nplanes = data.shape[0]
        if nplanes == 1:
            return data[0]
        if nplanes == 3:
            # A colour cube's R, G, B planes, kept: reduction.colour splits them into three filters.
            return data
        raise FrameError(f"3-D data with {nplanes} planes; expected a 2-D image")
    if data.ndim != 2:
        raise FrameError(f"{data.ndim}-D data; expected a 2-D image")
    return data


def _to_float32(data: np.ndarray) -> np.ndarray:
    """Convert once to a native, contiguous float32 copy; astropy has already applied BZERO/BSCALE.

    Unsigned data (BZERO=32768 uint16) arrives as uint16 and converts exactly; int32 values beyond
    2**24 lose their last bits in float32, which is far below any noise a camera delivers.
    """
    return np.array(data, dtype=np.float32, order="C")


def _replace_nonfinite(data: np.ndarray, path: str) -> int:
    """Replace a few NaN/inf pixels by the median in place; refuse frames that are mostly NaN."""
    bad = ~np.isfinite(data)
    nbad = int(np.count_nonzero(bad))
    if nbad == 0:
        return 0
    if nbad == data.size:
        raise FrameError("all pixels are NaN (no valid data)")
    frac = nbad / data.size
    if frac > MAX_NONFINITE_FRACTION:
        raise FrameError(f"mostly NaN: {frac:.0%} of the pixels are not finite")
    data[bad] = np.float32(np.median(data[~bad]))
    log.warning("%s: %d non-finite pixels replaced by the median", path, nbad)
    return nbad


def load_frame(path: str | Path, keywords: dict[str, tuple[str, ...]] | None = None) -> Frame:
    """Load the first image in a FITS file as a 2-D float32 frame.

    Accepts ``*.fits``/``*.fit``/``*.fts``, gzip (``.gz``) and tile-compressed (``.fz``) files; the
    image is the first HDU with data (primary, image extension or ``CompImageHDU``).  Integer data
    are scaled by astropy (BZERO/BSCALE) and converted to float32 exactly once, so nothing wraps.

    3-D rule: a cube with a single plane is squeezed to 2-D; a cube with 3 planes is a colour
    image (R, G, B) and stays 3-D, for :func:`reduction.colour.colour_planes`; any other number of planes is refused
    (``FrameError("3-D data with N planes; expected a 2-D image")``), because stacking planes of
    unknown meaning would be a guess.

    A few NaN/inf pixels are replaced by the frame's median and counted in ``Frame.nonfinite``;
    more than half non-finite raises ``FrameError``.  So do an empty file, a non-FITS file, a file
    whose data unit is shorter than its header promises (still being written, or cut), a header
    without image data, and anything astropy cannot read.  ``keywords`` go to :func:`header_facts`.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise FrameError(f"unreadable: {exc.strerror or exc}") from exc
    if size == 0:
        raise FrameError("empty file (0 bytes)")
    try:
        head = _first_bytes(p)
    except OSError as exc:
        raise FrameError(f"unreadable: {exc.strerror or exc}") from exc
    if not head.startswith(b"SIMPLE  ="):
        raise FrameError("not a FITS file (it does not start with a SIMPLE card)")

    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AstropyWarning)
            with fits.open(p, memmap=False) as hdul:
                idx = _image_hdu_index(hdul)
                hdu = hdul[idx]
                header = hdu.header.copy()
                raw = hdu.data
                if raw is None:
                    raise FrameError("no image data (header only)")
                data = _to_float32(_reduce_to_2d(raw))
    except FrameError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever astropy raises, the frame is refused with a reason
        raise FrameError(_read_failure_reason(exc, caught)) from exc

    notes = [str(w.message) for w in caught]
    nonfinite = _replace_nonfinite(data, str(p))
    return Frame(path=str(p), data=data, header=header, facts=header_facts(header, keywords),
                 nonfinite=nonfinite, hdu_index=idx, notes=notes)


def read_header(path: str | Path) -> tuple[fits.Header, tuple[int, ...]]:
    """The image HDU's header and data shape without reading the data (for ``observer inspect``)."""
    try:
        with fits.open(Path(path), memmap=False) as hdul:
            hdu = hdul[_image_hdu_index(hdul)]
            return hdu.header.copy(), tuple(int(n) for n in hdu.shape)
    except FrameError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever astropy raises, the file is refused with a reason
        raise FrameError(_read_failure_reason(exc, [])) from exc


def _read_failure_reason(exc: Exception, caught: list[warnings.WarningMessage]) -> str:
    """Turn an astropy read failure into a reason an observer understands."""
    msg = str(exc)
    truncated_warning = any("truncated" in str(w.message).lower() for w in caught)
    # astropy reports a short data unit as "buffer is too small for requested array" (TypeError)
    # after warning "File may have been truncated".
    if "too small" in msg or truncated_warning or isinstance(exc, EOFError) or "end of file" in msg.lower():
        return "truncated: the data unit is shorter than the header promises (file incomplete?)"
    if "empty or corrupt" in msg.lower():
        return "not a FITS file (empty or corrupt header)"
    return f"unreadable: {type(exc).__name__}: {msg}"


# ----------------------------------------------------------------------------------------------
# Header facts
# ----------------------------------------------------------------------------------------------

def _expand(header: fits.Header, keys: tuple[str, ...]) -> list[str]:
    """``keys`` in order, each pattern (``*``) replaced by the header keys it matches."""
    out: list[str] = []
    for key in keys:
        if "*" in key:
            out.extend(k for k in header.keys() if fnmatch.fnmatchcase(k.upper(), key.upper()))
        else:
            out.append(key)
    return out


def _all(header: fits.Header, keys: tuple[str, ...], convert: Callable[[Any], Any]) -> list[tuple[str, Any]]:
    """Every (keyword, converted value) of ``keys`` present and readable; odd values skipped (debug log)."""
    found = []
    for key in dict.fromkeys(_expand(header, keys)):
        if key not in header:
            continue
        value = header[key]
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        try:
            out = convert(value)
        except (ValueError, TypeError, ArithmeticError) as exc:
            log.debug("header %s=%r skipped: %s", key, value, exc)
            continue
        if out is not None:
            found.append((key, out))
    return found


def _found(header: fits.Header, keys: tuple[str, ...], convert: Callable[[Any], Any]) -> tuple[Any, str | None]:
    """The first readable value of ``keys`` and the keyword it came from, or (None, None)."""
    hits = _all(header, keys, convert)
    return (hits[0][1], hits[0][0]) if hits else (None, None)


def _first(header: fits.Header, keys: tuple[str, ...], convert: Callable[[Any], Any]) -> Any:
    """The first of ``keys`` whose value converts; odd values are skipped with a debug log."""
    return _found(header, keys, convert)[0]


def _positive_float(value: Any) -> float:
    """A finite number > 0 (exposure, gain, scale): zero or negative values are header junk."""
    if isinstance(value, bool):
        raise TypeError("boolean is not a number")
    out = float(str(value).strip()) if isinstance(value, str) else float(value)
    if not math.isfinite(out) or out <= 0:
        raise ValueError(f"{out} is not a positive number")
    return out


def _nonneg_float(value: Any) -> float:
    """A finite number >= 0 (a bias frame's exposure is 0 s)."""
    if isinstance(value, bool):
        raise TypeError("boolean is not a number")
    out = float(str(value).strip()) if isinstance(value, str) else float(value)
    if not math.isfinite(out) or out < 0:
        raise ValueError(f"{out} is not a number >= 0")
    return out


def _gain(value: Any) -> float:
    """e-/ADU only when plausible: a CCDGAIN of 2 (a driver setting) or 100 is not a gain."""
    out = _positive_float(value)
    if not PLAUSIBLE_GAIN[0] <= out <= PLAUSIBLE_GAIN[1]:
        raise ValueError(f"{out} is not a plausible gain in e-/ADU ({PLAUSIBLE_GAIN[0]}-{PLAUSIBLE_GAIN[1]})")
    return out


def _text(value: Any) -> str:
    if isinstance(value, bool):
        raise TypeError("boolean is not a name")
    out = str(value).strip()
    if not out:
        raise ValueError("blank")
    return out


#: FRAME is also used (by some writers) for the celestial reference frame; those values are not kinds.
_COORD_FRAMES = {"FK4", "FK5", "ICRS", "GALACTIC", "ECLIPTIC", "GAPPT", "TOPOCENT"}


def _frame_kind(value: Any) -> str:
    out = _text(value)
    if out.upper() in _COORD_FRAMES:
        raise ValueError("a coordinate frame, not an image type")
    return out


def _binning(header: fits.Header) -> tuple[int, int]:
    """X and Y binning from XBINNING/YBINNING, else BINNING ("2", "2x2") or CCDSUM ("2 2")."""
    def as_int(v: Any) -> int:
        out = int(round(_positive_float(v)))
        if out < 1:
            raise ValueError("binning < 1")
        return out

    def pair(v: Any) -> tuple[int, int]:
        parts = [p for p in re.split(r"[\sx,*]+", str(v).strip().lower()) if p]
        if len(parts) == 1:
            return as_int(parts[0]), as_int(parts[0])
        if len(parts) == 2:
            return as_int(parts[0]), as_int(parts[1])
        raise ValueError(f"cannot read binning {v!r}")

    xbin = _first(header, ("XBINNING",), as_int)
    ybin = _first(header, ("YBINNING",), as_int)
    both = _first(header, ("BINNING", "CCDSUM"), pair)
    if both is not None:
        xbin = xbin if xbin is not None else both[0]
        ybin = ybin if ybin is not None else both[1]
    xbin = xbin if xbin is not None else 1
    return xbin, ybin if ybin is not None else xbin


_DMY = re.compile(r"^\s*(\d{1,2})/(\d{1,2})/(\d{2})\s*$")
_DATE_ONLY = re.compile(r"^\s*\d{4}-\d{2}-\d{2}\s*$")


def _parse_date_obs(date: str, time_obs: str | None) -> Time:
    """DATE-OBS as ISO ('YYYY-MM-DD[THH:MM:SS.sss]', a trailing 'Z' allowed) or the old 'dd/mm/yy'
    form; a date without a time takes TIME-OBS (or UT) when that is readable.

    The old form is read by the FITS standard's rule: 'dd/mm/yy' always means 19yy (it was
    deprecated in 1997, before any 20yy date could be written that way).
    """
    text = date.strip().removesuffix("Z")
    m = _DMY.match(text)
    if m:
        day, month, yy = (int(g) for g in m.groups())
        text = f"{1900 + yy:04d}-{month:02d}-{day:02d}"
    if m or _DATE_ONLY.match(text):
        if time_obs:
            try:
                return Time(f"{text}T{time_obs.strip().removesuffix('Z')}", format="isot", scale="utc")
            except ValueError as exc:
                log.debug("TIME-OBS %r skipped: %s", time_obs, exc)
        return Time(text, format="iso", scale="utc")
    return Time(text.replace(" ", "T", 1) if "T" not in text and " " in text else text,
                scale="utc")


def _date_obs(header: fits.Header, keys: tuple[str, ...]) -> tuple[Time | None, str | None]:
    """The observation time and its keyword: MJD*/JD* keys are day numbers, the others dates
    (ISO or 'dd/mm/yy', completed by TIME-OBS/UT when they carry no time)."""
    time_obs = _first(header, ("TIME-OBS", "UT", "UTSTART", "UT-START"), _text)

    def parse_for(key: str) -> Callable[[Any], Time]:
        name = key.upper()
        if name.startswith("MJD"):
            return lambda v: Time(_positive_float(v), format="mjd", scale="utc")
        if name.startswith("JD"):
            return lambda v: Time(_positive_float(v), format="jd", scale="utc")
        return lambda v: _parse_date_obs(_text(v), time_obs)

    for key in _expand(header, keys):
        value, source = _found(header, (key,), parse_for(key))
        if value is not None:
            return value, source
    return None, None


def _angle_deg(value: Any, string_unit: u.Unit) -> float:
    """Degrees from a number (always degrees) or a string (sexagesimal in ``string_unit``)."""
    if isinstance(value, bool):
        raise TypeError("boolean is not an angle")
    if isinstance(value, (int, float, np.number)):
        out = float(value)
    else:
        text = str(value).strip()
        if re.fullmatch(r"[+-]?\d+(\.\d*)?", text):
            out = float(text)  # a plain number in a string is degrees, like a numeric card
        else:
            out = float(Angle(text, unit=string_unit).deg)
    if not math.isfinite(out):
        raise ValueError("not finite")
    return out


def _celestial_wcs(header: fits.Header) -> WCS | None:
    """The celestial part of the header's WCS, or None when there is none (most camera files)."""
    if not any(str(header.get(f"CTYPE{i}", "")).strip() for i in (1, 2)):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            warnings.simplefilter("ignore", AstropyWarning)
            wcs = WCS(header)
        if not wcs.has_celestial:
            return None
        return wcs.celestial
    except Exception as exc:  # noqa: BLE001 - a broken WCS is skipped, not fatal
        log.debug("WCS skipped: %s", exc)
        return None


def _pointing(header: fits.Header, wcs: WCS | None) -> tuple[float | None, float | None]:
    """RA/DEC (deg numbers or sexagesimal hours/deg strings), else OBJCTRA/OBJCTDEC, else the WCS centre."""
    for ra_key, dec_key in (("RA", "DEC"), ("OBJCTRA", "OBJCTDEC"), ("RA_OBJ", "DEC_OBJ")):
        ra = _first(header, (ra_key,), lambda v: _angle_deg(v, u.hourangle))
        dec = _first(header, (dec_key,), lambda v: _angle_deg(v, u.deg))
        if ra is not None and dec is not None and -90.0 <= dec <= 90.0:
            return ra % 360.0, dec
    if wcs is not None:
        try:
            nx = int(header.get("NAXIS1", header.get("ZNAXIS1", 0)) or 0)
            ny = int(header.get("NAXIS2", header.get("ZNAXIS2", 0)) or 0)
            if nx > 0 and ny > 0:
                sky = wcs.pixel_to_world((nx - 1) / 2.0, (ny - 1) / 2.0)
                return float(sky.spherical.lon.deg) % 360.0, float(sky.spherical.lat.deg)
            return float(wcs.wcs.crval[0]) % 360.0, float(wcs.wcs.crval[1])
        except Exception as exc:  # noqa: BLE001
            log.debug("WCS pointing skipped: %s", exc)
    return None, None


def _plate_scale(header: fits.Header, wcs: WCS | None) -> float | None:
    """Arcsec per pixel: the WCS, else PIXSCALE/SCALE/SECPIX, else XPIXSZ / FOCALLEN.

    XPIXSZ is read as the *binned* pixel size, as MaxIm DL, N.I.N.A. and the SBIG FITS extension
    define it ("includes binning"); multiplying it by the binning again would double the scale.
    """
    if wcs is not None:
        try:
            scales = proj_plane_pixel_scales(wcs) * 3600.0
            out = float(np.sqrt(scales[0] * scales[1]))
            if math.isfinite(out) and out > 0:
                return out
        except Exception as exc:  # noqa: BLE001
            log.debug("WCS plate scale skipped: %s", exc)
    out = _first(header, ("PIXSCALE", "SCALE", "SECPIX", "PIXSCAL1"), _positive_float)
    if out is not None:
        return out
    pix_um = _first(header, ("XPIXSZ", "PIXSIZE1", "PIXSIZE"), _positive_float)
    focal_mm = _first(header, ("FOCALLEN", "FOCAL"), _positive_float)
    if pix_um is not None and focal_mm is not None:
        return pix_um / focal_mm * _ARCSEC_PER_UM_PER_MM
    return None


def _filter_cards(header: fits.Header, keys: tuple[str, ...]) -> list[tuple[str, str]]:
    """Every filter card; empty wheel positions ('Open', 'Clear') only when no wheel holds a filter."""
    cards = _all(header, keys, _text)
    return [c for c in cards if c[1].lower() not in _EMPTY_WHEEL] or cards


def header_facts(header: fits.Header, keywords: dict[str, tuple[str, ...]] | None = None) -> HeaderFacts:
    """Read exposure, filter, kind, time, gain, noise, binning, pointing and scale with fallbacks.

    ``keywords`` replaces the lists of :data:`DEFAULT_KEYWORDS` per fact (the observer config's
    ``header`` section), so a new dialect needs a config line, not code.  Never raises on odd values:
    a keyword whose value cannot be read is skipped (debug log) and the next one tried; a fact nobody
    wrote stays ``None``.  ``sources`` remembers the keyword of each fact found.
    """
    keys = {**DEFAULT_KEYWORDS, **(keywords or {})}
    wcs = _celestial_wcs(header)
    xbin, ybin = _binning(header)
    ra, dec = _pointing(header, wcs)
    cards = _filter_cards(header, keys["filter"])
    found = {
        "exposure": _found(header, keys["exposure"], _nonneg_float),
        "target": _found(header, keys["target"], _text),
        "kind": _found(header, keys["kind"], _frame_kind),
        "date": _date_obs(header, keys["date"]),
        "gain": _found(header, keys["gain"], _gain),
        "read_noise": _found(header, keys["read_noise"], _positive_float),
        "filter": (cards[0][1], cards[0][0]) if cards else (None, None),
    }
    return HeaderFacts(
        exptime=found["exposure"][0],
        filter=found["filter"][0],
        object=found["target"][0],
        imagetyp=found["kind"][0],
        date_obs=found["date"][0],
        gain=found["gain"][0],
        read_noise=found["read_noise"][0],
        xbin=xbin,
        ybin=ybin,
        ra_deg=ra,
        dec_deg=dec,
        plate_scale_arcsec=_plate_scale(header, wcs),
        saturate=_first(header, ("SATURATE", "DATAMAX", "SATLEVEL"), _positive_float),
        wcs=wcs,
        instrument=_first(header, ("INSTRUME", "CAMERA"), _text),
        sources={name: key for name, (value, key) in found.items() if key is not None},
        filter_cards=tuple(cards),
    )
