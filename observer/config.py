"""Typed settings: built-in defaults, overridden by a YAML file.

The YAML is read with ``yaml.safe_load`` and merged key by key over the
dataclass defaults below (which equal the documented ``config.yaml``). Every
key is checked against its declared type and range, and an unknown key is an
error, so a typo at the telescope is caught at start-up rather than silently
ignored half-way through the night. Errors name the dotted key and what is
expected; the command line turns them into exit code 2.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from reduction.keywords import DEFAULT_KEYWORDS


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and what is expected."""


def _positive(value: float) -> bool:
    return value > 0


def _non_negative(value: float) -> bool:
    return value >= 0


def _fraction(value: float) -> bool:
    return 0 < value <= 1


def _check(check, expected: str) -> dict:
    """Field metadata: a predicate and the words that describe a valid value."""
    return {"check": check, "expected": expected}


def _num(default: float, check=_positive, expected: str = "a number > 0") -> Any:
    return field(default=default, metadata=_check(check, expected))


DEFAULT_ALIASES = {
    "B": "blue", "Blue": "blue", "blue": "blue", "BLUE": "blue",
    "G": "green", "V": "green", "Green": "green", "green": "green", "GREEN": "green",
    "R": "red", "Red": "red", "red": "red", "RED": "red",
    "L": "luminance", "Lum": "luminance", "Luminance": "luminance", "luminance": "luminance",
}


@dataclass
class FilterSettings:
    """Filter names, their zeropoints and the photometric band each stands for (for isochrones)."""

    aliases: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ALIASES))
    zeropoints: dict[str, float] = field(default_factory=lambda: {"blue": 25.0, "green": 25.0, "red": 25.0,
                                                                  "luminance": 25.0})
    bands: dict[str, str] = field(default_factory=lambda: {"blue": "B", "green": "V", "red": "R"})
    default_zeropoint: float = _num(25.0)
    #: Filter of a camera that writes none (a filterless or one-filter camera); null: none assumed.
    default_filter: str | None = None

    def normalise(self, name: str | None) -> str | None:
        """Canonical filter name for a header value, or None when the alias table does not know it.

        Observatories decorate the band with its system ('JohnsonB', 'B-Bessell', 'V (Johnson)',
        'sloan_g', "g'", 'SDSS-r'): the value is tried as written, then case-insensitively, then with
        the system words, primes and separators stripped, so one alias per band covers them all.
        """
        if name is None:
            return None
        raw = str(name).strip()
        if raw in self.aliases:
            return self.aliases[raw]
        lowered = {k.lower(): v for k, v in self.aliases.items()}
        for candidate in (raw.lower(), _strip_system(raw)):
            if candidate in lowered:
                return lowered[candidate]
        return None

    def zeropoint(self, name: str) -> float:
        """The configured zeropoint of a canonical filter, else the default."""
        return self.zeropoints.get(name, self.default_zeropoint)


#: Words naming a photometric system rather than a band; stripped before the alias look-up.
_SYSTEM_WORDS = re.compile(r"johnson|bessell?|cousins|sloan|sdss|kron|filter|generic|broad|band", re.IGNORECASE)


def _strip_system(name: str) -> str:
    """'JohnsonB', 'B-Bessell', 'V (Johnson)', "g'", 'SDSS-r' -> 'b', 'b', 'v', 'g', 'r'."""
    return re.sub(r"[\s_\-.:/()'\[\]]+", "", _SYSTEM_WORDS.sub("", name)).lower()


@dataclass
class CmdSettings:
    """The colour-magnitude diagram: colour ``A - B`` of canonical filter names, and the magnitude axis."""

    color: str = field(default="blue - green", metadata=_check(
        lambda v: len([p for p in v.split("-") if p.strip()]) == 2, "'FILTER - FILTER', e.g. 'blue - green'"))
    magnitude: str = "green"

    @property
    def color_filters(self) -> tuple[str, str]:
        first, second = (p.strip() for p in self.color.split("-"))
        return first, second


