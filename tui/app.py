"""The night-time dashboard: frame log, live stacks, HR diagram and target status in one screen.

``ObserverApp`` only reads what the service publishes (``observer.state.Snapshot``)
and never computes science, so the reduction runs the same headless.  The UI
thread does nothing but draw: the service's worker thread tells the app that a
snapshot changed through ``post_message`` (thread-safe and, unlike
``call_from_thread``, never blocks the worker while the UI is busy), and a
0.5 s timer polls ``snapshot()`` for sources that cannot call back (and for
queue-length changes between frames).  Widgets are updated in place only when
the snapshot's version changed, and each only with what changed in it (see
``tui.quiet``: a layout pass of the whole screen per snapshot made keys late).
The stacks are drawn as images when the terminal has a graphics protocol
(``tui.image_view.graphics_protocol``, env ``OBSERVER_IMAGE``), else with half blocks.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any, Protocol, cast

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Grid, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Footer, Static

from observer.state import Kind, Snapshot, TargetState
from tui.frame_log import FrameLog
from tui.hr_diagram import HRDiagram
from tui.image_view import StackImages, graphics_protocol
from tui.quiet import QuietHeader
from tui.stack_view import StackView
from tui.target_status import TargetStatus

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5


class SnapshotSource(Protocol):
    """What the app needs from the service (``subscribe``, ``save_pngs`` and ``send_to_samp`` are optional)."""

    def snapshot(self) -> Snapshot: ...


class SnapshotChanged(Message):
    """Posted (from any thread) when the source has published a new snapshot."""


class HelpScreen(ModalScreen[None]):
    """The keys, as a modal (escape, q or ? closes it)."""

    BINDINGS = [Binding("escape,q,question_mark", "app.pop_screen", "close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 60; height: auto; max-height: 90%;
        border: thick $primary; background: $surface; padding: 1 2; }
    """

    def __init__(self, keys: list[tuple[str, str]]) -> None:
        super().__init__()
        self.keys = keys

    def compose(self) -> ComposeResult:
        text = Text("observer dashboard keys\n\n", style="bold")
        for key, what in self.keys:
            text.append(f"{key:>12}  ", style="bold cyan")
            text.append(f"{what}\n")
        with VerticalScroll():
            yield Static(text, id="help-text")


