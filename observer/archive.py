"""``observer archive``: every night of an archive reprocessed as one Dask task, resumable.

Why Dask distributed: it is the engine astronomy users already run, and the same
client code drives a ``LocalCluster`` on one machine, ``dask scheduler`` /
``dask worker`` on a few, or ``dask-jobqueue`` on a SLURM cluster. observer
adds no scheduler of its own.

One night is one task, :func:`run_night`: a pure function of (night folder,
settings as a plain dict, output folder) to a small summary dict. Only paths and
that dict travel; the frames are read where the task runs, so the archive and
OUT must be on a file system every worker sees.

Resumable: a finished night carries a marker (``OUT/<night>/.archive.json``)
with the config hash, the project version and a fingerprint of the night's files
(names, sizes, mtimes). A rerun skips a night whose marker matches and
recomputes the others. A night is reduced into a temporary sibling
(``OUT/<night>.tmp-<token>``), marker included, and renamed into place when
done, so a kill leaves only temporaries, which the next run deletes. Failed
nights get no marker: every run retries them.

A night is a folder that holds camera files directly; its sub-folders belong to
it (``reprocess`` reads a folder recursively, e.g. a ``calib/`` sub-folder), so
folders below a night are not nights of their own.
"""

from __future__ import annotations

import collections
import contextlib
import fnmatch
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TextIO

from astropy.table import Table

from observer.config import ConfigError, Settings, settings_from_dict, settings_to_dict
from observer.ingest import is_fits_name
from observer.products import atomic_write_json, atomic_write_table
from observer.reprocess import BAR_WIDTH, reprocess
from observer.watcher import inside, scan

log = logging.getLogger(__name__)

MARKER = ".archive.json"
TEMP_INFIX = ".tmp-"
TABLE = "archive.ecsv"
#: One BLAS/OpenMP thread per worker process: the cluster's parallelism is one night per worker.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
#: archive.ecsv's columns and their types; ``ages`` reads ``M35:8.52[8.46,8.58];NGC2158:...``
#: (log age and its 68 % interval per fitted target).
COLUMNS = {"night": str, "status": str, "reason": str, "worker": str, "seconds": float, "frames": int,
           "stacked": int, "rejected": int, "targets": str, "ages": str, "config_hash": str}


def project_version() -> str:
    """observer's installed version: products made by another version are recomputed."""
    try:
        return version("observer")
    except PackageNotFoundError:
        return "unknown"


