"""The systemd units pass `systemd-analyze verify` and `security --offline`, and match the config.

systemd-analyze works offline, without systemd as PID 1 (containers, CI). It is skipped when
missing, unless $CI is set: CI must have it (Debian package `systemd`).
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from prestaged.config import load_config, parse_duration

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
SERVICE = UNITS / "prestaged.service"
RENEW = (UNITS / "prestaged-proxy-renew.service", UNITS / "prestaged-proxy-renew.timer")
USER_SERVICE = UNITS / "prestaged-user.service"
EXAMPLE_CONFIG = ROOT / "config" / "prestaged-service.toml"

INSTALLED_EXEC = "/opt/prestaged/venv/bin/prestaged"
"""ExecStart= binary of the shipped unit."""
ABSENT_EXECS = (INSTALLED_EXEC, "/usr/bin/voms-proxy-init")
"""Executables of the units that a test machine lacks; verify warns about a missing one, so
the venv's prestaged stands in for them in the copies that are verified."""

if TYPE_CHECKING:
    Analyze = Callable[..., subprocess.CompletedProcess[str]]

GOOD_RATINGS = ("PERFECT", "SAFE", "OK")
"""`systemd-analyze security` ratings at or better than OK (exposure below 5.0)."""


@pytest.fixture
def analyze() -> Analyze:
    """Runs systemd-analyze with the given arguments; skips (fails under $CI) without it."""
    tool = _systemd_analyze()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tool, "--no-pager", *args], capture_output=True, text=True,
                              timeout=120, check=False)

    return run


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing: apt-get install systemd")
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    return path


