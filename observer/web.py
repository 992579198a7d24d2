"""The dashboard in a browser: ``observer watch ... --web [HOST:]PORT`` and ``observer demo --web PORT``.

textual-serve runs one command per browser connection and pipes its screen to
the page. That command must show the *one* running service, not start another,
so the service process (running headless) publishes its snapshot here and every
browser session runs ``observer view OUTDIR``, a read-only dashboard over it:

* :class:`SnapshotPublisher` (in the service process) writes the service's
  snapshot atomically to ``OUTDIR/.web/snapshot.pickle`` whenever it changes, and
  carries out what a served dashboard asks of the service (``s``: save the PNGs),
  through request and reply files in ``OUTDIR/.web/``;
* :class:`PublishedSnapshot` (in each served dashboard) is the app's source: it
  reads that file when it changed and turns ``s`` into a request.

So several browsers each get their own view (keys, target, filter), a closed tab
only ends its own process, and the service never waits on a browser. The pickle
is read only by observer's own processes, from a folder the service's user owns.
There is no authentication: the server binds to 127.0.0.1 unless given a host.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import shlex
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from observer.config import ConfigError
from observer.products import atomic_write_bytes, atomic_write_json
from observer.state import Snapshot

if TYPE_CHECKING:
    from observer.service import Service

log = logging.getLogger(__name__)

WEB_DIR = ".web"
SNAPSHOT_NAME = "snapshot.pickle"
DEFAULT_HOST = "127.0.0.1"
#: How often the publisher looks for a new snapshot and for requests (s).
PUBLISH_SECONDS = 0.25
#: How long a served dashboard waits for the service to save PNGs (s).
REQUEST_TIMEOUT = 120.0


def parse_address(text: str, option: str = "--web") -> tuple[str, int]:
    """``[HOST:]PORT`` -> (host, port); localhost unless a host is given. ConfigError naming the option."""
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"option '{option}': expected [HOST:]PORT (e.g. 8000 or 0.0.0.0:8000), got {text!r}") \
            from None
    if not 0 < number < 65536:
        raise ConfigError(f"option '{option}': port {number} is not in 1-65535")
    return host.strip("[]") or DEFAULT_HOST, number


def view_command(outdir: Path) -> str:
    """The command textual-serve runs per browser: a read-only dashboard, half-block images (a browser
    terminal has no Kitty or Sixel graphics)."""
    return (f"OBSERVER_IMAGE=halfblock {shlex.quote(sys.executable)} -m observer.cli view "
            f"{shlex.quote(str(outdir))}")


class SnapshotPublisher:
    """In the service process: publish snapshots to the served dashboards and carry out their requests."""

    def __init__(self, service: "Service", interval: float = PUBLISH_SECONDS) -> None:
        self.service = service
        self.folder = service.outdir / WEB_DIR
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._published: tuple | None = None

    def start(self) -> None:
        for sub in ("requests", "replies"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
            for stale in (self.folder / sub).glob("*.json"):   # left by a run that stopped: nobody waits
                stale.unlink(missing_ok=True)
        self.publish()
        self._thread = threading.Thread(target=self._loop, name="observer-web-publisher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop, and take the snapshot away so that open dashboards say the service is gone."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        (self.folder / SNAPSHOT_NAME).unlink(missing_ok=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.publish()
                self.answer_requests()
            except Exception:  # noqa: BLE001 - e.g. disk full: the next round retries
                log.exception("publishing the snapshot for the web dashboards")

    def publish(self) -> None:
        """Write the snapshot if it changed (version, queue, messages)."""
        snap = self.service.snapshot()
        key = (snap.version, snap.queue_length, snap.busy, snap.messages)
        if key != self._published:
            atomic_write_bytes(self.folder / SNAPSHOT_NAME, pickle.dumps(snap, protocol=pickle.HIGHEST_PROTOCOL))
            self._published = key

    def answer_requests(self) -> None:
        """Carry out each request file (``save_pngs``), reply, and remove it."""
        for request in sorted((self.folder / "requests").glob("*.json")):
            try:
                asked = json.loads(request.read_text())
                if asked.get("action") != "save_pngs":
                    raise ValueError(f"unknown request {asked.get('action')!r}")
                reply = {"paths": [str(p) for p in self.service.save_pngs(str(asked["target"]))]}
            except Exception as exc:  # noqa: BLE001 - the dashboard that asked shows the reason
                log.exception("web request %s", request.name)
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            atomic_write_json(self.folder / "replies" / request.name, reply)
            request.unlink(missing_ok=True)


class PublishedSnapshot:
    """In a served dashboard: the source ``ObserverApp`` reads, over what the service publishes in ``outdir``."""

    def __init__(self, outdir: str | Path) -> None:
        self.outdir = Path(outdir).expanduser().resolve()
        self.folder = self.outdir / WEB_DIR
        self._stamp: tuple[int, int] | None = None
        self._snapshot: Snapshot | None = None

    def snapshot(self) -> Snapshot:
        """The newest published snapshot (read again only when the file changed)."""
        path = self.folder / SNAPSHOT_NAME
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise RuntimeError(f"no service publishes into {self.outdir} (is `observer watch --web` running?)") \
                from None
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp or self._snapshot is None:
            self._snapshot = pickle.loads(path.read_bytes())
            self._stamp = stamp
        return self._snapshot

    def save_pngs(self, target: str) -> list[Path]:
        """Ask the service to save the target's PNGs and wait for its answer (the app calls this off its UI)."""
        name = f"{uuid.uuid4().hex}.json"
        reply = self.folder / "replies" / name
        atomic_write_json(self.folder / "requests" / name, {"action": "save_pngs", "target": target})
        deadline = time.monotonic() + REQUEST_TIMEOUT
        while not reply.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service did not answer within {REQUEST_TIMEOUT:g} s")
            time.sleep(0.2)
        answer = json.loads(reply.read_text())
        reply.unlink(missing_ok=True)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return [Path(p) for p in answer["paths"]]

    def send_to_samp(self, target: str) -> str:
        """Broadcast from here: the products are files, and the hub is this machine's."""
        from observer.samp import broadcast

        return broadcast(self.outdir, [target])


