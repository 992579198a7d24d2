"""Benchmark of the dashboard's responsiveness during a burst of frames (issue 6: keys answer within 100 ms).

The real ``ObserverApp`` runs headless (``App.run_test``) on a real
``observer.service.Service`` watching a folder into which a whole simulated
night (1024 px, 10 frames per filter, two offsets) is moved at once. While the
worker reduces the burst, keys f, r, t are sent every 200 ms and a 50 ms timer
ticks on the UI thread. Figures, in the same run, for the burst and for the
idle dashboard afterwards (same screen content, service idle):

* key -> action: from sending the key to the end of the app's action (state changed);
* key -> screen: from sending the key to the first compositor update after the
  action (the frame that shows it; ``App._display`` is called with the update
  even headless). "(f,r)": every f and r, as first measured; but a key that
  changes nothing (f while the target has one filter, t with one target) has
  no frame of its own, and its figure is only the time to the next screen update
  for another reason (up to the next key, 200 ms, once unchanged widgets stopped
  being repainted with each snapshot). "keys that changed the view": only the
  keys whose action changed the target, filter or raw/stack mode: the figure to judge;
* timer lateness: gap between ticks of a 50 ms ``set_interval`` minus 50 ms.

Keys are sent from a separate thread through the driver's ``send_message``,
as a terminal driver's input thread does, so a stalled UI loop shows in the
latency. ``pilot.press`` cannot time this: after posting the key it waits for
the process to be idle (``textual._wait.wait_for_idle`` compares CPU time with
wall time, up to 1 s, twice), and during a burst the worker thread keeps the
process busy, so each press takes ~2 s whatever the app does; ``--pilot``
shows that.

    /work/venv/bin/python bench/dashboard.py
    /work/venv/bin/python bench/dashboard.py --switch-interval 0.001   # GIL experiment
    /work/venv/bin/python bench/dashboard.py --profile                  # cProfile of the UI thread in the burst
    /work/venv/bin/python bench/dashboard.py --pilot                    # pilot.press timing, for comparison
    /work/venv/bin/python bench/dashboard.py --no-gc-freeze             # as before the gc.freeze() fix
    /work/venv/bin/python bench/dashboard.py --slow                     # what happened while each late key waited

Diagnostics printed after the figures: each screen update's wall and UI-thread
CPU time, the widgets whose drawing costs most, which widgets ask for a layout
pass, every garbage collection (``gc.callbacks``), and a GIL probe thread
(sleeps 5 ms, reports its lateness and the other threads' stacks when late).

Found on the 2-core test machine (2026-11-26): medians are far inside the
target (key -> screen ~5-10 ms), but the tail was not: full (generation 2)
garbage collections, 130-220 ms each with ~300k tracked objects, ran during the
burst (in the worker or the UI thread) and, holding the GIL, stopped the UI;
``--switch-interval 0.001`` did not help. ``ObserverApp`` now freezes the
start-up objects (``gc.freeze()`` at mount): collections median 25-35 ms, max 55-140 ms. What was
left of the tail was the layout pass each new snapshot asked for (Static
``update()`` and the header's sub-title, 30-70 ms CPU for the whole screen)
stretched by sharing the GIL with the reduction.

Then (same day, 4 interleaved runs each of the previous and the new dashboard,
the machine shared with other jobs, load average 2.2-3.6): the labels and the
header now redraw only when their text changes and ask for a layout pass only
when their height changes (``tui.quiet``), the stack panels only when their
previews or titles change, and f repaints only the title row. Layout requests in
a burst (the six most frequent widgets) fell from ~200 to ~53 (23 are the frame
table's, one per new row: its scrollable size changes), layout passes from 75 to
34 (cProfile of the UI thread, one run each), screen updates from ~145 to ~120
and their UI-thread CPU p95 from 27-30 to 23-27 ms; full collections 7 -> 5-6
per burst. The key figures did not move measurably: keys that changed the view,
before: p95 46-58 ms, max 56-118 ms, 2 of 210 over 100 ms; after: p95 33-63 ms,
max 46-127 ms, 2 of 197 over 100 ms (median 4-6 ms both). Their tail is now
mostly CPU and GIL contention with the reduction (and other jobs on the 2 cores)
plus full collections of 15-75 ms, more than the dashboard's own drawing. The
"(f,r)" figure got worse (4-6 of ~45 over 100 ms) only because of keys that
change nothing (f while the target has one filter): with nothing repainted per
snapshot any more, their "next frame" is often the next key's, 200 ms later;
``--slow`` shows it.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from textual import events
from textual._styles_cache import StylesCache
from textual.screen import Screen
from textual.widget import Widget

from observer.config import Settings
from observer.service import Service
from observer.simulator import SimSettings, simulate_night
from tui.app import ObserverApp

KEYS = ("f", "r", "t")
KEY_PERIOD = 0.2
TICK = 0.05
TARGET_MS = 100.0


@dataclass
class Press:
    key: str
    phase: str
    sent: float
    acted: float | None = None
    shown: float | None = None
    changed: bool | None = None     # did the action change what is shown (target, filter, raw/stack)?


@dataclass
class Log:
    """Timestamps collected on the UI thread (and the key sender's)."""

    phase: str = "start"
    presses: list[Press] = field(default_factory=list)
    ticks: list[tuple[str, float]] = field(default_factory=list)
    displays: list[float] = field(default_factory=list)
    snapshots: list[tuple[str, float, float]] = field(default_factory=list)   # (phase, wall, cpu)
    events: list[tuple[float, float, str]] = field(default_factory=list)     # (start, end, what): --slow


class ScreenUpdates:
    """Wall and UI-thread CPU time of each screen update (``Screen._on_timer_update``: layout, render, compose).

    Wall much above CPU means the UI thread was ready but waiting, for the GIL
    or for a core, not that drawing is slow.
    """

    def __init__(self, log: Log) -> None:
        self.log = log
        self.samples: list[tuple[str, float, float]] = []     # (phase, wall, cpu)
        self.widgets: dict[str, list[float]] = {}              # widget class -> CPU per render, in the burst
        self._original = Screen._on_timer_update
        self._render_widget = StylesCache.render_widget
        self._refresh = Widget.refresh
        self.layouts: dict[str, int] = {}                      # widget class -> refresh(layout=True) in the burst

    def __enter__(self) -> ScreenUpdates:
        original, samples, log = self._original, self.samples, self.log

        def timed(screen: Screen) -> None:
            wall, cpu = time.perf_counter(), time.thread_time()
            layout = bool(screen._layout_required)
            original(screen)
            end = time.perf_counter()
            samples.append((log.phase, end - wall, time.thread_time() - cpu))
            log.events.append((wall, end, f"screen update{' with layout' if layout else ''}, "
                                          f"CPU {(time.thread_time() - cpu) * 1000:.0f} ms"))

        render_widget, widgets = self._render_widget, self.widgets

        def timed_render(cache: StylesCache, widget, crop):  # noqa: ANN001, ANN202 - Textual's private API
            cpu = time.thread_time()
            try:
                return render_widget(cache, widget, crop)
            finally:
                if log.phase == "burst":
                    widgets.setdefault(type(widget).__name__, []).append(time.thread_time() - cpu)

        refresh, layouts = self._refresh, self.layouts

        def counted_refresh(widget: Widget, *regions, layout: bool = False, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if layout and log.phase == "burst":
                name = type(widget).__name__ + (f"#{widget.id}" if widget.id else "")
                layouts[name] = layouts.get(name, 0) + 1
            return refresh(widget, *regions, layout=layout, **kwargs)

        Screen._on_timer_update = timed
        StylesCache.render_widget = timed_render
        Widget.refresh = counted_refresh
        return self

    def __exit__(self, *_: object) -> None:
        Screen._on_timer_update = self._original
        StylesCache.render_widget = self._render_widget
        Widget.refresh = self._refresh

    def print_widgets(self, top: int = 6) -> None:
        """The widgets whose drawing cost the UI thread most CPU during the burst."""
        ranked = sorted(self.widgets.items(), key=lambda item: -sum(item[1]))[:top]
        for name, cpus in ranked:
            print(f"    {name:<16} total {sum(cpus):6.2f} s CPU  {stats(cpus)}")
        ranked_layouts = sorted(self.layouts.items(), key=lambda item: -item[1])[:top]
        print("  layout requests (refresh(layout=True)) in the burst: "
              + ", ".join(f"{name} {n}" for name, n in ranked_layouts))


class TimedApp(ObserverApp):
    """The dashboard with timestamps on its key actions and screen updates; nothing else differs."""

    def __init__(self, service: Service, log: Log, save_dir: Path) -> None:
        super().__init__(service, save_dir=save_dir)
        self.timing = log
        self.waiting: list[Press] = []        # sent, action not yet run (in key order)

    def refresh_snapshot(self) -> None:
        """The handler of a new snapshot (rows, target, previews): its wall and CPU time are logged."""
        wall, cpu = time.perf_counter(), time.thread_time()
        super().refresh_snapshot()
        end = time.perf_counter()
        self.timing.snapshots.append((self.timing.phase, end - wall, time.thread_time() - cpu))
        self.timing.events.append((wall, end, f"snapshot handler, CPU {(time.thread_time() - cpu) * 1000:.0f} ms"))

    def _shown_state(self) -> tuple[str | None, str | None, str]:
        """What the keys change: a key that leaves it alone (f with one filter, t with one target) shows nothing."""
        return self.target_name, self.filter_name, self.view_mode

    def _acted(self, before: tuple[str | None, str | None, str]) -> None:
        if self.waiting:
            press = self.waiting.pop(0)
            press.acted = time.perf_counter()
            press.changed = self._shown_state() != before

    def action_next_filter(self) -> None:
        before = self._shown_state()
        super().action_next_filter()
        self._acted(before)

    def action_toggle_raw(self) -> None:
        before = self._shown_state()
        super().action_toggle_raw()
        self._acted(before)

    def action_next_target(self) -> None:
        before = self._shown_state()
        super().action_next_target()
        self._acted(before)

    def _display(self, screen, renderable) -> None:  # noqa: ANN001 - Textual's private signature
        if renderable is not None and not self._batch_count:
            now = time.perf_counter()
            self.timing.displays.append(now)
            for press in self.timing.presses[-3:]:
                if press.acted is not None and press.shown is None:
                    press.shown = now
        super()._display(screen, renderable)


@dataclass
class Stall:
    """A long gap seen by the GIL probe, with what the other threads were doing when it woke."""

    at: float
    gap: float
    stacks: dict[str, list[str]]


def gil_probe(log: Log, stalls: list[Stall], stop: threading.Event, period: float = 0.005,
              threshold: float = 0.08) -> list[tuple[str, float]]:
    """A thread that only sleeps ``period`` and looks at the clock: a late wake-up means the GIL was held
    for long (a pure-Python thread gives it up every switch interval, so a long gap is one C call or a
    garbage collection that keeps it). When it wakes late it records the other threads' stacks: the holder
    has usually just left what held it, so its innermost frames hint at the culprit (a poor man's py-spy;
    weakref callbacks there point at a collection)."""
    me = threading.get_ident()
    names = {}
    lateness = []
    last = time.perf_counter()
    while not stop.is_set():
        time.sleep(period)
        now = time.perf_counter()
        gap = now - last - period
        lateness.append((log.phase, max(0.0, gap)))
        if gap > threshold and log.phase == "burst":
            if len(names) != threading.active_count():
                names = {t.ident: t.name for t in threading.enumerate()}
            stacks = {names.get(ident, str(ident)): [f"{Path(f.filename).name}:{f.lineno} {f.name}"
                                                     for f in traceback.extract_stack(frame)[-6:]]
                      for ident, frame in sys._current_frames().items() if ident != me}
            stalls.append(Stall(now, gap, stacks))
        last = time.perf_counter()
    return lateness


class GcPauses:
    """Every garbage collection's duration, generation and thread (``gc.callbacks``).

    A collection holds the GIL from start to end, so a long one stops every
    thread, the UI's included, wherever it happened to be triggered.
    """

    def __init__(self, log: Log) -> None:
        self.log = log
        self.pauses: list[tuple[str, int, str, float]] = []     # (phase, generation, thread, seconds)
        self._started = 0.0

    def __call__(self, event: str, info: dict) -> None:
        if event == "start":
            self._started = time.perf_counter()
        else:
            end = time.perf_counter()
            thread = threading.current_thread().name
            self.pauses.append((self.log.phase, info["generation"], thread, end - self._started))
            if info["generation"] == 2:
                self.log.events.append((self._started, end, f"gen 2 collection in {thread}"))

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *_: object) -> None:
        gc.callbacks.remove(self)

    def print(self, phase: str) -> None:
        for generation in (0, 1, 2):
            pauses = [p for ph, g, _, p in self.pauses if ph == phase and g == generation]
            threads = sorted({t for ph, g, t, _ in self.pauses if ph == phase and g == generation})
            print(f"    gen {generation} {stats(pauses)}  in {', '.join(threads) or '-'}")


def object_census(top: int) -> str:
    """The most common types among the objects the collector tracks (what a full collection walks)."""
    counts: dict[str, int] = {}
    objects = gc.get_objects()
    for obj in objects:
        name = f"{type(obj).__module__}.{type(obj).__qualname__}"
        counts[name] = counts.get(name, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: -item[1])[:top]
    return f"  tracked objects after the burst: {len(objects)} (frozen {gc.get_freeze_count()}); most common:\n" + \
        "\n".join(f"    {n:8d} {name}" for name, n in ranked)


def simulate(root: Path, size: int, frames: int) -> list[Path]:
    src = root / f"night{size}x{frames}"
    if not src.is_dir():
        simulate_night(src, SimSettings(size=size, frames=frames, cadence=0.0, fill_seconds=0.0),
                       truth_path=root / f"truth{size}x{frames}.ecsv")
    return sorted(src.glob("*.fits"))


def move_in_at_once(files: list[Path], camdir: Path) -> None:
    """Copy to a staging folder beside the camera folder, then rename all in: the burst lands at once."""
    staging = camdir.parent / "staging"
    staging.mkdir()
    for path in files:
        shutil.copyfile(path, staging / path.name)
    for path in files:
        os.replace(staging / path.name, camdir / path.name)


def key_sender(app: TimedApp, log: Log, stop: threading.Event) -> None:
    """Send f, r, t in turn every KEY_PERIOD from this thread, as a terminal driver's input thread would."""
    index = 0
    while not stop.wait(KEY_PERIOD):
        press = Press(KEYS[index % len(KEYS)], log.phase, time.perf_counter())
        index += 1
        log.presses.append(press)
        app.waiting.append(press)         # before the key is sent: its action pops it (keys are handled in order)
        app._driver.send_message(events.Key(press.key, press.key))


async def pilot_presses(pilot, app: TimedApp, log: Log, done) -> list[float]:  # noqa: ANN001
    """--pilot: press keys with pilot.press + pilot.pause during the burst; the seconds each took."""
    took = []
    index = 0
    while not done():
        press = Press(KEYS[index % len(KEYS)], log.phase, time.perf_counter())
        index += 1
        log.presses.append(press)
        app.waiting.append(press)
        await pilot.press(press.key)
        await pilot.pause()
        took.append(time.perf_counter() - press.sent)
    return took


def stats(values: list[float]) -> str:
    if not values:
        return "n=0"
    ms = sorted(v * 1000.0 for v in values)
    p95 = ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]
    return (f"n={len(ms):3d}  median {statistics.median(ms):7.1f} ms  p95 {p95:7.1f} ms  max {ms[-1]:7.1f} ms"
            f"  over {TARGET_MS:.0f} ms: {sum(v > TARGET_MS for v in ms)}")


