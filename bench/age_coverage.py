"""Benchmark: coverage of the age fit's 68 % and 95 % intervals over simulated clusters.

Usage:
    python bench/age_coverage.py [--clusters 20] [--members 1000] [--seed 1] [--floor 0.05]

Each cluster is drawn from isochrones interpolated at an age between grid nodes
(log age 7.8-9.6, never within 0.01 dex of a node), [M/H] in -0.5..+0.1 and a
colour scale in 0.9-1.1, with photometric errors growing to 0.05 mag at the faint
limit, 30 % binaries, 0-30 % field stars and unknown zeropoints.  The fit runs
with its defaults ([M/H] fitted, flat prior; colour scale free).  Prints each
fit, the 68 % and 95 % coverage (targets 55-80 % and >= 88 %) and the fit times.
``--floor`` is the systematic floor added in quadrature: the simulated clusters
come from the fit's own isochrones, so ``--floor 0`` measures the statistical
intervals alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers_age import random_cluster  # noqa: E402
from reduction.age import fit_age  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", type=int, default=20)
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--floor", type=float, default=0.05)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    in68, in95, seconds = [], [], []
    print("truth: log_age  [M/H]  k   | fit: log_age  68%            95%            [M/H]  k      s")
    for _ in range(args.clusters):
        truth, cat = random_cluster(rng, args.members)
        t0 = time.perf_counter()
        fit = fit_age(cat["color"], cat["mag"], cat["color_err"], cat["mag_err"], cat["usable"],
                      systematic_floor=args.floor)
        seconds.append(time.perf_counter() - t0)
        in68.append(fit.log_age_low <= truth["log_age"] <= fit.log_age_high)
        in95.append(fit.log_age_low95 <= truth["log_age"] <= fit.log_age_high95)
        print(f"  {truth['log_age']:.3f} {truth['mh']:+.2f} {truth['color_scale']:.3f} | {fit.log_age:.3f} "
              f"[{fit.log_age_low:.3f}, {fit.log_age_high:.3f}] [{fit.log_age_low95:.3f}, {fit.log_age_high95:.3f}] "
              f"{fit.mh:+.2f} {fit.color_scale:.3f} {seconds[-1]:5.1f}", flush=True)
    print(f"68% coverage: {np.mean(in68):.0%} ({sum(in68)}/{len(in68)}; target 55-80%)")
    print(f"95% coverage: {np.mean(in95):.0%} ({sum(in95)}/{len(in95)}; target >= 88%)")
    print(f"fit time: median {np.median(seconds):.1f} s, max {np.max(seconds):.1f} s ({args.members} members)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
