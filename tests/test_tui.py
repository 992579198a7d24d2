"""The dashboard driven by Textual's pilot.

``SimSource`` publishes real ``observer.state`` snapshots built from a small
simulated star field and main sequence, frame by frame, so each test can check
what the widgets show after each step (rows, styles, plot points, verdict, keys).
pytest-asyncio is not installed: each test runs its scenario with asyncio.run.
"""

from __future__ import annotations

import asyncio
import re
import dataclasses
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from rich.text import Text
from textual.geometry import Region
from textual.widgets import DataTable, Sparkline, Static

from observer.state import AgeEstimate, CmdData, FilterStatus, FrameRecord, Snapshot, TargetState
from tui.app import HelpScreen, ObserverApp
from tui.frame_log import FrameDetailScreen, FrameLog
from tui.hr_diagram import HRDiagram, age_text
from tui.image_view import IMAGE_ENV, StackImages, graphics_protocol
from tui.render import UPPER_HALF, display_grey, fit_size, half_block_rows, image_rows, resample, stretch
from tui.stack_view import StackView
from tui.target_status import TargetStatus

FILTERS = ("blue", "green")
MIN_FRAMES = 3


def star_field(rng: np.random.Generator, size: int = 96, nstars: int = 40, noise: float = 5.0) -> np.ndarray:
    """A small sky image: flat sky with noise plus Gaussian stars (what a stack preview looks like)."""
    yy, xx = np.mgrid[:size, :size]
    image = rng.normal(100.0, noise, (size, size))
    for x, y, flux in zip(rng.uniform(5, size - 5, nstars), rng.uniform(5, size - 5, nstars),
                          rng.uniform(200, 5000, nstars)):
        image += flux / (2 * np.pi * 1.5 ** 2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5 ** 2))
    return image.astype(np.float32)


def main_sequence(rng: np.random.Generator, n: int) -> CmdData:
    mag = rng.uniform(12.0, 19.0, n)
    color = 0.1 * (mag - 12.0) + rng.normal(0, 0.03, n)
    saturated = mag < 12.3
    return CmdData(color=color, mag=mag, color_err=np.full(n, 0.02), mag_err=np.full(n, 0.02),
                   saturated=saturated, color_label="blue - green", mag_label="green")