def _keywords(*names: str) -> Any:
    return field(default_factory=lambda: list(names), metadata=_check(
        lambda v: len(v) >= 1 and all(k.strip() for k in v), "a non-empty list of FITS keywords"))


@dataclass
class HeaderSettings:
    """Which header keywords carry each fact, tried in order (the dialects of acquisition programs
    and observatory systems). An entry with ``*`` is a pattern over the header's keys, for HIERARCH
    cards ('* FILT* NAME' matches 'ESO INS FILT1 NAME'). The defaults equal reduction.frames'.
    """

    filter: list[str] = _keywords(*DEFAULT_KEYWORDS["filter"])
    kind: list[str] = _keywords(*DEFAULT_KEYWORDS["kind"])
    exposure: list[str] = _keywords(*DEFAULT_KEYWORDS["exposure"])
    gain: list[str] = _keywords(*DEFAULT_KEYWORDS["gain"])
    read_noise: list[str] = _keywords(*DEFAULT_KEYWORDS["read_noise"])
    date: list[str] = _keywords(*DEFAULT_KEYWORDS["date"])
    target: list[str] = _keywords(*DEFAULT_KEYWORDS["target"])

    def keywords(self) -> dict[str, tuple[str, ...]]:
        """The lists in the form ``reduction.frames.header_facts`` takes."""
        return {name: tuple(getattr(self, name)) for name in DEFAULT_KEYWORDS}


@dataclass
class TaggingSettings:
    """Rules that tag frames when the header alone does not say (header first, these second)."""

    offset_patterns: list[str] = field(default_factory=lambda: ["offset", "sky"])
    offset_distance_arcmin: float = _num(10.0)
    target_from_filename: str = field(default=r"^(?P<target>[A-Za-z]+[ _-]?\d+)", metadata=_check(
        lambda v: "(?P<target>" in v, "a regular expression with a (?P<target>...) group"))
    filter_from_filename: str = r"[_-](?P<filter>[A-Za-z]+)[_-]?\d*\.f"
    #: A frame whose OBJECT names no known target but points this close to one belongs to it (typos).
    same_field_arcmin: float = _num(2.0)


@dataclass
class ReductionSettings:
    """Per-frame reduction parameters."""

    hot_pixel_sigma: float = _num(6.0)
    hot_pixel_box: int = field(default=5, metadata=_check(lambda v: v >= 3 and v % 2 == 1, "an odd integer >= 3"))
    background_box: int = field(default=64, metadata=_check(lambda v: v >= 8, "an integer >= 8 (pixels)"))
    background_filter: int = field(default=3, metadata=_check(lambda v: v >= 1 and v % 2 == 1, "an odd integer >= 1"))
    detect_sigma: float = _num(5.0)
    fwhm_guess_px: float = _num(3.5)
    registration_max_rms_px: float = _num(0.5)
    registration_min_matches: int = field(default=6, metadata=_check(lambda v: v >= 3, "an integer >= 3"))
    stack_reject_sigma: float = _num(5.0)
    saturation_adu: float = _num(60000.0)
    exposure_group_factor: float = _num(3.0, check=lambda v: v > 1, expected="a number > 1 (ratio of exposure times)")
    min_response: float = field(default=0.5, metadata=_check(lambda v: 0 <= v < 1,
                                                             "a fraction in [0, 1) (0: no vignetting mask)"))


@dataclass
class PhotometrySettings:
    """Aperture and PSF photometry on the stacks."""

    aperture_fwhm: float = _num(1.5, expected="a number > 0 (aperture radius in units of the FWHM)")
    annulus_fwhm: list[float] = field(default_factory=lambda: [4.0, 6.0], metadata=_check(
        lambda v: len(v) == 2 and 0 < v[0] < v[1], "[inner, outer] with 0 < inner < outer (in FWHM)"))
    detect_sigma: float = _num(5.0)
    min_coverage: float = field(default=0.5, metadata=_check(_fraction, "a fraction in (0, 1]"))
    nonlinear_fraction: float = field(default=0.8, metadata=_check(_fraction, "a fraction in (0, 1]"))
    psf: bool = False
    blend_level: float = field(default=0.02, metadata=_check(_fraction, "a fraction in (0, 1]"))


