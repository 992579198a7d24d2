"""Tag a frame: kind (science, offset, bias, dark, flat), target and filter.

Header first, config rules second (README "Products"). The frame type comes from
IMAGETYP/FRAMETYP/FRAME in the many spellings acquisition programs use; an
offset (blank sky) frame is usually written as an ordinary light frame, so it is
recognised by the configured OBJECT / file-name patterns or by a pointing far
from the target's science pointing. A frame that cannot be tagged gets a reason
and is not guessed.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from observer.config import FilterSettings, Settings
from reduction.frames import HeaderFacts

log = logging.getLogger(__name__)

#: Words of IMAGETYP values -> kind, checked in order (so "Dark Flat" is a flat's dark... rare; first wins).
_TYPE_WORDS = (
    ("bias", "bias"), ("zero", "bias"), ("offset", "offset"),
    ("dark", "dark"), ("flat", "flat"), ("dome", "flat"), ("twilight", "flat"), ("sky", "offset"),
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


def frame_kind(name: str, facts: HeaderFacts) -> str | None:
    """The kind the header's frame type, the file name or OBJECT says (None when none says one)."""
    return kind_from_type(facts.imagetyp) or _kind_from_name(name) or _kind_from_name(facts.object or "")


def matches_offset_pattern(text: str | None, patterns: list[str]) -> bool:
    """True when ``text`` carries one of the offset words as a separate token ("M35_offset", "sky 2")."""
    if not text:
        return False
    lowered = str(text).lower()
    return any(re.search(rf"(^|[^a-z]){re.escape(p.lower())}([^a-z]|$)", lowered) for p in patterns)


def normalise_target(name: str, patterns: list[str], filters: FilterSettings | None = None) -> str:
    """'M35', 'm 35', 'M35_offset', 'NGC 2168 sky' -> 'M35' / 'NGC2168': offset words and separators removed.

    With ``filters``, a trailing filter name is removed too ('M35 B', 'M35_Blue', 'NGC2420-V'): many
    observers write the filter into OBJECT, and it must not split one cluster into one target per filter.
    """
    text = str(name)
    for p in patterns:
        text = re.sub(rf"(?i)(^|[^a-z]){re.escape(p)}([^a-z]|$)", r"\1\2", text)
    if filters is not None:
        last = re.fullmatch(r"(?P<head>.*?[^\s_\-])[\s_\-]+(?P<tail>[^\s_\-]*[A-Za-z][^\s_\-]*)",
                            text.strip(" _-"))
        if last and filters.normalise(last["tail"]):
            text = last["head"]
    text = re.sub(r"[\s_\-.:/]+", "", text)
    return text.upper()


