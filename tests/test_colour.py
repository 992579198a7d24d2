"""Colour cameras: Bayer mosaics and RGB cubes split into R, G, B planes, measured as three filters."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from scipy.spatial import cKDTree

from observer.config import Settings
from observer.ledger import Ledger
from observer.night import Night
from observer.reprocess import process_existing
from observer.simulator import SimSettings, simulate_night
from reduction.colour import colour_planes, split_bayer
from reduction.frames import FrameError, load_frame

#: The synthetic mosaic's site values: every R site 100, the greens 200 and 210, B 300.
SITE = {"R": 100.0, "G1": 200.0, "G2": 210.0, "B": 300.0}


def _mosaic(pattern: str, shape: tuple[int, int], x_offset: int = 0, y_offset: int = 0) -> np.ndarray:
    """A mosaic of known colours, ``pattern`` at the sensor origin, the image starting at (x_offset, y_offset)."""
    names, greens = [], iter(("G1", "G2"))
    for colour in pattern:
        names.append(next(greens) if colour == "G" else colour)
    ys, xs = np.indices(shape)
    site = ((ys + y_offset) % 2) * 2 + (xs + x_offset) % 2
    return np.choose(site, [SITE[n] for n in names]).astype(np.float32)


@pytest.mark.parametrize("pattern", ["RGGB", "BGGR", "GRBG", "GBRG"])
@pytest.mark.parametrize("x_offset, y_offset", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_bayer_split_gives_each_colour_at_half_size(pattern, x_offset, y_offset):
    planes = split_bayer(_mosaic(pattern, (10, 13), x_offset, y_offset), pattern, x_offset, y_offset)
    assert list(planes) == ["R", "G", "B"]
    for colour, value in (("R", 100.0), ("G", 205.0), ("B", 300.0)):
        assert planes[colour].shape == (5, 6) and planes[colour].dtype == np.float32   # odd column dropped
        np.testing.assert_array_equal(planes[colour], value)


def test_bayer_split_keeps_the_pixels_of_each_site():
    data = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    planes = split_bayer(data, "GRBG")
    np.testing.assert_array_equal(planes["R"], data[0::2, 1::2])
    np.testing.assert_array_equal(planes["B"], data[1::2, 0::2])
    np.testing.assert_array_equal(planes["G"], (data[0::2, 0::2] + data[1::2, 1::2]) / 2)


def test_a_saturated_green_site_keeps_its_superpixel_saturated():
    data = _mosaic("RGGB", (4, 4))
    data[0, 1] = 65535.0
    green = split_bayer(data, "RGGB", saturation=60000.0)["G"]
    np.testing.assert_array_equal(green, [[65535.0, 205.0], [205.0, 205.0]])


def _write(path: Path, data: np.ndarray, **cards) -> Path:
    header = fits.Header({"IMAGETYP": "Light Frame", "OBJECT": "M35", "EXPTIME": 30.0, **cards})
    fits.PrimaryHDU(data, header).writeto(path)
    return path


@pytest.mark.parametrize("cards", [{"FILTER": "RGGB"}, {"BAYERPAT": "BGGR", "XBAYROFF": 1, "YBAYROFF": 1},
                                   {"COLORTYP": "GBRG", "YBAYROFF": 1}])
def test_a_mosaic_file_becomes_three_plane_frames(tmp_path, cards):
    pattern = next(v for k, v in cards.items() if k in ("FILTER", "BAYERPAT", "COLORTYP"))
    data = _mosaic(pattern, (16, 20), cards.get("XBAYROFF", 0), cards.get("YBAYROFF", 0))
    frame = load_frame(_write(tmp_path / "osc.fits", data.astype(np.uint16), XPIXSZ=4.0, FOCALLEN=500.0, **cards))
    planes = colour_planes(frame)
    assert [c for c, _ in planes] == ["R", "G", "B"]
    assert [p.facts.filter for _, p in planes] == ["R", "G", "B"]
    assert [float(p.data.mean()) for _, p in planes] == [100.0, 205.0, 300.0]
    assert all(p.data.shape == (8, 10) and p.facts.xbin == 2 for _, p in planes)
    assert planes[0][1].facts.plate_scale_arcsec == pytest.approx(2 * frame.facts.plate_scale_arcsec)


def test_an_rgb_cube_is_taken_plane_by_plane(tmp_path):
    cube = np.stack([np.full((12, 14), v, np.int16) for v in (100, 200, 300)])
    frame = load_frame(_write(tmp_path / "dss.fits", cube))
    planes = colour_planes(frame)
    assert [(c, p.facts.filter, p.data.shape, float(p.data.mean())) for c, p in planes] == \
        [("R", "R", (12, 14), 100.0), ("G", "G", (12, 14), 200.0), ("B", "B", (12, 14), 300.0)]
    mono = load_frame(_write(tmp_path / "mono.fits", cube[0]))
    assert colour_planes(mono) == [("", mono)]


def test_an_unsupported_mosaic_is_set_aside_naming_it(tmp_path, caplog):
    data = np.random.default_rng(1).normal(1000, 10, (64, 64)).astype(np.float32)
    with pytest.raises(FrameError, match="colour mosaic CYGM: not supported"):
        colour_planes(load_frame(_write(tmp_path / "cygm0.fits", data, BAYERPAT="CYGM")))
    night = Night(Settings(), tmp_path / "out")
    caplog.set_level("INFO")
    (record,) = night.process(_write(tmp_path / "xtrans.fits", data, FILTER="X-Trans"))
    assert record.status == "rejected" and record.reason.startswith("colour mosaic X-TRANS: not supported")
    assert sum("xtrans.fits" in r.getMessage() and "X-TRANS" in r.getMessage() for r in caplog.records) == 1
    bias = night.process(_write(tmp_path / "bias.fits", data, IMAGETYP="Bias Frame", BAYERPAT="RGGB"))
    assert [(r.plane, r.status) for r in bias] == [("R", "rejected"), ("G", "rejected"), ("B", "rejected")]
    assert "bias frame of a colour camera" in bias[0].reason


# ------------------------------------------------------------------ a colour camera's night, end to end
def _colour_night(root: Path) -> list[Path]:
    """Mosaic files of a simulated cluster: the simulator's k-th red, green and blue frames interleaved (RGGB)."""
    sim = root / "sim"
    simulate_night(sim, SimSettings(size=256, frames=3, filters=("red", "green", "blue"), n_members=120,
                                    n_field=40, short_frames=0, fill_seconds=0.0, bad_frames=False,
                                    satellite=False, seed=4, exptime_range=(40.0, 40.0)),
                   truth_path=root / "truth.ecsv")          # one exposure time: the planes share one shutter
    by_filter: dict[str, list[Path]] = {}
    for path in sorted(sim.glob("*.fits"), key=lambda p: fits.getheader(p)["DATE-OBS"]):
        by_filter.setdefault(fits.getheader(path)["FILTER"], []).append(path)
    cam = root / "cam"
    cam.mkdir()
    files = []
    for k, (red, green, blue) in enumerate(zip(by_filter["red"], by_filter["green"], by_filter["blue"])):
        planes = [fits.getdata(p).astype(np.uint16) for p in (red, green, blue)]
        header = fits.getheader(red)
        n = planes[0].shape[0]
        mosaic = np.empty((2 * n, 2 * n), np.uint16)
        mosaic[0::2, 0::2], mosaic[0::2, 1::2], mosaic[1::2, 0::2], mosaic[1::2, 1::2] = \
            planes[0], planes[1], planes[1], planes[2]
        header["FILTER"] = "RGGB"          # as the colour camera's driver writes it
        header["XPIXSZ"] = header["YPIXSZ"] = header["XPIXSZ"] / 2
        name = f"M35_osc_{k:03d}{'_offset' if 'offset' in red.name else ''}.fits"
        fits.PrimaryHDU(mosaic, header).writeto(cam / name)
        files.append(cam / name)
    return files


