"""The King spatial prior of the age fit (reduction/membership.py)."""

import numpy as np
import pytest

from reduction.membership import _king, spatial_profile


def test_king_profile_survives_a_tidal_radius_far_out():
    """The simplex can send the tidal radius to 1e200 core radii; squaring that ratio overflowed a Python
    float and ended an age fit with a traceback (seen in the tmux dashboard test)."""
    d = np.array([0.0, 1.0, 10.0])
    far = _king(d, np.zeros(3), 1.0, 1e200)
    assert np.all(np.isfinite(far))
    # With the tidal radius at infinity the profile is 1 / (1 + r^2) exactly.
    assert far == pytest.approx(1.0 / (1.0 + d ** 2), rel=1e-12)
    assert _king(np.array([0.0]), np.zeros(1), 2.0, 2.0)[0] == pytest.approx((1 - 0.5 ** 0.5) ** 2)


def test_spatial_profile_finds_a_king_cluster_in_a_field():
    """300 members (core 20 px) on 300 field stars over 512 px: centre within a few px, fraction near a half."""
    rng = np.random.default_rng(4)
    r = 20.0 * np.sqrt(rng.uniform(0, 1, 300) ** -1.0 - 1.0)        # Plummer-like radii, heavy enough core
    r = r[r < 200][:300]
    phi = rng.uniform(0, 2 * np.pi, len(r))
    x = np.r_[256 + r * np.cos(phi), rng.uniform(0, 512, 300)]
    y = np.r_[256 + r * np.sin(phi), rng.uniform(0, 512, 300)]
    fit = spatial_profile(x, y)
    assert abs(fit.x0 - 256) < 6 and abs(fit.y0 - 256) < 6
    assert 0.35 < fit.cluster_fraction < 0.65
