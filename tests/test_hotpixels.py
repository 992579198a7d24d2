"""Hot pixels: found everywhere (corners, edges, interior), never on stars; repaired; remembered per camera."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from reduction.hotpixels import HotPixelMap, find_hot_pixels, repair_pixels
from test_quality import moffat_field

N = 384


def _hot_positions(n: int, rng: np.random.Generator) -> np.ndarray:
    """The four corners, pixels on every edge, and interior ones: (M, 2) as (x, y)."""
    corners = [(0, 0), (n - 1, 0), (0, n - 1), (n - 1, n - 1)]
    edges = [(int(v), 0) for v in rng.integers(2, n - 2, 8)] + [(int(v), n - 1) for v in rng.integers(2, n - 2, 8)]
    edges += [(0, int(v)) for v in rng.integers(2, n - 2, 8)] + [(n - 1, int(v)) for v in rng.integers(2, n - 2, 8)]
    interior = [(int(x), int(y)) for x, y in rng.integers(1, n - 1, (170, 2))]
    return np.unique(np.array(corners + edges + interior), axis=0)


@pytest.fixture(scope="module")
def frame_with_hot_pixels():
    """Stars as sharp as FWHM 2 px plus hot pixels from 12 to 1000 sky sigmas."""
    rng = np.random.default_rng(21)
    img, sky, stars = moffat_field(N, 120, fwhm=2.0, seed=21, flux_range=(2e3, 5e5))
    hot = _hot_positions(N, rng)
    # keep hot pixels off the star cores (a hot pixel inside a star is a different question)
    hot = hot[cKDTree(stars[:, :2]).query(hot)[0] > 4]
    amplitude = np.exp(rng.uniform(np.log(12), np.log(1000), len(hot))) * 40.0  # sky noise ~40 ADU
    dirty = img.copy()
    dirty[hot[:, 1], hot[:, 0]] += amplitude.astype(np.float32)
    return img, dirty, hot, stars


def test_hot_pixels_found_at_corners_edges_and_interior(frame_with_hot_pixels):
    _, dirty, hot, stars = frame_with_hot_pixels
    mask = find_hot_pixels(dirty, sigma=6.0, box=5)
    found = mask[hot[:, 1], hot[:, 0]]
    assert found.mean() >= 0.99
    corners = [(0, 0), (N - 1, 0), (0, N - 1), (N - 1, N - 1)]
    assert all(mask[y, x] for x, y in corners)
    edge = (hot[:, 0] == 0) | (hot[:, 1] == 0) | (hot[:, 0] == N - 1) | (hot[:, 1] == N - 1)
    assert found[edge].all()
    # no star flagged: nothing else within 3 px of a star centre
    injected = np.zeros_like(mask)
    injected[hot[:, 1], hot[:, 0]] = True
    extra = np.argwhere(mask & ~injected)[:, ::-1]
    assert len(extra) <= 2  # pure noise almost never makes a 6-sigma spike
    if len(extra):
        assert (cKDTree(stars[:, :2]).query(extra)[0] > 3).all()


def test_clean_frame_with_stars_gives_no_flags(frame_with_hot_pixels):
    img, _, _, _ = frame_with_hot_pixels
    assert find_hot_pixels(img).sum() <= 2


def test_repair_restores_the_sky(frame_with_hot_pixels):
    img, dirty, hot, _ = frame_with_hot_pixels
    mask = find_hot_pixels(dirty)
    fixed = repair_pixels(dirty, mask)
    assert fixed is not dirty and fixed.dtype == np.float32
    err = fixed[hot[:, 1], hot[:, 0]] - img[hot[:, 1], hot[:, 0]]
    assert np.percentile(np.abs(err), 95) < 5 * 40.0
    untouched = ~mask
    np.testing.assert_array_equal(fixed[untouched], dirty[untouched])


def test_repair_of_a_cluster_of_pixels():
    data = np.full((20, 20), 100.0, dtype=np.float32)
    mask = np.zeros_like(data, dtype=bool)
    mask[0:4, 0:4] = True  # a corner block: some pixels have no unmasked 8-neighbour
    data[mask] = 1e5
    fixed = repair_pixels(data, mask)
    np.testing.assert_array_equal(fixed, 100.0)


def test_hot_pixel_map_keeps_fixed_pixels_not_moving_ones(frame_with_hot_pixels):
    _, _, hot, _ = frame_with_hot_pixels
    hpm = HotPixelMap((N, N))
    rng = np.random.default_rng(3)
    cosmics = []
    for i in range(4):
        img, _, _ = moffat_field(N, 60, fwhm=2.5, seed=100 + i)  # stars move frame to frame
        img[hot[:, 1], hot[:, 0]] += 5000.0
        cr = rng.integers(0, N, (10, 2))
        img[cr[:, 1], cr[:, 0]] += 8000.0
        cosmics.append(cr)
        hpm.update(find_hot_pixels(img))
        if i < 2:
            assert not hpm.mask.any()  # too few frames to tell hot pixels from cosmic rays
    mask = hpm.mask
    assert mask[hot[:, 1], hot[:, 0]].mean() >= 0.99
    cr = np.concatenate(cosmics)
    assert mask[cr[:, 1], cr[:, 0]].sum() == 0
    assert mask.sum() == pytest.approx(len(hot), abs=2)


def test_hot_pixel_map_from_a_dark_and_state_round_trip(tmp_path):
    rng = np.random.default_rng(8)
    dark = rng.normal(0.5, 0.05, (64, 64)).astype(np.float32)
    dark[[0, 10, 63], [0, 20, 63]] = [5.0, 8.0, 3.0]
    hpm = HotPixelMap((64, 64))
    assert hpm.add_dark(dark) == 3
    hpm.update(np.eye(64, dtype=bool))
    path = tmp_path / "hot.npz"
    np.savez(path, **hpm.state())
    with np.load(path) as npz:
        back = HotPixelMap.from_state(dict(npz))
    for key, value in hpm.state().items():
        np.testing.assert_array_equal(back.state()[key], value)
    np.testing.assert_array_equal(back.mask, hpm.mask)
    assert back.mask[10, 20] and back.mask[63, 63] and not back.mask[5, 5]
    with pytest.raises(ValueError, match="shape"):
        hpm.update(np.zeros((10, 10), dtype=bool))


@pytest.mark.parametrize("fwhm", [1.2, 1.4, 1.7])
def test_undersampled_stars_are_not_hot_pixels(fwhm):
    """At FWHM 1.2-1.7 px a star's second brightest neighbour can be a quarter of its peak; its
    direct neighbours still hold its profile, so its core is not taken for a hot pixel."""
    rng = np.random.default_rng(5)
    img, _, stars = moffat_field(N, 150, fwhm=fwhm, seed=7, flux_range=(2e3, 5e5))
    hot = np.unique(rng.integers(3, N - 3, (60, 2)), axis=0)
    hot = hot[cKDTree(stars[:, :2]).query(hot)[0] > 4]
    dirty = img.copy()
    dirty[hot[:, 1], hot[:, 0]] += np.float32(40.0 * 50)
    mask = find_hot_pixels(dirty, sigma=6.0, box=5)
    assert mask[hot[:, 1], hot[:, 0]].mean() >= 0.98
    cores = np.rint(stars[:, :2]).astype(int)
    inside = (cores >= 0).all(axis=1) & (cores < N).all(axis=1)
    near_star = np.zeros_like(mask)
    for x, y in cores[inside]:
        near_star[max(0, y - 1):y + 2, max(0, x - 1):x + 2] = True
    assert int((mask & near_star).sum()) <= 1
