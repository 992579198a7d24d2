"""``observer demo``: a simulated night, live, watched by the service with the dashboard.

The one command a new user runs: a camera simulator writes a night into a
temporary camera folder at a live cadence while the real service watches it;
the dashboard (or, with ``--headless``, the log) shows the night as it goes.
Everything is removed again when the demo ends.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path

from observer.config import Settings
from observer.simulator import SimSettings, simulate_night

log = logging.getLogger(__name__)

#: The demo's short frames per filter, after the long ones: the default cluster's turn-off (M35, 150 Myr,
#: V ~ 10-11) saturates in 30-60 s frames, and 1 s frames measure it (the age comes out right).
DEMO_SHORT_FRAMES, DEMO_SHORT_EXPTIME = 3, 1.0


def _simulate_in_background(camdir: Path, truth: Path, sim: SimSettings) -> threading.Thread:
    def run() -> None:
        try:
            simulate_night(camdir, sim, truth_path=truth)
        except Exception:  # noqa: BLE001 - the demo goes on showing what arrived
            log.exception("the simulated camera failed")

    thread = threading.Thread(target=run, name="observer-demo-camera", daemon=True)
    thread.start()
    return thread


def run_demo(settings: Settings, size: int = 1024, cadence: float = 3.0, frames: int = 10,
             headless: bool = False, keep: bool = False, web: str | None = None) -> int:
    """Simulate and watch; returns the exit code. ``headless`` ends when the night is reduced;
    ``web`` (``[HOST:]PORT``) serves the dashboard to browsers until Ctrl-C."""
    from observer.service import Service, run_headless_until

    root = Path(tempfile.mkdtemp(prefix="observer-demo-"))
    camdir, outdir = root / "camera", root / "reduced"
    camdir.mkdir()
    print(f"observer demo: camera folder {camdir}, products in {outdir}", flush=True)
    # The default cluster, with short frames for its bright stars, as an observer takes them.
    sim = SimSettings(size=size, frames=frames, cadence=cadence, fill_seconds=min(1.0, cadence / 3),
                      short_frames=DEMO_SHORT_FRAMES, short_exptime=DEMO_SHORT_EXPTIME)
    try:
        service = Service(camdir, outdir, settings)
        camera = _simulate_in_background(camdir, root / "truth.ecsv", sim)
        if web:
            from observer.web import run_web

            return run_web(service, web)
        if headless:
            return run_headless_until(service, lambda: not camera.is_alive() and service.idle)
        from tui.app import ObserverApp

        service.start()
        try:
            ObserverApp(service).run()
        finally:
            service.stop()
        return 0
    finally:
        if keep:
            print(f"observer demo: kept {root}", flush=True)
        else:
            time.sleep(0.1)
            shutil.rmtree(root, ignore_errors=True)
