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
from textual.widgets import Label, Sparkline, Static

from observer.state import TargetState
from tui.hr_diagram import age_text


def _num(value: float, fmt: str, missing: str = "-") -> str:
    return format(value, fmt) if value is not None and math.isfinite(value) else missing


def filter_table(target: TargetState) -> Table:
    """Per-filter progress as a compact table: frames, exposure, 5-sigma depth, SNR, offset frame."""
    table = Table(box=None, padding=(0, 1, 0, 0), show_edge=False, header_style="bold", expand=False,
                  caption=f"lim: 5\u03c3 limit; SNR at mag {_num(target.completion_mag, '.1f')}",
                  caption_justify="left", caption_style="dim")
    for name, justify in (("", "left"), ("n", "right"), ("rej", "right"), ("exp", "right"),
                          ("lim", "right"), ("SNR", "right"), ("off", "left")):
        table.add_column(name, justify=justify, no_wrap=True)
    for status in target.filters.values():
        table.add_row(
            status.filter, str(status.n_stacked),
            Text(str(status.n_rejected), style="red" if status.n_rejected else ""),
            f"{_num(status.total_exptime, '.0f')}s", _num(status.limiting_mag, ".2f"),
            _num(status.snr_at_mag, ".0f"),
            Text("yes", style="green") if status.has_offset else Text("no", style="yellow"))
    return table


class TargetStatus(VerticalScroll):
    """Verdict, age, per-filter status with limiting-magnitude history, and warnings for one target."""

    DEFAULT_CSS = """
    TargetStatus { height: 1fr; padding: 0 1; }
    TargetStatus #verdict { text-style: bold; color: $text; background: $warning 30%; padding: 0 1; }
    TargetStatus #verdict.done { background: $success; color: $background; }
    TargetStatus #histories { height: auto; }
    TargetStatus .filter-row { height: 1; }
    TargetStatus .filter-row Label { width: 8; }
    TargetStatus .filter-row Sparkline { width: 1fr; }
    TargetStatus #warnings { color: $warning; }
    """

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - Textual's own name
        super().__init__(id=id)
        self.target_state: TargetState | None = None
        self._sparklines: dict[str, Sparkline] = {}
        self._history_rows: dict[str, Horizontal] = {}

    def compose(self) -> ComposeResult:
        yield Static("waiting for frames", id="verdict")
        yield Static("", id="age")  # hidden until there is an age
        yield Static("", id="warnings")  # before the figures: these need the observer (and 80x24 shows few lines)
        yield Static("", id="filters")
        yield Vertical(id="histories")

    def show(self, target: TargetState | None) -> None:
        """Update the labels in place (no remounting except when a new filter appears)."""
        if target is self.target_state:
            return
        self.target_state = target
        verdict = self.query_one("#verdict", Static)
        if target is None:
            verdict.update("no target yet")
            verdict.set_class(False, "done")
            return
        verdict.update(Text(f"{target.name}: {target.verdict}"))
        verdict.set_class(target.done, "done")
        age = self.query_one("#age", Static)
        age.update(age_text(target.age) if target.age else "")
        age.display = target.age is not None
        self.query_one("#filters", Static).update(filter_table(target))
        self._show_histories(target)
        warnings = self.query_one("#warnings", Static)
        warnings.update("\n".join(f"! {w}" for w in target.warnings))
        warnings.display = bool(target.warnings)

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
