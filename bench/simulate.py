"""Time the camera simulator: a default 2048 x 2048 night (2 filters x (10 science + 1 offset)) and a 4096 frame.

Target (issue 2): the 2048 night in under 30 s on the 2-core machine, written at
once (fill_seconds=0, cadence=0). Run: /work/venv/bin/python bench/simulate.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from observer.simulator import SimSettings, simulate_night
from reduction.isochrones import load_table


def timed_night(root: Path, name: str, settings: SimSettings) -> tuple[float, float, int]:
    """Wall and CPU time of one simulate_night call and the number of files it wrote.

    CPU time is printed too because other jobs on a shared 2-core machine inflate wall time.
    """
    start, cpu = time.perf_counter(), time.process_time()
    night = simulate_night(root / name / "cam", settings, truth_path=root / name / "truth.ecsv")
    return time.perf_counter() - start, time.process_time() - cpu, len(night.files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-4096", action="store_true", help="only the 2048 night")
    args = parser.parse_args()
    load_table()   # the isochrone cache is a one-off cost per machine, not the simulator's
    with tempfile.TemporaryDirectory(prefix="observer-bench-") as tmp:
        root = Path(tmp)
        night_s, night_cpu, n_files = timed_night(root, "night2048", SimSettings(size=2048, frames=10,
                                                                                  fill_seconds=0.0))
        per_2048 = night_cpu / n_files
        print(f"2048x2048 night, {n_files} files (2 filters x 11): {night_s:.1f} s wall, {night_cpu:.1f} s CPU "
              f"({per_2048:.2f} s CPU per file; target < 30 s)")
        cal_s, cal_cpu, cal_files = timed_night(root, "cal2048", SimSettings(size=2048, frames=10, fill_seconds=0.0,
                                                                             calibration=True))
        print(f"2048x2048 night with calibration, {cal_files} files: {cal_s:.1f} s wall, {cal_cpu:.1f} s CPU "
              f"({cal_cpu / cal_files:.2f} s CPU per file)")
        if not args.skip_4096:
            big_s, big_cpu, big_files = timed_night(root, "frame4096", SimSettings(size=4096, frames=1,
                                                                                   filters=("green",),
                                                                                   fill_seconds=0.0))
            per_4096 = big_cpu / big_files
            print(f"4096x4096, {big_files} files (1 science + 1 offset): {big_s:.1f} s wall, {big_cpu:.1f} s CPU "
                  f"({per_4096:.2f} s CPU per file, {per_4096 / per_2048:.1f}x a 2048 file for 4x the pixels)")


if __name__ == "__main__":
    main()
