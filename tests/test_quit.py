"""Quitting while an age fit runs: the service stops without waiting for the fit (it refits at the next
start), and the process exits cleanly.

Before, the interpreter's teardown under the still-running fit aborted the process in native code
("terminate called without an active exception", SIGABRT) in 2 of 5 tries, and once in the tmux test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from observer.simulator import SimSettings, simulate_night


def test_sigterm_during_the_age_fit_exits_0_and_the_next_start_fits_it(tmp_path):
    cam, out = tmp_path / "cam", tmp_path / "out"
    simulate_night(cam, SimSettings(size=1024, frames=2, fill_seconds=0.0, seed=4), truth_path=tmp_path / "t.ecsv")
    cmd = [sys.executable, "-m", "observer.cli", "-v", "watch", str(cam), "--out", str(out), "--headless"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 240
        for line in proc.stderr:
            assert time.monotonic() < deadline, "no catalogue"
            if "catalogue:" in line:          # the age fit starts right after it and takes seconds
                time.sleep(1.0)
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.stderr.read()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, rest[-2000:]
    # Under load the fit may not have started yet (then it is dropped, and the process ends normally).
    assert ("exiting while an age fit runs: it is made again at the next start" in rest
            or "the age fit of M35 is left for the next start" in rest), rest[-2000:]
    assert "Traceback" not in rest and "terminate called" not in rest
    # The next start fits the age the quit left.
    again = subprocess.run([sys.executable, "-m", "observer.cli", "reprocess", str(cam), "--out", str(out)],
                           capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert again.returncode == 0, again.stderr[-2000:]
    age = json.loads((out / "M35" / "age.json").read_text())
    assert age["fitted"] is True and 7.0 < age["log_age"] < 9.5