@dataclass
class QualitySettings:
    """Limits that decide whether a frame is stacked; relative ones compare with the target's running median."""

    max_fwhm_ratio: float = field(default=1.5, metadata=_check(lambda v: v >= 1, "a number >= 1"))
    max_elongation: float = field(default=1.35, metadata=_check(lambda v: v >= 1, "a number >= 1"))
    min_transparency: float = field(default=0.6, metadata=_check(_fraction, "a fraction in (0, 1]"))
    min_stars: int = field(default=10, metadata=_check(_non_negative, "an integer >= 0"))
    max_fwhm_arcsec: float | None = None
    #: Frames of an exposure group stacked provisionally before they are judged together: one frame is no
    #: baseline (a clouded first frame would be the flux reference, a very sharp one the seeing baseline).
    baseline_frames: int = field(default=3, metadata=_check(lambda v: isinstance(v, int) and v >= 1,
                                                            "an integer >= 1"))


@dataclass
class CompletionSettings:
    """When a target has enough data to move on."""

    min_frames: int = field(default=8, metadata=_check(lambda v: v >= 1, "an integer >= 1"))
    target_snr: float = _num(20.0)
    snr_at_mag: float | None = None
    depth_below_turnoff: float = _num(5.0, expected="a number > 0 (magnitudes below the turn-off)")
    limiting_mag: float | None = None
    require_offset: bool = True
    require_turnoff: bool = True
    turnoff_saturated_fraction: float = field(default=0.2, metadata=_check(_fraction, "a fraction in (0, 1]"))
    short_margin_mag: float = _num(1.0, check=_non_negative, expected="a number >= 0 (magnitudes)")
    min_short_frames: int = field(default=3, metadata=_check(lambda v: v >= 1, "an integer >= 1"))


@dataclass
class CameraSettings:
    """Facts about the camera when its headers do not carry them."""

    plate_scale_arcsec: float | None = None
    gain: float | None = None
    read_noise: float | None = None


@dataclass
class ServiceSettings:
    """The watcher and the service loop."""

    stable_seconds: float = _num(0.5)
    quarantine_after_seconds: float = _num(60.0)
    rescan_seconds: float = _num(30.0)
    product_throttle_seconds: float = field(default=3.0, metadata=_check(_non_negative, "a number >= 0"))
    queue_size: int = field(default=1024, metadata=_check(lambda v: v >= 1, "an integer >= 1"))
    reprocess_checkpoint_frames: int = field(default=10, metadata=_check(lambda v: v >= 1, "an integer >= 1"))


@dataclass
class AgeSettings:
    """Isochrone fitting of the cluster's age."""

    enabled: bool = True
    metallicity: float = field(default=0.0, metadata=_check(lambda v: -2.3 <= v <= 0.3,
                                                            "[M/H] between -2.3 and 0.3"))
    fit_metallicity: bool = False
    metallicity_sigma: float | None = field(default=None, metadata=_check(
        lambda v: v is None or 0.0 < v <= 1.0, "null (no prior) or a prior width in dex, 0-1"))
    color_scale: list[float] = field(default_factory=lambda: [1.0, 1.0], metadata=_check(
        lambda v: len(v) == 2 and 0.5 <= v[0] <= v[1] <= 2.0,
        "[low, high] with 0.5 <= low <= high <= 2 (equal values: a fixed colour term)"))
    systematic_dex: float = field(default=0.05, metadata=_check(_non_negative, "a number >= 0 (dex)"))
    distance_modulus: float | None = None
    ebv: float | None = None
    calibrated_zeropoints: bool = False
    bootstrap: int = field(default=30, metadata=_check(_non_negative, "an integer >= 0"))
    throttle_seconds: float = field(default=20.0, metadata=_check(_non_negative, "a number >= 0"))


