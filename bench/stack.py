"""Benchmark registration and the incremental stack against a seed-style re-stack.

Prints, for 2048 and 4096 square frames:
- find_transform time (400 stars + 100 spurious points per list; and an unrelated field, which
  runs every search before refusing) and warp_to_reference time per path (rotation, pure
  fractional shift, whole-pixel shift);
- StackAccumulator.add time per frame at N = 2, 10 and 50 (median of the adds around each N),
  also with the image() read-out the service does after each add; the accumulator's memory and
  the tracemalloc peak of one add; one more add of a frame crossed by a satellite trail (the
  rejection and its grow at work) and that frame's rejected-pixel list;
- the seed-style baseline measured in the same run: every added frame re-stacks all N frames
  from scratch with astropy.stats.sigma_clip + mean, on full frames; only the 4096 x 50 case
  (a 3.3 GB cube, several times that in sigma_clip's temporaries) is timed on a quarter of the
  rows and multiplied by 4 (sigma_clip is linear in pixels, and a 0.8 GB cube is out of cache
  just as the full one);
- the cost of matching the seeing in the rejection: on star fields (Moffat beta 3, ~1500 stars) with
  five frames at FWHM 4.0 px and one at 2.0 px (last, then first), the add time with the FWHMs given
  against without (unmatched), and the bright-star aperture flux against the plain mean for both;
- the resampling noise effect: stack pixel noise x sqrt(N) / single-frame noise for whole-pixel
  and fractional shifts, and the same for 16 x 16 aperture sums.

Times are CPU times (process_time): the machine is shared and both sides of every ratio are
single-threaded numpy; the wall time of the adds is printed beside them.

Run: /work/venv/bin/python bench/stack.py [--sizes 2048,4096] [--quick]
"""

from __future__ import annotations

import argparse
import math
import time
import tracemalloc

import numpy as np
from astropy.stats import sigma_clip

from observer.simulator import Psf, render_stars
from reduction.registration import Transform, find_transform, warp_to_reference
from reduction.stacking import StackAccumulator

#: Largest seed-style cube stacked whole; bigger ones are timed on a quarter of the rows x 4.
_FULL_CUBE_BYTES = 1.0e9


def _cpu(fn, repeat: int = 3) -> float:
    """Median CPU time of ``fn()`` over ``repeat`` runs (s).

    CPU time rather than wall time: the bench machine is shared, and both sides of each
    ratio are single-threaded numpy, so CPU time is the fair, repeatable figure.
    """
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return float(np.median(times))


