"""The dashboard's previews: block means of the image, NaN pixels left out."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from observer.snapshot import PREVIEW_SIDE, preview_of


def _nanmean_blocks(image: np.ndarray, factor: int) -> np.ndarray:
    """The definition, in float64: np.nanmean over each factor x factor block (the edge rows and
    columns that make no whole block left out)."""
    ny, nx = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    blocks = image[:ny, :nx].astype(np.float64).reshape(ny // factor, factor, nx // factor, factor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)         # "mean of empty slice": a block of NaN only
        return np.nanmean(blocks, axis=(1, 3))


@pytest.mark.parametrize("nans", [False, True])
@pytest.mark.parametrize("shape", [(2048, 2048), (1001, 1533), (100, 150)])
def test_preview_is_the_block_nanmean(shape: tuple[int, int], nans: bool) -> None:
    rng = np.random.default_rng(7)
    image = (rng.normal(0.0, 10.0, shape) + rng.uniform(-5, 500, (1, shape[1]))).astype(np.float32)
    factor = max(1, int(np.ceil(max(shape) / PREVIEW_SIDE)))
    if nans:
        image[: 3 * factor, : 2 * factor] = np.nan              # whole blocks of NaN
        image[rng.integers(0, shape[0], 500), rng.integers(0, shape[1], 500)] = np.nan
    preview, expected = preview_of(image), _nanmean_blocks(image, factor)
    assert preview.dtype == np.float32 and preview.shape == expected.shape
    assert np.array_equal(np.isnan(preview), np.isnan(expected))
    assert np.isnan(preview).any() == nans
    # float32 rounding of the mean: relative to the block's values, not to a mean that may be near 0
    scale = _nanmean_blocks(np.abs(image), factor)
    assert np.nanmax(np.abs(preview - expected) / scale) < 1e-6


def test_preview_of_integer_frames() -> None:
    raw = np.random.default_rng(8).integers(0, 65535, (2048, 2048)).astype(np.uint16)
    np.testing.assert_allclose(preview_of(raw), _nanmean_blocks(raw, 11), rtol=1e-7)
