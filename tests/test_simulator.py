"""The simulated camera, checked on the FITS files it writes against its own truth."""

from __future__ import annotations

import math
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from photutils.aperture import ApertureStats, CircularAnnulus, CircularAperture

from observer.config import ConfigError
from observer.simulator import (ADC_MAX, FIRST_SHARP_FACTOR, SimSettings, offset_field_stars, plan_night,
                                render_stars, simulate_night, transform_xy, Psf)

SIZE = 512


def small_settings(**kw) -> SimSettings:
    """A quick but complete night: two filters, three frames each, uncrowded."""
    base = dict(size=SIZE, frames=3, n_members=80, n_field=40, seed=7, fill_seconds=0.0)
    base.update(kw)
    return SimSettings(**base)


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    root = tmp_path_factory.mktemp("night")
    truth = simulate_night(root / "cam", small_settings(), truth_path=root / "truth.ecsv")
    return root, truth


def load(root: Path, name: str) -> np.ndarray:
    return fits.getdata(root / "cam" / name).astype(np.float64)


def frame_row(truth, name: str):
    rows = truth.frames[truth.frames["file"] == name]
    assert len(rows) == 1
    return rows[0]


def isolated_bright(truth, filt: str, row, peak_limit: float = 40000.0, snr_min: float = 100.0) -> Table:
    """Truth stars well inside the frame, unsaturated, bright, away from hot pixels, and not sitting in a
    neighbour's Moffat wings.

    A beta=3 Moffat has broad wings: a saturated star 30 px away still adds a few
    ADU per pixel, so isolation is judged from the neighbours' summed profile.
    """
    stars = truth.stars
    s = small_settings()
    x, y = transform_xy(np.asarray(stars["x"]), np.asarray(stars["y"]), s.centre, row["dx"], row["dy"],
                        row["rotation_deg"])
    flux = 10 ** (-0.4 * (np.asarray(stars[f"mag_{filt}"]) - s.zeropoint(filt))) * row["exptime"] * row["transparency"]
    alpha2 = (row["fwhm_px"] / (2 * math.sqrt(2 ** (1 / 3) - 1))) ** 2
    peak = flux * 2 / (math.pi * alpha2)
    hot_x, hot_y = (np.asarray(stars.meta[f"hot_pixels_{c}"], float) for c in "xy")
    keep = []
    for i in range(len(stars)):
        if not (30 < x[i] < SIZE - 31 and 30 < y[i] < SIZE - 31):
            continue
        if np.any(np.hypot(hot_x - x[i], hot_y - y[i]) < 10 * row["fwhm_px"]):
            continue        # a hot pixel in the aperture or the sky annulus
        if peak[i] + s.bias_level + row["sky_adu"] > peak_limit or flux[i] < snr_min ** 2 / s.gain:
            continue
        d = np.hypot(x - x[i], y - y[i])
        others = d > 0
        wings = np.sum(peak[others] * (1 + d[others] ** 2 / alpha2) ** -3)   # ADU per pixel at the star
        crowded = np.any(others & (d < 12 * row["fwhm_px"]) & (flux > 0.005 * flux[i]))
        if wings * math.pi * (10 * row["fwhm_px"]) ** 2 < 0.01 * flux[i] and not crowded:
            keep.append(i)
    out = Table({"x": x[keep], "y": y[keep], "flux": flux[keep], "id": np.asarray(stars["id"])[keep]})
    return out


def measure(data: np.ndarray, x, y, fwhm: float):
    """Aperture sums (radius 4 FWHM) minus the median sky of a wide annulus (5-10 FWHM)."""
    pos = np.column_stack([x, y])
    ap = CircularAperture(pos, r=4 * fwhm)
    ann = CircularAnnulus(pos, r_in=5 * fwhm, r_out=10 * fwhm)
    sky = ApertureStats(data, ann).median
    return ApertureStats(data, ap).sum - sky * ap.area, sky


