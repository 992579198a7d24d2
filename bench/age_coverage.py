"""How often the age interval contains the truth, over many synthetic clusters off the isochrone grid.

Why: a user reads "(120-250 Myr)" as a statement of confidence; this measures what
confidence it is.  Each cluster is drawn between the grid's nodes
(``reduction.isochrones.interpolated_isochrone``, via ``tests/synthetic_cmd.py``) with
unknown zeropoints, field stars and, optionally, a colour scale the model does not
know (``--colour-scale``, default 0.9:1.1: b-g = k (B-V), as a filter set that is not
exactly Johnson would give) and metallicities between the grid's (``--mh``, default
-0.5:0.1), as issue 18 specifies; the fit marginalises [M/H] and fits the colour
scale.  It prints how often the 68 % and the 95 % intervals contain the truth, their
median widths, the median error and the fit's time.

    python bench/age_coverage.py [--clusters 20] [--members 600] [--colour-scale 0.9:1.1] [--mh -0.5:0.1] [--fixed-mh] [--seed 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from observer.isochrone_cache import install  # noqa: E402
from reduction.age import COLOR_SCALE_RANGE, fit_age  # noqa: E402
from reduction.isochrones import grid  # noqa: E402
from synthetic_cmd import synthetic_cmd  # noqa: E402

ZEROPOINT = (-3.7, 0.3)      # instrumental offsets of V and of B-V


def _off_grid_ages(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    """Log ages uniform in [lo, hi], each at least a fifth of a grid step from a node."""
    nodes, _ = grid()
    step = float(np.median(np.diff(nodes)))
    out = []
    while len(out) < n:
        a = rng.uniform(lo, hi)
        if np.min(np.abs(nodes - a)) >= 0.2 * step:
            out.append(a)
    return np.array(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clusters", type=int, default=20)
    p.add_argument("--members", type=int, default=600)
    p.add_argument("--field", type=float, default=0.15, help="field-star fraction")
    p.add_argument("--ages", default="7.6:9.4", help="log age range LO:HI")
    p.add_argument("--colour-scale", default="0.9:1.1", help="range LO:HI of the unknown colour scale k")
    p.add_argument("--mh", default="-0.5:0.1", help="range LO:HI of the clusters' [M/H]")
    p.add_argument("--fixed-mh", action="store_true", help="fit at [M/H] 0 (the grid's solar) instead of marginalising")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    install()
    rng = np.random.default_rng(args.seed)
    lo, hi = (float(v) for v in args.ages.split(":"))
    k_lo, k_hi = (float(v) for v in args.colour_scale.split(":"))
    mh_lo, mh_hi = (float(v) for v in args.mh.split(":"))
    truths = _off_grid_ages(rng, args.clusters, lo, hi)
    rows = []
    print(f"{'truth':>6} {'k':>5} {'[M/H]':>5} {'fit':>6} {'k fit':>5} {'[M/H]':>5} {'68 %':>15} {'95 %':>15} {'s':>5}")
    for truth in truths:
        k, mh = rng.uniform(k_lo, k_hi), rng.uniform(mh_lo, mh_hi)
        cat = synthetic_cmd(truth, args.members, mh=mh, distance_modulus=10.3, ebv=0.2, zeropoint=ZEROPOINT,
                            field_fraction=args.field, faint_limit=20.0, rng=rng)
        t0 = time.perf_counter()
        fit = fit_age(k * cat["color"], cat["mag"], k * cat["color_err"], cat["mag_err"], cat["usable"],
                      rng=rng, fit_mh=not args.fixed_mh, color_scale=COLOR_SCALE_RANGE)
        seconds = time.perf_counter() - t0
        i68, i95 = (fit.log_age_low, fit.log_age_high), (fit.log_age_low95, fit.log_age_high95)
        rows.append((truth, fit.log_age, i68, i95, seconds))
        print(f"{truth:6.3f} {k:5.3f} {mh:5.2f} {fit.log_age:6.3f} {fit.color_scale:5.3f} {fit.mh:5.2f} [{i68[0]:5.2f}, {i68[1]:5.2f}] "
              f"[{i95[0]:5.2f}, {i95[1]:5.2f}] {seconds:5.1f}", flush=True)
    truth = np.array([r[0] for r in rows])
    err = np.array([r[1] for r in rows]) - truth
    print(f"\n{len(rows)} clusters, log age {lo}-{hi}, colour scale {k_lo}-{k_hi}, [M/H] {mh_lo}-{mh_hi}, "
          f"{'fixed' if args.fixed_mh else 'marginalised'} [M/H], {args.members} members, "
          f"field {args.field}")
    print(f"median |error| {np.median(np.abs(err)):.3f} dex, worst {np.max(np.abs(err)):.3f}; "
          f"fit {np.median([r[4] for r in rows]):.1f} s median")
    for name, j in (("68 % interval", 2), ("95 % interval", 3)):
        lo_, hi_ = np.array([r[j][0] for r in rows]), np.array([r[j][1] for r in rows])
        inside = (lo_ <= truth) & (truth <= hi_)
        print(f"{name:14s} contains the truth in {inside.mean():5.0%}, median width {np.median(hi_ - lo_):.3f} dex")


if __name__ == "__main__":
    main()
