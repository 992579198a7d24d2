"""Deciding when a camera file may be taken: FITS names, structural completeness, hashing.

A camera (or a copy from a USB disk) creates a file and fills it over a second
or more; the watcher sees it long before it is whole. Taking it early would
stack a half-empty frame, so a file is taken only when

* its size and mtime have not changed for ``stable_seconds`` (the writer has
  paused or finished), and
* its FITS structure is whole: every header parses (2880-byte blocks up to the
  ``END`` card) and every data unit has all the bytes NAXIS/BITPIX/PCOUNT/GCOUNT
  promise. This is checked by reading headers only and seeking over the data,
  so it costs a few kilobytes of I/O whatever the frame size.

A file that stays incomplete for ``quarantine_after_seconds`` is reported once
as quarantined (with the reason, e.g. how many data bytes are missing) and is
taken later if it ever completes.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

log = logging.getLogger(__name__)

BLOCK = 2880
CARD = 80
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz", ".fits.fz", ".fit.fz")
GZIP_SUFFIXES = (".gz",)
_HASH_CHUNK = 1 << 20


def is_fits_name(path: str | Path) -> bool:
    """True for names a FITS camera file may have (case-insensitive), compressed ones included."""
    return str(path).lower().endswith(FITS_SUFFIXES)


def is_gzip_name(path: str | Path) -> bool:
    return str(path).lower().endswith(GZIP_SUFFIXES)


class Completeness(NamedTuple):
    """Outcome of :func:`fits_completeness`; ``reason`` says what is missing (or what is odd when complete)."""

    complete: bool
    reason: str


class _Incomplete(Exception):
    """The structure stops short; ``str`` is the reason."""


def _parse_value(card: str) -> str:
    """The value field of a fixed-format card (text after ``= ``, before any ``/`` comment)."""
    value = card[10:]
    if value.lstrip().startswith("'"):
        return value.strip()
    return value.split("/", 1)[0].strip()


def _read_header(handle: BinaryIO, hdu_index: int) -> dict[str, str]:
    """Read one header (whole 2880-byte blocks up to END) and return the cards that size its data.

    Reads only the header blocks. Raises :class:`_Incomplete` when the file ends first.
    """
    cards: dict[str, str] = {}
    nblocks = 0
    while True:
        block = handle.read(BLOCK)
        nblocks += 1
        if len(block) < BLOCK:
            raise _Incomplete(f"header of HDU {hdu_index} ends after {(nblocks - 1) * BLOCK + len(block)} "
                              f"bytes, before its END card")
        text = block.decode("ascii", errors="replace")
        for start in range(0, BLOCK, CARD):
            card = text[start:start + CARD]
            keyword = card[:8].rstrip()
            if keyword == "END":
                return cards
            if card[8:10] == "= " and keyword in {"SIMPLE", "XTENSION", "BITPIX", "PCOUNT", "GCOUNT", "GROUPS"} \
                    or keyword.startswith("NAXIS"):
                cards[keyword] = _parse_value(card)


def _data_bytes(cards: dict[str, str], hdu_index: int) -> int:
    """Bytes of the data unit (without padding) the header promises (FITS standard 4.0, eq. 2 and 4)."""
    try:
        bitpix = int(cards["BITPIX"])
        naxis = int(cards["NAXIS"])
        axes = [int(cards[f"NAXIS{i}"]) for i in range(1, naxis + 1)]
        pcount = int(cards.get("PCOUNT", "0"))
        gcount = int(cards.get("GCOUNT", "1"))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"header of HDU {hdu_index} lacks a valid {exc} card") from None
    if naxis == 0:
        return 0
    if cards.get("GROUPS") == "T" and axes and axes[0] == 0:   # random groups: NAXIS1 = 0 is a flag
        axes = axes[1:]
    count = 1
    for n in axes:
        count *= n
    return abs(bitpix) // 8 * gcount * (pcount + count)


def _skip(handle: BinaryIO, nbytes: int) -> int:
    """Advance ``nbytes`` (seeking where possible); return how many bytes were really there."""
    if nbytes == 0:
        return 0
    if isinstance(handle, gzip.GzipFile):
        skipped = 0
        while skipped < nbytes:
            chunk = handle.read(min(_HASH_CHUNK, nbytes - skipped))
            if not chunk:
                break
            skipped += len(chunk)
        return skipped
    start = handle.tell()
    end = handle.seek(0, os.SEEK_END)
    available = min(nbytes, end - start)
    handle.seek(start + available)
    return available


def _walk(handle: BinaryIO) -> Completeness:
    """Walk the HDUs of an open FITS stream; raises :class:`_Incomplete` when it stops short."""
    first = handle.read(CARD)
    if len(first) < CARD and b"SIMPLE  =".startswith(first[:9]):
        raise _Incomplete("empty file" if not first else f"only {len(first)} bytes so far")
    if not first.startswith(b"SIMPLE  ="):
        return Completeness(True, "not a FITS file: it does not start with a SIMPLE card")
    handle.seek(0)
    index = 0
    while True:
        cards = _read_header(handle, index)
        try:
            need = _data_bytes(cards, index)
        except ValueError as exc:       # structurally broken: waiting will not mend it; let reduction say why
            return Completeness(True, str(exc))
        got = _skip(handle, need)
        if got < need:
            raise _Incomplete(f"data unit of HDU {index} has {got} of {need} bytes")
        padding = (-need) % BLOCK
        got_padding = _skip(handle, padding)
        if got_padding == 0 and padding:
            # Every byte NAXIS promises and no padding: some writers end the last data unit there.
            return Completeness(True, "")
        if got_padding < padding:
            raise _Incomplete(f"padding of HDU {index} has {got_padding} of {padding} bytes")
        nxt = handle.read(CARD)
        if not nxt:
            return Completeness(True, "")
        if not (nxt.startswith(b"XTENSION") or b"XTENSION".startswith(nxt)):
            return Completeness(True, f"{len(nxt)}+ bytes of trailing data after HDU {index} ignored")
        if len(nxt) < CARD:
            raise _Incomplete(f"header of HDU {index + 1} has only {len(nxt)} bytes so far")
        handle.seek(-CARD, os.SEEK_CUR)
        index += 1


def fits_completeness(path: str | Path) -> Completeness:
    """Is the FITS file at ``path`` whole? Reads headers only; for gzip files, decompresses to the trailer.

    A file that does not begin like FITS at all is "complete" (waiting will not
    make it FITS): the reduction records why it cannot be used. OSErrors
    (permission denied, a directory) propagate to the caller.
    """
    path = Path(path)
    gz = is_gzip_name(path)
    with open(path, "rb") as raw:
        if gz and raw.read(2) != b"\x1f\x8b":
            raw.seek(0)
            gz = False          # a .gz name over plain bytes: judge the bytes
        raw.seek(0)
        try:
            if not gz:
                return _walk(raw)
            with gzip.GzipFile(fileobj=raw, mode="rb") as handle:
                result = _walk(handle)
                while handle.read(_HASH_CHUNK):   # read to the trailer: EOFError if the stream is cut
                    pass
                return result
        except _Incomplete as exc:
            return Completeness(False, str(exc))
        except EOFError:
            return Completeness(False, "gzip stream ends before its trailer")
        except (gzip.BadGzipFile, zlib.error) as exc:
            return Completeness(False, f"gzip stream damaged so far ({exc})")


def sha256_of(path: str | Path) -> str:
    """SHA-256 of the file's bytes, streamed (frames can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class _Pending:
    """What the tracker knows about one file it is waiting on."""

    size: int
    mtime_ns: int
    changed_at: float           # monotonic time the size/mtime last changed (or first seen)
    checked_sig: tuple[int, int] | None = None   # (size, mtime) last found incomplete
    reason: str = ""
    quarantined: bool = False
    closed_sig: tuple[int, int] | None = None    # (size, mtime) when the writer closed it


