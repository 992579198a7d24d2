"""The SQLite ledger: before/after records, hash look-ups, replaced files, threads, WAL."""

from __future__ import annotations

import sqlite3
import threading

from observer.ledger import Ledger
from observer.state import FrameRecord


def test_begin_then_finish_keeps_one_row_with_the_outcome(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.begin("/cam/a.fits", "aa", 1000, 123)
    assert [r.status for r in ledger.in_flight()] == ["processing"]
    record = FrameRecord(path="/cam/a.fits", sha256="aa", kind="science", target="M35", filter="blue",
                         status="stacked", fwhm=3.25, nstars=120)
    ledger.finish(record, 1000, 123)
    row = ledger.get("/cam/a.fits", "aa")
    assert (row.status, row.kind, row.target, row.filter, row.size, row.mtime) == (
        "stacked", "science", "M35", "blue", 1000, 123)
    assert row.quality["fwhm"] == 3.25 and row.quality["nstars"] == 120 and row.quality["dx"] is None
    assert row.first_seen <= row.updated
    assert ledger.in_flight() == []
    ledger.close()


def test_lookups_by_hash_and_a_replaced_file_is_a_new_row(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.begin("/cam/a.fits", "aa", 10, 1)
    ledger.record("/cam/copy.fits", "aa", "ignored", "duplicate of a.fits")
    ledger.begin("/cam/a.fits", "bb", 12, 2)              # same name, different bytes
    assert [r.path for r in ledger.by_sha("aa")] == ["/cam/a.fits", "/cam/copy.fits"]
    assert [r.sha256 for r in ledger.by_path("/cam/a.fits")] == ["aa", "bb"]
    assert len(ledger.all()) == 3
    ledger.close()


def test_wal_mode_and_survives_reopening(tmp_path):
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    ledger.record("/cam/x.jpg", "", "ignored", "not a FITS file name")
    ledger.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    again = Ledger(path)
    assert [(r.path, r.status) for r in again.all()] == [("/cam/x.jpg", "ignored")]
    again.close()


def test_threads_write_concurrently(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")

    def work(k: int) -> None:
        for i in range(50):
            ledger.begin(f"/cam/{k}_{i}.fits", f"{k}-{i}", i, i)
            ledger.finish(FrameRecord(path=f"/cam/{k}_{i}.fits", sha256=f"{k}-{i}", status="stacked"))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = ledger.all()
    assert len(rows) == 200 and {r.status for r in rows} == {"stacked"}
    ledger.close()
