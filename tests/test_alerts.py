"""config/prestaged-alerts.yml held to Prometheus's own ``promtool`` (Debian ``prometheus``).

``promtool check rules`` parses every rule and template; ``promtool test rules`` runs the unit
tests of ``tests/alerts/prestaged-alerts.test.yml`` (each alert fires when it should, with its
labels and rendered summary, and stays quiet when it should not). The rules' descriptions are
static text and are added here to each expected alert, so the test file need not repeat them.
A real Prometheus evaluates the same rules against a running daemon in ``test_dashboard``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import exposed_metric_names, peer_missing

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "config" / "prestaged-alerts.yml"
UNIT_TESTS = ROOT / "tests" / "alerts" / "prestaged-alerts.test.yml"
PROMTOOL_TIMEOUT = 60  # seconds for one promtool run


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        peer_missing("promtool not found: install Debian package prometheus")
    return path


def _rules(path: Path = RULES) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _alerts(path: Path = RULES) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in _rules(path) if "alert" in rule}


def _unit_tests() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(UNIT_TESTS.read_text())
    return doc


def _cases() -> list[dict[str, Any]]:
    return [case for test in _unit_tests()["tests"] for case in test.get("alert_rule_test", [])]


def _promtool_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *args], capture_output=True, text=True,
                          timeout=PROMTOOL_TIMEOUT, check=False)


def test_promtool_checks_every_rule() -> None:
    """Every rule parses (PromQL and templates) and the file holds alerts only."""
    done = _promtool_run("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    rules = _rules()
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout, done.stdout
    assert len(_alerts()) == len(rules)


def test_every_alert_has_a_case_that_fires_and_one_that_does_not() -> None:
    """So that a new alert comes with its promtool cases."""
    alerts = set(_alerts())
    fired = {c["alertname"] for c in _cases() if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in _cases() if not c.get("exp_alerts")}
    assert alerts - fired == set(), "alerts never seen firing"
    assert alerts - quiet == set(), "alerts never seen quiet"
    assert fired | quiet <= alerts, "cases of alerts that do not exist"


def test_every_alert_is_labelled_and_explained() -> None:
    """A severity, a templated summary and a static description (added to the unit tests)."""
    for name, rule in _alerts().items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert set(rule["annotations"]) == {"summary", "description"}, name
        assert "{{" in rule["annotations"]["summary"], name
        assert "{{" not in rule["annotations"]["description"], name


def test_every_alert_names_exposed_metrics() -> None:
    """A renamed metric breaks this (an alert on a series that never exists never fires)."""
    exposed = exposed_metric_names()
    for name, rule in _alerts().items():
        used = set(re.findall(r"\bprestaged_[a-z_]+", rule["expr"]))
        assert used or name == "PrestagedDown", name
        assert used <= exposed, (name, used - exposed)


def _unit_tests_for(rules: Path, tmp_path: Path) -> Path:
    """The unit tests run against ``rules``, each expected alert given its rule's description."""
    alerts = _alerts(rules)
    doc = _unit_tests()
    doc["rule_files"] = [str(rules)]
    for case in (c for test in doc["tests"] for c in test.get("alert_rule_test", [])):
        description = alerts[case["alertname"]]["annotations"]["description"]
        for expected in case.get("exp_alerts") or []:
            expected["exp_annotations"]["description"] = description
    tests = tmp_path / "prestaged-alerts.test.yml"
    tests.write_text(yaml.safe_dump(doc, sort_keys=False))
    return tests


def test_promtool_unit_tests_pass(tmp_path: Path) -> None:
    """``promtool test rules``: when each alert fires, with which labels and summary."""
    done = _promtool_run("test", "rules", str(_unit_tests_for(RULES, tmp_path)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout, done.stdout


@pytest.mark.parametrize(("threshold", "alert"), [
    ("12 * 3600", "PrestagedProxyExpiresSoon"),
    ("> 1048576", "PrestagedStateBacklog"),
    ("for: 1h", "PrestagedDatasetFilesFailing"),
    ("14 * 86400", "PrestagedApiCertificateExpiresSoon"),
])
def test_promtool_unit_tests_catch_a_moved_threshold(tmp_path: Path, threshold: str,
                                                     alert: str) -> None:
    """The unit tests are not vacuous: moving one threshold (its first 1 made a 2) fails the
    cases of that alert, and only those."""
    text = RULES.read_text()
    assert text.count(threshold) == 1
    rules = tmp_path / "prestaged-alerts.yml"
    rules.write_text(text.replace(threshold, threshold.replace("1", "2", 1)))
    done = _promtool_run("test", "rules", str(_unit_tests_for(rules, tmp_path)))
    assert done.returncode != 0, done.stdout
    out = done.stdout + done.stderr
    assert set(re.findall(r"alertname: (\w+)", out)) == {alert}, out