@dataclass
class Settings:
    """Everything observer can be told; see config.yaml for the documented defaults."""

    filters: FilterSettings = field(default_factory=FilterSettings)
    header: HeaderSettings = field(default_factory=HeaderSettings)
    cmd: CmdSettings = field(default_factory=CmdSettings)
    tagging: TaggingSettings = field(default_factory=TaggingSettings)
    reduction: ReductionSettings = field(default_factory=ReductionSettings)
    photometry: PhotometrySettings = field(default_factory=PhotometrySettings)
    quality: QualitySettings = field(default_factory=QualitySettings)
    completion: CompletionSettings = field(default_factory=CompletionSettings)
    camera: CameraSettings = field(default_factory=CameraSettings)
    service: ServiceSettings = field(default_factory=ServiceSettings)
    age: AgeSettings = field(default_factory=AgeSettings)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"a mapping of {_describe(k)} to {_describe(v)}"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the type hint ``tp``; ints are accepted where a float is expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': expected {_describe(tp)}, got {value!r}")
    if origin is dict:
        ktp, vtp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected {_describe(tp)}, got {value!r}")
        return {_coerce(k, ktp, f"{key}.{k}"): _coerce(v, vtp, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (etp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected {_describe(tp)}, got {value!r}")
        return [_coerce(v, etp, f"{key}[{i}]") for i, v in enumerate(value)]
    ok = {
        type(None): value is None,
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if not ok:
        raise ConfigError(f"config key '{key}': expected {_describe(tp)}, got {value!r}")
    return float(value) if tp is float else value


def _merge(instance: Any, overrides: dict, prefix: str) -> Any:
    if not isinstance(overrides, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<top>'}': expected a mapping of keys, "
                          f"got {overrides!r}")
    hints = typing.get_type_hints(type(instance))
    fields = {f.name: f for f in dataclasses.fields(instance)}
    changes = {}
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key '{dotted}'; expected one of: {', '.join(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            changes[key] = _merge(getattr(instance, key), value or {}, f"{dotted}.")
            continue
        coerced = _coerce(value, tp, dotted)
        if isinstance(coerced, dict):
            # Tables (aliases, zeropoints, bands) merge into the defaults: "only the keys you change".
            coerced = {**getattr(instance, key), **coerced}
        meta = fields[key].metadata
        if coerced is not None and "check" in meta and not meta["check"](coerced):
            raise ConfigError(f"config key '{dotted}': expected {meta['expected']}, got {value!r}")
        changes[key] = coerced
    return dataclasses.replace(instance, **changes)


def _validate_cross(settings: Settings) -> None:
    """Checks that involve more than one key."""
    known = set(settings.filters.aliases.values())
    default = settings.filters.default_filter
    if default is not None and settings.filters.normalise(default) is None:
        raise ConfigError(f"config key 'filters.default_filter': expected a name in filters.aliases, got {default!r}")
    for name in (*settings.cmd.color_filters, settings.cmd.magnitude):
        if name not in known:
            raise ConfigError(f"config key 'cmd': filter '{name}' is not a canonical name in filters.aliases "
                              f"(expected one of: {', '.join(sorted(known))})")


def load_settings(path: str | Path | None = None) -> Settings:
    """Defaults, overridden by the YAML file at ``path`` when given."""
    if path is None:
        return Settings()
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it ({exc.strerror or exc})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML ({exc})") from exc
    return settings_from_dict(data)


def settings_from_dict(data: dict | None) -> Settings:
    """Defaults overridden by ``data``: a parsed config file, or ``settings_to_dict``'s output (how a task
    on another machine gets the settings: a plain dict travels, a file path may not exist there)."""
    if data is None:
        return Settings()
    settings = _merge(Settings(), data, "")
    _validate_cross(settings)
    return settings


def settings_to_dict(settings: Settings) -> dict:
    """Plain nested dict (for headers, products and the README check)."""
    return dataclasses.asdict(settings)