def test_stars_have_truth_fluxes(night):
    root, truth = night
    s = small_settings()
    pulls, ratios = [], []
    for name in ("M35_green_001.fits", "M35_blue_003.fits", "M35_green_002.fits"):   # green_002: thin cloud
        row = frame_row(truth, name)
        stars = isolated_bright(truth, row["filter"], row)
        assert len(stars) >= 3, name
        data = load(root, name)
        flux, sky = measure(data, stars["x"], stars["y"], row["fwhm_px"])
        r, alpha = 4 * row["fwhm_px"], row["fwhm_px"] / (2 * math.sqrt(2 ** (1 / 3) - 1))
        expected = stars["flux"] * (1 - (1 + r ** 2 / alpha ** 2) ** -2)      # Moffat beta=3 inside r
        npix, nsky = math.pi * r ** 2, math.pi * 75 * row["fwhm_px"] ** 2
        pixel_var = ((sky - s.bias_level) * s.gain + s.read_noise ** 2) / s.gain ** 2
        sigma = np.sqrt(expected / s.gain + npix * pixel_var + npix ** 2 * 1.57 * pixel_var / nsky)
        pulls += list((flux - expected) / sigma)
        ratios += list(flux / expected)
    pulls = np.array(pulls)
    assert len(pulls) >= 10
    assert np.all(np.abs(pulls) < 5), pulls
    assert abs(np.mean(pulls)) < 3 / math.sqrt(len(pulls)), pulls
    assert abs(np.median(ratios) - 1) < 0.02
    assert frame_row(truth, "M35_green_002.fits")["clouded"]


def test_render_conserves_flux_and_centroid():
    image = np.zeros((121, 121), np.float32)
    psf = Psf(fwhm=4.5, axis_ratio=1.05, angle=0.4)
    render_stars(image, np.array([60.3]), np.array([59.8]), np.array([1.0e5]), psf)
    assert image.sum() == pytest.approx(1.0e5, rel=0.005)
    yy, xx = np.mgrid[:121, :121]
    assert (image * xx).sum() / image.sum() == pytest.approx(60.3, abs=0.01)
    assert (image * yy).sum() / image.sum() == pytest.approx(59.8, abs=0.01)


def test_sky_level_matches_log(night):
    root, truth = night
    for row in truth.frames:
        if row["kind"] in ("science", "offset"):
            med = np.median(load(root, row["file"])) - small_settings().bias_level
            assert med == pytest.approx(row["sky_adu"], rel=0.02, abs=5), row["file"]
    # Sky differs per filter; a gradient makes one edge brighter than the opposite one.
    blue = frame_row(truth, "M35_blue_001.fits")["sky_adu"] / frame_row(truth, "M35_blue_001.fits")["exptime"]
    green = frame_row(truth, "M35_green_001.fits")["sky_adu"] / frame_row(truth, "M35_green_001.fits")["exptime"]
    assert green > 1.3 * blue
    data = load(root, "M35_green_001.fits")
    edges = [np.median(data[:20]), np.median(data[-20:]), np.median(data[:, :20]), np.median(data[:, -20:])]
    assert max(edges) - min(edges) > 0.1 * frame_row(truth, "M35_green_001.fits")["sky_adu"]


def _centroids(data: np.ndarray, x, y, fwhm: float, box: int = 12) -> np.ndarray:
    """Gaussian-windowed centroids (SExtractor's XWIN) after removing a plane fitted to the box border.

    A plain centre of light is pulled by the sky gradient and the box edges; the
    windowed one converges on the centre of any symmetric profile.
    """
    yy, xx = np.mgrid[-box:box + 1, -box:box + 1]
    border = (np.abs(xx) == box) | (np.abs(yy) == box)
    design = np.column_stack([np.ones(border.sum()), xx[border], yy[border]])
    sigma_w = fwhm / 2.355
    out = []
    for xi, yi in zip(x, y):
        ix, iy = int(round(xi)), int(round(yi))
        cut = data[iy - box:iy + box + 1, ix - box:ix + box + 1]
        coef, *_ = np.linalg.lstsq(design, cut[border], rcond=None)
        cut = cut - (coef[0] + coef[1] * xx + coef[2] * yy)
        cx, cy = float(xi - ix), float(yi - iy)
        for _ in range(20):
            w = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma_w ** 2)) * cut
            cx, cy = cx + 2 * (w * (xx - cx)).sum() / w.sum(), cy + 2 * (w * (yy - cy)).sum() / w.sum()
        out.append((ix + cx, iy + cy))
    return np.array(out)


