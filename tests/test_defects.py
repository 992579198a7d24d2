"""Detector defects: zeroed rows and columns, hot and dead columns are masked; a clean frame with
stars and a sky gradient is not."""

from __future__ import annotations

import numpy as np
import pytest

from reduction.defects import find_defects
from reduction.hotpixels import repair_pixels

NY, NX = 300, 400


def sky_frame(seed: int = 1) -> np.ndarray:
    """Sky with a gradient, read + Poisson noise and a few hundred stars (some bright)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:NY, :NX]
    sky = 800.0 + 0.8 * xx + 0.3 * yy
    for x, y, f in zip(rng.uniform(0, NX, 300), rng.uniform(0, NY, 300), 10 ** rng.uniform(3, 5.5, 300)):
        sky += f / (2 * np.pi * 2.0 ** 2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.0 ** 2))
    return (rng.poisson(sky) + rng.normal(0, 6, sky.shape)).astype(np.float32)


def test_clean_frame_has_no_defects():
    assert not find_defects(sky_frame()).any()


@pytest.mark.parametrize("axis, index, spoil", [
    (1, 123, lambda line: 0.0 * line),          # a zeroed column
    (0, 77, lambda line: 0.0 * line),           # a zeroed row
    (1, 250, lambda line: line + 60.0),         # a hot column: a few sigma per pixel, but over 300 rows
    (1, 10, lambda line: 0.6 * line),           # a dead (low-response) column near the edge
])
def test_defect_lines_are_masked_and_repaired(axis, index, spoil):
    data = sky_frame(2)
    view = data if axis == 1 else data.T
    view[:, index] = spoil(view[:, index])
    mask = find_defects(data)
    expected = np.zeros_like(mask)
    (expected if axis == 1 else expected.T)[:, index] = True
    np.testing.assert_array_equal(mask, expected)
    repaired = repair_pixels(data, mask)
    line, beside = (repaired if axis == 1 else repaired.T)[:, [index, index + 1]].T
    assert abs(np.median(line) - np.median(beside)) < 10


def test_a_zeroed_column_is_kept_out_of_the_stack(tmp_path):
    """Through the per-frame path: a frame with a zeroed column adds nothing there (NFRAMES one lower),
    and the stack shows no dark line."""
    from astropy.io import fits

    from observer.config import Settings
    from observer.night import Night
    from observer.simulator import SimSettings, simulate_night

    truth = simulate_night(tmp_path / "cam", SimSettings(size=256, frames=3, filters=("blue",), fill_seconds=0.0,
                                                         bad_frames=False, satellite=False),
                           truth_path=tmp_path / "truth.ecsv")
    science = sorted(p for p in truth.files if "offset" not in p.name)
    with fits.open(science[1], mode="update") as hdul:      # a copy the test owns: the camera's glitch
        hdul[0].data[:, 120] = 0
    night = Night(Settings(), tmp_path / "out")
    status = {path.name: night.process(path)[0] for path in sorted(truth.files,
                                                                 key=lambda p: fits.getheader(p)["DATE-OBS"])}
    assert status[science[1].name].status == "stacked", status[science[1].name].reason
    stacked = sum(r.status == "stacked" for r in status.values())
    night.write_products()
    with fits.open(tmp_path / "out" / "M35" / "blue" / "stack.fits") as hdul:
        image, nframes = hdul[0].data, hdul["NFRAMES"].data
    glitch = status[science[1].name]
    column = 120 - glitch.dx          # the frame's column 120 on the reference grid (it drifted by dx)
    assert nframes.max() == stacked >= 2
    # The cluster core's rows and columns are not defects (their medians are lifted by stars, not a fault).
    assert np.mean(nframes[30:-30, 30:-30] < stacked - 1) < 0.01
    profile = nframes[30:-30, 60:200].mean(axis=0)          # frames per column, away from the edges
    dip = int(np.argmin(profile)) + 60
    assert abs(dip - column) <= 2.0          # the mask has a 1 px margin either side
    assert profile.min() <= np.median(profile) - 0.9          # one frame fewer down that column
    line = image[30:-30, dip]
    sky = np.median(image[30:-30, 100:140], axis=1)
    assert np.median(line - sky) > -3 * np.std(image[30:-30, 20:40] - np.median(image[30:-30, 20:40]))
