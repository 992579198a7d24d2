"""PARSEC v1.2S isochrones (Johnson UBVRIJHK), read offline from ``uwastro465isos``.

The package's own ``Isochrone`` class relies on a pandas option that pandas 3
removed, so we read its data file directly. Parsing the 36 MB text table takes
a few seconds; ``reduction`` writes no files, so a caller that can persist the
parsed columns (``observer.isochrone_cache``) installs a loader with
``set_table_loader``; without one the table is parsed once per process.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: Columns kept from the PARSEC table (the rest are not needed for photometry).
COLUMNS = ("MH", "logAge", "Mini", "int_IMF", "Mass", "logL", "logTe", "label",
           "Umag", "Bmag", "Vmag", "Rmag", "Imag", "Jmag", "Hmag", "Kmag")

#: Extinction per unit E(B-V) for R_V = 3.1 (Cardelli, Clayton & Mathis 1989, Johnson bands).
A_OVER_EBV = {"U": 4.86, "B": 4.10, "V": 3.10, "R": 2.32, "I": 1.50, "J": 0.87, "H": 0.55, "K": 0.35}

#: PARSEC evolutionary stage labels: 0 pre-MS, 1 MS, 2 SGB, 3 RGB, 4-6 He burning, 7-8 AGB, 9 post-AGB.
LABEL_MAIN_SEQUENCE = 1


@dataclass(frozen=True)
class Isochrone:
    """One isochrone: a single (log age, [M/H]) track, ordered by initial mass."""

    log_age: float
    mh: float
    mini: np.ndarray
    int_imf: np.ndarray
    label: np.ndarray
    mags: dict[str, np.ndarray]

    def mag(self, band: str) -> np.ndarray:
        """Absolute magnitude in a Johnson band ("B", "V", ...)."""
        return self.mags[band]


def data_path() -> Path:
    """The PARSEC table shipped by ``uwastro465isos``."""
    from uwastro465isos.data import get_data_path

    return Path(get_data_path("isochrones_ubvrijhk.dat"))


def parse_table(source: Path) -> dict[str, np.ndarray]:
    """The PARSEC text table as flat float columns (see ``COLUMNS``)."""
    import pandas as pd

    header: list[str] | None = None
    with source.open() as fh:
        for line in fh:
            if line.startswith("#"):
                continue
            header = line.split()
            break
    if header is None:
        raise RuntimeError(f"{source}: no column header found")
    log.info("parsing PARSEC isochrones from %s", source)
    table = pd.read_csv(source, sep=r"\s+", comment="#", names=header, skiprows=1,
                        usecols=list(COLUMNS), engine="c", dtype=str)
    # The file repeats its column header between blocks: those rows are not numbers.
    numeric = table.apply(pd.to_numeric, errors="coerce").dropna()
    return {name: numeric[name].to_numpy(dtype=np.float64) for name in COLUMNS}


_loader: Callable[[], dict[str, np.ndarray]] = lambda: parse_table(data_path())  # noqa: E731


def set_table_loader(loader: Callable[[], dict[str, np.ndarray]]) -> None:
    """Where ``load_table`` gets the columns from (e.g. a disk cache); the table is re-read on next use."""
    global _loader
    _loader = loader
    load_table.cache_clear()
    grid.cache_clear()


@functools.lru_cache(maxsize=1)
def load_table() -> dict[str, np.ndarray]:
    """All isochrones as flat columns (see ``COLUMNS``), loaded once per process."""
    return _loader()


@functools.lru_cache(maxsize=1)
def grid() -> tuple[np.ndarray, np.ndarray]:
    """The (log age, [M/H]) values present in the table, each sorted and unique."""
    table = load_table()
    return np.unique(np.round(table["logAge"], 3)), np.unique(np.round(table["MH"], 3))


def get_isochrone(log_age: float, mh: float = 0.0) -> Isochrone:
    """The isochrone nearest to (log_age, mh) on the table's grid (0.05 dex in age)."""
    table = load_table()
    ages, mhs = grid()
    age = ages[np.argmin(np.abs(ages - log_age))]
    met = mhs[np.argmin(np.abs(mhs - mh))]
    sel = (np.abs(table["logAge"] - age) < 1e-3) & (np.abs(table["MH"] - met) < 1e-3)
    order = np.argsort(table["Mini"][sel], kind="stable")
    mags = {band: table[f"{band}mag"][sel][order] for band in A_OVER_EBV}
    return Isochrone(log_age=float(age), mh=float(met), mini=table["Mini"][sel][order],
                     int_imf=table["int_IMF"][sel][order], label=table["label"][sel][order], mags=mags)


#: How far beyond the grid's richest (and poorest) [M/H] an isochrone may be extrapolated (dex):
#: open clusters reach +0.1-0.3, past the grid's solar end.
MH_EXTRAPOLATION = 0.3


