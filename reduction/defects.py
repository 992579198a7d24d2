"""Detector defects: zeroed rows or columns and bad (hot or dead) columns, as a bad-pixel mask.

Why a separate test from hot pixels: a defective column is a line, not a spike.  Every pixel of it
has two normal neighbours above and below in the same column, so the spike test of
:mod:`reduction.hotpixels` passes it, and the background and star finder then take it for sky (a
dead column drags the background down) or for a trail of stars (a hot one).  A line shows in the
profile of per-column medians: stars hardly move a median over hundreds of rows, a sky gradient
is smooth over a few columns, and a defect is a jump of one or a few columns.

A defect may be in some frames only (a readout glitch) or in the flats, so this is run per frame
and returns a mask; repairing or ignoring the pixels is the caller's choice
(:func:`reduction.hotpixels.repair_pixels`).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from reduction.background import pixel_noise

#: Columns of the running median that a column's median is compared with (odd; wider than a defect).
PROFILE_WINDOW = 15
#: A line of which at least this fraction of pixels hold the same exact value is dead (zeroed, or
#: clipped to one value by a readout fault): real sky never repeats one float that often.
CONSTANT_FRACTION = 0.5
#: Pixels per line that the medians are taken over (evenly spaced along it).
SAMPLE_LINES = 256
#: Smallest line length (pixels) judged: shorter profiles have too noisy a median.
MIN_LENGTH = 16
#: The quantile of a line's pixels that stands for its level, and its standard error in noise sigma
#: per sqrt(pixels): sqrt(q (1 - q)) / pdf(ppf(q)) of a Gaussian.
PROFILE_QUANTILE = 0.2
QUANTILE_ERROR = 1.43
#: A deviant line is checked in this many pieces along its length ...
SEGMENTS = 8
#: ... and is defective only when at least this fraction of them jump the same way, each by this many
#: of their own spread (lower than the whole line's threshold: a piece's median is noisier).
SEGMENT_AGREEMENT = 0.75
SEGMENT_SIGMA = 3.0


def _constant_lines(lines: np.ndarray, middle: np.ndarray) -> np.ndarray:
    """Per line (a row of ``lines``): True where most pixels share one exact value (zeroed lines).

    A value held by more than half of a line's pixels is its middle order statistic, so counting
    the pixels equal to that one value per line is enough (no sort, no run lengths).
    """
    return np.count_nonzero(lines == middle[:, None], axis=1) > CONSTANT_FRACTION * lines.shape[1]


def _profile(lines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per line of ``lines``: its middle value (the repeated one of a zeroed line) and its low quantile.

    The profile is the ``PROFILE_QUANTILE`` quantile, not the median: where a line crosses a cluster
    core, stars and their halos cover much of it and lift its median, but a defect shifts every
    pixel of the line, the faintest too.  One partition gives both values.
    """
    n = lines.shape[1]
    low = int(PROFILE_QUANTILE * (n - 1))
    ordered = np.partition(lines, [low, n // 2], axis=1)
    return ordered[:, n // 2], ordered[:, low]


def _along_the_line(lines: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """Per line: True where the jump holds, with the same ``sign``, along most of the line.

    A defective column is offset over its length; a line through a cluster core only where it crosses
    the core (the stars lift that part of its median), so it shows in a few of the line's segments.
    """
    segments = min(SEGMENTS, lines.shape[1] // MIN_LENGTH)
    if segments < 2:
        return np.ones(lines.shape[0], bool)
    agree = np.zeros(lines.shape[0], int)
    for piece in np.array_split(lines, segments, axis=1):
        _, profile = _profile(piece)
        agree += (_jumps(piece, profile, SEGMENT_SIGMA) * sign) > 0
    return agree >= SEGMENT_AGREEMENT * segments


def _jumps(lines: np.ndarray, profile: np.ndarray, sigma: float) -> np.ndarray:
    """Per line: the median ``profile``'s jump from its neighbours' running median where over ``sigma``, else 0.

    The scale is the robust spread of those jumps over all lines (fixed-pattern noise included),
    floored at the noise of a quantile of a line's pixels, so a clean detector flags nothing.
    """
    jump = profile - ndimage.median_filter(profile, size=PROFILE_WINDOW, mode="nearest")
    # the standard error of the 20% quantile of n Gaussian values is 1.43 sigma / sqrt(n) (1.2533 for the median)
    # pixel_noise differences neighbouring lines: it reads the lines as the columns of the image they sample
    floor = QUANTILE_ERROR * pixel_noise(lines.T) / np.sqrt(lines.shape[1])
    spread = max(1.4826 * float(np.median(np.abs(jump - np.median(jump)))), floor)
    return np.where(np.abs(jump) > sigma * spread, jump, 0.0)


def _bad_lines(data: np.ndarray, sigma: float, rows: bool) -> np.ndarray:
    """Per column of ``data`` (per row when ``rows``): True where it is defective."""
    length, count = data.shape[::-1] if rows else data.shape
    if length < MIN_LENGTH or count < 3:
        return np.zeros(count, bool)
    # Every k-th pixel of a line is enough for its median and its repeated value, at 1/k of the cost
    # (a full-frame median per column costs a second at 2048 px, the whole per-frame budget).  The
    # sample holds one line per row, so that the partitions run along memory (2-3x faster than across).
    step = max(1, length // SAMPLE_LINES)
    lines = np.ascontiguousarray(data[:, ::step] if rows else data[::step].T)
    middle, profile = _profile(lines)
    jumps = _jumps(lines, profile, sigma)
    deviant = jumps != 0
    if deviant.any():
        deviant &= _along_the_line(lines, np.sign(jumps))
    return _constant_lines(lines, middle) | deviant


def find_defects(data: np.ndarray, sigma: float = 8.0) -> np.ndarray:
    """Boolean mask of the pixels of defective columns and rows (zeroed, dead or hot lines).

    ``sigma`` is the threshold on a line's median jump against its neighbours, in units of the robust
    spread of such jumps; 8 keeps a clean frame free of false lines over thousands of columns.
    """
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 2:
        raise ValueError(f"expected a 2-D frame, got shape {data.shape}")
    mask = np.zeros(data.shape, bool)
    mask[:, _bad_lines(data, sigma, rows=False)] = True
    mask[_bad_lines(data, sigma, rows=True), :] = True
    return mask
