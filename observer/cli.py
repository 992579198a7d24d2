"""The ``observer`` command line: simulate, watch, reprocess, demo, inspect, archive, send (SAMP), view (a
``--web`` dashboard).

Exit codes (README "Commands"): 0 success, 2 bad usage or bad configuration (the message
names the key), 1 failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from observer.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from observer.service import Service

log = logging.getLogger("observer")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
#: Short frames of the default simulated night: the turn-off of the default cluster (M35, V ~ 10-11)
#: saturates in its 30-60 s frames (V < 14.3), and 1 s keeps it below saturation with a margin.
DEFAULT_SHORT = "3:1"


def parse_range(text: str, option: str) -> tuple[float, float]:
    """``LO:HI`` -> (LO, HI) with 0 < LO <= HI; ConfigError naming the option otherwise."""
    try:
        lo, hi = (float(v) for v in text.split(":"))
    except ValueError:
        raise ConfigError(f"option '{option}': expected LO:HI (e.g. 1.4:1.7), got {text!r}") from None
    if not 0 < lo <= hi:
        raise ConfigError(f"option '{option}': expected 0 < LO <= HI, got {text!r}")
    return lo, hi


def parse_short(text: str) -> tuple[int, float]:
    """``K:SECONDS`` -> (K, SECONDS); ConfigError naming the option otherwise."""
    try:
        count, seconds = text.split(":")
        k, t = int(count), float(seconds)
    except ValueError:
        raise ConfigError(f"option '--short': expected K:SECONDS (e.g. 3:1), got {text!r}") from None
    if k < 0 or (k > 0 and not t > 0):
        raise ConfigError(f"option '--short': expected K >= 0 and SECONDS > 0, got {text!r}")
    return k, t if t > 0 else 1.0


def parse_size(text: str) -> tuple[int, int]:
    """``N`` (square) or ``WxH`` -> (width, height), each >= 64; ConfigError naming ``--size`` otherwise."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 64:
        raise ConfigError(f"option '--size': expected N or WIDTHxHEIGHT in pixels, each >= 64 (e.g. 1530x1020), "
                          f"got {text!r}")
    return parts[0], parts[-1]


