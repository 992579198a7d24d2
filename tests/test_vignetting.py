"""A small telescope's vignetted edge: a strip of the detector where the optics pass 20 % of the light (the
noise following the dimmed light), behind a steep arc. Its pixels are kept out of the stack, so the catalogue
has no star there, while the stars elsewhere are found as before."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from scipy.spatial import cKDTree

from ccd_frames import PEDESTAL, write_ccd_night
from observer.config import settings_from_dict
from observer.reprocess import process_existing
from observer.simulator import ADC_MAX, SimSettings, simulate_night
from reduction.background import RESPONSE_BLOCK, SkyModel, low_response

SIZE = 256
ARC = (176, 208)        # columns over which the response falls from 1 to FLOOR (cosine)
FLOOR = 0.2
BOX = 32
GAIN = 1.5              # the simulator's e-/ADU


def response(n: int) -> np.ndarray:
    """The optics' response per column of the detector."""
    x = np.arange(n, dtype=float)
    t = np.clip((x - ARC[0]) / (ARC[1] - ARC[0]), 0, 1)
    return FLOOR + (1 - FLOOR) * 0.5 * (1 + np.cos(np.pi * t))


def vignette(light: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The light dimmed by the response, with the Poisson noise of the dimmed light (not the scaled noise).

    Pixels the simulator saturated stay saturated: dimmed, their clipped tops would pass for unsaturated
    stars of the wrong flux (a camera saturates after the optics).
    """
    r = response(light.shape[1])[None, :]
    extra = np.sqrt(np.clip((r - r * r) * light / GAIN, 0, None))
    dimmed = r * light + extra * rng.standard_normal(light.shape)
    return np.where(light >= ADC_MAX - PEDESTAL - 1, light, dimmed)


#: Columns where the response is below the default min_response (0.5) on the detector.
MASKED_FROM = int(np.argmax(response(SIZE) < 0.5))


def reduce(root, min_response: float):
    """The night reduced into ``out_<min_response>``; its catalogue."""
    # The sky model's boxes scaled to the small frame (8 across, as 64 px boxes are 32 across a 2048 px
    # frame): the default 64 px leaves 4 boxes, too few to follow a vignetting arc.
    out = root / f"out_{min_response}"
    process_existing(root / "cam", out, settings_from_dict({"reduction": {"background_box": BOX,
                                                                          "min_response": min_response}}))
    frames = Table.read(out / "frames.ecsv")
    assert set(frames["status"][frames["kind"] == "science"]) == {"stacked"}, list(frames["reason"])
    return out, Table.read(out / "M35" / "catalog.ecsv")


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    root = tmp_path_factory.mktemp("vignetting")
    sim = SimSettings(size=SIZE, frames=2, fill_seconds=0.0, bad_frames=False, seed=11, satellite=False)
    simulate_night(root / "sim", sim, truth_path=root / "truth.ecsv")
    write_ccd_night(root / "sim", root / "cam", optics=vignette)
    return root, sim.drift_px


def test_vignetted_strip_has_no_catalogue_star_while_the_rest_is_found(night):
    root, drift = night
    out, catalog = reduce(root, 0.5)
    _, unmasked = reduce(root, 0.0)
    # Every frame's strip, whatever the tracking drift and the 16 px blocks the response is judged in.
    strip = MASKED_FROM + drift + RESPONSE_BLOCK
    for filt in ("blue", "green"):
        nframes = fits.getdata(out / "M35" / filt / "stack.fits", "NFRAMES")
        assert np.all(nframes[:, int(strip) + 1:] == 0)
    # Unmasked, the strip holds catalogue stars (5 on this field: real ones dimmed 1.75 mag and noise); masked, none.
    assert np.sum(unmasked["x"] > strip) >= 3
    assert not np.any(catalog["x"] > strip), np.sort(catalog["x"][catalog["x"] > strip])
    # Away from the arc the same stars are found, mask or not (measured: 99 of 105; the others are faint
    # stars whose frames' registration and sky moved a little with the mask).
    clear = unmasked[unmasked["x"] < ARC[0] - drift - 8]
    dist, _ = cKDTree(np.column_stack([catalog["x"], catalog["y"]])).query(np.column_stack([clear["x"], clear["y"]]))
    assert len(clear) > 100 and np.mean(dist < 1.0) > 0.9, (len(clear), np.mean(dist < 1.0))


def test_low_response_from_the_sky_and_from_the_flat():
    ramp = np.linspace(0.1, 1.3, 128, dtype=np.float32)[None, :].repeat(32, 0)   # 0.5 at column 42.3
    data = ramp * 1000
    sky = SkyModel(model=data, level=1000.0, rms=30.0)
    low = low_response(data, sky, 0.5)
    # Judged in 16 px blocks: the block of columns 32-47 (median 0.47) is low, the next (0.61) is not.
    assert low[:, :48].all() and not low[:, 48:].any()
    assert low_response(data, sky, 0.0) is None
    # A flat-fielded frame's sky is flat: the vignetting is in the flat it was divided by.
    flat = np.full_like(ramp, 1000.0)
    np.testing.assert_array_equal(low_response(flat, SkyModel(flat, 1000.0, 30.0), 0.5, flat=ramp), ramp < 0.5)
    # A sky below its own noise says nothing about the response.
    assert low_response(data / 100, SkyModel(data / 100, 10.0, 30.0), 0.5) is None
