"""FITS names, structural completeness (plain, gzip, tile-compressed) and the file tracker's decisions."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from observer.ingest import FileTracker, fits_completeness, is_fits_name, sha256_of


def fits_bytes(shape=(64, 80), extension: bool = True) -> bytes:
    hdus = [fits.PrimaryHDU(np.arange(np.prod(shape), dtype=np.uint16).reshape(shape))]
    if extension:
        hdus.append(fits.ImageHDU(np.ones((10, 10), dtype=np.float32), name="EXTRA"))
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    return buf.getvalue()


@pytest.mark.parametrize("name, expected", [
    ("a.fits", True), ("a.FIT", True), ("a.fts", True), ("b.fits.gz", True), ("B.FIT.GZ", True),
    ("c.fits.fz", True), ("x.jpg", False), ("notes.txt", False), ("a.fits.bak", False), ("fits", False)])
def test_is_fits_name(name, expected):
    assert is_fits_name(name) is expected


def test_every_truncation_is_incomplete(tmp_path):
    data = fits_bytes()
    path = tmp_path / "f.fits"
    path.write_bytes(data)
    assert fits_completeness(path) == (True, "")
    # every cut short of the promised bytes; the last block's padding may be missing (some writers stop there)
    last_data_end = len(data) - ((-400) % 2880)
    primary_data_end = 2880 + 64 * 80 * 2     # a file may end there (unpadded): that cut is ambiguous
    for cut in list(range(0, len(data), 997)) + [2879, 2880, primary_data_end + 1, last_data_end - 1]:
        if cut >= last_data_end or cut == primary_data_end:
            continue
        path.write_bytes(data[:cut])
        complete, reason = fits_completeness(path)
        assert not complete and reason, cut
    path.write_bytes(data[:last_data_end])
    assert fits_completeness(path).complete


def test_reason_counts_the_missing_bytes(tmp_path):
    data = fits_bytes((100, 100), extension=False)
    path = tmp_path / "f.fits"
    path.write_bytes(data[:2880 + 1234])
    assert fits_completeness(path) == (False, "data unit of HDU 0 has 1234 of 20000 bytes")
    path.write_bytes(b"")
    assert fits_completeness(path) == (False, "empty file")
    path.write_bytes(data[:2880])                    # header only
    assert fits_completeness(path) == (False, "data unit of HDU 0 has 0 of 20000 bytes")


def test_not_fits_content_is_complete_with_a_reason(tmp_path):
    path = tmp_path / "f.fits"
    path.write_bytes(b"\xff\xd8\xff\xe0 a JPEG really" * 200)
    complete, reason = fits_completeness(path)
    assert complete and "not a FITS file" in reason


def test_gzip_truncation_detected_by_its_trailer(tmp_path):
    packed = gzip.compress(fits_bytes())
    path = tmp_path / "f.fits.gz"
    path.write_bytes(packed)
    assert fits_completeness(path).complete
    for cut in (10, len(packed) // 2, len(packed) - 4, len(packed) - 1):
        path.write_bytes(packed[:cut])
        assert not fits_completeness(path).complete, cut


def test_tile_compressed_walks_the_heap(tmp_path):
    path = tmp_path / "f.fits.fz"
    rng = np.random.default_rng(1)
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(rng.integers(0, 4000, (128, 128)).astype(np.int16))]
                 ).writeto(path)
    data = path.read_bytes()
    assert fits_completeness(path).complete
    path.write_bytes(data[:-3000])
    complete, reason = fits_completeness(path)
    assert not complete and "HDU 1" in reason


def test_sha256_streams_the_bytes(tmp_path):
    path = tmp_path / "f.fits"
    data = os.urandom(3 * (1 << 20) + 17)
    path.write_bytes(data)
    assert sha256_of(path) == hashlib.sha256(data).hexdigest()


def test_tracker_waits_for_stability_and_completeness(tmp_path):
    data = fits_bytes()
    path = tmp_path / "f.fits"
    path.write_bytes(data[:5000])
    tracker = FileTracker(stable_seconds=0.5, quarantine_after_seconds=10.0)
    tracker.note(path)
    assert tracker.poll(1000.0) == ([], [])          # just seen (its mtime is now): not yet stable
    assert tracker.poll(1000.6) == ([], [])          # stable but incomplete
    assert tracker.waiting == 1
    path.write_bytes(data)                           # the writer finishes
    tracker.note(path)
    assert tracker.poll(1000.7) == ([], [])          # changed: wait again
    ready, quarantined = tracker.poll(1001.3)
    assert [r.path for r in ready] == [path] and ready[0].size == len(data) and quarantined == []
    tracker.note(path)                               # a rescan later: already taken, not again
    assert tracker.poll(1002.0) == ([], [])
    assert tracker.waiting == 0


def test_tracker_takes_a_closed_complete_file_without_waiting(tmp_path):
    path = tmp_path / "f.fits"
    path.write_bytes(fits_bytes())
    tracker = FileTracker(stable_seconds=5.0, quarantine_after_seconds=60.0)
    tracker.note(path, closed=True)
    ready, _ = tracker.poll(1000.0)
    assert [r.path for r in ready] == [path]


def test_tracker_quarantines_once_and_takes_the_file_if_it_completes(tmp_path):
    data = fits_bytes((100, 100), extension=False)
    path = tmp_path / "slow.fits"
    path.write_bytes(data[:2880 + 1234])
    tracker = FileTracker(stable_seconds=0.5, quarantine_after_seconds=3.0)
    tracker.note(path)
    tracker.poll(1000.0)
    tracker.poll(1001.0)
    ready, quarantined = tracker.poll(1003.5)
    assert ready == [] and len(quarantined) == 1
    assert quarantined[0].reason == "incomplete after 4 s: data unit of HDU 0 has 1234 of 20000 bytes"
    assert tracker.waiting == 0                      # a quarantined file does not hold up the end of a burst
    assert tracker.poll(1100.0) == ([], [])          # reported once
    path.write_bytes(data)
    tracker.note(path)
    tracker.poll(1101.0)
    ready, quarantined = tracker.poll(1102.0)
    assert [r.path for r in ready] == [path] and quarantined == []


def test_tracker_orders_ready_files_by_mtime_then_name(tmp_path):
    data = fits_bytes(extension=False)
    names = ["c.fits", "a.fits", "b.fits", "d.fits"]
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(data)
        stamp = 1_700_000_000 + (0 if name in ("a.fits", "b.fits") else i)
        os.utime(tmp_path / name, (stamp, stamp))
    tracker = FileTracker(stable_seconds=0.5, quarantine_after_seconds=60.0)
    for name in names:
        tracker.note(tmp_path / name)
    ready, _ = tracker.poll(1000.0)                  # old mtimes: already quiet
    assert [r.path.name for r in ready] == ["a.fits", "b.fits", "c.fits", "d.fits"]


def test_tracker_reports_unreadable_and_forgets_vanished(tmp_path):
    folder = tmp_path / "x.fits"
    folder.mkdir()
    gone = tmp_path / "gone.fits"
    gone.write_bytes(b"SIMPLE")
    tracker = FileTracker(stable_seconds=0.1, quarantine_after_seconds=60.0)
    tracker.note(folder)
    tracker.note(gone)
    gone.unlink()
    tracker.poll(1000.0)
    ready, _ = tracker.poll(1000.2)
    assert [r.path for r in ready] == [folder]       # the worker finds it cannot be read and records why
    assert tracker.waiting == 0
    assert Path(folder).is_dir()
