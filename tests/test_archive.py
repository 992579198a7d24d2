"""``observer archive`` on real Dask: a LocalCluster, a scheduler and workers of their own, a killed client.

The archive is three tiny simulated nights (one with enough stars for an age
fit, one of another target, one in a nested folder) and a broken night of a
truncated and a garbage file. The reference for "the same products" is a
plain ``reprocess`` of each night.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from observer.archive import MARKER, TEMP_INFIX, find_nights
from observer.cli import main
from observer.config import load_settings
from observer.reprocess import reprocess
from observer.simulator import SimSettings, simulate_night



def tiny(**values) -> SimSettings:
    """A night that reduces in seconds: two clean frames per filter (and an offset frame per filter)."""
    return SimSettings(**{"frames": 2, "fill_seconds": 0.0, "bad_frames": False, "satellite": False, **values})


GOOD = {"2026-01-05": tiny(size=384, n_members=250, n_field=80, distance_modulus=11.5, seed=5),   # an age fit
        "2026-01/06": tiny(size=256, seed=6, frames=3),
        "lab/ngc2158": tiny(size=256, seed=7, target="NGC2158")}
BROKEN = "broken"
LATE = "M35_green_003.fits"          # held back from night 2026-01/06, to arrive after the first run


def archive_cli(archive: Path, out: Path, config: Path, *extra: str) -> tuple[int, Table]:
    """Run the verb in this process (its LocalCluster's workers are processes of their own)."""
    code = main(["archive", str(archive), "--out", str(out), "--config", str(config), *extra])
    return code, Table.read(out / "archive.ecsv")


def by_night(table: Table) -> dict[str, dict]:
    assert len(set(table["night"])) == len(table), "a night twice in archive.ecsv"
    table = table.filled("")                                    # ECSV reads "" back as masked
    return {str(row["night"]): {name: row[name] for name in table.colnames} for row in table}


def temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob(f"*{TEMP_INFIX}*") if p.is_dir()]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    arch = root / "archive"
    for name, sim in GOOD.items():
        simulate_night(arch / name, sim, truth_path=root / f"truth-{sim.seed}.ecsv")
    (arch / "2026-01/06" / LATE).rename(root / LATE)
    broken = arch / BROKEN
    broken.mkdir()
    (broken / "truncated.fits").write_bytes((arch / "2026-01-05" / "M35_blue_001.fits").read_bytes()[:5000])
    (broken / "garbage.fits").write_bytes(b"not a FITS file at all\n" * 50)
    config = root / "config.yaml"
    config.write_text("age:\n  bootstrap: 0\n")          # the age fit without resampling: seconds, not tens
    return {"root": root, "archive": arch, "config": config, "late": root / LATE}


@pytest.fixture(scope="module")
def references(archive):
    """Each good night through a plain reprocess."""
    settings = load_settings(archive["config"])
    for name in GOOD:
        reprocess(archive["archive"] / name, archive["root"] / "ref" / name, settings, progress=False)
    return archive["root"] / "ref"


@pytest.fixture(scope="module")
def first_run(archive):
    out = archive["root"] / "out"
    code, table = archive_cli(archive["archive"], out, archive["config"], "--workers", "2")
    return {"out": out, "code": code, "rows": by_night(table)}


def assert_same_catalog(got: Path, expected: Path) -> None:
    a, b = Table.read(got), Table.read(expected)
    assert a.colnames == b.colnames and len(a) == len(b) > 20
    for name in a.colnames:
        if a[name].dtype.kind in "fiu":
            np.testing.assert_allclose(np.asarray(a[name], float), np.asarray(b[name], float), rtol=1e-9,
                                       equal_nan=True, err_msg=name)
        else:
            assert list(a[name]) == list(b[name]), name


def test_nights_are_found_recursively(archive):
    assert find_nights(archive["archive"]) == sorted([*GOOD, BROKEN])


def test_local_cluster_reduces_every_night_like_reprocess(archive, references, first_run):
    rows, out = first_run["rows"], first_run["out"]
    assert first_run["code"] == 1                              # a night failed: the run says so
    assert set(rows) == {*GOOD, BROKEN}
    for name in GOOD:
        row = rows[name]
        assert row["status"] == "done" and row["stacked"] >= 4 and row["worker"].startswith("tcp://127.0.0.1:")
        target = GOOD[name].target
        assert row["targets"] == target and row["frames"] == len(list((archive["archive"] / name).glob("*.fits")))
        assert_same_catalog(out / name / target / "catalog.ecsv", references / name / target / "catalog.ecsv")
        assert (out / name / MARKER).exists()
    assert rows["2026-01-05"]["ages"].startswith("M35:") and "[" in rows["2026-01-05"]["ages"]
    assert rows[BROKEN]["status"] == "failed" and "no frame stacked" in rows[BROKEN]["reason"]
    assert len({rows[name]["config_hash"] for name in rows}) == 1
    assert not temporaries(out)


def test_rerun_skips_finished_nights(archive, first_run):
    code, table = archive_cli(archive["archive"], first_run["out"], archive["config"], "--workers", "1")
    rows = by_night(table)
    assert code == 1
    assert {name: rows[name]["status"] for name in rows} == {**{n: "skipped" for n in GOOD}, BROKEN: "failed"}
    for name in GOOD:                   # a skipped row keeps what the run that made the products measured
        assert rows[name]["stacked"] == first_run["rows"][name]["stacked"]
    # --only: nothing else is looked at, and the other nights' rows stay (no cluster is started for nothing)
    code, table = archive_cli(archive["archive"], first_run["out"], archive["config"], "--only", "lab/*")
    assert code == 1 and by_night(table) == rows


