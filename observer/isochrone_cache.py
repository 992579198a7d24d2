"""The parsed PARSEC table kept as a compressed ``.npz`` in the user's cache directory.

Why: parsing the 36 MB text table takes a few seconds; with the cache every later
start (simulator, age fit) costs well under a second.  ``reduction`` writes no
files, so the persistence lives here and is installed into
``reduction.isochrones`` when ``observer`` is imported.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from reduction.isochrones import COLUMNS, data_path, parse_table, set_table_loader

log = logging.getLogger(__name__)


def cache_path(source: Path) -> Path:
    """The cache file for one version (size) of the source table."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "observer"
    return base / f"parsec_ubvrijhk_{source.stat().st_size}.npz"


def cached_table() -> dict[str, np.ndarray]:
    """The table from the cache, parsed and cached (atomically) if missing or unreadable."""
    source = data_path()
    cache = cache_path(source)
    if cache.exists():
        try:
            with np.load(cache) as npz:
                return {name: npz[name] for name in COLUMNS}
        except (OSError, ValueError, KeyError) as exc:
            log.warning("isochrone cache %s unreadable (%s); re-parsing", cache, exc)
    columns = parse_table(source)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, **columns)
        os.replace(tmp, cache)
    except OSError as exc:
        log.warning("could not write isochrone cache %s: %s", cache, exc)
    return columns


def install() -> None:
    """Make ``reduction.isochrones`` load through the cache."""
    set_table_loader(cached_table)
