"""``observer watch --web``: the dashboard in headless Chromium, fed frames live.

The page draws the terminal on a canvas (xterm.js), so its text is not in the
DOM: an init script records what the page receives over its websocket (the
served dashboard's screen updates) and the test reads the text from that.
Keys go to the page as a person types them. Screenshots are saved beside the
test's files (and to ``$OBSERVER_SCREENSHOTS`` if set, to look at).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from astropy.io import fits

from observer.simulator import SimSettings, simulate_night
from observer.state import Snapshot
from observer.web import PublishedSnapshot, SnapshotPublisher, parse_address

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
#: Generous limits for a loaded 2-core machine; they bound waits, they assert no speed.
WAIT_SECONDS = 240

RECORD_SOCKET = """
window.__screen = [];
const Original = window.WebSocket;
window.WebSocket = class extends Original {
  constructor(...args) {
    super(...args);
    this.addEventListener("message", (event) => {
      const data = event.data;
      if (typeof data === "string") window.__screen.push(data);
      else if (data instanceof ArrayBuffer) window.__screen.push(new TextDecoder().decode(data));
      else data.text().then((text) => window.__screen.push(text));
    });
  }
};
"""
ESCAPES = re.compile(r"\x1b(\[[0-9;?<>=]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[()][A-Z0-9]|[=>78MDEc])")


class FakeService:
    """What the publisher needs of the service: its output folder, snapshots and save_pngs."""

    def __init__(self, outdir: Path) -> None:
        self.outdir = outdir
        self.version = 1
        self.saved: list[str] = []

    def snapshot(self) -> Snapshot:
        return Snapshot(version=self.version, frames=(), targets={}, outdir=str(self.outdir))

    def save_pngs(self, target: str) -> list[Path]:
        self.saved.append(target)
        return [self.outdir / target / "cmd.png"]


def test_published_snapshot_follows_the_service(tmp_path):
    service = FakeService(tmp_path)
    view = PublishedSnapshot(tmp_path)
    with pytest.raises(RuntimeError, match="no service publishes"):
        view.snapshot()
    publisher = SnapshotPublisher(service, interval=0.05)
    publisher.start()
    try:
        assert view.snapshot().version == 1
        service.version = 2
        _wait("version 2", lambda: view.snapshot().version == 2, 60)
        assert view.save_pngs("M35") == [tmp_path / "M35" / "cmd.png"]
        assert service.saved == ["M35"]
    finally:
        publisher.stop()
    with pytest.raises(RuntimeError, match="no service publishes"):
        view.snapshot()


def test_parse_address():
    assert parse_address("8000") == ("127.0.0.1", 8000)
    assert parse_address("0.0.0.0:8080") == ("0.0.0.0", 8080)
    with pytest.raises(Exception, match="--web"):
        parse_address("localhost:http")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, condition, seconds: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _screen_text(page, start: int = 0) -> str:
    """What the page received since chunk ``start``, escape sequences removed."""
    return ESCAPES.sub("", "".join(page.evaluate("window.__screen")[start:]))


def _frames_listed(out: Path) -> int:
    try:
        return sum(1 for line in (out / "frames.ecsv").read_text().splitlines()
                   if line and not line.startswith("#")) - 1
    except OSError:
        return 0


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason="needs Debian's chromium (apt-get install chromium)")
def test_dashboard_in_a_browser(tmp_path):
    sync_playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install "
                                          "'.[test]'); it drives the system chromium").sync_playwright
    staged = simulate_night(tmp_path / "staged", SimSettings(size=256, frames=2, filters=("blue", "green"),
                                                             short_frames=0, fill_seconds=0.0, bad_frames=False,
                                                             satellite=False), truth_path=tmp_path / "truth.ecsv")
    files = sorted(staged.files, key=lambda p: fits.getheader(p)["DATE-OBS"])
    cam, out = tmp_path / "cam", tmp_path / "out"
    cam.mkdir()
    port = _free_port()
    # No SAMP hub of the machine's: s must say there is none.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SAMP_HUB": f"std-lockurl:{(tmp_path / 'no.lock').as_uri()}"}
    service = subprocess.Popen([sys.executable, "-m", "observer.cli", "watch", str(cam), "--out", str(out),
                                "--web", f"127.0.0.1:{port}"], env=env, cwd=tmp_path,
                               stdout=open(tmp_path / "watch.out", "w"), stderr=subprocess.STDOUT)
    shots = [tmp_path]
    if os.environ.get("OBSERVER_SCREENSHOTS"):
        shots.append(Path(os.environ["OBSERVER_SCREENSHOTS"]))
    try:
        _wait("the server", lambda: _listening(port) or service.poll() is not None)
        assert service.poll() is None, (tmp_path / "watch.out").read_text()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                                 args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1500, "height": 900})
            page.add_init_script(RECORD_SOCKET)
            page.goto(f"http://127.0.0.1:{port}/")
            _wait("the dashboard in the page", lambda: "frames" in _screen_text(page))
            for path in files:                      # the camera writes the night
                shutil.copy(path, cam / path.name)
            _wait("the service to take every frame", lambda: _frames_listed(out) == len(files))
            names = [p.name for p in files]
            _wait("the frame log to list every frame",
                  lambda: all(n in _screen_text(page) for n in names))
            _wait("the HR diagram", lambda: re.search(r"M35: \d+ stars", _screen_text(page)))
            assert (out / "M35" / "stars.reg").is_file()
            page.wait_for_timeout(1500)             # let the last redraw reach the canvas
            for folder in shots:
                page.screenshot(path=str(folder / "web-dashboard.png"))
            assert "stacks" in _screen_text(page) and "last raw frames" not in _screen_text(page)

            # A second browser has its own view of the same service.
            other = browser.new_page(viewport={"width": 1200, "height": 800})
            other.add_init_script(RECORD_SOCKET)
            other.goto(f"http://127.0.0.1:{port}/")
            _wait("the second view", lambda: all(n in _screen_text(other) for n in names))

            # A key press in the first changes its view, not the other's.
            seen, seen_other = len(page.evaluate("window.__screen")), len(other.evaluate("window.__screen"))
            page.locator(".textual-terminal").click()
            page.keyboard.press("r")
            _wait("the raw view after r", lambda: "last raw frames" in _screen_text(page, seen))
            page.wait_for_timeout(1500)
            for folder in shots:
                page.screenshot(path=str(folder / "web-dashboard-raw.png"))
            assert "last raw frames" not in _screen_text(other, seen_other)

            # s: the service saves the PNGs for the browser, then the SAMP broadcast says there is no hub.
            page.keyboard.press("s")
            _wait("the PNGs", lambda: (out / "M35" / "green" / "stack.png").is_file())
            _wait("the SAMP line", lambda: "no SAMP hub is running" in _screen_text(page, seen))

            page.close()                            # a closed tab never stops the service
            other.wait_for_timeout(2000)
            assert service.poll() is None
            browser.close()
    finally:
        service.send_signal(signal.SIGINT)
        try:
            code = service.wait(timeout=120)
        except subprocess.TimeoutExpired:
            service.kill()
            raise
    assert code == 0, (tmp_path / "watch.out").read_text()
    assert not (out / ".web" / "snapshot.pickle").exists()
