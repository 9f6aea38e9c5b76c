"""deploy/systemd/tinyllm-trio.service: the keys a drain needs, and `systemd-analyze verify`."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

UNIT = Path(__file__).parents[2] / "deploy" / "systemd" / "tinyllm-trio.service"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(UNIT)
    return parser


def test_unit_stops_with_sigterm_after_the_grace_and_restarts_on_failure() -> None:
    service = _unit()["Service"]
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "on-failure"
    assert service["NoNewPrivileges"] == "true"
    grace = float(service["ExecStart"].split("--shutdown-grace")[1].split()[0])
    assert float(service["TimeoutStopSec"]) > grace


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point it at this environment's script
    exe = Path(sys.executable).with_name("tinyllm-trio")
    assert exe.exists(), exe
    text = UNIT.read_text().replace("/usr/local/bin/tinyllm-trio", str(exe))
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze (package systemd) is needed"
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
