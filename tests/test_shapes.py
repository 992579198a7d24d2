"""Star shapes as small telescopes give them: trailed (aligned across the field), comatic (elongated
radially, the direction varying) and defocused (donuts). Frames are drawn by hand (the simulator's
PSF renderer, per star for coma), written as a camera writes them (uint16, BZERO) and reduced by a Night.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from observer.config import Settings
from observer.night import Night
from observer.simulator import Psf, render_stars
from reduction.quality import FrameQuality, judge_frame

SIZE = 320
NSTARS = 120
TRAIL_PA_DEG = 30.0


def draw(kind: str, seed: int, shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """One frame of the same star field (stars from seed 1) with the PSF of ``kind``, sky 800 ADU, noise."""
    rng = np.random.default_rng(1)
    x = rng.uniform(15, SIZE - 15, NSTARS) + shift[0]
    y = rng.uniform(15, SIZE - 15, NSTARS) + shift[1]
    flux = np.exp(rng.uniform(math.log(5e3), math.log(2e5), NSTARS))
    img = np.full((SIZE, SIZE), 800.0, np.float32)
    centre = (SIZE - 1) / 2
    if kind == "round":
        render_stars(img, x, y, flux, Psf(fwhm=3.0))
    elif kind == "trailed":
        render_stars(img, x, y, flux, Psf(fwhm=3.0, trail_px=5.0, trail_angle=math.radians(TRAIL_PA_DEG)))
    elif kind == "coma":      # round at the centre, 2:1 and radial at the edge
        for xi, yi, fi in zip(x, y, flux):
            r = math.hypot(xi - centre, yi - centre) / centre
            render_stars(img, np.array([xi]), np.array([yi]), np.array([fi]),
                         Psf(fwhm=3.0 * (1 + 0.3 * r), axis_ratio=1.0 + r,
                             angle=math.atan2(yi - centre, xi - centre)))
    elif kind == "donut":     # a ring of radius 6 px: the secondary's shadow in a defocused beam
        yy, xx = np.mgrid[0:SIZE, 0:SIZE]
        for xi, yi, fi in zip(x, y, flux):
            box = (slice(max(0, int(yi) - 12), int(yi) + 13), slice(max(0, int(xi) - 12), int(xi) + 13))
            ring = np.exp(-0.5 * ((np.hypot(xx[box] - xi, yy[box] - yi) - 6.0) / 1.3) ** 2)
            img[box] += fi * ring / (2 * math.pi * 6.0 * 1.3 * math.sqrt(2 * math.pi))
    noise = np.random.default_rng(seed)
    return noise.poisson(img).astype(np.float32) + noise.normal(0, 5, img.shape).astype(np.float32)


def write(folder: Path, name: str, image: np.ndarray, filt: str, minute: int) -> Path:
    """As a camera writes it: uint16 with BZERO 32768, MaxIm-style header."""
    header = fits.Header({"IMAGETYP": "Light Frame", "OBJECT": "NGC 1", "FILTER": filt, "EXPTIME": 60.0,
                          "DATE-OBS": f"2026-03-01T21:{minute:02d}:00", "GAIN": 1.0})
    hdu = fits.PrimaryHDU(np.clip(image, 0, 65535).astype(np.float32), header=header)
    hdu.scale("int16", bzero=32768)
    path = folder / name
    hdu.writeto(path)
    return path


def reduce(tmp_path: Path, frames: list[tuple[str, str, str]], caplog, *,
           measure_each_frame: bool = False) -> tuple[Night, dict]:
    """Reduce (name, kind, filter) frames in order, measuring after the last (or after each) frame;
    returns the night and its records by file name."""
    cam = tmp_path / "cam"
    cam.mkdir()
    settings = Settings()
    settings.age.enabled = False
    night = Night(settings, tmp_path / "out")
    with caplog.at_level(logging.INFO):
        for i, (name, kind, filt) in enumerate(frames):
            night.process(write(cam, name, draw(kind, seed=10 + i, shift=(0.7 * i, -0.4 * i)), filt, i))
            if measure_each_frame or i == len(frames) - 1:
                night.write_all_products()
    return night, {Path(r.path).name: r for r in night.records}


def no_tracebacks(caplog) -> None:
    """At default verbosity a bad frame is one line: nothing at WARNING or above carries a traceback."""
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.exc_info]


def test_comatic_pair_one_frame_per_filter_is_stacked_with_a_warning_and_gives_a_catalogue(tmp_path, caplog):
    night, records = reduce(tmp_path, [("coma_B.fits", "coma", "B"), ("coma_V.fits", "coma", "V"),
                                       ("coma_V2.fits", "coma", "V")], caplog)
    for name in ("coma_B.fits", "coma_V.fits"):
        record = records[name]
        assert record.status == "stacked" and record.elongation > 1.35
        assert "coma" in record.reason and "not a trail" in record.reason and "stacked with a warning" in record.reason
        assert any(r.levelno == logging.WARNING and name in r.getMessage() for r in caplog.records)
    # the filter's second comatic frame matches the night's shape: stacked without a warning
    assert records["coma_V2.fits"].status == "stacked" and records["coma_V2.fits"].reason == ""
    frames = Table.read(tmp_path / "out" / "frames.ecsv")
    assert "coma" in frames["reason"][list(frames["path"]).index(str(tmp_path / "cam" / "coma_B.fits"))]
    catalog = Table.read(tmp_path / "out" / "NGC1" / "catalog.ecsv")
    assert len(catalog) >= 0.6 * NSTARS
    no_tracebacks(caplog)


def test_trailed_frame_in_a_night_of_round_ones_is_rejected_as_trailed(tmp_path, caplog):
    _, records = reduce(tmp_path, [(f"r{i}_B.fits", "round", "B") for i in range(3)]
                        + [("trail_B.fits", "trailed", "B"), ("r3_B.fits", "round", "B")], caplog)
    trailed = records["trail_B.fits"]
    assert trailed.status == "rejected" and trailed.reason.startswith("trailed: elongation")
    pa = float(re.search(r"aligned at PA (\d+)°", trailed.reason).group(1))
    assert abs(pa - TRAIL_PA_DEG) <= 5.0
    assert all(records[f"r{i}_B.fits"].status == "stacked" for i in range(4))
    no_tracebacks(caplog)


def test_defocused_frame_is_rejected_as_defocused(tmp_path, caplog):
    _, records = reduce(tmp_path, [("r0_B.fits", "round", "B"), ("r1_B.fits", "round", "B"),
                                   ("donut_B.fits", "donut", "B")], caplog)
    donut = records["donut_B.fits"]
    assert donut.status == "rejected" and donut.reason.startswith("defocused: ring-shaped stars")
    no_tracebacks(caplog)


def test_shape_reasons():
    def q(**kw) -> FrameQuality:
        return FrameQuality(fwhm_px=3.0, elongation=1.5, sky=100.0, sky_rms=5.0, nstars=100, **kw)
    aligned = q(pa_deg=30.0, pa_coherence=0.9, radial=0.0, core_ratio=1.0)
    radial = q(pa_deg=90.0, pa_coherence=0.1, radial=0.9, core_ratio=1.0)
    assert judge_frame(3.0, 1.5, 1.0, 100, 3.0, shape=aligned).startswith("trailed: elongation 1.50 > 1.35")
    assert "coma, not a trail" in judge_frame(3.0, 1.5, 1.0, 100, 3.0, shape=radial)
    # the optics' elongation is the night's: one comatic frame stacked is enough to judge the next by
    assert judge_frame(3.0, 1.5, 1.0, 100, 3.0, shape=radial, night_elongation=1.48) is None
    assert judge_frame(3.0, 1.5, 1.0, 100, 3.0, shape=aligned, night_elongation=1.48).startswith("trailed")
    donut = q(pa_deg=0.0, pa_coherence=0.1, radial=0.1, core_ratio=0.3)
    assert judge_frame(9.0, 1.1, 1.0, 100, 3.0, shape=donut).startswith("defocused: ring-shaped stars "
                                                                         "(centre at 30% of the ring), FWHM 9.0 px, 3.0x")
    assert judge_frame(3.0, 1.5, 1.0, 100, 3.0, shape=aligned, check_shape=False) is None
