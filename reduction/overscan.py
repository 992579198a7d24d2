"""Overscan subtraction and trimming of frames whose header gives BIASSEC and TRIMSEC (or DATASEC).

Why: an observatory CCD reads a strip of virtual pixels (the overscan) with every
frame; it carries the bias pedestal of that very readout, drifting from row to row.
Left in, the pedestal inflates the sky level and the strip itself lands in the
stack as a band of negative pixels after sky subtraction.  Sections are IRAF's:
``[x1:x2,y1:y2]``, 1-based, inclusive, in the frame's (binned) pixels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from scipy import ndimage

from reduction.frames import FrameError

#: A strip at least this many pixels wide gives a robust median per row; a narrower one a constant.
MIN_STRIP_WIDTH = 4
#: Rows over which the per-row overscan level is smoothed (a running median, then a running mean): the
#: pedestal drifts slowly, the median of a few pixels per row is noisy.
SMOOTH_ROWS = 15

_SECTION = re.compile(r"^\s*\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]\s*$")


@dataclass(frozen=True)
class Overscan:
    """The corrected, trimmed image, what was done (for the stack header) and where the kept section
    starts in the raw frame (0-based x, y: the WCS's reference pixel moves by it)."""

    data: np.ndarray
    note: str
    level: float            # median overscan level subtracted (ADU)
    origin: tuple[int, int]


def parse_section(text: object, key: str, shape: tuple[int, int]) -> tuple[slice, slice]:
    """(rows, columns) slices of an IRAF section; a malformed or out-of-frame one is a :class:`FrameError`."""
    match = _SECTION.match(str(text))
    if match is None:
        raise FrameError(f"{key} = {text!r} is not a section of the form [x1:x2,y1:y2]")
    x1, x2, y1, y2 = sorted(map(int, match.groups()[:2])) + sorted(map(int, match.groups()[2:]))
    ny, nx = shape
    if x1 < 1 or y1 < 1 or x2 > nx or y2 > ny:
        raise FrameError(f"{key} = {text!r} lies outside the {nx}x{ny} frame")
    return slice(y1 - 1, y2), slice(x1 - 1, x2)


def _section_text(rows: slice, cols: slice) -> str:
    return f"[{cols.start + 1}:{cols.stop},{rows.start + 1}:{rows.stop}]"


def _edge_complement(rows: slice, cols: slice, shape: tuple[int, int]) -> tuple[slice, slice] | None:
    """The frame without an overscan strip that runs along one whole edge, else None."""
    ny, nx = shape
    if rows == slice(0, ny):
        if cols.start == 0:
            return slice(0, ny), slice(cols.stop, nx)
        if cols.stop == nx:
            return slice(0, ny), slice(0, cols.start)
    if cols == slice(0, nx):
        if rows.start == 0:
            return slice(rows.stop, ny), slice(0, nx)
        if rows.stop == ny:
            return slice(0, rows.start), slice(0, nx)
    return None


def _level(strip: np.ndarray, along_rows: bool, n: int, start: int) -> tuple[np.ndarray | float, str]:
    """The overscan level for ``n`` lines of the data section from ``start`` (rows or, transposed,
    columns): smoothed medians per line when the strip is wide enough and spans them, else a constant."""
    lines = strip if along_rows else strip.T
    if lines.shape[1] >= MIN_STRIP_WIDTH and start >= 0 and lines.shape[0] >= start + n:
        per_line = np.median(lines, axis=1)
        size = min(SMOOTH_ROWS, len(per_line))
        smooth = ndimage.uniform_filter1d(ndimage.median_filter(per_line, size=size, mode="nearest"),
                                          size=size, mode="nearest")
        return smooth[start:start + n].astype(np.float32), "row by row" if along_rows else "column by column"
    return float(np.median(strip)), "as a constant"


def correct_overscan(data: np.ndarray, header: fits.Header) -> Overscan | None:
    """Subtract the overscan (BIASSEC) and trim to TRIMSEC, else DATASEC; None when the header asks neither.

    A strip beside the data (as tall as the frame) is subtracted row by row, one
    below or above them column by column, a short one (fewer than
    :data:`MIN_STRIP_WIDTH` pixels across) or one that does not span the data as a
    constant.  Without TRIMSEC/DATASEC the data are the frame minus an edge strip.
    A DATASEC that is the whole frame, without BIASSEC, changes nothing (None).
    """
    shape = data.shape
    bias_key = "BIASSEC" if str(header.get("BIASSEC", "")).strip() else None
    trim_key = next((k for k in ("TRIMSEC", "DATASEC") if str(header.get(k, "")).strip()), None)
    if bias_key is None and trim_key is None:
        return None
    trim = parse_section(header[trim_key], trim_key, shape) if trim_key else None
    if bias_key is None:
        if trim == (slice(0, shape[0]), slice(0, shape[1])):
            return None
        out = np.ascontiguousarray(data[trim], dtype=np.float32)
        return Overscan(out, f"trimmed to {trim_key} {_section_text(*trim)}", 0.0, (trim[1].start, trim[0].start))
    rows, cols = parse_section(header[bias_key], bias_key, shape)
    if trim is None:
        trim = _edge_complement(rows, cols, shape)
        if trim is None:
            raise FrameError(f"BIASSEC {_section_text(rows, cols)} is not a strip along an edge and no "
                             "TRIMSEC/DATASEC says where the data are")
    overlap = (max(rows.start, trim[0].start) < min(rows.stop, trim[0].stop)
               and max(cols.start, trim[1].start) < min(cols.stop, trim[1].stop))
    if overlap:
        raise FrameError(f"BIASSEC {_section_text(rows, cols)} overlaps the data section {_section_text(*trim)}")
    strip = np.asarray(data[rows, cols], dtype=np.float32)
    beside = rows.start <= trim[0].start and rows.stop >= trim[0].stop
    if beside:
        level, how = _level(strip, True, trim[0].stop - trim[0].start, trim[0].start - rows.start)
    else:
        level, how = _level(strip, False, trim[1].stop - trim[1].start, trim[1].start - cols.start)
    out = np.array(data[trim], dtype=np.float32)
    if isinstance(level, np.ndarray):
        out -= level[:, None] if beside else level[None, :]
    else:
        out -= np.float32(level)
    note = f"overscan {_section_text(rows, cols)} subtracted {how}, trimmed to {_section_text(*trim)}"
    return Overscan(out, note, float(np.median(level)), (trim[1].start, trim[0].start))
