"""Tagging: header first, config rules second; offset frames by name, OBJECT or pointing."""

import pytest

from observer.config import Settings
from observer.tagging import TaggingError, angular_distance_arcmin, kind_from_type, normalise_target, tag_frame

S = Settings()


@pytest.mark.parametrize("value, kind", [("Light Frame", "science"), ("LIGHT", "science"), ("Object", "science"),
                                         ("Dark Frame", "dark"), ("DARK", "dark"), ("Flat Field", "flat"),
                                         ("FLAT", "flat"), ("Bias Frame", "bias"), ("ZERO", "bias"),
                                         (None, None), ("", None), ("weird", None)])
def test_kind_spellings(value, kind):
    assert kind_from_type(value) == kind


@pytest.mark.parametrize("name", ["M35", "m 35", "M35_offset", "m35 sky", "M-35"])
def test_target_names_normalise(name):
    assert normalise_target(name, S.tagging.offset_patterns) == "M35"


def test_science_and_offset_by_object_and_by_name():
    t = tag_frame("M35_blue_001.fits", "Light Frame", "M35", "Blue", None, S, {})
    assert (t.kind, t.target, t.filter) == ("science", "M35", "blue")
    t = tag_frame("M35_offset_blue.fits", "Light Frame", "M35", "B", None, S, {})
    assert (t.kind, t.target, t.filter) == ("offset", "M35", "blue")
    t = tag_frame("img_0007.fits", "LIGHT", "M35 sky", "V", None, S, {})
    assert (t.kind, t.target, t.filter) == ("offset", "M35", "green")


def test_offset_by_pointing_distance():
    science = {"M35": (92.25, 24.33)}
    near = tag_frame("a.fits", "Light Frame", "M35", "G", (92.26, 24.34), S, science)
    far = tag_frame("b.fits", "Light Frame", "M35", "G", (92.25, 24.33 + 20 / 60), S, science)
    assert near.kind == "science" and far.kind == "offset"
    assert angular_distance_arcmin(92.25, 24.33, 92.25, 24.33 + 20 / 60) == pytest.approx(20.0, rel=1e-6)


def test_header_missing_falls_back_to_file_name_rules():
    t = tag_frame("NGC2168_green_003.fits", None, None, None, None, S, {})
    assert (t.kind, t.target, t.filter) == ("science", "NGC2168", "green")
    assert tag_frame("dark_001.fits", None, None, None, None, S, {}).kind == "dark"
    assert tag_frame("flat_blue_002.fits", "Flat Field", None, "B", None, S, {}).filter == "blue"


def test_untaggable_frames_give_a_reason():
    with pytest.raises(TaggingError, match="FILTER"):
        tag_frame("M35_001.fits", "Light Frame", "M35", None, None, S, {})
    with pytest.raises(TaggingError, match="OBJECT"):
        tag_frame("image.fits", "Light Frame", None, "B", None, S, {})


def test_file_name_filter_guess_must_be_a_known_filter():
    with pytest.raises(TaggingError, match="FILTER"):
        tag_frame("no_filter.fits", "Light Frame", "M35", None, None, S, {})
    assert tag_frame("M35_Blue_004.fits", "Light Frame", "M35", None, None, S, {}).filter == "blue"