def _venv_prestaged() -> str:
    path = shutil.which("prestaged", path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail("the prestaged entry point is not installed: pip install -e .")
    return path


def _testable_copy(unit: Path, directory: Path) -> Path:
    """``unit`` copied into ``directory``, the venv's prestaged standing in for ABSENT_EXECS."""
    text = unit.read_text()
    for absent in ABSENT_EXECS:
        text = text.replace(absent, _venv_prestaged())
    copy = directory / unit.name
    copy.write_text(text)
    return copy


def _unit(path: Path) -> configparser.RawConfigParser:
    """A unit file's sections and keys; a repeated key keeps its last value."""
    parser = configparser.RawConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read_string(path.read_text().replace("\\\n", " "))
    return parser


def _problems(result: subprocess.CompletedProcess[str], *units: Path) -> list[str]:
    """Output lines of systemd-analyze that concern ``units`` (by file or unit name)."""
    names = {u.name for u in units}
    return [line for line in (result.stdout + result.stderr).splitlines()
            if any(name in line for name in names)]


def test_service_verifies_cleanly(tmp_path: Path, analyze: Analyze) -> None:
    """`systemd-analyze verify` accepts prestaged.service with no warning about it."""
    unit = _testable_copy(SERVICE, tmp_path)
    res = analyze("verify", "--man=no", "--recursive-errors=no", str(unit))
    assert res.returncode == 0, res.stdout + res.stderr
    assert _problems(res, unit) == []


def test_renewal_units_verify_cleanly(tmp_path: Path, analyze: Analyze) -> None:
    """The example proxy-renewal service and timer pass `systemd-analyze verify` together."""
    units = [_testable_copy(u, tmp_path) for u in RENEW]
    res = analyze("verify", "--man=no", "--recursive-errors=no", *map(str, units))
    assert res.returncode == 0, res.stdout + res.stderr
    assert _problems(res, *units) == []


def test_user_service_verifies_cleanly(tmp_path: Path, analyze: Analyze) -> None:
    """The per-user unit (campaigns) passes verify and keeps the daemon's lifecycle settings."""
    installed = "%h/.local/bin/prestaged"
    text = USER_SERVICE.read_text()
    assert f"ExecStart={installed} serve\n" in text
    unit = tmp_path / USER_SERVICE.name
    unit.write_text(text.replace(installed, _venv_prestaged()))
    res = analyze("verify", "--man=no", "--recursive-errors=no", str(unit))
    assert res.returncode == 0, res.stdout + res.stderr
    assert _problems(res, unit) == []
    service = _unit(USER_SERVICE)["Service"]
    assert (service["Type"], service["NotifyAccess"], service["RestartPreventExitStatus"]) == (
        "notify", "main", "2")
    assert "ProtectHome" not in service and "PrivateTmp" not in service  # submit needs them
    assert parse_duration(service["TimeoutStopSec"]) > 30


def test_verify_reports_a_broken_unit(tmp_path: Path, analyze: Analyze) -> None:
    """The verify check is not vacuous: an unknown key in the unit is reported by name."""
    unit = _testable_copy(SERVICE, tmp_path)
    unit.write_text(unit.read_text().replace("WatchdogSec=", "WatchdogSek="))
    res = analyze("verify", "--man=no", "--recursive-errors=no", str(unit))
    assert any("WatchdogSek" in line for line in _problems(res, unit)), res.stderr


def test_service_security_exposure_is_ok_or_better(
        analyze: Analyze, record_property: Callable[[str, object], None]) -> None:
    """`systemd-analyze security --offline=true` rates the shipped unit OK or better."""
    res = analyze("security", "--offline=true", str(SERVICE))
    out = res.stdout + res.stderr
    match = re.search(r"Overall exposure level for prestaged\.service: (\d+\.\d+) (\w+)", out)
    assert match, out
    score, rating = float(match.group(1)), match.group(2)
    record_property("exposure", f"{score} {rating}")
    print(f"systemd-analyze security: prestaged.service exposure {score} {rating}")
    assert rating in GOOD_RATINGS, out
    assert res.returncode == 0, out


def test_service_keeps_the_lifecycle_and_sandbox_settings() -> None:
    """The unit keeps Type=notify, the watchdog, its own user and the key hardening settings."""
    service = dict(_unit(SERVICE)["Service"])
    expected = {
        "Type": "notify", "NotifyAccess": "main", "WatchdogSec": "60",
        "ExecStart": f"{INSTALLED_EXEC} serve --config /etc/prestaged/prestaged.toml",
        "ExecReload": "/bin/kill -HUP $MAINPID", "Restart": "on-failure",
        "User": "prestaged", "Group": "prestaged", "StateDirectory": "prestaged",
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "NoNewPrivileges": "yes", "MemoryDenyWriteExecute": "yes", "UMask": "0077",
        "CapabilityBoundingSet": "", "SystemCallArchitectures": "native",
        "KillMode": "mixed",
    }
    assert {k: service.get(k) for k in expected} == expected


def test_both_daemon_units_stop_the_main_process_only() -> None:
    """KillMode=mixed in both daemon units: SIGTERM goes to the daemon, which drains; its
    state writer and submit commands are not signalled until TimeoutStopSec (issue 12, 7)."""
    for unit in (SERVICE, SERVICE.with_name("prestaged-user.service")):
        assert dict(_unit(unit)["Service"]).get("KillMode") == "mixed", unit


def test_example_config_fits_the_service() -> None:
    """The example config loads, keeps state in the StateDirectory and the proxy in sight."""
    cfg = load_config(EXAMPLE_CONFIG)
    state_dir = Path("/var/lib") / _unit(SERVICE)["Service"]["StateDirectory"]
    assert cfg.state.path is not None and cfg.state.path.parent == state_dir
    proxy = cfg.credentials.proxy
    assert proxy is not None
    # PrivateTmp= and ProtectHome= hide these from the service.
    hidden = [Path(p) for p in ("/tmp", "/var/tmp", "/home", "/root", "/run/user")]
    assert not any(h == proxy or h in proxy.parents for h in hidden), proxy
    # The unit's fallback for configs without credentials.proxy is the same file.
    fallback = re.search(r"(?m)^Environment=X509_USER_PROXY=(\S+)$", SERVICE.read_text())
    assert fallback and Path(fallback.group(1)) == proxy
    assert cfg.daemon.listen.startswith("127.0.0.1:")


def test_stop_timeout_outlasts_the_drain() -> None:
    """TimeoutStopSec= exceeds the example drain_timeout plus the 30 s to stop running warms."""
    cfg = load_config(EXAMPLE_CONFIG)
    stop = parse_duration(_unit(SERVICE)["Service"]["TimeoutStopSec"])
    assert stop > cfg.daemon.drain_timeout + 30


def test_example_watch_entries_are_valid(tmp_path: Path) -> None:
    """The commented [[watch]] examples of the example config load once uncommented."""
    text = re.sub(r"(?m)^# ?(\[\[watch\]\]|[a-z_]+ = .+)$", r"\1", EXAMPLE_CONFIG.read_text())
    uncommented = tmp_path / "prestaged.toml"
    uncommented.write_text(text)
    watches = load_config(uncommented).watch
    assert [w.every for w in watches] == [6 * 3600, 12 * 3600]
    assert watches[0].ready == 0.99
