"""Send the night's products to the astronomer's tools (TOPCAT, DS9, Aladin) through a running SAMP hub.

The catalogue goes as a VOTable (``table.load.votable``: TOPCAT reads it, ECSV
it does not), the stacks as FITS (``image.load.fits``). Both are notifications
with ``file://`` URLs, so the receivers load them in their own time and we never
wait on them. We never start a hub: without one there is nothing listening,
and a hub of our own would only hide that. The whole exchange runs in a daemon
thread joined with a timeout, because astropy's XML-RPC calls have none and a
hung hub must not hang the dashboard or the command line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

from astropy.table import Table
from astropy.utils.exceptions import AstropyDeprecationWarning

from observer.products import atomic_open

# astropy 8 deprecates astropy.samp for pyvo.samp; it still works, and one more dependency is not worth it yet.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", AstropyDeprecationWarning)
    from astropy.samp import SAMPHubError, SAMPIntegratedClient

log = logging.getLogger(__name__)

#: How long the hub may take to register us and take the notifications (s).
TIMEOUT_SECONDS = 10.0


class SampError(RuntimeError):
    """Nothing was sent: no hub, a hub that does not answer, or no products (one line says which)."""


def targets_of(outdir: Path) -> list[str]:
    """Targets with a catalogue or a stack under ``outdir``."""
    return sorted(p.name for p in outdir.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and ((p / "catalog.ecsv").is_file() or any(p.glob("*/stack.fits"))))


def votable_copy(outdir: Path, target: str) -> Path | None:
    """The catalogue as a VOTable in the temporary folder (the receiver reads it after we have gone).

    One file per (output folder, target), rewritten each time, so sending often leaves no litter.
    """
    ecsv = outdir / target / "catalog.ecsv"
    if not ecsv.is_file():
        return None
    key = hashlib.sha1(str(outdir.resolve()).encode()).hexdigest()[:10]
    folder = Path(tempfile.gettempdir()) / f"observer-samp-{os.getuid()}"
    path = folder / f"{target}-{key}.vot"
    with atomic_open(path) as handle:       # the VOTable writer wants a binary file
        Table.read(ecsv).write(handle, format="votable")
    return path


def messages(outdir: Path, targets: Sequence[str]) -> list[dict]:
    """The SAMP notifications for the targets' catalogues and stacks."""
    out = []
    for target in targets:
        votable = votable_copy(outdir, target)
        if votable is not None:
            out.append({"samp.mtype": "table.load.votable",
                        "samp.params": {"url": votable.as_uri(), "name": f"{target} catalogue",
                                        "table-id": f"observer-{target}-catalog"}})
        for stack in sorted((outdir / target).glob("*/stack.fits")):
            out.append({"samp.mtype": "image.load.fits",
                        "samp.params": {"url": stack.resolve().as_uri(), "name": f"{target} {stack.parent.name}",
                                        "image-id": f"observer-{target}-{stack.parent.name}"}})
    return out


def _notify_all(notes: list[dict]) -> None:
    client = SAMPIntegratedClient(name="observer", description="observer: the night's catalogue and stacks",
                                  callable=False)
    client.connect()
    try:
        for note in notes:
            client.notify_all(note)
    finally:
        client.disconnect()


def broadcast(outdir: str | Path, targets: Sequence[str] | None = None, timeout: float = TIMEOUT_SECONDS) -> str:
    """Send the catalogue and stacks of ``targets`` (default: all) to the running hub; returns one line.

    Raises :class:`SampError` (its message one line) when nothing could be sent.
    """
    outdir = Path(outdir)
    if not outdir.is_dir():
        raise SampError(f"no output folder {outdir}")
    names = list(targets) if targets else targets_of(outdir)
    notes = messages(outdir, names)
    if not notes:
        raise SampError(f"nothing to send: no catalogue or stack for {', '.join(names) or 'any target'} "
                        f"in {outdir}")
    failure: list[BaseException] = []

    def run() -> None:
        try:
            _notify_all(notes)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="observer-samp", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise SampError(f"the SAMP hub did not answer within {timeout:g} s; nothing sent")
    if failure:
        exc = failure[0]
        log.debug("SAMP", exc_info=exc)
        if isinstance(exc, SAMPHubError):
            raise SampError("no SAMP hub is running (start TOPCAT, DS9 or Aladin first); nothing sent") from exc
        raise SampError(f"sending to the SAMP hub failed: {exc}") from exc
    tables = sum(n["samp.mtype"] == "table.load.votable" for n in notes)
    log.info("SAMP: sent %d catalogue(s) and %d stack(s) of %s", tables, len(notes) - tables, ", ".join(names))
    return f"sent to SAMP: {tables} catalogue(s) and {len(notes) - tables} stack(s) of {', '.join(names)}"