def _fit_similarity(ref: np.ndarray, obs: np.ndarray) -> tuple[float, float, float]:
    """Least-squares rotation + shift (dx, dy at the frame centre, rotation in deg) from ref to obs."""
    c = (SIZE - 1) / 2
    u, v = ref[:, 0] - c, ref[:, 1] - c
    a = np.zeros((2 * len(ref), 4))
    a[0::2] = np.column_stack([u, -v, np.ones_like(u), np.zeros_like(u)])
    a[1::2] = np.column_stack([v, u, np.zeros_like(u), np.ones_like(u)])
    b = (obs - c).ravel()
    (p, q, tx, ty), *_ = np.linalg.lstsq(a, b, rcond=None)
    return tx, ty, math.degrees(math.atan2(q, p))


def test_drift_and_rotation_are_what_frames_show(night):
    root, truth = night
    first = frame_row(truth, "M35_blue_001.fits")
    assert (first["dx"], first["dy"], first["rotation_deg"]) == (0.0, 0.0, 0.0)
    last = frame_row(truth, "M35_green_003.fits")
    assert math.hypot(last["dx"], last["dy"]) > 5 and abs(last["rotation_deg"]) > 0.1
    for row in (first, last):
        stars = isolated_bright(truth, row["filter"], row, snr_min=120)
        ids = np.searchsorted(truth.stars["id"], stars["id"])
        ref = np.column_stack([truth.stars["x"][ids], truth.stars["y"][ids]])
        obs = _centroids(load(root, row["file"]), stars["x"], stars["y"], row["fwhm_px"])
        crossed = ~np.isfinite(obs).all(axis=1)         # the satellite trail can cross a star
        assert crossed.sum() <= 1
        stars, ref, obs = stars[~crossed], ref[~crossed], obs[~crossed]
        assert np.median(np.hypot(*(obs - np.column_stack([stars["x"], stars["y"]])).T)) < 0.1
        dx, dy, rot = _fit_similarity(ref, obs)
        assert dx == pytest.approx(row["dx"], abs=0.05)
        assert dy == pytest.approx(row["dy"], abs=0.05)
        assert rot == pytest.approx(row["rotation_deg"], abs=0.02)


def test_hot_pixels_fixed_including_corners(night):
    root, truth = night
    hot = truth.hot_pixels
    corners = {(0, 0), (0, SIZE - 1), (SIZE - 1, 0), (SIZE - 1, SIZE - 1)}
    assert corners <= set(map(tuple, hot.tolist()))
    assert np.sum((hot == 0) | (hot == SIZE - 1)) > 8          # more edge pixels besides the corners
    assert list(hot[:, 0]) == truth.stars.meta["hot_pixels_x"]
    for row in truth.frames:
        data = load(root, row["file"])
        noise = math.sqrt((row["sky_adu"] * 1.5 + 81)) / 1.5
        excess = data[hot[:, 1], hot[:, 0]] - np.median(data)
        assert np.all(excess > 6 * noise), row["file"]


def test_saturation_and_bright_stars(night):
    root, truth = night
    data = fits.getdata(root / "cam" / "M35_green_001.fits")
    assert data.max() == ADC_MAX
    sat_y, sat_x = np.nonzero(data == ADC_MAX)
    hot = set(map(tuple, truth.hot_pixels.tolist()))
    star_sat = [(x, y) for x, y in zip(sat_x, sat_y) if (x, y) not in hot]
    assert star_sat, "no saturated star"
    brightest = truth.stars[np.argmin(truth.stars["mag_green"])]
    assert brightest["mag_green"] < 14


