"""Save and restore a Night atomically, so that ``kill -9`` at any instant loses nothing.

Layout under ``OUTDIR/.state/``: one folder per generation (``gen-000042/``)
holding ``night.json`` (records and scalar state) and one folder of raw
``.npy`` files per array group (stack accumulators, reference stars, offset sky
shapes, hot-pixel maps), and a file ``current`` naming the complete generation.
Raw ``.npy``, not ``.npz``: a zip's CRC over 100 MB of stack planes cost more
than the write itself (0.08 s a group at 2048 px). A new generation is
written beside the old one (files that did not change are hard-linked, so a
checkpoint costs only what changed), fsynced, and then ``current`` is replaced
with ``os.replace``: a reader or a restart sees either the old generation or
the new one, never a mixture. Older generations are removed afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

from observer.session import CameraGain, ExposureGroup, FilterSession, HeldFrame, NightState, TargetSession
from observer.state import FrameRecord, Status
from reduction.hotpixels import HotPixelMap
from reduction.stacking import StackAccumulator

log = logging.getLogger(__name__)

#: The layout above; a generation without it (an older observer's) is refused, with the reason.
FORMAT = 2


class CheckpointError(RuntimeError):
    """The output folder's saved state cannot be resumed; the message says why and what to do."""

_FILTER_SCALARS = ("fwhm_history", "elongation_history", "n_rejected", "limiting_mag_history", "snr_at_mag", "saturation_mag")
_GROUP_SCALARS = ("exptime", "gain", "gain_source", "read_noise", "sky_level", "best_throughput", "total_exptime",
                  "inputs", "overscan", "settled")
#: A provisionally stacked frame's arrays (saved as ``<name>_<index>``; ``valid`` may be None).
_HELD_ARRAYS = ("warped", "valid", "saturated")
_GROUP_ARRAYS = ("ref_xy", "ref_flux", "stack_preview")
_FILTER_ARRAYS = ("offset_shape", "last_raw_preview")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9+.=-]", "_", name)


def changed_files(record: FrameRecord) -> set[str]:
    """The state files a processed frame changed, so that the next checkpoint rewrites only those."""
    if not record.target:
        return set()
    key = f"{_safe(record.target)}__{_safe(record.filter)}"
    changed = {f"target__{_safe(record.target)}", f"filter__{key}", f"pending__{key}"}
    if record.status == Status.STACKED:
        changed |= group_files(record.target, record.filter, record.group)
    return changed


def group_files(target: str, filter_name: str, group: str) -> set[str]:
    """The state files of one exposure group: its accumulator, arrays and provisionally stacked frames."""
    gkey = f"{_safe(target)}__{_safe(filter_name)}__{_safe(group)}"
    return {f"acc__{gkey}", f"group__{gkey}", f"held__{gkey}", f"filter__{_safe(target)}__{_safe(filter_name)}"}


