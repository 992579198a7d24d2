"""The live stacks of the selected target, one panel per filter, drawn with half blocks.

The widget only draws the small ``stack_preview`` / ``raw_preview`` arrays the
service publishes; the stretch is computed once per new preview (cached by the
array's identity, since snapshots are immutable) and only the cheap resampling
to the current widget size happens on each render.
"""

from __future__ import annotations

import numpy as np
from rich.text import Text
from textual.widget import Widget

from observer.state import FilterStatus, TargetState
from tui.render import image_lines, stretch

#: Below this width per panel the filters are not drawn side by side: only the selected one.
MIN_PANEL_COLS = 22


class StackView(Widget):
    """Half-block images of every filter's stack (or last raw frame) of one target."""

    DEFAULT_CSS = """
    StackView {
        width: 1fr;
        height: 1fr;
    }
    """

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - Textual's own name
        super().__init__(id=id)
        self.target_state: TargetState | None = None
        self.filter_name: str | None = None
        self.mode: str = "stack"            # "stack" or "raw"
        self.drawn_filters: list[str] = []  # what the last render showed (for tests and the footer text)
        self._stretched: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def show(self, target: TargetState | None, filter_name: str | None, mode: str) -> None:
        """Display a target's previews; redraws only when something visible changed."""
        changed = (target is not self.target_state or filter_name != self.filter_name or mode != self.mode)
        self.target_state, self.filter_name, self.mode = target, filter_name, mode
        if changed:
            self.refresh()

    def _grey(self, preview: np.ndarray) -> np.ndarray:
        """The stretched preview, computed once per published array, flipped so y grows upwards.

        Row 0 is drawn at the bottom (FITS/DS9 convention, as in the saved PNGs),
        so the observer sees the field the same way everywhere.
        """
        key = id(preview)
        cached = self._stretched.get(key)
        if cached is None or cached[0] is not preview:
            cached = (preview, stretch(preview)[::-1])
            self._stretched[key] = cached
        return cached[1]

    def _forget_old_previews(self, live: list[np.ndarray]) -> None:
        """Drop stretched images of previews no longer published (keeps memory flat all night)."""
        keep = {id(p) for p in live}
        for key in [k for k in self._stretched if k not in keep]:
            del self._stretched[key]

    def _panel(self, status: FilterStatus, cols: int, rows: int, selected: bool) -> list[Text]:
        """Title line plus image lines for one filter, each exactly ``cols`` wide."""
        preview = status.stack_preview if self.mode == "stack" else status.raw_preview
        what = f"{status.n_stacked} stacked" if self.mode == "stack" else "last raw frame"
        title = Text(f" {status.filter}: {what} ", style="bold reverse" if selected else "bold",
                     no_wrap=True, end="")
        title.truncate(cols, pad=True)
        lines = [title]
        if preview is None or preview.size == 0:
            lines.append(Text("waiting for frames", style="dim", end=""))
        else:
            lines.extend(image_lines(self._grey(preview), cols, rows - 1))
        for line in lines:
            line.truncate(cols, pad=True)
        lines.extend(Text(" " * cols, end="") for _ in range(rows - len(lines)))
        return lines

    def render(self) -> Text:
        width, height = self.size.width, self.size.height
        target = self.target_state
        if target is None or not target.filters:
            self.drawn_filters = []
            return Text("no target yet: waiting for science frames", style="dim")
        names = list(target.filters)
        selected = self.filter_name if self.filter_name in target.filters else names[0]
        if width // len(names) < MIN_PANEL_COLS:
            names = [selected]
        self.drawn_filters = names
        statuses = [target.filters[n] for n in names]
        self._forget_old_previews([p for s in target.filters.values()
                                   for p in (s.stack_preview, s.raw_preview) if p is not None])
        gap = 1
        cols = (width - gap * (len(names) - 1)) // len(names)
        panels = [self._panel(s, cols, height, s.filter == selected) for s in statuses]
        out = Text(no_wrap=True, overflow="crop")
        for row in range(height):
            if row:
                out.append("\n")
            for index, panel in enumerate(panels):
                if index:
                    out.append(" " * gap)
                out.append_text(panel[row])
        return out
