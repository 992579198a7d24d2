"""The plain batch pipeline of the seed's kind, measured beside observer in the same run.

What a student notebook does per frame with library defaults: a 3 x 3 median
filter to find hot pixels, photutils Background2D, DAOStarFinder; and to add a
frame, re-stack every frame so far from scratch with astropy's sigma_clip.
"""

from __future__ import annotations

import time

import numpy as np
from astropy.stats import sigma_clip, sigma_clipped_stats
from photutils.background import Background2D, MedianBackground
from photutils.detection import DAOStarFinder
from scipy.ndimage import median_filter


def seed_frame(data: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """One frame the seed's way; returns the cleaned, background-subtracted frame and step times."""
    times = {}
    start = time.perf_counter()
    med = median_filter(data, size=3, mode="reflect")
    resid = data - med
    hot = resid > 8 * np.std(resid)
    data = np.where(hot, med, data)
    times["hotpixels"] = time.perf_counter() - start
    start = time.perf_counter()
    bkg = Background2D(data, (64, 64), filter_size=(3, 3), bkg_estimator=MedianBackground())
    data = data - bkg.background
    times["sky"] = time.perf_counter() - start
    start = time.perf_counter()
    _, _, std = sigma_clipped_stats(data, sigma=3.0, maxiters=3)
    DAOStarFinder(fwhm=3.5, threshold=5 * std)(data)
    times["detect"] = time.perf_counter() - start
    times["total"] = sum(times.values())
    return data.astype(np.float32), times


def seed_restack(frames: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """Re-stack all frames from scratch (sigma-clipped mean), as the seed does for every new frame."""
    start = time.perf_counter()
    cube = np.stack(frames)
    stack = sigma_clip(cube, sigma=3.0, axis=0, maxiters=3).mean(axis=0).filled(np.nan)
    return stack.astype(np.float32), time.perf_counter() - start