class SimSource:
    """A stand-in for the service: publishes a snapshot per 'processed' frame, calls subscribers."""

    def __init__(self, outdir: Path, targets: tuple[str, ...] = ("M35", "NGC2682")) -> None:
        self.outdir = outdir
        self.targets = targets
        self.rng = np.random.default_rng(3)
        self.frames: list[FrameRecord] = []
        self.version = 0
        self.lock = threading.Lock()
        self.callbacks = []
        self.saved_for: list[str] = []
        self._snapshot = self._build()

    def subscribe(self, callback) -> None:
        self.callbacks.append(callback)

    def snapshot(self) -> Snapshot:
        with self.lock:
            return self._snapshot

    def save_pngs(self, target: str) -> list[Path]:
        """The previews and the CMD through the product figure writers (the service saves full stacks)."""
        from observer.figures import plot_cmd, plot_stack

        self.saved_for.append(target)
        state = self.snapshot().targets[target]
        folder = self.outdir / "png"
        paths = [plot_stack(s.stack_preview, folder / f"{target}_{name}_stack.png", title=name)
                 for name, s in state.filters.items() if s.stack_preview is not None]
        if state.cmd is not None:
            plot_cmd(state.cmd, folder / f"{target}_cmd.png")
            paths.append(folder / f"{target}_cmd.png")
        return paths

    def add_frame(self, target: str, filt: str, status: str = "stacked", reason: str = "",
                  fwhm_arcsec: float = float("nan")) -> FrameRecord:
        n = len(self.frames)
        rec = FrameRecord(path=f"/cam/{target}_{filt}_{n:03d}.fits", sha256=f"{n:064x}", kind="science",
                          target=target, filter=filt, date_obs=f"2026-11-26T21:{n:02d}:00.0", exptime=45.0,
                          status=status, reason=reason, fwhm=3.1 + 0.01 * n, elongation=1.05, sky=812.0,
                          nstars=150, transparency=0.97, fwhm_arcsec=fwhm_arcsec, seen_at=1.0e9 + n)
        self.frames.append(rec)
        self._publish()
        return rec

    def replace_frame(self, index: int, **changes) -> None:
        rec = self.frames[index]
        self.frames[index] = FrameRecord(**{**rec.__dict__, **changes})
        self._publish()

    def _publish(self) -> None:
        with self.lock:
            self.version += 1
            self._snapshot = self._build()
        for callback in self.callbacks:
            callback()

    def _target_state(self, name: str) -> TargetState:
        filters = {}
        for filt in FILTERS:
            mine = [f for f in self.frames if f.target == name and f.filter == filt]
            stacked = sum(f.status == "stacked" for f in mine)
            lim = tuple(18.0 + 1.25 * np.log10(k) for k in range(1, stacked + 1))
            filters[filt] = FilterStatus(
                filter=filt, n_stacked=stacked, n_rejected=sum(f.status == "rejected" for f in mine),
                total_exptime=45.0 * stacked, has_offset=filt == "blue",
                limiting_mag=lim[-1] if lim else float("nan"), limiting_mag_history=lim,
                snr_at_mag=10.0 * np.sqrt(stacked), stack_preview=star_field(self.rng) if stacked else None,
                raw_preview=star_field(self.rng, noise=30.0) if mine else None)
        per_filter = min(s.n_stacked for s in filters.values())
        done = per_filter >= MIN_FRAMES
        cmd = main_sequence(self.rng, 40 * per_filter) if per_filter else None
        age = None
        if per_filter >= 2:
            iso_mag = np.linspace(10.0, 20.0, 50)
            age = AgeEstimate(log_age=8.18, log_age_low=8.08, log_age_high=8.28, age_myr=151.0,
                              distance_modulus=10.3, ebv=0.2, n_stars=cmd.n,
                              isochrone_color=0.1 * (iso_mag - 12.0), isochrone_mag=iso_mag,
                              turnoff=(0.05, 11.5), left_out=(("saturated", 3), ("blended", 7)))
        verdict = ("done: move to the next target" if done
                   else f"keep going: about {MIN_FRAMES - per_filter} more frames per filter")
        return TargetState(name=name, filters=filters, cmd=cmd, age=age, done=done, verdict=verdict,
                           frames_needed=None if done else MIN_FRAMES - per_filter,
                           warnings=("no offset frame for green yet",), completion_mag=18.5,
                           age_reason="12 usable stars, too few for an age fit" if per_filter == 1 else "")

    def _build(self) -> Snapshot:
        names = [t for t in self.targets if any(f.target == t for f in self.frames)]
        return Snapshot(version=self.version, frames=tuple(self.frames),
                        targets={t: self._target_state(t) for t in names}, outdir=str(self.outdir),
                        queue_length=2, busy=True)


async def wait_drawn(app: ObserverApp, pilot) -> None:
    """Wait until the stack panels drawn off the UI thread are in (drawing is requested by laying the widget out)."""
    stacks = app.query_one(StackView)
    stacks.text()
    while stacks.pending:
        await app.workers.wait_for_complete()
        await pilot.pause()
    stacks.text()


def highlighted_titles(stacks: StackView) -> list[str]:
    """The panel titles drawn in reverse video on the first content row, as the screen gets it (the
    widget's line cache, which a partial refresh must have updated)."""
    top, left = stacks.content_offset.y, stacks.content_offset.x
    strip = stacks.render_lines(Region(left, top, stacks.size.width, 1))[0]
    return [seg.text.strip() for seg in strip if seg.style is not None and seg.style.reverse and seg.text.strip()]


