"""What the service publishes: per-frame records and the state snapshot the dashboard reads.

The dashboard (``tui/``) and the headless log only ever see these immutable
objects, never the service's live structures, so the UI cannot race the worker
and runs the same whether the service is live or replaying a night.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from reduction.cmd import CmdData  # noqa: F401  (published with the rest of the state)


class Status(StrEnum):
    """What became of a file (frames.ecsv ``status``, the ledger, the frame log)."""

    PROCESSING = "processing"    # ledger only: taken, outcome not yet committed
    STACKED = "stacked"
    REJECTED = "rejected"
    OFFSET = "offset"
    CALIBRATION = "calibration"
    QUARANTINED = "quarantined"
    IGNORED = "ignored"


#: Statuses a file can end in (every status but the ledger's in-flight one).
FINAL_STATUSES = tuple(s for s in Status if s is not Status.PROCESSING)


class Kind(StrEnum):
    """What a file is (frames.ecsv ``kind``)."""

    SCIENCE = "science"
    OFFSET = "offset"
    BIAS = "bias"
    DARK = "dark"
    FLAT = "flat"


#: Kinds that feed the calibration masters.
CALIBRATION_KINDS = (Kind.BIAS, Kind.DARK, Kind.FLAT)

#: Columns of frames.ecsv, in order (README "Products"), then our extra quality columns.
FRAME_COLUMNS = ("path", "kind", "target", "filter", "date_obs", "exptime", "status", "reason",
                 "fwhm", "elongation", "sky", "nstars", "dx", "dy",
                 "rotation", "transparency", "reg_rms", "fwhm_arcsec", "sha256", "plane")


@dataclass
class FrameRecord:
    """One file seen by observer and what became of it (a row of frames.ecsv and of the frame log)."""

    path: str
    sha256: str = ""
    kind: str = ""
    target: str = ""
    filter: str = ""
    date_obs: str = ""
    exptime: float = float("nan")
    status: str = ""
    reason: str = ""
    fwhm: float = float("nan")          # px
    elongation: float = float("nan")
    sky: float = float("nan")           # ADU
    nstars: int = 0
    dx: float = float("nan")            # shift onto the reference grid at the frame centre, px
    dy: float = float("nan")
    rotation: float = float("nan")      # degrees
    transparency: float = float("nan")  # relative to the best frame of its (target, filter)
    reg_rms: float = float("nan")       # registration residual, px
    fwhm_arcsec: float = float("nan")
    group: str = ""                     # exposure group of its filter's stack, e.g. "3s"
    plane: str = ""                     # a colour file's plane (R, G, B: one record each); "" for mono
    seen_at: float = 0.0                # unix time the service finished the frame
    step_seconds: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict:
        """The frames.ecsv row."""
        return {name: getattr(self, name) for name in FRAME_COLUMNS}


def file_outcome(records: list[FrameRecord]) -> FrameRecord:
    """One file's outcome from its records (the ledger keeps one row per file, not per colour plane).

    A colour file counts as stacked when any plane is; its filters and the planes' reasons are joined.
    """
    if len(records) == 1:
        return records[0]
    first = next((r for r in records if r.status == Status.STACKED), records[0])
    reasons = "; ".join(f"{r.plane}: {r.reason}" for r in records if r.reason)
    return dataclasses.replace(first, filter=",".join(r.filter for r in records), reason=reasons)


def left_out_text(left_out: dict[str, int] | tuple[tuple[str, int], ...]) -> str:
    """'58 saturated, 621 blended' (reasons with no star omitted; 'none' when no star was left out)."""
    return ", ".join(f"{n} {reason}" for reason, n in dict(left_out).items() if n) or "none"


@dataclass(frozen=True)
class AgeEstimate:
    """The isochrone fit as the dashboard shows it (age.json holds the full record)."""

    log_age: float
    log_age_low: float
    log_age_high: float
    age_myr: float
    distance_modulus: float
    ebv: float
    n_stars: int
    isochrone_color: np.ndarray    # the best isochrone, shifted onto the CMD axes
    isochrone_mag: np.ndarray
    turnoff: tuple[float, float]   # (colour, magnitude)
    left_out: tuple[tuple[str, int], ...] = ()   # (reason, stars) the fit did not use, e.g. ("blended", 12)


@dataclass(frozen=True)
class FilterStatus:
    """Depth and progress of one filter's stack."""

    filter: str
    n_stacked: int
    n_rejected: int
    total_exptime: float
    has_offset: bool
    limiting_mag: float                    # 5-sigma point-source limit of the stack (nan until measured)
    limiting_mag_history: tuple[float, ...]
    snr_at_mag: float                      # SNR of the stack at the completion magnitude
    stack_preview: np.ndarray | None       # downsampled stack (float32), for the dashboard
    raw_preview: np.ndarray | None         # downsampled last raw frame
    saturation_mag: float = float("nan")   # brightest unsaturated magnitude of the longest group
    groups: tuple[tuple[float, int], ...] = ()   # (exposure time, frames) of each exposure group


@dataclass(frozen=True)
class Suggestion:
    """Frames the observer should take next (status.json ``suggested``)."""

    filter: str
    exptime: float
    count: int
    why: str


@dataclass(frozen=True)
class TargetState:
    """Everything the dashboard shows about one target."""

    name: str
    filters: dict[str, FilterStatus]
    cmd: CmdData | None
    age: AgeEstimate | None
    done: bool
    verdict: str                   # "keep going: about N more frames per filter ..." / "done: move to the next target"
    frames_needed: int | None
    warnings: tuple[str, ...]
    completion_mag: float          # the magnitude at which SNR is judged
    reasons: tuple[str, ...] = ()  # why it is not done yet (empty when done)
    suggested: tuple[Suggestion, ...] = ()
    age_reason: str = ""           # why there is no age, when a fit was due and could not be made


@dataclass(frozen=True)
class Snapshot:
    """The whole published state at one instant; ``version`` increases with every change."""

    version: int
    frames: tuple[FrameRecord, ...]        # oldest first
    targets: dict[str, TargetState]
    outdir: str
    busy: bool = False                      # frames waiting in the queue
    queue_length: int = 0
    messages: tuple[str, ...] = ()          # service-level warnings (disk space low, ...)
