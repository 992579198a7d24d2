"""Colour cameras: a one-shot-colour frame split into its R, G and B planes, each measured as a filter.

Why: a colour camera's raw frame is a mosaic of colour sites (a Bayer matrix) and a
DeepSkyStacker-like cube holds three colour planes; measured as one monochrome image, neither
gives a colour, while its planes give a colour-magnitude diagram from one exposure. The split is
the superpixel one (each 2x2 cell gives one pixel per colour, the two greens averaged): no
interpolation, so every plane pixel is a measurement and the noise stays simple, at half the
resolution. A mosaic we cannot split (CYGM, X-Trans, ...) is refused by name, not guessed.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
from astropy.io import fits

from reduction.frames import Frame, FrameError, HeaderFacts

#: The Bayer patterns split here: the colours of the 2x2 cell, row by row, from the sensor's origin.
BAYER_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")
#: Header keywords naming a colour mosaic (N.I.N.A. and ASIAIR write BAYERPAT, MaxIm DL COLORTYP).
MOSAIC_KEYWORDS = ("BAYERPAT", "COLORTYP")
#: Values of those keywords that mean a monochrome sensor.
_MONO = {"", "MONO", "MONOCHROME", "NONE", "GRAY", "GREY", "BW", "L"}
#: Mosaic names recognised in a FILTER card too (a camera that writes its pattern as the filter).
_MOSAIC_NAME = re.compile(r"^(?:[RGB]{4}|CYGM|CMYG|RGBE|X-?TRANS)$", re.IGNORECASE)
#: The planes, in the order they go through the per-frame path, and the filter name each becomes.
COLOURS = ("R", "G", "B")


def colour_mosaic(header: fits.Header, filter_cards: tuple[tuple[str, str], ...] = ()) -> str | None:
    """The colour mosaic a header declares ('RGGB', 'CYGM', ...), upper case, or None for a mono frame.

    BAYERPAT/COLORTYP first; else a filter card whose value is a mosaic's name (FILTER = 'RGGB').
    """
    for key in MOSAIC_KEYWORDS:
        value = str(header.get(key, "")).strip().upper()
        if value not in _MONO:
            return value
    return next((value.strip().upper() for _, value in filter_cards if _MOSAIC_NAME.match(value.strip())), None)


def split_bayer(data: np.ndarray, pattern: str, x_offset: int = 0, y_offset: int = 0,
                saturation: float = np.inf) -> dict[str, np.ndarray]:
    """R, G (mean of the two greens) and B superpixel planes of a Bayer mosaic, each half the size.

    Where a green site is at or above ``saturation``, G takes that site's value instead of the
    mean: the superpixel stays recognisably saturated rather than looking like a measurement.

    ``pattern`` names the 2x2 cell at the sensor's origin; ``x_offset``/``y_offset`` (XBAYROFF,
    YBAYROFF) say where the image starts on the sensor, so image pixel (x, y) has the colour of
    the cell's site ((x + x_offset) % 2, (y + y_offset) % 2). An odd last row or column (half a
    cell) is dropped.
    """
    pattern = pattern.upper()
    if pattern not in BAYER_PATTERNS:
        raise _unsupported(pattern)
    if data.ndim != 2 or min(data.shape) < 2:
        raise FrameError(f"colour mosaic {pattern}: a 2-D image of at least 2x2 pixels is needed, got shape "
                         f"{data.shape}")
    ny, nx = data.shape[0] // 2 * 2, data.shape[1] // 2 * 2
    sites: dict[str, list[np.ndarray]] = {}
    for k, colour in enumerate(pattern):
        # The site (sx, sy) of the cell, moved by the offsets onto the image's first cell.
        sx, sy = (k % 2 - x_offset) % 2, (k // 2 - y_offset) % 2
        sites.setdefault(colour, []).append(data[sy:ny:2, sx:nx:2])
    planes = {c: np.asarray(sites[c][0], np.float32) for c in ("R", "B")}
    g1, g2 = (np.asarray(g, np.float32) for g in sites["G"])
    planes["G"] = np.where((g1 >= saturation) | (g2 >= saturation), np.maximum(g1, g2), 0.5 * (g1 + g2))
    return {c: np.ascontiguousarray(planes[c]) for c in COLOURS}


def _unsupported(mosaic: str) -> FrameError:
    return FrameError(f"colour mosaic {mosaic}: not supported (only the Bayer patterns "
                      f"{', '.join(BAYER_PATTERNS)} are split)")


def _bayer_offset(header: fits.Header, key: str) -> int:
    """XBAYROFF/YBAYROFF as an integer (0 when absent or unreadable: the usual case)."""
    try:
        return int(round(float(header.get(key, 0) or 0)))
    except (TypeError, ValueError):
        return 0


def _plane_facts(facts: HeaderFacts, colour: str, source: str, binned: bool) -> HeaderFacts:
    """The frame's facts for one plane: the plane's filter, and for a superpixel plane the doubled pixel."""
    changes: dict = {"filter": colour, "filter_cards": ((source, colour),),
                     "sources": {**facts.sources, "filter": source}}
    if binned:
        changes.update(xbin=facts.xbin * 2, ybin=facts.ybin * 2,
                       plate_scale_arcsec=facts.plate_scale_arcsec * 2 if facts.plate_scale_arcsec else None,
                       wcs=facts.wcs.slice((slice(None, None, 2), slice(None, None, 2))) if facts.wcs else None)
    return dataclasses.replace(facts, **changes)


def plane_facts(header: fits.Header, facts: HeaderFacts, shape: tuple[int, ...]) -> list[tuple[str, HeaderFacts]]:
    """The colour planes a file of this header and data shape holds, with each plane's facts, without the data.

    ``[("", facts)]`` for a mono frame; R, G, B for a 3-plane cube or a Bayer mosaic (each plane's
    filter is its colour, with the keyword it came from). Raises :class:`FrameError` for a mosaic
    that is not a Bayer pattern, naming it. (``observer inspect`` reads headers only.)
    """
    if len(shape) == 3 and shape[0] == 3:
        return [(c, _plane_facts(facts, c, "NAXIS3", binned=False)) for c in COLOURS]
    mosaic = colour_mosaic(header, facts.filter_cards)
    if mosaic is None:
        return [("", facts)]
    if mosaic not in BAYER_PATTERNS:
        raise _unsupported(mosaic)
    source = next((k for k in MOSAIC_KEYWORDS if str(header.get(k, "")).strip().upper() == mosaic),
                  facts.sources.get("filter", "FILTER"))
    return [(c, _plane_facts(facts, c, source, binned=True)) for c in COLOURS]


def colour_planes(frame: Frame, saturation: float = np.inf) -> list[tuple[str, Frame]]:
    """The frame's colour planes as (colour, frame) pairs, R, G, B (see :func:`plane_facts`); ``[("", frame)]``
    for a mono frame.

    A 3-plane cube (``frame.data`` of shape (3, ny, nx)) gives its planes at full size; a 2-D frame
    whose header declares a Bayer mosaic is split by :func:`split_bayer` (``saturation`` in raw ADU).
    """
    layout = plane_facts(frame.header, frame.facts, frame.data.shape)
    if layout[0][0] == "":
        return [("", frame)]
    if frame.data.ndim == 3:
        planes = dict(zip(COLOURS, frame.data))
    else:
        planes = split_bayer(frame.data, colour_mosaic(frame.header, frame.facts.filter_cards),
                             _bayer_offset(frame.header, "XBAYROFF"), _bayer_offset(frame.header, "YBAYROFF"),
                             saturation)
    return [(c, dataclasses.replace(frame, data=np.ascontiguousarray(planes[c]), facts=facts)) for c, facts in layout]
