"""The two-filter catalogue on synthetic stacks: columns, colours and numbers against the truth."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS

from reduction.catalog import build_catalog
from reduction.photometry import FLAG_SATURATED, limiting_magnitude
from test_photometry import isolated, make_stack, make_truth, match, render, robust_std

SHAPE = (512, 512)


@pytest.fixture(scope="module")
def night():
    x, y, green = make_truth(n=400, shape=SHAPE, seed=5)
    rng = np.random.default_rng(6)
    colour = 0.3 + 0.08 * (green - 14) + rng.normal(0, 0.05, len(green))   # redder when fainter, like a MS
    blue = green + colour
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crpix = [256.5, 256.5]
    wcs.wcs.crval = [92.25, 24.33]
    wcs.wcs.cdelt = [-1.0 / 3600, 1.0 / 3600]
    stacks = {"blue": make_stack(x, y, blue, shape=SHAPE, fwhm=3.9, filt="blue", seed=11),
              "green": make_stack(x, y, green, shape=SHAPE, fwhm=3.4, filt="green", seed=12)}
    stacks["green"].wcs = wcs
    cat = build_catalog(stacks, color=("blue", "green"))
    return dict(x=x, y=y, blue=blue, green=green, stacks=stacks, cat=cat, wcs=wcs)


def test_columns_exactly_as_design(night):
    expected = ["id", "x", "y", "flux_blue", "fluxerr_blue", "mag_blue", "magerr_blue",
                "flux_green", "fluxerr_green", "mag_green", "magerr_green", "color", "flags", "ra", "dec"]
    # The design's columns first and in order; then what PSF photometry adds (more columns may follow the documented ones).
    added = ["contamination", "method_blue", "contamination_blue", "method_green", "contamination_green"]
    assert night["cat"].colnames == expected + added
    meta = night["cat"].meta
    assert meta["zeropoints"] == {"blue": 25.0, "green": 25.0}
    assert meta["color"] == "mag_blue - mag_green"
    assert meta["flag_bits"]["1"] == "saturated"
    assert set(meta["aperture_correction"]) == {"blue", "green"}


def test_color_is_mag_difference(night):
    cat = night["cat"]
    np.testing.assert_allclose(cat["color"], cat["mag_blue"] - cat["mag_green"], equal_nan=True)


def test_numbers_against_truth(night):
    cat = night["cat"]
    idx = match(cat["x"], cat["y"], night["x"], night["y"])
    found = np.zeros(len(night["x"]), bool)
    found[idx[idx >= 0]] = True
    limit = limiting_magnitude(night["stacks"]["green"])
    assert found[night["green"] < limit - 2].mean() >= 0.95
    assert np.mean(idx < 0) <= 0.03
    ok = (idx >= 0) & (cat["flags"] == 0)
    ok[ok] &= isolated(night["x"], night["y"], night["green"])[idx[ok]]
    for band in ("blue", "green"):
        bright = ok & (cat[f"mag_{band}"] < 18.5)
        assert bright.sum() > 20
        resid = cat[f"mag_{band}"][bright] - night[band][idx[bright]]
        assert robust_std(resid) <= 0.01
        assert abs(np.median(resid)) < 0.05
    bright = ok & (cat["mag_green"] < 18.0)
    dcol = cat["color"][bright] - (night["blue"] - night["green"])[idx[bright]]
    assert robust_std(dcol) <= 0.01


def test_saturated_kept_and_flagged(night):
    cat = night["cat"]
    idx = match(cat["x"], cat["y"], night["x"], night["y"])
    for i in range(6):
        row = list(idx).index(i)
        assert cat["flags"][row] & FLAG_SATURATED
        assert abs(cat["x"][row] - night["x"][i]) < 0.5


def test_sky_coordinates_from_wcs(night):
    cat = night["cat"]
    ra, dec = night["wcs"].pixel_to_world_values(cat["x"][:5], cat["y"][:5])
    np.testing.assert_allclose(cat["ra"][:5], ra)
    np.testing.assert_allclose(cat["dec"][:5], dec)


def test_ecsv_round_trip(night, tmp_path):
    path = tmp_path / "catalog.ecsv"
    night["cat"].write(path, format="ascii.ecsv")
    back = Table.read(path, format="ascii.ecsv")
    assert back.colnames == night["cat"].colnames
    assert back.meta["aperture_correction"] == pytest.approx(night["cat"].meta["aperture_correction"])


def test_nonpositive_flux_gives_nan_magnitude_and_keeps_row(night):
    """A star only in green: detected on the summed maps, NaN blue magnitude, row kept."""
    x, y, mag = np.array([100.0, 300.0]), np.array([200.0, 300.0]), np.array([17.0, 17.5])
    stacks = {"blue": make_stack(x[:1], y[:1], mag[:1], shape=(400, 400), filt="blue", seed=3),
              "green": make_stack(x, y, mag, shape=(400, 400), filt="green", seed=4)}
    # A smooth negative dip at the green-only star makes sure its blue flux is negative.
    stacks["blue"].image -= render((400, 400), x[1:], y[1:], np.array([300.0]), 3.5).astype(np.float32)
    cat = build_catalog(stacks)
    assert len(cat) == 2
    row = int(np.argmin(np.hypot(cat["x"] - 300, cat["y"] - 300)))
    assert np.isnan(cat["mag_blue"][row]) and np.isnan(cat["color"][row])
    assert cat["flux_blue"][row] < 0 and np.isfinite(cat["mag_green"][row])
