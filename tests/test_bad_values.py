"""Bad values and unreadable configs, one line each (issue 12, 5 and 9): every numeric setting
has a documented range checked at load, CLI options too, and a config that cannot be read at
all is an error line for the CLI and a kept configuration for a reloading daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cli_runner import run_cli
from daemon_harness import free_port, in_process, until, write_config
from test_config import assert_sentence, config_keys, config_with

from prestaged.config import Config, Duration, load_config
from prestaged.errors import ConfigError
from prestaged.testing.pki import TestPKI


def numeric_keys(cls: type[Any]) -> list[str]:
    """Key paths of every int, float and duration setting."""
    return config_keys(cls, lambda tp, f: tp in (int, float, Duration))


@pytest.mark.parametrize("key", numeric_keys(Config))
def test_every_numeric_setting_has_an_upper_bound(tmp_path: Path, key: str) -> None:
    """10**30 is refused by every numeric key with a whole sentence (storage.concurrency =
    2**63-1 exhausted memory and ignored SIGTERM before)."""
    path = tmp_path / "c.toml"
    path.write_text(config_with(key, 10**30))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert_sentence(str(err.value).split(": ", 1)[1], key, 10**30)


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_no_setting_takes_infinity_or_nan(tmp_path: Path, value: str) -> None:
    """TOML's inf and nan are no setting's value: rate and durations refuse them."""
    for key in ("storage.rate", "storage.timeout", "retry.jitter"):
        section, _, leaf = key.rpartition(".")
        path = tmp_path / "c.toml"
        path.write_text(f"[{section}]\n{leaf} = {value}\n")
        with pytest.raises(ConfigError, match=rf"^config .*: {key}: expected "):
            load_config(path)


def test_a_nul_byte_in_a_path_is_refused(tmp_path: Path) -> None:
    """A path with a NUL byte (TOML "\\u0000") is a config error, not a crash later."""
    path = tmp_path / "c.toml"
    path.write_text('[state]\npath = "a\\u0000b"\n')
    with pytest.raises(ConfigError, match=r"state\.path: expected a path"):
        load_config(path)


@pytest.mark.parametrize(("argv", "message"), [
    (["warm", "x.txt", "--dry-run", "--rate", "1e400"],
     "--rate: expected a number from 0 to 1000000, got inf"),
    (["warm", "x.txt", "--dry-run", "--concurrency", "9223372036854775807"],
     "--concurrency: expected an integer from 1 to 10000"),
    (["history", "--limit", "-5"], "--limit: expected an integer from 1 to 100000, got -5"),
    (["wait", "x.txt", "--timeout", "99999999999999999999"],
     "--timeout: expected a duration above 0 and at most 2592000 s"),
    (["wait", "x.txt", "--retry-every", "soon"], "--retry-every: expected a duration"),
])
def test_bad_option_values_are_one_line_exit_2(tmp_path: Path, argv: list[str],
                                               message: str) -> None:
    """Out-of-range or malformed option values: exit 2 and one line naming the option."""
    res = run_cli(*argv, "--config", str(tmp_path / "none.toml"))
    if "none.toml" in res.stderr:  # an explicit --config must exist: give it an empty one
        (tmp_path / "none.toml").write_text("")
        res = run_cli(*argv, "--config", str(tmp_path / "none.toml"))
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_a_non_utf8_config_is_one_line_exit_2(tmp_path: Path) -> None:
    """A config of bytes that are not UTF-8: one line naming the file and the byte, exit 2
    (a UnicodeDecodeError traceback before)."""
    path = tmp_path / "c.toml"
    path.write_bytes(b"\xff\xfe[storage]\n")
    res = run_cli("status", "--config", str(path))
    assert res.returncode == 2
    assert res.stderr == f"prestaged: error: config {path}: not UTF-8 text (byte 0xff at " \
                         "offset 0)\n"


async def test_a_daemon_reloading_an_unreadable_config_keeps_the_old_one(
    pki: TestPKI, proxy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGHUP with a config that became non-UTF-8 (or vanished): the daemon logs why, keeps
    serving on the old config and is still ready (it died, then looped under Restart=)."""
    config = write_config(tmp_path, pki, proxy, free_port(), [])
    async with in_process(config) as d:
        config.write_bytes(b"\xff\xfe")
        d.daemon.request_reload()

        async def said() -> bool:
            return "not UTF-8 text" in caplog.text

        await until("the reload error is logged", said)
        status, _ = await d.http("GET", "/readyz")
        assert status == 200
        config.unlink()
        d.daemon.request_reload()

        async def said_missing() -> bool:
            return "no such file" in caplog.text

        await until("the missing config is logged", said_missing)
        assert (await d.http("GET", "/readyz"))[0] == 200
