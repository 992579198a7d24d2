"""Which gain a frame is reduced with: never a silent 1.0 e-/ADU.

Order: the frame's GAIN/EGAIN/CCDGAIN keyword (when plausible), ``camera.gain`` from the config,
then an estimate made once per camera (frame shape) and night, held in ``NightState.gains``:
photon transfer from the night's flats and biases when it has two of each, else the sky noise of
the first science (or offset) frame. Called by ``observer.frame_path.calibrate`` only, under the
night's lock. An estimate outside 0.05-20 e-/ADU (or none at all) is a ``GainError`` that names
``camera.gain``; the frame is then set aside and the next frame tries again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from observer.config import Settings
from observer.session import CameraGain, NightState
from reduction.calibration import Masters
from reduction.frames import Frame
from reduction.gain import GainError, check_plausible, photon_transfer_gain, sky_noise_gain

log = logging.getLogger(__name__)


def frame_gain(state: NightState, settings: Settings, frame: Frame, data: np.ndarray, masters: Masters | None,
               overscan: bool, read: Callable[[str], np.ndarray]) -> CameraGain:
    """The gain for ``frame`` (``data``: its bias/dark-subtracted, flat-fielded working image).

    ``overscan``: the overscan level was subtracted on load (the frame's zero is then the bias even
    without a master bias). ``read`` gives a calibration file's pixels as the masters saw them.
    Raises GainError when the gain has to be estimated and cannot be.
    """
    facts = frame.facts
    if facts.gain:
        return CameraGain(float(facts.gain), "header", facts.sources.get("gain", ""))
    if settings.camera.gain:
        return CameraGain(float(settings.camera.gain), "config", "camera.gain")
    known = state.gains.get(data.shape)
    if known is not None:
        return known
    gain = _photon_transfer(state, data.shape, read) or _sky_noise(settings, frame, data, masters, overscan)
    state.gains[data.shape] = gain
    log.info("gain %.3g e-/ADU estimated from the %s of %s (no GAIN keyword, no camera.gain)",
             gain.value, gain.source, gain.origin)
    return gain


def _photon_transfer(state: NightState, shape: tuple[int, int],
                     read: Callable[[str], np.ndarray]) -> CameraGain | None:
    """Photon transfer from the night's biases and the filter with most flats, if it has two of each."""
    files = state.calibration_files
    flat_keys = sorted((k for k in files if k.startswith("flat:")), key=lambda k: -len(files[k]))
    if len(files.get("bias", [])) < 2 or not flat_keys or len(files[flat_keys[0]]) < 2:
        return None
    biases = [a for a in map(read, files["bias"]) if a.shape == shape]
    flats = [a for a in map(read, files[flat_keys[0]]) if a.shape == shape]
    if len(biases) < 2 or len(flats) < 2:
        return None
    source = "photon transfer"
    value = check_plausible(photon_transfer_gain(flats, biases), source)
    origin = f"{len(flats)} {flat_keys[0].split(':', 1)[1]} flats and {len(biases)} biases"
    return CameraGain(value, source, origin)


def _sky_noise(settings: Settings, frame: Frame, data: np.ndarray, masters: Masters | None,
               overscan: bool) -> CameraGain:
    """The sky noise of this frame; its zero is the bias when a master bias (or a dark with the bias in
    it) or the overscan was subtracted."""
    offset_known = overscan or (masters is not None and (masters.bias is not None or
                                                         (masters.dark_per_s is not None and
                                                          masters.dark_includes_bias)))
    source = "sky noise"
    try:
        value = sky_noise_gain(data, frame.facts.read_noise or settings.camera.read_noise,
                               offset_known=offset_known, flat=masters.flat if masters is not None else None)
    except GainError as exc:
        hint = "" if "camera.gain" in str(exc) else "; set camera.gain in config.yaml"
        raise GainError(f"no gain estimate from the sky noise of {Path(frame.path).name}: {exc}{hint}") from None
    return CameraGain(check_plausible(value, source), source, Path(frame.path).name)