def test_offset_frames_hold_other_stars(night):
    root, truth = night
    s = small_settings()
    for filt in s.filters:
        name = f"M35_offset_{filt}.fits"
        hdr = fits.getheader(root / "cam" / name)
        assert hdr["OBJECT"] == "M35 offset"
        assert (hdr["DEC"] - s.dec_deg) * 60 == pytest.approx(s.offset_arcmin, abs=0.01)
        data = load(root, name)
        row = frame_row(truth, name)
        members = truth.stars[truth.stars["member"] & (truth.stars[f"mag_{filt}"] < 17)]
        inside = (members["x"] > 10) & (members["x"] < SIZE - 11) & (members["y"] > 10) & (members["y"] < SIZE - 11)
        members = members[inside]
        flux, _ = measure(data, members["x"], members["y"], row["fwhm_px"] / 2)
        expected = 10 ** (-0.4 * (members[f"mag_{filt}"] - 25)) * row["exptime"]
        # Only the odd chance alignment with an offset-field star.
        assert np.mean(flux > 0.3 * expected) < 0.1
        own = offset_field_stars(s)
        own = own[(own[f"mag_{filt}"] < 17) & (own["x"] > 10) & (own["x"] < SIZE - 11)
                  & (own["y"] > 10) & (own["y"] < SIZE - 11)]
        assert len(own) >= 1
        flux, _ = measure(data, own["x"], own["y"], row["fwhm_px"])
        assert np.all(flux > 0.5 * 10 ** (-0.4 * (own[f"mag_{filt}"] - 25)) * row["exptime"])


def test_uint16_with_bzero(night):
    root, truth = night
    path = truth.files[0]
    assert fits.getdata(path, do_not_scale_image_data=True).dtype == np.dtype(">i2")
    hdr = fits.getheader(path)
    assert hdr["BITPIX"] == 16 and hdr["BZERO"] == 32768 and hdr["BSCALE"] == 1
    assert fits.getdata(path).dtype == np.uint16


def test_headers_like_acquisition_software(night):
    root, truth = night
    previous = ""
    for path in truth.files:
        hdr = fits.getheader(path)
        for key in ("IMAGETYP", "OBJECT", "FILTER", "EXPTIME", "EXPOSURE", "DATE-OBS", "RA", "DEC", "OBJCTRA",
                    "OBJCTDEC", "GAIN", "EGAIN", "RDNOISE", "XBINNING", "YBINNING", "CCD-TEMP", "INSTRUME",
                    "TELESCOP", "SWCREATE", "XPIXSZ", "FOCALLEN", "SATURATE"):
            assert key in hdr, (path.name, key)
        assert hdr["IMAGETYP"] == "Light Frame" and hdr["SWCREATE"] == "observer-simulator"
        assert 30 <= hdr["EXPTIME"] <= 60 and hdr["XBINNING"] == 1
        assert re.fullmatch(r"\d\d \d\d \d\d\.\d", hdr["OBJCTRA"])
        assert re.fullmatch(r"[+-]\d\d \d\d \d\d", hdr["OBJCTDEC"])
        assert hdr["DATE-OBS"] > previous
        previous = hdr["DATE-OBS"]
    assert fits.getheader(truth.files[0])["OBJCTRA"] == "06 08 54.0"
    assert [p.name for p in truth.files] == ["M35_blue_001.fits", "M35_blue_002.fits", "M35_blue_003.fits",
                                             "M35_offset_blue.fits", "M35_green_001.fits", "M35_green_002.fits",
                                             "M35_green_003.fits", "M35_offset_green.fits"]


def test_truth_catalogue_and_frame_log(night):
    root, truth = night
    stars = Table.read(root / "truth.ecsv")
    for key in ("age_myr", "log_age", "distance_modulus", "ebv", "mh", "zeropoints", "gain", "read_noise", "seed"):
        assert key in stars.meta
    assert stars.meta["log_age"] == pytest.approx(math.log10(150e6)) and stars.meta["distance_modulus"] == 10.3
    assert {"id", "x", "y", "mag_blue", "mag_green", "member"} <= set(stars.colnames)
    assert stars["member"].sum() == 80 and (~stars["member"]).sum() == 40
    assert 0.15 < stars["binary"][stars["member"]].mean() < 0.45
    frames = Table.read(root / "truth_frames.ecsv")
    assert list(frames["file"]) == [p.name for p in truth.files]
    assert frames["trailed"].sum() == 1 and frames["clouded"].sum() == 1 and frames["satellite"].sum() == 1
    assert frames["filter"][frames["trailed"]][0] == "blue" and frames["filter"][frames["clouded"]][0] == "green"
    assert frames["elongation"][frames["trailed"]][0] > 1.35
    assert np.all(frames["elongation"][~frames["trailed"]] < 1.2)
    assert frames["transparency"][frames["clouded"]][0] <= 0.6


