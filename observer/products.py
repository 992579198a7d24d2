"""Atomic writers for every product observer publishes.

The dashboard, an observer's image viewer or a script may read a product at any
instant, including while the service is rewriting it after a frame. Writing in
place would let them see a half-written file (a truncated FITS, an ECSV with
half its rows). So every product is written to a temporary file in the *same*
folder (``os.replace`` is only atomic within one file system), flushed, then
renamed over the old one: a reader sees the old version or the new one, never a
mixture, and a crash (even ``kill -9``) leaves at worst a stray temporary file,
never a damaged product.

Products are not fsynced: that would cost up to a second per 4096 px stack on
the frame's path, and they need no durability of their own, since a restart
rewrites every stack and catalogue from the checkpoint (``observer.checkpoint``,
which is fsynced). ``kill -9`` loses nothing written: the page cache survives it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

#: Prefix of temporary files, so that a stray one left by a crash is recognisable (and ignorable).
TEMP_PREFIX = ".observer-tmp-"


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` atomically when the block ends without error.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=path.suffix, dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
        # mkstemp creates the file 0600; products are meant to be read by others too.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path) as handle:
        handle.write(data)
    return Path(path)


def atomic_write_fits(path: str | Path, hdulist: Any) -> Path:
    """Write an ``astropy.io.fits.HDUList`` (or a single HDU) atomically.

    Written straight into the temporary file (no in-memory copy): a 4096 px
    stack with its NFRAMES extension is ~100 MB.
    """
    with atomic_open(path) as handle:
        hdulist.writeto(handle, output_verify="fix")
    return Path(path)


def atomic_link(source: str | Path, path: str | Path) -> Path:
    """Make ``path`` name the bytes of ``source`` atomically: a hard link (a copy where links fail).

    For a product that is another product under a second name (``stack.fits`` and the longest
    group's ``stack_<EXPTIME>s.fits``): no second serialisation of a 100 MB stack.
    """
    path = Path(path)
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, path)
    return path


def atomic_write_table(path: str | Path, table: Any, format: str = "ascii.ecsv") -> Path:
    """Write an ``astropy.table.Table`` atomically (ECSV by default; astropy's text writers want a text stream)."""
    text = io.StringIO()
    table.write(text, format=format)
    return atomic_write_bytes(path, text.getvalue().encode("utf-8"))


def atomic_savefig(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """Save a matplotlib figure atomically; the format follows the file's suffix unless given."""
    fmt = kwargs.pop("format", None) or (Path(path).suffix.lstrip(".") or "png")
    with atomic_open(path) as handle:
        fig.savefig(handle, format=fmt, **kwargs)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any, **kwargs: Any) -> Path:
    """Write ``obj`` as JSON atomically (indented, keys sorted, so diffs between versions read well)."""
    kwargs.setdefault("indent", 2)
    kwargs.setdefault("sort_keys", True)
    return atomic_write_bytes(path, (json.dumps(obj, **kwargs) + "\n").encode("utf-8"))