def interpolated_isochrone(log_age: float, mh: float = 0.0) -> Isochrone:
    """An isochrone at any log age inside the grid and any [M/H] near it, between neighbouring nodes.

    Why: a simulated cluster drawn from the nearest node puts the truth on the grid, so a
    fit that only searches the grid is rewarded by construction; and a fit limited to the
    grid's 0.5 dex steps in [M/H] cannot follow a cluster at -0.3. Points are matched by
    evolutionary phase, not by initial mass (``_blend``): first in log age at the two
    [M/H] nodes around ``mh``, then between those in [M/H]. Beyond the grid's ends [M/H]
    is extrapolated linearly from the two end nodes, by at most ``MH_EXTRAPOLATION``.
    """
    _, mhs = grid()
    if not mhs[0] - MH_EXTRAPOLATION - 1e-9 <= mh <= mhs[-1] + MH_EXTRAPOLATION + 1e-9:
        raise ValueError(f"[M/H] {mh} is outside {mhs[0] - MH_EXTRAPOLATION}..{mhs[-1] + MH_EXTRAPOLATION}")
    node = np.flatnonzero(np.abs(mhs - mh) < 1e-6)
    if node.size or mhs.size < 2:
        return _age_interpolated(log_age, float(mhs[node[0]] if node.size else mhs[0]))
    i = int(np.clip(np.searchsorted(mhs, mh) - 1, 0, mhs.size - 2))
    lo, hi = float(mhs[i]), float(mhs[i + 1])
    out = _blend(_age_interpolated(log_age, lo), _age_interpolated(log_age, hi), (mh - lo) / (hi - lo))
    return Isochrone(log_age=out.log_age, mh=float(mh), mini=out.mini, int_imf=out.int_imf, label=out.label,
                     mags=out.mags)


def _age_interpolated(log_age: float, mh: float) -> Isochrone:
    """The isochrone at ``log_age`` between the two age nodes around it, at the grid [M/H] ``mh``."""
    ages, _ = grid()
    below = ages[ages <= log_age + 1e-9]
    if below.size == 0 or below[-1] == ages[-1] or abs(below[-1] - log_age) < 1e-6:
        return get_isochrone(log_age, mh)
    lo, hi = float(below[-1]), float(ages[ages > below[-1]][0])
    out = _blend(get_isochrone(lo, mh), get_isochrone(hi, mh), (log_age - lo) / (hi - lo))
    return Isochrone(log_age=float(log_age), mh=out.mh, mini=out.mini, int_imf=out.int_imf, label=out.label,
                     mags=out.mags)


def _blend(a: Isochrone, b: Isochrone, t: float) -> Isochrone:
    """``(1 - t) a + t b``, point by point within each evolutionary stage (``label``).

    Within a stage both isochrones are resampled at the same fractions of the stage's
    initial-mass range (the union of both: the upper main sequence is a sliver of mass),
    so a turn-off is interpolated with a turn-off, not with a subgiant of the same mass.
    A stage only one of them has (e.g. not yet reached) is left out.
    """
    bands = list(a.mags)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ("mini", "int_imf", "label", *bands)}
    stage_a, stage_b = _stages(a.label), _stages(b.label)
    for stage in np.unique(stage_a):
        sa, sb = np.flatnonzero(stage_a == stage), np.flatnonzero(stage_b == stage)
        if sa.size < 2 or sb.size < 2:
            continue
        fa, fb = _stage_fraction(a.mini[sa]), _stage_fraction(b.mini[sb])
        u = np.union1d(fa, fb)
        for name, va, vb in [("mini", a.mini, b.mini), ("int_imf", a.int_imf, b.int_imf),
                             *((band, a.mags[band], b.mags[band]) for band in bands)]:
            parts[name].append((1 - t) * np.interp(u, fa, va[sa]) + t * np.interp(u, fb, vb[sb]))
        # each point keeps the PARSEC label of the nearest point of ``a`` (pre-MS or MS in stage 1)
        nearest = np.clip(np.searchsorted(fa, u), 0, sa.size - 1)
        parts["label"].append(a.label[sa][nearest])
    merged = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    order = np.argsort(merged["mini"], kind="stable")
    # int_IMF must keep growing with mass: an extrapolation (t > 1) could make it dip.
    int_imf = np.maximum.accumulate(merged["int_imf"][order])
    return Isochrone(log_age=(1 - t) * a.log_age + t * b.log_age, mh=(1 - t) * a.mh + t * b.mh,
                     mini=merged["mini"][order], int_imf=int_imf, label=merged["label"][order],
                     mags={band: merged[band][order] for band in bands})


def _stages(label: np.ndarray) -> np.ndarray:
    """The stages points are matched within: PARSEC's labels, with the pre-main sequence (0) and the
    main sequence (1) as one.

    Why: PARSEC labels unevolved low-mass stars of old isochrones 0 up to a mass that jumps from node
    to node (1.15 Msun at log age 8.55, 0.85 at 8.60, overlapping label 1 from 0.9), so matching the
    two labels apart paired a 1.05 with a 0.77 Msun star and bent the lower main sequence off itself.
    """
    return np.where(label == 0, 1, label)


def _stage_fraction(mini: np.ndarray) -> np.ndarray:
    """Where each point of one evolutionary stage lies in the stage's initial-mass range (0..1)."""
    if mini[-1] > mini[0]:
        return (mini - mini[0]) / (mini[-1] - mini[0])
    return np.linspace(0.0, 1.0, mini.size)
