"""Registration: star-pattern matching recovers known transforms; unrelated fields are refused.

Synthetic frames are rendered here (Moffat stars, Poisson + read noise) so the truth is exact.
The helpers ``render_frame`` and ``detect`` are reused by test_stacking.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from reduction.registration import RegistrationError, Transform, find_transform, warp_to_reference

SIZE = 512
GAIN = 1.5
READ_NOISE = 9.0
SKY = 300.0


def star_field(rng: np.random.Generator, n: int = 150, size: int = SIZE, margin: float = 6.0
               ) -> tuple[np.ndarray, np.ndarray]:
    """Random star positions (n, 2) and fluxes (ADU) with a steep luminosity function."""
    xy = rng.uniform(margin, size - 1 - margin, (n, 2))
    flux = 10 ** rng.uniform(3.0, 5.3, n)
    return xy, flux


def moffat_image(xy: np.ndarray, flux: np.ndarray, shape: tuple[int, int], fwhm: float = 3.5,
                 beta: float = 3.0, half: int = 12) -> np.ndarray:
    """Noise-free image of Moffat stars (total flux ``flux``, truncated at ``half`` px)."""
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    norm = (beta - 1.0) / (math.pi * alpha ** 2)
    img = np.zeros(shape, np.float64)
    oy, ox = np.mgrid[-half:half + 1, -half:half + 1]
    for (x, y), f in zip(xy, flux, strict=True):
        ix, iy = int(round(x)), int(round(y))
        y0, y1 = max(iy - half, 0), min(iy + half + 1, shape[0])
        x0, x1 = max(ix - half, 0), min(ix + half + 1, shape[1])
        if y1 <= y0 or x1 <= x0:
            continue
        sy = slice(y0 - (iy - half), y1 - (iy - half))
        sx = slice(x0 - (ix - half), x1 - (ix - half))
        r2 = (ox[sy, sx] + ix - x) ** 2 + (oy[sy, sx] + iy - y) ** 2
        img[y0:y1, x0:x1] += f * norm * (1.0 + r2 / alpha ** 2) ** -beta
    return img


def render_frame(rng: np.random.Generator, xy_ref: np.ndarray, flux: np.ndarray,
                 transform: Transform | None = None, shape: tuple[int, int] = (SIZE, SIZE),
                 fwhm: float = 3.5, sky: float = SKY, noise: bool = True, beta: float = 3.0) -> np.ndarray:
    """Background-subtracted frame (ADU) of stars at reference positions seen through ``transform``
    (Moffat ``beta``; a large one is a Gaussian)."""
    xy = transform.apply(xy_ref) if transform is not None else xy_ref
    img = moffat_image(xy, flux, shape, fwhm=fwhm, beta=beta) + sky
    if noise:
        img = rng.poisson(img * GAIN) / GAIN + rng.normal(0.0, READ_NOISE / GAIN, shape)
    return (img - sky).astype(np.float32)


def noise_sigma(sky: float = SKY) -> float:
    """Per-pixel noise (ADU) of a blank sky pixel of ``render_frame``."""
    return math.sqrt(sky / GAIN + (READ_NOISE / GAIN) ** 2)


def detect(img: np.ndarray, sigma: float, fwhm: float = 3.5, nsig: float = 8.0
           ) -> tuple[np.ndarray, np.ndarray]:
    """Simple detection: local maxima of the smoothed image, Gaussian-windowed centroids (XWIN-like).

    Returns (xy (N, 2), flux) brightest first.
    """
    smooth = ndimage.gaussian_filter(img.astype(np.float64), fwhm / 2.355)
    peak = (smooth == ndimage.maximum_filter(smooth, 7)) & (smooth > nsig * sigma / 2.0)
    ys, xs = np.nonzero(peak)
    h, s2 = 6, (fwhm / 2.355) ** 2
    keep = (xs >= h) & (xs < img.shape[1] - h) & (ys >= h) & (ys < img.shape[0] - h)
    xs, ys = xs[keep].astype(float), ys[keep].astype(float)
    oy, ox = np.mgrid[-h:h + 1, -h:h + 1]
    out_xy, out_f = [], []
    for x, y in zip(xs, ys, strict=True):
        ix, iy = int(x), int(y)
        stamp = img[iy - h:iy + h + 1, ix - h:ix + h + 1].astype(np.float64)
        cx, cy = float(ix), float(iy)
        for _ in range(10):
            w = np.exp(-((ox + ix - cx) ** 2 + (oy + iy - cy) ** 2) / (2 * s2)) * stamp
            tot = w.sum()
            if tot <= 0:
                break
            nx, ny = (w * (ox + ix)).sum() / tot, (w * (oy + iy)).sum() / tot
            # the windowed centroid converges to the true centre with a step of 2x the shift
            cx, cy = cx + 2 * (nx - cx), cy + 2 * (ny - cy)
            if abs(nx - cx) < 1e-4 and abs(ny - cy) < 1e-4:
                break
        if abs(cx - ix) < 2 and abs(cy - iy) < 2:
            out_xy.append((cx, cy))
            out_f.append(stamp.sum())
    xy, f = np.array(out_xy).reshape(-1, 2), np.array(out_f)
    order = np.argsort(-f)
    return xy[order], f[order]


def _spurious(rng: np.random.Generator, n: int, fmin: float, fmax: float) -> tuple[np.ndarray, np.ndarray]:
    """Hot pixels / cosmic rays as detections: random positions, fluxes spread over the stars' range."""
    return rng.uniform(0, SIZE - 1, (n, 2)), 10 ** rng.uniform(math.log10(fmin), math.log10(fmax), n)


