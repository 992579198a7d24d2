"""Tagging: header first, config rules second; offset frames by name, OBJECT or pointing."""

import pytest
from astropy.io import fits

from observer.config import Settings, load_settings
from observer.tagging import TaggingError, Tags, angular_distance_arcmin, kind_from_type, normalise_target, tag_facts
from reduction.frames import HeaderFacts, header_facts

S = Settings()


def tag_frame(path: str, imagetyp: str | None, obj: str | None, filt: str | None,
              pointing: tuple[float, float] | None, settings: Settings,
              science_pointings: dict[str, tuple[float, float]]) -> Tags:
    """tag_facts on header facts made of loose values: each case below reads as one line."""
    ra, dec = pointing if pointing is not None else (None, None)
    facts = HeaderFacts(imagetyp=imagetyp, object=obj, filter=filt, ra_deg=ra, dec_deg=dec,
                        sources={"filter": "FILTER"} if filt is not None else {})
    return tag_facts(path, facts, settings, science_pointings)


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


# ---------------------------------------------------------------- header dialects (issue 11, 19)


def _facts(**cards):
    header = fits.Header()
    for key, value in cards.items():
        header[key.replace("_", "-") if key in ("DATE_OBS", "MJD_OBS", "TIME_OBS") else key] = value
    return header_facts(header)


@pytest.mark.parametrize("value, canonical", [
    ("JohnsonB", "blue"), ("Johnson_V", "green"), ("B-Bessell", "blue"), ("Bessel V", "green"),
    ("V (Johnson)", "green"), ("B_JOHNSON", "blue"), ("sloan_g", "green"), ("g'", "green"), ("SDSS-r", "red")])
def test_observatory_filter_spellings(value, canonical):
    assert S.filters.normalise(value) == canonical


@pytest.mark.parametrize("value", ["science", "object", "light", "OBJECT", "Light Frame"])
def test_science_kinds_in_any_case(value):
    assert kind_from_type(value) == "science"


@pytest.mark.parametrize("value, kind", [("zero", "bias"), ("dome flat", "flat"), ("sky flat", "flat"),
                                         ("DOMEFLAT", "flat"), ("Twilight", "flat")])
def test_calibration_kinds(value, kind):
    assert kind_from_type(value) == kind


@pytest.mark.parametrize("obj", ["M35 B", "M35_Blue", "m35 green", "M35-V", "M 35"])
def test_object_carrying_the_filter_names_one_target(obj):
    assert normalise_target(obj, S.tagging.offset_patterns, S.filters) == "M35"


@pytest.mark.parametrize("key", ["FILTER", "FILTER1", "FILTER2", "FILTNAME", "FILTNAM", "FILT", "INSFLNAM",
                                 "INSFILTE", "ALFLTNM", "FILTERS"])
def test_every_filter_keyword(key):
    facts = _facts(IMAGETYP="LIGHT", OBJECT="M35", **{key: "Bessel V"})
    assert facts.sources["filter"] == key
    assert tag_facts("x.fits", facts, S, {}).filter == "green"


def test_hierarch_filter_card_and_empty_second_wheel():
    header = fits.Header()
    header["HIERARCH ESO INS FILT1 NAME"] = "B_JOHNSON"
    header["FILTER2"] = "Open"
    header["OBSTYPE"] = "SCIENCE"
    header["OBJECT"] = "NGC2420"
    facts = header_facts(header)
    assert facts.sources["filter"] == "ESO INS FILT1 NAME"
    assert tag_facts("x.fits", facts, S, {}).filter == "blue"


def test_gain_only_when_plausible_and_read_noise_spellings():
    facts = _facts(GAIN=100, EGAIN=1.3, CCDRON=7.5)
    assert (facts.gain, facts.sources["gain"]) == (1.3, "EGAIN")
    assert (facts.read_noise, facts.sources["read_noise"]) == (7.5, "CCDRON")
    assert _facts(CCDGAIN=25).gain is None