@pytest.fixture(scope="module")
def colour_night(tmp_path_factory) -> list[Path]:
    return _colour_night(tmp_path_factory.mktemp("colour"))


def test_a_colour_camera_night_gives_stacks_in_three_filters_and_a_catalogue(colour_night, tmp_path):
    settings = Settings()
    settings = dataclasses.replace(settings, age=dataclasses.replace(settings.age, enabled=False))
    cam = colour_night[0].parent
    process_existing(cam, tmp_path / "out", settings)
    frames = Table.read(tmp_path / "out" / "frames.ecsv")
    assert len(frames) == 3 * len(colour_night)
    science = frames[frames["kind"] == "science"]
    assert list(science["plane"][:3]) == ["R", "G", "B"] and list(science["filter"][:3]) == ["red", "green", "blue"]
    assert set(science["status"]) == {"stacked"}, list(zip(science["path"], science["reason"]))
    assert set(frames[frames["kind"] == "offset"]["status"]) == {"offset"}
    for name in ("red", "green", "blue"):
        with fits.open(tmp_path / "out" / "M35" / name / "stack.fits") as hdul:
            assert hdul[0].data.shape == (256, 256) and hdul[0].header["NCOMBINE"] == 3
    catalog = Table.read(tmp_path / "out" / "M35" / "catalog.ecsv")
    assert len(catalog) > 50 and {"mag_blue", "mag_green", "color"} <= set(catalog.colnames)
    truth = Table.read(colour_night[0].parent.parent / "truth.ecsv")
    # Stars found where the simulator put them, in the half-resolution planes' pixels.
    bright = truth[truth["mag_red"] < 18]
    dist, idx = cKDTree(np.column_stack([catalog["x"], catalog["y"]])).query(
        np.column_stack([bright["x"], bright["y"]]))
    found = dist < 1.0
    assert found.sum() > 0.3 * len(bright) and np.median(dist[found]) < 0.2
    clean = found & (np.asarray(catalog["flags"])[idx] & 3 == 0)    # saturated and blended stars carry no magnitude
    assert clean.sum() >= 5
    assert abs(np.median(catalog["mag_red"][idx[clean]] - bright["mag_red"][clean])) < 0.15


