"""Configuration: the documented file equals the defaults; every kind of bad value is refused, naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest

from observer.config import ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_documented_config_equals_defaults():
    assert load_settings(ROOT / "config.yaml") == Settings()


def test_override_merges_over_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("filters:\n  zeropoints:\n    blue: 23.5\nquality:\n  max_elongation: 1.5\n")
    settings = load_settings(path)
    assert settings.filters.zeropoint("blue") == 23.5
    assert settings.filters.zeropoint("unknownfilter") == 25.0
    assert settings.quality.max_elongation == 1.5
    assert settings.quality.min_transparency == Settings().quality.min_transparency


def test_aliases_normalise_real_camera_names():
    filters = Settings().filters
    assert [filters.normalise(n) for n in ("B", "Blue", "blue", " BLUE ", "G", "V", "Green", "R", "Red",
                                           "Luminance")] == \
        ["blue"] * 4 + ["green"] * 3 + ["red"] * 2 + ["luminance"]
    assert Settings().cmd.color_filters == ("blue", "green")


@pytest.mark.parametrize("text, key", [
    ("reduction:\n  hot_pixel_sigma: -1\n", "reduction.hot_pixel_sigma"),        # impossible value
    ("reduction:\n  hot_pixel_box: 4\n", "reduction.hot_pixel_box"),            # even box
    ("quality:\n  min_transparency: 1.5\n", "quality.min_transparency"),        # out of range
    ("quality:\n  max_elongation: fast\n", "quality.max_elongation"),           # wrong type
    ("qualty:\n  max_elongation: 1.2\n", "qualty"),                             # typo in a section
    ("quality:\n  max_elongaton: 1.2\n", "quality.max_elongaton"),              # typo in a key
    ("filters:\n  zeropoints:\n    blue: bright\n", "filters.zeropoints.blue"), # wrong type inside a mapping
    ("tagging:\n  offset_patterns: offset\n", "tagging.offset_patterns"),       # string for a list
    ("cmd:\n  color: blue\n", "cmd.color"),                                     # not 'A - B'
    ("cmd:\n  color: blue - purple\n", "cmd"),                                  # unknown filter
    ("photometry:\n  annulus_fwhm: [6, 4]\n", "photometry.annulus_fwhm"),
    ("completion:\n  require_offset: 3\n", "completion.require_offset"),
    ("- just\n- a list\n", "<top>"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert f"'{key}'" in str(info.value)
    assert "expected" in str(info.value)


@pytest.mark.parametrize("verb", [["reprocess", "x", "--out", "y"], ["watch", "x", "--out", "y"],
                                  ["simulate", "x"]])
def test_bad_config_exits_2_from_the_command_line(tmp_path, verb):
    path = tmp_path / "bad.yaml"
    path.write_text("reduction:\n  detect_sigma: zero\n")
    result = subprocess.run([sys.executable, "-m", "observer.cli", *verb, "--config", str(path)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "reduction.detect_sigma" in result.stderr


def test_missing_and_broken_config_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("quality: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(broken)


def test_a_config_with_one_alias_keeps_the_default_aliases(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("filters: {aliases: {I: red}}\n")
    filters = load_settings(path).filters
    assert [filters.normalise(n) for n in ("I", "B", "V", "Luminance")] == ["red", "blue", "green", "luminance"]
