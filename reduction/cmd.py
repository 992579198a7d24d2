"""The colour-magnitude diagram: plain arrays for the dashboard, and the figure written to cmd.png.

The figure is drawn on a ``matplotlib.figure.Figure`` with the Agg canvas, never
through pyplot, because the service draws it from a worker thread while the
dashboard runs: pyplot's global state is neither thread-safe nor needed.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import Table
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from reduction.photometry import FLAG_SATURATED

log = logging.getLogger(__name__)


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


def plot_cmd(cmd: CmdData, path: str | os.PathLike, isochrone: tuple[np.ndarray, np.ndarray] | None = None,
             turnoff: tuple[float, float] | None = None, title: str | None = None,
             age_text: str | None = None) -> Figure:
    """Draw the CMD and write it atomically to ``path`` (format from its extension); returns the figure.

    Saturated stars are open markers: their magnitudes are only limits.  The
    magnitude axis is inverted (bright at the top) as astronomers read it.
    """
    fig = Figure(figsize=(6.4, 7.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    good = ~np.asarray(cmd.saturated, bool)
    ax.errorbar(cmd.color[good], cmd.mag[good], xerr=cmd.color_err[good], yerr=cmd.mag_err[good],
                fmt="o", ms=2.5, color="k", ecolor="0.7", elinewidth=0.6, capsize=0,
                label=f"stars ({int(good.sum())})", zorder=2)
    if (~good).any():
        ax.plot(cmd.color[~good], cmd.mag[~good], "o", ms=6, mfc="none", mec="tab:red", mew=1.2,
                label=f"saturated ({int((~good).sum())}, magnitudes are limits)", zorder=3)
    if isochrone is not None:
        iso_color, iso_mag = _break_jumps(np.asarray(isochrone[0], float), np.asarray(isochrone[1], float))
        ax.plot(iso_color, iso_mag, "-", color="tab:blue", lw=1.4,
                label="isochrone" if age_text is None else f"isochrone, {age_text}", zorder=4)
    if turnoff is not None:
        ax.plot([turnoff[0]], [turnoff[1]], "*", ms=14, color="gold", mec="k", label="turn-off", zorder=5)
    if cmd.n:
        _set_limits(ax, cmd, turnoff)
    ax.invert_yaxis()
    ax.set_xlabel(f"{cmd.color_label} [mag]")
    ax.set_ylabel(f"{cmd.mag_label} [mag]")
    heading = f"{title}: " if title else ""
    ax.set_title(f"{heading}{cmd.n} stars" + (f" ({age_text})" if age_text else ""))
    ax.grid(alpha=0.25)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.85)
    fig.tight_layout()
    _atomic_savefig(fig, Path(path))
    return fig


def _set_limits(ax, cmd: CmdData, turnoff: tuple[float, float] | None) -> None:
    """Axis limits from the stars (robust to a few wild colours of faint stars) and the turn-off;
    the isochrone does not widen them."""
    colors, mags = np.asarray(cmd.color, float), np.asarray(cmd.mag, float)
    lo, hi = np.nanpercentile(colors, [0.5, 99.5])
    mlo, mhi = np.nanmin(mags), np.nanmax(mags)
    if turnoff is not None and np.all(np.isfinite(turnoff)):
        lo, hi = min(lo, turnoff[0]), max(hi, turnoff[0])
        mlo, mhi = min(mlo, turnoff[1]), max(mhi, turnoff[1])
    pad = 0.08 * max(hi - lo, 0.2)
    ax.set_xlim(lo - pad, hi + pad)
    mpad = 0.04 * max(mhi - mlo, 0.5)
    ax.set_ylim(mlo - mpad, mhi + mpad)


def _break_jumps(color: np.ndarray, mag: np.ndarray, max_step: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Insert gaps where consecutive isochrone points jump (between evolutionary phases),
    so the line does not draw straight segments across the diagram."""
    if len(color) < 2:
        return color, mag
    step = np.hypot(np.diff(color), np.diff(mag) / 4)     # a magnitude step counts less than a colour step
    cut = np.nonzero(step > max_step)[0] + 1
    return np.insert(color, cut, np.nan), np.insert(mag, cut, np.nan)


def _atomic_savefig(fig: Figure, path: Path) -> None:
    """Save to a temporary file in the same folder, then rename: readers never see half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    log.debug("wrote %s", path)
