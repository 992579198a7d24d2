"""The figures observer writes: the colour-magnitude diagram (cmd.png) and the stack pictures (stack.png).

Drawn on a ``matplotlib.figure.Figure`` with the Agg canvas, never through
pyplot, because the service draws them from worker threads while the dashboard
runs: pyplot's global state is neither thread-safe nor needed. matplotlib is
imported when a figure is first drawn (it costs seconds at start-up).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from observer.products import atomic_savefig
from reduction.cmd import CmdData

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def plot_cmd(cmd: CmdData, path: str | os.PathLike, isochrone: tuple[np.ndarray, np.ndarray] | None = None,
             turnoff: tuple[float, float] | None = None, title: str | None = None,
             age_text: str | None = None) -> "Figure":
    """Draw the CMD and write it atomically to ``path`` (format from its extension); returns the figure.

    Saturated stars are open markers: their magnitudes are only limits.  The
    magnitude axis is inverted (bright at the top) as astronomers read it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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
    atomic_savefig(fig, path)
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


def plot_stack(image: np.ndarray, path: str | os.PathLike, title: str) -> Path:
    """A stack as PNG with a zscale stretch, north as on the grid (row 0 at the bottom), as DS9 shows it."""
    from astropy.visualization import AsinhStretch, ImageNormalize, ZScaleInterval
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 7), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    norm = ImageNormalize(image, interval=ZScaleInterval(), stretch=AsinhStretch(0.3))
    ax.imshow(image, origin="lower", cmap="gray", norm=norm, interpolation="nearest")
    ax.set_title(title)
    ax.set_xlabel("x [px]")
    ax.set_ylabel("y [px]")
    return atomic_savefig(fig, path)