class WebServer:
    """textual-serve in a thread of its own event loop, so the main thread keeps the service's signals."""

    def __init__(self, command: str, host: str, port: int) -> None:
        from rich.console import Console
        from textual_serve.server import Server

        self.host, self.port = host, port
        self._server = Server(command, host=host, port=port, title="observer")
        self._server.console = Console(quiet=True)      # its banner; the service prints where to look
        self._loop = asyncio.new_event_loop()
        self._runner: Any = None               # aiohttp's AppRunner, once started
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        """Bind (here, so that a port in use fails now, in one line) and serve in the background."""
        from aiohttp import web

        app = self._loop.run_until_complete(self._server._make_app())
        self._runner = web.AppRunner(app, shutdown_timeout=5.0)
        self._loop.run_until_complete(self._runner.setup())
        try:
            self._loop.run_until_complete(web.TCPSite(self._runner, self.host, self.port).start())
        except OSError as exc:
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()
            raise OSError(f"cannot serve on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self._thread = threading.Thread(target=self._loop.run_forever, name="observer-web", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close the browsers' sessions (their dashboards quit) and the server."""
        if self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()


def run_web(service: "Service", address: str, until: Callable[[], bool] = lambda: False) -> int:
    """Run the (not yet started) service headless and serve its dashboard; returns the exit code."""
    from observer.service import run_headless_until

    host, port = parse_address(address)
    server = WebServer(view_command(service.outdir), host, port)
    server.start()
    publisher = SnapshotPublisher(service)
    publisher.start()
    where = "this machine only" if host in ("127.0.0.1", "localhost", "::1") else \
        "the network, with no authentication"
    print(f"observer: dashboard on {server.url} ({where}; from elsewhere: ssh -L {port}:localhost:{port})",
          flush=True)
    try:
        return run_headless_until(service, until)
    finally:
        server.stop()
        publisher.stop()
