"""Frame loading (every dtype and file form, every bad-file case), header facts, calibration masters."""
from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from reduction.calibration import Masters, apply_calibration, combine_masters
from reduction.frames import FrameError, header_facts, load_frame

RNG = np.random.default_rng(11)


def _write(path: Path, hdul: fits.HDUList) -> Path:
    if path.name.endswith(".gz"):
        raw = path.with_name(path.name[:-3])
        hdul.writeto(raw)
        path.write_bytes(gzip.compress(raw.read_bytes()))
        raw.unlink()
    else:
        hdul.writeto(path)
    return path


# ---------------------------------------------------------------------------------------- dtypes
def _uint16_extremes() -> np.ndarray:
    data = RNG.integers(0, 65536, size=(40, 50), dtype=np.uint16)
    data[0, :4] = [0, 1, 32767, 65535]  # the values that wrap if BZERO is mishandled
    return data


@pytest.mark.parametrize("make", [
    _uint16_extremes,
    lambda: RNG.integers(-32768, 32768, size=(40, 50)).astype(np.int16),
    lambda: RNG.integers(-2**24, 2**24, size=(40, 50)).astype(np.int32),
    lambda: RNG.normal(100, 30, size=(40, 50)).astype(np.float32),
    lambda: RNG.normal(100, 30, size=(40, 50)).astype(np.float32).astype(np.float64),
], ids=["uint16-bzero", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("suffix", [".fits", ".fit", ".fts", ".fits.gz"])
def test_dtypes_round_trip_exactly(tmp_path, make, suffix):
    data = make()
    path = _write(tmp_path / f"img{suffix}", fits.HDUList([fits.PrimaryHDU(data)]))
    if data.dtype == np.uint16:
        assert fits.getheader(path)["BZERO"] == 32768
    frame = load_frame(path)
    assert frame.data.dtype == np.float32 and frame.data.shape == data.shape
    np.testing.assert_array_equal(frame.data, data.astype(np.float32))
    assert frame.data.min() >= data.min()  # nothing wrapped around


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.int32])
def test_tile_compressed_fz(tmp_path, dtype):
    info = np.iinfo(dtype)
    data = RNG.integers(max(info.min, -50000), min(info.max, 60000), size=(64, 48)).astype(dtype)
    path = _write(tmp_path / "img.fits.fz", fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data)]))
    frame = load_frame(path)
    assert frame.hdu_index == 1
    np.testing.assert_array_equal(frame.data, data.astype(np.float32))


def test_image_in_an_extension_after_an_empty_primary(tmp_path):
    data = RNG.normal(0, 1, (20, 30)).astype(np.float32)
    path = _write(tmp_path / "ext.fits", fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data)]))
    np.testing.assert_array_equal(load_frame(path).data, data)


