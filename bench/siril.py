"""observer against Siril on the same simulated nights: s/frame, the ratio, peak RSS, where observer's time goes.

For each size (2048 and 4096 by default) a night of one target in two filters
is simulated (no short frames: Siril stacks one exposure time), then, in the
same run on the same machine:

- ``observer reprocess`` (a fresh process: start-up, every frame, the final
  catalogue, age fit and products all counted) over the whole night; s/frame is
  its wall time over the science frames of both filters;
- ``siril-cli`` (when installed: Debian's ``siril``) over the blue science
  frames: convert, register, a 3-sigma rejection stack; s/frame over those frames.

Printed per size: both s/frame, the ratio observer/Siril (below 1: observer is
faster), both peak RSS (``wait4`` of each process), and observer's per-step
sums from its ``reprocess timings`` log line.

    python bench/siril.py [--sizes 2048,4096] [--frames 10,6] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from observer.simulator import SimSettings, simulate_night

SIRIL_SCRIPT = """requires 1.0.0
convert blue -out=../work
cd ../work
register blue
stack r_blue rej 3 3 -norm=addscale -out=stacked
close
"""


def run_measured(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """Run ``cmd``; (wall seconds, peak RSS in GB, stderr). Raises when it fails."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        err.seek(0)
        text = err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-2000:]}")
    return wall, usage.ru_maxrss / 1024 ** 2, text


def observer_run(cam: Path, out: Path) -> tuple[float, float, dict[str, float]]:
    wall, rss, log = run_measured([sys.executable, "-m", "observer.cli", "-v", "reprocess", str(cam),
                                   "--out", str(out)], cam.parent)
    steps: dict[str, float] = {}
    match = re.search(r"reprocess timings \(s, summed over \d+ files\): (.*)", log)
    if match:
        for part in match.group(1).split(", "):
            name, _, seconds = part.rpartition(" ")
            steps[name] = float(seconds)
    return wall, rss, steps


def siril_run(blue: list[Path], root: Path) -> tuple[float, float]:
    frames = root / "siril_in"
    frames.mkdir(parents=True)
    for path in blue:
        (frames / path.name).symlink_to(path)
    script = root / "stack.ssf"
    script.write_text(SIRIL_SCRIPT)
    wall, rss, _ = run_measured(["siril-cli", "-d", str(frames), "-s", str(script)], frames)
    return wall, rss


def bench_size(size: int, frames: int, root: Path) -> None:
    cam = root / f"cam{size}"
    print(f"\n== {size} x {size}, {frames}+{frames} frames: simulating ...", flush=True)
    simulate_night(cam, SimSettings(size=size, frames=frames, short_frames=0, fill_seconds=0.0),
                   truth_path=root / f"truth{size}.ecsv")
    science = sorted(p for p in cam.glob("*.fits") if "offset" not in p.name)
    blue = [p for p in science if "_blue_" in p.name]
    wall, rss, steps = observer_run(cam, root / f"out{size}")
    per_frame = wall / len(science)
    print(f"observer reprocess: {wall:6.1f} s for {len(science)} science frames = {per_frame:.3f} s/frame, "
          f"peak RSS {rss:.2f} GB")
    if steps:
        total = sum(steps.values())
        print("  where the time goes (s; per science frame):")
        for name, seconds in sorted(steps.items(), key=lambda kv: -kv[1]):
            print(f"    {name:15s} {seconds:7.2f}  {seconds / len(science):.3f}")
        print(f"    {'start-up etc.':15s} {wall - total:7.2f}  {(wall - total) / len(science):.3f}")
    if shutil.which("siril-cli") is None:
        print("siril-cli not installed (Debian: apt-get install siril): no ratio")
        return
    swall, srss = siril_run(blue, root / f"siril{size}")
    sper = swall / len(blue)
    print(f"siril-cli:          {swall:6.1f} s for {len(blue)} blue frames = {sper:.3f} s/frame, "
          f"peak RSS {srss:.2f} GB")
    print(f"ratio observer/Siril: {per_frame / sper:.2f} (s/frame), memory {rss / srss:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2048,4096")
    parser.add_argument("--frames", default="10,6", help="science frames per filter, one per size")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    counts = [int(n) for n in args.frames.split(",")]
    counts += [counts[-1]] * (len(sizes) - len(counts))
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_siril_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        for size, n in zip(sizes, counts):
            bench_size(size, n, root / str(size))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
