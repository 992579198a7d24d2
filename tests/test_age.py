"""Isochrone age fits on synthetic clusters drawn straight from the PARSEC isochrones.

Truth comes from the isochrones themselves (tests/synthetic_cmd.py): IMF
sampling, 30% unresolved binaries, errors growing to 0.05 mag at the faint
limit, distance, reddening and an unknown zeropoint offset the fitter is not told.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from reduction.age import COLOR_SCALE_RANGE, ISOCHRONE_SET, fit_age
from synthetic_cmd import synthetic_cmd

DISTANCE_MODULUS, EBV = 10.3, 0.2
ZEROPOINT = (-3.7, 0.3)          # instrumental magnitude offset (V) and colour offset


def _fit(cat: dict, **kwargs):
    return fit_age(cat["color"], cat["mag"], cat["color_err"], cat["mag_err"], cat["usable"],
                   bootstrap=kwargs.pop("bootstrap", 10), rng=kwargs.pop("rng", 3), **kwargs)


@pytest.mark.parametrize("log_age", [7.7, 8.5, 9.3])
def test_age_recovered_with_unknown_zeropoints(log_age):
    cat = synthetic_cmd(log_age, 1000, distance_modulus=DISTANCE_MODULUS, ebv=EBV, zeropoint=ZEROPOINT,
                        rng=11)
    fit = _fit(cat)
    assert abs(fit.log_age - log_age) < 0.05
    assert fit.log_age_low <= log_age <= fit.log_age_high
    # The shifts absorb distance, reddening and zeropoints together.
    assert fit.dmag == pytest.approx(DISTANCE_MODULUS + 3.1 * EBV + ZEROPOINT[0], abs=0.1)
    assert fit.dcolor == pytest.approx(EBV + ZEROPOINT[1], abs=0.03)
    assert not fit.calibrated_zeropoints and "zeropoint" in fit.note
    # Turn-off on the observed axes: at the bluest point of the fitted main sequence.
    members = cat["mag"] < fit.turnoff[1] + 1.0
    assert fit.turnoff[0] < np.median(cat["color"][members]) + 0.05


def test_field_stars_and_saturation():
    cat = synthetic_cmd(8.5, 700, distance_modulus=DISTANCE_MODULUS, ebv=EBV, zeropoint=ZEROPOINT,
                        field_fraction=0.3, saturation=10.0, rng=5)
    assert (~cat["usable"]).sum() > 3           # some stars are saturated (garbage magnitudes)
    fit = _fit(cat)
    assert abs(fit.log_age - 8.5) < 0.15
    assert fit.log_age_low <= 8.5 <= fit.log_age_high
    assert 0.15 < fit.field_fraction < 0.45
    assert fit.n_stars < cat["usable"].sum()    # faint end cut for incompleteness


def test_calibrated_physical_quantities_and_json():
    cat = synthetic_cmd(9.0, 800, distance_modulus=DISTANCE_MODULUS, ebv=EBV, rng=7)
    fit = _fit(cat, calibrated=True, bootstrap=0)
    assert abs(fit.log_age - 9.0) < 0.05
    assert fit.distance_modulus == pytest.approx(DISTANCE_MODULUS, abs=0.15)
    assert fit.ebv == pytest.approx(EBV, abs=0.03)
    record = json.loads(json.dumps(fit.to_json()))
    assert record["isochrone_set"] == ISOCHRONE_SET
    assert record["calibrated_zeropoints"] is True
    assert record["age_myr_low"] <= record["age_myr"] <= record["age_myr_high"]
    assert len(fit.iso_color) == len(fit.iso_mag) > 50


def test_fixed_distance_and_reddening():
    cat = synthetic_cmd(8.0, 600, distance_modulus=DISTANCE_MODULUS, ebv=EBV, rng=9)
    fit = _fit(cat, calibrated=True, distance_modulus=DISTANCE_MODULUS, ebv=EBV, bootstrap=0)
    assert abs(fit.log_age - 8.0) < 0.05
    assert fit.distance_modulus == pytest.approx(DISTANCE_MODULUS)
    assert fit.ebv == pytest.approx(EBV)


def test_too_few_stars():
    with pytest.raises(ValueError, match="usable stars"):
        fit_age(np.zeros(5), np.zeros(5), np.ones(5), np.ones(5), np.ones(5, bool))


@pytest.mark.parametrize("age_myr", [150.0, 2000.0])
def test_simulator_truth_catalogue(age_myr):
    """The simulator's own cluster + realistic field (old populations along the line of sight)."""
    simulator = pytest.importorskip("observer.simulator")
    settings = simulator.SimSettings(age_myr=age_myr, seed=4)
    truth = simulator.make_stars(settings)
    on_grid = ((truth["x"] >= 0) & (truth["x"] <= settings.size - 1)
               & (truth["y"] >= 0) & (truth["y"] <= settings.size - 1) & (truth["mag_green"] < 21.0))
    truth = truth[on_grid]
    rng = np.random.default_rng(2)
    blue, green = np.asarray(truth["mag_blue"], float), np.asarray(truth["mag_green"], float)
    err_b, err_g = (np.hypot(0.005, 0.05 * 10 ** (0.4 * (m - 21.0))) for m in (blue, green))
    blue = blue + rng.normal(0, 1, blue.size) * err_b + ZEROPOINT[0] + ZEROPOINT[1]
    green = green + rng.normal(0, 1, green.size) * err_g + ZEROPOINT[0]
    fit = fit_age(blue - green, green, np.hypot(err_b, err_g), err_g, np.ones(green.size, bool),
                  bootstrap=10, rng=1)
    log_age = truth.meta["log_age"]
    assert abs(fit.log_age - log_age) < 0.05
    assert fit.log_age_low <= log_age <= fit.log_age_high
    assert 0.1 < fit.field_fraction < 0.5        # about a third of the stars are field stars


