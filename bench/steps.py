"""Benchmark: the per-frame reduction steps (reduction/: load, calibrate, hot pixels, sky, stars, quality).

Usage:
    python bench/steps.py [--sizes 2048,4096] [--repeat 5] [--keep DIR]

For each size it simulates one science frame and its offset frame with observer's simulator
(uint16 + BZERO, hot pixels, cosmic rays, graded sky, a cluster), then times each step on that
file ``--repeat`` times and prints the median, the read alone (astropy, raw data: the floor), and
the sum of the steps, next to the targets (0.6 s at 2048, 2.5 s at 4096).  For scale it also times
the plain tools the steps replace (3x3 median filter, Background2D, DAOStarFinder) once each.
Registration and stacking are timed by bench/stack.py; bench/reduce.py folds both together.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from astropy.io import fits  # noqa: E402

from observer.simulator import SimSettings, simulate_night  # noqa: E402
from reduction.background import offset_sky_shape, sky_model  # noqa: E402
from reduction.calibration import Masters, apply_calibration  # noqa: E402
from reduction.frames import load_frame  # noqa: E402
from reduction.hotpixels import HotPixelMap, find_hot_pixels, repair_pixels  # noqa: E402
from reduction.quality import detect_stars, measure_quality  # noqa: E402

TARGETS = {2048: 0.6, 4096: 2.5}


class Timer:
    """Median wall and CPU time of each step over ``repeat`` calls.

    CPU time is printed too because this 2-core machine is often shared, which inflates wall time
    but not the process's own CPU time (our steps are single-threaded except BLAS in the sky model).
    """

    def __init__(self, repeat: int) -> None:
        self.repeat = repeat
        self.rows: list[tuple[str, float, float]] = []

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        walls, cpus, out = [], [], None
        for _ in range(self.repeat):
            start, cpu = time.perf_counter(), time.process_time()
            out = fn()
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu)
        self.rows.append((name, statistics.median(walls), statistics.median(cpus)))
        return out

    def get(self, name: str) -> tuple[float, float]:
        return next((w, c) for n, w, c in self.rows if n == name)


def _simulate(size: int, root: Path) -> tuple[Path, Path]:
    settings = SimSettings(size=size, frames=1, filters=("blue",), fill_seconds=0.0, bad_frames=False,
                           satellite=False, n_members=600 * size // 2048, n_field=300 * size // 2048)
    simulate_night(root / "cam", settings, truth_path=root / "truth.ecsv")
    return root / "cam" / "M35_blue_001.fits", root / "cam" / "M35_offset_blue.fits"


PATH_STEPS = ("load_frame (read + float32 + header facts)", "apply_calibration (bias, dark, flat)",
              "hot pixels: find + map update + repair", "sky_model with the offset shape",
              "detect_stars (400 stars, Moffat fits)", "measure_quality")


def bench_size(size: int, repeat: int, root: Path, plain: bool) -> None:
    science, offset = _simulate(size, root)
    timer = Timer(repeat)
    timer("read file alone (fits.getdata: the floor)", lambda: fits.getdata(science))
    frame = timer(PATH_STEPS[0], lambda: load_frame(science))
    data = frame.data
    masters = Masters(bias=np.full(data.shape, 1000.0, np.float32),
                      dark_per_s=np.full(data.shape, 0.05, np.float32),
                      flat=np.ones(data.shape, np.float32))
    cal = timer(PATH_STEPS[1], lambda: apply_calibration(data, frame.facts.exptime, masters))
    hot_map = HotPixelMap(data.shape)

    def hot() -> np.ndarray:
        spikes = find_hot_pixels(cal, gain=frame.facts.gain)
        hot_map.update(spikes)
        return repair_pixels(cal, spikes | hot_map.mask)

    spikes = timer("  of which find_hot_pixels", lambda: find_hot_pixels(cal, gain=frame.facts.gain))
    clean = timer(PATH_STEPS[2], hot)
    off = load_frame(offset).data
    shape = timer("offset_sky_shape (once per offset frame)", lambda: offset_sky_shape(off))
    timer("sky_model, own background (no offset yet)", lambda: sky_model(clean))
    sky = timer(PATH_STEPS[3], lambda: sky_model(clean, shape=shape))
    bgsub = clean - sky.model
    stars = timer(PATH_STEPS[4], lambda: detect_stars(bgsub, sky.rms, max_stars=400))
    quality = timer(PATH_STEPS[5], lambda: measure_quality(bgsub, sky, stars))

    print(f"\n== {size} x {size}  (median of {repeat}; {int(spikes.sum())} spikes, {len(stars)} stars, "
          f"FWHM {quality.fwhm_px:.2f} px) ==")
    print(f"  {'step':<46s} {'wall ms':>9s} {'cpu ms':>9s}")
    for name, wall, cpu in timer.rows:
        print(f"  {name:<46s} {wall * 1000:9.1f} {cpu * 1000:9.1f}")
    wall = sum(timer.get(n)[0] for n in PATH_STEPS)
    cpu = sum(timer.get(n)[1] for n in PATH_STEPS)
    target = TARGETS.get(size)
    print(f"  {'per-frame steps (load .. quality)':<46s} {wall * 1000:9.1f} {cpu * 1000:9.1f}"
          + (f"   target {target:.1f} s (wall {wall / target:.0%}, cpu {cpu / target:.0%} of it)" if target else ""))
    if plain:
        _plain_tools(clean, sky.model, sky.rms)


def _plain_tools(clean: np.ndarray, sky: np.ndarray, rms: float) -> None:
    """The photutils/scipy defaults these steps replace, timed once on the same frame."""
    from photutils.background import Background2D, SExtractorBackground
    from photutils.detection import DAOStarFinder
    from scipy.ndimage import median_filter

    start = time.perf_counter()
    median_filter(clean, size=3)
    t_med = time.perf_counter() - start
    start = time.perf_counter()
    Background2D(clean, 64, filter_size=3, bkg_estimator=SExtractorBackground())
    t_b2d = time.perf_counter() - start
    start = time.perf_counter()
    DAOStarFinder(fwhm=3.5, threshold=5 * rms)(clean - sky)
    t_dao = time.perf_counter() - start
    print(f"  plain tools, once: median_filter 3x3 {t_med * 1000:.0f} ms, Background2D {t_b2d * 1000:.0f} ms, "
          f"DAOStarFinder {t_dao * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2048,4096")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-plain", action="store_true", help="skip timing the plain photutils/scipy tools")
    parser.add_argument("--keep", type=Path, help="simulate into this folder instead of a temporary one")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          "(wall times inflate with load; CPU times do not)")
    for size in (int(s) for s in args.sizes.split(",")):
        if args.keep:
            bench_size(size, args.repeat, args.keep / str(size), not args.no_plain)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                bench_size(size, args.repeat, Path(tmp), not args.no_plain)


if __name__ == "__main__":
    main()
