"""The night: the one owner of the night's state, shared by ``observer watch`` and ``observer reprocess``.

``Night`` holds everything learned so far (a :class:`~observer.session.NightState`:
reference grids, stacks, calibration masters, hot-pixel maps, the frame
records, the last measurements) and is the only code that changes it: frames go
through the per-frame path (``observer.frame_path``) one at a time, in the order
the caller gives, and measurements made elsewhere are applied by
:meth:`Night.apply_measurement` and :meth:`Night.apply_age`. Every public
method takes the night's lock, so a snapshot is always built from a consistent
state, whichever thread asks.

Measuring is split so that the lock is held only for copies and updates:
:meth:`measurement_requests` copies the stacks (under the lock),
:meth:`run_measurement` and :meth:`run_age` compute without it, apply the
result with it, and write the products from the immutable result.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from pathlib import Path

from observer import checkpoint, writers
from observer.config import Settings
from observer.frame_path import rebuild_masters, run_frame
from observer.measure import (AgeResult, AgeUnavailable, MeasureRequest, Measurement, fit_target_age,
                              measure_target, measurement_request)
from observer.scheduler import MeasurementScheduler
from observer.session import NightState
from observer.snapshot import build_snapshot, completion_mag
from observer.state import FrameRecord, Snapshot, Status, left_out_text

log = logging.getLogger(__name__)


class Night:
    """All state of one night's reduction and the only code that changes it; see the module docstring."""

    def __init__(self, settings: Settings, outdir: str | Path, state: NightState | None = None):
        self.settings = settings
        self.outdir = Path(outdir)
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self._state = state or NightState()
        self._snapshot: Snapshot | None = None
        self._snapshot_key: tuple[int, int] | None = None
        self._dirty_state: set[str] = set()                 # state files the next checkpoint must rewrite
        self._stacks_dirty: set[tuple[str, str, str]] = set()   # (target, filter, group) stacks to write
        self._catalog_dirty: set[str] = set()               # targets whose catalogue and CMD are out of date
        self._told_one_filter: set[str] = set()             # targets already told they have no colour
        self._status_written: dict[str, dict] = {}          # the last status.json of each target
        self._frames_written = -1                           # records_version of the frames.ecsv on disk
        if state is not None:
            if any(state.calibration_files.values()):
                rebuild_masters(state, settings)
            self._stacks_dirty.update((t, f, g.label) for t, target in state.targets.items()
                                      for f, s in target.filters.items() for g in s.groups)
            self._catalog_dirty.update(state.targets)

    @classmethod
    def restore(cls, settings: Settings, outdir: str | Path) -> "Night":
        """The night as of its last checkpoint in ``outdir``, or a fresh one."""
        return cls(settings, outdir, checkpoint.load(Path(outdir)))

    # ----------------------------------------------------------------- what others may read
    @property
    def records(self) -> list[FrameRecord]:
        """The frame records, oldest first (a copy)."""
        with self.lock:
            return list(self._state.records)

    @property
    def version(self) -> int:
        with self.lock:
            return self._state.version

    @property
    def targets(self) -> list[str]:
        """The targets' names, in the order they appeared."""
        with self.lock:
            return list(self._state.targets)

    def stack_bytes(self) -> dict[tuple[str, str], int]:
        """Memory held by each (target, filter)'s stack accumulators, all exposure groups (bytes), for benchmarks."""
        with self.lock:
            return {(t, f): sum(g.accumulator.nbytes() for g in s.groups) for t, target in self._state.targets.items()
                    for f, s in target.filters.items()}

    def snapshot(self, queue_length: int = 0) -> Snapshot:
        """The published state; rebuilt only when something changed (the dashboard polls it)."""
        with self.lock:
            key = (self._state.version, queue_length)
            if self._snapshot is None or self._snapshot_key != key:
                self._snapshot = build_snapshot(self._state, self.settings, self.outdir, queue_length=queue_length)
                self._snapshot_key = key
            return self._snapshot

    # ----------------------------------------------------------------- frames
    def process(self, path: str | Path, sha256: str = "") -> list[FrameRecord]:
        """Tag, reduce and (for science frames) stack one file; its records (one per colour plane).

        Never raises: failures are recorded. A file's records are appended together, under the lock,
        so a checkpoint holds all of a colour file's planes or none.
        """
        path = Path(path)
        with self.lock:
            records = run_frame(self._state, self.settings, path, sha256)
            for record in records:
                self._note(path, record)
            self._note_restacked()
            return records

    def _note_restacked(self) -> None:
        """A group whose first frames were judged together has a new stack, and earlier records changed."""
        for tname, fname, label in sorted(self._state.restacked):
            self._stacks_dirty.add((tname, fname, label))
            self._catalog_dirty.add(tname)
            self._dirty_state |= checkpoint.group_files(tname, fname, label)
        self._state.restacked.clear()

    def _note(self, path: Path, record: FrameRecord) -> None:
        """Append one record and mark what it made out of date (stacks, catalogue, checkpoint files)."""
        if record.status in (Status.STACKED, Status.OFFSET):
            self._catalog_dirty.add(record.target)
        if record.status == Status.STACKED:
            groups = self._state.targets[record.target].filters[record.filter].groups
            new_group = next(g for g in groups if g.label == record.group).n_stacked == 1
            if new_group and len(groups) > 1:
                # A new group renames the filter's stacks: every group gets its stack_<EXPTIME>s.fits.
                self._stacks_dirty.update((record.target, record.filter, g.label) for g in groups)
            self._stacks_dirty.add((record.target, record.filter, record.group))
        self._dirty_state |= checkpoint.changed_files(record)
        log.info("%s%s: %s %s %s -> %s %s", path.name, f" [{record.plane}]" if record.plane else "", record.kind,
                 record.target, record.filter, record.status, record.reason)
        self._state.append(record)

    def take_rejudged(self) -> dict[str, list[FrameRecord]]:
        """The records, by file, of earlier files whose outcome changed since the last call (a first frame
        rejected once its group's baseline existed), so that the service brings their ledger rows up to date."""
        with self.lock:
            paths, self._state.rejudged = self._state.rejudged, set()
            return {p: [r for r in self._state.records if r.path == p] for p in sorted(paths)}

    def record_skipped(self, path: str | Path, sha256: str, status: Status, reason: str) -> FrameRecord:
        """Record a file that is not reduced (quarantined, ignored, unreadable) with its reason."""
        record = FrameRecord(path=str(path), sha256=sha256, status=status, reason=reason, seen_at=time.time())
        with self.lock:
            self._state.append(record)
        return record

    # ----------------------------------------------------------------- products
    def write_products(self) -> list[Path]:
        """frames.ecsv and the stacks that changed since the last call."""
        with self.lock:
            written = []
            if self._state.records_version != self._frames_written:
                written.append(writers.write_frames_table(self.outdir, self._state.records))
                self._frames_written = self._state.records_version
            for tname, fname, label in sorted(self._stacks_dirty):
                written += writers.write_stacks(self.outdir, self._state.targets[tname], fname, label, self.settings)
            self._stacks_dirty.clear()
            return written

    def write_all_products(self) -> list[Path]:
        """Every product now, measured in the caller's thread (for scripts that drive a Night directly)."""
        scheduler = MeasurementScheduler(functools.partial(self.run_measurement, draw_cmd=False),
                                         self.run_age if self.settings.age.enabled else None)
        written = self.write_products()
        for request in self.measurement_requests():
            written += scheduler.submit(request.target, request)
        return written

    def measurement_requests(self) -> list[MeasureRequest]:
        """Copies of the stacks of every target whose catalogue is out of date (then no longer marked so)."""
        with self.lock:
            requests = []
            for tname in sorted(self._catalog_dirty):
                target = self._state.targets.get(tname)
                if target is None:
                    continue
                mag = completion_mag(self._state, self.settings, tname)
                requests.append(measurement_request(target, self.settings, mag, self._state.version))
                self._note_missing_colour(tname)
            self._catalog_dirty.clear()
            return requests

    def _note_missing_colour(self, tname: str) -> None:
        """Say once that a target with frames in fewer filters than the colour gets no diagram (yet)."""
        filters = self._state.targets[tname].filters
        missing = [f for f in self.settings.cmd.color_filters if f not in filters]
        stacked = [f for f, s in filters.items() if s.n_stacked]
        if missing and stacked and tname not in self._told_one_filter:
            self._told_one_filter.add(tname)
            log.info("%s: frames in %s only: no %s yet, so no colour and no CMD", tname, ", ".join(stacked),
                     ", ".join(missing))

    def run_measurement(self, request: MeasureRequest, draw_cmd: bool = True) -> tuple[list[Path], object]:
        """Measure (without the lock), apply (with it), write catalogue and CMD; returns (paths, catalogue).

        ``draw_cmd`` False leaves cmd.png to the age fit that follows at once (offline: the figure would be
        drawn twice, 0.3-0.6 s); live it is drawn now, so the new stars show before the slow fit ends.
        """
        try:
            result = measure_target(request, self.settings)
        except Exception:  # noqa: BLE001 - a failed measurement must not stop the night
            log.exception("%s: measuring the stacks failed", request.target)
            return [], None
        age = self.apply_measurement(result)
        written = []
        if result.catalog is not None:
            written.append(writers.write_catalog(self.outdir, result.target, result.catalog))
            wcs = next((s.wcs for s in request.stacks.values() if s.wcs is not None), None)
            written.append(writers.write_regions(self.outdir, result.target, result.catalog,
                                                 self.settings.cmd.magnitude, wcs))
            if draw_cmd or not self.settings.age.enabled:
                written.append(writers.write_cmd_figure(self.outdir, result.target, result.cmd, age))
        age_wanted = result.catalog is not None and self.settings.age.enabled
        return written, result.catalog if age_wanted else None

    def apply_measurement(self, result: Measurement):
        """Take a measurement into the night's state; returns the target's current age estimate (for the CMD)."""
        with self.lock:
            target = self._state.targets[result.target]
            if result.cmd is not None:
                self._state.cmd[result.target] = result.cmd
            for fname, limit in result.limiting_mag.items():
                history = target.filters[fname].limiting_mag_history
                if not history or history[-1] != limit:
                    history.append(limit)
            for fname, snr in result.snr_at_mag.items():
                target.filters[fname].snr_at_mag = snr
            for fname, mags in result.saturation_mag.items():
                target.filters[fname].saturation_mag = dict(mags)
            self._state.version += 1
            return self._state.age.get(result.target)

    def run_age(self, tname: str, catalog) -> list[Path]:
        """Fit the age (without the lock), apply it, write age.json and redraw cmd.png; never raises."""
        with self.lock:
            gain = writers.gain_record(self._state.targets.get(tname))
        try:
            result = fit_target_age(tname, catalog, self.settings)
        except AgeUnavailable as exc:
            log.info("%s: no age: %s", tname, exc)
            with self.lock:
                self._state.age.pop(tname, None)
                self._state.age_reason[tname] = str(exc)
                self._state.version += 1
                cmd = self._state.cmd.get(tname)
            written = [writers.write_age(self.outdir, tname, {"target": tname, "fitted": False, "log_age": None,
                                                              "age_myr": None, "reason": str(exc),
                                                              "stars": exc.stars, "gain": gain})]
            if cmd is not None:      # without its age line, and drawn at all when the measurement left it
                written.append(writers.write_cmd_figure(self.outdir, tname, cmd, None))
            return written
        except Exception:  # noqa: BLE001 - an age fit failure must not stop the night
            log.exception("%s: age fit failed", tname)
            with self.lock:
                cmd, est = self._state.cmd.get(tname), self._state.age.get(tname)
            return [writers.write_cmd_figure(self.outdir, tname, cmd, est)] if cmd is not None else []
        cmd = self.apply_age(result)
        est = result.estimate
        log.info("%s: age %.0f Myr (log %.2f, %.2f-%.2f) from %d stars (left out: %s)", tname, est.age_myr,
                 est.log_age, est.log_age_low, est.log_age_high, est.n_stars, left_out_text(est.left_out))
        written = [writers.write_age(self.outdir, tname, {"target": tname, "fitted": True, **result.record,
                                                          "gain": gain})]
        if cmd is not None:
            written.append(writers.write_cmd_figure(self.outdir, tname, cmd, est))
        return written

    def apply_age(self, result: AgeResult):
        """Take an age fit into the night's state; returns the target's current CMD data (to redraw)."""
        with self.lock:
            self._state.age[result.target] = result.estimate
            self._state.age_reason.pop(result.target, None)
            self._state.version += 1
            return self._state.cmd.get(result.target)

    def write_status(self, snapshot: Snapshot) -> list[Path]:
        """``<target>/status.json`` for every target whose verdict, reasons or figures changed."""
        written = []
        for tname, target in snapshot.targets.items():
            record = writers.status_record(target)
            with self.lock:     # two threads publish: the newest record must be the one on disk
                if self._status_written.get(tname) == record:
                    continue
                self._status_written[tname] = record
                written.append(writers.write_status(self.outdir, record))
        return written

    def save_pngs(self, tname: str) -> list[Path]:
        """Snapshot figures for the observer: every stack of ``tname`` as PNG, and its current CMD."""
        with self.lock:
            target = self._state.targets.get(tname)
            if target is None:
                return []
            written = writers.write_stack_pngs(self.outdir, target)
            cmd = self._state.cmd.get(tname)
            if cmd is not None:
                written.append(writers.write_cmd_figure(self.outdir, tname, cmd, self._state.age.get(tname)))
            return written

    def checkpoint(self) -> None:
        """Save everything needed to resume, atomically (see observer.checkpoint)."""
        with self.lock:
            checkpoint.save(self._state, self.outdir, self._dirty_state)
            self._dirty_state.clear()