def test_truth_inside_camdir_is_refused(tmp_path):
    with pytest.raises(ValueError, match="inside the camera folder"):
        simulate_night(tmp_path / "cam", small_settings(), truth_path=tmp_path / "cam" / "truth.ecsv")


def test_same_seed_same_bytes(night, tmp_path):
    root, truth = night
    again = simulate_night(tmp_path / "cam", small_settings(), truth_path=tmp_path / "truth.ecsv")
    for a, b in zip(truth.files, again.files):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert (root / "truth.ecsv").read_bytes() == (tmp_path / "truth.ecsv").read_bytes()
    other = simulate_night(tmp_path / "cam2", small_settings(seed=8, frames=1), truth_path=tmp_path / "t2.ecsv")
    assert other.files[0].read_bytes() != truth.files[0].read_bytes()


def test_file_is_seen_growing(tmp_path):
    settings = small_settings(size=256, frames=1, filters=("green",), fill_seconds=1.0)
    target = tmp_path / "cam" / "M35_green_001.fits"
    worker = threading.Thread(target=simulate_night, args=(tmp_path / "cam", settings),
                              kwargs={"truth_path": tmp_path / "truth.ecsv"})
    worker.start()
    sizes = []
    deadline = time.monotonic() + 30
    while worker.is_alive() and time.monotonic() < deadline:
        if target.exists():
            sizes.append(os.path.getsize(target))
        time.sleep(0.02)
    worker.join()
    final = target.stat().st_size
    partial = sorted(set(v for v in sizes if v < final))
    assert len(partial) >= 2, sizes
    assert partial == sorted(partial) and partial[0] % 2880 == 0


def test_calibration_frames(tmp_path):
    s = small_settings(size=256, frames=2, filters=("blue", "green"), calibration=True, n_members=30, n_field=10)
    truth = simulate_night(tmp_path / "cam", s, truth_path=tmp_path / "truth.ecsv")
    kinds = {row["file"]: row["kind"] for row in truth.frames}
    assert sum(k == "bias" for k in kinds.values()) == 5
    assert sum(k == "flat" for k in kinds.values()) == 10
    exptimes = sorted(set(truth.frames["exptime"][truth.frames["kind"] == "science"]))
    assert sorted(set(truth.frames["exptime"][truth.frames["kind"] == "dark"])) == exptimes
    assert [kinds[p.name] for p in truth.files][:5] == ["bias"] * 5     # calibration first
    imagetyp = {"bias": "Bias Frame", "dark": "Dark Frame", "flat": "Flat Field", "science": "Light Frame",
                "offset": "Light Frame"}
    for path in truth.files:
        assert fits.getheader(path)["IMAGETYP"] == imagetyp[kinds[path.name]]
    bias = load(tmp_path, "bias_001.fits")
    assert np.median(bias) == pytest.approx(s.bias_level, abs=5)
    dark = load(tmp_path, "dark_001.fits")
    assert np.median(dark[:20, :20]) - np.median(bias[:20, :20]) > 20    # amp glow in one corner
    flat = load(tmp_path, "flat_green_001.fits") - s.bias_level
    centre = np.median(flat[118:138, 118:138])
    assert np.median(flat[:15, :15]) < 0.9 * centre                      # vignetting


def _core_elongation(data: np.ndarray, x: float, y: float, box: int = 12) -> float:
    """Major/minor axis ratio from the second moments of the pixels above 10 % of the peak."""
    ix, iy = int(round(x)), int(round(y))
    cut = data[iy - box:iy + box + 1, ix - box:ix + box + 1]
    cut = cut - np.median(data[iy - 3 * box:iy + 3 * box, ix - 3 * box:ix + 3 * box])
    w = np.where(cut > 0.1 * cut.max(), cut, 0.0)
    yy, xx = np.mgrid[:cut.shape[0], :cut.shape[1]]
    mx, my = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
    cov = np.cov(np.vstack([xx.ravel() - mx, yy.ravel() - my]), aweights=w.ravel())
    low, high = np.linalg.eigvalsh(cov)
    return math.sqrt(high / low)