def _version() -> str:
    try:
        return version("observer")
    except PackageNotFoundError:
        return "unknown"


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", type=Path,
                        help="YAML file of settings merged over the defaults (see config.yaml)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="observer",
        description="Telescope-side observing and reduction: watch the camera folder, reduce and stack "
                    "each frame, measure the stars and draw the colour-magnitude diagram as the night goes on.")
    parser.add_argument("--version", action="version", version=f"observer {_version()}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    sim = verbs.add_parser("simulate", help="write a realistic simulated night of camera files",
                           description="Write a simulated night for one cluster, as a camera would: science "
                                       "frames per filter, one offset (blank sky) frame per filter, optionally "
                                       "calibration frames; the truth catalogue goes outside the folder.")
    sim.add_argument("outdir", type=Path, help="camera folder to write into (created)")
    sim.add_argument("--target", default="M35")
    sim.add_argument("--filters", default="blue,green", help="comma-separated filter names")
    sim.add_argument("--frames", type=int, default=10, help="science frames per filter")
    sim.add_argument("--short", default=DEFAULT_SHORT, metavar="K:SECONDS",
                     help=f"K short frames of SECONDS per filter after the long ones, for the bright stars "
                          f"(default {DEFAULT_SHORT}; 0:0 for none)")
    sim.add_argument("--size", default="2048", metavar="N|WxH",
                     help="frame size in pixels: N for a square frame or WIDTHxHEIGHT, e.g. 1530x1020")
    sim.add_argument("--fwhm", default=None, metavar="LO:HI",
                     help="seeing range of the night in pixels (default 2.5:4.5), e.g. 1.4:1.7 (undersampled) "
                          "or 6:8 (poor seeing)")
    sim.add_argument("--first-bad", choices=("trailed", "cloud", "sharp"), default="",
                     help="make the first frame of every filter the bad one (instead of the usual trailed and "
                          "clouded frames mid-sequence): trailed, clouded, or very sharp (half the seeing)")
    sim.add_argument("--cadence", type=float, default=0.0, help="seconds between files (0: at once)")
    sim.add_argument("--seed", type=int, default=1)
    sim.add_argument("--truth", type=Path, default=None,
                     help="truth catalogue path (default OUTDIR/../truth.ecsv)")
    sim.add_argument("--age-myr", type=float, default=150.0, help="cluster age in Myr")
    sim.add_argument("--calibration", action="store_true", help="also write bias, dark and flat frames")
    sim.add_argument("--gain", type=float, default=1.5, help="camera gain in e-/ADU (a CMOS camera: ~0.25)")
    sim.add_argument("--no-gain-keyword", action="store_true",
                     help="leave GAIN/EGAIN out of the headers (a camera that does not write them)")
    _add_config(sim)

    watch = verbs.add_parser("watch", help="the service: watch a camera folder and reduce as frames land",
                             description="Watch CAMDIR (and subfolders) and reduce every FITS file exactly "
                                         "once as it lands; products are kept current under OUTDIR. Ctrl-C "
                                         "stops cleanly; starting again resumes.")
    watch.add_argument("camdir", type=Path)
    watch.add_argument("--out", type=Path, required=True, help="output folder (not inside CAMDIR)")
    watch.add_argument("--headless", action="store_true", help="log lines instead of the dashboard")
    _add_web(watch, "[HOST:]PORT")
    _add_config(watch)

    rep = verbs.add_parser("reprocess", help="run the same pipeline over a saved night and exit",
                           description="Tag and reduce every frame of NIGHTDIR in DATE-OBS order through the "
                                       "same per-frame path as watch, and write all products.")
    rep.add_argument("nightdir", type=Path)
    rep.add_argument("--out", type=Path, required=True)
    _add_config(rep)

    demo = verbs.add_parser("demo", help="simulate a night live and watch it with the dashboard",
                            description="Simulate a night into a temporary camera folder at a live cadence "
                                        "and run the service with the dashboard on it. q quits and cleans up.")
    demo.add_argument("--size", type=int, default=1024)
    demo.add_argument("--cadence", type=float, default=3.0)
    demo.add_argument("--frames", type=int, default=10)
    demo.add_argument("--headless", action="store_true")
    _add_web(demo, "PORT")
    _add_config(demo)

    arch = verbs.add_parser("archive", help="reprocess every night of an archive on Dask, resumable",
                            description="Reprocess every sub-folder of ARCHIVE that holds camera files as one "
                                        "Dask task into OUT/<night>/ (as reprocess writes it), on a LocalCluster "
                                        "or an existing cluster; nights whose products are current are skipped. "
                                        "OUT/archive.ecsv has one row per night.")
    arch.add_argument("archive", type=Path)
    arch.add_argument("--out", type=Path, required=True, help="output folder (not inside ARCHIVE)")
    arch.add_argument("--scheduler", metavar="ADDRESS", help="an existing Dask scheduler, e.g. tcp://host:8786")
    arch.add_argument("--workers", type=int, help="LocalCluster worker processes (default: the cores)")
    arch.add_argument("--only", metavar="PATTERN", help="only nights whose relative path matches (glob)")
    arch.add_argument("--force", action="store_true", help="recompute nights whose products are current")
    _add_config(arch)
    insp = verbs.add_parser("inspect", help="what observer makes of every file, from the headers alone",
                            description="Tag every FITS file of CAMDIR from its header (nothing is reduced): a "
                                        "table of kind, target, filter, exposure, gain, date, shape and what "
                                        "observer would do, a summary per target and filter, and the config "
                                        "lines that would tag the files it cannot. Exit code 0 when every file "
                                        "tags, 1 when some cannot, 2 for a bad config.")
    insp.add_argument("camdir", type=Path)
    _add_config(insp)
    send = verbs.add_parser("send", help="send the catalogue and stacks to a running SAMP hub (TOPCAT, DS9)",
                            description="Broadcast each target's catalogue (as a VOTable) and stacks to the "
                                        "SAMP hub that TOPCAT, DS9 or Aladin runs. Without a hub: one line, "
                                        "exit code 1.")
    send.add_argument("outdir", type=Path, help="the output folder of watch or reprocess")
    send.add_argument("--target", action="append", help="only this target (repeatable; default: all)")
    _add_config(send)

    view = verbs.add_parser("view", help="the dashboard of a service running with --web (read-only)",
                            description="Show the dashboard of the service that `observer watch --web` runs "
                                        "into OUTDIR; what each browser session of --web runs.")
    view.add_argument("outdir", type=Path)
    _add_config(view)
    return parser


