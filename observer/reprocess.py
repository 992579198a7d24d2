"""``observer reprocess``: the service's own worker logic over a saved night, then exit.

One code path with ``observer watch`` (DESIGN.md): files go through
``observer.service.process_existing`` in DATE-OBS order; this module only adds
the progress bar a user waits on.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

from observer.config import Settings
from observer.state import FrameRecord

BAR_WIDTH = 30


class ProgressBar:
    """A one-line progress bar on a terminal (plain lines when the output is not a terminal)."""

    def __init__(self, stream: TextIO = sys.stderr):
        self.stream = stream
        self.start = time.monotonic()
        self.tty = stream.isatty()

    def __call__(self, done: int, total: int, record: FrameRecord | None) -> None:
        elapsed = time.monotonic() - self.start
        rate = done / elapsed * 60 if elapsed > 0 else 0.0
        filled = int(BAR_WIDTH * done / max(total, 1))
        name = Path(record.path).name if record else ""
        status = f"{record.status}" + (f" ({record.reason})" if record and record.reason else "") if record else ""
        line = (f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total} "
                f"{rate:.1f} frames/min  {name}: {status}")
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150))
            if done == total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def reprocess(nightdir: str | Path, outdir: str | Path, settings: Settings, progress: bool = True):
    """Reduce every file of ``nightdir`` into ``outdir`` and write all products; returns the Night."""
    from observer.service import process_existing

    nightdir = Path(nightdir)
    if not nightdir.is_dir():
        raise OSError(f"{nightdir}: no such folder")
    return process_existing(nightdir, outdir, settings, progress=ProgressBar() if progress else None)
