"""Tag a frame: kind (science, offset, bias, dark, flat), target and filter.

Header first, config rules second (DESIGN.md). The frame type comes from
IMAGETYP/FRAMETYP/FRAME in the many spellings acquisition programs use; an
offset (blank sky) frame is usually written as an ordinary light frame, so it is
recognised by the configured OBJECT / file-name patterns or by a pointing far
from the target's science pointing. A frame that cannot be tagged gets a reason
and is not guessed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from observer.config import Settings

KINDS = ("science", "offset", "bias", "dark", "flat")

#: Words of IMAGETYP values -> kind, checked in order (so "Dark Flat" is a flat's dark... rare; first wins).
_TYPE_WORDS = (
    ("bias", "bias"), ("zero", "bias"), ("offset", "offset"),
    ("dark", "dark"), ("flat", "flat"), ("sky", "offset"),
    ("light", "science"), ("object", "science"), ("science", "science"), ("target", "science"),
)


class TaggingError(ValueError):
    """The frame cannot be tagged; the message is the reason recorded for it."""


@dataclass(frozen=True)
class Tags:
    kind: str
    target: str
    filter: str


def kind_from_type(value: str | None) -> str | None:
    """Kind for an IMAGETYP-like value ('Light Frame', 'LIGHT', 'Flat Field', 'Bias Frame', ...)."""
    if not value:
        return None
    text = str(value).strip().lower()
    for word, kind in _TYPE_WORDS:
        if word in text:
            return kind
    return None


def _kind_from_name(name: str) -> str | None:
    lowered = name.lower()
    for kind in ("bias", "dark", "flat"):
        if re.search(rf"(^|[^a-z]){kind}", lowered):
            return kind
    return None


def matches_offset_pattern(text: str | None, patterns: list[str]) -> bool:
    """True when ``text`` carries one of the offset words as a separate token ("M35_offset", "sky 2")."""
    if not text:
        return False
    lowered = str(text).lower()
    return any(re.search(rf"(^|[^a-z]){re.escape(p.lower())}([^a-z]|$)", lowered) for p in patterns)


def normalise_target(name: str, patterns: list[str]) -> str:
    """'M35', 'm 35', 'M35_offset', 'NGC 2168 sky' -> 'M35' / 'NGC2168': offset words and separators removed."""
    text = str(name)
    for p in patterns:
        text = re.sub(rf"(?i)(^|[^a-z]){re.escape(p)}([^a-z]|$)", r"\1\2", text)
    text = re.sub(r"[\s_\-.:/]+", "", text)
    return text.upper()


def angular_distance_arcmin(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    """Great-circle distance between two pointings in degrees, returned in arcmin (haversine)."""
    r1, d1, r2, d2 = map(math.radians, (ra1, dec1, ra2, dec2))
    h = math.sin((d2 - d1) / 2) ** 2 + math.cos(d1) * math.cos(d2) * math.sin((r2 - r1) / 2) ** 2
    return math.degrees(2 * math.asin(min(1.0, math.sqrt(h)))) * 60.0


def tag_frame(path: str | Path, imagetyp: str | None, obj: str | None, filt: str | None,
              pointing: tuple[float, float] | None, settings: Settings,
              science_pointings: dict[str, tuple[float, float]]) -> Tags:
    """Tags for one frame from its header facts and the night so far.

    ``science_pointings`` maps a target to the pointing of its science frames
    (known once its first science frame is in); it lets an offset frame written
    as a plain light frame of the target be recognised by distance.
    """
    rules = settings.tagging
    name = Path(path).name
    kind = kind_from_type(imagetyp) or _kind_from_name(name)
    if kind is None:
        if obj or re.search(rules.target_from_filename, name):
            kind = "science"
        else:
            raise TaggingError("no frame type (IMAGETYP/FRAMETYP/FRAME) and no OBJECT or target in the file name")

    filter_name = settings.filters.normalise(filt)
    if filter_name is None and kind != "bias" and kind != "dark":
        # A guess from the file name counts only when it is a known filter name ("no_filter.fits" is not).
        match = re.search(rules.filter_from_filename, name)
        filter_name = settings.filters.known(match.group("filter")) if match else None
    if kind in ("bias", "dark"):
        return Tags(kind=kind, target="", filter=filter_name or "")
    if filter_name is None:
        raise TaggingError("no FILTER in the header and none recognised in the file name")
    if kind == "flat":
        return Tags(kind=kind, target="", filter=filter_name)

    target = ""
    if obj and normalise_target(obj, rules.offset_patterns):
        target = normalise_target(obj, rules.offset_patterns)
    else:
        match = re.search(rules.target_from_filename, name)
        if match:
            target = normalise_target(match.group("target"), rules.offset_patterns)
    if not target:
        raise TaggingError("no OBJECT in the header and no target recognised in the file name")

    if kind == "science":
        if matches_offset_pattern(obj, rules.offset_patterns) or matches_offset_pattern(
                Path(name).stem, rules.offset_patterns):
            kind = "offset"
        elif pointing is not None and target in science_pointings:
            ref = science_pointings[target]
            if angular_distance_arcmin(*pointing, *ref) > rules.offset_distance_arcmin:
                kind = "offset"
    return Tags(kind=kind, target=target, filter=filter_name)
