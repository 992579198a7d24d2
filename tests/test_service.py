"""The service with real threads, real watchdog and real files.

Until the lead's ``observer.night.Night`` is complete these tests use a small
stand-in for it (``StandInNight`` below: a test double for the per-frame path,
which is not part of the service); it records the size of each file at the
moment it was processed, so "none taken early" is checked exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from observer.config import ConfigError, Settings
from observer.ledger import Ledger
from observer.products import atomic_write_json, atomic_write_table
from observer.service import OutdirInsideCamdirError, Service, process_existing
from observer.state import FrameRecord, Snapshot


class StandInNight:
    """Test double for observer.night.Night: 'stacks' any readable 2-D FITS image, checkpoints to JSON."""

    def __init__(self, settings: Settings, outdir: Path) -> None:
        self.outdir = Path(outdir)
        self.records: list[FrameRecord] = []
        self.sizes: dict[str, int] = {}

    @classmethod
    def restore(cls, settings: Settings, outdir: Path) -> "StandInNight":
        night = cls(settings, outdir)
        state = night.outdir / "standin.json"
        if state.exists():
            saved = json.loads(state.read_text())
            night.records = [FrameRecord(**r) for r in saved["records"]]
            night.sizes = saved["sizes"]
        return night

    def seen(self, sha256: str) -> bool:
        return any(r.sha256 == sha256 for r in self.records)

    def process(self, path: Path, sha256: str) -> FrameRecord:
        self.sizes[str(path)] = os.path.getsize(path)
        record = FrameRecord(path=str(path), sha256=sha256, kind="science", seen_at=time.time())
        try:
            with fits.open(path) as hdul:
                data = hdul[0].data
                record.date_obs = str(hdul[0].header.get("DATE-OBS", ""))
            if data is None or data.ndim != 2:
                raise ValueError("no 2-D image")
            record.status, record.nstars = "stacked", int(data.shape[0])
        except Exception as exc:  # noqa: BLE001 - like Night.process: never raises
            record.status, record.reason = "rejected", str(exc)
        self.records.append(record)
        return record

    def record_skipped(self, path, sha256, status, reason) -> FrameRecord:
        record = FrameRecord(path=str(path), sha256=sha256, status=status, reason=reason)
        self.records.append(record)
        return record

    def write_products(self, force: bool = False) -> list[Path]:
        table = Table(rows=[(r.path, r.status, r.reason) for r in self.records] or None,
                      names=("path", "status", "reason"), dtype=(str, str, str))
        return [atomic_write_table(self.outdir / "frames.ecsv", table)]

    def checkpoint(self) -> None:
        atomic_write_json(self.outdir / "standin.json",
                          {"records": [dataclasses.asdict(r) for r in self.records], "sizes": self.sizes})

    def snapshot(self, queue_length: int = 0) -> Snapshot:
        return Snapshot(version=len(self.records), frames=tuple(self.records), targets={}, outdir=str(self.outdir))


def fast_settings(**service) -> Settings:
    settings = Settings()
    values = {"stable_seconds": 0.3, "quarantine_after_seconds": 2.0, "rescan_seconds": 1.0, **service}
    return dataclasses.replace(settings, service=dataclasses.replace(settings.service, **values))


def frame_bytes(seed: int, shape=(64, 64), date: str = "2026-11-26T22:00:00") -> bytes:
    data = np.random.default_rng(seed).integers(0, 60000, shape).astype(np.uint16)
    hdu = fits.PrimaryHDU(data)
    hdu.header["DATE-OBS"] = date
    buf = io.BytesIO()
    hdu.writeto(buf)
    return buf.getvalue()


def write_slowly(path: Path, data: bytes, seconds: float, pieces: int = 8) -> None:
    """Like a camera: create the file, then fill it over ``seconds``."""
    with open(path, "wb") as handle:
        for i in range(pieces):
            handle.write(data[i * len(data) // pieces:(i + 1) * len(data) // pieces])
            handle.flush()
            time.sleep(seconds / pieces)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wait_until(predicate, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


@pytest.fixture
def folders(tmp_path):
    camdir, outdir = tmp_path / "cam", tmp_path / "out"
    camdir.mkdir()
    return camdir, outdir


def start(camdir, outdir, **service) -> Service:
    svc = Service(camdir, outdir, fast_settings(**service), night_factory=StandInNight.restore)
    svc.start()
    return svc


def statuses(svc: Service) -> dict[str, tuple[str, str]]:
    return {Path(r.path).name: (r.status, r.reason) for r in svc.night.records}


def test_camera_at_a_cadence_every_frame_once_none_early(folders):
    camdir, outdir = folders
    svc = start(*folders)
    events = []
    svc.subscribe(events.append)
    frames = {f"M35_blue_{i:03d}.fits": frame_bytes(i, (128, 128)) for i in range(4)}
    try:
        (camdir / "preview.jpg").write_bytes(b"\xff\xd8 jpeg preview")
        for name, data in frames.items():
            write_slowly(camdir / name, data, seconds=1.0)
            time.sleep(0.3)
        wait_until(lambda: len(svc.night.records) == 4)
        wait_until(lambda: not svc.snapshot().busy)
    finally:
        svc.stop()
    night = svc.night
    assert [Path(r.path).name for r in night.records] == list(frames)          # once each, in order
    assert all(r.status == "stacked" for r in night.records)
    assert {Path(p).name: s for p, s in night.sizes.items()} == {n: len(d) for n, d in frames.items()}
    ledger = Ledger(outdir / "ledger.sqlite")
    rows = {Path(r.path).name: r for r in ledger.all()}
    assert {n: rows[n].status for n in frames} == dict.fromkeys(frames, "stacked")
    assert rows["preview.jpg"].status == "ignored" and rows["preview.jpg"].reason == "not a FITS file name"
    assert all(rows[n].sha256 == hashlib.sha256(d).hexdigest() for n, d in frames.items())
    assert [e.record.path for e in events if e.record] == [r.path for r in night.records]
    assert Table.read(outdir / "frames.ecsv").columns["path"].tolist() == [r.path for r in night.records]


def test_duplicate_ignored_and_replaced_file_is_a_new_frame(folders, tmp_path):
    camdir, outdir = folders
    svc = start(*folders)
    try:
        (camdir / "a.fits").write_bytes(frame_bytes(1))
        wait_until(lambda: len(svc.night.records) == 1)
        shutil.copy(camdir / "a.fits", camdir / "copy_of_a.fits")
        wait_until(lambda: len(svc.night.records) == 2)
        staging = tmp_path / "staging.fits"
        staging.write_bytes(frame_bytes(2))
        os.replace(staging, camdir / "a.fits")           # the camera software rewrote a.fits
        wait_until(lambda: len(svc.night.records) == 3)
    finally:
        svc.stop()
    records = svc.night.records
    assert [(Path(r.path).name, r.status) for r in records] == [
        ("a.fits", "stacked"), ("copy_of_a.fits", "ignored"), ("a.fits", "stacked")]
    assert records[1].reason == "duplicate of a.fits"
    assert records[0].sha256 != records[2].sha256


def test_bad_files_recorded_with_reasons_and_the_service_lives_on(folders, tmp_path):
    camdir, outdir = folders
    good = frame_bytes(5)
    secret = tmp_path / "outside.fits"
    secret.write_bytes(frame_bytes(6))
    svc = start(*folders)
    try:
        (camdir / "empty.fits").write_bytes(b"")
        (camdir / "truncated.fits").write_bytes(good[:4000])
        (camdir / "header_only.fits").write_bytes(good[:2880])
        (camdir / "notfits.fits").write_bytes(b"this is a log file, not an image\n" * 100)
        (camdir / "x.fits").mkdir()
        (camdir / "link.fits").symlink_to(secret)
        gz = camdir / "cut.fits.gz"
        import gzip
        gz.write_bytes(gzip.compress(good)[:300])
        (camdir / "good.fits").write_bytes(good)
        wait_until(lambda: len(svc.night.records) == 7)
        (camdir / "late.fits").write_bytes(frame_bytes(7))
        wait_until(lambda: len(svc.night.records) == 8)
        assert svc.alive
    finally:
        svc.stop()
    got = statuses(svc)
    assert set(got) == {"empty.fits", "truncated.fits", "header_only.fits", "notfits.fits", "x.fits",
                        "cut.fits.gz", "good.fits", "late.fits"}
    assert got["good.fits"][0] == got["late.fits"][0] == "stacked"
    assert got["empty.fits"] == ("quarantined", got["empty.fits"][1]) and "empty file" in got["empty.fits"][1]
    assert got["truncated.fits"][0] == "quarantined" and "has 1120 of 8192 bytes" in got["truncated.fits"][1]
    assert got["header_only.fits"][0] == "quarantined" and "0 of 8192 bytes" in got["header_only.fits"][1]
    assert got["cut.fits.gz"][0] == "quarantined" and "gzip" in got["cut.fits.gz"][1]
    assert got["notfits.fits"][0] == "rejected" and got["notfits.fits"][1]
    assert got["x.fits"] == ("rejected", "cannot read: Is a directory")
    assert "link.fits" not in got


def test_quarantined_file_taken_when_it_completes(folders):
    camdir, outdir = folders
    data = frame_bytes(8)
    svc = start(*folders)
    try:
        (camdir / "slow.fits").write_bytes(data[:5000])
        wait_until(lambda: len(svc.night.records) == 1)
        with open(camdir / "slow.fits", "ab") as handle:
            handle.write(data[5000:])
        wait_until(lambda: len(svc.night.records) == 2)
    finally:
        svc.stop()
    assert [(Path(r.path).name, r.status) for r in svc.night.records] == [
        ("slow.fits", "quarantined"), ("slow.fits", "stacked")]
    assert svc.night.sizes[str(camdir.resolve() / "slow.fits")] == len(data)


def test_burst_of_200_all_processed_in_order_raw_files_untouched(folders, tmp_path):
    camdir, outdir = folders
    source = tmp_path / "backup"
    source.mkdir()
    for i in range(200):
        (source / f"f{i:03d}.fits").write_bytes(frame_bytes(100 + i, (32, 32)))
    svc = start(*folders, queue_size=8)          # a small queue: back-pressure, memory bounded
    try:
        for path in sorted(source.iterdir()):
            shutil.copy(path, camdir / path.name)
        before = {p.name: sha(p) for p in camdir.iterdir()}
        stats_before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode) for p in camdir.iterdir()}
        wait_until(lambda: len(svc.night.records) == 200, timeout=120)
        assert svc._queue.maxsize == 8
    finally:
        svc.stop()
    names = [Path(r.path).name for r in svc.night.records]
    assert names == sorted(before) and len(set(names)) == 200
    assert all(r.status == "stacked" for r in svc.night.records)
    assert {p.name: sha(p) for p in camdir.iterdir()} == before
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode) for p in camdir.iterdir()} \
        == stats_before


def test_restart_resumes_and_redoes_a_frame_in_hand(folders):
    camdir, outdir = folders
    for i in range(3):
        (camdir / f"f{i}.fits").write_bytes(frame_bytes(20 + i))
    svc = start(*folders)
    try:
        wait_until(lambda: len(svc.night.records) == 3)
    finally:
        svc.stop()
    # as if the service had been killed between "processing" and the checkpoint for a fourth file
    (camdir / "f3.fits").write_bytes(frame_bytes(23))
    Ledger(outdir / "ledger.sqlite").begin(camdir.resolve() / "f3.fits", sha(camdir / "f3.fits"), None, None)
    svc = start(*folders)
    try:
        wait_until(lambda: len(svc.night.records) == 4)
        time.sleep(1.5)                          # a rescan passes: nothing taken twice
    finally:
        svc.stop()
    assert [Path(r.path).name for r in svc.night.records] == ["f0.fits", "f1.fits", "f2.fits", "f3.fits"]
    rows = Ledger(outdir / "ledger.sqlite").all()
    assert sorted(r.status for r in rows) == ["stacked"] * 4


def test_outdir_inside_camdir_is_refused(folders):
    camdir, _ = folders
    for bad in (camdir, camdir / "products", camdir / "a" / ".." / "b"):
        with pytest.raises(OutdirInsideCamdirError, match="inside the camera folder"):
            Service(camdir, bad, fast_settings(), night_factory=StandInNight.restore)
    assert issubclass(OutdirInsideCamdirError, ConfigError)
    with pytest.raises(ConfigError, match="does not exist"):
        Service(camdir / "missing", camdir.parent / "out", fast_settings(), night_factory=StandInNight.restore)


def test_process_existing_takes_files_in_date_obs_order(folders):
    camdir, outdir = folders
    dates = {"c.fits": "2026-11-26T21:00:00", "a.fits": "2026-11-26T23:00:00", "b.fits": "2026-11-26T22:00:00"}
    for i, (name, date) in enumerate(dates.items()):
        (camdir / name).write_bytes(frame_bytes(30 + i, date=date))
    (camdir / "broken.fits").write_bytes(frame_bytes(40, date="2026-11-26T22:00:00")[:3000])  # tie: by name
    (camdir / "log.txt").write_text("night log")
    calls = []
    night = process_existing(camdir, outdir, fast_settings(), progress=lambda d, t, r: calls.append((d, t)),
                             night_factory=StandInNight.restore)
    assert [(Path(r.path).name, r.status) for r in night.records] == [
        ("c.fits", "stacked"), ("b.fits", "stacked"), ("broken.fits", "quarantined"), ("a.fits", "stacked")]
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    rows = {Path(r.path).name: r.status for r in Ledger(outdir / "ledger.sqlite").all()}
    assert rows == {"a.fits": "stacked", "b.fits": "stacked", "c.fits": "stacked", "broken.fits": "quarantined",
                    "log.txt": "ignored"}
