"""The colour-magnitude diagram as plain arrays, for the dashboard, the figure and the age fit.

(The figure itself is drawn by ``observer.figures``: ``reduction/`` writes no files.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.table import Table

from reduction.photometry import FLAG_SATURATED


@dataclass(frozen=True)
class CmdData:
    """A colour-magnitude diagram as plain arrays (for the dashboard and the figure)."""

    color: np.ndarray
    mag: np.ndarray
    color_err: np.ndarray
    mag_err: np.ndarray
    saturated: np.ndarray          # bool per star
    color_label: str               # e.g. "blue - green"
    mag_label: str                 # e.g. "green"

    @property
    def n(self) -> int:
        return int(len(self.mag))


def cmd_data(catalog: Table, color: tuple[str, str] = ("blue", "green"), magnitude: str = "green") -> CmdData:
    """The diagram's points: stars with a finite colour and magnitude (NaN rows are left out).

    The colour error is the two magnitude errors in quadrature (the filters' noises
    are independent); ``saturated`` marks stars with the saturated flag bit, whose
    magnitudes are lower limits of the brightness, not measurements.
    """
    a, b = color
    col = np.asarray(catalog[f"mag_{a}"], float) - np.asarray(catalog[f"mag_{b}"], float)
    mag = np.asarray(catalog[f"mag_{magnitude}"], float)
    col_err = np.hypot(np.asarray(catalog[f"magerr_{a}"], float), np.asarray(catalog[f"magerr_{b}"], float))
    mag_err = np.asarray(catalog[f"magerr_{magnitude}"], float)
    flags = np.asarray(catalog["flags"], np.int64) if "flags" in catalog.colnames else np.zeros(len(catalog), int)
    ok = np.isfinite(col) & np.isfinite(mag)
    return CmdData(color=col[ok], mag=mag[ok], color_err=col_err[ok], mag_err=mag_err[ok],
                   saturated=(flags[ok] & FLAG_SATURATED) > 0, color_label=f"{a} - {b}", mag_label=magnitude)
