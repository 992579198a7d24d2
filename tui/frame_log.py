"""The frame log: one row per file seen, newest on top, with its quality figures and fate.

Rows are keyed by path + content hash and updated in place (new rows added,
changed cells rewritten), never by clearing the table, so the screen does not
flicker and the observer's cursor stays on the frame they were looking at.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from observer.state import FrameRecord, Status
from tui.quiet import QuietStatic

#: How a status stands out: whole-row style for problems, status-cell style otherwise.
ROW_STYLES = {Status.REJECTED: "bold red", Status.QUARANTINED: "yellow"}
STATUS_STYLES = {Status.STACKED: "green", Status.OFFSET: "cyan", Status.CALIBRATION: "blue", Status.IGNORED: "dim"}

#: Below this width only the columns an observer needs at a glance are shown.
COMPACT_WIDTH = 120


def _fmt(value: float, spec: str, unit: str = "") -> str:
    return f"{value:{spec}}{unit}" if value is not None and math.isfinite(value) else "-"


def frame_time(rec: FrameRecord) -> str:
    """HH:MM:SS of the exposure (DATE-OBS), else of when the service finished the file (UTC)."""
    if len(rec.date_obs) >= 19 and rec.date_obs[10] in "T ":
        return rec.date_obs[11:19]
    return time.strftime("%H:%M:%S", time.gmtime(rec.seen_at)) if rec.seen_at else "-"


def fwhm_text(rec: FrameRecord) -> str:
    """FWHM in arcsec when the plate scale is known, else in pixels (the unit is always shown)."""
    if rec.fwhm_arcsec is not None and math.isfinite(rec.fwhm_arcsec):
        return _fmt(rec.fwhm_arcsec, ".1f", '"')
    return _fmt(rec.fwhm, ".1f", "px")


def status_text(rec: FrameRecord) -> str:
    return f"{rec.status}: {rec.reason}" if rec.reason else rec.status


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    cell: Callable[[FrameRecord], str]
    compact: bool   # kept when the table is narrow


COLUMNS = (
    Column("time", "time", frame_time, True),
    Column("file", "file", lambda r: Path(r.path).name, True),
    Column("kind", "kind", lambda r: r.kind or "-", False),
    Column("target", "target", lambda r: r.target or "-", False),
    Column("filter", "filter", lambda r: r.filter or "-", True),
    Column("exptime", "exp", lambda r: _fmt(r.exptime, ".0f", "s"), False),
    Column("fwhm", "FWHM", fwhm_text, True),
    Column("elongation", "elong", lambda r: _fmt(r.elongation, ".2f"), False),
    Column("sky", "sky", lambda r: _fmt(r.sky, ".0f"), False),
    Column("nstars", "stars", lambda r: str(r.nstars) if r.nstars else "-", True),
    Column("transparency", "transp", lambda r: _fmt(r.transparency, ".2f"), False),
    Column("status", "status", status_text, True),
)


def row_key(rec: FrameRecord) -> str:
    return f"{rec.path}|{rec.sha256}"


def frame_details(rec: FrameRecord) -> list[str]:
    """Every published figure of one frame, most important first (the panel under the table
    shows as many lines as fit: the status with its reason, then the quality, then the rest)."""
    steps = ", ".join(f"{k} {v:.2f}s" for k, v in rec.step_seconds.items())
    arcsec = _fmt(rec.fwhm_arcsec, ".2f", '"')
    return [
        f"{Path(rec.path).name}: {status_text(rec)}",
        f"FWHM {_fmt(rec.fwhm, '.2f', ' px')} ({arcsec}) · "
        f"elongation {_fmt(rec.elongation, '.2f')} · sky {_fmt(rec.sky, '.1f', ' ADU')} · "
        f"stars {rec.nstars} · transparency {_fmt(rec.transparency, '.2f')}",
        f"shift dx {_fmt(rec.dx, '.2f')} dy {_fmt(rec.dy, '.2f')} px · rotation "
        f"{_fmt(rec.rotation, '.3f', ' deg')} · registration rms {_fmt(rec.reg_rms, '.2f', ' px')}",
        f"{rec.kind or '-'} · target {rec.target or '-'} · filter {rec.filter or '-'} · "
        f"{_fmt(rec.exptime, '.1f', ' s')} · {rec.date_obs or '-'}",
        f"{rec.path} · sha256 {rec.sha256[:16] or '-'}",
    ] + ([f"time per step: {steps}"] if steps else [])


class FrameDetailScreen(ModalScreen[None]):
    """All the figures of one frame (Enter on a row); any of escape/enter/q closes it."""

    BINDINGS = [Binding("escape,enter,q", "app.pop_screen", "close")]
    DEFAULT_CSS = """
    FrameDetailScreen { align: center middle; }
    FrameDetailScreen > VerticalScroll { width: 90%; height: auto; max-height: 80%;
        border: thick $primary; background: $surface; padding: 1 2; }
    """

    def __init__(self, rec: FrameRecord) -> None:
        super().__init__()
        self.record = rec

    def compose(self) -> ComposeResult:
        style = ROW_STYLES.get(self.record.status, "")
        with VerticalScroll():
            yield Static(Text("\n".join(frame_details(self.record)), style=style), id="detail-text")


class FrameLog(Vertical):
    """The table of frames plus a one-frame detail panel under it."""

    DEFAULT_CSS = """
    FrameLog { height: 1fr; }
    FrameLog DataTable { height: 1fr; }
    FrameLog #frame-detail { height: auto; max-height: 3; color: $text-muted; padding: 0 1; }
    """

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - Textual's own name
        super().__init__(id=id)
        self.records: dict[str, FrameRecord] = {}
        self._order: dict[str, int] = {}      # row key -> arrival number (sort key, newest on top)
        self._cells: dict[str, tuple[str, ...]] = {}
        self.compact: bool | None = None

    def compose(self) -> ComposeResult:
        table: DataTable = DataTable(cursor_type="row", zebra_stripes=True, id="frames")
        yield table
        yield QuietStatic("", id="frame-detail")

    @property
    def table(self) -> DataTable:
        return self.query_one("#frames", DataTable)

    @property
    def columns(self) -> tuple[Column, ...]:
        return tuple(c for c in COLUMNS if c.compact or not self.compact)

    def on_resize(self) -> None:
        self._set_compact(self.size.width < COMPACT_WIDTH)

    def _set_compact(self, compact: bool) -> None:
        """Switch column sets; the only time rows are rebuilt (a resize, not a new frame)."""
        if compact == self.compact:
            return
        self.compact = compact
        table = self.table
        cursor = self._cursor_key()
        table.clear(columns=True)
        table.add_column("#", key="seq")
        for column in self.columns:
            table.add_column(column.label, key=column.key)
        for key in sorted(self._order, key=self._order.__getitem__):
            self._add_row(key, self.records[key])
        self._sort(cursor, follow=cursor is None)

    def _row_cells(self, rec: FrameRecord) -> tuple[str, ...]:
        return tuple(column.cell(rec) for column in COLUMNS)

    def _styled(self, rec: FrameRecord, column: Column, value: str) -> Text:
        style = ROW_STYLES.get(rec.status, "")
        if column.key == "status" and not style:
            style = STATUS_STYLES.get(rec.status, "")
        return Text(value, style=style)

    def _add_row(self, key: str, rec: FrameRecord) -> None:
        cells = dict(zip((c.key for c in COLUMNS), self._cells[key]))
        self.table.add_row(self._order[key] + 1,
                           *(self._styled(rec, c, cells[c.key]) for c in self.columns), key=key)

    def _cursor_key(self) -> str | None:
        table = self.table
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def _sort(self, cursor: str | None, follow: bool) -> None:
        """Newest first; the cursor stays on its frame, or on the newest one when it was there."""
        table = self.table
        table.sort("seq", reverse=True)
        if table.row_count:
            row = 0 if follow or cursor not in self.records else table.get_row_index(cursor)
            table.move_cursor(row=row, animate=False)

    def update_frames(self, frames: tuple[FrameRecord, ...]) -> None:
        """Add rows for new files and rewrite the cells that changed; nothing else is touched."""
        if self.compact is None:
            self._set_compact(self.size.width < COMPACT_WIDTH)
        table = self.table
        cursor = self._cursor_key()
        follow = cursor is None or table.cursor_row == 0
        added = False
        shown = {c.key for c in self.columns}
        for rec in frames:
            key = row_key(rec)
            cells = self._row_cells(rec)
            old = self._cells.get(key)
            self.records[key] = rec
            self._cells[key] = cells
            if old is None:
                self._order[key] = len(self._order)
                self._add_row(key, rec)
                added = True
            elif old != cells:
                # A new status restyles the whole row (rejected rows are red throughout).
                restyle = old[-1] != cells[-1]
                for column, before, after in zip(COLUMNS, old, cells):
                    if column.key in shown and (restyle or before != after):
                        table.update_cell(key, column.key, self._styled(rec, column, after), update_width=True)
        if added:
            self._sort(cursor, follow)
        self._show_detail()

    def _show_detail(self) -> None:
        key = self._cursor_key()
        rec = self.records.get(key) if key else None
        lines = "\n".join(frame_details(rec)) if rec else ""
        style = ROW_STYLES.get(rec.status, "") if rec else ""
        self.query_one("#frame-detail", QuietStatic).show(Text(lines, style=style), key=(lines, style))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_detail()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        rec = self.records.get(event.row_key.value)
        if rec is not None:
            self.app.push_screen(FrameDetailScreen(rec))
