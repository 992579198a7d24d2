"""A simulated cluster diagram straight from the isochrones, with known truth (tests and bench/age_peer.py)."""

from __future__ import annotations

import numpy as np

from reduction.cmd_model import combine_magnitudes
from reduction.isochrones import A_OVER_EBV, interpolated_isochrone


def synthetic_cmd(log_age: float, n_members: int = 1000, *, mh: float = 0.0, bands: tuple[str, str] = ("B", "V"),
                  distance_modulus: float = 10.0, ebv: float = 0.2, zeropoint: tuple[float, float] = (0.0, 0.0),
                  binary_fraction: float = 0.3, field_fraction: float = 0.0, faint_limit: float = 20.0,
                  saturation: float | None = None, rng: np.random.Generator | int | None = None) -> dict:
    """A simulated cluster diagram straight from the isochrones, with known truth.

    Why here: the tests and the peer benchmark need the same catalogue recipe.
    Members sample the IMF (inverse CDF of ``int_IMF``), a fraction are unresolved
    binaries (``q`` uniform), errors grow from 0.005 mag (bright) to 0.05 mag at
    ``faint_limit``; distance, reddening and a zeropoint offset (band2, colour) are
    applied; field stars are uniform in the members' box.  Stars brighter than
    ``saturation`` get garbage magnitudes and ``usable`` False, as a saturated star would.
    Returns arrays color, mag, color_err, mag_err, usable, member.
    """
    rng = np.random.default_rng(rng)
    iso = interpolated_isochrone(log_age, mh)
    keep = iso.label < 9
    mini, cum = iso.mini[keep], iso.int_imf[keep]
    inc = np.concatenate([[True], np.diff(cum) > 0])
    b1, b2 = iso.mags[bands[0]][keep], iso.mags[bands[1]][keep]
    k1, k2 = A_OVER_EBV[bands[0]], A_OVER_EBV[bands[1]]
    shift1 = distance_modulus + k1 * ebv + zeropoint[0] + zeropoint[1]
    shift2 = distance_modulus + k2 * ebv + zeropoint[0]
    chunks1, chunks2 = [], []
    got = 0
    while got < n_members:
        u = rng.uniform(cum[0], cum[-1], 20 * n_members)
        m = np.interp(u, cum[inc], mini[inc])
        inc_m = np.concatenate([[True], np.diff(mini) > 0])
        p1 = np.interp(m, mini[inc_m], b1[inc_m])
        p2 = np.interp(m, mini[inc_m], b2[inc_m])
        binary = rng.random(m.size) < binary_fraction
        m2 = rng.random(m.size) * m
        ok2 = binary & (m2 >= mini[0])
        p1[ok2] = combine_magnitudes(p1[ok2], np.interp(m2[ok2], mini[inc_m], b1[inc_m]))
        p2[ok2] = combine_magnitudes(p2[ok2], np.interp(m2[ok2], mini[inc_m], b2[inc_m]))
        vis = p2 + shift2 < faint_limit
        chunks1.append(p1[vis] + shift1)
        chunks2.append(p2[vis] + shift2)
        got += int(vis.sum())
    mag1 = np.concatenate(chunks1)[:n_members]
    mag2 = np.concatenate(chunks2)[:n_members]
    member = np.ones(n_members, bool)
    n_field = int(round(field_fraction / max(1 - field_fraction, 1e-9) * n_members))
    if n_field:
        col = mag1 - mag2
        fc = rng.uniform(col.min(), col.max(), n_field)
        fm = rng.uniform(mag2.min(), faint_limit, n_field)
        mag1 = np.concatenate([mag1, fm + fc])
        mag2 = np.concatenate([mag2, fm])
        member = np.concatenate([member, np.zeros(n_field, bool)])

    def err(m: np.ndarray) -> np.ndarray:
        return np.hypot(0.005, 0.05 * 10 ** (0.4 * (m - faint_limit)))

    e1, e2 = err(mag1), err(mag2)
    obs1 = mag1 + rng.normal(0, 1, mag1.size) * e1
    obs2 = mag2 + rng.normal(0, 1, mag2.size) * e2
    usable = np.ones(mag2.size, bool)
    if saturation is not None:
        sat = mag2 < saturation
        usable[sat] = False
        obs2[sat] = saturation + rng.uniform(0, 0.3, sat.sum())
        obs1[sat] = obs2[sat] + rng.uniform(-0.5, 1.5, sat.sum())
    return {"color": obs1 - obs2, "mag": obs2, "color_err": np.hypot(e1, e2), "mag_err": e2,
            "usable": usable, "member": member}
