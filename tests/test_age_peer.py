"""bench/age_peer.py's ASteCA peer is fed our PARSEC grid: the file it writes must read back as that grid."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from age_peer import Z_SUN, write_parsec_cmd_file  # noqa: E402
from reduction.isochrones import get_isochrone, grid, load_table  # noqa: E402


def test_cmd_file_holds_every_isochrone_of_our_grid(tmp_path: Path) -> None:
    """Every (age, [M/H]) node and every non-post-AGB row, with the header line ASteCA takes as column names."""
    path = tmp_path / "parsec.dat"
    n_iso, longest = write_parsec_cmd_file(path)
    ages, mhs = grid()
    assert n_iso == ages.size * mhs.size
    lines = path.read_text().splitlines()
    header = [line for line in lines if line.startswith("#")]
    assert header[-1].split()[1:4] == ["Zini", "MH", "logAge"]
    rows = np.loadtxt(path, comments="#")
    assert rows.shape[0] == int((load_table()["label"] < 9).sum())
    node = (np.abs(rows[:, 2] - 8.5) < 1e-3) & (np.abs(rows[:, 1]) < 1e-3)
    iso = get_isochrone(8.5, 0.0)
    keep = iso.label < 9
    np.testing.assert_allclose(rows[node, 3], iso.mini[keep], rtol=1e-5)
    np.testing.assert_allclose(rows[node, 10], iso.mags["V"][keep], atol=1e-4)
    np.testing.assert_allclose(rows[node, 0], Z_SUN, rtol=1e-5)
    assert longest >= node.sum()


def test_asteca_reads_the_file_as_our_grid(tmp_path: Path) -> None:
    """ASteCA's own PARSEC reader sees our metallicities, ages and the isochrone's end points."""
    asteca = pytest.importorskip("asteca")
    path = tmp_path / "parsec.dat"
    _, longest = write_parsec_cmd_file(path)
    isochs = asteca.isochrones(model="PARSEC", isochs_path=str(path), magnitude="Vmag", color=("Bmag", "Vmag"),
                               magnitude_effl=5448.0, color_effl=(4361.0, 5448.0), N_interp=longest + 1)
    ages, mhs = grid()
    np.testing.assert_allclose(np.sort(isochs.met_age_dict["loga"]), ages, atol=1e-4)
    np.testing.assert_allclose(np.sort(isochs.met_age_dict["met"]), Z_SUN * 10 ** mhs, rtol=1e-4)
    iz = int(np.argmin(np.abs(isochs.met_age_dict["met"] - Z_SUN)))
    ia = int(np.argmin(np.abs(isochs.met_age_dict["loga"] - 8.5)))
    track = isochs.theor_tracks[iz, ia]              # rows: V, B-V, Mini, ...
    iso = get_isochrone(8.5, 0.0)
    keep = iso.label < 9
    assert track[2][0] == pytest.approx(iso.mini[keep][0], rel=1e-4)
    assert track[2][-1] == pytest.approx(iso.mini[keep][-1], rel=1e-4)
    assert track[0][0] == pytest.approx(iso.mags["V"][keep][0], abs=1e-3)
    assert track[1][0] == pytest.approx((iso.mags["B"] - iso.mags["V"])[keep][0], abs=1e-3)