@dataclass(frozen=True)
class ReadyFile:
    """A file judged ready to take (or unreadable: ``error`` set, the worker records why)."""

    path: Path
    size: int
    mtime_ns: int
    error: str = ""


@dataclass(frozen=True)
class Quarantined:
    path: Path
    reason: str


class FileTracker:
    """Decides, from noted paths and periodic polls, when each file is ready to take.

    Thread-safe: :meth:`note` is called from the watchdog thread (cheap: a dict
    insert under a lock); :meth:`poll` from the ingest thread (stats and the
    completeness check). Memory is one small entry per file waiting plus one
    signature per file already handed over, so a burst of any size is bounded by
    the number of distinct files, not by the number of events.
    """

    def __init__(self, stable_seconds: float, quarantine_after_seconds: float) -> None:
        self.stable_seconds = stable_seconds
        self.quarantine_after_seconds = quarantine_after_seconds
        self._lock = threading.Lock()
        self._noted: dict[Path, bool] = {}       # path -> a writer closed it (close-after-write event)
        self._pending: dict[Path, _Pending] = {}
        self._taken: dict[Path, tuple[int, int]] = {}
        self._filling = 0

    def note(self, path: Path, closed: bool = False) -> None:
        """Something happened to ``path`` (an event or a scan); look at it on the next poll.

        ``closed``: the event was a close after writing. The writer saying it is
        done lets a structurally complete file be taken without waiting
        ``stable_seconds`` (that wait is for writers and file systems that give
        no such event), which keeps the latency down.
        """
        with self._lock:
            self._noted[path] = self._noted.get(path, False) or closed

    def mark_taken(self, path: Path, size: int, mtime_ns: int) -> None:
        """``path`` with this size and mtime is already handled (e.g. from the ledger at restart)."""
        with self._lock:
            self._taken[path] = (size, mtime_ns)

    @property
    def waiting(self) -> int:
        """Files noted or filling (not counting quarantined ones): nonzero while a burst is still arriving."""
        with self._lock:
            return self._filling + len(self._noted)

    def poll(self, now: float) -> tuple[list[ReadyFile], list[Quarantined]]:
        """Stat the waiting files; return those now ready (oldest mtime first, ties by name) and new quarantines.

        ``now`` is a monotonic time (``time.monotonic()``).
        """
        with self._lock:
            noted, self._noted = self._noted, {}
        ready: list[ReadyFile] = []
        quarantined: list[Quarantined] = []
        for path, closed in noted.items():
            self._admit(path, closed, now, ready)
        for path, entry in list(self._pending.items()):
            self._check(path, entry, now, ready, quarantined)
        ready.sort(key=lambda r: (r.mtime_ns, r.path.name, str(r.path)))
        with self._lock:
            self._filling = sum(not e.quarantined for e in self._pending.values())
        return ready, quarantined

    def _admit(self, path: Path, closed: bool, now: float, ready: list[ReadyFile]) -> None:
        try:
            st = path.stat()
        except FileNotFoundError:
            self._pending.pop(path, None)       # deleted or renamed away before we took it
            return
        except OSError as exc:
            ready.append(ReadyFile(path, 0, 0, error=f"cannot read: {exc.strerror or exc}"))
            return
        sig = (st.st_size, st.st_mtime_ns)
        with self._lock:
            if self._taken.get(path) == sig:
                return
        entry = self._pending.get(path)
        if entry is None:
            # A file last modified long ago (already there at start-up) has been quiet since its mtime.
            quiet = min(max(0.0, time.time() - st.st_mtime), self.quarantine_after_seconds)
            entry = self._pending[path] = _Pending(st.st_size, st.st_mtime_ns, now - quiet)
        elif (entry.size, entry.mtime_ns) != sig:
            entry.size, entry.mtime_ns, entry.changed_at = st.st_size, st.st_mtime_ns, now
        if closed:
            entry.closed_sig = sig

    def _check(self, path: Path, entry: _Pending, now: float, ready: list[ReadyFile],
               quarantined: list[Quarantined]) -> None:
        try:
            st = path.stat()
        except FileNotFoundError:
            del self._pending[path]
            return
        except OSError as exc:
            del self._pending[path]
            ready.append(ReadyFile(path, 0, 0, error=f"cannot read: {exc.strerror or exc}"))
            return
        sig = (st.st_size, st.st_mtime_ns)
        if sig != (entry.size, entry.mtime_ns):
            entry.size, entry.mtime_ns, entry.changed_at = st.st_size, st.st_mtime_ns, now
            return
        if now - entry.changed_at < self.stable_seconds and entry.closed_sig != sig:
            return
        if entry.checked_sig != sig:     # judge each stable version of the file once
            try:
                result = Completeness(True, "") if path.is_dir() else fits_completeness(path)
            except OSError as exc:
                del self._pending[path]
                ready.append(ReadyFile(path, *sig, error=f"cannot read: {exc.strerror or exc}"))
                return
            if result.complete:
                del self._pending[path]
                with self._lock:
                    self._taken[path] = sig
                ready.append(ReadyFile(path, *sig))
                return
            entry.checked_sig, entry.reason = sig, result.reason
        if now - entry.changed_at >= self.quarantine_after_seconds and not entry.quarantined:
            entry.quarantined = True
            waited = now - entry.changed_at
            quarantined.append(Quarantined(path, f"incomplete after {waited:.0f} s: {entry.reason}"))
