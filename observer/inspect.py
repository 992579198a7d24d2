"""``observer inspect CAMDIR``: what observer makes of every file, from the headers alone.

Why: a new camera or observatory writes its headers in its own dialect, and the afternoon before
the night is the time to find out, not the morning after. Inspect reads each file's header (no
pixels are reduced), tags it exactly as the per-frame path would (same keyword lists, same rules,
files in DATE-OBS order so that pointings are learnt as in a night), prints one row per file, a
summary per target and filter, and the config lines that would tag the files it cannot.

Exit code: 0 when every file tags, 1 when some cannot (they are listed with their reason and the
proposed config), 2 for a bad config (raised as ``ConfigError`` before any file is read).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from astropy.io import fits
from astropy.time import Time

from observer.config import Settings
from observer.ingest import is_fits_name
from observer.tagging import TaggingError, Tags, tag_facts
from reduction.colour import plane_facts
from reduction.frames import FrameError, HeaderFacts, header_facts, read_header

EXIT_ALL_TAGGED, EXIT_SOME_UNTAGGED = 0, 1


@dataclass
class Row:
    """One file as inspect sees it; ``tags`` is None when it cannot be tagged (``reason`` says why)."""

    path: Path
    facts: HeaderFacts | None
    shape: tuple[int, ...] = ()
    tags: Tags | None = None
    reason: str = ""
    header: fits.Header | None = None
    plane: str = ""             # a colour file's plane (R, G, B): one row each, as the night takes them

    @property
    def action(self) -> str:
        """What observer would do with the file."""
        if self.tags is None:
            return f"set aside: {self.reason}"
        t = self.tags
        if t.kind == "science":
            return f"stack into {t.target}/{t.filter}"
        if t.kind == "offset":
            return f"sky shape for {t.target}/{t.filter}"
        return f"master {t.kind}" + (f" ({t.filter})" if t.kind == "flat" else "")


@dataclass
class Report:
    """Every file's row, in the order a night would take them."""

    rows: list[Row] = field(default_factory=list)

    @property
    def untagged(self) -> list[Row]:
        return [r for r in self.rows if r.tags is None]


def _date_key(row: Row) -> tuple[int, float, str]:
    """DATE-OBS order as reprocess takes the files; undated files last, by name."""
    date = row.facts.date_obs if row.facts is not None else None
    return (0, float(date.mjd), row.path.name) if date is not None else (1, 0.0, row.path.name)


def inspect_night(camdir: str | Path, settings: Settings) -> Report:
    """Read and tag every FITS file under ``camdir`` (headers only)."""
    camdir = Path(camdir)
    if not camdir.is_dir():
        raise OSError(f"{camdir}: no such folder")
    keywords = settings.header.keywords()
    rows = []
    for path in sorted(p for p in camdir.rglob("*") if p.is_file() and is_fits_name(p.name)):
        try:
            header, shape = read_header(path)
        except FrameError as exc:
            rows.append(Row(path=path, facts=None, reason=str(exc)))
            continue
        facts = header_facts(header, keywords)
        try:
            planes = plane_facts(header, facts, shape)
        except FrameError as exc:
            rows.append(Row(path=path, facts=facts, shape=shape, reason=str(exc), header=header))
            continue
        rows.extend(Row(path=path, facts=f, shape=shape, header=header, plane=c) for c, f in planes)
    rows.sort(key=_date_key)
    pointings: dict[str, tuple[float, float]] = {}
    for row in rows:
        if row.facts is None or row.reason:
            continue
        try:
            row.tags = tag_facts(row.path, row.facts, settings, pointings)
        except TaggingError as exc:
            row.reason = str(exc)
            continue
        facts = row.facts
        if row.tags.kind == "science" and facts.ra_deg is not None and facts.dec_deg is not None:
            pointings.setdefault(row.tags.target, (facts.ra_deg, facts.dec_deg))
    return Report(rows=rows)


def _number(value: float | None, source: str | None, fallback: float | None) -> str:
    """'1.5 EGAIN' from the header, '1.2 config' from the camera settings, '-' when neither has it."""
    if value is not None:
        return f"{value:g} {source}"
    return f"{fallback:g} config" if fallback is not None else "-"


def _date(value: Time | None) -> str:
    return value.isot[:19] if value is not None else "-"


def format_table(report: Report, settings: Settings) -> list[str]:
    """One line per file: kind, target, filter, exposure, gain (+ keyword), date, shape, action."""
    head = ("file", "kind", "target", "filter", "exp_s", "gain", "date", "shape", "observer would")
    lines = []
    for row in report.rows:
        facts, tags = row.facts, row.tags
        exptime = facts.exptime if facts is not None else None
        lines.append((
            row.path.name + (f" [{row.plane}]" if row.plane else ""),
            tags.kind if tags else "?",
            (tags.target or "-") if tags else "?",
            (tags.filter or "-") if tags else "?",
            f"{exptime:g}" if exptime is not None else "-",
            _number(facts.gain, facts.sources.get("gain"), settings.camera.gain) if facts else "-",
            _date(facts.date_obs) if facts else "-",
            "x".join(str(n) for n in reversed(row.shape)) or "-",
            row.action,
        ))
    widths = [max(len(str(c)) for c in column) for column in zip(head, *lines)]
    return ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, *lines)]