def state_dir(outdir: Path) -> Path:
    return Path(outdir) / ".state"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_arrays(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    """One raw ``.npy`` per array, each fsynced, then the folder."""
    folder.mkdir()
    for name, value in arrays.items():
        with open(folder / f"{name}.npy", "wb") as fh:
            np.lib.format.write_array(fh, np.asarray(value), allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
    _fsync_dir(folder)


def _link_arrays(old: Path, new: Path) -> None:
    """The unchanged array group of the previous generation, hard-linked file by file (no copy)."""
    new.mkdir()
    for path in old.iterdir():
        os.link(path, new / path.name)
    _fsync_dir(new)


def _read_arrays(folder: Path) -> dict[str, np.ndarray]:
    return {path.stem: np.load(path, allow_pickle=False) for path in folder.glob("*.npy")}


def save(state: NightState, outdir: Path, dirty: set[str]) -> None:
    """Write a new generation and make it current (see the module docstring).

    ``dirty`` names the state files that changed since the last generation
    (:func:`changed_files`); the others are hard-linked from it.
    """
    root = state_dir(outdir)
    root.mkdir(parents=True, exist_ok=True)
    current = _current(root)
    generation = (int(current.name.split("-")[1]) + 1) if current else 1
    new = root / f"gen-{generation:06d}"
    if new.exists():
        shutil.rmtree(new)
    new.mkdir()
    meta: dict = {"format": FORMAT, "version": state.version, "records": [asdict(r) for r in state.records],
                  "calibration_files": state.calibration_files, "targets": {},
                  "pending_offsets": [list(k) for k in state.pending_offsets], "hot_maps": [],
                  "gains": [{"shape": list(shape), **asdict(g)} for shape, g in state.gains.items()]}

    def put(name: str, arrays_fn) -> None:
        """Write ``name`` if it changed since the last generation, else hard-link the old files."""
        old = current / name if current else None
        if name not in dirty and old is not None and old.is_dir():
            _link_arrays(old, new / name)
        else:
            _write_arrays(new / name, arrays_fn())

    for tname, target in state.targets.items():
        tmeta = {"shape": list(target.shape), "pointing": target.pointing, "reference_file": target.reference_file,
                 "wcs_header": target.wcs_header, "plate_scale_arcsec": target.plate_scale_arcsec, "filters": {}}
        put(f"target__{_safe(tname)}", lambda t=target: {"ref_xy": t.ref_xy, "ref_flux": t.ref_flux})
        for fname, session in target.filters.items():
            key = f"{_safe(tname)}__{_safe(fname)}"
            fmeta = {k: getattr(session, k) for k in _FILTER_SCALARS}
            fmeta["has_offset"] = session.offset_shape is not None
            fmeta["groups"] = [{**{k: getattr(g, k) for k in _GROUP_SCALARS},
                                "held": [_held_scalars(h) for h in g.held]} for g in session.groups]
            tmeta["filters"][fname] = fmeta
            put(f"filter__{key}", lambda s=session: _arrays(s, _FILTER_ARRAYS))
            for group in session.groups:
                gkey = f"{key}__{_safe(group.label)}"
                put(f"acc__{gkey}", group.accumulator.state)
                put(f"group__{gkey}", lambda g=group: _arrays(g, _GROUP_ARRAYS))
                put(f"held__{gkey}", lambda g=group: {f"{k}_{i}": getattr(h, k) for i, h in enumerate(g.held)
                                                      for k in _HELD_ARRAYS if getattr(h, k) is not None})
        meta["targets"][tname] = tmeta
    for (tname, fname), shape in state.pending_offsets.items():
        put(f"pending__{_safe(tname)}__{_safe(fname)}", lambda s=shape: {"shape": s})
    for shape, hot in state.hot_maps.items():
        meta["hot_maps"].append(list(shape))
        _write_arrays(new / f"hot__{shape[0]}x{shape[1]}", hot.state())
    with open(new / "night.json", "w") as fh:
        json.dump(meta, fh, default=_json_default)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(new)
    tmp = root / "current.tmp"
    tmp.write_text(new.name)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, root / "current")
    _fsync_dir(root)
    for old in root.glob("gen-*"):
        if old != new:
            shutil.rmtree(old, ignore_errors=True)


def _current(root: Path) -> Path | None:
    pointer = root / "current"
    if not pointer.exists():
        return None
    folder = root / pointer.read_text().strip()
    return folder if (folder / "night.json").exists() else None


def load(outdir: Path) -> NightState | None:
    """The night's state as of the current generation; None when there is none.

    Calibration masters are not saved (they are rebuilt from ``calibration_files``).
    """
    root = state_dir(outdir)
    current = _current(root)
    if current is None:
        return None
    meta = json.loads((current / "night.json").read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{current}: saved by an older observer (checkpoint format {meta.get('format', 1)}, "
                              f"this one reads {FORMAT}); reduce into a new output folder, or remove {root} "
                              "to start this one afresh")
    state = NightState(version=meta["version"], records=[FrameRecord(**r) for r in meta["records"]],
                       calibration_files=meta["calibration_files"])
    for tname, tmeta in meta["targets"].items():
        arrays = _read_arrays(current / f"target__{_safe(tname)}")
        ref_xy, ref_flux = arrays["ref_xy"], arrays["ref_flux"]
        target = TargetSession(name=tname, shape=tuple(tmeta["shape"]), ref_xy=ref_xy, ref_flux=ref_flux,
                               pointing=tuple(tmeta["pointing"]) if tmeta["pointing"] else None,
                               reference_file=tmeta["reference_file"], wcs_header=tmeta["wcs_header"],
                               plate_scale_arcsec=tmeta["plate_scale_arcsec"])
        for fname, fmeta in tmeta["filters"].items():
            key = f"{_safe(tname)}__{_safe(fname)}"
            session = FilterSession(name=fname, **{k: fmeta[k] for k in _FILTER_SCALARS})
            _load_arrays(session, current / f"filter__{key}", _FILTER_ARRAYS)
            for gmeta in fmeta["groups"]:
                # A group saved before the first frames were judged together ("settled" missing) is settled.
                group = ExposureGroup(accumulator=None, **{"settled": True, **{k: gmeta[k] for k in _GROUP_SCALARS
                                                                              if k in gmeta}})
                gkey = f"{key}__{_safe(group.label)}"
                group.accumulator = StackAccumulator.from_state(_read_arrays(current / f"acc__{gkey}"))
                _load_arrays(group, current / f"group__{gkey}", _GROUP_ARRAYS)
                if gmeta.get("held"):
                    held = _read_arrays(current / f"held__{gkey}")
                    group.held = [HeldFrame(**h, **{k: held.get(f"{k}_{i}") for k in _HELD_ARRAYS})
                                  for i, h in enumerate(gmeta["held"])]
                session.add_group(group)
            target.filters[fname] = session
        state.targets[tname] = target
    for tname, fname in meta["pending_offsets"]:
        state.pending_offsets[(tname, fname)] = _read_arrays(current / f"pending__{_safe(tname)}__{_safe(fname)}")["shape"]
    # The estimated gain is restored, not measured again: a restart reduces with the very same value.
    for g in meta.get("gains", []):
        shape = tuple(g.pop("shape"))
        state.gains[shape] = CameraGain(**g)
    for shape in meta["hot_maps"]:
        state.hot_maps[tuple(shape)] = HotPixelMap.from_state(_read_arrays(current / f"hot__{shape[0]}x{shape[1]}"))
    log.info("resumed from %s: %d files already taken", current, len(state.records))
    return state


def _arrays(obj: object, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named array attributes of ``obj`` that are set (None is not saved)."""
    return {k: getattr(obj, k) for k in names if getattr(obj, k) is not None}


def _held_scalars(frame: HeldFrame) -> dict:
    """A provisionally stacked frame's fields other than its arrays (night.json)."""
    return {f.name: getattr(frame, f.name) for f in fields(frame) if f.name not in _HELD_ARRAYS}


def _load_arrays(obj: object, folder: Path, names: tuple[str, ...]) -> None:
    arrays = _read_arrays(folder)
    for k in names:
        setattr(obj, k, arrays.get(k))


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