def _add_web(parser: argparse.ArgumentParser, metavar: str) -> None:
    parser.add_argument("--web", metavar=metavar, default=None,
                        help="serve the dashboard to browsers instead of this terminal (localhost unless a "
                             "HOST is given; no authentication)")


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def _run_simulate(args: argparse.Namespace, settings: Settings) -> int:
    from observer.simulator import SimSettings, simulate_night

    filters = tuple(f.strip() for f in args.filters.split(",") if f.strip())
    if not filters:
        raise ConfigError("option '--filters': expected a comma-separated list of filter names")
    if args.frames < 1 or args.cadence < 0 or not args.gain > 0:
        raise ConfigError("options: expected --frames >= 1, --cadence >= 0 and --gain > 0")
    width, height = parse_size(args.size)
    short_frames, short_exptime = parse_short(args.short)
    seeing = {"seeing_range": parse_range(args.fwhm, "--fwhm")} if args.fwhm else {}
    sim = SimSettings(target=args.target, filters=filters, frames=args.frames, size=width, height=height,
                      short_frames=short_frames, short_exptime=short_exptime, **seeing,
                      cadence=args.cadence, seed=args.seed, age_myr=args.age_myr, first_bad=args.first_bad,
                      calibration=args.calibration, gain=args.gain, gain_keyword=not args.no_gain_keyword,
                      # Files grow while written only when a watcher may be looking (a live cadence);
                      # all at once, the growth would only sleep 0.3 s per file.
                      **({} if args.cadence > 0 else {"fill_seconds": 0.0}),
                      zeropoints={f: settings.filters.zeropoint(settings.filters.normalise(f) or f)
                                  for f in filters})
    truth = args.truth or args.outdir.resolve().parent / "truth.ecsv"
    simulate_night(args.outdir, sim, truth_path=truth, progress=True)
    return EXIT_OK


def _run_watch(args: argparse.Namespace, settings: Settings) -> int:
    """``observer watch``: the service until Ctrl-C / SIGTERM (headless) or until the dashboard quits."""
    from observer.service import Service, run_headless_until

    service = Service(args.camdir, args.out, settings)
    if args.web:
        from observer.web import run_web

        return _exit_past_a_running_fit(service, run_web(service, args.web))
    app_class = None
    if not args.headless:
        try:
            from tui.app import ObserverApp
            app_class = ObserverApp
        except ImportError as exc:
            log.warning("the dashboard is not available (%s); running headless", exc)
            print(f"observer: the dashboard is not available ({exc}); running headless", file=sys.stderr)
    if app_class is None:
        return _exit_past_a_running_fit(service, run_headless_until(service))
    service.start()
    try:
        app_class(service).run()
    finally:
        service.stop()
    return _exit_past_a_running_fit(service, EXIT_OK)


def _exit_past_a_running_fit(service: Service, code: int) -> int:
    """Exit at once when an age fit still runs on its daemon thread (the service stopped without waiting
    for it and refits at its next start): the interpreter's teardown under it aborted the process in
    native code ("terminate called without an active exception", exit code 134). Everything is saved."""
    if not service.measurements.busy:
        return code
    log.info("exiting while an age fit runs: it is made again at the next start")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_reprocess(args: argparse.Namespace, settings: Settings) -> int:
    from observer.reprocess import reprocess

    reprocess(args.nightdir, args.out, settings, progress=True)
    return EXIT_OK


def _run_demo(args: argparse.Namespace, settings: Settings) -> int:
    from observer.demo import run_demo

    return run_demo(settings, size=args.size, cadence=args.cadence, frames=args.frames,
                    headless=args.headless, web=args.web)


def _run_archive(args: argparse.Namespace, settings: Settings) -> int:
    from observer.archive import run_archive

    logging.getLogger("observer.archive").setLevel(min(logging.INFO, logging.getLogger().level))
    if args.verbose < 2:        # the scheduler's own INFO lines (workers joining, leaving) only with -vv
        import distributed  # noqa: F401  (its import sets its loggers' levels: set ours after it)

        logging.getLogger("distributed").setLevel(logging.WARNING)
    rows = run_archive(args.archive, args.out, settings, scheduler=args.scheduler, workers=args.workers,
                       only=args.only, force=args.force)
    failed = sum(row["status"] == "failed" for row in rows.values())
    if failed:
        print(f"observer archive: {failed} of {len(rows)} nights failed (see {args.out / 'archive.ecsv'})",
              file=sys.stderr)
    return EXIT_FAILURE if failed else EXIT_OK


def _run_inspect(args: argparse.Namespace, settings: Settings) -> int:
    from observer.inspect import run_inspect

    return run_inspect(args.camdir, settings, sys.stdout)


def _run_view(args: argparse.Namespace, _settings: Settings) -> int:
    from observer.web import PublishedSnapshot
    from tui.app import ObserverApp

    ObserverApp(PublishedSnapshot(args.outdir)).run()
    return EXIT_OK


def _run_send(args: argparse.Namespace, _settings: Settings) -> int:
    from observer.samp import SampError, broadcast

    try:
        print(f"observer send: {broadcast(args.outdir, args.target)}")
    except SampError as exc:
        print(f"observer send: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


RUNNERS = {"simulate": _run_simulate, "watch": _run_watch, "reprocess": _run_reprocess, "demo": _run_demo,
           "archive": _run_archive, "inspect": _run_inspect, "send": _run_send, "view": _run_view}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        settings = load_settings(args.config)
        return RUNNERS[args.verb](args, settings)
    except ConfigError as exc:
        print(f"observer: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    except (OSError, RuntimeError) as exc:
        log.debug("failure", exc_info=True)
        print(f"observer {args.verb}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
