"""The gain is never silent: without a GAIN keyword or camera.gain it is estimated, logged once, carried by
the stack header and age.json, restored by the checkpoint, and refused (naming camera.gain) when implausible.

Nights are drawn with the real command line (`observer simulate --gain G --no-gain-keyword`) and reduced
as `observer reprocess` does (``process_existing``), then checked against the simulator's gain.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from scipy.spatial import cKDTree

from ccd_frames import write_ccd_night
from observer import checkpoint
from observer.config import CameraSettings, Settings
from observer.reprocess import process_existing
from observer.session import CameraGain, NightState
from observer.simulator import SimSettings, simulate_night
from observer.truth import score_catalog
from reduction.gain import GainError, check_plausible, photon_transfer_gain, sky_noise_gain

SIZE = 256


def simulate(camdir: Path, gain: float, *extra: str) -> None:
    """A small night of known gain, written without GAIN/EGAIN by the command line."""
    result = subprocess.run([sys.executable, "-m", "observer.cli", "simulate", str(camdir), "--size", str(SIZE),
                             "--frames", "2", "--short", "0:0", "--gain", str(gain), "--no-gain-keyword", *extra],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def reduce(camdir: Path, outdir: Path, caplog) -> str:
    """Reprocess ``camdir``; the log lines of observer.gain."""
    with caplog.at_level(logging.INFO, logger="observer.gain"):
        process_existing(camdir, outdir, Settings())
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "observer.gain")


def stack_gain(outdir: Path, filt: str = "blue") -> tuple[float, str]:
    header = fits.getheader(outdir / "M35" / filt / "stack.fits")
    return header["GAIN"], header["GAINSRC"]


@pytest.mark.parametrize("gain", [0.25, 2.0])
def test_photon_transfer_from_the_nights_flats_and_biases(tmp_path, caplog, gain):
    simulate(tmp_path / "cam", gain, "--calibration")
    lines = reduce(tmp_path / "cam", tmp_path / "out", caplog)
    for filt in ("blue", "green"):
        value, source = stack_gain(tmp_path / "out", filt)
        assert source == "photon transfer"
        assert value == pytest.approx(gain, rel=0.10)
    # Once per night (not per frame), with the value and where it came from.
    assert lines.count("estimated from the photon transfer") == 1, lines
    record = json.loads((tmp_path / "out" / "M35" / "age.json").read_text())
    assert record["gain"]["source"] == "photon transfer"
    assert record["gain"]["value"] == pytest.approx(gain, rel=0.10)


@pytest.mark.parametrize("gain", [0.25, 2.0])
def test_sky_noise_of_an_overscan_ccd_without_calibration_frames(tmp_path, caplog, gain):
    """No flats, no biases: the overscan gives the frame's zero, the sky's noise the gain."""
    simulate(tmp_path / "sim", gain)
    header = fits.getheader(tmp_path / "sim" / "M35_blue_001.fits")
    assert "GAIN" not in header and "EGAIN" not in header
    assert Table.read(tmp_path / "truth.ecsv").meta["gain"] == gain
    write_ccd_night(tmp_path / "sim", tmp_path / "cam")
    lines = reduce(tmp_path / "cam", tmp_path / "out", caplog)
    value, source = stack_gain(tmp_path / "out")
    assert source == "sky noise"
    assert value == pytest.approx(gain, rel=0.10)
    assert lines.count("estimated from the sky noise of M35_") == 1, lines
    assert "(no GAIN keyword, no camera.gain)" in lines
    record = json.loads((tmp_path / "out" / "M35" / "age.json").read_text())
    assert record["gain"] == {"value": pytest.approx(gain, rel=0.10), "source": "sky noise"}
    # The estimate is the night's: the checkpoint holds it, so a restart reduces with the same value.
    restored = checkpoint.load(tmp_path / "out")
    assert [(g.value, g.source) for g in restored.gains.values()] == [(pytest.approx(value), "sky noise")]


def test_a_header_gain_wins_and_says_so(tmp_path, caplog):
    result = subprocess.run([sys.executable, "-m", "observer.cli", "simulate", str(tmp_path / "cam"), "--size",
                             str(SIZE), "--frames", "2", "--short", "0:0", "--gain", "0.5"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert reduce(tmp_path / "cam", tmp_path / "out", caplog) == ""        # nothing estimated
    assert stack_gain(tmp_path / "out") == (0.5, "header")


def test_an_implausible_estimate_sets_the_frames_aside_naming_camera_gain(tmp_path):
    """A 40 e-/ADU camera (beyond 20): every frame is set aside with the reason, and the run still ends."""
    simulate(tmp_path / "cam", 40.0, "--calibration", "--filters", "blue")
    result = subprocess.run([sys.executable, "-m", "observer.cli", "reprocess", str(tmp_path / "cam"), "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in result.stderr
    frames = Table.read(tmp_path / "out" / "frames.ecsv")
    science = frames[frames["kind"] == "science"]
    assert len(science) == 2 and set(science["status"]) == {"rejected"}
    for reason in science["reason"]:
        assert "from the photon transfer is implausible" in reason and "set camera.gain in config.yaml" in reason
        value = float(reason.split("gain estimate ")[1].split()[0])
        assert value == pytest.approx(40.0, rel=0.10)


def test_sky_noise_without_any_bias_from_the_skys_gradient(tmp_path):
    """No overscan, no biases: the slope of variance against level across the frame (512 px, less precise)."""
    for gain in (0.25, 2.0):
        cam = tmp_path / f"cam{gain}"
        result = subprocess.run([sys.executable, "-m", "observer.cli", "simulate", str(cam), "--size", "512",
                                 "--frames", "1", "--short", "0:0", "--gain", str(gain), "--no-gain-keyword",
                                 "--filters", "green", "--truth", str(tmp_path / f"truth{gain}.ecsv")],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        data = fits.getdata(cam / "M35_green_001.fits").astype(float)
        assert sky_noise_gain(data, read_noise_e=9.0, offset_known=False) == pytest.approx(gain, rel=0.15)
        # The same frame with its pedestal known (the simulator's 1000 ADU) is good to a few per cent.
        assert sky_noise_gain(data - 1000.0, read_noise_e=9.0) == pytest.approx(gain, rel=0.04)


def test_a_flat_sky_without_a_bias_gives_no_estimate():
    rng = np.random.default_rng(5)
    flat_sky = rng.poisson(2000.0 * 0.5, (256, 256)) / 0.5 + 1000.0
    with pytest.raises(GainError, match="camera.gain"):
        sky_noise_gain(flat_sky, offset_known=False)
    # With the zero known, the same frame gives its gain.
    assert sky_noise_gain(flat_sky - 1000.0) == pytest.approx(0.5, rel=0.03)


def test_photon_transfer_needs_two_of_each_and_implausible_values_name_camera_gain():
    rng = np.random.default_rng(2)
    with pytest.raises(GainError):
        photon_transfer_gain([rng.normal(1000, 5, (64, 64))], [rng.normal(100, 5, (64, 64))] * 2)
    with pytest.raises(GainError, match="gain estimate 37 e-/ADU from the sky noise is implausible.*camera.gain"):
        check_plausible(37.0, "sky noise")
    assert check_plausible(0.25, "sky noise") == 0.25


def test_checkpoint_round_trips_the_estimate(tmp_path):
    state = NightState()
    state.gains[(256, 256)] = CameraGain(0.2481, "sky noise", "M35_blue_001.fits")
    checkpoint.save(state, tmp_path, set())
    assert checkpoint.load(tmp_path).gains == state.gains


def test_bright_star_errors_are_honest_with_the_estimated_gain(tmp_path, caplog):
    """A CMOS-like night (0.25 e-/ADU, no keyword) under a dark sky, stars down to 18.5 mag so that no
    unresolved faint neighbours sit in the bright stars' apertures: with the estimated gain the bright stars'
    (measured - true) / error has a robust spread <= 1.5; the silent 1.0 e-/ADU of before made the errors of
    the stars whose own photons dominate them too small (measured: 0.71 / 0.68 of the estimate's, blue / green)."""
    s = SimSettings(size=512, frames=3, gain=0.25, gain_keyword=False, n_members=400, n_field=200,
                    faint_limit_mag=18.5, sky_mag_arcsec2={"blue": 22.5, "green": 21.8}, bad_frames=False,
                    satellite=False, fill_seconds=0.0)
    simulate_night(tmp_path / "sim", s, truth_path=tmp_path / "truth.ecsv")
    write_ccd_night(tmp_path / "sim", tmp_path / "cam")
    truth = Table.read(tmp_path / "truth.ecsv")
    ratios, catalogs = {}, {}
    for name, settings in (("estimated", Settings()), ("silent", Settings(camera=CameraSettings(gain=1.0)))):
        process_existing(tmp_path / "cam", tmp_path / name, settings)
        catalogs[name] = Table.read(tmp_path / name / "M35" / "catalog.ecsv")
        score = score_catalog(catalogs[name], truth, ("blue", "green"), catalogs[name].meta["limiting_mag_5sigma"],
                              (512, 512))
        assert score.n_bright_truth > 200
        ratios[name] = score.bright_error_ratio
    assert stack_gain(tmp_path / "estimated")[0] == pytest.approx(0.25, rel=0.05)
    # The same stars' errors, where the star's own photons dominate them (SNR > 100): the silent gain took 4x
    # too few electrons, so its errors were up to 2x too small. (The pulls alone cannot show it: most bright
    # stars' errors here are the sky's, measured from the image whatever the gain.)
    est, silent = catalogs["estimated"], catalogs["silent"]
    dist, idx = cKDTree(np.column_stack([silent["x"], silent["y"]])).query(np.column_stack([est["x"], est["y"]]))
    shrink = {}
    for f in ("blue", "green"):
        photon = (dist < 0.1) & (np.asarray(est[f"magerr_{f}"]) < 0.01)
        assert photon.sum() > 20
        ratio = np.asarray(silent[f"magerr_{f}"])[idx[photon]] / np.asarray(est[f"magerr_{f}"])[photon]
        shrink[f] = float(np.median(ratio))
    print(ratios, shrink)
    for f in ("blue", "green"):
        assert ratios["estimated"][f] <= 1.5
        assert shrink[f] < 0.8
