"""The night's state: per-target and per-filter reference grids and stacks, and the frame records.

Plain containers with no I/O and no locking: only ``observer.night.Night``
changes them (on its worker thread, under its lock), ``observer.checkpoint``
saves and restores them, and ``observer.snapshot`` reads them to publish. The
same state serves the live service and ``observer reprocess``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from observer.state import AgeEstimate, CmdData, FrameRecord, Status
from reduction.calibration import Masters
from reduction.hotpixels import HotPixelMap
from reduction.stacking import StackAccumulator


def group_label(exptime: float) -> str:
    """An exposure group's name in products, state files and measurements: its exposure time, e.g. ``3s``."""
    return f"{exptime:g}s"


@dataclass
class HeldFrame:
    """A frame stacked provisionally, kept until its group's first frames are judged together.

    What :func:`observer.frame_path.stack_frame` needs to add it again (its warped pixels on the
    target's grid, masks, noise figures and throughput), and the figures it is judged by: the stack
    is rebuilt from these once the baseline exists, without the frames it then rejects.
    """

    path: str                               # the frame record's path and plane identify it
    plane: str
    frame_id: str                           # its id in the accumulator (sha256, else the path)
    name: str                               # file name, for the stack's inputs
    warped: np.ndarray
    valid: np.ndarray | None
    saturated: np.ndarray                   # saturated pixels on the target's grid
    exptime: float
    throughput: float                       # relative to the group's flux reference at the time
    gain: float
    sky_rms: float
    sky_level: float
    fwhm: float
    elongation: float
    nstars: int
    plate_scale_arcsec: float | None = None
    overscan: str = ""
    warning: str = ""                       # stacked with a warning (shape of a first frame)


@dataclass
class CameraGain:
    """A camera's gain (e-/ADU) and where it came from: a header keyword, ``camera.gain`` or an estimate.

    An estimate is night state (``NightState.gains``): made once, from the night's flats and biases or
    from the first frame's sky, and kept (and checkpointed) so that every frame and a restart use the
    same value.
    """

    value: float
    source: str                              # header, config, photon transfer or sky noise (GAINSRC)
    origin: str = ""                         # the keyword, or the file(s) the estimate was measured on


@dataclass
class ExposureGroup:
    """The frames of one filter with about one exposure time: their own stack on the target's grid.

    Short frames keep the bright stars (turn-off, giants) below saturation, long
    ones reach the faint main sequence; each group is stacked on its own and the
    catalogue takes every star from the deepest group where it is unsaturated.
    """

    exptime: float                           # EXPTIME of the group's unit frame (its first stacked frame)
    accumulator: StackAccumulator
    gain: float = 1.0
    gain_source: str = ""                    # where ``gain`` came from (CameraGain.source)
    read_noise: float = 0.0
    sky_level: float = 0.0                   # mean sky of the stacked frames (ADU per unit frame), for errors
    ref_xy: np.ndarray | None = None         # the group's flux reference stars on the reference grid
    ref_flux: np.ndarray | None = None       # their fluxes in ADU per second
    best_throughput: float = 1.0             # best frame's throughput relative to the flux reference
    total_exptime: float = 0.0
    stack_preview: np.ndarray | None = None
    inputs: list[str] = field(default_factory=list)   # file names stacked, in order
    overscan: str = ""                       # how the frames' overscan was corrected ("": they had none)
    held: list[HeldFrame] = field(default_factory=list)   # stacked provisionally, not yet judged together
    settled: bool = False                    # its first frames have been judged against their baseline

    @property
    def n_stacked(self) -> int:
        return self.accumulator.n_frames

    @property
    def label(self) -> str:
        return group_label(self.exptime)

    def takes(self, exptime: float, factor: float) -> bool:
        """Whether a frame of ``exptime`` belongs here (exposure times within ``factor`` of each other)."""
        return max(exptime, self.exptime) <= factor * min(exptime, self.exptime)


