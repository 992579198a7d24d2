"""``<target>/stars.reg``: the catalogue as a DS9 region file that ``regions`` (and so DS9) reads back."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from regions import CirclePixelRegion, CircleSkyRegion, Regions

from observer.config import Settings
from observer.night import Night
from observer.simulator import SimSettings, simulate_night
from observer.writers import write_regions
from reduction.photometry import FLAG_BLENDED, FLAG_EDGE, FLAG_LOW_COVERAGE, FLAG_SATURATED


def _wcs() -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [92.25, 24.33]
    wcs.wcs.crpix = [100.0, 100.0]
    wcs.wcs.cdelt = [-1.0 / 3600, 1.0 / 3600]      # 1 arcsec per pixel
    return wcs


def _catalog(wcs: WCS | None) -> Table:
    rng = np.random.default_rng(5)
    n = 6
    table = Table({"id": np.arange(1, n + 1), "x": rng.uniform(0, 200, n), "y": rng.uniform(0, 200, n),
                   "mag_green": rng.uniform(10, 18, n),
                   "flags": [0, FLAG_SATURATED, FLAG_BLENDED, FLAG_EDGE, FLAG_LOW_COVERAGE,
                             FLAG_SATURATED | FLAG_EDGE]})
    table.meta["aperture_radius_px"] = {"blue": 4.0, "green": 4.5}
    if wcs is not None:
        table["ra"], table["dec"] = wcs.pixel_to_world_values(table["x"], table["y"])
    return table


def test_round_trip_in_image_coordinates(tmp_path):
    catalog = _catalog(None)
    path = write_regions(tmp_path, "M35", catalog, "green")
    assert path == tmp_path / "M35" / "stars.reg"
    regions = Regions.read(path, format="ds9")
    assert len(regions) == len(catalog)
    assert all(isinstance(r, CirclePixelRegion) for r in regions)
    np.testing.assert_allclose([r.center.x for r in regions], catalog["x"], atol=1e-3)
    np.testing.assert_allclose([r.center.y for r in regions], catalog["y"], atol=1e-3)
    assert {r.radius for r in regions} == {4.5}
    assert [r.visual["edgecolor"] for r in regions] == ["green", "red", "orange", "yellow", "yellow", "red"]
    assert [r.meta["text"] for r in regions] == [f"{i} {m:.2f}" for i, m in zip(catalog["id"], catalog["mag_green"])]


def test_sky_circles_with_a_wcs(tmp_path):
    wcs = _wcs()
    catalog = _catalog(wcs)
    regions = Regions.read(write_regions(tmp_path, "M35", catalog, "green", wcs), format="ds9")
    sky = [r for r in regions if isinstance(r, CircleSkyRegion)]
    assert len(sky) == len(catalog) and len(regions) == 2 * len(catalog)
    np.testing.assert_allclose([s.center.ra.deg for s in sky], catalog["ra"], atol=1e-6)
    np.testing.assert_allclose([s.center.dec.deg for s in sky], catalog["dec"], atol=1e-6)
    assert sky[0].radius.to_value("arcsec") == pytest.approx(4.5, rel=1e-3)
    # The sky circles land on the image circles through the stack's WCS.
    back = sky[3].to_pixel(wcs)
    assert (back.center.x, back.center.y) == pytest.approx((catalog["x"][3], catalog["y"][3]), abs=1e-3)


def test_the_night_writes_stars_reg_with_the_catalogue(tmp_path):
    truth = simulate_night(tmp_path / "cam", SimSettings(size=384, frames=2, short_frames=0, fill_seconds=0.0,
                                                         bad_frames=False, satellite=False),
                           truth_path=tmp_path / "truth.ecsv")
    settings = Settings()
    night = Night(dataclasses.replace(settings, age=dataclasses.replace(settings.age, enabled=False)),
                  tmp_path / "out")
    for path in sorted(truth.files, key=lambda p: fits.getheader(p)["DATE-OBS"]):
        night.process(path)
    written = night.write_all_products()
    target = tmp_path / "out" / "M35"
    assert target / "stars.reg" in written
    catalog = Table.read(target / "catalog.ecsv")
    regions = Regions.read(target / "stars.reg", format="ds9")
    assert len(catalog) > 10 and len(regions) == len(catalog)
    np.testing.assert_allclose([r.center.x for r in regions], catalog["x"], atol=1e-3)
    np.testing.assert_allclose([r.center.y for r in regions], catalog["y"], atol=1e-3)