def test_trailed_frame_and_satellite_show_in_the_images(night):
    root, truth = night
    elong = {}
    for name in ("M35_blue_001.fits", "M35_blue_002.fits"):
        row = frame_row(truth, name)
        stars = isolated_bright(truth, "blue", row, snr_min=150)
        data = load(root, name)
        elong[name] = np.median([_core_elongation(data, x, y) for x, y in zip(stars["x"], stars["y"])])
    assert frame_row(truth, "M35_blue_002.fits")["trailed"]
    assert elong["M35_blue_002.fits"] > 1.35 > 1.15 > elong["M35_blue_001.fits"]
    assert elong["M35_blue_002.fits"] == pytest.approx(frame_row(truth, "M35_blue_002.fits")["elongation"], rel=0.1)

    def bright_pixels(name: str) -> int:
        data = load(root, name)
        noise = math.sqrt(frame_row(truth, name)["sky_adu"] * 1.5 + 81) / 1.5
        return int(np.sum(data > np.median(data) + 8 * noise))

    assert frame_row(truth, "M35_green_003.fits")["satellite"]
    assert bright_pixels("M35_green_003.fits") - bright_pixels("M35_green_001.fits") > SIZE


def test_members_follow_the_isochrone(night):
    """Single members sit on the PARSEC isochrone (B, V shifted by distance and reddening)."""
    from reduction.isochrones import A_OVER_EBV, get_isochrone

    _, truth = night
    stars, meta = truth.stars, truth.stars.meta
    iso = get_isochrone(meta["log_age"], meta["mh"])
    ms = iso.label <= 1            # pre-main sequence and main sequence
    v = iso.mag("V")[ms] + meta["distance_modulus"] + A_OVER_EBV["V"] * meta["ebv"]
    bv = iso.mag("B")[ms] - iso.mag("V")[ms] + (A_OVER_EBV["B"] - A_OVER_EBV["V"]) * meta["ebv"]
    single = stars[stars["member"] & ~stars["binary"] & (stars["stage"] <= 1)]
    assert len(single) > 10
    order = np.argsort(v)
    predicted = np.interp(single["mag_green"], v[order], bv[order])
    assert np.allclose(single["mag_blue"] - single["mag_green"], predicted, atol=0.02)
    binaries = stars[stars["member"] & stars["binary"] & (stars["stage"] <= 1)]
    # An unresolved companion makes a star brighter at a similar colour: redder than a single star of its V.
    excess = binaries["mag_blue"] - binaries["mag_green"] - np.interp(binaries["mag_green"], v[order], bv[order])
    assert np.median(excess) > 0.01 and np.all(excess > -0.02)


def test_stop_ends_a_live_night_early(tmp_path):
    stop = threading.Event()
    settings = small_settings(size=128, frames=5, filters=("green",), cadence=0.3, n_members=10, n_field=5)
    result = {}
    worker = threading.Thread(target=lambda: result.update(night=simulate_night(
        tmp_path / "cam", settings, truth_path=tmp_path / "truth.ecsv", stop=stop)))
    worker.start()
    deadline = time.monotonic() + 30
    while not (tmp_path / "cam" / "M35_green_002.fits").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert 2 <= len(result["night"].files) < 6
    assert sorted(p.name for p in (tmp_path / "cam").iterdir()) == sorted(p.name for p in result["night"].files)


def test_first_bad_makes_each_filters_first_frame_the_only_bad_one():
    """``--first-bad``: the first frame of every filter is trailed, clouded or twice as sharp, and no other
    frame is (the usual mid-sequence bad frames are left out)."""
    for bad in ("trailed", "cloud", "sharp"):
        plans = [p for p in plan_night(SimSettings(frames=4, short_frames=0, first_bad=bad)) if p.kind == "science"]
        first = [p for p in plans if p.file.endswith("_001.fits")]
        rest = [p for p in plans if p not in first]
        assert len(first) == 2 and len(rest) == 6
        assert all(p.trailed == (bad == "trailed") and p.clouded == (bad == "cloud") for p in first)
        assert not any(p.trailed or p.clouded for p in rest)
        for p in first:
            others = np.median([q.psf.fwhm for q in rest if q.filter == p.filter])
            if bad == "sharp":
                assert p.psf.fwhm == pytest.approx(FIRST_SHARP_FACTOR * others, rel=0.25)
            else:
                assert p.psf.fwhm == pytest.approx(others, rel=0.25)
    with pytest.raises(ConfigError, match="first_bad"):
        SimSettings(first_bad="fog")
