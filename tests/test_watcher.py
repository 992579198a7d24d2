"""The watcher with real watchdog: events, moved-in files and folders, scans, symlinks leading outside."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from observer.watcher import Watcher, inside, scan


class Collector:
    def __init__(self):
        self.lock = threading.Lock()
        self.paths: dict[Path, bool] = {}

    def __call__(self, path: Path, closed: bool) -> None:
        with self.lock:
            self.paths[path] = self.paths.get(path, False) or closed

    def wait_for(self, path: Path, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                if path in self.paths:
                    return True
            time.sleep(0.02)
        return False


@pytest.fixture
def watched(tmp_path):
    camdir = tmp_path / "cam"
    camdir.mkdir()
    seen = Collector()
    watcher = Watcher(camdir, seen)
    watcher.start()
    yield watcher.camdir, seen, watcher
    watcher.stop()


def test_created_written_and_closed_file_is_noted_closed(watched):
    camdir, seen, _ = watched
    path = camdir / "a.fits"        # (in a brand-new subfolder the close can beat watchdog's new watch)
    with open(path, "wb") as handle:
        handle.write(b"x" * 100)
    assert seen.wait_for(path)
    end = time.monotonic() + 5
    while not seen.paths[path] and time.monotonic() < end:   # inotify gives a close-after-write event
        time.sleep(0.02)
    assert seen.paths[path] is True


def test_moved_in_file_and_folder_are_noted(watched, tmp_path):
    camdir, seen, _ = watched
    outside = tmp_path / "elsewhere"
    (outside / "batch").mkdir(parents=True)
    (outside / "one.fits").write_bytes(b"1")
    (outside / "batch" / "two.fits").write_bytes(b"2")
    os.rename(outside / "one.fits", camdir / "one.fits")
    os.rename(outside / "batch", camdir / "batch")
    assert seen.wait_for(camdir / "one.fits")
    assert seen.wait_for(camdir / "batch" / "two.fits")      # found by scanning the folder moved in


def test_symlink_leading_outside_is_not_followed(watched, tmp_path):
    camdir, seen, watcher = watched
    secret = tmp_path / "secret.fits"
    secret.write_bytes(b"not the camera's")
    (camdir / "link.fits").symlink_to(secret)
    (camdir / "inner.fits").write_bytes(b"camera")
    (camdir / "inner_link.fits").symlink_to(camdir / "inner.fits")
    watcher.scan()
    assert seen.wait_for(camdir / "inner.fits")
    assert seen.wait_for(camdir / "inner_link.fits")
    time.sleep(0.3)
    assert camdir / "link.fits" not in seen.paths
    assert not inside(camdir / "link.fits", camdir)


def test_scan_lists_files_recursively_and_folders_with_fits_names(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f.fits").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("clouds at 23h")
    (tmp_path / "x.fits").mkdir()
    found = {p.relative_to(tmp_path).as_posix() for p in scan(tmp_path)}
    assert found == {"a/b/f.fits", "notes.txt", "x.fits"}
