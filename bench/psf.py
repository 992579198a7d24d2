"""Benchmark: PSF photometry per stack (reduction/psf.py) at 2048 and 4096 px.

Usage:
    python bench/psf.py [--sizes 2048,4096] [--stars 3000]

A synthetic stack (Moffat beta 3.5 stars through the simulator's renderer, the
CCD-equation noise of a mean of 10 frames, bright stars saturated) is measured
detection, aperture photometry alone, the empirical PSF build, and the joint
PSF fit plus the neighbour-subtracted apertures; the catalogue (both filters)
with and without PSF is timed too.  Figures are seconds of wall clock and the peak
resident memory each step adds to what is resident when it starts (RSS sampled every
10 ms; the two stacks alone are about 11 B/px each).
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from observer.simulator import Psf, render_stars  # noqa: E402
from reduction.catalog import build_catalog  # noqa: E402
from reduction.detection import detect_sources, detect_sources_multi  # noqa: E402
from reduction.photometry import StackProduct, forced_photometry  # noqa: E402
from reduction.psf import build_psf, fit_psf  # noqa: E402

GAIN, NFRAMES, SKY, EXPTIME, FWHM = 1.5, 10, 500.0, 30.0, 3.5


def synthetic_stack(size: int, n: int, filt: str, seed: int) -> StackProduct:
    """A mean-of-10 stack with ``n`` stars (a few per cent saturated), in ADU per frame."""
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(5, size - 5, n), rng.uniform(5, size - 5, n)
    flux = 10 ** (-0.4 * (rng.uniform(11, 21, n) - 25.0)) * EXPTIME
    image = np.zeros((size, size), np.float32)
    render_stars(image, x, y, flux, Psf(fwhm=FWHM, beta=3.5))
    saturated = image + SKY > 60000
    var = (np.clip(image, 0, None) + SKY) / GAIN / NFRAMES + (9.0 / GAIN) ** 2 / NFRAMES
    image = image + rng.normal(0, np.sqrt(var)).astype(np.float32)
    image[saturated] = 60000 - SKY
    return StackProduct(filter=filt, image=image, nframes=np.full(image.shape, NFRAMES, np.int16),
                        variance=var.astype(np.float32), saturated=saturated, exptime=EXPTIME, gain=GAIN,
                        read_noise=9.0, n_combine=NFRAMES, fwhm_px=FWHM, sky_level=SKY)


def rss_gb() -> float:
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024 ** 2


def timed(label: str, fn, *args, **kw):
    """Run ``fn``; print its wall time and the peak memory it added."""
    start, peak, done = rss_gb(), [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], rss_gb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    print(f"  {label:<44s} {seconds:7.2f} s  peak +{max(peak[0] - start, 0):.2f} GB")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2048,4096")
    ap.add_argument("--stars", type=int, default=3000, help="stars per 2048^2 (scaled with the area)")
    args = ap.parse_args()
    for size in (int(s) for s in args.sizes.split(",")):
        n = int(args.stars * (size / 2048) ** 2)
        stacks = {f: synthetic_stack(size, n, f, seed) for seed, f in enumerate(("blue", "green"))}
        stack = stacks["green"]
        print(f"{size} x {size}, {n} stars")
        print(f"  (two stacks resident: {rss_gb():.2f} GB in all)")
        timed("detection (two stacks, as the catalogue)", detect_sources_multi, list(stacks.values()))
        sources = timed("detection (one stack)", detect_sources, stack)
        xy = np.column_stack([np.asarray(sources["x"], float), np.asarray(sources["y"], float)])
        phot = timed("aperture photometry (one stack)", forced_photometry, stack, xy)
        clean = (np.asarray(phot["snr"]) > 30) & (np.asarray(phot["flags"]) == 0)
        psf, note = timed("empirical PSF (one stack)", build_psf, stack.image, xy[:, 0], xy[:, 1], clean, FWHM)
        if psf is not None:
            fit = timed("joint PSF fit (one stack)", fit_psf, stack.image, stack.variance, psf, xy[:, 0], xy[:, 1],
                        stack.saturated, 1.5 * FWHM)
            timed("neighbour-subtracted apertures (one stack)", forced_photometry, stack, xy, psf_fit=fit)
        print(f"  ({note})")
        timed("catalogue, 2 filters, aperture only", build_catalog, stacks, psf=False)
        timed("catalogue, 2 filters, with PSF", build_catalog, stacks)


if __name__ == "__main__":
    main()