def config_hash(config: dict) -> str:
    """Hash of the full effective settings, so a config file restating a default changes nothing."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(nightdir: Path) -> str:
    """Hash of every file reprocess would see (relative name, size, mtime): a new or changed file shows."""
    entries = []
    for path in scan(nightdir):
        st = path.stat()
        entries.append((path.relative_to(nightdir).as_posix(), st.st_size, st.st_mtime_ns))
    return hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()[:16]


def find_nights(archive: Path) -> list[str]:
    """Relative paths (posix) of the top-most folders under ``archive`` that directly hold camera files."""
    nights = []
    for root, dirs, files in os.walk(archive):
        base = Path(root)
        if base != archive and any(is_fits_name(name) for name in files):
            nights.append(base.relative_to(archive).as_posix())
            dirs.clear()        # its sub-folders are part of this night
        dirs.sort()
    return sorted(nights)


def _empty_row(**values: Any) -> dict:
    row = {name: tp() for name, tp in COLUMNS.items()}
    row.update(values)
    return row


# --------------------------------------------------------------------------- the task (runs on a worker)
def run_night(nightdir: str, config: dict, outdir: str) -> dict:
    """Reprocess one night into ``outdir`` as ``observer reprocess`` would; return its archive.ecsv row.

    Never raises: Dask would rerun a task that raised (``retries``), and a broken
    night fails the same way twice. A worker lost mid-night is the scheduler's to
    retry (``allowed-failures``); its temporary folder is left for the client.
    """
    start = time.monotonic()
    final = Path(outdir)
    temp = final.with_name(f"{final.name}{TEMP_INFIX}{uuid.uuid4().hex[:8]}")
    chash = config_hash(config)
    row = _empty_row(worker=_worker_address(), config_hash=chash)
    try:
        prints = fingerprint(Path(nightdir))
        night = reprocess(nightdir, temp, settings_from_dict(config), progress=False)
        row.update(_summary(night.records, temp))
        row["seconds"] = round(time.monotonic() - start, 2)
        if row["status"] == "done":
            atomic_write_json(temp / MARKER, {"config_hash": chash, "version": project_version(),
                                              "fingerprint": prints, "row": row})
        _swap_into_place(temp, final)
    except Exception as exc:  # noqa: BLE001 - a broken night is reported, never stops the others
        log.exception("%s: reprocessing failed", nightdir)
        shutil.rmtree(temp, ignore_errors=True)
        row.update(status="failed", reason=f"{type(exc).__name__}: {exc}",
                   seconds=round(time.monotonic() - start, 2))
    return row


def _worker_address() -> str:
    from distributed import get_worker

    try:
        return get_worker().address
    except ValueError:          # called outside a Dask worker (a direct call)
        return "local"


def _summary(records: list, outdir: Path) -> dict:
    """Counts from the night's records and the targets' ages from their age.json."""
    statuses = collections.Counter(r.status for r in records)
    targets = sorted(p.name for p in outdir.iterdir() if p.is_dir() and not p.name.startswith("."))
    ages = []
    for target in targets:
        age_path = outdir / target / "age.json"
        if age_path.exists():
            age = json.loads(age_path.read_text())
            if not age.get("fitted", True):      # age.json then says why there is no age
                continue
            ages.append(f"{target}:{age['log_age']:.2f}[{age['log_age_low']:.2f},{age['log_age_high']:.2f}]")
    summary = {"status": "done", "reason": "", "frames": len(records), "stacked": statuses["stacked"],
               "rejected": statuses["rejected"], "targets": ",".join(targets), "ages": ";".join(ages)}
    if not statuses["stacked"]:
        counts = ", ".join(f"{n} {status}" for status, n in sorted(statuses.items())) or "no files"
        first = next((f"{Path(r.path).name}: {r.reason}" for r in records if r.reason), "")
        summary.update(status="failed", reason=f"no frame stacked ({counts})" + (f"; {first}" if first else ""))
    return summary


def _swap_into_place(temp: Path, final: Path) -> None:
    """Replace ``final`` by ``temp`` with two renames; in between, the old one is a temporary too."""
    old = final.with_name(f"{final.name}{TEMP_INFIX}old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        final.rename(old)
    temp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- the client
def remove_temporaries(final: Path) -> None:
    """Delete what an interrupted run left of this night (``<night>.tmp-*`` beside it)."""
    if final.parent.is_dir():
        for stale in final.parent.glob(f"{glob.escape(final.name)}{TEMP_INFIX}*"):
            log.debug("removing %s, left by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)


def current_row(final: Path, chash: str, prints: str) -> dict | None:
    """The row recorded by a finished night when its products are current (same config, version, files)."""
    try:
        marker = json.loads((final / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if (marker.get("config_hash"), marker.get("version"), marker.get("fingerprint")) != \
            (chash, project_version(), prints):
        return None
    return marker["row"]


def write_table(out: Path, rows: dict[str, dict]) -> None:
    """Rewrite OUT/archive.ecsv atomically: one row per night, sorted by night."""
    table = Table(names=list(COLUMNS), dtype=list(COLUMNS.values()))
    for name in sorted(rows):
        table.add_row([rows[name][col] for col in COLUMNS])
    atomic_write_table(out / TABLE, table)


def _previous_rows(out: Path, keep: set[str]) -> dict[str, dict]:
    """Rows of an earlier archive.ecsv for nights this run leaves alone (``--only``), so none is lost."""
    try:
        table = Table.read(out / TABLE, format="ascii.ecsv").filled("")     # ECSV reads "" back as masked
    except (OSError, ValueError):
        return {}
    return {str(r["night"]): {col: r[col].item() for col in COLUMNS} for r in table if r["night"] in keep}


class NightProgress:
    """The reprocess bar's look, over nights: done/total and nights per minute; a log line per night."""

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total = total
        self.done = 0
        self.stream = stream
        self.tty = stream.isatty()
        self.start = time.monotonic()

    def __call__(self, row: dict) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed * 60 if elapsed > 0 else 0.0
        if self.tty:             # the log line goes above the bar
            self.stream.write("\r" + " " * 120 + "\r")
            self.stream.flush()
        level = logging.WARNING if row["status"] == "failed" else logging.INFO
        extra = " ".join(part for part in (row["ages"], f"({row['reason']})" if row["reason"] else "") if part)
        log.log(level, "%s: %s in %.1f s on %s, %d frames (%d stacked, %d rejected) %s", row["night"],
                row["status"], row["seconds"], row["worker"] or "-", row["frames"], row["stacked"],
                row["rejected"], extra)
        filled = int(BAR_WIDTH * self.done / max(self.total, 1))
        line = (f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {self.done}/{self.total} nights "
                f"{rate:.2f} nights/min")
        end = "\n" if self.done == self.total or not self.tty else ""
        self.stream.write(("\r" if self.tty else "") + line + end)
        self.stream.flush()


