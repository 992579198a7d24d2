"""Header dialects end to end: a professional observatory's night (OBSTYPE, INSFLNAM/FILTER2, OBJECT
'NCG2420 B' with a typo, MJD-OBS, CCDGAIN, RON, BIASSEC) and a MaxIm DL night (IMAGETYP 'Light Frame',
FILTER 'Blue', EGAIN, XBINNING) are tagged with one target, stacked and give a CMD; `observer inspect`
tells the same story from the headers alone and proposes config lines for a night it cannot tag."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time

from observer.config import Settings
from observer.inspect import inspect_night, propose_config, run_inspect
from observer.reprocess import process_existing
from observer.simulator import SimSettings, simulate_night

SIZE = 256
OVERSCAN = 5        # the professional camera's last columns are its overscan (BIASSEC)
KIND_WORDS = {"Bias Frame": "zero", "Dark Frame": "dark", "Flat Field": "dome flat", "Light Frame": "science"}
BAND = {"blue": "B", "green": "V"}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """A small simulated night with calibration frames, as the simulator (MaxIm-like) writes it."""
    root = tmp_path_factory.mktemp("dialects")
    simulate_night(root / "sim", SimSettings(size=SIZE, frames=3, fill_seconds=0.0, bad_frames=False, seed=7,
                                             calibration=True), truth_path=root / "truth.ecsv")
    return root / "sim"


def reheader(raw: Path, cam: Path, rewrite: Callable[[fits.Header, str], None], numbered: bool = False) -> Path:
    """Copy every raw file into ``cam`` with its header rewritten in a dialect (``numbered``: as
    img_0001.fits ..., names that say nothing, as some cameras write them)."""
    cam.mkdir(parents=True)
    for i, path in enumerate(sorted(raw.glob("*.fits")), 1):
        with fits.open(path) as hdul:
            header = hdul[0].header.copy()
            rewrite(header, path.name)
            name = f"img_{i:04d}.fits" if numbered else path.name
            fits.PrimaryHDU(with_overscan(hdul[0].data, header), header=header).writeto(cam / name)
    return cam


def with_overscan(data, header: fits.Header):
    """The pixels a BIASSEC names read the bias (the camera's pedestal and read noise), as an overscan does."""
    if "BIASSEC" not in header:
        return data
    out = data.copy()
    rng = np.random.default_rng(1)
    strip = out[:, -OVERSCAN:]
    strip[:] = np.rint(1000.0 + 6.0 * rng.standard_normal(strip.shape)).astype(out.dtype)
    return out


def professional(header: fits.Header, name: str) -> None:
    """A 2.2 m telescope's system: OBSTYPE, INSFLNAM + an open second wheel, OBJECT with the band."""
    kind = KIND_WORDS[header.pop("IMAGETYP")]
    filt = header.pop("FILTER", None)
    band = BAND.get(str(filt).lower(), "")
    header["OBSTYPE"] = kind
    if filt is not None:
        header["INSFLNAM"] = "JohnsonB" if band == "B" else "Johnson_V"
        header["FILTER2"] = "open"
    if kind == "science":
        # The B frames and the offsets carry a typo in the cluster's name; the pointing of the V
        # frames says they are the same field.
        name_ = "NCG2420" if band == "B" or "offset" in name else "NGC2420"
        header["OBJECT"] = f"{name_} sky {band}" if "offset" in name else f"{name_} {band}"
    else:
        header["OBJECT"] = f"{kind} {band}".strip()
    header["MJD-OBS"] = Time(header.pop("DATE-OBS"), scale="utc").mjd
    header["EXPTIME"] = header.pop("EXPOSURE")
    header.pop("EGAIN")
    header["GAIN"] = 100          # a driver setting, not e-/ADU: must be passed over
    header["CCDGAIN"] = 1.5
    header["RON"] = header.pop("RDNOISE")
    header["BIASSEC"] = f"[{SIZE - OVERSCAN + 1}:{SIZE},1:{SIZE}]"
    header["DATASEC"] = f"[1:{SIZE - OVERSCAN},1:{SIZE}]"


def maxim(header: fits.Header, name: str) -> None:
    """MaxIm DL: 'Light Frame', FILTER 'Blue', OBJECT 'M35 Blue', EGAIN only, XBINNING."""
    header.pop("GAIN")
    if header.get("FILTER"):
        header["FILTER"] = str(header["FILTER"]).capitalize()
    if header["IMAGETYP"] == "Light Frame" and "offset" not in name:
        header["OBJECT"] = f"M35 {header['FILTER']}"
    header["DATE-OBS"] = str(header["DATE-OBS"])[:19]


@pytest.fixture(scope="module")
def pro_night(raw, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pro")
    cam = reheader(raw, root / "cam", professional)
    # One file whose two filter keywords disagree: set aside with a reason, the night goes on.
    with fits.open(sorted(cam.glob("*_green_002.fits"))[0]) as hdul:
        header = hdul[0].header.copy()
        header["FILTER1"] = "B"
        header["MJD-OBS"] += 0.001
        fits.PrimaryHDU(hdul[0].data, header=header).writeto(cam / "contradiction_green.fits")
    return root


@pytest.fixture(scope="module")
def pro_reduced(pro_night) -> Path:
    process_existing(pro_night / "cam", pro_night / "out", Settings())
    return pro_night / "out"


def test_professional_night_is_one_target_stacked_with_a_cmd(pro_reduced):
    frames = Table.read(pro_reduced / "frames.ecsv")
    rows = {Path(p).name: r for p, r in zip(frames["path"], frames)}
    science = [r for n, r in rows.items() if r["kind"] in ("science", "offset")]
    assert {r["target"] for r in science} == {"NCG2420"}
    assert {r["filter"] for r in science} == {"blue", "green"}
    assert all(r["status"] == "stacked" for n, r in rows.items()
               if r["kind"] == "science" and "contradiction" not in n), {n: r["reason"] for n, r in rows.items()}
    assert all(not r["target"] for r in rows.values() if r["kind"] in ("bias", "dark", "flat"))
    assert (pro_reduced / "NCG2420" / "catalog.ecsv").exists() and (pro_reduced / "NCG2420" / "cmd.png").exists()


def test_contradictory_filter_keywords_set_the_file_aside(pro_reduced):
    frames = Table.read(pro_reduced / "frames.ecsv")
    row = next(r for r in frames if Path(r["path"]).name == "contradiction_green.fits")
    assert row["status"] == "rejected"
    assert "INSFLNAM='Johnson_V'" in row["reason"] and "FILTER1='B'" in row["reason"]


def test_maxim_night_is_one_target_stacked_with_a_cmd(raw, tmp_path):
    cam = reheader(raw, tmp_path / "cam", maxim)
    process_existing(cam, tmp_path / "out", Settings())
    frames = Table.read(tmp_path / "out" / "frames.ecsv")
    science = frames[frames["kind"] == "science"]
    assert set(science["target"]) == {"M35"} and set(science["status"]) == {"stacked"}, list(science["reason"])
    assert (tmp_path / "out" / "M35" / "catalog.ecsv").exists() and (tmp_path / "out" / "M35" / "cmd.png").exists()


def test_inspect_tells_the_same_story_from_headers(pro_night, capsys):
    report = inspect_night(pro_night / "cam", Settings())
    science = [r for r in report.rows if r.tags and r.tags.kind == "science"]
    assert {r.tags.target for r in science} == {"NCG2420"}
    assert all(r.facts.sources["gain"] == "CCDGAIN" and r.facts.gain == 1.5 for r in science)
    assert all(r.facts.sources["filter"] == "INSFLNAM" for r in science)
    assert [r.path.name for r in report.untagged] == ["contradiction_green.fits"]
    assert run_inspect(pro_night / "cam", Settings(), sys.stdout) == 1
    out = capsys.readouterr().out
    assert "stack into NCG2420/blue" in out and "1.5 CCDGAIN" in out and "master flat (blue)" in out
    assert "NCG2420: colour and CMD" in out
    assert "contradiction_green.fits: contradictory filter keywords" in out


def test_inspect_proposes_config_lines_that_tag_the_night(raw, tmp_path):
    def odd_camera(header: fits.Header, name: str) -> None:
        filt = header.pop("FILTER", None)
        if filt is not None:
            header["FILTRE"] = "Ha" if "green" in name else filt   # an unknown keyword, an unknown name

    cam = reheader(raw, tmp_path / "cam", odd_camera, numbered=True)
    settings = Settings()
    report = inspect_night(cam, settings)
    assert report.untagged
    lines = propose_config(report, settings)
    assert "  aliases:" in "\n".join(lines) and "    'Ha': ha" in lines
    assert any(line.startswith("  filter: [FILTER,") and line.endswith("'* FILT* NAME', FILTRE]") for line in lines)
    config = tmp_path / "proposed.yaml"
    config.write_text("\n".join(lines) + "\n")
    second = subprocess.run([sys.executable, "-m", "observer.cli", "inspect", str(cam)], capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 1
    third = subprocess.run([sys.executable, "-m", "observer.cli", "inspect", str(cam), "--config", str(config)],
                           capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "stack into M35/ha" in third.stdout


def test_inspect_bad_config_exits_2(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("header:\n  filter: []\n")
    result = subprocess.run([sys.executable, "-m", "observer.cli", "inspect", str(tmp_path), "--config",
                             str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "header.filter" in result.stderr


def test_unknown_filter_is_one_warning_naming_file_keyword_value(raw, tmp_path, caplog):
    cam = tmp_path / "cam"
    cam.mkdir()
    source = sorted(raw.glob("M35_blue_*.fits"))[0]
    shutil.copy(source, cam / "M35_x_001.fits")
    with fits.open(cam / "M35_x_001.fits", mode="update") as hdul:
        hdul[0].header["FILTER"] = "Hbeta"
    with caplog.at_level(logging.WARNING):
        report = inspect_night(cam, Settings())
    assert "unknown filter FILTER='Hbeta'" in report.rows[0].reason and "filters.aliases" in report.rows[0].reason
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "M35_x_001.fits" in warnings[0] and "FILTER='Hbeta'" in warnings[0]
