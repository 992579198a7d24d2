"""Frames of an observatory CCD with a prescan, an overscan strip (BIASSEC) and TRIMSEC: the bias pedestal
and its row-to-row drift come off, the frames are trimmed, and the stack's sky level is the sky's."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from ccd_frames import PRESCAN, write_ccd_night
from observer.config import Settings
from observer.frame_path import read_frame
from observer.reprocess import process_existing
from observer.simulator import SimSettings, simulate_night
from reduction.frames import FrameError
from reduction.overscan import correct_overscan, parse_section

SIZE = 256


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    root = tmp_path_factory.mktemp("overscan")
    simulate_night(root / "sim", SimSettings(size=SIZE, frames=2, fill_seconds=0.0, bad_frames=False, seed=11,
                                             satellite=False), truth_path=root / "truth.ecsv")
    write_ccd_night(root / "sim", root / "cam")
    process_existing(root / "cam", root / "out", Settings())
    return root


def test_overscan_night_is_trimmed_and_its_sky_level_is_the_sky(night):
    frames = Table.read(night / "out" / "frames.ecsv")
    assert set(frames["status"][frames["kind"] == "science"]) == {"stacked"}, list(frames["reason"])
    truth = Table.read(night / "truth_frames.ecsv")
    for filt in ("blue", "green"):
        with fits.open(night / "out" / "M35" / filt / "stack.fits") as hdul:
            header, image, nframes = hdul[0].header, hdul[0].data, hdul["NFRAMES"].data
        assert image.shape == (SIZE, SIZE)
        assert header["OVERSCAN"] is True
        assert any("subtracted row by row" in h and f"[{PRESCAN + 1}:{PRESCAN + SIZE},1:{SIZE}]" in h
                   for h in header["HISTORY"])
        sky = truth[(truth["kind"] == "science") & (truth["filter"] == filt)]["sky_adu"]
        # The true sky, not sky + the 1000 ADU pedestal: within 2 % (the sky model keeps ~1 % of faint
        # starlight, with or without an overscan: +23 ADU on 2210 in blue, measured both ways).
        assert abs(header["SKYLEVEL"] - np.mean(sky)) < 0.02 * np.mean(sky), (header["SKYLEVEL"], np.mean(sky))
        # No negative strip at the edges: the outermost covered rows and columns do not fall below their
        # neighbours (a prescan or overscan left in would sit the sky level, 2000-8000 ADU, below them; the
        # crowded field's sky model leaves the top edge up to ~180 ADU high, with or without an overscan).
        steps = edge_steps(image, nframes == nframes.max())
        assert min(steps) > -30.0, steps


def edge_steps(image: np.ndarray, covered: np.ndarray) -> list[float]:
    """Per side, the median of its 3 outermost covered lines minus that of the next 10 (ADU)."""
    out = []
    for img, cov in ((image, covered), (image.T, covered.T)):
        medians = np.array([np.median(img[j, cov[j]]) for j in range(len(img)) if cov[j].sum() > 50])
        out += [float(np.median(medians[:3]) - np.median(medians[3:13])),
                float(np.median(medians[-3:]) - np.median(medians[-13:-3]))]
    return out


def test_row_by_row_overscan_removes_a_drifting_pedestal():
    rng = np.random.default_rng(0)
    ny, nx = 120, 80
    drift = 1000.0 + 0.5 * np.arange(ny)[:, None]
    raw = np.zeros((ny, nx + 10))
    raw[:, :nx] = 20.0 + drift + rng.normal(0, 2, (ny, nx))
    raw[:, nx:] = drift + rng.normal(0, 5, (ny, 10))
    header = fits.Header({"BIASSEC": f"[{nx + 1}:{nx + 10},1:{ny}]"})   # no TRIMSEC: the strip comes off
    result = correct_overscan(raw.astype(np.float32), header)
    assert result.data.shape == (ny, nx) and result.origin == (0, 0)
    assert "row by row" in result.note
    assert abs(result.level - np.median(drift)) < 1.0
    rows = np.median(result.data, axis=1)
    assert np.all(np.abs(rows - 20.0) < 2.0), (rows.min(), rows.max())


def test_short_strip_is_a_constant_and_headers_without_sections_are_untouched():
    data = np.full((40, 50), 500.0, np.float32)
    short = correct_overscan(data, fits.Header({"BIASSEC": "[49:50,1:40]", "DATASEC": "[1:48,1:40]"}))
    assert "as a constant" in short.note and short.data.shape == (40, 48)
    np.testing.assert_allclose(short.data, 0.0)
    assert correct_overscan(data, fits.Header()) is None
    assert correct_overscan(data, fits.Header({"DATASEC": "[1:50,1:40]"})) is None


@pytest.mark.parametrize("value, reason", [("[1:20;1:40]", "not a section"), ("[1:60,1:40]", "outside the 50x40"),
                                           ("[1:30,1:40]", "overlaps the data section")])
def test_malformed_sections_are_a_reason(value, reason):
    with pytest.raises(FrameError, match=reason):
        correct_overscan(np.zeros((40, 50), np.float32), fits.Header({"BIASSEC": value, "TRIMSEC": "[1:25,1:40]"}))
    assert parse_section("[3:1, 2:4]", "TRIMSEC", (40, 50)) == (slice(1, 4), slice(0, 3))


def test_malformed_section_sets_the_frame_aside_with_one_line(night, tmp_path, caplog):
    path = sorted((night / "cam").glob("M35_blue_*.fits"))[0]
    with fits.open(path) as hdul:
        header = hdul[0].header.copy()
        header["TRIMSEC"] = "[5:300,1:256"
        (tmp_path / "cam").mkdir()
        fits.PrimaryHDU(hdul[0].data, header=header).writeto(tmp_path / "cam" / path.name)
    with caplog.at_level(logging.INFO):
        process_existing(tmp_path / "cam", tmp_path / "out", Settings())
    frames = Table.read(tmp_path / "out" / "frames.ecsv")
    assert list(frames["status"]) == ["rejected"]
    assert "TRIMSEC = '[5:300,1:256' is not a section" in frames["reason"][0]
    assert not any(r.exc_info for r in caplog.records)


def test_trimmed_frame_keeps_its_wcs_on_the_sky(tmp_path):
    data = np.full((40, 60), 1000, np.uint16)
    header = fits.Header({"BIASSEC": "[51:60,1:40]", "TRIMSEC": "[6:50,3:40]", "CTYPE1": "RA---TAN",
                          "CTYPE2": "DEC--TAN", "CRPIX1": 30.0, "CRPIX2": 20.0, "CRVAL1": 92.2, "CRVAL2": 24.3,
                          "CDELT1": -1e-4, "CDELT2": 1e-4})
    fits.PrimaryHDU(data, header=header).writeto(tmp_path / "f.fits")
    frame, level, note = read_frame(tmp_path / "f.fits", Settings())
    assert frame.data.shape == (38, 45) and level == 1000.0 and "trimmed to [6:50,3:40]" in note
    raw = WCS(header).celestial
    # Pixel (0, 0) of the trimmed frame is raw pixel (5, 2): the same point on the sky.
    np.testing.assert_allclose(frame.facts.wcs.pixel_to_world_values(0, 0), raw.pixel_to_world_values(5, 2))
