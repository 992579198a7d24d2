"""The checkpoint's own format: raw .npy array folders, and an older layout refused with the reason."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from observer import checkpoint
from observer.config import Settings
from observer.night import Night
from observer.simulator import SimSettings, simulate_night


def test_state_round_trips_as_raw_npy_and_unchanged_groups_are_hard_links(tmp_path):
    truth = simulate_night(tmp_path / "cam", SimSettings(size=256, frames=2, n_members=120, n_field=40,
                                                         short_frames=0, fill_seconds=0.0, bad_frames=False),
                           truth_path=tmp_path / "truth.ecsv")
    night = Night(Settings(), tmp_path / "out")
    for path in truth.files:
        night.process(path)
    night.checkpoint()
    first = checkpoint._current(checkpoint.state_dir(tmp_path / "out"))
    inodes = {p.relative_to(first): p.stat().st_ino for p in first.glob("acc__*/*.npy")}
    night.checkpoint()                                  # nothing changed: every array group is linked, not copied
    gen = checkpoint._current(checkpoint.state_dir(tmp_path / "out"))
    assert gen != first and not first.exists()
    assert not list(gen.rglob("*.npz")) and len(inodes) >= 2 * 8
    assert {rel: (gen / rel).stat().st_ino for rel in inodes} == inodes
    restored = checkpoint.load(tmp_path / "out")
    for name, target in night._state.targets.items():
        for fname, session in target.filters.items():
            again = restored.targets[name].filters[fname]
            for group, other in zip(session.groups, again.groups, strict=True):
                np.testing.assert_array_equal(group.accumulator.image(), other.accumulator.image())
                assert group.inputs == other.inputs
    assert [r.path for r in restored.records] == [r.path for r in night._state.records]


def test_an_older_checkpoint_is_refused_by_name_with_what_to_do(tmp_path):
    root = checkpoint.state_dir(tmp_path / "out")
    gen = root / "gen-000003"
    gen.mkdir(parents=True)
    (gen / "night.json").write_text(json.dumps({"version": 3, "records": [], "calibration_files": {},
                                                "targets": {}, "pending_offsets": [], "hot_maps": []}))
    (root / "current").write_text(gen.name)
    with pytest.raises(checkpoint.CheckpointError, match="older observer"):
        Night.restore(Settings(), tmp_path / "out")
    (tmp_path / "cam").mkdir()
    run = subprocess.run([sys.executable, "-m", "observer.cli", "reprocess", str(tmp_path / "cam"),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "saved by an older observer" in run.stderr and "new output folder" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_frames_held_for_the_first_judgement_survive_a_restart(tmp_path):
    """A group's first frames are stacked provisionally and held until three make a baseline; a night
    checkpointed and restored with two of them held judges them exactly as one never interrupted: the
    clouded first frame rejected after all, its record rewritten (one per file), the same stack."""
    truth = simulate_night(tmp_path / "cam", SimSettings(size=256, frames=4, filters=("blue",), n_members=150,
                                                         n_field=50, short_frames=0, fill_seconds=0.0,
                                                         first_bad="cloud", satellite=False),
                           truth_path=tmp_path / "truth.ecsv")
    science = [p for p in truth.files if "_blue_0" in p.name]
    whole = Night(Settings(), tmp_path / "whole")
    for path in science:
        whole.process(path)
    split = Night(Settings(), tmp_path / "split")
    for path in science[:2]:
        split.process(path)
    assert len(split._state.targets["M35"].filters["blue"].main.held) == 2
    split.checkpoint()
    resumed = Night.restore(Settings(), tmp_path / "split")
    for path in science[2:]:
        resumed.process(path)
    for night in (whole, resumed):
        records = {r.path: r for r in night.records}
        assert len(records) == len(night.records) == 4
        assert records[str(science[0])].status == "rejected" and "cloud" in records[str(science[0])].reason
        assert all(records[str(p)].status == "stacked" for p in science[1:])
    group, again = (n._state.targets["M35"].filters["blue"].main for n in (whole, resumed))
    assert again.inputs == group.inputs == [p.name for p in science[1:]] and not again.held
    np.testing.assert_allclose(again.accumulator.image(), group.accumulator.image(), rtol=1e-6, atol=1e-6)
    assert [r.transparency for r in resumed.records] == pytest.approx([r.transparency for r in whole.records])
    shown = {r.path: r for r in resumed.snapshot().frames}        # the frame log of the dashboard
    assert shown[str(science[0])].status == "rejected" and "judged with" in shown[str(science[0])].reason
    resumed.checkpoint()
    assert checkpoint.load(tmp_path / "split").targets["M35"].filters["blue"].main.settled
