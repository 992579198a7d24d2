"""The selected target's colour-magnitude (HR) diagram, drawn with plotext.

Only the published ``CmdData`` and ``AgeEstimate`` are drawn; the plot is
rebuilt when either object changes (the service publishes new ones after each
catalogue update), not on every snapshot.
"""

from __future__ import annotations

import numpy as np
from textual.app import RenderResult
from textual_plotext import PlotextPlot

from observer.state import AgeEstimate, CmdData, TargetState

#: Columns of a plot beside its title's: y tick labels (~4), the frame (2) and a margin.
TITLE_MARGIN = 8


def age_text(age: AgeEstimate) -> str:
    """'age 150 Myr (120-190)': the best age with its interval, in the unit that reads best."""
    low, high = 10 ** (age.log_age_low - 6), 10 ** (age.log_age_high - 6)
    if age.age_myr >= 1000:
        return f"age {age.age_myr / 1000:.1f} Gyr ({low / 1000:.1f}-{high / 1000:.1f})"
    return f"age {age.age_myr:.0f} Myr ({low:.0f}-{high:.0f})"


def _span(values: np.ndarray, pad: float, also: float | None = None) -> tuple[float, float]:
    """Robust data limits (0.5-99.5 percentile) with a margin, so one outlier cannot squash the diagram.

    ``also`` (the turn-off) is always inside: the fitted turn-off can lie above
    the saturated stars, and the observer must see it.
    """
    low, high = np.percentile(values, [0.5, 99.5])
    if also is not None and np.isfinite(also):
        low, high = min(low, also), max(high, also)
    margin = max(high - low, 0.1) * pad
    return float(low - margin), float(high + margin)


class HRDiagram(PlotextPlot):
    """Scatter of colour vs magnitude (bright at the top), with the fitted isochrone when there is one."""

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - Textual's own name
        super().__init__(id=id)
        self.cmd: CmdData | None = None
        self.age: AgeEstimate | None = None
        self.target_name: str | None = None
        self.n_points = 0             # stars drawn (tests and the title use it)
        self.title_text = ""
        self.short_title = ""         # without the age: plotext drops a title wider than its canvas
        self._ylim: tuple[float, float] | None = None
        self._draw()

    def show(self, target: TargetState | None) -> None:
        """Redraw if the target, its CMD or its age estimate changed."""
        cmd = target.cmd if target else None
        age = target.age if target else None
        name = target.name if target else None
        if cmd is self.cmd and age is self.age and name == self.target_name:
            return
        self.cmd, self.age, self.target_name = cmd, age, name
        self._draw()
        self.refresh()

    def render(self) -> RenderResult:
        """Draw with the title that fits: at 80 x 24 the star count stays (the target panel has the age)."""
        fits = len(self.title_text) + TITLE_MARGIN <= self.size.width
        self.plt.title(self.title_text if fits else self.short_title)
        if self._ylim is not None:
            # plotext reverses the stored limits in place when it builds a reversed axis: set them again,
            # or every repaint without a new _draw (after r, say) flips the magnitude axis.
            self.plt.ylim(*self._ylim)
        return super().render()

    def _draw(self) -> None:
        plt = self.plt
        plt.clear_figure()
        plt.yreverse(True)  # magnitudes: brighter (smaller) at the top
        self._ylim = None
        cmd = self.cmd
        if cmd is None or cmd.n == 0:
            self.n_points = 0
            self.title_text = self.short_title = f"{self.target_name or 'HR diagram'}: no catalogue yet"
            plt.title(self.title_text)
            return
        good = np.isfinite(cmd.color) & np.isfinite(cmd.mag)
        saturated = good & np.asarray(cmd.saturated, dtype=bool)
        usable = good & ~saturated
        self.n_points = int(good.sum())
        title = self.short_title = f"{self.target_name}: {self.n_points} stars"
        if self.age is not None:
            title += f", {age_text(self.age)}"
        self.title_text = title
        plt.title(title)
        plt.xlabel(cmd.color_label)
        plt.ylabel(cmd.mag_label)
        if usable.any():
            plt.scatter(cmd.color[usable].tolist(), cmd.mag[usable].tolist(), marker="dot", color="cyan")
        if saturated.any():
            plt.scatter(cmd.color[saturated].tolist(), cmd.mag[saturated].tolist(), marker="x",
                        color="gray")
        if self.n_points >= 2:
            # Limits from the stars, not the isochrone, which runs far beyond the data.
            turn_color, turn_mag = self.age.turnoff if self.age is not None else (None, None)
            plt.xlim(*_span(cmd.color[good], 0.05, turn_color))
            self._ylim = _span(cmd.mag[good], 0.03, turn_mag)
            plt.ylim(*self._ylim)
        if self.age is not None:
            self._draw_age(self.age)

    def _draw_age(self, age: AgeEstimate) -> None:
        iso_ok = np.isfinite(age.isochrone_color) & np.isfinite(age.isochrone_mag)
        if iso_ok.sum() >= 2:
            self.plt.plot(age.isochrone_color[iso_ok].tolist(), age.isochrone_mag[iso_ok].tolist(),
                          marker="braille", color="orange")
        turn_color, turn_mag = age.turnoff
        if np.isfinite(turn_color) and np.isfinite(turn_mag):
            self.plt.scatter([turn_color], [turn_mag], marker="X", color="red")