# ------------------------------------------------------------------------------------------- 3-D
def test_cube_rules(tmp_path):
    plane = RNG.integers(0, 65535, (30, 40)).astype(np.uint16)
    one = load_frame(_write(tmp_path / "one.fits", fits.HDUList([fits.PrimaryHDU(plane[None])])))
    np.testing.assert_array_equal(one.data, plane.astype(np.float32))

    rgb = np.stack([plane, plane // 2, plane // 4])
    three = load_frame(_write(tmp_path / "rgb.fits", fits.HDUList([fits.PrimaryHDU(rgb)])))
    np.testing.assert_array_equal(three.data, rgb.astype(np.float32))    # colour planes, split later

    with pytest.raises(FrameError, match="3-D data with 4 planes; expected a 2-D image"):
        load_frame(_write(tmp_path / "four.fits", fits.HDUList([fits.PrimaryHDU(np.stack([plane] * 4))])))


# ---------------------------------------------------------------------------------- bad files
def test_bad_files_raise_with_the_reason(tmp_path):
    empty = tmp_path / "empty.fits"
    empty.write_bytes(b"")
    with pytest.raises(FrameError, match="empty file"):
        load_frame(empty)

    text = tmp_path / "notes.fits"
    text.write_text("this is not an image\n" * 200)
    with pytest.raises(FrameError, match="not a FITS file"):
        load_frame(text)

    good = _write(tmp_path / "good.fits", fits.HDUList([fits.PrimaryHDU(_uint16_extremes())]))
    cut = tmp_path / "cut.fits"
    cut.write_bytes(good.read_bytes()[: 2880 + 1000])
    with pytest.raises(FrameError, match="truncated"):
        load_frame(cut)

    header_only = _write(tmp_path / "header.fits", fits.HDUList([fits.PrimaryHDU()]))
    with pytest.raises(FrameError, match="no image data"):
        load_frame(header_only)

    with pytest.raises(FrameError, match="unreadable"):
        load_frame(tmp_path / "missing.fits")


def test_nan_handling(tmp_path):
    data = RNG.normal(500, 10, (40, 40)).astype(np.float32)
    few = data.copy()
    few[3, 4] = few[10, 11] = np.nan
    few[20, 20] = np.inf
    frame = load_frame(_write(tmp_path / "few.fits", fits.HDUList([fits.PrimaryHDU(few)])))
    assert frame.nonfinite == 3
    assert np.isfinite(frame.data).all()
    assert frame.data[3, 4] == pytest.approx(np.median(data), abs=2.0)

    mostly = data.copy()
    mostly[:25] = np.nan
    with pytest.raises(FrameError, match="mostly NaN"):
        load_frame(_write(tmp_path / "mostly.fits", fits.HDUList([fits.PrimaryHDU(mostly)])))
    with pytest.raises(FrameError, match="all pixels are NaN"):
        load_frame(_write(tmp_path / "all.fits", fits.HDUList([fits.PrimaryHDU(data * np.nan)])))


# ------------------------------------------------------------------------------- header facts
def _header(**cards) -> fits.Header:
    h = fits.Header()
    for k, v in cards.items():
        h[k.replace("_", "-") if k in ("DATE_OBS", "TIME_OBS", "MJD_OBS") else k] = v
    return h


def test_header_fallbacks_for_old_and_odd_headers():
    f = header_facts(_header(DATE_OBS="12/03/98", TIME_OBS="01:02:03.5", FRAME="Light Frame",
                             EXPTIME="abc", EXPOSURE=30, FILTNAME="B", EGAIN=1.5, GAIN="n/a",
                             READNOIS=9.0, CCDSUM="2 2", OBJCTRA="06 08 54.0", OBJCTDEC="+24 20 00",
                             DATAMAX=65535, INSTRUME="ST-8"))
    assert f.date_obs.isot == "1998-03-12T01:02:03.500"
    assert f.imagetyp == "Light Frame" and f.exptime == 30.0 and f.filter == "B"
    assert f.gain == 1.5 and f.read_noise == 9.0 and (f.xbin, f.ybin) == (2, 2)
    assert f.ra_deg == pytest.approx(92.225) and f.dec_deg == pytest.approx(24.333333)
    assert f.saturate == 65535 and f.instrument == "ST-8"


def test_odd_header_values_are_skipped_not_fatal():
    h = _header(EXPTIME=True, EXPOSURE=-5, EXP_TIME="12.5", GAIN=-1.0, CCDGAIN=0, XBINNING="x",
                BINNING="abc", RA="garbage", DEC=95.0, OBJCTRA="06 08 54", OBJCTDEC="+24 20",
                CTYPE1="RA---XYZ", CTYPE2="nonsense", PIXSCALE="n/a", SATURATE="", DATE_OBS="32/13/99")
    f = header_facts(h)
    assert f.exptime == 12.5 and f.gain is None and (f.xbin, f.ybin) == (1, 1)
    assert f.ra_deg == pytest.approx(92.225) and f.dec_deg == pytest.approx(24 + 20 / 60)
    assert f.plate_scale_arcsec is None and f.saturate is None and f.date_obs is None and f.wcs is None


def test_header_dates_and_kinds():
    assert header_facts(_header(DATE_OBS="2026-01-15T20:30:00.123")).date_obs.isot == "2026-01-15T20:30:00.123"
    assert header_facts(_header(DATE_OBS="2026-01-15", TIME_OBS="20:30:00")).date_obs.isot == "2026-01-15T20:30:00.000"
    assert header_facts(_header(DATE_OBS="2026-01-15T20:30:00Z")).date_obs.isot == "2026-01-15T20:30:00.000"
    assert header_facts(_header(DATE_OBS="2026-01-15", TIME_OBS="junk")).date_obs.isot == "2026-01-15T00:00:00.000"
    assert header_facts(_header(DATE_OBS="not a date", MJD_OBS=61055.5)).date_obs.isot == "2026-01-15T12:00:00.000"
    assert header_facts(_header(MJD_OBS=61055.5)).date_obs.isot == "2026-01-15T12:00:00.000"
    assert header_facts(_header(JD=2461056.0)).date_obs.isot == "2026-01-15T12:00:00.000"
    assert header_facts(_header(FRAMETYP="Dark")).imagetyp == "Dark"
    assert header_facts(_header(IMGTYPE="flat")).imagetyp == "flat"
    # FRAME is also written for the celestial reference frame: that is not an image type
    assert header_facts(_header(FRAME="FK5")).imagetyp is None
    empty = header_facts(fits.Header())
    assert empty.exptime is None and empty.date_obs is None and empty.gain is None
    assert (empty.xbin, empty.ybin) == (1, 1)


def test_pointing_and_plate_scale():
    numeric = header_facts(_header(RA=92.225, DEC=24.333, BINNING="2x2", XPIXSZ=18.0, FOCALLEN=2000.0))
    assert (numeric.ra_deg, numeric.dec_deg) == (92.225, 24.333)
    # XPIXSZ already includes binning (MaxIm DL / SBIG convention)
    assert numeric.plate_scale_arcsec == pytest.approx(18.0 / 2000.0 * 206.265, rel=1e-4)
    sexa = header_facts(_header(RA="06:08:54", DEC="-05:30:00", PIXSCALE=1.2))
    assert sexa.ra_deg == pytest.approx(92.225) and sexa.dec_deg == pytest.approx(-5.5)
    assert sexa.plate_scale_arcsec == 1.2

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [92.0, 24.0]
    w.wcs.crpix = [50.5, 50.5]  # 1-based: pixel centre of a 100 x 100 image
    w.wcs.cdelt = [-0.5 / 3600, 0.5 / 3600]
    h = w.to_header()
    h["NAXIS1"] = h["NAXIS2"] = 100
    f = header_facts(h)
    assert f.wcs is not None
    assert f.ra_deg == pytest.approx(92.0, abs=1e-6) and f.dec_deg == pytest.approx(24.0, abs=1e-6)
    assert f.plate_scale_arcsec == pytest.approx(0.5, rel=1e-6)


def test_load_frame_reads_facts(tmp_path):
    hdu = fits.PrimaryHDU(_uint16_extremes())
    hdu.header["EXPTIME"] = 45.0
    hdu.header["IMAGETYP"] = "Light Frame"
    frame = load_frame(_write(tmp_path / "f.fits", fits.HDUList([hdu])))
    assert frame.facts.exptime == 45.0 and frame.facts.imagetyp == "Light Frame"


# -------------------------------------------------------------------------------- calibration
@pytest.fixture(scope="module")
def camera():
    """Truth of a small camera: bias pattern, dark current (ADU/s) with hot pixels, flat pattern."""
    rng = np.random.default_rng(5)
    shape = (64, 80)
    bias = 1000 + 5 * rng.standard_normal(shape)
    dark = np.full(shape, 0.5)
    dark[10, 10] = 40.0
    y, x = np.mgrid[0:64, 0:80]
    flat = 1.0 - 0.2 * ((x - 40) ** 2 + (y - 32) ** 2) / 40**2
    flat /= np.median(flat)
    return rng, bias, dark, flat


def test_masters_recover_the_camera(camera):
    rng, bias, dark, flat = camera
    noise = lambda: rng.normal(0, 3, bias.shape)
    biases = [bias + noise() for _ in range(9)]
    biases[0][5, 5] += 5000  # a cosmic ray, clipped away
    darks = [bias + dark * 60 + noise() for _ in range(7)]
    flats = [bias + dark * 2 + level * flat + noise() for level in (20000, 25000, 30000, 22000, 28000)]
    m = combine_masters(biases, darks, flats, dark_exptimes=[60.0] * 7, flat_exptimes=[2.0] * 5)
    assert np.abs(m.bias - bias).max() < 5
    assert m.bias[5, 5] == pytest.approx(bias[5, 5], abs=5)
    np.testing.assert_allclose(m.dark_per_s, dark, atol=0.15)
    assert np.median(m.flat) == pytest.approx(1.0)
    np.testing.assert_allclose(m.flat, flat, atol=2e-3)

    science = bias + dark * 30 + flat * 3000 + noise()
    cal = apply_calibration(science.astype(np.float32), 30.0, m)
    assert cal.dtype == np.float32
    assert np.abs(cal - 3000).max() < 25


def test_calibration_with_a_subset_or_none(camera):
    _, bias, dark, flat = camera
    data = (bias + flat * 3000).astype(np.float32)
    assert apply_calibration(data, 30.0, None) is data
    assert apply_calibration(data, 30.0, Masters()) is data
    only_flat = apply_calibration(data, 30.0, Masters(flat=flat.astype(np.float32)))
    np.testing.assert_allclose(only_flat, data / flat, rtol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        apply_calibration(data[:10], 30.0, Masters(flat=flat.astype(np.float32)))


def test_masters_from_loaded_frames(tmp_path, camera):
    _, bias, dark, _ = camera
    frames = []
    for i in range(3):
        hdu = fits.PrimaryHDU((bias + dark * 20).astype(np.float32))
        hdu.header["EXPTIME"] = 20.0
        frames.append(load_frame(_write(tmp_path / f"dark_{i}.fits", fits.HDUList([hdu]))))
    m = combine_masters(darks=frames)
    assert m.bias is None and m.dark_includes_bias
    np.testing.assert_allclose(apply_calibration(frames[0].data, 20.0, m), 0.0, atol=1e-3)


def test_masters_on_a_simulated_calibration_night(tmp_path):
    """Masters from the simulator's bias/dark/flat files match its detector; calibrated sky is flat."""
    from observer.simulator import SimSettings, make_detector, simulate_night
    from reduction.background import sky_model
    from reduction.hotpixels import HotPixelMap, find_hot_pixels, repair_pixels

    s = SimSettings(size=384, frames=1, filters=("green",), n_members=100, n_field=40, fill_seconds=0.0,
                    seed=4, bad_frames=False, satellite=False, calibration=True)
    simulate_night(tmp_path / "cam", s, truth_path=tmp_path / "truth.ecsv")
    det = make_detector(s)
    cam = tmp_path / "cam"
    load = lambda pattern: [load_frame(p) for p in sorted(cam.glob(pattern))]  # noqa: E731
    m = combine_masters(load("bias_*.fits"), load("dark_*.fits"), load("flat_green_*.fits"))

    assert np.median(np.abs(m.bias - det.bias)) < 2.0
    truth_flat = det.flats["green"] / np.median(det.flats["green"])
    assert np.median(np.abs(m.flat / truth_flat - 1)) < 0.005
    dark = det.dark_rate / s.gain  # ADU/s
    assert np.median(np.abs(m.dark_per_s - dark)) < 0.1  # read noise of 5+5 frames: ~0.07 ADU/s
    assert np.median(m.dark_per_s[:10, :10]) == pytest.approx(np.median(dark[:10, :10]), rel=0.1)  # amp glow

    hot_map = HotPixelMap(m.dark_per_s.shape)
    hot_map.add_dark(m.dark_per_s)
    assert hot_map.mask[det.hot_xy[:, 1], det.hot_xy[:, 0]].mean() >= 0.99
    assert hot_map.mask.sum() < 2 * len(det.hot_xy)  # the amplifier-glow corner is not "hot"

    frame = load_frame(cam / "M35_green_001.fits")
    cal = apply_calibration(frame.data, frame.facts.exptime, m)
    cal = repair_pixels(cal, hot_map.mask | find_hot_pixels(cal))
    sky = sky_model(cal)
    # flat-fielded: the model follows only the smooth light-pollution gradient (no vignetting or
    # dust rings left), so it matches the simulator's sky shape to 1 %, corners included
    truth_sky = det.sky_shape * np.median(sky.model / det.sky_shape)
    assert np.abs(sky.model / truth_sky - 1).max() < 0.01


def test_masters_only_from_frames_of_one_geometry_and_old_flats_logged(tmp_path, caplog):
    """A 2x2-binned bias and a subframe flat in the folder stay out of the 1x1 full-frame masters;
    a flat from five nights before is applied with its age in the log."""
    def frame(name: str, value: float, shape=(64, 80), binning: int = 1, mjd: float = 61050.0):
        header = fits.Header({"XBINNING": binning, "YBINNING": binning, "EXPTIME": 1.0, "MJD-OBS": mjd})
        return load_frame(_write(tmp_path / name, fits.HDUList([fits.PrimaryHDU(
            np.full(shape, value, np.float32), header=header)])))

    biases = [frame(f"b{i}.fits", 100.0) for i in range(3)] + [frame("b2x2.fits", 400.0, (32, 40), 2)]
    flats = [frame(f"f{i}.fits", 1000.0 + i, mjd=61045.0) for i in range(3)] + \
        [frame("fsub.fits", 5.0, (32, 32))]
    with caplog.at_level(logging.INFO, logger="reduction.calibration"):
        masters = combine_masters(bias=biases, flats=flats)
        assert masters.bias.shape == (64, 80) and float(masters.bias.mean()) == pytest.approx(100.0)
        assert masters.flat.shape == (64, 80) and masters.flat_mjd == pytest.approx(61045.0)
        out = apply_calibration(np.full((64, 80), 600.0, np.float32), 1.0, masters, date_mjd=61050.0)
    assert float(out.mean()) == pytest.approx(500.0, rel=1e-3)
    messages = [r.getMessage() for r in caplog.records]
    assert any("bias: 1 of 4 frames left out" in m for m in messages)
    assert any("flat: 1 of 4 frames left out" in m for m in messages)
    assert any("5.0 days before the frame" in m for m in messages)
