"""Static checks as tests, so CI enforces them: ruff, mypy (strict) and vermin (Python 3.9)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return path


def test_ruff_clean() -> None:
    """ruff check passes on the whole tree."""
    res = _run(_tool("ruff"), "check", ".")
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_strict_clean() -> None:
    """mypy --strict (configured in pyproject.toml) passes on the package."""
    res = _run(_tool("mypy"), "prestaged")
    assert res.returncode == 0, res.stdout + res.stderr


def test_package_runs_on_python_39() -> None:
    """vermin finds nothing in the package that needs a Python newer than 3.9."""
    res = _run(_tool("vermin"), "--no-tips", "--violations", "-t=3.9-", "prestaged")
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_public_name_imports() -> None:
    """Each name of ``prestaged.__all__`` resolves (the re-exports are loaded lazily)."""
    import prestaged

    missing = [n for n in prestaged.__all__ if not hasattr(prestaged, n)]
    assert not missing
    assert prestaged.Store.__module__ == "prestaged.state.store"


def test_cli_start_up_does_not_load_the_storage_stack() -> None:
    """``import prestaged.cli`` (every command's start) leaves aiohttp, cryptography and psycopg
    (the optional PostgreSQL driver) for the commands that use them: status, campaign list/show
    and --help stay quick."""
    code = ("import sys, prestaged.cli; "
            "print(sorted(m for m in ('aiohttp', 'cryptography', 'prometheus_client', "
            "'psycopg', 'psycopg_pool') "
            "if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert res.stdout.strip() == "[]"


def test_a_missing_peer_skips_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """conftest.peer_missing: a skip on a developer's machine, a failure with CI set."""
    from conftest import peer_missing

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="install it"):
        peer_missing("install it")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"install it \(CI is set: a missing "
                                                    r"server is a failure\)"):
        peer_missing("install it", "server")
