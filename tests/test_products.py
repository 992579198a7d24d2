"""Atomic product writers: a reader never sees a partial product, a failed write leaves the old one."""

from __future__ import annotations

import json
import threading

import matplotlib
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from observer.products import (TEMP_PREFIX, atomic_savefig, atomic_write_bytes, atomic_write_fits,
                               atomic_write_json, atomic_write_table)

matplotlib.use("Agg")


def test_each_writer_round_trips(tmp_path):
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    atomic_write_fits(tmp_path / "a" / "s.fits", fits.HDUList([fits.PrimaryHDU(data)]))
    np.testing.assert_array_equal(fits.getdata(tmp_path / "a" / "s.fits"), data)

    atomic_write_table(tmp_path / "t.ecsv", Table({"x": [1.5, 2.5], "name": ["a", "b"]}))
    table = Table.read(tmp_path / "t.ecsv", format="ascii.ecsv")
    assert list(table["x"]) == [1.5, 2.5] and list(table["name"]) == ["a", "b"]

    atomic_write_json(tmp_path / "j.json", {"b": 2, "a": [1, 2]})
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": [1, 2], "b": 2}

    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    atomic_savefig(fig, tmp_path / "f.png")
    plt.close(fig)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(TEMP_PREFIX)]


def test_failed_write_keeps_the_old_product(tmp_path):
    target = tmp_path / "t.ecsv"
    atomic_write_bytes(target, b"old")

    class Broken:
        def write(self, *args, **kwargs):
            raise RuntimeError("disk trouble")

    with pytest.raises(RuntimeError):
        atomic_write_table(target, Broken())
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.ecsv"]


def test_reader_never_sees_a_partial_fits(tmp_path):
    """A reader opening the product in a loop while it is rewritten 40 times always gets a whole image."""
    target = tmp_path / "stack.fits"
    images = [np.full((256, 256), i, dtype=np.float32) for i in range(40)]
    atomic_write_fits(target, fits.HDUList([fits.PrimaryHDU(images[0])]))
    done = threading.Event()
    seen: list[float] = []
    errors: list[Exception] = []

    def reader():
        while not done.is_set():
            try:
                with fits.open(target) as hdul:
                    img = hdul[0].data
                    assert img.shape == (256, 256) and img.min() == img.max()
                    seen.append(float(img[0, 0]))
            except Exception as exc:  # noqa: BLE001 - collected and asserted on below
                errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    for img in images[1:]:
        atomic_write_fits(target, fits.HDUList([fits.PrimaryHDU(img)]))
    done.set()
    thread.join()
    assert errors == []
    assert seen and seen == sorted(seen)        # versions only move forward
    assert fits.getdata(target)[0, 0] == 39
