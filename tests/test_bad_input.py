"""Bad input is one clear line naming the file and the reason, never a traceback at default verbosity,
and a target without an age says why (age.json and the dashboard's snapshot)."""

from __future__ import annotations

import json
import logging

import numpy as np
from astropy.io import fits
from astropy.table import Table

from observer.config import Settings
from observer.night import Night
from reduction.photometry import FLAG_BLENDED, FLAG_SATURATED
from test_shapes import draw, no_tracebacks, reduce, write


def test_a_frame_of_exact_zeros_is_set_aside_saying_so(tmp_path, caplog):
    """A float frame mostly of exact zeros (an empty stack, a synthetic test image) has no sky noise."""
    rng = np.random.default_rng(2)
    image = np.zeros((256, 256), np.float32)
    image[100:108] = rng.normal(100.0, 5.0, (8, 256))       # 3 % of the frame carries anything
    path = tmp_path / "empty_B.fits"
    fits.PrimaryHDU(image, header=fits.Header({"IMAGETYP": "LIGHT", "OBJECT": "M35", "FILTER": "B",
                                               "EXPTIME": 10.0, "DATE-OBS": "2026-01-01T20:00:00"})).writeto(path)
    with caplog.at_level(logging.INFO):
        [record] = Night(Settings(), tmp_path / "out").process(path)
    assert record.status == "rejected"
    assert record.reason == ("no sky noise: 97% of pixels are exactly 0: an empty or synthetic frame, "
                             "not a camera's exposure")
    assert any("empty_B.fits" in r.getMessage() and "no sky noise" in r.getMessage() for r in caplog.records)
    no_tracebacks(caplog)


def test_an_ageless_target_says_why_in_age_json_and_the_snapshot(tmp_path, caplog):
    """Too few stars in the fit's magnitude window: one INFO line, age.json with the reason, no traceback."""
    cam = tmp_path / "cam"
    cam.mkdir()
    settings = Settings()
    night = Night(settings, tmp_path / "out")
    for i, filt in enumerate(("B", "V")):
        night.process(write(cam, f"r_{filt}.fits", draw("round", seed=i), filt, i))
    # 36 stars with both filters but colour errors of 0.3 mag: the fit's window keeps the few bright ones
    rng = np.random.default_rng(0)
    mag = np.sort(rng.uniform(14.0, 19.0, 36))
    catalog = Table({"id": np.arange(36), "x": rng.uniform(0, 300, 36), "y": rng.uniform(0, 300, 36),
                     "mag_blue": mag + 0.5, "mag_green": mag, "magerr_blue": np.full(36, 0.3),
                     "magerr_green": np.full(36, 0.3), "color": 0.5 + rng.normal(0, 0.1, 36),
                     "flags": np.zeros(36, int)})
    with caplog.at_level(logging.INFO):
        night.run_age("NGC1", catalog)
    age = json.loads((tmp_path / "out" / "NGC1" / "age.json").read_text())
    assert age["fitted"] is False and age["log_age"] is None and age["age_myr"] is None
    assert age["reason"].startswith("isochrone fit needs at least 20 usable stars between magnitudes")
    assert age["stars"] == {"catalogue": 36, "usable": 36,
                            "left_out": {"no colour": 0, "saturated": 0, "blended": 0}}
    assert night.snapshot().targets["NGC1"].age_reason == age["reason"]
    lines = [r for r in caplog.records if "no age" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    no_tracebacks(caplog)


def test_a_target_whose_stars_are_flagged_says_how_many_were_left_out_and_why(tmp_path):
    """Each star counted once, under its first fault: no colour, then saturated, then blended."""
    night = Night(Settings(), tmp_path / "out")
    n = 60
    flags = np.zeros(n, int)
    flags[:20] = FLAG_SATURATED
    flags[15:45] |= FLAG_BLENDED          # 5 of them saturated too: counted as saturated
    color = np.full(n, 0.5)
    color[40:42] = np.nan                 # blended and without a colour: counted as no colour
    catalog = Table({"x": np.arange(n, dtype=float), "y": np.arange(n, dtype=float),
                     "mag_blue": np.linspace(14, 19, n) + 0.5, "mag_green": np.linspace(14, 19, n),
                     "magerr_blue": np.full(n, 0.01), "magerr_green": np.full(n, 0.01), "color": color,
                     "flags": flags})
    night.run_age("NGC1", catalog)
    age = json.loads((tmp_path / "out" / "NGC1" / "age.json").read_text())
    assert age["stars"] == {"catalogue": 60, "usable": 15,
                            "left_out": {"no colour": 2, "saturated": 20, "blended": 23}}
    assert age["reason"] == ("15 usable stars, too few for an age fit (at least 30 unsaturated, unblended stars "
                             "with both filters; left out: 2 no colour, 20 saturated, 23 blended); photometry.psf: "
                             "true measures blended stars with their neighbours subtracted")
    settings = Settings()
    settings.photometry.psf = True          # already on: no hint
    Night(settings, tmp_path / "out2").run_age("NGC1", catalog)
    again = json.loads((tmp_path / "out2" / "NGC1" / "age.json").read_text())
    assert again["reason"].endswith("left out: 2 no colour, 20 saturated, 23 blended)")


def test_a_single_filter_target_says_once_it_has_no_colour(tmp_path, caplog):
    reduce(tmp_path, [(f"r{i}_I.fits", "round", "R") for i in range(2)], caplog, measure_each_frame=True)
    lines = [r.getMessage() for r in caplog.records if "no colour" in r.getMessage()]
    assert lines == ["NGC1: frames in red only: no blue, green yet, so no colour and no CMD"]
    assert not (tmp_path / "out" / "NGC1" / "catalog.ecsv").exists()
