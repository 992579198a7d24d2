"""Any seeing: nights from undersampled (FWHM 1.4 px) to poor (8 px), each with a trailed and a clouded frame.

Through the real command line (``observer simulate --fwhm`` then ``observer
reprocess``), scored against the simulator's truth. Before, every frame of a
night at FWHM 1.4-2.2 px was lost (star cores repaired as hot pixels), and at
6-8 px a short trail passed an absolute elongation limit and a detection near
the edge crashed the frame.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from scipy.spatial import cKDTree

from observer.ledger import Ledger
from reduction.photometry import FLAG_EDGE, FLAG_LOW_COVERAGE, FLAG_SATURATED

SIZE = 1024      # the nights: 827 stars, 90 of them saturated in green


def observer(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "observer.cli", *args], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def simulate(root: Path, fwhm: str, *extra: str, size: int | str = SIZE) -> Path:
    """``observer simulate`` of a 4-frame night per filter into ``root/cam``; the camera folder."""
    observer("simulate", str(root / "cam"), "--size", str(size), "--frames", "4", "--short", "0:0",
             "--fwhm", fwhm, "--seed", "3", "--truth", str(root / "truth.ecsv"), *extra)
    return root / "cam"


def reprocess(root: Path, cam: Path, out: str = "out") -> Path:
    """``observer reprocess`` of ``cam`` into ``root/out``, without the age fit; the output folder."""
    # No age fit: these nights score the frames and the photometry, and the fit would double their time.
    (root / "config.yaml").write_text("age:\n  enabled: false\n")
    observer("reprocess", str(cam), "--out", str(root / out), "--config", str(root / "config.yaml"))
    return root / out


def reduce_night(root: Path, fwhm: str) -> Path:
    return reprocess(root, simulate(root, fwhm))


def assert_bad_frames_rejected_good_ones_stacked(out: Path) -> Table:
    """The trailed and the clouded frame rejected for their reason, every other one stacked; the science rows."""
    frames = Table.read(out / "frames.ecsv")
    science = frames[frames["kind"] == "science"]
    status = {Path(p).name: (s, r) for p, s, r in zip(science["path"], science["status"], science["reason"])}
    trailed, clouded = status.pop("M35_blue_003.fits"), status.pop("M35_green_003.fits")
    assert trailed[0] == "rejected" and "trailed" in trailed[1]
    assert clouded[0] == "rejected" and "cloud" in clouded[1]
    assert all(s == "stacked" for s, _ in status.values()), status
    assert not any("internal error" in r for r in frames["reason"])
    return science


def assert_photometry(out: Path, size: int = SIZE) -> None:
    """Completeness of unsaturated stars (of isolated ones too), clean scatter and pull, per filter."""
    catalog = Table.read(out / "M35" / "catalog.ecsv")
    truth = Table.read(out.parent / "truth.ecsv")
    m = 10
    truth = truth[(truth["x"] > m) & (truth["x"] < size - m) & (truth["y"] > m) & (truth["y"] < size - m)]
    dist, idx = cKDTree(np.column_stack([catalog["x"], catalog["y"]])).query(
        np.column_stack([truth["x"], truth["y"]]), distance_upper_bound=1.5)
    found = np.isfinite(dist)
    neighbour = cKDTree(np.column_stack([truth["x"], truth["y"]])).query(
        np.column_stack([truth["x"], truth["y"]]), k=2)[0][:, 1]
    for f in ("blue", "green"):
        limit = catalog.meta["limiting_mag_5sigma"][f]
        unsaturated = (truth["mag_green"] > 14.5) & (truth[f"mag_{f}"] < limit - 2.5)
        isolated = unsaturated & (neighbour > 6)
        assert isolated.sum() >= 20
        # Measured (blue / green) 0.974 / 0.974, 0.974 / 0.974, 0.975 / 0.953 and 0.936 / 0.930 from sharp to
        # 6-8 px; the isolated ones 0.99-1.0, and 0.96 at 6-8 px. At 6-8 px it was 0.917 / 0.908 while pairs
        # closer than 1 FWHM were one source (reduction.deblend), 0.899 / 0.887 while each star was centred
        # on the image itself: a brighter star 2-3 FWHM away pulled the window, and stars within 3 FWHM of
        # one were 0.6 px off (median), 17 % beyond the 1.5 px match.
        assert found[unsaturated].mean() >= 0.9, (f, found[unsaturated].mean())
        assert found[isolated].mean() >= 0.9, (f, found[isolated].mean())
        # Scored on isolated stars: this is the seeing's test; crowding is the blend flag's (issues 13, 20).
        picked = found & isolated
        rows = idx[picked]
        clean = np.asarray(catalog["flags"])[rows] == 0
        diff = (np.asarray(catalog[f"mag_{f}"])[rows] - np.asarray(truth[f"mag_{f}"])[picked])[clean]
        err = np.asarray(catalog[f"magerr_{f}"])[rows][clean]
        true_mag = np.asarray(truth[f"mag_{f}"])[picked][clean]
        bright = true_mag <= np.median(true_mag)             # the brighter half of the clean stars
        assert bright.sum() >= 5
        scatter = 1.4826 * np.median(np.abs(diff[bright] - np.median(diff[bright])))
        pull = 1.4826 * np.median(np.abs((diff - np.median(diff)) / err))
        # Measured 0.0022-0.0066.
        assert scatter <= 0.01, (f, scatter)
        # Measured 0.91 / 0.87, 0.96 / 0.88, 0.72 / 0.93, 1.21 / 1.10 (11-14 clean stars at 6-8 px, where
        # the others are flagged blended). At 6-8 px it was 1.58 / 1.43 while a saturated star in a star's
        # annulus (28-43 px there), which takes more sky than its wing leaves light in the aperture, counted
        # as no contamination; 1.73 / 1.81 before a neighbour's light was averaged over the aperture. At
        # 1.8-2.2 px it was 1.52 while stars 6 px from a saturated one went unflagged.
        assert 0.7 <= pull <= 1.5, (f, pull)


@pytest.mark.parametrize("fwhm", ["1.4:1.7", "1.8:2.2", "3:4", "6:8"])
def test_every_good_frame_stacked_bad_ones_rejected_for_their_reason(tmp_path, fwhm):
    out = reduce_night(tmp_path, fwhm)
    science = assert_bad_frames_rejected_good_ones_stacked(out)
    low, high = (float(v) for v in fwhm.split(":"))
    measured = np.asarray(science["fwhm"], float)[science["status"] == "stacked"]
    assert low * 0.8 <= np.median(measured) <= high * 1.2
    assert_photometry(out)


def test_a_wide_camera_frame_is_reduced_the_right_way_round(tmp_path):
    """Most cameras are not square (3:2 here, ``--size 480x320``): an axis transposed anywhere (registration,
    sky, stack, catalogue) would lose the stars, shift them or dim part of the frame."""
    width, height = 480, 320
    out = reprocess(tmp_path, simulate(tmp_path, "3:4", size=f"{width}x{height}"))
    assert_bad_frames_rejected_good_ones_stacked(out)
    for f in ("blue", "green"):
        assert fits.getdata(out / "M35" / f / "stack.fits").shape == (height, width)
    catalog, truth = Table.read(out / "M35" / "catalog.ecsv"), Table.read(tmp_path / "truth.ecsv")
    m = 10
    truth = truth[(truth["x"] > m) & (truth["x"] < width - m) & (truth["y"] > m) & (truth["y"] < height - m)]
    xy = np.column_stack([truth["x"], truth["y"]])
    dist, idx = cKDTree(np.column_stack([catalog["x"], catalog["y"]])).query(xy, distance_upper_bound=1.5)
    limit = min(catalog.meta["limiting_mag_5sigma"].values())
    isolated = (truth["mag_green"] > 14.5) & (truth["mag_green"] < limit - 2.5) & \
        (cKDTree(xy).query(xy, k=2)[0][:, 1] > 6)
    found = isolated & np.isfinite(dist)
    assert isolated.sum() >= 30 and found.sum() >= 0.85 * isolated.sum()     # measured 0.91 (0.95-0.97 seeds 4-5)
    rows = idx[found]
    for axis in ("x", "y"):                 # measured: medians within 0.005 px, robust scatter 0.015-0.023 px
        error = np.asarray(catalog[axis])[rows] - np.asarray(truth[axis])[found]
        assert abs(np.median(error)) < 0.02 and 1.4826 * np.median(np.abs(error - np.median(error))) < 0.05, axis
    # The whole frame at one zeropoint: the clean stars' magnitudes (robust scatter measured 0.008-0.016 mag on
    # 18-19 stars; a sky or flat laid the wrong way round would dim one side by tenths).
    clean = np.asarray(catalog["flags"])[rows] == 0
    diff = (np.asarray(catalog["mag_green"])[rows] - np.asarray(truth["mag_green"])[found])[clean]
    assert clean.sum() >= 10 and 1.4826 * np.median(np.abs(diff - np.median(diff))) < 0.03


def test_a_trailed_first_frame_is_rejected_and_the_clear_ones_stacked(tmp_path):
    """The trailed frame moved to the head of its filter: the stars' aligned position angles say trail (not
    coma, which a first frame is stacked despite), so it is rejected, and the clear frames after it are
    judged against each other (it used to become the filter's flux reference, and every clear frame was
    then rejected as 'cloud' at transparency 0.45)."""
    from astropy.io import fits
    from astropy.time import Time, TimeDelta

    from observer.config import Settings
    from observer.reprocess import process_existing
    from observer.simulator import SimSettings, simulate_night

    simulate_night(tmp_path / "cam", SimSettings(size=384, frames=4, fill_seconds=0.0, satellite=False),
                   truth_path=tmp_path / "truth.ecsv")
    first = Time(fits.getheader(tmp_path / "cam" / "M35_blue_001.fits")["DATE-OBS"])
    with fits.open(tmp_path / "cam" / "M35_blue_003.fits", mode="update") as hdul:   # the trailed one
        hdul[0].header["DATE-OBS"] = (first - TimeDelta(60, format="sec")).isot
    night = process_existing(tmp_path / "cam", tmp_path / "out", Settings())
    blue = {Path(r.path).name: r for r in night.records if r.filter == "blue" and r.kind == "science"}
    trailed = blue["M35_blue_003.fits"]
    assert trailed.status == "rejected" and trailed.reason.startswith("trailed: elongation"), trailed.reason
    truth = Table.read(tmp_path / "truth_frames.ecsv")
    true_t = dict(zip(truth["file"], truth["transparency"]))
    best = 0.0
    for name in ("M35_blue_001.fits", "M35_blue_002.fits", "M35_blue_004.fits"):
        assert blue[name].status == "stacked", (name, blue[name].reason)
        # Transparency is relative to the best frame so far, measured on the same stars: this night's
        # frames differ in seeing (3.0-3.6 px), which once read as 20 % of cloud in the crowded centre.
        best = max(best, true_t[name])
        assert blue[name].transparency == pytest.approx(true_t[name] / best, abs=0.03), name


def science_rows(out: Path) -> dict[str, tuple[str, str, float]]:
    """frames.ecsv's science rows by file name: (status, reason, transparency); one row per file asserted."""
    frames = Table.read(out / "frames.ecsv")
    science = frames[frames["kind"] == "science"]
    names = [Path(p).name for p in science["path"]]
    assert len(names) == len(set(names)), names
    reasons = science["reason"].filled("") if hasattr(science["reason"], "filled") else science["reason"]
    return {n: (str(s), str(r), float(t)) for n, s, r, t in zip(names, science["status"], reasons,
                                                                science["transparency"])}


