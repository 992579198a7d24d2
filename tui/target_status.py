"""Target status: the verdict (keep going / done), per-filter depth and progress, warnings.

The verdict is the observer's main question at the telescope ("can I move on?"),
so it comes first and in colour; the per-filter lines and the limiting-magnitude
sparklines say why.
"""

from __future__ import annotations

import math

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Label, Sparkline

from observer.state import TargetState, left_out_text
from tui.hr_diagram import age_text
from tui.quiet import QuietStatic


def _num(value: float, fmt: str, missing: str = "-") -> str:
    return format(value, fmt) if value is not None and math.isfinite(value) else missing


def filter_rows(target: TargetState) -> tuple[tuple[str, ...], ...]:
    """Per-filter progress as text cells: filter, frames, rejected, exposure, 5-sigma depth, SNR, offset frame.

    Plain strings, so the panel can tell whether anything changed before building the table.
    """
    return tuple((status.filter, str(status.n_stacked), str(status.n_rejected),
                  f"{_num(status.total_exptime, '.0f')}s", _num(status.limiting_mag, ".2f"),
                  _num(status.snr_at_mag, ".0f"), "yes" if status.has_offset else "no")
                 for status in target.filters.values())


def filter_table(rows: tuple[tuple[str, ...], ...], completion_mag: float) -> Table:
    """The rows of ``filter_rows`` as a compact table (rejections in red, a missing offset in yellow)."""
    table = Table(box=None, padding=(0, 1, 0, 0), show_edge=False, header_style="bold", expand=False,
                  caption=f"lim: 5\u03c3 limit; SNR at mag {_num(completion_mag, '.1f')}",
                  caption_justify="left", caption_style="dim")
    for name, justify in (("", "left"), ("n", "right"), ("rej", "right"), ("exp", "right"),
                          ("lim", "right"), ("SNR", "right"), ("off", "left")):
        table.add_column(name, justify=justify, no_wrap=True)
    for name, stacked, rejected, exptime, lim, snr, offset in rows:
        table.add_row(name, stacked, Text(rejected, style="red" if rejected != "0" else ""), exptime, lim, snr,
                      Text(offset, style="green" if offset == "yes" else "yellow"))
    return table


class TargetStatus(VerticalScroll):
    """Verdict, age, per-filter status with limiting-magnitude history, and warnings for one target."""

    DEFAULT_CSS = """
    TargetStatus { height: 1fr; padding: 0 1; }
    TargetStatus #verdict { text-style: bold; color: $text; background: $warning 30%; padding: 0 1; }
    TargetStatus #verdict.done { background: $success; color: $background; }
    TargetStatus #histories { height: auto; }
    TargetStatus .filter-row { height: 1; }
    TargetStatus .filter-row Label { width: 12; }
    TargetStatus .filter-row Sparkline { width: 1fr; }
    TargetStatus #warnings { color: $warning; }
    """

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - Textual's own name
        super().__init__(id=id)
        self.target_state: TargetState | None = None
        self._sparklines: dict[str, Sparkline] = {}
        self._history_rows: dict[str, Horizontal] = {}

    def compose(self) -> ComposeResult:
        yield QuietStatic("waiting for frames", id="verdict")
        yield QuietStatic("", id="age")  # hidden until there is an age
        yield QuietStatic("", id="warnings")  # before the figures: these need the observer (80x24 shows few lines)
        yield QuietStatic("", id="filters")
        yield Vertical(id="histories")

    def show(self, target: TargetState | None) -> None:
        """Update the labels in place, each only if its text changed (no remounting except for a new filter)."""
        if target is self.target_state:
            return
        self.target_state = target
        verdict = self.query_one("#verdict", QuietStatic)
        if target is None:
            verdict.show("no target yet")
            verdict.set_class(False, "done")
            return
        verdict.show(Text(f"{target.name}: {target.verdict}"))
        verdict.set_class(target.done, "done")
        self._show_optional("#age", f"{age_text(target.age)} from {target.age.n_stars} stars "
                                    f"(left out: {left_out_text(target.age.left_out)})" if target.age
                            else f"no age: {target.age_reason}" if target.age_reason else "")
        rows = filter_rows(target)
        self.query_one("#filters", QuietStatic).show(filter_table(rows, target.completion_mag),
                                                      key=(rows, target.completion_mag))
        self._show_histories(target)
        self._show_optional("#warnings", "\n".join(f"! {w}" for w in target.warnings))

    def _show_optional(self, selector: str, text: str) -> None:
        """A label shown only when it has something to say."""
        label = self.query_one(selector, QuietStatic)
        label.show(text)
        if label.display != bool(text):
            label.display = bool(text)

    def _show_histories(self, target: TargetState) -> None:
        """A sparkline per filter of the 5-sigma limit after each stacked frame (deeper = higher bar)."""
        box = self.query_one("#histories", Vertical)
        for name, status in target.filters.items():
            spark = self._sparklines.get(name)
            if spark is None:
                spark = Sparkline([], summary_function=max)
                row = Horizontal(Label(f"{name} lim"), spark, classes="filter-row")
                self._sparklines[name], self._history_rows[name] = spark, row
                box.mount(row)
            history = [m for m in status.limiting_mag_history if math.isfinite(m)]
            spark.data = history
        for name, row in self._history_rows.items():
            row.display = name in target.filters
