"""Watching the camera folder: watchdog events, a start-up scan and a periodic rescan.

Every route by which a file can appear funnels into one callback,
``notify(path, closed)``: watchdog's created / modified / moved-in / closed
events (on watchdog's thread, so the callback must only note the path), the
scan at start-up (files written before the service started), and a slow rescan
as a safety net for file systems that lose events (network shares, some USB
disks). Deciding whether a file is ready is the tracker's job, not this one.

Symlinks that lead outside the camera folder are not followed: the service
must only ever read what the camera wrote.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from watchdog.events import (DirCreatedEvent, DirMovedEvent, FileClosedEvent, FileCreatedEvent,
                             FileModifiedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler)
from watchdog.observers import Observer

from observer.ingest import is_fits_name

log = logging.getLogger(__name__)

#: Callback for a path that may need looking at; ``closed`` when a writer just closed it.
Notify = Callable[[Path, bool], None]


def inside(path: Path, folder: Path) -> bool:
    """Does ``path``, symlinks resolved, lie inside ``folder`` (itself resolved)?"""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):       # a symlink loop
        return False
    return resolved == folder or folder in resolved.parents


def scan(folder: Path) -> Iterator[Path]:
    """Every file under ``folder`` (recursively, symlinked folders not followed), plus folders with FITS names.

    A folder named like a FITS file is reported too: it is something the
    observer may think is a frame, so the service records why it cannot be read.
    """
    for root, dirs, files in os.walk(folder, followlinks=False):
        base = Path(root)
        for name in files:
            yield base / name
        for name in dirs:
            if is_fits_name(name):
                yield base / name


class _Funnel(FileSystemEventHandler):
    """watchdog handler: every interesting event becomes one ``notify`` call (on watchdog's thread)."""

    def __init__(self, notify: Notify, rescan_dir: Callable[[Path], None]) -> None:
        self._notify = notify
        self._rescan_dir = rescan_dir

    def dispatch(self, event: FileSystemEvent) -> None:
        if isinstance(event, (FileCreatedEvent, FileModifiedEvent)):
            self._notify(Path(os.fsdecode(event.src_path)), False)
        elif isinstance(event, FileClosedEvent):
            self._notify(Path(os.fsdecode(event.src_path)), True)
        elif isinstance(event, FileMovedEvent):
            self._notify(Path(os.fsdecode(event.dest_path)), True)   # a rename lands a whole file
        elif isinstance(event, (DirCreatedEvent, DirMovedEvent)):
            # A folder moved in (or created and filled fast) may bring files that raise no events of their own.
            dest = event.dest_path if isinstance(event, DirMovedEvent) else event.src_path
            self._rescan_dir(Path(os.fsdecode(dest)))


class Watcher:
    """watchdog on ``camdir`` (recursive) plus scans; all paths go to ``notify`` if inside ``camdir``."""

    def __init__(self, camdir: str | Path, notify: Notify) -> None:
        self.camdir = Path(camdir).resolve()
        self._notify = notify
        self._observer: Observer | None = None

    def note(self, path: Path, closed: bool = False) -> None:
        """Pass ``path`` on unless it is (or leads) outside the camera folder."""
        if not inside(path, self.camdir):
            log.debug("not following %s: it leads outside %s", path, self.camdir)
            return
        self._notify(path, closed)

    def scan(self, folder: Path | None = None) -> int:
        """Note every file under ``folder`` (default the camera folder); returns how many."""
        count = 0
        for path in scan(folder or self.camdir):
            self.note(path)
            count += 1
        return count

    def start(self) -> None:
        """Start watchdog; call :meth:`scan` after, so no file written in between is missed."""
        observer = Observer()
        observer.schedule(_Funnel(self.note, self._rescan_dir), str(self.camdir), recursive=True)
        observer.daemon = True
        observer.start()
        self._observer = observer
        log.info("watching %s", self.camdir)

    def _rescan_dir(self, folder: Path) -> None:
        # Runs on watchdog's thread: a folder moved in is rare and small; scanning it only notes paths.
        if is_fits_name(folder.name):
            self.note(folder)
        if inside(folder, self.camdir) and not folder.is_symlink():
            self.scan(folder)

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5.0)
            self._observer = None
