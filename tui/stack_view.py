"""The live stacks of the selected target, one panel per filter, drawn with half blocks.

The widget only draws the small ``stack_preview`` / ``raw_preview`` arrays the
service publishes.  Stretching and resampling them is done on a thread worker,
not in ``render()``: measured during a burst of 1024 px frames, doing it on the
UI thread took up to ~0.5 s per redraw, because every numpy call hands the GIL
to the busy reduction thread and waits up to a switch interval (5 ms) to get
it back.  The widget uses Textual's line API: ``render_line`` hands over cached
rows of segments (no per-redraw style conversion), so keys (f, r, t) redraw at
once; a new preview shows its previous picture until the new one is ready.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from rich.segment import Segment
from rich.style import Style
from textual.geometry import Region
from textual.strip import Strip
from textual.widget import Widget

from observer.state import FilterStatus, TargetState
from tui.render import display_grey, image_rows

log = logging.getLogger(__name__)

#: Below this width per panel the filters are not drawn side by side: only the selected one.
MIN_PANEL_COLS = 22


@dataclass(frozen=True)
class _Picture:
    """Half-block rows of one preview array at one panel size."""

    preview: np.ndarray     # kept so its id() cannot be reused while cached
    cols: int
    rows: int
    lines: list[list[Segment]]


def draw_preview(preview: np.ndarray, cols: int, rows: int) -> list[list[Segment]]:
    """Stretch and fit a preview into cols x rows cells (row 0 at the bottom, as FITS/DS9 and the PNGs)."""
    return image_rows(display_grey(preview), cols, rows)


def _text_row(text: str, cols: int, style: Style | None = None) -> list[Segment]:
    """A row holding text, cut or padded to exactly ``cols`` cells."""
    return [Segment(text[:cols].ljust(cols), style)]


def view_key(target: TargetState | None, filter_name: str | None, mode: str) -> tuple:
    """What the stack panels show, comparable between snapshots: the target, each filter's frame count and
    the identity of its previews (the service publishes a new array only when the stack or frame changed).

    Identities are compared while the previous target state still holds its arrays, so an id cannot have
    been reused.
    """
    if target is None:
        return (None, filter_name, mode)
    return (target.name, filter_name, mode, tuple(
        (name, status.n_stacked, id(status.stack_preview), id(status.raw_preview))
        for name, status in target.filters.items()))


TITLE = Style(bold=True)
TITLE_SELECTED = Style(bold=True, reverse=True)
DIM = Style(dim=True)


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
        self.drawn_filters: list[str] = []  # what the last layout showed (for tests)
        self._pictures: dict[tuple[str, str], _Picture] = {}   # (filter, mode) -> latest drawn picture
        self._pending: set[tuple[int, int, int]] = set()         # (id(preview), cols, rows) being drawn
        self._strips: list[Strip] | None = None                   # the laid-out screen rows
        self._strips_size: tuple[int, int] = (0, 0)
        self._key: tuple = ()                                    # view_key of what is drawn

    def show(self, target: TargetState | None, filter_name: str | None, mode: str) -> None:
        """Display a target's previews; redraws only when something visible changed.

        Each snapshot brings a new ``TargetState``, but its preview arrays are
        the same objects until the stack changes: the panels are compared by
        what they show (titles, preview identities), not by the snapshot.
        """
        key = view_key(target, filter_name, mode)
        if target is not None and (self.target_state is None or target.name != self.target_state.name):
            self._pictures.clear()
        self.target_state, self.filter_name, self.mode = target, filter_name, mode
        if key == self._key:
            return
        # f with the panels side by side only moves the highlight between titles: repaint that row alone
        # (a full repaint restyles every cell of the pictures, the costliest redraw of the dashboard).
        titles_only = (self._key[:1] + self._key[2:] == key[:1] + key[2:] and target is not None
                       and len(self.drawn_filters) == len(target.filters) > 1)
        self._key = key
        self._strips = None
        if titles_only:
            self.refresh(Region(0, 0, self.size.width, 1))
        else:
            self.refresh()

    def _invalidate(self) -> None:
        self._strips = None
        self.refresh()

    @property
    def pending(self) -> bool:
        """True while a preview is being drawn off the UI thread."""
        return bool(self._pending)

    def _request(self, key: tuple[str, str], preview: np.ndarray, cols: int, rows: int) -> None:
        """Draw a preview on a thread worker; the result comes back through call_from_thread."""
        job = (id(preview), cols, rows)
        if job in self._pending:
            return
        self._pending.add(job)

        def work() -> None:
            try:
                lines = draw_preview(preview, cols, rows)
            except Exception as exc:  # a bad preview must not leave the panel waiting forever
                log.exception("cannot draw the %s preview", key)
                lines = [_text_row(f"cannot draw: {exc}", cols, Style(color="red"))]
            self.app.call_from_thread(self._drawn, key, job, _Picture(preview, cols, rows, lines))

        self.run_worker(work, thread=True, group="stack-draw", exit_on_error=False)

    def _drawn(self, key: tuple[str, str], job: tuple[int, int, int], picture: _Picture) -> None:
        self._pending.discard(job)
        self._pictures[key] = picture
        self._invalidate()

    def _panel(self, status: FilterStatus, cols: int, rows: int, selected: bool) -> list[list[Segment]]:
        """Title row plus image rows for one filter, each exactly ``cols`` cells wide."""
        preview = status.stack_preview if self.mode == "stack" else status.raw_preview
        what = f"{status.n_stacked} stacked" if self.mode == "stack" else "last raw frame"
        lines = [_text_row(f" {status.filter}: {what} ", cols, TITLE_SELECTED if selected else TITLE)]
        key = (status.filter, self.mode)
        picture = self._pictures.get(key)
        if preview is None or preview.size == 0:
            lines.append(_text_row("waiting for frames", cols, DIM))
        else:
            if picture is None or picture.preview is not preview or (picture.cols, picture.rows) != (cols, rows - 1):
                self._request(key, preview, cols, rows - 1)
            if picture is None:
                lines.append(_text_row("drawing ...", cols, DIM))
            elif picture.cols == cols:
                lines.extend(picture.lines[:rows - 1])
            else:  # the old size while the new one is drawn: cut or pad each row to the panel
                lines.extend(Segment.adjust_line_length(row, cols) for row in picture.lines[:rows - 1])
        lines.extend(_text_row("", cols) for _ in range(rows - len(lines)))
        return lines

    def _layout(self, width: int, height: int) -> list[Strip]:
        """The screen rows: the filters' panels side by side (only the selected one when narrow)."""
        target = self.target_state
        if target is None or not target.filters:
            self.drawn_filters = []
            return [Strip(_text_row("no target yet: waiting for science frames", width, DIM), width)]
        names = list(target.filters)
        selected = self.filter_name if self.filter_name in target.filters else names[0]
        if width // len(names) < MIN_PANEL_COLS:
            names = [selected]
        self.drawn_filters = names
        gap = [Segment(" ")]
        cols = (width - len(gap) * (len(names) - 1)) // len(names)
        panels = [self._panel(target.filters[n], cols, height, n == selected) for n in names]
        strips = []
        for row in range(height):
            segments: list[Segment] = []
            for index, panel in enumerate(panels):
                segments.extend((gap if index else []) + panel[row])
            strips.append(Strip(segments).adjust_cell_length(width))
        return strips

    def render_line(self, y: int) -> Strip:
        size = (self.size.width, self.size.height)
        if self._strips is None or self._strips_size != size:
            self._strips, self._strips_size = self._layout(*size), size
        return self._strips[y] if y < len(self._strips) else Strip.blank(size[0])

    def text(self) -> str:
        """What the widget shows, as plain text (for tests and logs)."""
        return "\n".join(self.render_line(y).text for y in range(self.size.height))
