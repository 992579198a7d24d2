"""The ledger: every file the service has seen, in ``OUTDIR/ledger.sqlite``.

A file is recorded *before* any work on it (status ``processing``) and its
outcome *after* the night's checkpoint is written, so after a crash the ledger
says which files were in hand: a row still ``processing`` whose hash the
restored checkpoint does not know is redone; one the checkpoint knows is done.
The ledger is also how duplicates are found (same bytes under another name) and
what lets a restart skip re-hashing the files it has already handled.

Rows are keyed by (path, sha256): the same name with different bytes (a file
replaced by the camera software) is a different frame. Files whose bytes
cannot be read (or are not yet whole) have an empty sha256. ``size`` is in
bytes and ``mtime`` in integer nanoseconds (``st_mtime_ns``): exact, so a
restart can tell a file it has already handled from one changed since.

WAL mode lets the dashboard or a script read the ledger while the worker
writes; one connection per thread keeps sqlite3 happy across threads.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from observer.state import Status

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL DEFAULT '',
    size INTEGER,
    mtime INTEGER,
    status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL DEFAULT '',
    target TEXT NOT NULL DEFAULT '',
    filter TEXT NOT NULL DEFAULT '',
    quality TEXT NOT NULL DEFAULT '{}',
    first_seen REAL NOT NULL,
    updated REAL NOT NULL,
    UNIQUE (path, sha256)
);
CREATE INDEX IF NOT EXISTS files_sha256 ON files (sha256);
"""

#: FrameRecord fields kept in the ``quality`` JSON column.
QUALITY_FIELDS = ("fwhm", "elongation", "sky", "nstars", "dx", "dy", "rotation", "transparency", "reg_rms",
                  "fwhm_arcsec", "exptime", "date_obs")


@dataclass(frozen=True)
class LedgerRow:
    """One row of the ledger."""

    path: str
    sha256: str
    size: int | None
    mtime: int | None
    status: str
    reason: str
    kind: str
    target: str
    filter: str
    quality: dict[str, Any]
    first_seen: float
    updated: float


def _json_safe(value: Any) -> Any:
    """JSON has no NaN: store it as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Ledger:
    """The SQLite ledger of files; safe to use from several threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()       # serialises writers (sqlite would otherwise raise 'locked')
        with self._lock:
            conn = self._conn()
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
            conn.execute("PRAGMA synchronous=NORMAL")   # durable at checkpoints of the WAL; enough with WAL
            self._local.conn = conn
            self._connections.append(conn)
        return conn

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
            self._local = threading.local()

    def _upsert(self, path: str, sha256: str, fields: dict[str, Any]) -> None:
        now = time.time()
        fields = {**fields, "updated": now}
        columns = ", ".join(fields)
        placeholders = ", ".join("?" for _ in fields)
        updates = ", ".join(f"{k} = excluded.{k}" for k in fields)
        with self._lock:
            conn = self._conn()
            with conn:
                conn.execute(
                    f"INSERT INTO files (path, sha256, first_seen, {columns}) VALUES (?, ?, ?, {placeholders}) "
                    f"ON CONFLICT (path, sha256) DO UPDATE SET {updates}",
                    (path, sha256, now, *fields.values()))

    def begin(self, path: str | Path, sha256: str, size: int | None, mtime: int | None,
              status: str = Status.PROCESSING) -> None:
        """Record a file before work on it starts."""
        self._upsert(str(path), sha256, {"size": size, "mtime": mtime, "status": status})

    def finish(self, record: Any, size: int | None = None, mtime: int | None = None) -> None:
        """Record a file's outcome from its ``FrameRecord`` (after the night's checkpoint)."""
        quality = {name: _json_safe(getattr(record, name)) for name in QUALITY_FIELDS if hasattr(record, name)}
        fields: dict[str, Any] = {"status": record.status, "reason": record.reason or "", "kind": record.kind or "",
                                  "target": record.target or "", "filter": record.filter or "",
                                  "quality": json.dumps(quality)}
        if size is not None:
            fields.update(size=size, mtime=mtime)
        self._upsert(str(record.path), record.sha256 or "", fields)

    def record(self, path: str | Path, sha256: str, status: str, reason: str, size: int | None = None,
               mtime: int | None = None) -> None:
        """Record a file decided on without the per-frame path (ignored, quarantined, unreadable)."""
        self._upsert(str(path), sha256, {"status": status, "reason": reason, "size": size, "mtime": mtime})

    def _rows(self, where: str, args: tuple) -> list[LedgerRow]:
        with self._lock:
            cur = self._conn().execute(
                "SELECT path, sha256, size, mtime, status, reason, kind, target, filter, quality, first_seen, "
                f"updated FROM files {where} ORDER BY id", args)
            rows = cur.fetchall()
        return [LedgerRow(*r[:9], json.loads(r[9] or "{}"), *r[10:]) for r in rows]

    def by_sha(self, sha256: str) -> list[LedgerRow]:
        """Every row with these bytes (oldest first)."""
        return self._rows("WHERE sha256 = ?", (sha256,))

    def by_path(self, path: str | Path) -> list[LedgerRow]:
        return self._rows("WHERE path = ?", (str(path),))

    def get(self, path: str | Path, sha256: str) -> LedgerRow | None:
        rows = self._rows("WHERE path = ? AND sha256 = ?", (str(path), sha256))
        return rows[0] if rows else None

    def all(self) -> list[LedgerRow]:
        return self._rows("", ())

    def in_flight(self) -> list[LedgerRow]:
        """Rows recorded before work but with no outcome (the service stopped mid-frame)."""
        return self._rows("WHERE status = ?", (Status.PROCESSING.value,))