def report(log: Log, phase: str) -> dict[str, list[float]]:
    presses = [p for p in log.presses if p.phase == phase]
    acted = [p.acted - p.sent for p in presses if p.acted is not None]
    shown_fr = [p.shown - p.sent for p in presses if p.shown is not None and p.key != "t"]
    shown = [p.shown - p.sent for p in presses if p.shown is not None and p.changed]
    ticks = [t for ph, t in log.ticks if ph == phase]
    late = [max(0.0, b - a - TICK) for a, b in zip(ticks, ticks[1:])]
    print(f"  {phase}:")
    print(f"    key -> action      {stats(acted)}   (no action yet: {sum(p.acted is None for p in presses)})")
    print(f"    key -> screen (f,r) {stats(shown_fr)}")
    print(f"    key -> screen, keys that changed the view {stats(shown)}   "
          f"(no change: {sum(p.changed is False for p in presses)})")
    print(f"    50 ms timer late   {stats(late)}")
    return {"acted": acted, "shown": shown, "late": late}


async def run(args: argparse.Namespace, files: list[Path], root: Path) -> None:
    camdir, outdir = root / "camera", root / "reduced"
    camdir.mkdir()
    log = Log()
    service = Service(camdir, outdir, Settings())
    app = TimedApp(service, log, outdir)
    service.start()
    stop = threading.Event()
    sender = threading.Thread(target=key_sender, args=(app, log, stop), name="keys", daemon=True)
    profiler = cProfile.Profile() if args.profile else None
    pilot_took: list[float] = []
    stalls: list[Stall] = []
    probe_lateness: list[tuple[str, float]] = []
    probe = threading.Thread(target=lambda: probe_lateness.extend(gil_probe(log, stalls, stop)),
                             name="gil-probe", daemon=True)
    probe.start()

    def burst_done() -> bool:
        return len(service.snapshot().frames) >= len(files) and service.idle

    updates = ScreenUpdates(log)
    pauses = GcPauses(log)
    TimedApp.FREEZE_GC_ON_MOUNT = not args.no_gc_freeze
    if args.gc_threshold:
        gc.set_threshold(*args.gc_threshold)
    try:
        with updates, pauses:
            async with app.run_test(size=(160, 48)) as pilot:
                await pilot.pause()
                app.set_interval(TICK, lambda: log.ticks.append((log.phase, time.perf_counter())))
                log.phase = "burst"
                started = time.perf_counter()
                move_in_at_once(files, camdir)
                moved = time.perf_counter()
                if profiler is not None:
                    profiler.enable()
                if args.pilot:
                    pilot_took = await pilot_presses(pilot, app, log, burst_done)
                else:
                    sender.start()
                while not burst_done():
                    await asyncio.sleep(0.1)
                if profiler is not None:
                    profiler.disable()
                burst = time.perf_counter() - started
                if args.objects:
                    census = object_census(args.objects)
                log.phase = "idle"
                if args.pilot:
                    sender.start()
                await asyncio.sleep(args.idle_seconds)
                stop.set()
                sender.join()
                probe.join()
                await pilot.pause()
    finally:
        stop.set()
        service.stop()
    print(f"burst: {len(files)} files of {args.size} px moved in at once ({moved - started:.1f} s to copy), "
          f"reduced with products current after {burst:.1f} s; keys {'/'.join(KEYS)} every "
          f"{KEY_PERIOD * 1000:.0f} ms from a thread; switch interval {sys.getswitchinterval() * 1000:.1f} ms; "
          f"{len(log.displays)} screen updates")
    if args.pilot:
        print(f"  pilot.press + pilot.pause during the burst: {stats(pilot_took)}")
    burst_figures = report(log, "burst")
    idle_figures = report(log, "idle")
    for what in ("acted", "shown", "late"):
        if burst_figures[what] and idle_figures[what]:
            ratio = statistics.median(burst_figures[what]) / max(statistics.median(idle_figures[what]), 1e-6)
            print(f"  burst/idle median ratio, {what}: {ratio:.1f}")
    for phase in ("burst", "idle"):
        print(f"  screen update wall, {phase}: {stats([w for ph, w, _ in updates.samples if ph == phase])}")
        print(f"  screen update CPU,  {phase}: {stats([c for ph, _, c in updates.samples if ph == phase])}")
    for phase in ("burst", "idle"):
        print(f"  new-snapshot handler wall, {phase}: {stats([w for ph, w, _ in log.snapshots if ph == phase])}")
        print(f"  new-snapshot handler CPU,  {phase}: {stats([c for ph, _, c in log.snapshots if ph == phase])}")
    print("  widget drawing (StylesCache.render_widget) CPU on the UI thread in the burst:")
    updates.print_widgets()
    if args.objects:
        print(census)
    print(f"  garbage collections (thresholds {gc.get_threshold()}, frozen objects {gc.get_freeze_count()}):")
    for phase in ("burst", "idle"):
        print(f"  {phase}:")
        pauses.print(phase)
    for phase in ("burst", "idle"):
        print(f"  GIL probe (5 ms sleeps) late, {phase}: {stats([g for ph, g in probe_lateness if ph == phase])}")
    if stalls:
        print(f"  the {min(args.stalls, len(stalls))} longest GIL stalls in the burst (of {len(stalls)} over 80 ms),"
              f" with the stacks of the other threads when the probe woke:")
        for stall in sorted(stalls, key=lambda st: -st.gap)[:args.stalls]:
            print(f"    {stall.gap * 1000:6.0f} ms at +{stall.at - started:5.1f} s")
            for name, frames in stall.stacks.items():
                if name.startswith(("observer-worker", "MainThread", "asyncio_")) or args.all_threads:
                    print(f"      {name}: " + " < ".join(reversed(frames)))
    if args.slow:
        print_slow_presses(log, started)
    if profiler is not None:
        out = io.StringIO()
        for order in ("cumulative", "tottime"):
            pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(args.profile_lines)
        print("UI-thread profile during the burst:\n" + out.getvalue())


