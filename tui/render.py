"""Drawing images in a terminal: astronomical stretch, resampling, half-block characters.

A terminal cell is about twice as tall as it is wide, so the upper half block
``▀`` with its foreground set to one pixel and its background to the pixel
below gives two roughly square pixels per cell.  That works in every terminal
with colour (and over ssh), unlike the Kitty/Sixel graphics protocols.

Everything here is pure numpy/rich so the widgets stay thin and the functions
are easy to test.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from astropy.visualization import AsinhStretch, ZScaleInterval
from rich.color import Color
from rich.style import Style
from rich.segment import Segment

#: The character whose foreground is the upper pixel and background the lower one.
UPPER_HALF = "\u2580"

_ZSCALE = ZScaleInterval()
# A gentle asinh on top of the zscale cut keeps faint sky structure visible while
# bright stars do not all burn into the same white blob.
_ASINH = AsinhStretch(a=0.3)


def stretch(image: np.ndarray) -> np.ndarray:
    """Map an image to 0..255 grey levels with a zscale cut and a mild asinh stretch.

    Zscale (IRAF's display default) picks limits around the sky so the noise and
    the faint stars show, which is what the observer judges a stack by.  NaN and
    infinite pixels (no coverage) are drawn black.
    """
    data = np.asarray(image, dtype=np.float32)
    finite = np.isfinite(data)
    if not finite.any():
        return np.zeros(data.shape, dtype=np.uint8)
    low, high = _ZSCALE.get_limits(data[finite])
    if not high > low:
        high = low + 1.0
    scaled = np.clip((np.where(finite, data, low) - low) / (high - low), 0.0, 1.0)
    grey = _ASINH(scaled, clip=True)
    return np.round(grey * 255.0).astype(np.uint8)


def display_grey(preview: np.ndarray) -> np.ndarray:
    """The stretched preview as screen rows: row 0 of the image at the bottom, as in FITS/DS9 and the PNGs."""
    return stretch(preview)[::-1]


def fit_size(shape: tuple[int, int], cols: int, rows: int) -> tuple[int, int]:
    """Largest (pixel_rows, pixel_cols) with the image's aspect that fits in cols x rows cells.

    Each cell holds one pixel across and two down, so square pixels stay square.
    The pixel row count is even so every cell has both halves.
    """
    height, width = shape
    if height <= 0 or width <= 0 or cols <= 0 or rows <= 0:
        return 0, 0
    scale = min(cols / width, 2 * rows / height)
    out_cols = max(1, min(cols, int(round(width * scale))))
    out_rows = max(2, min(2 * rows, int(round(height * scale))))
    return out_rows - out_rows % 2, out_cols


def _bin_edges(n_in: int, n_out: int) -> np.ndarray:
    """Start index of each output bin; bins never empty (repeats when upsampling)."""
    return np.minimum((np.arange(n_out) * n_in) // n_out, n_in - 1)


def resample(image: np.ndarray, out_rows: int, out_cols: int) -> np.ndarray:
    """Resize by block averaging (or pixel repetition when enlarging).

    Averaging rather than picking every n-th pixel keeps small stars visible when
    a 256-pixel preview is squeezed into 40 terminal columns.
    """
    data = np.asarray(image, dtype=np.float32)
    in_rows, in_cols = data.shape
    if out_rows >= in_rows and out_cols >= in_cols:
        return data[_bin_edges(in_rows, out_rows)][:, _bin_edges(in_cols, out_cols)]
    row_start = _bin_edges(in_rows, out_rows)
    col_start = _bin_edges(in_cols, out_cols)
    row_sum = np.add.reduceat(data, row_start, axis=0)
    row_n = np.diff(np.append(row_start, in_rows)).astype(np.float32)
    # reduceat gives the single element (not a sum) where a start repeats; the
    # count of 0 is then wrong, so clamp it to 1 (repeat = one pixel).
    row_n = np.maximum(row_n, 1.0)
    total = np.add.reduceat(row_sum, col_start, axis=1)
    col_n = np.maximum(np.diff(np.append(col_start, in_cols)).astype(np.float32), 1.0)
    return total / row_n[:, None] / col_n[None, :]


#: Grey levels drawn. 32 look smooth (a 256-colour terminal has only 24 greys) and keep the number
#: of distinct cell styles at 32 x 32, so they are all cached after a few frames: building a rich
#: Style costs ~0.1 ms, which for every cell of a noisy image would be tens of ms per redraw.
GREY_LEVELS = 32


@lru_cache(maxsize=GREY_LEVELS * GREY_LEVELS)
def _cell_style(upper: int, lower: int) -> Style:
    top, bottom = (round(level * 255 / (GREY_LEVELS - 1)) for level in (upper, lower))
    return Style(color=Color.from_rgb(top, top, top), bgcolor=Color.from_rgb(bottom, bottom, bottom))


def half_block_rows(grey: np.ndarray, cols: int) -> list[list[Segment]]:
    """Segments of each terminal row for a uint8 image with an even number of rows, centred in ``cols``.

    Segments rather than rich Text: Textual converts every span of a Text
    into its own style objects on each redraw (measured ~50 ms for a full
    panel), while a widget's ``render_line`` can hand over ready segments.
    Runs of equal cells share one segment.
    """
    levels = (grey.astype(np.uint16) * GREY_LEVELS // 256).astype(np.intp)
    ncols = levels.shape[1]
    indent = (cols - ncols) // 2
    left = [Segment(" " * indent)] if indent > 0 else []
    right = [Segment(" " * (cols - ncols - indent))] if cols - ncols - indent > 0 else []
    rows = []
    for top, bottom in zip(levels[0::2].tolist(), levels[1::2].tolist()):
        segments = list(left)
        start = 0
        for index in range(1, ncols + 1):
            if index == ncols or top[index] != top[start] or bottom[index] != bottom[start]:
                segments.append(Segment(UPPER_HALF * (index - start), _cell_style(top[start], bottom[start])))
                start = index
        rows.append(segments + right)
    return rows


def image_rows(grey: np.ndarray, cols: int, rows: int) -> list[list[Segment]]:
    """A stretched (uint8) image fitted into cols x rows cells as half-block segments, centred across."""
    out_rows, out_cols = fit_size(grey.shape, cols, rows)
    if out_rows == 0:
        return []
    small = np.round(resample(grey, out_rows, out_cols)).astype(np.uint8)
    return half_block_rows(small, cols)
