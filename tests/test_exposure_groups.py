"""The turn-off, measured: short and long exposures stacked apart, one catalogue, advice and status.json.

Nights through the real command line (``observer simulate`` then ``observer
reprocess``), scored against the simulator's truth. The cluster is drawn at
170 Myr (log 8.23), between the isochrone grid's nodes (8.20, 8.25), so a grid
search cannot land on the truth by construction.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from scipy.spatial import cKDTree

from observer.config import Settings
from observer.night import Night

SIZE = 1024
AGE_MYR = 170.0
LONG_SATURATION_V = 14.3      # the long frames saturate brighter than this (measured by the pipeline too)


def observer(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "observer.cli", *args], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def reduce_night(root: Path, short: str) -> Path:
    observer("simulate", str(root / "cam"), "--size", str(SIZE), "--frames", "5", "--short", short,
             "--age-myr", str(AGE_MYR), "--seed", "4", "--truth", str(root / "truth.ecsv"))
    observer("reprocess", str(root / "cam"), "--out", str(root / "out"))
    return root / "out"


@pytest.fixture(scope="module")
def with_shorts(tmp_path_factory) -> Path:
    return reduce_night(tmp_path_factory.mktemp("shorts"), "3:1")


@pytest.fixture(scope="module")
def without_shorts(tmp_path_factory) -> Path:
    return reduce_night(tmp_path_factory.mktemp("longonly"), "0:0")


def matched(out: Path) -> tuple[Table, Table, np.ndarray]:
    """Truth stars inside the frame, the catalogue, and each truth star's catalogue row (-1: not found)."""
    catalog = Table.read(out / "M35" / "catalog.ecsv")
    truth = Table.read(out.parent / "truth.ecsv")
    inside = (truth["x"] > 8) & (truth["x"] < SIZE - 8) & (truth["y"] > 8) & (truth["y"] < SIZE - 8)
    truth = truth[inside]
    dist, idx = cKDTree(np.column_stack([catalog["x"], catalog["y"]])).query(
        np.column_stack([truth["x"], truth["y"]]), distance_upper_bound=1.5)
    return truth, catalog, np.where(np.isfinite(dist), idx, -1)


def test_shorts_fill_the_bright_end(with_shorts):
    truth, catalog, row = matched(with_shorts)
    # Saturated in the long frames, not in the 1 s ones (V ~ 10.3 is the 1 s frames' limit).
    bright = (truth["mag_green"] < LONG_SATURATION_V - 0.3) & (truth["mag_green"] > 10.6)
    assert bright.sum() >= 40
    found = bright & (row >= 0)
    assert found.sum() >= 0.95 * bright.sum()
    flags = np.asarray(catalog["flags"])[row[found]]
    assert np.mean(flags & 1 == 0) >= 0.90
    clean = np.flatnonzero(found)[flags & 1 == 0]
    status = json.loads((with_shorts / "M35" / "status.json").read_text())
    saturation = {f: status["filters"][f]["saturation_mag"] for f in ("blue", "green")}
    for f in ("blue", "green"):
        diff = np.asarray(catalog[f"mag_{f}"])[row[clean]] - np.asarray(truth[f"mag_{f}"])[clean]
        median = np.median(diff)
        assert abs(median) <= 0.02, f
        assert 1.4826 * np.median(np.abs(diff - median)) <= 0.02, f
        # and those saturated in this filter's long stack (its own saturation magnitude, measured by
        # the pipeline: blue saturates at a different magnitude than green) were taken from the short group
        saturated = clean[np.asarray(truth[f"mag_{f}"])[clean] < saturation[f]]
        assert saturated.size >= 30
        assert np.mean(np.asarray(catalog[f"exptime_{f}"])[row[saturated]] == 1.0) >= 0.9
    groups = catalog.meta["exposure_groups"]
    for f in ("blue", "green"):
        (long, short) = groups[f]
        assert short["exptime"] == 1.0 and short["n_tie"] >= 5 and abs(short["offset"]) < 0.03


def test_short_group_products_and_resume(with_shorts):
    for f in ("blue", "green"):
        folder = with_shorts / "M35" / f
        assert {p.name for p in folder.glob("stack*.fits")} >= {"stack.fits", "stack_1s.fits"}
        long, short = fits.getheader(folder / "stack.fits"), fits.getheader(folder / "stack_1s.fits")
        assert long["EXPTIME"] > 20 and short["EXPTIME"] == 1.0 and short["NCOMBINE"] == 3
        assert fits.getheader(folder / next(p.name for p in folder.glob("stack_*s.fits")
                                            if p.name != "stack_1s.fits"))["EXPTIME"] == long["EXPTIME"]
    night = Night.restore(Settings(), with_shorts)          # the checkpoint keeps the groups
    snap = night.snapshot()
    groups = {f: s.groups for f, s in snap.targets["M35"].filters.items()}
    assert all(len(g) == 2 and g[1] == (1.0, 3) for g in groups.values())


def test_the_age_tightens_with_the_turnoff_measured(with_shorts):
    age = json.loads((with_shorts / "M35" / "age.json").read_text())
    truth = math.log10(AGE_MYR * 1e6)
    assert age["fitted"] is True
    assert abs(age["log_age"] - truth) <= 0.1
    assert age["log_age_low"] <= truth <= age["log_age_high"]
    assert age["log_age_high"] - age["log_age_low"] <= 0.25         # the 68 % interval
    assert age["log_age_low95"] <= truth <= age["log_age_high95"]
    used = {(g["filter"], g["exptime"]) for g in age["exposure_groups"]}
    assert ("green", 1.0) in used and ("blue", 1.0) in used
    status = json.loads((with_shorts / "M35" / "status.json").read_text())
    assert not any("turn-off saturated" in r for r in status["reasons"]) and status["suggested"] == []


def test_advice_fires_without_shorts(without_shorts):
    status = json.loads((without_shorts / "M35" / "status.json").read_text())
    assert status["verdict"] == "keep going"
    assert any(r.startswith("turn-off saturated") for r in status["reasons"])
    suggested = {s["filter"]: s for s in status["suggested"]}
    assert set(suggested) == {"blue", "green"}
    for s in suggested.values():
        assert 1 <= s["exptime"] <= 5 and s["count"] >= 3 and "turn-off saturated" in s["why"]
    for f, figures in status["filters"].items():
        assert 13.5 < figures["saturation_mag"] < 15.5, f
        assert len(figures["groups"]) == 1
    # one group: the products are those of a night without groups
    catalog = Table.read(without_shorts / "M35" / "catalog.ecsv")
    assert not [c for c in catalog.colnames if c.startswith("exptime_")]
    assert sorted(p.name for p in (without_shorts / "M35" / "green").glob("stack*.fits")) == ["stack.fits"]
    # the dashboard's target panel shows the published verdict: the same advice, from a resumed night
    night = Night.restore(Settings(), without_shorts)
    night.write_all_products()
    target = night.snapshot().targets["M35"]
    assert "turn-off saturated" in target.verdict and " s in blue" in target.verdict and "green" in target.verdict
    assert {s.filter for s in target.suggested} == {"blue", "green"}