@pytest.mark.parametrize("cards, iso", [({"DATE_OBS": "21/12/90", "TIME_OBS": "03:04:05"}, "1990-12-21T03:04:05"),
                                        ({"MJD_OBS": 48246.5}, "1990-12-21T12:00:00"),
                                        ({"JD": 2448247.0}, "1990-12-21T12:00:00")])
def test_date_dialects(cards, iso):
    facts = _facts(**cards)
    assert facts.date_obs.isot[:19] == iso


def test_target_from_field_and_exposure_from_itime():
    facts = _facts(IMAGETYP="object", FIELD="NGC 2420", FILTER="V", ITIME=3.0)
    assert (facts.object, facts.sources["target"], facts.exptime) == ("NGC 2420", "FIELD", 3.0)


def test_unknown_filter_names_keyword_value_and_config_key():
    facts = _facts(IMAGETYP="LIGHT", OBJECT="M35", FILTNAM="Hbeta")
    with pytest.raises(TaggingError, match=r"FILTNAM='Hbeta'.*filters\.aliases"):
        tag_facts("x.fits", facts, S, {})


def test_contradictory_filter_keywords():
    facts = _facts(IMAGETYP="LIGHT", OBJECT="M35", FILTER1="B", FILTER2="V")
    with pytest.raises(TaggingError, match=r"contradictory.*FILTER1='B'.*FILTER2='V'"):
        tag_facts("x.fits", facts, S, {})
    # The same band spelt twice is no contradiction.
    same = _facts(IMAGETYP="LIGHT", OBJECT="M35", FILTER="B", INSFLNAM="JohnsonB")
    assert tag_facts("x.fits", same, S, {}).filter == "blue"


def test_target_by_pointing_when_object_missing_or_misspelt():
    science = {"NGC2420": (114.6, 21.57)}
    missing = _facts(IMAGETYP="LIGHT", FILTER="V", RA=114.601, DEC=21.571)
    assert tag_facts("img_0001.fits", missing, S, science).target == "NGC2420"
    typo = _facts(IMAGETYP="LIGHT", FILTER="V", OBJECT="NCG2420 V", RA=114.601, DEC=21.571)
    assert tag_facts("img_0002.fits", typo, S, science).target == "NGC2420"
    elsewhere = _facts(IMAGETYP="LIGHT", FILTER="V", OBJECT="M67", RA=132.8, DEC=11.8)
    assert tag_facts("img_0003.fits", elsewhere, S, science).target == "M67"


def test_calibration_frames_never_create_targets():
    for kind in ("zero", "dark", "dome flat"):
        facts = _facts(OBSTYPE=kind, OBJECT=f"M35 {kind}", FILTER="B")
        assert tag_facts("x.fits", facts, S, {}).target == ""


def test_upper_case_extension_names_tagged():
    assert tag_frame("M45_L.FTS", "LIGHT", "M45", None, None, S, {}).filter == "luminance"
    assert tag_frame("M35_B.FIT", "LIGHT", "M35", None, None, S, {}).filter == "blue"


def test_default_filter_for_a_camera_without_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("filters:\n  default_filter: L\n")
    settings = load_settings(path)
    assert tag_frame("img_0001.fits", "LIGHT", "M45", None, None, settings, {}).filter == "luminance"


def test_one_alias_merges_into_the_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("filters:\n  aliases:\n    I: red\n  zeropoints:\n    red: 24.0\n")
    settings = load_settings(path)
    assert settings.filters.normalise("I") == "red" and settings.filters.normalise("B") == "blue"
    assert settings.filters.zeropoint("red") == 24.0 and settings.filters.zeropoint("blue") == 25.0
    assert settings.filters.bands == S.filters.bands


def test_configured_keyword_list(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("header:\n  filter: [WHEEL]\n")
    settings = load_settings(path)
    header = fits.Header()
    header["WHEEL"], header["FILTER"] = "V", "B"
    assert header_facts(header, settings.header.keywords()).filter == "V"
