"""The soak (issue 22, item 10): benchmarks/soak.py runs a 2-rank streamed job under gptlab's
torchrun launcher with restarts and `--resume auto`, injects every fault once at a random (seeded)
moment (SIGKILL of a rank, SIGTERM of the launcher then the same command again, the shard server
gone for 20 s, SIGSTOP of a rank, a full disk for 15 s), and checks the end against an unbroken run.
This runs a short soak; the script runs longer ones (--seconds, --steps)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"


@pytest.mark.slow
def test_a_short_soak_survives_every_fault_and_equals_the_unbroken_run(tmp_path):
    report = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, str(SOAK), "--steps", "240", "--seed", "3", "--seconds", "420",
                        "--workdir", str(tmp_path / "w"), "--json", str(report)],
                       capture_output=True, text=True, timeout=900)
    assert report.exists(), r.stderr[-4000:]
    got = json.loads(report.read_text())
    log = (tmp_path / "w" / "soak.log").read_text(errors="replace")
    assert r.returncode == 0, r.stdout + log[-4000:]
    assert all(v == "ok" for v in got["checks"].values()), got["checks"]
    kinds = {f["kind"]: f for f in got["injected"]}
    assert sorted(kinds) == ["disk", "kill", "server", "stop", "term"]
    for kind, fault in kinds.items():
        if kind == "disk" and not fault["injected"]:
            assert "no tmpfs" in fault["note"]  # this machine cannot mount one: said, not hidden
            continue
        assert fault["injected"] and fault["survived"], fault
    assert got["starts"] >= 2  # the launcher's SIGTERM, then the same command again
    assert got["worker_starts"] >= 4  # and torchrun restarted the group after the kill and the stop
    assert "| fault | at step | injected | survived | steps redone |" in r.stdout
    assert "no step finished" in log  # the stopped rank was found by the watchdog
