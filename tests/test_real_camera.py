"""A real camera's headers: FRAME instead of IMAGETYP, 'Blue'/'Green', an old dd/mm/yy date, and a
plate-solved WCS instead of RA/DEC and OBJCTRA/OBJCTDEC; the stacks carry the WCS and the catalogue
gains ra, dec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from observer.config import Settings
from observer.reprocess import process_existing
from observer.simulator import SimSettings, simulate_night

SIZE = 384


def plate_solved(header: fits.Header, scale_arcsec: float) -> fits.Header:
    """The header as a camera program with a plate solver writes it."""
    ra, dec = float(header["RA"]), float(header["DEC"])
    for key in ("RA", "DEC", "OBJCTRA", "OBJCTDEC", "IMAGETYP"):
        header.remove(key, ignore_missing=True)
    header["FRAME"] = "Light"
    header["FILTER"] = str(header["FILTER"]).capitalize()
    date, clock = str(header["DATE-OBS"]).split("T")
    _, month, day = date.split("-")
    header["DATE-OBS"] = f"{day}/{month}/90"        # the old FITS form: 1990
    header["TIME-OBS"] = clock
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crpix = [(SIZE + 1) / 2, (SIZE + 1) / 2]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.cd = np.array([[-scale_arcsec, 0.0], [0.0, scale_arcsec]]) / 3600.0
    header.update(wcs.to_header())
    return header


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    root = tmp_path_factory.mktemp("realcam")
    raw = root / "sim"
    truth = simulate_night(raw, SimSettings(size=SIZE, frames=3, fill_seconds=0.0, bad_frames=False, seed=5),
                           truth_path=root / "truth.ecsv")
    assert truth is not None
    scale = float(Table.read(root / "truth.ecsv").meta["plate_scale_arcsec"])
    cam = root / "cam"
    cam.mkdir()
    for path in sorted(raw.glob("*.fits")):
        with fits.open(path) as hdul:
            header = plate_solved(hdul[0].header.copy(), scale)
            fits.PrimaryHDU(hdul[0].data, header=header).writeto(cam / path.name)
    process_existing(cam, root / "out", Settings())
    return root


def test_frames_tagged_from_frame_keyword_and_capitalised_filters(reduced):
    frames = Table.read(reduced / "out" / "frames.ecsv")
    names = [Path(p).name for p in frames["path"]]
    status = dict(zip(names, frames["status"]))
    assert set(frames["filter"]) == {"blue", "green"}
    assert all(status[n] == "offset" for n in names if "offset" in n)
    assert all(status[n] == "stacked" for n in names if "offset" not in n), dict(zip(names, frames["reason"]))
    assert all(str(d).startswith("1990-") for d in frames["date_obs"])


def test_stacks_carry_the_wcs_and_the_catalogue_gains_ra_dec(reduced):
    reference = fits.getheader(reduced / "cam" / "M35_blue_001.fits")
    ref_wcs = WCS(reference).celestial
    for filt in ("blue", "green"):
        header = fits.getheader(reduced / "out" / "M35" / filt / "stack.fits")
        assert header["CTYPE1"] == "RA---TAN" and header["CTYPE2"] == "DEC--TAN"
        stack_wcs = WCS(header).celestial
        probe = np.array([[0.0, 0.0], [SIZE - 1.0, SIZE / 2]])
        np.testing.assert_allclose(stack_wcs.pixel_to_world_values(probe[:, 0], probe[:, 1]),
                                   ref_wcs.pixel_to_world_values(probe[:, 0], probe[:, 1]), atol=1e-9)
    catalog = Table.read(reduced / "out" / "M35" / "catalog.ecsv")
    assert {"ra", "dec"} <= set(catalog.colnames) and len(catalog) > 50
    ra, dec = ref_wcs.pixel_to_world_values(np.asarray(catalog["x"]), np.asarray(catalog["y"]))
    np.testing.assert_allclose(np.asarray(catalog["ra"], float), ra, atol=1e-7)
    np.testing.assert_allclose(np.asarray(catalog["dec"], float), dec, atol=1e-7)
