"""Benchmark of ``observer archive``: nights per minute with 1 and 2 LocalCluster workers, overhead per task.

Against, in the same run, a plain serial ``reprocess`` of the same nights in this
process (no Dask). Figures:

- nights/min for serial reprocess, the archive on 1 worker and on 2 workers
  (wall clock, cluster start and stop included, as a user waits for it);
- overhead per night task, on 1 worker: the wall clock minus the cluster start
  minus the seconds measured inside the tasks, per night (scheduling, transfer,
  the row's round trip); the tasks' own seconds against the serial reprocess
  (the fingerprint, marker and rename, one BLAS thread, a fresh process's first
  imports); and the bare Dask round trip of an empty task;
- an up-to-date rerun (every night skipped): the cost of checking the markers.

    /work/venv/bin/python bench/archive.py                   # 4 nights of 512 px, 3 frames per filter
    /work/venv/bin/python bench/archive.py --nights 6 --size 1024
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from observer.archive import dask_client, run_archive
from observer.config import Settings
from observer.reprocess import reprocess
from observer.simulator import SimSettings, simulate_night


def simulate_archive(root: Path, nights: int, size: int, frames: int) -> Path:
    archive = root / "archive"
    for i in range(nights):
        simulate_night(archive / f"night{i:02d}", SimSettings(size=size, frames=frames, seed=i + 1,
                                                              fill_seconds=0.0), truth_path=root / f"truth{i}.ecsv")
    return archive


def timed(func, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = func(*args, **kwargs)
    return time.perf_counter() - start, result


def cluster_start_seconds(workers: int) -> float:
    """Start and close a LocalCluster: what every archive run pays once."""
    start = time.perf_counter()
    with dask_client(None, workers):
        pass
    return time.perf_counter() - start


def round_trip_seconds(tasks: int = 50) -> float:
    """One empty task, submitted and gathered one at a time: Dask's own cost per task."""
    with dask_client(None, 1) as client:
        client.submit(abs, -1, pure=False).result()        # the first one warms the worker
        start = time.perf_counter()
        for i in range(tasks):
            client.submit(abs, -i, pure=False).result()
        return (time.perf_counter() - start) / tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nights", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import distributed  # noqa: F401  (its import sets its loggers' levels: set ours after it)

    logging.getLogger("distributed").setLevel(logging.ERROR)
    settings = Settings()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-archive-") as tmp:
        root = Path(tmp)
        archive = simulate_archive(root, args.nights, args.size, args.frames)
        nights = sorted(p for p in archive.iterdir())
        serial, _ = timed(lambda: [reprocess(n, root / "serial" / n.name, settings, progress=False) for n in nights])
        start1 = cluster_start_seconds(1)
        walls, inside = {}, {}
        for workers in (1, 2):
            walls[workers], rows = timed(run_archive, archive, root / f"out{workers}", settings, workers=workers)
            inside[workers] = sum(row["seconds"] for row in rows.values())
        rerun, rows = timed(run_archive, archive, root / "out2", settings, workers=2)
        assert all(row["status"] == "skipped" for row in rows.values())
        trip = round_trip_seconds()
        shutil.rmtree(root / "serial")

    n = args.nights
    print(f"archive of {n} nights, {args.size} px, {args.frames} frames per filter (2 filters + offsets); "
          f"load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print(f"  serial reprocess (no Dask): {serial:6.1f} s  {n / serial * 60:5.2f} nights/min")
    for workers, wall in walls.items():
        print(f"  archive, {workers} worker{'s' if workers > 1 else ' '}:        {wall:6.1f} s  "
              f"{n / wall * 60:5.2f} nights/min  ({serial / wall:.2f}x serial)")
    print(f"  2 workers / 1 worker: {walls[1] / walls[2]:.2f}x")
    print(f"  LocalCluster start + close (1 worker): {start1:.1f} s per run")
    print(f"  overhead per night task (1 worker): {(walls[1] - start1 - inside[1]) / n:.2f} s outside the task; "
          f"inside it {inside[1] / n:.1f} s against {serial / n:.1f} s serial")
    print(f"  Dask round trip of an empty task: {trip * 1000:.1f} ms")
    print(f"  up-to-date rerun (all {n} skipped, no cluster started): {rerun:.2f} s")


if __name__ == "__main__":
    main()
