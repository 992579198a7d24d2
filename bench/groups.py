"""Benchmark: what exposure groups (short frames stacked apart) cost, per frame and per measurement.

Usage:
    python bench/groups.py [--size 2048] [--frames 6] [--short 3:1]

Simulates one night with short frames, reprocesses it, then prints:
- the per-frame step times of the long frames and of the short ones (a group is a lookup and its own
  accumulator: the per-frame path costs the same);
- the memory of the accumulators (one set of planes per group);
- one measurement of the target with the groups merged, against the same measurement of the long
  stacks only (the extra forced photometry and the short-stack detection), same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from observer.cli import parse_short  # noqa: E402
from observer.config import Settings  # noqa: E402
from observer.measure import measure_target  # noqa: E402
from observer.night import Night  # noqa: E402
from observer.reprocess import process_existing  # noqa: E402
from observer.simulator import SimSettings, simulate_night  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--short", default="3:1")
    args = parser.parse_args()
    count, seconds = parse_short(args.short)
    settings = Settings()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sim = SimSettings(size=args.size, frames=args.frames, short_frames=count, short_exptime=seconds,
                          fill_seconds=0.0)
        simulate_night(root / "cam", sim, truth_path=root / "truth.ecsv")
        start = time.perf_counter()
        night = process_existing(root / "cam", root / "out", settings)
        print(f"reprocess of {len(night.records)} files at {args.size} px: {time.perf_counter() - start:.1f} s")
        for kind, pick in (("long", lambda r: "short" not in r.path), ("short", lambda r: "short" in r.path)):
            frames = [r for r in night.records if r.status == "stacked" and pick(r)]
            per_frame = [sum(v for k, v in r.step_seconds.items() if k not in ("queue", "hash")) for r in frames]
            if per_frame:
                print(f"{kind} frames: {len(frames)}, median per-frame path {statistics.median(per_frame):.3f} s")
        sizes = night.stack_bytes()
        print(f"accumulators: {len(sizes)} filters, {sum(sizes.values()) / 2**20:.0f} MiB in all "
              f"({sum(sizes.values()) / (args.size ** 2 * len(sizes)):.1f} bytes per pixel per filter, all groups)")
        resumed = Night.restore(settings, root / "out")
        (request,) = resumed.measurement_requests()
        timings = {}
        for label, req in (("long stacks only", dataclasses.replace(request, groups={})), ("with groups", request)):
            start = time.perf_counter()
            result = measure_target(req, settings)
            timings[label] = time.perf_counter() - start
            print(f"measurement, {label}: {timings[label]:.2f} s, {len(result.catalog)} stars, "
                  f"{int((result.catalog['flags'] & 1 > 0).sum())} flagged saturated")
        print(f"groups cost {timings['with groups'] - timings['long stacks only']:.2f} s per measurement "
              f"({timings['with groups'] / timings['long stacks only']:.2f}x)")


if __name__ == "__main__":
    main()