def _catalogue(rng: np.random.Generator, xy: np.ndarray, flux: np.ndarray, keep_frac: float,
               n_spurious: int) -> tuple[np.ndarray, np.ndarray]:
    """A detection list: a random ``keep_frac`` of the stars with centroid noise, plus spurious points."""
    keep = rng.random(len(xy)) < keep_frac
    # centroid error of a FWHM 3.5 px star on this sky: sky-limited (~1/flux) when faint,
    # photon-limited (~1/sqrt(flux)) when bright: 0.12 px at 1e3 ADU, 0.015 px at 1e4 ADU
    sig = np.minimum(np.hypot(120.0 / flux[keep], 1.2 / np.sqrt(flux[keep])), 0.3)
    pts = xy[keep] + rng.normal(0, 1, (keep.sum(), 2)) * sig[:, None]
    sxy, sf = _spurious(rng, n_spurious, flux.min(), flux.max())
    inside = (pts >= 0).all(axis=1) & (pts <= SIZE - 1).all(axis=1)
    return np.vstack([pts[inside], sxy]), np.concatenate([flux[keep][inside], sf])


def _rms_error(t: Transform, truth: Transform, xy: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.sum((t.apply(xy) - truth.apply(xy)) ** 2, axis=1))))


def test_transform_convention_matches_frame_log() -> None:
    t = Transform.from_params(12.5, -3.25, 0.9, shape=(SIZE, 400))
    cx, cy = (400 - 1) / 2, (SIZE - 1) / 2
    x, y = 17.0, 301.0
    a = math.radians(0.9)
    expect = (cx + math.cos(a) * (x - cx) - math.sin(a) * (y - cy) + 12.5,
              cy + math.sin(a) * (x - cx) + math.cos(a) * (y - cy) - 3.25)
    assert np.allclose(t.apply([[x, y]])[0], expect, atol=1e-9)
    assert (t.dx, t.dy, t.rotation_deg, t.scale) == pytest.approx((12.5, -3.25, 0.9, 1.0), abs=1e-9)
    assert np.allclose(t.inverse_apply(t.apply([[x, y]])), [[x, y]], atol=1e-9)


@pytest.mark.parametrize("dx, dy, rot", [(40.0, -25.3, 1.0), (-33.7, 38.2, -0.6), (0.31, 0.42, 0.02)])
def test_lists_across_filters_with_spurious_points(dx: float, dy: float, rot: float) -> None:
    """Blue reference vs green frame: other flux order, 20% of stars missing in each, 300 spurious each."""
    rng = np.random.default_rng(int(abs(dx * 100)))
    xy, flux_blue = star_field(rng, n=200)
    flux_green = flux_blue * 10 ** (-0.4 * rng.normal(0.0, 0.6, len(flux_blue)))   # colours scramble the order
    truth = Transform.from_params(dx, dy, rot, shape=(SIZE, SIZE))
    ref_xy, ref_f = _catalogue(rng, xy, flux_blue, 0.8, 300)
    frm_xy, frm_f = _catalogue(rng, truth.apply(xy), flux_green, 0.8, 300)
    t = find_transform(frm_xy, ref_xy, frm_f, ref_f, shape=(SIZE, SIZE))
    assert _rms_error(t, truth, xy) < 0.05
    assert (t.dx, t.dy) == pytest.approx((dx, dy), abs=0.05)
    assert t.rotation_deg == pytest.approx(rot, abs=0.01)
    assert t.scale == pytest.approx(1.0, abs=1e-3)
    assert t.nmatch >= 60 and t.rms_px < 0.3


def test_without_fluxes_lists_sorted_brightest_first() -> None:
    rng = np.random.default_rng(7)
    xy, flux = star_field(rng, n=120)
    order = np.argsort(-flux)
    xy, flux = xy[order], flux[order]
    truth = Transform.from_params(-17.2, 9.9, 0.4, shape=(SIZE, SIZE))
    t = find_transform(truth.apply(xy[5:]), xy[:110], shape=(SIZE, SIZE))
    assert _rms_error(t, truth, xy) < 0.01