def test_saturated_turnoff_gives_a_wide_honest_interval():
    """With everything above M_V ~ 3 saturated, a 300 Myr cluster's sequence looks like any
    age from ~100 Myr to ~1 Gyr: the interval must say so rather than pretend precision."""
    cat = synthetic_cmd(8.5, 700, distance_modulus=DISTANCE_MODULUS, ebv=EBV, zeropoint=ZEROPOINT,
                        field_fraction=0.3, saturation=10.2, rng=5)
    fit = _fit(cat)
    assert fit.log_age_low <= 8.5 <= fit.log_age_high
    assert fit.log_age_high - fit.log_age_low > 0.4


def _plummer_positions(n: int, scale: float, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Positions of a projected Plummer cluster at the frame centre, redrawn until inside the frame."""
    x, y = np.full(n, -1.0), np.full(n, -1.0)
    out = np.ones(n, bool)
    while out.any():
        u = rng.uniform(0.0, 1.0, out.sum())
        r = scale * np.sqrt(1.0 / u - 1.0)        # inverse of the projected mass fraction R^2 / (R^2 + a^2)
        phi = rng.uniform(0.0, 2 * np.pi, out.sum())
        x[out], y[out] = (size - 1) / 2 + r * np.cos(phi), (size - 1) / 2 + r * np.sin(phi)
        out = (x < 0) | (x > size - 1) | (y < 0) | (y > size - 1)
    return x, y


def test_spatial_prior_removes_a_contaminating_field_sequence():
    """40% field stars spread evenly over a 2048 px frame, from a 1 Gyr population at the cluster's
    distance: in the diagram their sequence continues a 2 Gyr cluster's main sequence above its turn-off
    and pulls the diagram-only fit to a younger isochrone (as the simulator's old field's blue plume did
    on pipeline catalogues).  The members' concentration to the centre tells them apart."""
    size, n_members, n_field = 2048, 600, 400
    rng = np.random.default_rng(1)
    cluster = synthetic_cmd(9.3, n_members, distance_modulus=DISTANCE_MODULUS, ebv=EBV, zeropoint=ZEROPOINT, rng=rng)
    field = synthetic_cmd(9.0, n_field, distance_modulus=DISTANCE_MODULUS, ebv=EBV, zeropoint=ZEROPOINT, rng=rng)
    cat = {key: np.concatenate([cluster[key], field[key]]) for key in cluster}
    member = np.arange(n_members + n_field) < n_members
    x, y = _plummer_positions(n_members, 0.1 * size, size, rng)
    x = np.concatenate([x, rng.uniform(0, size - 1, n_field)])
    y = np.concatenate([y, rng.uniform(0, size - 1, n_field)])

    assert abs(_fit(cat).log_age - 9.3) > 0.2          # the premise: the diagram alone is fooled
    fit = _fit(cat, x=x, y=y)
    assert abs(fit.log_age - 9.3) < 0.1
    assert fit.log_age_low <= 9.3 <= fit.log_age_high
    assert fit.spatial is not None and "spatial_prior" in fit.to_json()
    assert np.hypot(fit.spatial.x0 - (size - 1) / 2, fit.spatial.y0 - (size - 1) / 2) < 50
    prior = fit.membership_prior
    used = np.isfinite(prior)
    assert used.sum() == fit.n_stars
    p_member, p_field = prior[used & member], prior[used & ~member]
    auc = (p_member[:, None] > p_field[None, :]).mean()
    assert auc > 0.8
    assert p_member.mean() - p_field.mean() > 0.3
    # The posterior (position and diagram) separates them at least as well.
    post = fit.membership
    assert np.nanmean(post[member]) - np.nanmean(post[~member]) > 0.3


def test_positions_without_concentration_change_little():
    """Members and field both spread evenly: the positions carry no membership information and
    the fit must stay as good as without them."""
    rng = np.random.default_rng(4)
    cat = synthetic_cmd(8.5, 700, distance_modulus=DISTANCE_MODULUS, ebv=EBV, zeropoint=ZEROPOINT,
                        field_fraction=0.3, rng=rng)
    x, y = rng.uniform(0, 2047, cat["mag"].size), rng.uniform(0, 2047, cat["mag"].size)
    fit = _fit(cat, x=x, y=y)
    assert fit.spatial is None and np.isnan(fit.membership_prior).all()   # no concentration found
    assert abs(fit.log_age - 8.5) < 0.1
    assert fit.log_age_low <= 8.5 <= fit.log_age_high


# Off the grid in every parameter: ages between nodes, [M/H] between the grid's -0.5 and 0 (or past
# its solar end) and a colour system stretched or squeezed by up to 7 %, as non-Johnson filters give.
OFF_GRID = [(7.93, -0.4, 0.93), (8.37, -0.1, 1.07), (8.88, 0.05, 0.95), (9.33, -0.3, 1.04)]


@pytest.mark.parametrize("log_age, mh, scale", OFF_GRID)
def test_interval_holds_the_truth_with_unknown_metallicity_and_colour_scale(log_age, mh, scale):
    """The small version of bench/age_coverage.py: the 95 % interval holds the truth, the colour scale
    is recovered; the old [M/H] = -0.3 cluster (the issue's real-night case) also within its 68 %."""
    cat = synthetic_cmd(log_age, 500, mh=mh, distance_modulus=DISTANCE_MODULUS, ebv=EBV, zeropoint=ZEROPOINT,
                        field_fraction=0.15, rng=21)
    fit = fit_age(scale * cat["color"], cat["mag"], scale * cat["color_err"], cat["mag_err"], cat["usable"],
                  fit_mh=True, color_scale=COLOR_SCALE_RANGE, bootstrap=30, rng=5)
    # 500 stars with [M/H] and the colour scale free hold the age to about 0.1 dex (a flat profile
    # over 8.2-8.45 for the 8.37 cluster: the intervals say so).
    assert abs(fit.log_age - log_age) < 0.2
    assert fit.log_age_low95 <= log_age <= fit.log_age_high95
    assert fit.log_age_low95 < fit.log_age_low < fit.log_age < fit.log_age_high < fit.log_age_high95
    assert fit.color_scale == pytest.approx(scale, abs=0.03)
    if mh == -0.3:
        assert fit.log_age_low <= log_age <= fit.log_age_high
    record = fit.to_json()
    assert record["confidence"] == {"log_age_low/high": 0.68, "log_age_low95/high95": 0.95}
    assert record["systematic_dex"] == 0.05 and record["color_scale"] == pytest.approx(scale, abs=0.03)