FIRST_FRAMES = ("M35_blue_001.fits", "M35_green_001.fits")


@pytest.mark.parametrize("bad, reason", [("cloud", "cloud"), ("trailed", "trailed")])
def test_a_bad_first_frame_is_rejected_and_the_products_are_those_of_it_last(tmp_path, bad, reason):
    """``--first-bad``: the first frame of each filter is clouded (transparency 0.5) or trailed. It is
    rejected for its reason and the clear frames stacked; the night with the same files, the bad ones
    taken last (DATE-OBS moved after the filter's last frame), gives the same stacks and magnitudes.
    Before, a clouded first frame was stacked and stayed the flux reference (every clear frame 2x it)."""
    from astropy.io import fits
    from astropy.time import Time, TimeDelta

    cam = simulate(tmp_path, "3:4", "--first-bad", bad, size=384)
    first = reprocess(tmp_path, cam, "first")
    last_cam = tmp_path / "cam_last"
    shutil.copytree(cam, last_cam)
    for name in FIRST_FRAMES:
        latest = max(Time(fits.getheader(p)["DATE-OBS"]) for p in last_cam.glob(name.replace("001", "00[2-9]")))
        with fits.open(last_cam / name, mode="update") as hdul:
            hdul[0].header["DATE-OBS"] = (latest + TimeDelta(1, format="sec")).isot
    last = reprocess(tmp_path, last_cam, "last")
    truth = Table.read(tmp_path / "truth_frames.ecsv")
    true_t = dict(zip(truth["file"], truth["transparency"]))
    for out in (first, last):
        rows = science_rows(out)
        assert len(rows) == 8
        for name, (status, why, transparency) in rows.items():
            if name in FIRST_FRAMES:
                assert status == "rejected" and reason in why, (out.name, name, why)
            else:
                assert status == "stacked", (out.name, name, why)
                # Relative to the clearest frame of the filter: never to the clouded one (it would read 2).
                filt = name.split("_")[1]
                best = max(true_t[n] for n in rows if n not in FIRST_FRAMES and f"_{filt}_" in n)
                assert transparency == pytest.approx(true_t[name] / best, abs=0.03), (out.name, name)
    ledger = Ledger(first / "ledger.sqlite")      # the rejected first frames' rows say so there too
    assert [row.status for name in FIRST_FRAMES for row in ledger.by_path(cam / name)] == ["rejected"] * 2
    ledger.close()
    box = np.s_[40:-40, 40:-40]
    for filt in ("blue", "green"):
        a, b = (fits.open(out / "M35" / filt / "stack.fits")[0] for out in (first, last))
        assert a.header["NCOMBINE"] == b.header["NCOMBINE"] == 3
        assert a.header["SKYLEVEL"] == pytest.approx(b.header["SKYLEVEL"], rel=0.02)
        # The same flux scale: the clearest frame's (measured 1.3 % and 0.1 % apart: the two runs' flux
        # reference stars differ; scaled by the clouded frame's throughput it would be 2x).
        assert a.data[box].sum() == pytest.approx(b.data[box].sum(), rel=0.03), filt
    # The same stars, on grids that differ by the shift between the two runs' first frames (~1.4 px).
    cat_a, cat_b = (Table.read(out / "M35" / "catalog.ecsv") for out in (first, last))
    xy_a = np.column_stack([cat_a["x"], cat_a["y"]])
    xy_b = np.column_stack([cat_b["x"], cat_b["y"]])
    dist, idx = cKDTree(xy_a).query(xy_b, distance_upper_bound=3.0)
    shift = np.median(xy_a[idx[np.isfinite(dist)]] - xy_b[np.isfinite(dist)], axis=0)
    dist, idx = cKDTree(xy_a).query(xy_b + shift, distance_upper_bound=1.0)
    clean = np.isfinite(dist)
    # Blended stars are compared too (the same neighbours in both); saturated, edge or thin ones are not.
    unclean = FLAG_SATURATED | FLAG_EDGE | FLAG_LOW_COVERAGE
    clean[clean] = ((np.asarray(cat_b["flags"])[clean] | np.asarray(cat_a["flags"])[idx[clean]]) & unclean) == 0
    assert clean.sum() >= 50
    for filt in ("blue", "green"):
        # The catalogue's aperture correction is a median over crowded stars with a scatter as large as
        # itself (measured 2.74 against 3.08 in blue for stacks 1.3 % apart): the magnitudes are compared
        # without it.
        apcorr = 2.5 * np.log10(cat_a.meta["aperture_correction"][filt] / cat_b.meta["aperture_correction"][filt])
        mag_a = np.asarray(cat_a[f"mag_{filt}"], float)[idx[clean]] + apcorr
        mag_b = np.asarray(cat_b[f"mag_{filt}"], float)[clean]
        err = np.hypot(np.asarray(cat_a[f"magerr_{filt}"], float)[idx[clean]],
                       np.asarray(cat_b[f"magerr_{filt}"], float)[clean])
        ok = np.isfinite(mag_a) & np.isfinite(mag_b)
        diff = mag_a[ok] - mag_b[ok]
        # The same frames on grids a fraction of a pixel apart: within the errors, and no offset beyond
        # the stacks' flux scales (a stack scaled by the clouded frame's throughput would be 0.75 mag off).
        assert abs(np.median(diff)) < 0.03, (filt, np.median(diff))
        assert np.median(np.abs(diff - np.median(diff)) / err[ok]) < 0.5, filt


def test_a_very_sharp_first_frame_does_not_set_the_seeing_baseline(tmp_path):
    """``--first-bad sharp``: each filter's first frame at half the seeing. The seeing baseline is the
    median of the first three frames, so the normal frames after it are not rejected as 2x its FWHM."""
    out = reprocess(tmp_path, simulate(tmp_path, "3:4", "--first-bad", "sharp", size=384))
    rows = science_rows(out)
    assert len(rows) == 8
    assert all(status == "stacked" for status, _, _ in rows.values()), rows
    frames = Table.read(out / "frames.ecsv")
    fwhm = {Path(p).name: f for p, f in zip(frames["path"], frames["fwhm"])}
    for filt in ("blue", "green"):
        others = np.median([f for n, f in fwhm.items() if f"_{filt}_00" in n and n not in FIRST_FRAMES])
        assert fwhm[f"M35_{filt}_001.fits"] < 0.6 * others      # it was that sharp
