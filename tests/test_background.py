"""Sky model: flat residuals on a graded sky, no holes at the offset frame's stars, float32 throughout."""
from __future__ import annotations

import numpy as np
import pytest

from reduction.background import offset_sky_shape, pixel_noise, sky_model
from test_quality import graded_sky, moffat_field

N = 768
BOX = 64


def _box_medians(residual: np.ndarray, box: int = BOX) -> np.ndarray:
    n = residual.shape[0] // box
    blocks = residual[: n * box, : n * box].reshape(n, box, n, box).transpose(0, 2, 1, 3).reshape(n, n, -1)
    return np.median(blocks, axis=-1)


@pytest.fixture(scope="module")
def night():
    """A science frame and an offset frame sharing one light-pollution gradient at different levels,
    with different (bright) stars; the sky truth of both."""
    shape = graded_sky(N, 1.0)
    science, sky_sci, _ = moffat_field(N, 400, fwhm=3.5, seed=31, sky=1500.0 * shape)
    # bright offset stars: peaks from ~1.3 to ~20 times the sky
    offset, sky_off, off_stars = moffat_field(N, 200, fwhm=3.5, seed=32, sky=1200.0 * shape,
                                              flux_range=(3e4, 5e5))
    return science, sky_sci, offset, sky_off, off_stars


def test_own_background_is_flat_to_one_percent(night):
    science, sky, _, _, _ = night
    model = sky_model(science, box=BOX, filter_size=3)
    assert model.model.dtype == np.float32 and model.model.shape == science.shape
    # the sky left after subtraction (truth - model): flat to 1 % of the sky level, box by box
    # and pixel by pixel
    left = (sky - model.model) / np.median(sky)
    assert np.abs(_box_medians(left)).max() < 0.01
    assert np.abs(left).max() < 0.01
    assert model.level == pytest.approx(np.median(sky), rel=0.01)
    assert model.rms == pytest.approx(np.sqrt(np.median(sky) + 25.0), rel=0.05)


def test_offset_shape_gives_the_gradient_and_no_holes(night):
    science, sky, offset, sky_off, off_stars = night
    shape = offset_sky_shape(offset, box=BOX, filter_size=3)
    assert shape.dtype == np.float32
    assert shape.mean() == pytest.approx(1.0, abs=1e-5)
    assert np.abs(_box_medians(shape / (sky_off / sky_off.mean()) - 1.0)).max() < 0.01

    model = sky_model(science, box=BOX, filter_size=3, shape=shape)
    # no dips where the offset frame's (bright) stars were: within 0.5 % of the true local sky
    xi = np.clip(np.round(off_stars[:, 0]).astype(int), 0, N - 1)
    yi = np.clip(np.round(off_stars[:, 1]).astype(int), 0, N - 1)
    at_stars = model.model[yi, xi] / sky[yi, xi] - 1.0
    assert np.abs(at_stars).max() < 0.005
    # and the sky left after subtraction is flat to 1 % of the sky level
    left = (sky - model.model) / np.median(sky)
    assert np.abs(_box_medians(left)).max() < 0.01
    assert np.percentile(np.abs(left), 99.9) < 0.01


def test_subtraction_goes_negative_without_wrapping(night):
    science, _, _, _, _ = night
    low = np.clip(science - 1400.0, 0, None).astype(np.float32)  # sky near zero, like a bias-subtracted frame
    model = sky_model(low)
    resid = low - model.model
    assert resid.dtype == np.float32
    assert resid.min() < 0 and resid.min() > -1000  # negative noise, no wrap to ~4e9


def test_pixel_noise_ignores_gradient_and_stars():
    rng = np.random.default_rng(2)
    data = (graded_sky(512) + rng.normal(0, 12.0, (512, 512))).astype(np.float32)
    data[rng.integers(0, 512, 300), rng.integers(0, 512, 300)] += 5e4
    assert pixel_noise(data) == pytest.approx(12.0, rel=0.03)


def test_shape_mismatch_is_refused(night):
    science, _, _, _, _ = night
    with pytest.raises(ValueError, match="shape"):
        sky_model(science, shape=np.ones((10, 10), dtype=np.float32))


def test_simulated_night_sky_level_and_flat_residual(tmp_path):
    from astropy.table import Table
    from scipy import ndimage

    from observer.simulator import SimSettings, simulate_night
    from reduction.frames import load_frame
    from reduction.hotpixels import find_hot_pixels, repair_pixels

    settings = SimSettings(size=512, frames=2, filters=("green",), n_members=150, n_field=60,
                           fill_seconds=0.0, seed=4, bad_frames=False, satellite=False)
    simulate_night(tmp_path / "cam", settings, truth_path=tmp_path / "truth.ecsv")
    log = Table.read(tmp_path / "truth_frames.ecsv")

    def clean(name: str) -> np.ndarray:
        frame = load_frame(tmp_path / "cam" / name)
        return repair_pixels(frame.data, find_hot_pixels(frame.data, gain=frame.facts.gain))

    shape = offset_sky_shape(clean("M35_offset_green.fits"))
    for row in log[log["kind"] == "science"]:
        data = clean(row["file"])
        for model in (sky_model(data), sky_model(data, shape=shape)):
            sky = row["sky_adu"]
            assert model.level - settings.bias_level == pytest.approx(sky, rel=0.01)
            resid = data - model.model
            masked = np.where(ndimage.binary_dilation(resid > 3 * model.rms, iterations=6), np.nan, resid)
            n = 512 // BOX
            boxes = masked.reshape(n, BOX, n, BOX).transpose(0, 2, 1, 3).reshape(n, n, -1)
            assert np.nanmax(np.abs(np.nanmedian(boxes, axis=-1))) < 0.01 * sky
