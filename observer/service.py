"""The observing service: watch the camera folder and take every frame exactly once.

Threads:

* watchdog's thread only notes paths (:class:`observer.watcher.Watcher`);
* the *ingest* thread polls the :class:`~observer.ingest.FileTracker` (is a file
  whole yet?), rescans the folder now and then, and puts ready files on a
  bounded queue in order of readiness;
* one *worker* thread takes them one at a time through the per-frame path
  (``Night.process``). Frames of one target must be stacked in order onto one
  reference grid, so a single worker is both simpler and right; the reduction
  itself is numpy-bound.

Exactly once, even under ``kill -9``: for each file the worker hashes it, checks
the hash against the night (already taken? a duplicate under another name?),
records it in the ledger as ``processing``, processes it, checkpoints the night
(atomically), and only then records the outcome in the ledger. On restart the
night comes back from its last checkpoint; a file whose hash the checkpoint
holds is done (the ledger is repaired if the crash fell between checkpoint and
ledger commit), and one still ``processing`` but unknown to the checkpoint is
simply redone.

``observer reprocess`` runs the same worker logic (:meth:`Service.handle`)
synchronously over a saved night: one code path for live and offline. The
night is the one owner of its state; the service only orders the work and
holds the night's lock across a file's whole story (process, products,
checkpoint) so that a snapshot never sees half of it. Measuring runs on a
:class:`~observer.scheduler.MeasurementScheduler` the service injects:
in the background live, in the caller's thread offline.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from observer.config import ConfigError, Settings
from observer.ingest import FileTracker, is_fits_name, sha256_of
from observer.ledger import Ledger
from observer.scheduler import MeasurementScheduler
from observer.state import FINAL_STATUSES, FrameRecord, Snapshot, Status, file_outcome
from observer.watcher import Watcher

log = logging.getLogger(__name__)

#: How often the ingest thread polls the tracker (s): the latency floor for a file closed by its writer.
POLL_SECONDS = 0.1
NOT_FITS_NAME = "not a FITS file name"
LEDGER_NAME = "ledger.sqlite"
#: At shutdown, how long to let the last catalogue and age fit finish (s).
STOP_MEASURE_TIMEOUT = 120.0


class OutdirInsideCamdirError(ConfigError):
    """The output folder is the camera folder or inside it (the service would watch its own products)."""


if TYPE_CHECKING:
    from observer.night import Night

NightFactory = Callable[[Settings, Path], "Night"]
#: A record taken and how to commit its outcome to the ledger (after the checkpoint).
_Outcome = tuple[list[FrameRecord], Callable[[], None]]


def _restore_night(settings: Settings, outdir: Path) -> "Night":
    from observer.night import Night   # heavy (the reduction stack); imported when a service really starts

    return Night.restore(settings, outdir)


@dataclass(frozen=True)
class Job:
    """One unit of work for the worker: a ready file, an unreadable one, or a quarantine to record."""

    path: Path
    size: int | None = None
    mtime_ns: int | None = None
    error: str = ""                  # cannot read: record as rejected
    quarantine: str = ""             # incomplete past the timeout: record as quarantined
    ready_at: float = 0.0            # monotonic time the file was found complete (for the latency figure)


@dataclass(frozen=True)
class ServiceEvent:
    """What subscribers hear after each file (on the worker thread; keep callbacks short)."""

    record: FrameRecord | None       # None for a product-only update (end of a burst)
    products: tuple[Path, ...]
    snapshot: Snapshot


def check_folders(camdir: str | Path, outdir: str | Path) -> tuple[Path, Path]:
    """Resolved (camdir, outdir); refuses an output folder inside (or equal to) the camera folder."""
    cam = Path(camdir).expanduser().resolve()
    out = Path(outdir).expanduser().resolve()
    if not cam.is_dir():
        raise ConfigError(f"camera folder {camdir} does not exist or is not a folder")
    if out == cam or cam in out.parents:
        raise OutdirInsideCamdirError(
            f"output folder {outdir} is inside the camera folder {camdir}: the service would watch its own "
            f"products; choose an output folder outside it (e.g. {cam.parent / (cam.name + '-reduced')})")
    return cam, out


class Service:
    """The watching service over ``camdir`` writing into ``outdir``; see the module docstring."""

    def __init__(self, camdir: str | Path, outdir: str | Path, settings: Settings,
                 night_factory: NightFactory | None = None, live: bool = True) -> None:
        self.camdir, self.outdir = check_folders(camdir, outdir)
        self.settings = settings
        self.live = live
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.outdir / LEDGER_NAME)
        self.night = (night_factory or _restore_night)(settings, self.outdir)
        svc = settings.service
        self.tracker = FileTracker(svc.stable_seconds, svc.quarantine_after_seconds)
        self.watcher = Watcher(self.camdir, self._on_path)
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=svc.queue_size)
        self._stop = threading.Event()
        self._others_lock = threading.Lock()
        self._others: set[Path] = set()            # non-FITS names noted, not yet in the ledger
        self._ignored_names: set[Path] = set()     # non-FITS names already in the ledger
        self._subscribers: list[Callable[[ServiceEvent], None]] = []
        self._threads: list[threading.Thread] = []
        self._ingest_lock = threading.Lock()       # held while ready files go from the tracker to the queue
        self._products_stale = False               # frames since the last forced (catalogue) product write
        self._uncommitted: list[Callable[[], None]] = []   # offline: ledger outcomes awaiting a checkpoint
        self._snapshot = self.night.snapshot()
        self._publish_lock = threading.Lock()
        self._resume_from_ledger()
        # Live, catalogue, CMD and age are measured off the worker thread: a frame never waits for them.
        self.measurements = MeasurementScheduler(
            functools.partial(self.night.run_measurement, draw_cmd=live),
            self.night.run_age if settings.age.enabled else None, background=live,
            catalog_throttle=svc.product_throttle_seconds, age_throttle=settings.age.throttle_seconds)
        if live:
            self.measurements.listeners.append(lambda paths: self.publish(None, paths))

    # ----------------------------------------------------------------- start-up and shutdown
    def _resume_from_ledger(self) -> None:
        """Tell the tracker which files are already handled, so a restart does not re-hash the whole night.

        Only files the restored night knows (by path and hash) count as done;
        anything else (in flight at a crash, or lost with a checkpoint) is taken again.
        """
        done = {(r.path, r.sha256) for r in self.night.records}
        for row in self.ledger.all():
            if row.reason == NOT_FITS_NAME:
                self._ignored_names.add(Path(row.path))
            elif row.status in FINAL_STATUSES and (row.path, row.sha256) in done and row.size is not None \
                    and row.mtime is not None:
                self.tracker.mark_taken(Path(row.path), int(row.size), int(row.mtime))
        for row in self.ledger.in_flight():
            log.info("%s was in hand when the service stopped; it is taken again", row.path)

    def start(self) -> None:
        """Start watching (events first, then the start-up scan, so nothing slips between) and working."""
        self.watcher.start()
        count = self.watcher.scan()
        log.info("start-up scan of %s: %d files", self.camdir, count)
        for name, target in (("observer-ingest", self._ingest_loop), ("observer-worker", self._worker_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    @property
    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def stop(self) -> None:
        """Finish the frame in hand, write products if stale, checkpoint and close."""
        self._stop.set()
        self.watcher.stop()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        if self._products_stale:
            self.write_products(force=True)
        # Not under the night's lock: the measuring thread applies its results under it.
        if not self.measurements.finish(STOP_MEASURE_TIMEOUT, ages=False):
            log.warning("stopping before the last catalogue/age update finished")
        self.save_state()
        self.ledger.close()
        log.info("service stopped")

    # ----------------------------------------------------------------- what the dashboard reads
    def subscribe(self, callback: Callable[[ServiceEvent], None]) -> None:
        """Call ``callback(event)`` after each file and each end-of-burst product update (worker thread)."""
        self._subscribers.append(callback)

    @property
    def queue_length(self) -> int:
        """Files queued or in hand (``unfinished_tasks`` counts from ``put`` to ``task_done``)."""
        return self._queue.unfinished_tasks

    @property
    def idle(self) -> bool:
        """Nothing filling, queued or in hand, and the products (catalogue and CMD too) are current.

        A file between the tracker and the queue is counted as busy: the ingest
        thread holds ``_ingest_lock`` across that hand-over, so this never
        reports idle in the gap (the demo stops on it).
        """
        if not self._ingest_lock.acquire(blocking=False):
            return False
        try:
            measuring = self.measurements.busy
            return self.queue_length == 0 and self.tracker.waiting == 0 and not self._products_stale \
                and not measuring
        finally:
            self._ingest_lock.release()

    def snapshot(self) -> Snapshot:
        """The state as of the last finished file, with the live queue length (cheap: no science)."""
        n = self.queue_length + self.tracker.waiting
        return dataclasses.replace(self._snapshot, busy=n > 0, queue_length=n)

    def save_pngs(self, target: str) -> list[Path]:
        """The dashboard's "save PNGs": every stack of the target (``stack.png`` beside ``stack.fits``,
        zscale, as DS9 shows it) and its CMD, so an observer can send a picture without a FITS viewer."""
        with self.night.lock:
            self.write_products(force=True)
            return self.night.save_pngs(target)

    def send_to_samp(self, target: str) -> str:
        """The dashboard's broadcast: the target's catalogue and stacks to a running SAMP hub (one line back)."""
        from observer.samp import broadcast

        return broadcast(self.outdir, [target])

    # ----------------------------------------------------------------- watcher and ingest threads
    def _on_path(self, path: Path, closed: bool) -> None:
        """watchdog's thread and scans: note the path, nothing more."""
        if is_fits_name(path.name):
            self.tracker.note(path, closed)
        elif path not in self._ignored_names:
            with self._others_lock:
                self._others.add(path)

    def note_existing(self, paths: Iterable[Path]) -> None:
        """Note the non-FITS files of a saved night (reprocess), so that they are recorded as ignored once."""
        for path in paths:
            if not is_fits_name(path.name):
                self._on_path(path, False)
        self._record_other_names()

    def _record_other_names(self) -> None:
        """Non-FITS files (JPEG previews, logs) go in the ledger only, once, not in frames.ecsv."""
        with self._others_lock:
            others, self._others = self._others, set()
        for path in others - self._ignored_names:
            if path.is_file():
                log.debug("%s: %s, ignored", path, NOT_FITS_NAME)
                self.ledger.record(path, "", Status.IGNORED, NOT_FITS_NAME)
                self._ignored_names.add(path)

    def _put(self, job: Job) -> bool:
        """Queue a job, waiting while the queue is full (that is the back-pressure); False if stopping."""
        while not self._stop.is_set():
            try:
                self._queue.put(job, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _ingest_loop(self) -> None:
        rescan = self.settings.service.rescan_seconds
        next_rescan = time.monotonic() + rescan
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                with self._ingest_lock:
                    ready, quarantined = self.tracker.poll(now)
                    for q in quarantined:
                        log.warning("%s: %s", q.path, q.reason)
                        self._put(Job(q.path, quarantine=q.reason, ready_at=now))
                    for r in ready:
                        self._put(Job(r.path, r.size, r.mtime_ns, error=r.error, ready_at=now))
                self._record_other_names()
                if now >= next_rescan:
                    self.watcher.scan()
                    next_rescan = now + rescan
            except Exception:  # noqa: BLE001 - the ingest loop must outlive any one odd file
                log.exception("ingest loop")
            self._stop.wait(POLL_SECONDS)

    # ----------------------------------------------------------------- the worker
    def _worker_loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._queue.get(timeout=0.2)
            except queue.Empty:
                self._end_of_burst()
                continue
            if self._stop.is_set():
                break          # not started: the file is taken again at the next start
            try:
                self.handle(job)
            finally:
                self._queue.task_done()
            self._end_of_burst()

    def _end_of_burst(self) -> None:
        """With nothing queued or filling, bring the throttled products (catalogue, CMD) up to date."""
        if self._products_stale and self.queue_length == 0 and self.tracker.waiting == 0:
            with self.night.lock:
                products = self.write_products(force=True)
                self.publish(None, products)

    def write_products(self, force: bool) -> list[Path]:
        """Stacks and frames.ecsv; catalogue, CMD and age when forced, or always when measuring in the background.

        Offline, measuring is synchronous and costs seconds: it is done only
        when forced (at the end of a reprocess); live the scheduler throttles it.
        """
        try:
            with self.night.lock:
                products = self.night.write_products()
                requests = self.night.measurement_requests() if force or self.measurements.background else []
            for request in requests:
                products += self.measurements.submit(request.target, request)
        except Exception:  # noqa: BLE001 - a failed product write must not stop the night; next frame retries
            log.exception("writing products")
            return []
        if force:
            self._products_stale = False
        return products

    def publish(self, record: FrameRecord | None, products: list[Path]) -> None:
        started = time.perf_counter()
        snapshot = self.night.snapshot()
        try:
            products = products + self.night.write_status(snapshot)
        except OSError:  # noqa: BLE001 - e.g. disk full: the next change retries
            log.exception("writing status.json")
        with self._publish_lock:      # the worker and the measuring thread both publish: newest wins
            if snapshot.version >= self._snapshot.version:
                self._snapshot = snapshot
        if record is not None:
            record.step_seconds["publish"] = time.perf_counter() - started
        event = ServiceEvent(record, tuple(products), snapshot)
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:  # noqa: BLE001 - a broken subscriber must not stop the worker
                log.exception("subscriber %r", callback)

    def display(self, path: str | Path) -> str:
        """A path as the observer knows it: relative to the camera folder."""
        try:
            return str(Path(path).relative_to(self.camdir))
        except ValueError:
            return str(path)

    def handle(self, job: Job) -> list[FrameRecord] | None:
        """Take one job through the per-frame path; never raises. Returns the new records (one per colour
        plane), or None if done before.

        Order: (ledger ``processing``) -> process -> products (stack, frames.ecsv)
        and subscribers -> checkpoint -> ledger outcome. Products come before
        the checkpoint so the observer sees the frame without waiting for the
        state to be saved; a crash between the two leaves products one frame
        ahead of the checkpoint, and the restart redoes that frame and rewrites
        them: the end state is the same, every frame counted once.
        """
        with self.night.lock:
            queued = time.monotonic() - job.ready_at if job.ready_at else 0.0
            try:
                outcome = self._handle(job)
            except Exception as exc:  # noqa: BLE001 - one bad file must never stop the worker
                log.exception("%s: unexpected failure", job.path)
                outcome = self._skip(job, "", Status.REJECTED, f"internal error: {type(exc).__name__}: {exc}")
            if outcome is None:
                return None
            records, commit = outcome
            record = records[0]     # the file's own costs are in its first record
            record.step_seconds["queue"] = queued
            self._products_stale = True
            step = time.perf_counter()
            # Offline nobody watches the stacks grow: they are written once, at the end.
            products = self.write_products(force=False) if self.live else []
            record.step_seconds["products"] = time.perf_counter() - step
            for plane in records:
                self.publish(plane, products if plane is record else [])
            step = time.perf_counter()
            self._uncommitted.append(commit)
            if self.live or len(self._uncommitted) >= self.settings.service.reprocess_checkpoint_frames:
                self.save_state()
            record.step_seconds["checkpoint"] = time.perf_counter() - step
            return records

    def save_state(self) -> None:
        """Checkpoint the night, then commit the outcomes it holds to the ledger (in that order).

        Live this runs after every file (exactly once across kill -9). Offline it
        runs every ``service.reprocess_checkpoint_frames`` files and at the end: a
        killed reprocess resumes from its last checkpoint and redoes the files
        after it (the ledger still says ``processing`` for them).
        """
        try:
            self.night.checkpoint()
            for commit in self._uncommitted:
                commit()
        except Exception:  # noqa: BLE001 - e.g. disk full: the ledger stays 'processing', a restart redoes it
            log.exception("saving the state failed")
        self._uncommitted.clear()

    def _recorded(self, path: Path, sha256: str, status: Status) -> bool:
        """Already recorded so? (The reason may differ: a quarantine's says how long it waited.)"""
        return any(r.path == str(path) and r.sha256 == sha256 and r.status == status for r in self.night.records)

    def _skip(self, job: Job, sha256: str, status: Status, reason: str) -> _Outcome | None:
        """Record a file the per-frame path does not take (once: a restart does not record it again)."""
        if self._recorded(job.path, sha256, status):
            return None
        record = self.night.record_skipped(job.path, sha256, status, reason)
        return [record], lambda: self.ledger.record(job.path, sha256, status, reason, job.size, job.mtime_ns)

    def _handle(self, job: Job) -> _Outcome | None:
        """Decide what the job is and do the science part; the caller writes products and commits."""
        path = job.path
        if job.quarantine:
            return self._skip(job, "", Status.QUARANTINED, job.quarantine)
        if job.error:
            return self._skip(job, "", Status.REJECTED, job.error)
        started = time.perf_counter()
        try:
            sha = sha256_of(path)
        except FileNotFoundError:
            log.info("%s vanished before it could be read", path)
            return None
        except OSError as exc:
            return self._skip(job, "", Status.REJECTED, f"cannot read: {exc.strerror or exc}")
        same = [r for r in self.night.records if r.sha256 == sha]
        mine = [r for r in same if r.path == str(path)]
        if mine:       # taken before (a restart, or a touch): make sure the ledger says so
            self.ledger.finish(file_outcome(mine), job.size, job.mtime_ns)
            return None
        if same:
            return self._skip(job, sha, Status.IGNORED, f"duplicate of {self.display(same[0].path)}")
        hashed = time.perf_counter()
        self.ledger.begin(path, sha, job.size, job.mtime_ns)
        records = self.night.process(path, sha)
        records[0].step_seconds["hash"] = hashed - started
        rejudged = [file_outcome(r) for r in self.night.take_rejudged().values() if r]

        def commit() -> None:
            self.ledger.finish(file_outcome(records), job.size, job.mtime_ns)
            for outcome in rejudged:        # earlier files judged again with this one (size and mtime unchanged)
                self.ledger.finish(outcome)
        return records, commit


# --------------------------------------------------------------------- the command line's entry point
def format_record(record: FrameRecord, display: str) -> str:
    """The headless log line of one file: time, file, kind, filter, status, FWHM, stars, reason."""
    stamp = time.strftime("%H:%M:%S", time.localtime(record.seen_at or time.time()))
    fwhm = f"FWHM {record.fwhm:.2f}px" if record.fwhm == record.fwhm else "FWHM -"
    stars = f"{record.nstars} stars" if record.nstars else "- stars"
    parts = [stamp, display, record.kind or "-", record.filter or "-", record.status, fwhm, stars]
    if record.reason:
        parts.append(f"({record.reason})")
    return "  ".join(parts)


def _headless_printer(service: Service) -> Callable[[ServiceEvent], None]:
    def show(event: ServiceEvent) -> None:
        lines = []
        if event.record is not None:
            lines.append(format_record(event.record, service.display(event.record.path)))
        if event.products:
            names = ", ".join(sorted({_relative(p, service.outdir) for p in event.products}))
            lines.append(f"{time.strftime('%H:%M:%S')}  products updated: {names}")
        for line in lines:
            log.info("%s", line)
            print(line, flush=True)
    return show


def _relative(path: Path, folder: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(folder))
    except ValueError:
        return str(path)


def run_headless_until(service: Service, until: Callable[[], bool] = lambda: False) -> int:
    """Run the (not yet started) service headless until ``until()`` or SIGINT/SIGTERM; returns the exit code.

    A signal only sets a flag: the worker finishes the frame in hand, the night
    is checkpointed and the products written, then 0 is returned. A dead
    service thread returns 1.
    """
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: finishing the frame in hand", signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    service.subscribe(_headless_printer(service))
    try:
        service.start()
        print(f"observer: watching {service.camdir} -> {service.outdir} (Ctrl-C stops)", flush=True)
        code = 0
        while not stop.wait(0.5) and not until():
            if not service.alive:
                log.error("a service thread died; stopping")
                code = 1
                break
        print("observer: stopping: finishing the frame in hand, then the final products", flush=True)
        service.stop()
        print("observer: stopped; starting again resumes", flush=True)
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

