"""The dashboard in a real terminal: ``observer watch`` and ``observer demo`` inside tmux.

The pilot tests (test_tui.py) drive the app headless; these run the installed
command in a tmux pane, as an observer would over ssh, while a simulated
camera writes frames, and read the screen back with ``capture-pane -p`` (plain
text: colours are dropped, the characters stay). What they check is what the
observer sees: frame rows with their FWHM against the simulator's truth, a
rejected frame with its reason, an HR diagram drawn in braille/dots with its
axis label, a half-block stack, the footer's keys at 80 x 24, and that ``q``
ends the process cleanly with the products written (and, for the demo, its
temporary folder removed).

Each tmux server runs on its own socket (``tmux -L``), so the tests never touch
an observer's own tmux sessions, and the server is killed in a ``finally``.
Textual draws through stderr, so nothing of the command's output is redirected;
the shell in the pane writes the command's exit code to a file afterwards.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from astropy.table import Table

from observer.simulator import SimSettings, simulate_night

TMUX = shutil.which("tmux")
if TMUX is None:
    pytest.skip("tmux is not installed", allow_module_level=True)

OBSERVER = str(Path(sys.executable).with_name("observer"))
SIM = SimSettings(size=512, frames=4, cadence=1.0, fill_seconds=0.3)
FILTERS = SIM.filters
SCIENCE = [f"{SIM.target}_{f}_{n:03d}.fits" for f in FILTERS for n in range(1, SIM.frames + 1)]
UPPER_HALF = "\u2580"
BRAILLE = re.compile("[\u2801-\u28ff]")
#: Generous: the service on 2 cores also reduces while the screen is polled.
SCREEN_TIMEOUT = 45.0
QUIT_TIMEOUT = 10.0


class TmuxPane:
    """One command in a detached tmux session on a private server; see the module docstring."""

    def __init__(self, command: list[str], cols: int, rows: int, workdir: Path,
                 env: dict[str, str] | None = None) -> None:
        tag = uuid.uuid4().hex[:8]
        self.socket = f"observer-test-{os.getpid()}-{tag}"
        self.session = f"observer-{tag}"
        self.exit_file = workdir / f"exit-{tag}"
        settings = {"TERM": "xterm-256color", "COLUMNS": str(cols), "LINES": str(rows), **(env or {})}
        env_args = " ".join(shlex.quote(f"{k}={v}") for k, v in settings.items())
        # On failure the pane stays a while so the screen (a traceback) can still be captured.
        shell = (f"env {env_args} {shlex.join(command)}; code=$?; echo $code > {shlex.quote(str(self.exit_file))}; "
                 f"[ $code -eq 0 ] || sleep 30")
        self._tmux("new-session", "-d", "-x", str(cols), "-y", str(rows), "-s", self.session, shell)

    def _tmux(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([TMUX, "-L", self.socket, *args], capture_output=True, text=True, check=check,
                              timeout=10)

    def capture(self) -> str:
        """The visible screen as plain text ('' once the session has ended)."""
        result = self._tmux("capture-pane", "-p", "-t", self.session, check=False)
        return result.stdout if result.returncode == 0 else ""

    def alive(self) -> bool:
        return self._tmux("has-session", "-t", self.session, check=False).returncode == 0

    def send(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", self.session, *keys)

    def wait_screen(self, ready: Callable[[str], bool], timeout: float = SCREEN_TIMEOUT) -> str:
        """Poll the screen until ``ready(screen)``; fail with the last screen shown."""
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.capture() or screen
            if ready(screen):
                return screen
            time.sleep(0.5)
        pytest.fail(f"the screen did not get there within {timeout:.0f} s; last screen:\n{screen}")

    def quit(self) -> int:
        """Press q; the process must end (session gone) within QUIT_TIMEOUT. Returns its exit code."""
        self.send("q")
        deadline = time.monotonic() + QUIT_TIMEOUT
        while time.monotonic() < deadline and not self.exit_file.exists():
            time.sleep(0.1)
        screen = self.capture()
        assert self.exit_file.exists(), f"q did not end the process within {QUIT_TIMEOUT:.0f} s:\n{screen}"
        code = int(self.exit_file.read_text().strip() or -1)
        assert code == 0, f"exit code {code}; screen:\n{screen}"
        while time.monotonic() < deadline and self.alive():
            time.sleep(0.1)
        assert not self.alive(), "the tmux session outlived the process"
        return code

    def kill(self) -> None:
        """Kill this private tmux server (and with it anything the test left running in it)."""
        self._tmux("kill-server", check=False)


def row_of(screen: str, name: str) -> str:
    """The frame-log line of one file ('' if not on screen)."""
    return next((line for line in screen.splitlines() if f" {name} " in line), "")


def frames_settled(screen: str) -> bool:
    """Every science file has a row with a final status."""
    return all(re.search(r"\b(stacked|rejected)\b", row_of(screen, name)) for name in SCIENCE)


def hr_drawn(screen: str) -> bool:
    """The HR diagram: its title with a star count, the colour axis label, and points."""
    return (re.search(r"\b\d+ stars\b", screen) is not None and "blue - green" in screen
            and len(BRAILLE.findall(screen)) + screen.count("\u2022") >= 20)


def stack_drawn(screen: str) -> bool:
    return screen.count(UPPER_HALF) >= 100 and re.search(r"blue: \d+ stacked", screen) is not None


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, threading.Thread]]:
    """A camera folder filled by a simulated camera at a live cadence (on a thread), and the truth path."""
    root = tmp_path_factory.mktemp("tmux-night")
    camdir, truth = root / "camera", root / "truth.ecsv"
    camdir.mkdir()
    camera = threading.Thread(target=simulate_night, args=(camdir, SIM), kwargs={"truth_path": truth},
                              name="test-camera", daemon=True)
    yield camdir, truth, camera
    if camera.ident is not None:
        camera.join()


def test_watch_in_tmux_shows_rows_hr_diagram_and_stack_while_frames_arrive(night, tmp_path):
    camdir, truth, camera = night
    outdir = tmp_path / "reduced"
    pane = TmuxPane([OBSERVER, "watch", str(camdir), "--out", str(outdir)], 160, 48, tmp_path)
    try:
        camera.start()     # frames arrive while the dashboard runs
        screen = pane.wait_screen(lambda s: frames_settled(s) and hr_drawn(s) and stack_drawn(s))
        camera.join(timeout=30)
        frames = Table.read(truth.with_name(truth.stem + "_frames.ecsv"), format="ascii.ecsv")
        scale = SIM.plate_scale_arcsec
        n_stacked = {f: 0 for f in FILTERS}
        for row in frames[frames["kind"] == "science"]:
            line = row_of(screen, row["file"])
            match = re.search(rf"science\s+{SIM.target}\s+{row['filter']}\s+\d+s\s+([\d.]+)(\"|px)", line)
            assert match, f"no FWHM in the row of {row['file']}: {line!r}"
            if row["trailed"]:
                assert re.search(r"rejected: trailed: elongation [\d.]+ > [\d.]+", line), line
                continue
            if row["clouded"]:
                assert re.search(r"rejected: transparency [\d.]+ < [\d.]+", line), line
            else:
                assert re.search(r"\bstacked\b", line), line
                n_stacked[row["filter"]] += 1
            shown_px = float(match.group(1)) / (scale if match.group(2) == '"' else 1.0)
            # The row rounds arcsec to 0.1" (~0.11 px); the measured FWHM is within ~10% of the truth.
            assert shown_px == pytest.approx(row["fwhm_px"], rel=0.12, abs=0.06), line
        for filt, n in n_stacked.items():
            assert f"{filt}: {n} stacked" in screen, screen
        assert "offset" in row_of(screen, f"{SIM.target}_offset_blue.fits")
        pane.quit()
    finally:
        pane.kill()
    products = Table.read(outdir / "frames.ecsv", format="ascii.ecsv")
    assert sorted(Path(p).name for p in products["path"]) == sorted(frames["file"])
    assert (products["status"] == "stacked").sum() == sum(n_stacked.values())


def test_watch_fits_80x24_with_the_keys_in_the_footer(night, tmp_path):
    camdir, _, camera = night
    if not camera.is_alive() and camera.ident is None:   # run on its own: fill the folder first
        camera.start()
    camera.join()
    pane = TmuxPane([OBSERVER, "watch", str(camdir), "--out", str(tmp_path / "reduced")], 80, 24, tmp_path)
    keys = ("q quit", "t next target", "f next filter", "r raw/stack", "s save PNGs", "? help")
    try:
        screen = pane.wait_screen(lambda s: re.search(r"\bstacked\b", s) is not None and hr_drawn(s)
                                  and stack_drawn(s) and keys[0] in s)
        lines = screen.splitlines()
        assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
        assert "observer" in lines[0]                                 # header
        footer = lines[-1]
        for key in keys:
            assert key in footer, f"{key!r} not in the footer {footer!r}"
        assert "Traceback" not in screen and "Error" not in screen
        assert f"{SIM.target}_offset_green.fits" in screen            # the newest file's row
        pane.quit()
    finally:
        pane.kill()


def test_demo_in_tmux_shows_rows_and_q_removes_its_folder(tmp_path):
    # The demo makes its folder with tempfile.mkdtemp: a private TMPDIR tells which one is its own.
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    pane = TmuxPane([OBSERVER, "demo", "--size", "256", "--cadence", "1", "--frames", "3"], 160, 48, tmp_path,
                    env={"TMPDIR": str(tmpdir)})
    try:
        screen = pane.wait_screen(lambda s: re.search(r"M35_blue_001\.fits.*\bstacked\b", s) is not None, 40.0)
        mine = list(tmpdir.glob("observer-demo-*"))
        assert len(mine) == 1, mine
        folder = mine[0]
        assert (folder / "camera" / "M35_blue_001.fits").exists()
        assert re.search(r"M35_blue_001\.fits\s+science\s+M35\s+blue\s+\d+s\s+[\d.]+(\"|px)",
                         row_of(screen, "M35_blue_001.fits"))
        pane.quit()
        assert not folder.exists(), f"the demo left {folder} behind"
    finally:
        pane.kill()