def test_a_night_that_gained_a_file_is_recomputed(archive, first_run, tmp_path):
    arch, out = tmp_path / "archive", tmp_path / "out"
    shutil.copytree(archive["archive"], arch)                 # copy2: sizes and mtimes kept, markers still match
    shutil.copytree(first_run["out"], out)
    shutil.copy2(archive["late"], arch / "2026-01/06" / LATE)
    code, table = archive_cli(arch, out, archive["config"], "--workers", "1")
    rows = by_night(table)
    assert code == 1 and rows["2026-01/06"]["status"] == "done"
    assert rows["2026-01/06"]["frames"] == first_run["rows"]["2026-01/06"]["frames"] + 1
    assert rows["2026-01-05"]["status"] == rows["lab/ngc2158"]["status"] == "skipped"
    assert not temporaries(out)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1; yields a client of it.

    The scheduler retries a task whose worker died once, as observer's LocalCluster does.
    """
    from distributed import Client

    dask = str(Path(sys.executable).with_name("dask"))
    scheduler_file = tmp_path_factory.mktemp("cluster") / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"}
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(scheduler_file)], stderr=subprocess.DEVNULL, env=env)]
    try:
        for name in ("w1", "w2"):
            procs.append(subprocess.Popen([dask, "worker", "--scheduler-file", str(scheduler_file), "--nthreads",
                                           "1", "--name", name, "--no-dashboard"], stderr=subprocess.DEVNULL))
        with Client(scheduler_file=str(scheduler_file), timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
            yield client
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait(timeout=60)


def test_an_existing_cluster_through_scheduler(archive, references, cluster, tmp_path):
    workers = set(cluster.scheduler_info()["workers"])
    out = tmp_path / "out"
    code, table = archive_cli(archive["archive"], out, archive["config"], "--scheduler", cluster.scheduler.address)
    rows = by_night(table)
    assert code == 1 and rows[BROKEN]["status"] == "failed"
    assert {rows[name]["worker"] for name in rows} <= workers
    for name in GOOD:
        assert rows[name]["status"] == "done"
        target = GOOD[name].target
        assert_same_catalog(out / name / target / "catalog.ecsv", references / name / target / "catalog.ecsv")


def test_a_worker_killed_mid_night_is_retried_elsewhere(archive, cluster, tmp_path):
    night = "2026-01/06"
    out = tmp_path / "out"
    run = threading.Thread(target=archive_cli, args=(archive["archive"], out, archive["config"], "--only", night,
                                                     "--scheduler", cluster.scheduler.address))
    run.start()
    try:
        busy = None
        while busy is None and run.is_alive():
            busy = next((w for w, keys in cluster.processing().items() if keys), None)
            time.sleep(0.05)
        assert busy is not None, "the night finished before its worker could be killed"
        os.kill(cluster.run(os.getpid, workers=[busy])[busy], signal.SIGKILL)    # its nanny starts another
    finally:
        run.join()
    row = by_night(Table.read(out / "archive.ecsv"))[night]
    assert row["status"] == "done" and row["worker"] and row["worker"] != busy
    assert not temporaries(out)


def test_a_killed_client_then_a_rerun_does_every_night_once(archive, tmp_path):
    arch, out = tmp_path / "archive", tmp_path / "out"
    small = [name for name in GOOD if GOOD[name].size == 256]       # the age-fit night would only add time
    for name in (*small, BROKEN):
        shutil.copytree(archive["archive"] / name, arch / name)
    cmd = [sys.executable, "-m", "observer.cli", "archive", str(arch), "--out", str(out),
           "--config", str(archive["config"]), "--workers", "2"]
    client = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while client.poll() is None:
            table = out / "archive.ecsv"
            if table.exists() and "done" in set(Table.read(table)["status"]):
                break
            time.sleep(0.2)
        assert client.poll() is None, "the run ended before it could be killed"
        os.kill(client.pid, signal.SIGKILL)
        client.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):      # its workers exit with it; make sure before going on
            os.killpg(client.pid, signal.SIGKILL)
    finished = {name for name in small if (out / name / MARKER).exists()}
    assert finished
    code, table = archive_cli(arch, out, archive["config"], "--workers", "2")
    rows = by_night(table)
    assert code == 1 and set(rows) == {*small, BROKEN}
    for name in small:
        assert rows[name]["status"] == ("skipped" if name in finished else "done"), name
    assert not temporaries(out)


def test_usage_errors(archive, tmp_path):
    assert main(["archive", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 1
    (tmp_path / "empty").mkdir()
    assert main(["archive", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 1   # no nights
    assert main(["archive", str(archive["archive"]), "--out", str(archive["archive"] / "out")]) == 2
    assert main(["archive", str(archive["archive"]), "--out", str(tmp_path / "out"), "--only", "nothing*"]) == 1
    assert main(["archive", str(archive["archive"]), "--out", str(tmp_path / "out"), "--workers", "0"]) == 2
    assert main(["archive", str(archive["archive"]), "--out", str(tmp_path / "out"), "--force",
                 "--scheduler", "tcp://127.0.0.1:not-a-port"]) == 1
