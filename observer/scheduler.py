"""When to measure: in the caller's thread (reprocess) or on one background thread, throttled (live).

Live, measuring a 2048 px pair of stacks takes seconds and the age fit a few
more: neither may hold back the next frame. In the background, one thread takes
the newest request of each target (an older one still waiting is replaced), at
most every ``catalog_throttle`` seconds, then fits the age from the newest
catalogue at most every ``age_throttle`` seconds: the newest data are always
measured in the end. ``observer reprocess`` measures synchronously so that every
product exists when it exits.

The scheduler knows nothing of the night: it is given the two jobs (measure a
request, fit an age to a catalogue) and calls ``listeners`` with the paths each
job wrote. A job that raises is logged and the thread goes on; the thread never
exits with work waiting or leaves ``busy`` set.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: ``measure(request) -> (paths written, catalogue or None)``; the catalogue goes on to the age fit.
MeasureJob = Callable[[Any], tuple[list[Path], Any]]
#: ``fit_age(target, catalogue) -> paths written``.
AgeJob = Callable[[str, Any], list[Path]]
#: The longest a waiting thread sleeps before it looks again (new requests replace waiting ones).
_NAP = 0.25


class MeasurementScheduler:
    """Runs measurement and age jobs, now or in the background; see the module docstring."""

    def __init__(self, measure: MeasureJob, fit_age: AgeJob | None, *, background: bool = False,
                 catalog_throttle: float = 0.0, age_throttle: float = 0.0) -> None:
        self._measure, self._fit_age = measure, fit_age
        self.background = background
        self._throttle = {"catalog": catalog_throttle, "age": age_throttle}
        self.listeners: list[Callable[[list[Path]], None]] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pending: dict[str, dict[str, Any]] = {"catalog": {}, "age": {}}
        self._last = {"catalog": float("-inf"), "age": float("-inf")}
        self._hurry = False
        self._skip_ages = False
        self._running: str | None = None    # the kind of job in hand

    @property
    def busy(self) -> bool:
        """Jobs waiting or running (the products are not yet current)."""
        with self._lock:
            return self._thread is not None

    def submit(self, target: str, request: Any) -> list[Path]:
        """Measure ``request`` for ``target``; returns the paths written (none yet in the background)."""
        if not self.background:
            written, catalog = self._measure(request)
            if catalog is not None and self._fit_age is not None:
                written += self._fit_age(target, catalog)
            return written
        with self._lock:
            self._pending["catalog"][target] = request
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, name="observer-measure", daemon=True)
                self._thread.start()
        return []

    def wait(self, timeout: float | None = None, ages: bool = True) -> bool:
        """Wait until nothing is waiting or running (with ``ages`` False: no catalogue); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.busy if ages else self._catalogue_busy():
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def finish(self, timeout: float | None = None, ages: bool = True) -> bool:
        """Run what is waiting now, without the throttle waits (at shutdown); False on timeout.

        With ``ages`` False, age fits are not waited for: those not started are dropped and a running
        one is left to the daemon thread (an observer who quits should not wait ~10 s for a fit; the
        service refits when it starts again; age.json is written atomically or not at all). Call it
        without holding the night's lock: the jobs apply their results under it.
        """
        self._hurry, self._skip_ages = True, not ages
        try:
            return self.wait(timeout, ages=ages)
        finally:
            self._hurry = self._skip_ages = False

    def _catalogue_busy(self) -> bool:
        with self._lock:
            return self._thread is not None and (bool(self._pending["catalog"]) or self._running == "catalog")

    def _next_job(self) -> tuple[str, str, Any] | float | None:
        """Under the lock: the next (kind, target, data), or seconds to wait, or None (the thread ends)."""
        now = float("inf") if self._hurry else time.monotonic()
        if self._skip_ages and self._pending["age"]:
            log.info("stopping: the age fit of %s is left for the next start", ", ".join(self._pending["age"]))
            self._pending["age"].clear()
        for kind in ("catalog", "age"):
            pending = self._pending[kind]
            if pending:
                gap = self._last[kind] + self._throttle[kind] - now
                if gap > 0:
                    return gap
                target, data = pending.popitem()
                self._last[kind] = time.monotonic()
                self._running = kind
                return kind, target, data
        self._thread = None
        return None

    def _drain(self) -> None:
        while True:
            with self._lock:
                job = self._next_job()
            if job is None:
                return
            if isinstance(job, float):
                time.sleep(min(job, _NAP))
                continue
            kind, target, data = job
            try:
                written = self._run(kind, target, data)
            except Exception:  # noqa: BLE001 - a failed measurement must not stop the thread
                log.exception("%s: %s job failed", target, kind)
                continue
            finally:
                with self._lock:
                    self._running = None
            for listener in list(self.listeners):
                try:
                    listener(written)
                except Exception:  # noqa: BLE001 - nor may a broken listener
                    log.exception("measurement listener %r", listener)

    def _run(self, kind: str, target: str, data: Any) -> list[Path]:
        if kind == "age":
            return self._fit_age(target, data)
        written, catalog = self._measure(data)
        if catalog is not None and self._fit_age is not None:
            with self._lock:
                self._pending["age"][target] = catalog
        return written