def test_unrelated_field_is_refused() -> None:
    """The offset frame (other stars) must raise, never return a transform."""
    rng = np.random.default_rng(3)
    xy, flux = star_field(rng, n=200)
    other_xy, other_f = star_field(rng, n=200)
    ref_xy, ref_f = _catalogue(rng, xy, flux, 0.9, 300)
    frm_xy, frm_f = _catalogue(rng, other_xy, other_f, 0.9, 300)
    with pytest.raises(RegistrationError, match="no consistent star pattern match"):
        find_transform(frm_xy, ref_xy, frm_f, ref_f, shape=(SIZE, SIZE))
    with pytest.raises(RegistrationError, match="no consistent star pattern match"):
        find_transform(frm_xy[:4], ref_xy, frm_f[:4], ref_f, shape=(SIZE, SIZE))


@pytest.fixture(scope="module")
def rendered() -> dict:
    """A reference frame and a drifted, rotated frame with different seeing, with detections."""
    rng = np.random.default_rng(11)
    xy, flux = star_field(rng, n=150)
    truth = Transform.from_params(23.6, -31.3, 0.8, shape=(SIZE, SIZE))
    ref = render_frame(rng, xy, flux, fwhm=3.2)
    frame = render_frame(rng, xy, flux * 0.7, truth, fwhm=4.0)
    sigma = noise_sigma()
    return dict(xy=xy, flux=flux, truth=truth, ref=ref, frame=frame,
                ref_det=detect(ref, sigma, fwhm=3.2), frame_det=detect(frame, sigma, fwhm=4.0))


def test_rendered_frames_register_to_005px(rendered: dict) -> None:
    (fxy, ff), (rxy, rf) = rendered["frame_det"], rendered["ref_det"]
    # cosmic rays and hot pixels that got through detection
    rng = np.random.default_rng(5)
    sxy, sf = _spurious(rng, 300, ff.min(), ff.max())
    t = find_transform(np.vstack([fxy, sxy]), rxy, np.concatenate([ff, sf]), rf, shape=(SIZE, SIZE))
    assert _rms_error(t, rendered["truth"], rendered["xy"]) < 0.05


