"""`observer reprocess` on a simulated 2048 x 2048 night, 10 frames per filter, scored against truth.

This is the issue's acceptance test: the real command line on real FITS files,
products checked for their format, and the catalogue checked for completeness,
spurious detections, positions, photometric scatter and error honesty.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from observer.config import Settings
from observer.night import Night
from observer.simulator import SimSettings, simulate_night, transform_xy
from observer.truth import score_catalog
from reduction.catalog import build_catalog  # noqa: F401  (the catalogue's own module must import cleanly)

SIZE = 2048
FRAMES = 10


def observer(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "observer.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=900)


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """Simulate with the command line, then reprocess with the command line."""
    root = tmp_path_factory.mktemp("night2048")
    sim = observer("simulate", str(root / "cam"), "--size", str(SIZE), "--frames", str(FRAMES), "--short", "0:0",
                   cwd=root)
    assert sim.returncode == 0, sim.stderr
    run = observer("reprocess", str(root / "cam"), "--out", str(root / "out"), cwd=root)
    assert run.returncode == 0, run.stderr
    return {"root": root, "out": root / "out", "stderr": run.stderr,
            "truth": Table.read(root / "truth.ecsv"), "log": Table.read(root / "truth_frames.ecsv"),
            "frames": Table.read(root / "out" / "frames.ecsv")}


def test_progress_is_shown(night):
    assert "22/22" in night["stderr"]
    assert "frames/min" in night["stderr"]


def test_every_file_once_with_the_right_status(night):
    frames, log = night["frames"], night["log"]
    names = [Path(p).name for p in frames["path"]]
    assert sorted(names) == sorted(log["file"])
    assert len(set(names)) == len(names)
    status = dict(zip(names, frames["status"]))
    reasons = dict(zip(names, frames["reason"]))
    for row in log:
        if row["kind"] == "offset":
            assert status[row["file"]] == "offset"
        elif row["trailed"] or row["clouded"]:
            assert status[row["file"]] == "rejected"
            assert ("elongation" in reasons[row["file"]] or "FWHM" in reasons[row["file"]]) if row["trailed"] \
                else "transparency" in reasons[row["file"]]
        else:
            assert status[row["file"]] == "stacked", (row["file"], reasons[row["file"]])


def test_quality_columns_match_truth(night):
    frames, log = night["frames"], night["log"]
    by_name = {Path(p).name: r for p, r in zip(frames["path"], frames)}
    for row in log:
        if row["kind"] != "science" or row["trailed"]:
            continue
        got = by_name[row["file"]]
        assert got["fwhm"] == pytest.approx(row["fwhm_px"], rel=0.05)
        assert got["dx"] == pytest.approx(row["dx"], abs=0.05)
        assert got["dy"] == pytest.approx(row["dy"], abs=0.05)
        assert got["rotation"] == pytest.approx(row["rotation_deg"], abs=0.005)
        if row["clouded"]:
            assert got["transparency"] == pytest.approx(row["transparency"], rel=0.05)


def test_stacks_are_valid_fits_with_the_design_keywords(night):
    frames = night["frames"]
    for filt in ("blue", "green"):
        path = night["out"] / "M35" / filt / "stack.fits"
        with fits.open(path) as hdul:
            header = hdul[0].header
            assert hdul[0].data.dtype.newbyteorder("=") == np.float32 and hdul[0].data.shape == (SIZE, SIZE)
            stacked = int(np.sum((frames["filter"] == filt) & (frames["status"] == "stacked")))
            assert header["NCOMBINE"] == stacked == FRAMES - 1
            assert header["OBJECT"] == "M35" and header["FILTER"] == filt and header["EXPTIME"] > 0
            nframes = hdul["NFRAMES"].data
            assert nframes.max() == stacked and np.median(nframes) == stacked
        if shutil.which("fitsverify"):
            check = subprocess.run(["fitsverify", "-q", str(path)], capture_output=True, text=True)
            assert "0 error" in check.stdout + check.stderr or check.returncode == 0, check.stdout


def test_catalogue_against_truth(night):
    catalog = Table.read(night["out"] / "M35" / "catalog.ecsv")
    expected = ["id", "x", "y"]
    for f in ("blue", "green"):
        expected += [f"flux_{f}", f"fluxerr_{f}", f"mag_{f}", f"magerr_{f}"]
    assert catalog.colnames[:len(expected)] == expected
    assert {"color", "flags"} <= set(catalog.colnames)
    ok = np.isfinite(catalog["color"])
    np.testing.assert_allclose(catalog["color"][ok], (catalog["mag_blue"] - catalog["mag_green"])[ok], atol=1e-9)

    limits = catalog.meta["limiting_mag_5sigma"]
    score = score_catalog(catalog, night["truth"], ("blue", "green"), limits, (SIZE, SIZE))
    print(score)
    assert score.n_bright_truth > 150
    assert score.completeness >= 0.95
    assert score.spurious_fraction <= 0.03
    assert score.position_rms <= 0.1
    for key in ("blue", "green", "color"):
        assert score.scatter[key] <= 0.01
    for f in ("blue", "green"):
        assert 0.7 <= score.error_ratio[f] <= 1.5


def test_saturated_stars_are_flagged_not_lost(night):
    catalog = Table.read(night["out"] / "M35" / "catalog.ecsv")
    truth = night["truth"]
    brightest = truth[np.argsort(truth["mag_green"])[:5]]
    from scipy.spatial import cKDTree

    dist, idx = cKDTree(np.column_stack([catalog["x"], catalog["y"]])).query(
        np.column_stack([brightest["x"], brightest["y"]]))
    inside = (brightest["x"] > 30) & (brightest["x"] < SIZE - 30) & (brightest["y"] > 30) & (brightest["y"] < SIZE - 30)
    assert np.all(dist[inside] < 1.0)
    assert np.all(catalog["flags"][idx[inside]] & 1)


def test_cmd_figure_and_age(night):
    png = night["out"] / "M35" / "cmd.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    age = json.loads((night["out"] / "M35" / "age.json").read_text())
    assert {"log_age", "age_myr", "log_age_low", "log_age_high", "n_stars"} <= set(age)


def test_frame_order_does_not_change_the_magnitudes(tmp_path):
    """Two orders of the same (small) night give the same magnitudes within the errors."""
    cam = tmp_path / "cam"
    truth = simulate_night(cam, SimSettings(size=512, frames=4, fill_seconds=0.0, seed=3, bad_frames=False),
                           truth_path=tmp_path / "truth.ecsv")
    assert truth is not None
    files = sorted(cam.glob("*.fits"))
    settings = Settings()
    settings = dataclasses.replace(settings, age=dataclasses.replace(settings.age, enabled=False))   # magnitudes only
    results = []
    for order in (files, files[::-1]):
        night = Night(settings, tmp_path / f"out{len(results)}")
        for path in order:
            night.process(path)
        night.write_all_products()
        results.append(Table.read(night.outdir / "M35" / "catalog.ecsv"))
    first, second = results
    # Each order's reference grid is its first science frame's: bring the truth onto it.
    t = Table.read(tmp_path / "truth.ecsv")
    log = Table.read(tmp_path / "truth_frames.ecsv")
    from scipy.spatial import cKDTree

    def on_truth(cat, reference):
        row = log[list(log["file"]).index(reference.name)]
        tx, ty = transform_xy(np.asarray(t["x"]), np.asarray(t["y"]), SimSettings(size=512).centre, row["dx"], row["dy"],
                              row["rotation_deg"])
        d, i = cKDTree(np.column_stack([tx, ty])).query(np.column_stack([cat["x"], cat["y"]]))
        return {int(k): r for k, r, dd in zip(i, cat, d) if dd < 1.5}

    science = [p for p in files if "offset" not in p.name]
    a, b = on_truth(first, science[0]), on_truth(second, science[-1])
    common = [k for k in a if k in b and a[k]["flags"] == 0 and b[k]["flags"] == 0]
    assert len(common) > 50
    for f in ("blue", "green"):
        diff = np.array([a[k][f"mag_{f}"] - b[k][f"mag_{f}"] for k in common])
        err = np.array([np.hypot(a[k][f"magerr_{f}"], b[k][f"magerr_{f}"]) for k in common])
        ok = np.isfinite(diff) & np.isfinite(err)
        diff -= np.median(diff[ok])
        assert np.mean(np.abs(diff[ok]) < 3 * err[ok]) > 0.97