def print_slow_presses(log: Log, started: float) -> None:
    """--slow: for each key shown after more than TARGET_MS, what the UI thread did (and the collector) meanwhile."""
    for press in log.presses:
        if press.shown is None or press.shown - press.sent <= TARGET_MS / 1000:
            continue
        print(f"  {press.key} at +{press.sent - started:5.2f} s: acted after "
              f"{(press.acted - press.sent) * 1000:.0f} ms, shown after {(press.shown - press.sent) * 1000:.0f} ms"
              f"{'' if press.changed else ' (changed nothing: no frame of its own)'}")
        for start, end, what in sorted(log.events):
            if end > press.sent and start < press.shown:
                print(f"      +{(start - press.sent) * 1000:6.0f} ms .. +{(end - press.sent) * 1000:6.0f} ms  {what}")
        ticks = [t for _, t in log.ticks if press.sent < t < press.shown]
        print("      50 ms ticks at " + " ".join(f"+{(t - press.sent) * 1000:.0f}" for t in ticks) + " ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--frames", type=int, default=10, help="science frames per filter")
    parser.add_argument("--idle-seconds", type=float, default=4.0, help="keys sent after the burst (baseline)")
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="sys.setswitchinterval (s) for the run: how long a thread may hold the GIL")
    parser.add_argument("--profile", action="store_true", help="cProfile the UI thread during the burst")
    parser.add_argument("--profile-lines", type=int, default=25)
    parser.add_argument("--no-gc-freeze", action="store_true",
                        help="without the app's gc.freeze() at mount (as before the fix), for comparison")
    parser.add_argument("--gc-threshold", type=int, nargs=3, default=None, help="gc.set_threshold for the run")
    parser.add_argument("--objects", type=int, default=0, help="census of the N commonest tracked types")
    parser.add_argument("--stalls", type=int, default=6, help="longest GIL stalls to show with stacks")
    parser.add_argument("--all-threads", action="store_true",
                        help="stacks of every thread at a stall (default: worker, UI, preview-drawing threads)")
    parser.add_argument("--slow", action="store_true",
                        help="for each key shown late: the screen updates, snapshots and full collections meanwhile")
    parser.add_argument("--pilot", action="store_true", help="also time pilot.press + pilot.pause in a burst")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "observer-bench-dashboard",
                        help="where the simulated night is kept between runs")
    args = parser.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    args.cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    files = simulate(args.cache, args.size, args.frames)
    print(f"simulated night: {len(files)} files ({time.perf_counter() - t0:.1f} s, cached in {args.cache})")
    with tempfile.TemporaryDirectory(prefix="observer-bench-dashboard-") as tmp:
        asyncio.run(run(args, files, Path(tmp)))


if __name__ == "__main__":
    main()