def plain(renderable) -> str:
    """What a rich renderable shows, as plain text."""
    console = Console(width=100, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def cell_text(table: DataTable, row: int, column: str) -> Text:
    key = table.coordinate_to_cell_key((row, 0)).row_key
    value = table.get_cell(key, column)
    return value if isinstance(value, Text) else Text(str(value))


# --- rendering helpers ---------------------------------------------------------------------------

def test_stretch_uses_zscale_and_full_range():
    image = star_field(np.random.default_rng(1))
    grey = stretch(image)
    assert grey.dtype == np.uint8 and grey.shape == image.shape
    # zscale around the sky: the sky sits low but above black, stars saturate white
    assert 10 < np.median(grey) < 200
    assert grey.max() == 255 and grey.min() == 0
    assert stretch(np.full((4, 4), np.nan)).max() == 0


def test_fit_size_keeps_aspect_with_square_half_block_pixels():
    assert fit_size((100, 100), 40, 10) == (20, 20)   # limited by rows: 10 cells = 20 pixel rows
    assert fit_size((100, 200), 40, 30) == (20, 40)   # limited by columns
    rows, cols = fit_size((77, 50), 33, 9)
    assert rows % 2 == 0 and cols <= 33 and rows <= 18


def test_resample_block_mean_preserves_flux_and_shape():
    image = np.arange(64, dtype=np.float32).reshape(8, 8)
    small = resample(image, 4, 2)
    assert small.shape == (4, 2)
    assert small[0, 0] == pytest.approx(image[:2, :4].mean())
    assert small.mean() == pytest.approx(image.mean())
    big = resample(image, 16, 16)
    assert big.shape == (16, 16) and big[1, 1] == image[0, 0]


def test_half_block_colours_upper_and_lower_pixel():
    grey = np.array([[0, 255, 255], [255, 255, 255]], dtype=np.uint8)
    (row,) = half_block_rows(grey, cols=5)
    assert "".join(seg.text for seg in row) == " " + UPPER_HALF * 3 + " "    # centred in 5 cells
    first, rest = row[1], row[2]
    assert first.style.color.triplet == (0, 0, 0) and first.style.bgcolor.triplet == (255, 255, 255)
    assert rest.text == UPPER_HALF * 2                                       # equal cells share a segment
    assert rest.style.color.triplet == (255, 255, 255)
    rows = image_rows(np.zeros((10, 10), np.uint8), cols=20, rows=5)
    assert len(rows) == 5 and all(sum(seg.cell_length for seg in r) == 20 for r in rows)


def test_hr_limits_ignore_outliers_but_keep_the_turnoff():
    from tui.hr_diagram import _span

    mags = np.concatenate([np.linspace(12, 20, 999), [35.0]])     # one wild magnitude
    low, high = _span(mags, 0.0)
    assert 11.9 < low and high < 21
    low, high = _span(mags, 0.0, also=10.0)                          # turn-off above the stars
    assert low == 10.0


def test_hr_repaint_keeps_bright_stars_at_the_top():
    """A repaint with no new data draws the same diagram (plotext used to flip the reversed axis each build)."""
    from textual.app import App

    class One(App):
        def compose(self):
            yield HRDiagram(id="hr")

    async def scenario():
        async with One().run_test(size=(90, 30)) as pilot:
            hr = pilot.app.query_one(HRDiagram)
            source = SimSource(Path("."))
            for filt in FILTERS:
                source.add_frame("M35", filt)
            hr.show(source.snapshot().targets["M35"])
            await pilot.pause()
            first, second = str(hr.render()), str(hr.render())
            return first, second

    first, second = asyncio.run(scenario())
    assert first == second
    labels = [float(t) for t in re.findall(r"(?m)^\s*(\d+\.\d+)\s*[┤│]", first)]
    assert len(labels) >= 2 and labels == sorted(labels)          # magnitudes grow downwards


def test_age_text_reads_like_the_brief():
    age = AgeEstimate(8.1761, 8.0792, 8.2788, 150.0, 10.3, 0.2, 100, np.zeros(2), np.zeros(2), (0.0, 0.0))
    assert age_text(age) == "age 150 Myr (120-190)"
    old = AgeEstimate(9.0, 8.95, 9.05, 1000.0, 10.3, 0.2, 100, np.zeros(2), np.zeros(2), (0.0, 0.0))
    assert age_text(old) == "age 1.0 Gyr (0.9-1.1)"


# --- the app ----------------------------------------------------------------------------------

def test_rows_appear_newest_on_top_and_rejected_stand_out(tmp_path):
    source = SimSource(tmp_path)

    async def scenario():
        app = ObserverApp(source)
        async with app.run_test(size=(160, 48)) as pilot:
            table = app.query_one(FrameLog).table
            assert table.row_count == 0
            source.add_frame("M35", "blue")
            source.add_frame("M35", "green", fwhm_arcsec=2.04)
            await pilot.pause()
            assert table.row_count == 2
            assert cell_text(table, 0, "file").plain == "M35_green_001.fits"   # newest on top
            assert cell_text(table, 0, "fwhm").plain == '2.0"'                 # arcsec when known
            assert cell_text(table, 1, "fwhm").plain == "3.1px"                # else pixels
            assert cell_text(table, 0, "time").plain == "21:01:00"
            source.add_frame("M35", "blue", status="rejected", reason="trailed: elongation 1.9 > 1.35")
            await pilot.pause()
            assert table.row_count == 3
            status = cell_text(table, 0, "status")
            assert status.plain == "rejected: trailed: elongation 1.9 > 1.35"
            assert "red" in str(status.style)
            assert "red" in str(cell_text(table, 0, "file").style)   # the whole row stands out
            assert "red" not in str(cell_text(table, 1, "file").style)
            detail = app.query_one("#frame-detail", Static)
            assert "trailed" in str(detail.render())
            # a changed record updates its row in place (same row count, same key)
            source.replace_frame(0, status="quarantined", reason="unreadable header")
            await pilot.pause()
            assert table.row_count == 3
            assert cell_text(table, 2, "status").plain == "quarantined: unreadable header"
            assert "yellow" in str(cell_text(table, 2, "status").style)

    asyncio.run(scenario())


def test_cursor_stays_on_its_frame_when_rows_arrive(tmp_path):
    source = SimSource(tmp_path)
    for _ in range(3):
        source.add_frame("M35", "blue")

    async def scenario():
        app = ObserverApp(source)
        async with app.run_test(size=(160, 48)) as pilot:
            table = app.query_one(FrameLog).table
            await pilot.press("down")
            assert cell_text(table, table.cursor_row, "file").plain == "M35_blue_001.fits"
            source.add_frame("M35", "green")
            await pilot.pause()
            assert table.row_count == 4
            assert cell_text(table, table.cursor_row, "file").plain == "M35_blue_001.fits"
            await pilot.press("enter")
            assert isinstance(app.screen, FrameDetailScreen)
            assert app.screen.record.path.endswith("M35_blue_001.fits")
            await pilot.press("escape")
            assert not isinstance(app.screen, FrameDetailScreen)

    asyncio.run(scenario())


def test_hr_diagram_grows_and_verdict_turns_done(tmp_path):
    source = SimSource(tmp_path)

    async def scenario():
        app = ObserverApp(source)
        async with app.run_test(size=(160, 48)) as pilot:
            hr = app.query_one(HRDiagram)
            status = app.query_one(TargetStatus)
            verdict = status.query_one("#verdict", Static)
            counts = []
            for _ in range(MIN_FRAMES):
                source.add_frame("M35", "blue")
                source.add_frame("M35", "green")
                await pilot.pause()
                counts.append(hr.n_points)
                if len(counts) == 1:        # before its first age the panel says why there is none
                    assert "no age: 12 usable stars" in str(status.query_one("#age", Static).render())
                if not app.target.done:
                    assert "keep going" in str(verdict.render())
                    assert not verdict.has_class("done")
            assert counts == [40, 80, 120]
            assert hr.title_text == "M35: 120 stars, age 151 Myr (120-191)"
            assert str(status.query_one("#age", Static).render()) == \
                "age 151 Myr (120-191) from 120 stars (left out: 3 saturated, 7 blended)"
            assert "done: move to the next target" in str(verdict.render())
            assert verdict.has_class("done")
            table = plain(status.query_one("#filters", Static).content)
            blue_row = next(line for line in table.splitlines() if line.startswith("blue"))
            assert blue_row.split()[1:4] == ["3", "0", "135s"]
            assert "SNR at mag 18.5" in table
            sparks = list(status.query(Sparkline))
            assert len(sparks) == 2 and len(sparks[0].data) == MIN_FRAMES
            assert "no offset frame for green" in str(status.query_one("#warnings", Static).render())
            # the plot itself was built with the data (plotext canvas has the title and labels)
            canvas = hr.plt.build()
            assert "120 stars" in canvas and "blue - green" in canvas

    asyncio.run(scenario())


def test_keys_cycle_targets_filters_view_and_save(tmp_path):
    source = SimSource(tmp_path)
    for target in ("M35", "NGC2682"):
        for filt in FILTERS:
            source.add_frame(target, filt)

    async def scenario():
        app = ObserverApp(source)
        async with app.run_test(size=(160, 48)) as pilot:
            stacks = app.query_one(StackView)
            assert app.target_name == "NGC2682"          # follows the newest frame's target
            assert stacks.drawn_filters == ["blue", "green"]
            await pilot.press("t")
            assert app.target_name == "M35" and stacks.target_state.name == "M35"
            await pilot.press("t")
            assert app.target_name == "NGC2682"
            source.add_frame("M35", "blue")               # pinned: a new M35 frame does not switch
            await pilot.pause()
            assert app.target_name == "NGC2682"
            assert app.filter_name == "blue"
            await wait_drawn(app, pilot)
            assert highlighted_titles(stacks) == ["blue: 1 stacked"]
            await pilot.press("f")
            assert app.filter_name == "green" and stacks.filter_name == "green"
            await pilot.pause()
            assert highlighted_titles(stacks) == ["green: 1 stacked"]     # the title row was repainted
            await pilot.press("f")
            assert app.filter_name == "blue"
            assert stacks.mode == "stack"
            await pilot.press("r")
            assert stacks.mode == "raw" and app.view_mode == "raw"
            await wait_drawn(app, pilot)
            raw = stacks.text()
            assert "last raw" in raw and UPPER_HALF in raw
            await pilot.press("r")
            assert stacks.mode == "stack"
            await pilot.press("s")
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert source.saved_for == ["NGC2682"]
            assert app.saved_paths and all(p.exists() and p.stat().st_size > 0 for p in app.saved_paths)
            assert {p.name for p in app.saved_paths} == {"NGC2682_blue_stack.png", "NGC2682_green_stack.png",
                                                         "NGC2682_cmd.png"}
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            assert "next target" in str(app.screen.query_one("#help-text", Static).render())
            await pilot.press("escape")
            assert not isinstance(app.screen, HelpScreen)
            await pilot.press("q")
            await pilot.pause()
            assert not app.is_running

    asyncio.run(scenario())


def test_stack_view_draws_half_blocks_and_fits_small_terminals(tmp_path, monkeypatch):
    monkeypatch.setenv(IMAGE_ENV, "halfblock")
    source = SimSource(tmp_path)
    for filt in FILTERS:
        source.add_frame("M35", filt)

    async def scenario(size):
        app = ObserverApp(source)
        async with app.run_test(size=size) as pilot:
            stacks = app.query_one(StackView)
            assert app.query_one("#stacks") is stacks and app.image_protocol is None
            await wait_drawn(app, pilot)
            text = stacks.text()
            assert UPPER_HALF in text
            assert all(len(line) == stacks.size.width for line in text.split("\n"))
            log = app.query_one(FrameLog)
            hr = app.query_one(HRDiagram)
            return stacks.size, hr.size, log.table.size, log.compact, stacks.drawn_filters

    stack_size, hr_size, table_size, compact, drawn = asyncio.run(scenario((80, 24)))
    assert compact and stack_size.height >= 5 and hr_size.height >= 5 and table_size.height >= 3
    assert drawn == ["blue"]                      # too narrow for both: the selected filter only
    stack_size, hr_size, table_size, compact, drawn = asyncio.run(scenario((200, 60)))
    assert not compact and stack_size.width >= 60 and stack_size.height >= 25 and table_size.height >= 15
    assert drawn == ["blue", "green"]


def test_graphics_protocol_follows_the_environment(monkeypatch):
    from textual_image import renderable

    for value, expected in (("halfblock", None), ("kitty", "kitty"), ("SIXEL", "sixel")):
        monkeypatch.setenv(IMAGE_ENV, value)
        assert graphics_protocol() == expected, value
    # auto (also unset, empty or unknown): what textual-image detected when it was imported
    for detected, expected in ((renderable.TGPImage, "kitty"), (renderable.SixelImage, "sixel"),
                               (renderable.HalfcellImage, None), (renderable.UnicodeImage, None)):
        monkeypatch.setattr(renderable, "Image", detected)
        for value in ("auto", "", "bogus"):
            monkeypatch.setenv(IMAGE_ENV, value)
            assert graphics_protocol() == expected, (detected, value)
        monkeypatch.delenv(IMAGE_ENV)
        assert graphics_protocol() == expected


def marked_preview(rng: np.random.Generator) -> np.ndarray:
    """A 60 x 90 (rows x columns) sky whose array rows 0-9 are bright: they must end up at the bottom."""
    image = rng.normal(100.0, 5.0, (60, 90)).astype(np.float32)
    image[:10] += 5000.0
    return image


async def wait_images(app: ObserverApp, pilot) -> None:
    """Wait until the previews converted off the UI thread are handed to the image widgets."""
    stacks = app.query_one(StackImages)
    await pilot.pause()
    while stacks.pending:
        await app.workers.wait_for_complete()
        await pilot.pause()


@pytest.mark.parametrize("protocol", ["kitty", "sixel"])
def test_stack_images_with_a_graphics_protocol(tmp_path, monkeypatch, protocol):
    from textual_image.renderable import tgp
    from textual_image.widget import SixelImage, TGPImage

    sent: list[dict] = []       # what would go to a Kitty terminal (headless: not to pytest's stdout)
    monkeypatch.setattr(tgp, "_send_tgp_message", lambda **message: sent.append(message))
    monkeypatch.setenv(IMAGE_ENV, protocol)
    source = SimSource(tmp_path)
    for filt in FILTERS:
        source.add_frame("M35", filt)
    snap = source.snapshot()
    target = snap.targets["M35"]
    marked = marked_preview(np.random.default_rng(5))
    blue = dataclasses.replace(target.filters["blue"], stack_preview=marked)
    target = dataclasses.replace(target, filters={**target.filters, "blue": blue})
    source._snapshot = dataclasses.replace(snap, version=snap.version + 1, targets={"M35": target})

    async def scenario(size):
        app = ObserverApp(source)
        async with app.run_test(size=size) as pilot:
            assert app.image_protocol == protocol
            stacks = app.query_one("#stacks")
            assert isinstance(stacks, StackImages) and not app.query(StackView)
            await wait_images(app, pilot)
            panel = stacks.panels["blue"]
            assert isinstance(panel.image_widget, TGPImage if protocol == "kitty" else SixelImage)
            image = panel.image_widget.image
            assert image is panel.image and image.mode == "L" and image.size == (90, 60)   # (width, height)
            pixels = np.asarray(image)
            assert np.array_equal(pixels, display_grey(marked))        # the half-block view's stretch
            assert pixels[-10:].mean() > 250 and pixels[:-10].mean() < 200    # array row 0 at the bottom
            assert panel.image_widget.size.width > 0 and panel.image_widget.size.height > 0
            assert "blue: 1 stacked" in str(panel.heading.render())
            drawn = stacks.drawn_filters
            await pilot.press("r")
            await wait_images(app, pilot)
            assert stacks.mode == "raw"
            raw = target.filters["blue"].raw_preview
            assert np.array_equal(np.asarray(panel.image_widget.image), display_grey(raw))
            return drawn

    assert asyncio.run(scenario((160, 48))) == ["blue", "green"]
    assert asyncio.run(scenario((80, 24))) == ["blue"]            # too narrow for both
    if protocol == "kitty":                                      # the images went out with placements
        assert any(m.get("f") == 100 and m.get("payload") for m in sent)
        assert any(m.get("a") == "p" for m in sent)


def test_save_without_a_saving_source_says_so_and_writes_nothing(tmp_path):
    class PlainSource:
        def __init__(self, inner: SimSource) -> None:
            self.inner = inner

        def snapshot(self) -> Snapshot:
            return self.inner.snapshot()

    inner = SimSource(tmp_path)
    for filt in FILTERS:
        inner.add_frame("M35", filt)

    async def scenario():
        app = ObserverApp(PlainSource(inner))
        async with app.run_test(size=(120, 40)) as pilot:
            assert app.query_one(FrameLog).table.row_count == 2     # polled, no subscribe
            inner.add_frame("M35", "blue")
            await pilot.pause(0.7)                                  # one poll period
            assert app.query_one(FrameLog).table.row_count == 3
            await pilot.press("s")
            await app.workers.wait_for_complete()
            await pilot.pause()
            return app.saved_paths, [n.message for n in app._notifications]

    paths, notes = asyncio.run(scenario())
    assert paths == []
    assert any("cannot save PNGs" in note for note in notes)
    assert not any(tmp_path.rglob("*.png"))


# --- the app on the real service, fed simulated frames one by one ---------------------------------

async def wait_for(pilot, condition, timeout: float = 90.0) -> None:
    """Let the app run until condition() holds (a generous cap so a broken pipeline fails, not hangs)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "the service did not get there"
        await pilot.pause(0.1)


def test_dashboard_on_real_service_and_simulated_night(tmp_path):
    import os

    from observer.config import Settings
    from observer.service import Service
    from observer.simulator import SimSettings, simulate_night

    staging, camdir, outdir = tmp_path / "staging", tmp_path / "cam", tmp_path / "out"
    camdir.mkdir()
    # 200 field stars, most of them faint: the CMD grows as the stack deepens (with 60, the first catalogue
    # already held nearly every star once saturated stars' neighbours were found, 88 then 89, 90, 90).
    truth = simulate_night(staging, SimSettings(size=256, frames=4, n_members=150, n_field=200, fill_seconds=0.0),
                           truth_path=tmp_path / "truth.ecsv")
    settings = Settings()
    settings.completion.min_frames = 2
    settings.completion.target_snr = 3.0
    settings.service.stable_seconds = 0.2
    settings.service.product_throttle_seconds = 0.0     # a catalogue after every frame: the CMD grows visibly
    settings.age.enabled = False                        # the age (throttled to one fit per 20 s) is not shown here
    service = Service(camdir, outdir, settings)
    seen: list[tuple[int, int, str]] = []               # (rows, HR points, verdict) after each file

    async def scenario():
        app = ObserverApp(service)
        async with app.run_test(size=(160, 48)) as pilot:
            table = app.query_one(FrameLog).table
            hr = app.query_one(HRDiagram)
            verdict = app.query_one("#verdict", Static)
            service.start()
            try:
                for count, path in enumerate(truth.files, start=1):
                    os.replace(path, camdir / path.name)    # the camera's file appears complete
                    # ... and its measurement is applied (the CMD grows visibly, whatever the machine's load)
                    await wait_for(pilot, lambda: table.row_count >= count and app.snapshot is not None
                                   and not app.snapshot.busy and not service.measurements.busy
                                   and app.snapshot.version == service.snapshot().version)
                    await pilot.pause(0.2)                  # the panels redraw from that snapshot
                    seen.append((table.row_count, hr.n_points, str(verdict.render())))
                rejected = [r for r in app.snapshot.frames if r.status == "rejected"]
                assert rejected, "the simulated trailed / clouded frames should be rejected"
                for rec in rejected:
                    row = table.get_row_index(f"{rec.path}|{rec.sha256}")
                    status = cell_text(table, row, "status")
                    assert status.plain == f"rejected: {rec.reason}" and rec.reason
                    assert "red" in str(status.style)
                fwhm = cell_text(table, 0, "fwhm").plain
                assert fwhm.endswith('"') or fwhm.endswith("px") or fwhm == "-"
                await pilot.press("f")
                assert app.filter_name == list(app.target.filters)[1]
                await pilot.press("r")
                assert app.query_one(StackView).mode == "raw"
                await wait_drawn(app, pilot)
                assert UPPER_HALF in app.query_one(StackView).text()
                await pilot.press("s")
                await app.workers.wait_for_complete()
                await pilot.pause()
                assert app.saved_paths and all(p.exists() and p.suffix == ".png" for p in app.saved_paths)
                await pilot.press("t")
                assert app.target_name == "M35"             # the only target: t stays on it
                await pilot.press("q")
                await pilot.pause()
                assert not app.is_running
            finally:
                service.stop()

    asyncio.run(scenario())
    rows = [s[0] for s in seen]
    assert rows == list(range(1, len(truth.files) + 1))      # one new row per file, as it is processed
    points = [s[1] for s in seen]
    assert points == sorted(points) and points[-1] > 0 and len(set(p for p in points if p)) >= 2
    assert "keep going" in seen[0][2]
    assert "done" in seen[-1][2]


def test_service_messages_and_snapshot_errors_are_shown_once(tmp_path):
    source = SimSource(tmp_path)
    source.add_frame("M35", "blue")
    good = source.snapshot()
    source._snapshot = Snapshot(**{**good.__dict__, "version": good.version + 1,
                                   "messages": ("disk space low in the output folder",)})
    failing = {"on": False}
    real_snapshot = source.snapshot

    def snapshot() -> Snapshot:
        if failing["on"]:
            raise OSError("ledger locked")
        return real_snapshot()

    source.snapshot = snapshot
    notes: list[tuple[str, str]] = []

    class RecordingApp(ObserverApp):
        def notify(self, message, *, severity="information", **kwargs):
            notes.append((message, severity))
            super().notify(message, severity=severity, **kwargs)

    async def scenario():
        app = RecordingApp(source)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause(1.2)                          # a few polls: the message is not repeated
            failing["on"] = True
            await pilot.pause(1.2)
            assert app.is_running and app.query_one(FrameLog).table.row_count == 1

    asyncio.run(scenario())
    assert notes.count(("disk space low in the output folder", "warning")) == 1
    assert notes.count(("cannot read the service state: ledger locked", "error")) == 1
