"""SAMP: ``observer send`` broadcasts the catalogue (VOTable) and the stacks (FITS) to a running hub.

The hub and a receiving client (standing in for TOPCAT/DS9) run in the test
process; the hub's lock file is in tmp and found through ``SAMP_HUB``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.utils.exceptions import AstropyDeprecationWarning

from observer.cli import main

with warnings.catch_warnings():      # astropy 8 deprecates astropy.samp (for pyvo.samp); observer.samp says why
    warnings.simplefilter("ignore", AstropyDeprecationWarning)
    from astropy.samp import SAMPHubServer, SAMPIntegratedClient

ROOT = Path(__file__).resolve().parents[1]


def _products(outdir: Path) -> None:
    """A minimal output folder: a 7-star catalogue and two 32 x 48 stacks."""
    (outdir / "M35").mkdir(parents=True)
    Table({"id": np.arange(1, 8), "x": np.linspace(1, 30, 7), "y": np.linspace(2, 40, 7),
           "flags": np.zeros(7, int)}).write(outdir / "M35" / "catalog.ecsv")
    for name in ("blue", "green"):
        (outdir / "M35" / name).mkdir()
        fits.PrimaryHDU(np.zeros((32, 48), np.float32)).writeto(outdir / "M35" / name / "stack.fits")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    lockfile = tmp_path / "samp.lock"
    server = SAMPHubServer(web_profile=False, lockfile=str(lockfile), pool_size=4)
    server.start()
    monkeypatch.setenv("SAMP_HUB", f"std-lockurl:{lockfile.as_uri()}")
    try:
        yield server
    finally:
        server.stop()


def test_catalogue_and_stacks_arrive(tmp_path, hub, capsys):
    received: dict[str, list[str]] = {}
    arrived = threading.Event()

    def on_note(_private_key, _sender_id, mtype, params, _extra):
        received.setdefault(mtype, []).append(params["url"])
        if len(received.get("image.load.fits", [])) == 2 and "table.load.votable" in received:
            arrived.set()

    viewer = SAMPIntegratedClient(name="viewer")
    viewer.connect()
    try:
        for mtype in ("table.load.votable", "image.load.fits"):
            viewer.bind_receive_notification(mtype, on_note)
        outdir = tmp_path / "out"
        _products(outdir)
        assert main(["send", str(outdir)]) == 0
        assert arrived.wait(30), received
    finally:
        viewer.disconnect()
    assert "1 catalogue(s) and 2 stack(s) of M35" in capsys.readouterr().out
    path = lambda url: Path(unquote(urlparse(url).path))   # noqa: E731
    (table_url,) = received["table.load.votable"]
    assert len(Table.read(path(table_url), format="votable")) == 7
    for url in received["image.load.fits"]:
        assert fits.getdata(path(url)).shape == (32, 48)


def test_without_a_hub_one_line_and_exit_1(tmp_path):
    outdir = tmp_path / "out"
    _products(outdir)
    env = {**os.environ, "SAMP_HUB": f"std-lockurl:{(tmp_path / 'no-hub.lock').as_uri()}", "HOME": str(tmp_path),
           "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "observer.cli", "send", str(outdir)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert run.returncode == 1
    assert run.stdout == ""
    assert run.stderr.strip().splitlines() == [
        "observer send: no SAMP hub is running (start TOPCAT, DS9 or Aladin first); nothing sent"]
