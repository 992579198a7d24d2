"""Camera files as an observatory CCD writes them, made from the simulator's: a prescan, an overscan strip
(BIASSEC) and TRIMSEC, with a bias pedestal that drifts along the readout (tests of overscan and vignetting)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from astropy.io import fits

PRESCAN = 4             # junk columns before the data
OVERSCAN = 16           # overscan columns after them
TOP = 3                 # junk rows above the data
PEDESTAL = 1000.0       # the simulator's bias level
SLOPE = 0.2             # ADU per row: the pedestal drifts along the readout


def camera_frame(data: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The simulator's frame as the CCD reads it: prescan | data | overscan, junk rows on top, and a
    pedestal that drifts with the row in the data and the overscan alike."""
    n = data.shape[0]
    drift = (SLOPE * np.arange(n))[:, None]
    out = np.zeros((n + TOP, PRESCAN + n + OVERSCAN), np.float64)
    out[:n, PRESCAN:PRESCAN + n] = data.astype(np.float64) + drift
    # The simulator's bias rises by 3 ADU from the first to the last row: its overscan does too.
    out[:n, PRESCAN + n:] = PEDESTAL + 3.0 * np.arange(n)[:, None] / (n - 1) + drift + \
        6.0 * rng.standard_normal((n, OVERSCAN))
    out[n:, :] = 50.0
    return np.clip(np.rint(out), 0, 65535).astype(np.uint16)


def write_ccd_night(sim: Path, cam: Path,
                    optics: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None) -> None:
    """Every simulated file of ``sim`` as the CCD writes it into ``cam``; ``optics`` may first change a
    frame's light (ADU above the pedestal, float64) for what the simulator's optics do not do."""
    cam.mkdir()
    rng = np.random.default_rng(3)
    for path in sorted(sim.glob("*.fits")):
        with fits.open(path) as hdul:
            header = hdul[0].header.copy()
            data = hdul[0].data.astype(np.float64)
        if optics is not None:
            data = optics(data - PEDESTAL, rng) + PEDESTAL
        n = data.shape[0]
        header["BIASSEC"] = f"[{PRESCAN + n + 1}:{PRESCAN + n + OVERSCAN},1:{n}]"
        header["TRIMSEC"] = f"[{PRESCAN + 1}:{PRESCAN + n},1:{n}]"
        fits.PrimaryHDU(camera_frame(data, rng), header=header).writeto(cam / path.name)
