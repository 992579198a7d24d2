"""The service with real threads, real watchdog, real files and the real per-frame path (Night).

"None taken early" is checked through the ledger: the hash recorded when a file
was taken must be the hash of its final bytes. The reference for "the same
result" is an uninterrupted ``process_existing`` run (what ``observer
reprocess`` does) over the same simulated night.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from observer.config import ConfigError, Settings
from observer.ledger import Ledger
from observer.reprocess import process_existing
from observer.service import OutdirInsideCamdirError, Service
from observer.simulator import SimSettings, simulate_night


def fast_settings(**service) -> Settings:
    settings = Settings()
    values = {"stable_seconds": 0.3, "quarantine_after_seconds": 1.5, "rescan_seconds": 1.0, **service}
    return dataclasses.replace(settings, service=dataclasses.replace(settings.service, **values))


def reference_night(root: Path, size: int, frames: int) -> dict:
    """A simulated night and its uninterrupted reduction (the reference the service runs are compared with)."""
    simulate_night(root / "src", SimSettings(size=size, frames=frames, fill_seconds=0.0, cadence=0.0),
                   truth_path=root / "truth.ecsv")
    reference = process_existing(root / "src", root / "ref", fast_settings())
    return {"src": root / "src", "ref": root / "ref", "order": [Path(r.path).name for r in reference.records],
            "status": {Path(r.path).name: r.status for r in reference.records}}


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """A small simulated night (2 filters x 3 frames + 2 offsets, 256 px) and its uninterrupted reduction."""
    return reference_night(tmp_path_factory.mktemp("night"), size=256, frames=3)


@pytest.fixture(scope="module")
def longer_night(tmp_path_factory):
    """12 files at 512 px: enough work (a few seconds) for kills to land mid-night."""
    return reference_night(tmp_path_factory.mktemp("longer"), size=512, frames=5)


def junk_frame(seed: int, shape=(32, 32), date: str = "2026-11-26T22:00:00") -> bytes:
    """A small frame the per-frame path rejects quickly (no usable tags): for tests of the machinery."""
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


def wait_until(predicate, timeout: float = 60.0) -> None:
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
    svc = Service(camdir, outdir, fast_settings(**service))
    svc.start()
    return svc


def names(svc: Service) -> list[str]:
    return [Path(r.path).name for r in svc.night.records]


def stacks_of(outdir: Path) -> dict[str, tuple[np.ndarray, int]]:
    out = {}
    for path in sorted(outdir.glob("*/*/stack.fits")):
        with fits.open(path) as hdul:
            out[f"{path.parent.parent.name}/{path.parent.name}"] = (hdul[0].data.copy(), hdul[0].header["NCOMBINE"])
    return out


def assert_same_stacks(outdir: Path, refdir: Path) -> None:
    got, ref = stacks_of(outdir), stacks_of(refdir)
    assert got.keys() == ref.keys() and ref
    for key, (image, ncombine) in ref.items():
        assert got[key][1] == ncombine, key
        np.testing.assert_allclose(got[key][0], image, rtol=1e-5, atol=1e-3 * float(np.nanstd(image)),
                                   err_msg=key)


def assert_same_catalogues(outdir: Path, refdir: Path) -> None:
    """Same stars, magnitudes within 1e-6 (when the reference run wrote a catalogue)."""
    for ref_path in refdir.glob("*/catalog.ecsv"):
        ref = Table.read(ref_path, format="ascii.ecsv")
        got = Table.read(outdir / ref_path.parent.name / "catalog.ecsv", format="ascii.ecsv")
        assert len(got) == len(ref) > 0
        np.testing.assert_allclose(got["x"], ref["x"], atol=1e-6)
        np.testing.assert_allclose(got["y"], ref["y"], atol=1e-6)
        for name in (c for c in ref.colnames if c.startswith("mag_")):
            np.testing.assert_allclose(got[name], ref[name], atol=1e-6, equal_nan=True)


def test_camera_at_a_cadence_every_frame_once_none_early(folders, night):
    camdir, outdir = folders
    svc = start(camdir, outdir)
    events = []
    svc.subscribe(events.append)
    try:
        (camdir / "preview.jpg").write_bytes(b"\xff\xd8 jpeg preview")
        for name in night["order"]:
            write_slowly(camdir / name, (night["src"] / name).read_bytes(), seconds=0.8)
        wait_until(lambda: len(svc.night.records) == len(night["order"]))
        wait_until(lambda: svc.idle)                              # the end-of-burst catalogue is written too
        snap = svc.snapshot()
        pngs = {p.relative_to(outdir).as_posix() for p in svc.save_pngs("M35")}
    finally:
        svc.stop()
    assert names(svc) == night["order"]                           # once each, in order
    assert {Path(r.path).name: r.status for r in svc.night.records} == night["status"]
    assert snap.queue_length == 0 and len(snap.frames) == len(night["order"])
    assert {"M35/blue/stack.png", "M35/green/stack.png"} <= pngs
    assert all((outdir / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    rows = {Path(r.path).name: r for r in Ledger(outdir / "ledger.sqlite").all()}
    for name in night["order"]:                                   # taken only when whole
        assert rows[name].sha256 == sha(camdir / name) and rows[name].size == (camdir / name).stat().st_size
        assert rows[name].status == night["status"][name]
    assert rows["preview.jpg"].status == "ignored" and rows["preview.jpg"].reason == "not a FITS file name"
    assert "preview.jpg" not in Table.read(outdir / "frames.ecsv")["path"].tolist()
    assert [Path(e.record.path).name for e in events if e.record] == night["order"]
    assert_same_stacks(outdir, night["ref"])                      # watch == reprocess
    assert_same_catalogues(outdir, night["ref"])


def test_duplicate_ignored_and_replaced_file_is_a_new_frame(folders, night, tmp_path):
    camdir, outdir = folders
    first = night["order"][0]
    svc = start(camdir, outdir)
    try:
        shutil.copy(night["src"] / first, camdir / first)
        wait_until(lambda: len(svc.night.records) == 1)
        shutil.copy(camdir / first, camdir / "backup_copy.fits")
        wait_until(lambda: len(svc.night.records) == 2)
        staging = tmp_path / "staging.fits"
        with fits.open(night["src"] / first) as hdul:
            hdul[0].header["HISTORY"] = "rewritten by the camera software"
            hdul.writeto(staging)
        os.replace(staging, camdir / first)                       # same name, different bytes
        wait_until(lambda: len(svc.night.records) == 3)
        time.sleep(1.2)                                           # a rescan passes: nothing taken twice
    finally:
        svc.stop()
    records = svc.night.records
    assert [(Path(r.path).name, r.status) for r in records] == [
        (first, "stacked"), ("backup_copy.fits", "ignored"), (first, "stacked")]
    assert records[1].reason == f"duplicate of {first}"
    assert records[0].sha256 != records[2].sha256


def bad_corpus(camdir: Path, good: Path, outside: Path) -> set[str]:
    """The bad-input cases (truncated, empty, not FITS, NaN, wrong shape, missing headers), written next
    to a night's good frames; returns their names."""
    raw = good.read_bytes()
    with fits.open(good) as hdul:
        header, data = hdul[0].header.copy(), hdul[0].data.astype(np.float32)
    (camdir / "empty.fits").write_bytes(b"")
    (camdir / "truncated.fits").write_bytes(raw[:len(raw) // 2])
    (camdir / "header_only.fits").write_bytes(raw[:2880])
    (camdir / "notfits.fits").write_bytes(b"this is an observing log, not an image\n" * 100)
    (camdir / "cut.fits.gz").write_bytes(gzip.compress(raw)[:5000])
    nan_header = header.copy()
    for key in ("BZERO", "BSCALE"):
        nan_header.remove(key, ignore_missing=True)
    fits.PrimaryHDU(np.full_like(data, np.nan), nan_header).writeto(camdir / "nan_filled.fits")
    fits.PrimaryHDU(np.stack([data] * 4), nan_header).writeto(camdir / "cube.fits")  # 3 planes = colour
    fits.PrimaryHDU(data[:200, :180], nan_header).writeto(camdir / "wrongshape.fits")
    # Without OBJECT a frame pointing at a known target belongs to it: this one points nowhere.
    for keys, name in ((("FILTER",), "nofilter.fits"),
                       (("OBJECT", "RA", "DEC", "OBJCTRA", "OBJCTDEC"), "noobject.fits")):
        h = nan_header.copy()
        for key in keys:
            h.remove(key, ignore_missing=True)
        fits.PrimaryHDU(data + 1.0, h).writeto(camdir / name)  # other bytes: not a duplicate
    (camdir / "x.fits").mkdir()                               # opening it fails like a permission error
    (camdir / "link.fits").symlink_to(outside)                # leads outside: never followed
    made = {"empty.fits", "truncated.fits", "header_only.fits", "notfits.fits", "cut.fits.gz", "nan_filled.fits",
            "cube.fits", "wrongshape.fits", "nofilter.fits", "noobject.fits", "x.fits"}
    if os.geteuid() != 0:                                     # root reads a chmod-000 file anyway
        (camdir / "unreadable.fits").write_bytes(raw)
        os.chmod(camdir / "unreadable.fits", 0)
        made.add("unreadable.fits")
    return made


def test_bad_files_recorded_with_reasons_and_the_service_lives_on(folders, night, tmp_path):
    camdir, outdir = folders
    outside = tmp_path / "outside.fits"
    shutil.copy(night["src"] / night["order"][1], outside)
    svc = start(camdir, outdir)
    try:
        for name in night["order"][:4]:
            shutil.copy(night["src"] / name, camdir / name)
        bad = bad_corpus(camdir, night["src"] / night["order"][0], outside)
        for name in night["order"][4:]:
            shutil.copy(night["src"] / name, camdir / name)
        wait_until(lambda: len(svc.night.records) == len(night["order"]) + len(bad))
        assert svc.alive
    finally:
        svc.stop()
    got = {Path(r.path).name: r for r in svc.night.records}
    assert set(got) == set(night["order"]) | bad                  # the outside link never taken
    for name in night["order"]:
        assert got[name].status == night["status"][name], name
    for name in bad:
        assert got[name].status in ("rejected", "quarantined", "ignored") and got[name].reason, \
            (name, got[name].status, got[name].reason)
    assert got["empty.fits"].status == "quarantined" and "empty file" in got["empty.fits"].reason
    assert got["truncated.fits"].status == "quarantined" and "data unit of HDU 0 has" in got["truncated.fits"].reason
    assert got["header_only.fits"].status == "quarantined"
    assert got["cut.fits.gz"].status == "quarantined" and "gzip" in got["cut.fits.gz"].reason
    assert got["x.fits"].status == "rejected" and got["x.fits"].reason == "cannot read: Is a directory"


def test_quarantined_file_taken_when_it_completes(folders):
    camdir, outdir = folders
    data = junk_frame(8)
    svc = start(camdir, outdir)
    try:
        (camdir / "slow.fits").write_bytes(data[:3000])
        wait_until(lambda: len(svc.night.records) == 1)
        (first,) = svc.night.records
        assert (first.status, first.sha256) == ("quarantined", "")
        assert "incomplete after" in first.reason
        with open(camdir / "slow.fits", "ab") as handle:
            handle.write(data[3000:])
        wait_until(lambda: svc.night.records and svc.night.records[-1].status != "quarantined")
    finally:
        svc.stop()
    # The file is taken once complete, and its row replaces the quarantine row (one row per file).
    (second,) = svc.night.records
    assert second.status != "quarantined" and second.sha256 == hashlib.sha256(data).hexdigest()


def test_burst_of_200_all_processed_in_order_raw_files_untouched(folders, tmp_path):
    camdir, outdir = folders
    source = tmp_path / "backup"
    source.mkdir()
    for i in range(200):
        (source / f"f{i:03d}.fits").write_bytes(junk_frame(100 + i))
    svc = start(camdir, outdir, queue_size=8)        # a small queue: back-pressure keeps memory bounded
    try:
        for path in sorted(source.iterdir()):
            shutil.copy(path, camdir / path.name)
        before = {p.name: (sha(p), p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode)
                  for p in camdir.iterdir()}
        wait_until(lambda: len(svc.night.records) == 200, timeout=240)
    finally:
        svc.stop()
    assert names(svc) == sorted(before)              # all, once each, in order
    after = {p.name: (sha(p), p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode) for p in camdir.iterdir()}
    assert after == before                           # raw files byte-identical, in place, untouched
    assert len(Ledger(outdir / "ledger.sqlite").all()) == 200


def test_restart_resumes_and_redoes_a_frame_in_hand(folders):
    camdir, outdir = folders
    for i in range(3):
        (camdir / f"f{i}.fits").write_bytes(junk_frame(20 + i))
    svc = start(camdir, outdir)
    try:
        wait_until(lambda: len(svc.night.records) == 3)
    finally:
        svc.stop()
    # as if the service had been killed between "processing" and the checkpoint for a fourth file
    (camdir / "f3.fits").write_bytes(junk_frame(23))
    Ledger(outdir / "ledger.sqlite").begin(camdir.resolve() / "f3.fits", sha(camdir / "f3.fits"), None, None)
    svc = start(camdir, outdir)
    try:
        wait_until(lambda: len(svc.night.records) == 4)
        time.sleep(1.2)                              # a rescan passes: nothing taken twice
    finally:
        svc.stop()
    assert names(svc) == ["f0.fits", "f1.fits", "f2.fits", "f3.fits"]
    rows = Ledger(outdir / "ledger.sqlite").all()
    assert len(rows) == 4 and not [r for r in rows if r.status in ("pending", "processing")]


def test_outdir_inside_camdir_is_refused(folders):
    camdir, _ = folders
    for bad in (camdir, camdir / "products", camdir / "a" / ".." / "b"):
        with pytest.raises(OutdirInsideCamdirError, match="inside the camera folder"):
            Service(camdir, bad, fast_settings())
    assert issubclass(OutdirInsideCamdirError, ConfigError)
    with pytest.raises(ConfigError, match="does not exist"):
        Service(camdir / "missing", camdir.parent / "out", fast_settings())


def test_process_existing_takes_files_in_date_obs_order(folders):
    camdir, outdir = folders
    dates = {"c.fits": "2026-11-26T21:00:00", "a.fits": "2026-11-26T23:00:00", "b.fits": "2026-11-26T22:00:00"}
    for i, (name, date) in enumerate(dates.items()):
        (camdir / name).write_bytes(junk_frame(30 + i, date=date))
    (camdir / "broken.fits").write_bytes(junk_frame(40, date="2026-11-26T22:00:00")[:3000])   # tie: by name
    (camdir / "log.txt").write_text("night log")
    calls = []
    result = process_existing(camdir, outdir, fast_settings(), progress=lambda d, t, r: calls.append((d, t)))
    assert [Path(r.path).name for r in result.records] == ["c.fits", "b.fits", "broken.fits", "a.fits"]
    assert result.records[2].status == "quarantined"
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    rows = {Path(r.path).name: r.status for r in Ledger(outdir / "ledger.sqlite").all()}
    assert rows.keys() == {"a.fits", "b.fits", "c.fits", "broken.fits", "log.txt"} and rows["log.txt"] == "ignored"


# --------------------------------------------------------------------- the real command, killed at random
def _watch(camdir: Path, outdir: Path, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "observer.cli", "watch", str(camdir), "--out", str(outdir),
                             "--headless"], stdout=log, stderr=subprocess.STDOUT)


def _frames_done(outdir: Path) -> int:
    try:
        return len(Table.read(outdir / "frames.ecsv", format="ascii.ecsv"))
    except (OSError, ValueError):
        return 0


def _started(log_path: Path) -> int:
    return log_path.read_text().count("observer: watching")


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_counts_each_frame_once(folders, longer_night, tmp_path):
    night = longer_night
    camdir, outdir = folders
    for name in night["order"]:                  # the night lands in DATE-OBS order, as in the reference run
        shutil.copy(night["src"] / name, camdir / name)
    total = len(night["order"])
    rng = random.Random(5)
    log_path = tmp_path / "watch.log"
    kills = 0
    with open(log_path, "w") as log:
        # kill -9 a random moment after each new frame: in the next frame's reduction or its checkpoint
        while kills < 3 and _frames_done(outdir) < total - 1:
            done = _frames_done(outdir)
            proc = _watch(camdir, outdir, log)
            wait_until(lambda: _frames_done(outdir) > done, timeout=120)
            time.sleep(rng.uniform(0.0, 0.25))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        starts = _started(log_path)
        proc = _watch(camdir, outdir, log)
        wait_until(lambda: _started(log_path) > starts and _frames_done(outdir) >= total, timeout=120)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)         # finishes the frame in hand and exits 0
        assert proc.wait(timeout=60) == 0
    assert kills == 3
    frames = Table.read(outdir / "frames.ecsv", format="ascii.ecsv")
    paths = [Path(p).name for p in frames["path"]]
    assert sorted(paths) == sorted(night["order"])                # each file exactly once
    assert {Path(p).name: s for p, s in zip(frames["path"], frames["status"])} == night["status"]
    for key, (_, ncombine) in stacks_of(outdir).items():
        target, filt = key.split("/")
        stacked = [r for r in frames if r["target"] == target and r["filter"] == filt and r["status"] == "stacked"]
        assert ncombine == len(stacked), key
    assert_same_stacks(outdir, night["ref"])
    rows = Ledger(outdir / "ledger.sqlite").all()
    assert sorted(Path(r.path).name for r in rows) == sorted(night["order"])
    assert {r.status for r in rows} <= {"stacked", "rejected", "offset"}
