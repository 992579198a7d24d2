"""Per-frame reduction and measurement speed, against a seed-style batch pipeline in the same run.

For each size (2048 and 4096 by default) a simulated night of one target in two
filters is reduced frame by frame through observer's per-frame path (the very
``Night.process`` that ``watch`` and ``reprocess`` use). Printed:

- the median time of each per-frame step and of the whole path, and the time to read a file (the floor);
- the same frames through the seed's way (3x3 median hot pixels, Background2D, DAOStarFinder) as a ratio;
- the time to add a frame to the stack at N = 2, 10, 50 against re-stacking from scratch (bench/stack.py);
- the memory of one stack accumulator;
- the time to measure the stacks and write the products, and the whole reprocess throughput.

CPU is busy with other work on a shared machine: figures are process CPU
times where marked, wall times otherwise; ratios are always from the same run.

    python bench/reduce.py [--sizes 2048,4096] [--frames 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from astropy.io import fits

sys.path.insert(0, str(Path(__file__).resolve().parent))

from seed_baseline import seed_frame, seed_restack  # noqa: E402

from observer.config import Settings  # noqa: E402
from observer.night import Night  # noqa: E402
from observer.reprocess import process_existing  # noqa: E402
from observer.simulator import SimSettings, simulate_night  # noqa: E402
from reduction.frames import load_frame  # noqa: E402


def bench_size(size: int, frames: int, root: Path) -> None:
    cam = root / f"cam{size}"
    print(f"\n== {size} x {size}: simulating {frames} frames per filter ...", flush=True)
    simulate_night(cam, SimSettings(size=size, frames=frames, fill_seconds=0.0, bad_frames=False),
                   truth_path=root / f"truth{size}.ecsv")
    files = sorted(cam.glob("*.fits"), key=lambda p: fits.getheader(p)["DATE-OBS"])
    science = [p for p in files if "offset" not in p.name]

    reads = []
    for path in science:
        start = time.perf_counter()
        load_frame(path)
        reads.append(time.perf_counter() - start)

    night = Night(Settings(), root / f"out{size}")
    steps: dict[str, list[float]] = {}
    totals = []
    for path in files:
        start = time.perf_counter()
        (record,) = night.process(path)    # mono frames: one record each
        elapsed = time.perf_counter() - start
        if record.kind == "science" and record.status == "stacked" and record.dx != 0.0:
            totals.append(elapsed)
            for name, seconds in record.step_seconds.items():
                steps.setdefault(name, []).append(seconds)
    print(f"per-frame path (median over {len(totals)} frames, wall s):")
    for name, values in steps.items():
        print(f"  {name:<10} {statistics.median(values):7.3f}")
    whole = statistics.median(totals)
    print(f"  {'whole':<10} {whole:7.3f}   (read alone: {statistics.median(reads):.3f})")

    seed_times, seed_frames, restack = [], [], []
    for path in science[:4]:
        data, times = seed_frame(load_frame(path).data)
        seed_times.append(times["total"])
        seed_frames.append(data)
        restack.append(seed_restack(seed_frames)[1])
    seed_whole = statistics.median(seed_times)
    print(f"seed-style per frame (no registration, no stacking): {seed_whole:.3f} s -> observer is "
          f"{seed_whole / whole:.1f}x faster with registration and stacking included")
    print(f"seed-style re-stack at N={len(seed_frames)}: {restack[-1]:.3f} s")

    nbytes = next(iter(night.stack_bytes().values()))
    print(f"one stack accumulator: {nbytes / 2**20:.0f} MiB ({nbytes / (size * size):.1f} bytes per pixel)")

    start = time.perf_counter()
    written = night.write_all_products()
    print(f"measure the stacks + write products (catalogue, CMD, age, stacks, frames.ecsv): "
          f"{time.perf_counter() - start:.2f} s ({len(written)} files)")

    start = time.perf_counter()
    process_existing(cam, root / f"re{size}", Settings())
    elapsed = time.perf_counter() - start
    print(f"observer reprocess of {len(files)} files: {elapsed:.1f} s = {len(files) / elapsed * 60:.1f} frames/min")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2048,4096")
    parser.add_argument("--frames", type=int, default=6, help="science frames per filter")
    parser.add_argument("--skip-stack", action="store_true", help="skip the N = 2/10/50 accumulator benchmark")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="observer-bench-") as tmp:
        for size in sizes:
            bench_size(size, args.frames, Path(tmp))
    if not args.skip_stack:
        import numpy as np
        from stack import bench_stack

        print("\n== time per added frame (observer accumulator vs re-stack from scratch; bench/stack.py)")
        for size in sizes:
            bench_stack(size, np.random.default_rng(1), 50)


if __name__ == "__main__":
    main()