def format_summary(report: Report, settings: Settings) -> list[str]:
    """Per target and filter: science and offset frames and exposure; calibration counts; colour."""
    lines = ["", "summary:"]
    science: Counter = Counter()
    exposure: Counter = Counter()
    offsets: Counter = Counter()
    calibration: Counter = Counter()
    for row in report.rows:
        t = row.tags
        if t is None:
            continue
        if t.kind in ("science", "offset"):
            (science if t.kind == "science" else offsets)[(t.target, t.filter)] += 1
            if t.kind == "science":
                exposure[(t.target, t.filter)] += row.facts.exptime or 0.0
        else:
            calibration[t.kind + (f" {t.filter}" if t.filter else "")] += 1
    first, second = settings.cmd.color_filters
    for target in sorted({k[0] for k in (*science, *offsets)}):
        filters = sorted({f for tg, f in (*science, *offsets) if tg == target})
        for f in filters:
            lines.append(f"  {target} {f}: {science[(target, f)]} science ({exposure[(target, f)]:g} s), "
                         f"{offsets[(target, f)]} offset")
        colour = "colour and CMD" if {first, second} <= set(filters) else \
            f"no {settings.cmd.color} colour: no CMD"
        lines.append(f"  {target}: {colour}")
    lines.extend(f"  {kind}: {n} frames" for kind, n in sorted(calibration.items()))
    lines.append(f"  {len(report.rows) - len(report.untagged)} of {len(report.rows)} files tagged")
    return lines


def _unknown_filter(reason: str) -> str | None:
    match = re.match(r"unknown filter [^=]+='(?P<value>[^']*)'", reason)
    return match["value"] if match else None


#: Reason of an untagged file -> (the header fact missing, a pattern of header keys that may hold it).
_MISSING = {"no FILTER": ("filter", r"FILT|FLT"), "flat without a filter": ("filter", r"FILT|FLT"),
            "no OBJECT": ("target", r"OBJ|TARG|FIELD"), "no frame type": ("kind", r"TYP")}


def _candidate_keys(row: Row, pattern: str, configured: list[str]) -> list[str]:
    """Header keys that look like they hold a fact (``pattern``) but are not in its keyword list."""
    return [k for k in (row.header or {}) if re.search(pattern, k) and k not in configured]


def _plain_or_quoted(key: str) -> str:
    """A keyword as a YAML flow-list item: patterns ('* FILT* NAME') need quotes."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else f"'{key}'"


def propose_config(report: Report, settings: Settings) -> list[str]:
    """YAML lines that would tag the files inspect cannot (a starting point: check the names)."""
    aliases: dict[str, str] = {}
    header: dict[str, list[str]] = {}
    notes: list[str] = []
    default_filter = False
    def alias(value: str) -> None:
        if settings.filters.normalise(value) is None:
            aliases[value] = re.sub(r"[^a-z0-9]+", "", value.lower()) or "filter"

    for row in report.untagged:
        value = _unknown_filter(row.reason)
        if value is not None:
            alias(value)
            continue
        fix = next((v for k, v in _MISSING.items() if row.reason.startswith(k)), None)
        keys = _candidate_keys(row, fix[1], getattr(settings.header, fix[0])) if fix else []
        if keys:
            listed = header.setdefault(fix[0], list(getattr(settings.header, fix[0])))
            listed.extend(k for k in keys if k not in listed)
            if fix[0] == "filter":
                for key in keys:
                    alias(str(row.header[key]).strip())
        elif fix and fix[0] == "filter":
            default_filter = True
        else:
            notes.append(f"# {row.path.name}: {row.reason} (no config line fixes this)")
    lines: list[str] = []
    if aliases or default_filter:
        canonical = ", ".join(sorted(set(settings.filters.aliases.values())))
        lines.append("filters:")
        if aliases:
            lines.append(f"  aliases:          # right-hand side: a canonical name ({canonical}) or a new one")
            lines.extend(f"    '{value}': {name}" for value, name in sorted(aliases.items()))
        if default_filter:
            lines.append(f"  default_filter: luminance   # the camera writes no filter; one of: {canonical}")
    if header:
        lines.append("header:")
        lines.extend(f"  {fact}: [{', '.join(map(_plain_or_quoted, keys))}]" for fact, keys in sorted(header.items()))
    return lines + notes


def run_inspect(camdir: str | Path, settings: Settings, out: TextIO) -> int:
    """Print the table, the summary and the proposed config; 0 when all files tag, else 1."""
    report = inspect_night(camdir, settings)
    if not report.rows:
        print(f"{camdir}: no FITS files", file=out)
        return EXIT_ALL_TAGGED
    for line in (*format_table(report, settings), *format_summary(report, settings)):
        print(line, file=out)
    if report.untagged:
        print(f"\n{len(report.untagged)} files cannot be tagged; config lines that would tag them "
              f"(add to a file given with --config):", file=out)
        for line in propose_config(report, settings):
            print(line, file=out)
        return EXIT_SOME_UNTAGGED
    return EXIT_ALL_TAGGED
