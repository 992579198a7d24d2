"""The CMD data and figure: NaN rows dropped, saturated stars marked, inverted axis, atomic PNG."""

from __future__ import annotations

import numpy as np
from astropy.table import Table
from matplotlib.image import imread

from observer.figures import plot_cmd
from reduction.cmd import cmd_data
from reduction.photometry import FLAG_BLENDED, FLAG_SATURATED


def catalogue(n: int = 300, seed: int = 2) -> Table:
    """A cluster-like catalogue: a main sequence, a turn-off, a few giants, two NaN rows, saturated tops."""
    rng = np.random.default_rng(seed)
    green = np.sort(rng.uniform(11.0, 21.0, n))
    colour = 0.15 + 0.09 * (green - 11) + rng.normal(0, 0.03, n)
    colour[:5] = 1.1 + rng.normal(0, 0.05, 5)                 # giants
    blue = green + colour
    err = 0.002 + 0.01 * 10 ** (0.4 * (green - 19))
    flags = np.zeros(n, np.int64)
    flags[:3] = FLAG_SATURATED
    flags[10] = FLAG_BLENDED
    blue[50] = np.nan
    green[60] = np.nan
    return Table({"id": np.arange(1, n + 1), "x": rng.uniform(0, 512, n), "y": rng.uniform(0, 512, n),
                  "mag_blue": blue, "magerr_blue": err * 1.2, "mag_green": green, "magerr_green": err,
                  "color": blue - green, "flags": flags})


def test_cmd_data_drops_nan_and_marks_saturated():
    cat = catalogue()
    cmd = cmd_data(cat, color=("blue", "green"), magnitude="green")
    assert cmd.n == len(cat) - 2
    assert np.all(np.isfinite(cmd.color)) and np.all(np.isfinite(cmd.mag))
    assert cmd.saturated.sum() == 3
    np.testing.assert_allclose(cmd.color_err, np.hypot(cat["magerr_blue"], cat["magerr_green"])[
        np.isfinite(cat["mag_blue"]) & np.isfinite(cat["mag_green"])])
    assert (cmd.color_label, cmd.mag_label) == ("blue - green", "green")


def test_plot_cmd_writes_png_with_inverted_axis(tmp_path):
    cmd = cmd_data(catalogue())
    iso_mag = np.linspace(10.5, 21.5, 50)
    path = tmp_path / "M35" / "cmd.png"
    fig = plot_cmd(cmd, path, isochrone=(0.15 + 0.09 * (iso_mag - 11), iso_mag), turnoff=(0.3, 12.5),
                   title="M35", age_text="150 Myr")
    ax = fig.axes[0]
    assert ax.yaxis_inverted()
    assert ax.get_xlabel() == "blue - green [mag]" and ax.get_ylabel() == "green [mag]"
    assert f"{cmd.n} stars" in ax.get_title()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(label.startswith("saturated") for label in labels)
    image = imread(path)
    assert image.shape[0] > 500 and image.shape[1] > 500
    assert [p.name for p in path.parent.iterdir()] == ["cmd.png"]     # no temporary file left behind


def test_plot_cmd_empty(tmp_path):
    empty = cmd_data(catalogue()[:0])
    fig = plot_cmd(empty, tmp_path / "cmd.png")
    assert fig.axes[0].yaxis_inverted()
    assert (tmp_path / "cmd.png").stat().st_size > 0