@dataclass
class FilterSession:
    """One filter of one target: its exposure groups and what is shared by them (sky shape, seeing, depth)."""

    name: str
    groups: list[ExposureGroup] = field(default_factory=list)   # longest exposure first
    offset_shape: np.ndarray | None = None   # sky shape from the offset frame (mean 1), on the frame grid
    fwhm_history: list[float] = field(default_factory=list)
    elongation_history: list[float] = field(default_factory=list)
    n_rejected: int = 0
    limiting_mag_history: list[float] = field(default_factory=list)
    snr_at_mag: float = float("nan")
    saturation_mag: dict[str, float] = field(default_factory=dict)   # by group label: brightest unsaturated
    last_raw_preview: np.ndarray | None = None

    @property
    def main(self) -> ExposureGroup:
        """The longest group with frames (``stack.fits``, the previews, the depth)."""
        stacked = [g for g in self.groups if g.n_stacked]
        return stacked[0] if stacked else self.groups[0]

    @property
    def n_stacked(self) -> int:
        return sum(g.n_stacked for g in self.groups)

    @property
    def total_exptime(self) -> float:
        return sum(g.total_exptime for g in self.groups)

    @property
    def exptime(self) -> float:
        return self.main.exptime

    @property
    def stack_preview(self) -> np.ndarray | None:
        return self.main.stack_preview

    def group_for(self, exptime: float, factor: float) -> ExposureGroup | None:
        """The group a frame of ``exptime`` joins, if one exists."""
        return next((g for g in self.groups if g.takes(exptime, factor)), None)

    def add_group(self, group: ExposureGroup) -> ExposureGroup:
        self.groups.append(group)
        self.groups.sort(key=lambda g: -g.exptime)
        return group

    def baseline_fwhm(self, min_frames: int = 1) -> float | None:
        """Running median FWHM of the frames stacked so far (the relative seeing baseline), once there are
        ``min_frames``: a median of one or two frames would let one very sharp frame set it."""
        return float(np.median(self.fwhm_history)) if len(self.fwhm_history) >= max(min_frames, 1) else None

    def baseline_elongation(self, min_frames: int = 2) -> float | None:
        """Median elongation of the frames stacked so far, once there are ``min_frames``.

        One frame is no baseline for trailing; it is one for the optics' own elongation (coma).
        """
        values = [e for e in self.elongation_history if np.isfinite(e)]
        return float(np.median(values)) if values and len(values) >= min_frames else None


@dataclass
class TargetSession:
    """One target: the reference grid (its first science frame) and a session per filter."""

    name: str
    shape: tuple[int, int]
    ref_xy: np.ndarray                      # stars of the reference frame (x, y), brightest first
    ref_flux: np.ndarray
    pointing: tuple[float, float] | None    # (ra, dec) deg of the science frames
    reference_file: str
    wcs_header: dict | None = None          # celestial WCS cards of the reference frame, when it has one
    plate_scale_arcsec: float | None = None
    filters: dict[str, FilterSession] = field(default_factory=dict)


@dataclass
class NightState:
    """Everything one night has learned so far; what the checkpoint saves.

    ``version`` grows with every change, so that a published snapshot can tell
    whether it is current. ``cmd`` and ``age`` hold the last measurement of
    each target (applied by the night, never written by the measuring thread).
    """

    records: list[FrameRecord] = field(default_factory=list)
    targets: dict[str, TargetSession] = field(default_factory=dict)
    hot_maps: dict[tuple[int, int], HotPixelMap] = field(default_factory=dict)
    calibration_files: dict[str, list[str]] = field(default_factory=lambda: {"bias": [], "dark": [], "flat": []})
    masters: dict[str, Masters] = field(default_factory=dict)     # by filter ("" for bias/dark only)
    pending_offsets: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    gains: dict[tuple[int, int], CameraGain] = field(default_factory=dict)   # estimated, by frame shape (camera)
    cmd: dict[str, CmdData] = field(default_factory=dict)
    age: dict[str, AgeEstimate] = field(default_factory=dict)
    age_reason: dict[str, str] = field(default_factory=dict)     # why a target has no age (its age.json says so)
    version: int = 0
    records_version: int = 0       # changes of ``records`` alone (frames.ecsv is rewritten only then)
    #: (target, filter, group) whose stack was rebuilt when its first frames were judged together, and
    #: some of whose earlier records changed: ``Night`` rewrites their stacks, frames.ecsv and checkpoint.
    restacked: set[tuple[str, str, str]] = field(default_factory=set)
    #: paths of the files whose records :meth:`replace_record` changed (their ledger rows are out of date)
    rejudged: set[str] = field(default_factory=set)

    def append(self, record: FrameRecord) -> None:
        """Add a record; a file quarantined earlier and taken now replaces its quarantine row."""
        if record.status != Status.QUARANTINED:
            self.records = [r for r in self.records
                            if not (r.path == record.path and r.status == Status.QUARANTINED)]
        self.records.append(record)
        self.version += 1
        self.records_version += 1

    def replace_record(self, old: FrameRecord, new: FrameRecord) -> None:
        """Put ``new`` in ``old``'s place (a copy, so a published snapshot keeps the record it showed).

        Only while a frame is in hand (its group's first frames judged with it): the versions move once,
        with that frame's :meth:`append`, so every change to the night still moves them exactly once.
        """
        self.records = [new if r is old else r for r in self.records]
        self.rejudged.add(new.path)

    def hot_map(self, shape: tuple[int, int]) -> HotPixelMap:
        """The camera's persistent hot-pixel map for frames of this shape (created on first use)."""
        return self.hot_maps.setdefault(shape, HotPixelMap(shape))