@contextlib.contextmanager
def dask_client(scheduler: str | None, workers: int | None) -> Iterator[Any]:
    """A client of the cluster at ``scheduler``, or of a LocalCluster of ``workers`` processes closed at the end."""
    import dask
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError, ValueError, TypeError) as exc:
            raise RuntimeError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc
        with client:
            yield client
        return
    # A night whose worker dies is given to another worker once (the scheduler's default is 3 times).
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        cluster = LocalCluster(n_workers=workers or os.cpu_count() or 1, threads_per_worker=1, processes=True,
                               env=THREAD_ENV)
    with cluster, Client(cluster) as client:
        yield client


def run_archive(archive: str | Path, out: str | Path, settings: Settings, *, scheduler: str | None = None,
                workers: int | None = None, only: str | None = None, force: bool = False) -> dict[str, dict]:
    """Reprocess every night of ``archive`` into ``out`` on Dask; returns archive.ecsv's rows by night."""
    archive, out = Path(archive).resolve(), Path(out).resolve()
    if not archive.is_dir():
        raise OSError(f"{archive}: no such folder")
    if inside(out, archive):
        raise ConfigError(f"option '--out': {out} is inside the archive {archive}; give a folder elsewhere")
    if workers is not None and (workers < 1 or scheduler):
        raise ConfigError("option '--workers': expected an integer >= 1, and no --scheduler (its cluster has "
                          "its own workers)")
    every = find_nights(archive)
    nights = [n for n in every if only is None or fnmatch.fnmatch(n, only)]
    if not nights:
        raise RuntimeError(f"{archive}: no night folders (sub-folders holding FITS files)"
                           + (f" matching {only!r}" if only else ""))
    config = settings_to_dict(settings)
    chash = config_hash(config)
    rows = _previous_rows(out, set(every) - set(nights))
    pending = []
    for name in nights:
        remove_temporaries(out / name)
        row = None if force else current_row(out / name, chash, fingerprint(archive / name))
        if row is None:
            pending.append(name)
        else:
            rows[name] = {**row, "night": name, "status": "skipped"}
    log.info("%d nights: %d to reprocess, %d current (skipped)", len(nights), len(pending),
             len(nights) - len(pending))
    out.mkdir(parents=True, exist_ok=True)
    write_table(out, rows)
    if pending:
        _run_pending(archive, out, pending, config, rows, scheduler, workers)
    return rows


def _run_pending(archive: Path, out: Path, pending: list[str], config: dict, rows: dict[str, dict],
                 scheduler: str | None, workers: int | None) -> None:
    """Submit one task per night and record each row as its night finishes."""
    from distributed import as_completed

    with dask_client(scheduler, workers) as client:
        if "dashboard" in client.scheduler_info().get("services", {}):
            print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
        run = uuid.uuid4().hex[:8]
        # retries: for a failure outside run_night (which never raises), e.g. unpickling its arguments
        futures = {client.submit(run_night, str(archive / name), config, str(out / name), pure=False, retries=1,
                                 key=f"observer-night-{name}-{run}"): name for name in pending}
        progress = NightProgress(len(pending))
        for future in as_completed(futures):
            name = futures[future]
            try:
                row = future.result()
            except Exception as exc:  # noqa: BLE001 - e.g. KilledWorker: its workers died twice
                row = _empty_row(status="failed", reason=f"{type(exc).__name__}: {exc}",
                                 config_hash=config_hash(config))
            rows[name] = {**row, "night": name}
            remove_temporaries(out / name)      # what an attempt on a worker that died left
            write_table(out, rows)
            progress(rows[name])
