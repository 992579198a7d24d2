"""Full-frame image kernels on OpenCV, with scipy.ndimage's border conventions.

Why: these filters run on every frame and on every stack, and OpenCV's
vectorised float32 kernels are 5-20x faster than the scipy.ndimage
equivalents on 2048 px frames (measured: Gaussian 107 -> 8.7 ms, separable
correlation 103 -> 4.1 ms, 3x3 maximum 152 -> 2.7 ms). Each function
names the scipy call whose result it reproduces, border included, so the
science does not change with the tool.
"""

from __future__ import annotations

import bottleneck as bn
import cv2
import numpy as np

#: scipy.ndimage.gaussian_filter's default kernel radius, in sigma.
GAUSSIAN_TRUNCATE = 4.0
_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
_SQUARE = np.ones((3, 3), np.uint8)


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def gaussian_blur(data: np.ndarray, sigma: float) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(data, sigma)`` (mode 'reflect', truncate 4) in float32."""
    radius = int(GAUSSIAN_TRUNCATE * float(sigma) + 0.5)
    size = 2 * radius + 1
    return cv2.GaussianBlur(_f32(data), (size, size), sigmaX=float(sigma), sigmaY=float(sigma),
                            borderType=cv2.BORDER_REFLECT)


def _gaussian_kernel(sigma: float, truncate: float) -> np.ndarray:
    """scipy.ndimage's 1-D Gaussian: radius int(truncate sigma + 0.5), normalised to sum 1."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / float(sigma)) ** 2) if sigma > 0 else (x == 0).astype(float)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur_zero(data: np.ndarray, sigma_yx: tuple[float, float], truncate: float = 4.0) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(data, sigma_yx, mode='constant', truncate=truncate)`` in float32:
    different widths along rows and columns, zero outside the image (the age fit's model images)."""
    ky, kx = (_gaussian_kernel(s, truncate) for s in sigma_yx)
    return cv2.sepFilter2D(_f32(data), cv2.CV_32F, kx, ky, borderType=cv2.BORDER_CONSTANT)


def correlate_separable(data: np.ndarray, k1: np.ndarray) -> np.ndarray:
    """Correlation with ``outer(k1, k1)``, zero outside the frame
    (two ``scipy.ndimage.correlate1d(..., mode='constant')`` passes)."""
    k = np.asarray(k1, np.float32)
    return cv2.sepFilter2D(_f32(data), cv2.CV_32F, k, k, borderType=cv2.BORDER_CONSTANT)


def maximum_3x3(data: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.maximum_filter(data, size=3)``: the largest value of each 3x3 neighbourhood,
    in the input's float type (so that ``data == maximum_3x3(data)`` finds the peaks)."""
    src = np.ascontiguousarray(data) if data.dtype in (np.float32, np.float64) else _f32(data)
    return cv2.dilate(src, _SQUARE, borderType=cv2.BORDER_REPLICATE)


def box_mean(data: np.ndarray, size: int) -> np.ndarray:
    """Mean over ``size`` x ``size`` boxes (odd ``size``); within ``size // 2`` of the edges the raw data."""
    src = _f32(data)
    out = cv2.blur(src, (size, size), borderType=cv2.BORDER_REPLICATE)
    r = size // 2
    if r:
        out[:r], out[-r:], out[:, :r], out[:, -r:] = src[:r], src[-r:], src[:, :r], src[:, -r:]
    return out


def dilate_mask(mask: np.ndarray, iterations: int) -> np.ndarray:
    """``scipy.ndimage.binary_dilation(mask, iterations=n)`` (the 4-connected cross, nothing from outside)."""
    if iterations <= 0:
        return np.asarray(mask, bool).copy()
    grown = cv2.dilate(np.asarray(mask, np.uint8), _CROSS, iterations=int(iterations),
                       borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return grown.astype(bool)


def dilate_labels(labels: np.ndarray, iterations: int) -> np.ndarray:
    """:func:`dilate_mask` of a label plane: each label grows into the background by ``iterations`` (the
    4-connected cross); where two meet, the larger takes the pixel. Exact below 2**24 labels (float32)."""
    grown = cv2.dilate(np.asarray(labels, np.float32), _CROSS, iterations=int(iterations),
                       borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return np.where(labels > 0, labels, grown.astype(labels.dtype))


def block_median(a: np.ndarray, box: int) -> np.ndarray:
    """Median over box x box blocks, expanded back to the full shape (robust to stars)."""
    ny, nx = a.shape
    by, bx = -(-ny // box), -(-nx // box)
    padded = np.full((by * box, bx * box), np.nan, dtype=np.float32)
    padded[:ny, :nx] = np.where(np.isfinite(a), a, np.nan)
    # bottleneck's C median: 15x numpy's nanmedian, which loops over the blocks in Python
    blocks = bn.nanmedian(padded.reshape(by, box, bx, box).transpose(0, 2, 1, 3).reshape(by, bx, -1), axis=2)
    return np.repeat(np.repeat(blocks, box, 0), box, 1)[:ny, :nx].astype(np.float32)