def test_a_restart_or_a_duplicate_counts_no_plane_twice(colour_night, tmp_path):
    settings = Settings()
    settings = dataclasses.replace(settings, age=dataclasses.replace(settings.age, enabled=False),
                                   service=dataclasses.replace(settings.service, reprocess_checkpoint_frames=1))
    cam = tmp_path / "cam"
    cam.mkdir()
    for path in colour_night[:2]:
        shutil.copy(path, cam / path.name)
    out = tmp_path / "out"
    process_existing(cam, out, settings)
    shutil.copy(colour_night[2], cam / colour_night[2].name)
    shutil.copy(colour_night[0], cam / "copy_of_first.fits")      # the same bytes under another name
    process_existing(cam, out, settings)                          # a restart over the grown night
    frames = Table.read(out / "frames.ecsv")
    assert len(frames) == 3 * 3 + 1
    assert [str(s) for s in frames[[Path(p).name == "copy_of_first.fits" for p in frames["path"]]]["status"]] \
        == ["ignored"]
    for name in ("red", "green", "blue"):
        assert fits.getheader(out / "M35" / name / "stack.fits")["NCOMBINE"] == 3
    rows = Ledger(out / "ledger.sqlite").all()
    assert sorted(Path(r.path).name for r in rows) == sorted([p.name for p in colour_night[:3]] + ["copy_of_first.fits"])
    first = next(r for r in rows if Path(r.path).name == colour_night[0].name)
    assert first.status == "stacked" and first.filter == "red,green,blue"


def test_inspect_shows_what_becomes_of_each_plane(tmp_path):
    from observer.inspect import inspect_night

    data = np.zeros((32, 32), np.uint16)
    _write(tmp_path / "osc.fits", data, FILTER="RGGB")
    _write(tmp_path / "cygm.fits", data, COLORTYP="CYGM")
    report = inspect_night(tmp_path, Settings())
    rows = {(r.path.name, r.plane): r for r in report.rows}
    assert [rows[("osc.fits", c)].action for c in "RGB"] == ["stack into M35/red", "stack into M35/green",
                                                              "stack into M35/blue"]
    assert rows[("cygm.fits", "")].action.startswith("set aside: colour mosaic CYGM: not supported")
