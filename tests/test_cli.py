"""The command line: verbs, help, version, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "observer.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith("observer ")


@pytest.mark.parametrize("verb, words", [("simulate", "--cadence"), ("watch", "--headless"),
                                         ("reprocess", "--out"), ("demo", "--size")])
def test_every_verb_has_help(verb, words):
    result = run(verb, "--help")
    assert result.returncode == 0 and words in result.stdout


def test_bad_usage_exits_2(tmp_path):
    assert run().returncode == 2
    assert run("reprocess", str(tmp_path)).returncode == 2                  # --out missing
    result = run("simulate", str(tmp_path / "cam"), "--frames", "0")
    assert result.returncode == 2 and "--frames" in result.stderr
    for size in ("32", "640x", "640x40", "wide"):
        result = run("simulate", str(tmp_path / "cam"), "--size", size)
        assert result.returncode == 2 and "'--size': expected N or WIDTHxHEIGHT" in result.stderr, size
    assert not (tmp_path / "cam").exists()


def test_output_inside_camera_folder_is_refused(tmp_path):
    cam = tmp_path / "cam"
    cam.mkdir()
    result = run("watch", str(cam), "--out", str(cam / "products"), "--headless")
    assert result.returncode == 2 and "inside the camera folder" in result.stderr


def test_reprocess_of_a_missing_folder_fails_clearly(tmp_path):
    result = run("reprocess", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert result.returncode in (1, 2) and "nope" in result.stderr


def test_reprocess_verbose_ends_with_where_the_time_went(tmp_path):
    """`reprocess -v` names every per-frame step and the final products with their seconds (README)."""
    import re

    from observer.frame_path import STEPS

    sim = run("simulate", str(tmp_path / "cam"), "--size", "256", "--frames", "2", "--short", "0:0")
    assert sim.returncode == 0, sim.stderr
    result = run("-v", "reprocess", str(tmp_path / "cam"), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-2000:]
    match = re.search(r"reprocess timings \(s, summed over (\d+) files\): (.*)", result.stderr)
    assert match and int(match.group(1)) == len(list((tmp_path / "cam").glob("*.fits")))
    seconds = dict(part.rsplit(" ", 1) for part in match.group(2).split(", "))
    assert {name for name, _ in STEPS} | {"final products", "checkpoint"} <= set(seconds)
    assert all(float(v) >= 0 for v in seconds.values()) and float(seconds["final products"]) > 0