def test_warp_puts_stars_back(rendered: dict) -> None:
    truth, xy = rendered["truth"], rendered["xy"]
    warped, valid = warp_to_reference(rendered["frame"], truth, (SIZE, SIZE))
    assert warped.dtype == np.float32 and valid.dtype == bool
    wxy, _ = detect(warped * valid, noise_sigma(), fwhm=4.0)
    dist = np.hypot(*(wxy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    nearest = dist.min(axis=1)
    matched = nearest < 1.0
    assert matched.sum() > 50
    # bright, isolated stars: centroid error is small next to the resampling error tested
    assert float(np.sqrt(np.mean(nearest[matched][:60] ** 2))) < 0.05
    # pixels mapped from outside the frame are flagged: dy = -31 px leaves the first rows without data
    assert not valid[:25, SIZE // 2].any() and valid[40:, 40:-40].all()


def test_warp_integer_and_fractional_shift_fast_paths() -> None:
    rng = np.random.default_rng(2)
    data = rng.normal(0, 1, (64, 80)).astype(np.float32)
    out, valid = warp_to_reference(data, Transform.from_params(3.0, -2.0, shape=data.shape), data.shape)
    assert np.array_equal(out[2:, :-3], data[:-2, 3:]) and valid[2:, :-3].all()
    assert not valid[:2].any() and not valid[:, -3:].any() and (out[~valid] == 0).all()
    # a pure fractional shift (scipy.ndimage.shift path) equals the general affine path
    t = Transform.from_params(2.3, -1.6, shape=data.shape)
    fast, fvalid = warp_to_reference(data, t, data.shape)
    slow, svalid = warp_to_reference(data, t, (64, 81))      # other output shape: affine path
    assert np.array_equal(fvalid, svalid[:, :80])
    assert np.allclose(fast, slow[:, :80], atol=1e-5)


# --------------------------------------------------------------------------- simulated night


@pytest.fixture(scope="module")
def sim_night(tmp_path_factory) -> tuple:
    """A 512 px night from observer.simulator with a 40 px drift and 1 degree of rotation."""
    simulator = pytest.importorskip("observer.simulator")
    root = tmp_path_factory.mktemp("simnight")
    settings = simulator.SimSettings(size=SIZE, frames=4, n_members=150, n_field=80, seed=3,
                                     fill_seconds=0.0, drift_px=40.0, rotation_deg=1.0)
    truth = simulator.simulate_night(root / "cam", settings, truth_path=root / "truth.ecsv")
    return root / "cam", truth


def reduced_frame(path) -> tuple:
    """The per-frame path up to the star list (helper B's modules): load, hot pixels, sky, stars.

    Returns (background-subtracted data, SkyModel, (xy, flux) brightest first).
    """
    from reduction.background import sky_model
    from reduction.frames import load_frame
    from reduction.hotpixels import find_hot_pixels, repair_pixels
    from reduction.quality import detect_stars

    data = load_frame(path).data
    data = repair_pixels(data, find_hot_pixels(data))
    sky = sky_model(data)
    data = data - sky.model
    stars = detect_stars(data, sky.rms, max_stars=400)
    xy = np.column_stack([stars["x"], stars["y"]]).astype(float)
    return data, sky, (xy, np.asarray(stars["flux"], float))


def detected_stars(path) -> tuple[np.ndarray, np.ndarray]:
    """(xy, flux) of the stars detected in a camera file, brightest first."""
    return reduced_frame(path)[2]


def test_simulated_night_registers_to_frame_log(sim_night: tuple) -> None:
    """Every science frame, both filters, onto the first frame's grid: 0.05 px RMS against the log."""
    camdir, truth = sim_night
    log = truth.frames
    science = log[log["kind"] == "science"]
    ref_row = science[0]
    assert ref_row["dx"] == 0 and ref_row["dy"] == 0
    ref_xy, ref_f = detected_stars(camdir / ref_row["file"])
    stars = np.column_stack([truth.stars["x"], truth.stars["y"]]).astype(float)
    inside = ((stars > 20) & (stars < SIZE - 21)).all(axis=1)
    errors = {}
    for row in science[1:]:
        fxy, ff = detected_stars(camdir / row["file"])
        t = find_transform(fxy, ref_xy, ff, ref_f, shape=(SIZE, SIZE))
        true = Transform.from_params(row["dx"], row["dy"], row["rotation_deg"], shape=(SIZE, SIZE))
        errors[row["file"]] = (_rms_error(t, true, stars[inside]), bool(row["trailed"]))
    drift = np.hypot(np.asarray(science["dx"]), np.asarray(science["dy"]))
    assert drift.max() > 20 and max(abs(science["rotation_deg"])) > 0.5       # the test is hard
    assert {f[f.index("_") + 1:f.rindex("_")] for f in errors} == {"blue", "green"}
    for name, (err, trailed) in errors.items():
        # a trailed frame's stars are smeared along the trail: its centroids are shifted by design
        assert err < (0.5 if trailed else 0.05), name


def test_offset_frames_are_never_registered(sim_night: tuple) -> None:
    camdir, truth = sim_night
    log = truth.frames
    ref_xy, ref_f = detected_stars(camdir / log[log["kind"] == "science"][0]["file"])
    offsets = log[log["kind"] == "offset"]
    assert len(offsets) >= 2
    for row in offsets:
        fxy, ff = detected_stars(camdir / row["file"])
        with pytest.raises(RegistrationError, match="no consistent star pattern match"):
            find_transform(fxy, ref_xy, ff, ref_f, shape=(SIZE, SIZE))


def test_short_exposure_with_noisy_centroids_registers_to_a_long_reference() -> None:
    """A 3 s frame: 20 bright stars whose centroids scatter by 0.45 px, among 130 noise detections,
    shifted by under a pixel from a 60 s reference. Its residual is above max_rms, but the transform
    fitted on 20 stars is good to ~0.1 px: it must register (it failed with 'best 0 matched stars')."""
    rng = np.random.default_rng(2)
    ref = rng.uniform(20, 1000, (109, 2))
    ref_flux = 10 ** rng.uniform(2.5, 5.5, 109)
    bright = np.argsort(-ref_flux)[:20]
    shift = np.array([0.4, -0.3])
    stars = ref[bright] + shift + rng.normal(0, 0.45, (20, 2))
    frame_xy = np.vstack([stars, rng.uniform(0, 1024, (130, 2))])
    frame_flux = np.concatenate([ref_flux[bright] / 20, 10 ** rng.uniform(1.0, 3.6, 130)])
    t = find_transform(frame_xy, ref, frame_flux=frame_flux, ref_flux=ref_flux, shape=(1024, 1024),
                       min_matches=6, max_rms=0.5)
    assert t.nmatch >= 15
    np.testing.assert_allclose([t.dx, t.dy], shift, atol=0.3)
    # The same noisy short frame of another field is still refused, with its reason.
    with pytest.raises(RegistrationError, match="no consistent star pattern match"):
        find_transform(frame_xy, rng.uniform(20, 1000, (109, 2)), frame_flux=frame_flux, ref_flux=ref_flux,
                       shape=(1024, 1024))