def angular_distance_arcmin(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    """Great-circle distance between two pointings in degrees, returned in arcmin (haversine)."""
    r1, d1, r2, d2 = map(math.radians, (ra1, dec1, ra2, dec2))
    h = math.sin((d2 - d1) / 2) ** 2 + math.cos(d1) * math.cos(d2) * math.sin((r2 - r1) / 2) ** 2
    return math.degrees(2 * math.asin(min(1.0, math.sqrt(h)))) * 60.0


def _filter_of(name: str, facts: HeaderFacts, kind: str, settings: Settings) -> str:
    """Canonical filter from the header cards, else the file name, else the configured default.

    Two cards naming different known filters are a contradiction, not a choice; a header name the
    alias table does not know is an error that says where to add it (``filters.aliases``).
    """
    filters = settings.filters
    known = [(key, value, filters.normalise(value)) for key, value in facts.filter_cards]
    if facts.filter is not None and not known:
        known = [(facts.sources.get("filter", "FILTER"), facts.filter, filters.normalise(facts.filter))]
    named = [k for k in known if k[2]]
    other = next((k for k in named if k[2] != named[0][2]), None)
    if other is not None:
        first = named[0]
        raise TaggingError(f"contradictory filter keywords: {first[0]}='{first[1]}' ({first[2]}) but "
                           f"{other[0]}='{other[1]}' ({other[2]}); fix the header or list only one keyword "
                           f"under header.filter")
    if known and known[0][2] is None and kind not in ("bias", "dark"):
        key, value, _ = known[0]
        raise TaggingError(f"unknown filter {key}='{value}': add it under filters.aliases "
                           f"(e.g. filters: {{aliases: {{'{value}': <canonical name>}}}})")
    if named:
        return named[0][2]
    match = re.search(settings.tagging.filter_from_filename, name, re.IGNORECASE)
    guess = filters.normalise(match.group("filter")) if match else None
    return guess or (filters.normalise(filters.default_filter) if filters.default_filter else "") or ""


def _nearest_target(pointing: tuple[float, float] | None, pointings: dict[str, tuple[float, float]],
                    radius_arcmin: float) -> str:
    """The known target whose science pointing is nearest ``pointing`` and within the radius, or ''."""
    if pointing is None or not pointings:
        return ""
    distance, name = min((angular_distance_arcmin(*pointing, *ref), name) for name, ref in pointings.items())
    return name if distance <= radius_arcmin else ""


def _target_of(name: str, obj: str | None, pointing: tuple[float, float] | None, settings: Settings,
               pointings: dict[str, tuple[float, float]]) -> str:
    """Target from OBJECT, else the file name, else the pointing; a new name pointing at a known field
    (a typo, 'NCG2420' for 'NGC2420') is that field's target."""
    rules = settings.tagging
    target = normalise_target(obj, rules.offset_patterns, settings.filters) if obj else ""
    if not target:
        match = re.search(rules.target_from_filename, name, re.IGNORECASE)
        if match:
            target = normalise_target(match.group("target"), rules.offset_patterns, settings.filters)
    if not target:
        return _nearest_target(pointing, pointings, rules.offset_distance_arcmin)
    if target not in pointings:
        same = _nearest_target(pointing, pointings, rules.same_field_arcmin)
        if same:
            log.info("%s: OBJECT %r points at %s's field: taken as %s", name, obj, same, same)
            return same
    return target


def tag_facts(path: str | Path, facts: HeaderFacts, settings: Settings,
              science_pointings: dict[str, tuple[float, float]]) -> Tags:
    """Tags for one frame from its header facts and the night so far.

    ``science_pointings`` maps a target to the pointing of its science frames (known once its first
    science frame is in): it recognises an offset frame written as a plain light frame of the target,
    and a frame's target when OBJECT is missing or misspelt. An untaggable frame raises
    :class:`TaggingError` and is logged once as a warning naming the file, keyword and value.
    """
    name = Path(path).name
    try:
        return _tag(name, facts, settings, science_pointings)
    except TaggingError as exc:
        log.warning("%s: %s", name, exc)
        raise


def _tag(name: str, facts: HeaderFacts, settings: Settings,
         science_pointings: dict[str, tuple[float, float]]) -> Tags:
    rules = settings.tagging
    obj = facts.object
    pointing = (facts.ra_deg, facts.dec_deg) if facts.ra_deg is not None and facts.dec_deg is not None else None
    kind = frame_kind(name, facts)
    if kind is None:
        if obj or re.search(rules.target_from_filename, name, re.IGNORECASE) or \
                _nearest_target(pointing, science_pointings, rules.offset_distance_arcmin):
            kind = "science"
        else:
            raise TaggingError("no frame type (header.kind keywords: IMAGETYP, FRAMETYP, FRAME, OBSTYPE) "
                               "and no OBJECT or target in the file name")
    filter_name = _filter_of(name, facts, kind, settings)
    if kind in ("bias", "dark", "flat"):
        # Calibration frames never create targets, whatever their OBJECT says.
        if kind == "flat" and not filter_name:
            raise TaggingError("flat without a filter (header.filter keywords) and none in the file name")
        return Tags(kind=kind, target="", filter=filter_name)
    if not filter_name:
        raise TaggingError("no FILTER (or another header.filter keyword) in the header and none recognised in "
                           "the file name; set filters.default_filter for a camera without filters")
    target = _target_of(name, obj, pointing, settings, science_pointings)
    if not target:
        raise TaggingError("no OBJECT (header.target keywords) in the header, no target recognised in the "
                           "file name and no known target at this pointing")
    if kind == "science":
        if matches_offset_pattern(obj, rules.offset_patterns) or matches_offset_pattern(
                Path(name).stem, rules.offset_patterns):
            kind = "offset"
        elif pointing is not None and target in science_pointings:
            ref = science_pointings[target]
            if angular_distance_arcmin(*pointing, *ref) > rules.offset_distance_arcmin:
                kind = "offset"
    return Tags(kind=kind, target=target, filter=filter_name)