def bench_registration(size: int, rng: np.random.Generator) -> None:
    n = 400
    xy = rng.uniform(10, size - 11, (n, 2))
    flux = 10 ** rng.uniform(3, 5.3, n)
    truth = Transform.from_params(37.4, -22.9, 0.8, shape=(size, size))
    keep_r, keep_f = rng.random(n) < 0.9, rng.random(n) < 0.9

    def lst(pts: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sig = np.minimum(np.hypot(120 / f, 1.2 / np.sqrt(f)), 0.3)[:, None]
        spur = rng.uniform(0, size - 1, (100, 2))
        return (np.vstack([pts + rng.normal(0, 1, pts.shape) * sig, spur]),
                np.concatenate([f, 10 ** rng.uniform(3, 4, 100)]))

    ref = lst(xy[keep_r], flux[keep_r])
    frm = lst(truth.apply(xy[keep_f]), flux[keep_f] * 10 ** rng.normal(0, 0.2, keep_f.sum()))
    t = find_transform(frm[0], ref[0], frm[1], ref[1], shape=(size, size))
    err = float(np.sqrt(np.mean(np.sum((t.apply(xy) - truth.apply(xy)) ** 2, axis=1))))
    dt = _cpu(lambda: find_transform(frm[0], ref[0], frm[1], ref[1], shape=(size, size)), 5)
    other = lst(rng.uniform(10, size - 11, (n, 2)), flux)

    def unrelated() -> None:
        try:
            find_transform(other[0], ref[0], other[1], ref[1], shape=(size, size))
        except Exception:   # noqa: BLE001 - RegistrationError is the expected outcome
            return
        raise AssertionError("unrelated field registered")

    du = _cpu(unrelated, 3)
    print(f"  find_transform: {dt * 1e3:7.1f} ms   (error {err:.4f} px rms, {t.nmatch} matches, "
          f"rms {t.rms_px:.3f} px); unrelated field refused in {du * 1e3:.0f} ms")
    data = rng.normal(0, 10, (size, size)).astype(np.float32)
    for label, tr, rep in (("rotation 0.8 deg", truth, 3),
                           ("fractional shift", Transform.from_params(12.3, -7.6, shape=(size, size)), 3),
                           ("whole-pixel shift", Transform.from_params(12.0, -7.0, shape=(size, size)), 3)):
        dw = _cpu(lambda tr=tr: warp_to_reference(data, tr, (size, size)), rep)
        print(f"  warp_to_reference {label:18s}: {dw * 1e3:7.1f} ms (bilinear)")
    dc = _cpu(lambda: warp_to_reference(data, truth, (size, size), order=3), 1)
    print(f"  warp_to_reference rotation, cubic spline : {dc * 1e3:7.1f} ms (not used: 3-4x slower)")


def bench_stack(size: int, rng: np.random.Generator, n_max: int) -> None:
    pool = [rng.normal(0, 10, (size, size)).astype(np.float32) for _ in range(4)]
    valid = np.ones((size, size), bool)
    valid[:, :20] = False
    acc = StackAccumulator((size, size))
    t_add: dict[int, float] = {}
    t_read: dict[int, float] = {}
    wall: dict[int, float] = {}
    peak = 0
    for i in range(1, n_max + 1):
        frame = pool[i % len(pool)]
        tracemalloc.start()
        c0, w0 = time.process_time(), time.perf_counter()
        acc.add(f"f{i}", frame, noise_var=100.0, valid=valid, scale=1.0 + 0.01 * i, weight=1.0)
        c1, wall[i] = time.process_time(), time.perf_counter() - w0
        peak = max(peak, tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        acc.image()
        t_add[i], t_read[i] = c1 - c0, time.process_time() - c1

    def around(d: dict[int, float], m: int) -> float:
        return float(np.median([d[k] for k in range(max(2, m - 2), min(n_max, m + 2) + 1)]))

    yy, xx = np.mgrid[:size, :size]
    trail = (300.0 * np.exp(-0.5 * ((0.6 * xx - yy + 0.3 * size) / 1.17 / 1.5) ** 2)).astype(np.float32)
    trailed = pool[0] + trail                       # 30 sigma peak, Gaussian sigma 1.5 px across
    c0 = time.process_time()
    acc.add("trail", trailed, noise_var=100.0, valid=valid, scale=1.0, weight=1.0)
    t_trail = time.process_time() - c0
    print(f"  add of a frame crossed by a satellite trail at N={n_max + 1}: {t_trail * 1e3:.1f} ms, "
          f"{acc.rejected_pixels('trail')} pixels rejected (grow included), list "
          f"{acc.rejected_pixels('trail') * 4 / 2**10:.0f} kB")
    print(f"  stack memory: {acc.nbytes() / 2**20:.0f} MB held ({acc.nbytes() / size**2:.1f} bytes/pixel), "
          f"tracemalloc peak during one add {peak / 2**20:.0f} MB (+ image() result {size * size * 4 / 2**20:.0f} MB)")
    for m in (2, 10, 50):
        if m > n_max:
            continue
        rows = size if m * size * size * 4 <= _FULL_CUBE_BYTES else size // 4
        cube = np.stack([pool[k % len(pool)][:rows] for k in range(m)])

        def restack(c: np.ndarray = cube) -> None:
            sigma_clip(c, sigma=3.0, axis=0, masked=True).mean(axis=0)

        base = _cpu(restack, 1) * size / rows
        del cube
        add, both = around(t_add, m), around(t_add, m) + around(t_read, m)
        how = "full frames" if rows == size else f"{rows} rows x {size // rows}"
        print(f"  N={m:3d}: add {add * 1e3:6.1f} ms (wall {around(wall, m) * 1e3:6.1f}), add+image() "
              f"{both * 1e3:6.1f} ms | seed re-stack {base:6.2f} s ({how}) | ratio {base / add:6.1f}x, "
              f"{base / both:6.1f}x with image()")


def bench_seeing(size: int, rng: np.random.Generator, n_stars: int = 1500) -> None:
    """Add time and bright-star flux bias with and without seeing matching (see the module docstring)."""
    x, y = rng.uniform(20, size - 21, (2, n_stars))
    flux = 10 ** rng.uniform(3.0, 5.3, n_stars)
    sigma, gain = 15.0, 1.5

    def frame(fwhm: float) -> np.ndarray:
        img = np.zeros((size, size), np.float64)
        render_stars(img, x, y, flux, Psf(fwhm=fwhm))
        return (img + rng.normal(0, 1, img.shape) * np.sqrt(sigma ** 2 + img / gain)).astype(np.float32)

    bright = flux > 3e4
    bx, by = np.round(x[bright]).astype(int), np.round(y[bright]).astype(int)
    box = np.arange(-8, 9)

    def box_sums(img: np.ndarray) -> np.ndarray:   # 17 x 17 px around each bright star
        return img[(by[:, None, None] + box[None, :, None]), (bx[:, None, None] + box[None, None, :])].sum(axis=(1, 2))

    for label, fwhms in (("sharp last", [4.0] * 5 + [2.0]), ("sharp first", [2.0] + [4.0] * 5)):
        frames = [frame(f) for f in fwhms]
        plain = box_sums(np.mean(frames, axis=0))
        out = []
        for matched in (False, True):
            acc = StackAccumulator((size, size))
            times = []
            for i, (f, fw) in enumerate(zip(frames, fwhms, strict=True)):
                c0 = time.process_time()
                acc.add(str(i), f, noise_var=sigma ** 2 + np.clip(f, 0, None) / gain, valid=None,
                        fwhm=fw if matched else None)
                times.append(time.process_time() - c0)
            bias = box_sums(acc.image()) / plain - 1
            out.append(f"{'matched' if matched else 'unmatched'}: add {np.median(times[1:]) * 1e3:6.1f} ms median, "
                       f"{max(times[1:]) * 1e3:6.1f} ms max; bright-star flux {np.median(bias) * 100:+.2f} % median, "
                       f"{bias.min() * 100:+.2f} % worst ({bright.sum()} stars)")
        print(f"  seeing 5 x 4.0 px + 2.0 px, {label:11s}| " + " | ".join(out))


def bench_noise(rng: np.random.Generator, size: int = 512, n: int = 10) -> None:
    sigma = 10.0

    def ratio(shifts: list[tuple[float, float, float]]) -> tuple[float, float]:
        acc = StackAccumulator((size, size))
        first_pix = first_box = 0.0
        for i, (dx, dy, rot) in enumerate(shifts):
            raw = rng.normal(0, sigma, (size, size)).astype(np.float32)
            w, v = warp_to_reference(raw, Transform.from_params(dx, dy, rot, shape=(size, size)), (size, size))
            acc.add(str(i), w, noise_var=sigma ** 2, valid=v)
            img = acc.image()[32:-32, 32:-32]
            box = img[: img.shape[0] // 16 * 16, : img.shape[1] // 16 * 16]
            box = box.reshape(box.shape[0] // 16, 16, -1, 16).sum(axis=(1, 3))
            if i == 0:
                first_pix, first_box = float(img.std()), float(box.std())
        k = math.sqrt(len(shifts))
        return float(img.std()) * k / first_pix, float(box.std()) * k / first_box

    whole = [(0.0, 0.0, 0.0)] + [(float(i), float(-i), 0.0) for i in range(1, n)]
    frac = [(0.0, 0.0, 0.0)] + [(rng.uniform(-20, 20), rng.uniform(-20, 20), rng.uniform(-1, 1))
                                for _ in range(n - 1)]
    half = [(0.0, 0.0, 0.0)] + [(i + 0.5, 0.5 - i, 0.0) for i in range(1, n)]
    for label, shifts in (("whole-pixel shifts", whole), ("random fractional shifts + rotation", frac),
                          ("half-pixel shifts in x and y", half)):
        pix, box = ratio(shifts)
        print(f"  N={n} {label:36s}: pixel noise x sqrt(N) / single = {pix:.3f}; "
              f"16x16 aperture sums {box:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2048,4096")
    ap.add_argument("--quick", action="store_true", help="N up to 10 only")
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    for size in (int(s) for s in args.sizes.split(",")):
        print(f"== {size} x {size}")
        bench_registration(size, rng)
        bench_stack(size, rng, 10 if args.quick else 50)
        bench_seeing(size, rng)
    print("== resampling and stack noise (512 x 512 pure-noise frames, bilinear)")
    bench_noise(rng)
    print(f"total bench time {time.perf_counter() - t0:.0f} s wall, {time.process_time():.0f} s CPU")


if __name__ == "__main__":
    main()
