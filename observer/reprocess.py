"""``observer reprocess``: the service's own worker logic over a saved night, then exit.

One code path with ``observer watch`` (README "Products"): every file goes through
``Service.handle``, here calibration frames first, then in DATE-OBS order (this module owns that ordering),
synchronously, with the progress bar a user waits on.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from observer.config import Settings
from observer.ingest import fits_completeness, is_fits_name
from observer.service import Job, NightFactory, Service
from observer.state import CALIBRATION_KINDS, FrameRecord
from observer.watcher import inside, scan

if TYPE_CHECKING:
    from observer.night import Night

log = logging.getLogger(__name__)

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


def _processing_order_key(path: Path, keywords: dict[str, tuple[str, ...]] | None = None
                          ) -> tuple[bool, int, float, str]:
    """Sort key: bias, dark and flat frames first, then the rest; each in DATE-OBS order (read from the
    header only), files without one at the end, ties by name.

    Calibration first because a night's flats are often taken at dawn: in DATE-OBS order they would
    come after every science frame and correct none (live, they can only correct the frames after them).
    """
    from astropy.io import fits

    from observer.tagging import frame_kind
    from reduction.frames import header_facts

    kind = None
    try:
        with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
            for hdu in hdul[:2]:
                facts = header_facts(hdu.header, keywords)
                kind = kind or frame_kind(path.name, facts)
                if facts.date_obs is not None:
                    return (kind not in CALIBRATION_KINDS, 0, float(facts.date_obs.mjd), path.name)
    except Exception:  # noqa: BLE001 - unreadable or not FITS: it still gets its record, last
        log.debug("%s: no DATE-OBS", path, exc_info=True)
    return (kind not in CALIBRATION_KINDS, 1, 0.0, path.name)


def process_existing(nightdir: str | Path, outdir: str | Path, settings: Settings,
                     progress: Callable[[int, int, FrameRecord | None], None] | None = None,
                     night_factory: NightFactory | None = None) -> "Night":
    """Run every file of ``nightdir`` through the service's worker logic, calibration frames first, then in
    DATE-OBS order; write all products.

    ``progress(done, total, record)`` is called after each FITS file (``record``
    None when the file was already in the resumed night). The night
    resumes from ``outdir``'s checkpoint if there is one (an interrupted
    reprocess continues); use a fresh ``outdir`` for a fresh reduction.
    """
    service = Service(nightdir, outdir, settings, night_factory=night_factory, live=False)
    try:
        paths = [p for p in scan(service.camdir) if inside(p, service.camdir)]
        keywords = settings.header.keywords()
        fits_paths = sorted((p for p in paths if is_fits_name(p.name)),
                            key=lambda p: _processing_order_key(p, keywords))
        service.note_existing(paths)
        steps: dict[str, float] = {}
        for done, path in enumerate(fits_paths, start=1):
            records = service.handle(_existing_job(path)) or []
            for record in records:
                for name, seconds in record.step_seconds.items():
                    steps[name] = steps.get(name, 0.0) + seconds
            if progress is not None:
                progress(done, len(fits_paths), records[-1] if records else None)
        started = time.perf_counter()
        with service.night.lock:
            service.publish(None, service.write_products(force=True))
            service.save_state()
        steps["final products"] = time.perf_counter() - started
        log.info("reprocess timings (s, summed over %d files): %s", len(fits_paths),
                 ", ".join(f"{name} {seconds:.2f}" for name, seconds in steps.items()))
    finally:
        service.ledger.close()
    return service.night


def _existing_job(path: Path) -> Job:
    """A job for a file of a saved night: no waiting; an incomplete file is quarantined at once."""
    try:
        st = path.stat()
        result = fits_completeness(path) if not path.is_dir() else None
    except OSError as exc:
        return Job(path, error=f"cannot read: {exc.strerror or exc}")
    if result is not None and not result.complete:
        return Job(path, st.st_size, st.st_mtime_ns, quarantine=f"incomplete: {result.reason}")
    return Job(path, st.st_size, st.st_mtime_ns, ready_at=time.monotonic())


def reprocess(nightdir: str | Path, outdir: str | Path, settings: Settings, progress: bool = True):
    """Reduce every file of ``nightdir`` into ``outdir`` and write all products; returns the Night."""
    nightdir = Path(nightdir)
    if not nightdir.is_dir():
        raise OSError(f"{nightdir}: no such folder")
    return process_existing(nightdir, outdir, settings, progress=ProgressBar() if progress else None)