class ObserverApp(App[None]):
    """Dashboard over a snapshot source (the service, or anything with ``snapshot()``)."""

    TITLE = "observer"
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("t", "next_target", "next target"),
        Binding("f", "next_filter", "next filter"),
        Binding("r", "toggle_raw", "raw/stack"),
        Binding("s", "save_pngs", "save PNGs"),
        Binding("question_mark", "help", "help", key_display="?"),
    ]
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (36, "-tall")]
    CSS = """
    #main { layout: grid; grid-size: 3 2; grid-columns: 3fr 3fr 2fr; grid-rows: 3fr 2fr; }
    #log { column-span: 3; }
    /* Narrow: stacks and HR side by side, status in a strip under them (scrolls if long), log below.
       A fixed strip height: Textual's grid sizes an 'auto' row for one column, ignoring column-span. */
    Screen.-narrow #main { grid-size: 2 3; grid-columns: 1fr 1fr; grid-rows: 3fr 5 2fr; }
    Screen.-narrow.-tall #main { grid-rows: 3fr 9 2fr; }
    Screen.-narrow #status { column-span: 2; }
    Screen.-narrow #status #histories { display: none; }
    Screen.-narrow FooterKey.-command-palette { display: none; }  /* ctrl+p still works; our keys fit 80 */
    Screen.-short #frame-detail { max-height: 1; }
    Screen.-tall #stacks, Screen.-tall #hr, Screen.-tall #status, Screen.-tall #log {
        border: round $panel; border-title-color: $text-muted;
    }
    """

    def __init__(self, source: SnapshotSource) -> None:
        super().__init__()
        self.source = source
        self.snapshot: Snapshot | None = None
        self.target_name: str | None = None
        self.filter_name: str | None = None
        self.view_mode = "stack"               # or "raw"
        self.saved_paths: list[Path] = []
        self._target_pinned = False            # after t, stop following the newest frame's target
        self._messages_seen: set[str] = set()
        # Here, not in compose: textual-image asks the terminal, which only works before Textual runs.
        self.image_protocol = graphics_protocol()

    def compose(self) -> ComposeResult:
        yield QuietHeader()
        with Grid(id="main"):
            if self.image_protocol is None:
                yield StackView(id="stacks")
            else:
                yield StackImages(self.image_protocol, id="stacks")
            yield HRDiagram(id="hr")
            yield TargetStatus(id="status")
            yield FrameLog(id="log")
        yield Footer()

    #: Freeze the objects alive at start-up (imports, the service, the app) out of the garbage collector. A full
    #: collection holds the GIL while it walks every tracked object: measured during a burst (bench/dashboard.py),
    #: 100-220 ms stalls of the whole UI, which missed the 100 ms key target; with the start-up objects frozen,
    #: median ~30 ms (max 55-140 ms).
    FREEZE_GC_ON_MOUNT = True

    def on_mount(self) -> None:
        if self.FREEZE_GC_ON_MOUNT:
            gc.collect()
            gc.freeze()
        titles = {"#stacks": "stacks", "#hr": "HR diagram", "#status": "target", "#log": "frames"}
        for selector, title in titles.items():
            self.query_one(selector).border_title = title
        self.query_one(FrameLog).table.focus()
        subscribe = getattr(self.source, "subscribe", None)
        if callable(subscribe):
            subscribe(self._source_changed)
        self.set_interval(POLL_SECONDS, self.refresh_snapshot)
        self.refresh_snapshot()

    def _source_changed(self, *_: Any) -> None:
        """Called by the service on its worker thread: only queue a message, never touch widgets."""
        self.post_message(SnapshotChanged())

    def on_snapshot_changed(self, _: SnapshotChanged) -> None:
        self.refresh_snapshot()

    def refresh_snapshot(self) -> None:
        """Read the published state and update the widgets if it changed."""
        try:
            snap = self.source.snapshot()
        except Exception as exc:  # keep showing the last state; the observer must still be able to quit
            if self._notify_once(f"cannot read the service state: {exc}", severity="error"):
                log.exception("reading the service's snapshot failed")
            return
        old = self.snapshot
        if old is not None and (snap.version, snap.queue_length, snap.busy) == (
                old.version, old.queue_length, old.busy):
            return
        self.snapshot = snap
        self.query_one(FrameLog).update_frames(snap.frames)
        self._follow_target(snap)
        self._show_target()
        for message in snap.messages:
            self._notify_once(message)

    def _notify_once(self, message: str, severity: str = "warning") -> bool:
        """Toast a service message the first time it appears (the poll would repeat it every 0.5 s)."""
        if message in self._messages_seen:
            return False
        self._messages_seen.add(message)
        self.notify(message, severity=severity, timeout=10)
        return True

    def _follow_target(self, snap: Snapshot) -> None:
        """Show the target being observed (newest science frame) until the observer picks one with t."""
        if self.target_name in snap.targets and self._target_pinned:
            return
        newest = next((f.target for f in reversed(snap.frames)
                       if f.kind == Kind.SCIENCE and f.target in snap.targets), None)
        if newest is None and self.target_name not in snap.targets:
            newest = next(iter(snap.targets), None)
        if newest is not None and newest != self.target_name:
            self.target_name, self.filter_name = newest, None

    @property
    def target(self) -> TargetState | None:
        if self.snapshot is None:
            return None
        return self.snapshot.targets.get(self.target_name or "")

    def _show_target(self) -> None:
        target = self.target
        if target is not None and self.filter_name not in target.filters:
            self.filter_name = next(iter(target.filters), None)
        stacks = cast("StackView | StackImages", self.query_one("#stacks"))
        stacks.show(target, self.filter_name, self.view_mode)
        self.query_one(HRDiagram).show(target)
        self.query_one(TargetStatus).show(target)
        title = (f"{'stacks' if self.view_mode == 'stack' else 'last raw frames'}"
                 f"{' · ' + target.name if target else ''}")
        if stacks.border_title != title:
            stacks.border_title = title
        self._update_header()

    def _update_header(self) -> None:
        snap = self.snapshot
        if snap is None:
            return
        state = f"busy, {snap.queue_length} queued" if snap.busy or snap.queue_length else "idle"
        sub_title = f"{state} · {len(snap.frames)} files · target {self.target_name or '-'} · {snap.outdir}"
        if sub_title != self.sub_title:
            self.sub_title = sub_title

    def action_next_target(self) -> None:
        names = list(self.snapshot.targets) if self.snapshot else []
        if not names:
            self.notify("no targets yet")
            return
        index = names.index(self.target_name) + 1 if self.target_name in names else 0
        self.target_name, self.filter_name = names[index % len(names)], None
        self._target_pinned = True
        self._show_target()

    def action_next_filter(self) -> None:
        target = self.target
        if target is None or not target.filters:
            return
        names = list(target.filters)
        index = names.index(self.filter_name) + 1 if self.filter_name in names else 0
        self.filter_name = names[index % len(names)]
        self._show_target()

    def action_toggle_raw(self) -> None:
        self.view_mode = "raw" if self.view_mode == "stack" else "stack"
        self._show_target()

    def action_save_pngs(self) -> None:
        """Write the snapshot PNGs off the UI thread (matplotlib can take a second)."""
        target = self.target
        if target is None:
            self.notify("no target to save yet", severity="warning")
            return
        self.run_worker(lambda: self._save_pngs(target), thread=True, name="save-pngs", group="save")
        self.notify(f"saving PNGs of {target.name} ...", timeout=2)

    def _save_pngs(self, target: TargetState) -> None:
        save = getattr(self.source, "save_pngs", None)
        if not callable(save):
            self.call_from_thread(self.notify, "this source cannot save PNGs", severity="warning")
            return
        try:
            paths = [Path(p) for p in save(target.name)]
        except Exception as exc:  # the observer must see why, and the dashboard must keep running
            log.exception("saving PNGs of %s failed", target.name)
            self.call_from_thread(self.notify, f"saving PNGs failed: {exc}", severity="error")
            return
        self.call_from_thread(self._saved, paths)
        self._send_to_samp(target)

    def _saved(self, paths: list[Path]) -> None:
        self.saved_paths = paths
        listing = "\n".join(str(p) for p in paths) or "nothing to save yet"
        self.notify(f"saved {len(paths)} PNG(s):\n{listing}", title="snapshot", timeout=8)

    def _send_to_samp(self, target: TargetState) -> None:
        """Broadcast the target's catalogue and stacks to TOPCAT/DS9 (worker thread); one line says how it went."""
        send = getattr(self.source, "send_to_samp", None)
        if not callable(send):
            return
        try:
            line, severity = send(target.name), "information"
        except Exception as exc:  # no hub is the usual case: say so in one line, nothing else
            line, severity = str(exc), "warning"
        self.call_from_thread(self.notify, line, title="SAMP", severity=severity, timeout=6)

    def action_help(self) -> None:
        keys = [(b.key_display or b.key, b.description) for b in self.BINDINGS]
        keys += [("up/down", "move in the frame log"), ("enter", "details of the selected frame")]
        self.push_screen(HelpScreen(keys))
