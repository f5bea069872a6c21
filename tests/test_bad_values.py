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


def test_a_home_of_no_user_is_refused_naming_the_key(tmp_path: Path) -> None:
    """``~nouser/...`` in a path setting, ``--state`` or ``--catalog-dir`` is a config error
    naming where it was (it was a RuntimeError traceback: "Could not determine home
    directory")."""
    path = tmp_path / "c.toml"
    path.write_text('[state]\npath = "~no-such-user-x/s.db"\n')
    with pytest.raises(ConfigError, match=r'state\.path: "~no-such-user-x/s\.db": no such '):
        load_config(path)
    for argv, where in ((["status", "--state", "~no-such-user-x/s.db"], "--state"),
                        (["files", "d", "--catalog-dir", "~no-such-user-x/d"], "--catalog-dir")):
        res = run_cli(*argv)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.startswith(f'prestaged: error: {where}: "~no-such-user-x/'), res.stderr


def test_a_state_path_that_cannot_be_looked_at_is_one_line_exit_2(
        pki: TestPKI, proxy: Path, tmp_path: Path) -> None:
    """A state path whose name is too long (or whose directory may not be entered) is
    ``state PATH: cannot open: ...``, exit 2, for commands that read the state and those
    that write it; exists() raised there, a traceback."""
    state = tmp_path / ("a" * 300) / "s.db"
    listed = tmp_path / "x.txt"
    listed.write_text("https://127.0.0.1:1/f\n")
    for argv in (["status", "--state", str(state)],
                 ["warm", str(listed), "--state", str(state), "--proxy", str(proxy),
                  "--ca-dir", str(pki.ca_dir)]):
        res = run_cli(*argv)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert f"state {state}: cannot open: File name too long" in res.stderr


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


@pytest.mark.parametrize(("text", "key"), [
    ('[catalog.samweb]\nbase_url = "https://127.0.0.1:99999/sam/dune/api"\n',
     "catalog.samweb.base_url"),
    ('[catalog.samweb]\nbase_url = "https://127.0.0.1:abc/sam/dune/api"\n',
     "catalog.samweb.base_url"),
    ('[catalog.samweb]\nhost = "127.0.0.1:99999"\n', "catalog.samweb.host"),
    ('[catalog.samweb]\nhost = "u:S3cretPW@127.0.0.1"\n', "catalog.samweb.host"),
    ('[catalog.samweb]\nbase_url = "https://alice:S3cretPW@127.0.0.1:1/sam/dune/api"\n',
     "catalog.samweb.base_url"),
    ('[catalog.metacat]\nurl = "https://127.0.0.1:99999/app"\n', "catalog.metacat.url"),
    ('[catalog.rucio]\nurl = "https://bob:S3cretPW@127.0.0.1:1"\n', "catalog.rucio.url"),
    ('[[catalog.samweb.rewrite]]\nlocation = "enstore:/pnfs/"\nurl = "https://h:70000/pnfs/"\n',
     "catalog.samweb.rewrite[0].url"),
    ('[[storage.path_map]]\nurl_prefix = "https:///pnfs/"\npath_prefix = "/pnfs/"\n',
     "storage.path_map[0].url_prefix"),
    ('[[state]]\nurl = "postgresql://prestaged:S3cretPW@db.example.org/prestaged"\n', "state"),
    ('[storage.path_map]\nurl_prefix = "https://alice:S3cretPW@host/"\n', "storage.path_map"),
    ('[state]\nurl = {a = "postgresql://u:S3cretPW@h/db"}\n', "state.url"),
])
def test_server_urls_are_checked_at_load_and_never_shown_with_a_password(
        tmp_path: Path, text: str, key: str) -> None:
    """A server URL no request can go to (a port above 65535 or not a number), or a catalog URL
    with user:password, is refused at load naming the key: it crashed the first catalog request
    with a traceback, or printed the password in "unreachable" errors. A value in the wrong
    form (a table, an array) is quoted with its passwords hidden."""
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"config {path}: {key}") and "S3cretPW" not in message, message


@pytest.mark.parametrize(("variable", "value"), [
    ("SAM_WEB_BASE_URL", "ftp://u:S3cretPW@127.0.0.1:1/sam/dune/api"),
    ("SAM_WEB_BASE_URL", "https://127.0.0.1:99999/sam/dune/api"),
    ("SAM_WEB_HOST", "u:S3cretPW@127.0.0.1"),
    ("SAM_EXPERIMENT", "bad name"),
])
def test_environment_variables_are_held_to_their_keys_rules(
        tmp_path: Path, variable: str, value: str) -> None:
    """``$SAM_WEB_BASE_URL``, ``$SAM_WEB_HOST`` and ``$SAM_EXPERIMENT`` stand in for config keys
    and are checked like them: exit 2, one line naming the variable, no password."""
    (tmp_path / "c.toml").write_text("")
    env = {variable: value}
    if variable != "SAM_EXPERIMENT":
        env["SAM_EXPERIMENT"] = "dune"
    res = run_cli("files", "foo", "--catalog", "samweb", "--config", str(tmp_path / "c.toml"),
                  env=env)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith(f"prestaged: error: ${variable}: expected ")
    assert res.stderr.count("\n") == 1 and "S3cretPW" not in res.stderr, res.stderr


def test_metacat_server_url_variable_is_checked(tmp_path: Path) -> None:
    """``$METACAT_SERVER_URL`` as ``[catalog.metacat] url``: "not a url" is named as such."""
    (tmp_path / "c.toml").write_text('[catalog.rucio]\nurl = "https://127.0.0.1:1"\n')
    res = run_cli("files", "ns:ds", "--catalog", "metacat", "--config", str(tmp_path / "c.toml"),
                  env={"METACAT_SERVER_URL": "not a url"})
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("prestaged: error: $METACAT_SERVER_URL: expected an http(s) URL")


def test_config_and_credential_paths_to_devices_and_pipes_neither_hang_nor_swallow_memory(
        tmp_path: Path) -> None:
    """``--config /dev/zero`` read gigabytes, a named pipe as ``--config`` or ``--proxy``
    waited forever for a writer: now /dev/zero is "larger than 1 MiB", a pipe without a writer
    reads as empty (a config of defaults, a proxy without a certificate)."""
    import os
    import subprocess

    from cli_runner import entry_point, subprocess_env

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(entry_point(*argv), capture_output=True, text=True, timeout=60,
                              env=subprocess_env(), check=False)

    res = run("status", "--config", "/dev/zero", "--state", str(tmp_path / "s.db"))
    assert (res.returncode, res.stderr) == (
        2, "prestaged: error: config /dev/zero: larger than 1 MiB, not a prestaged config\n")
    res = run("status", "--config", str(fifo), "--state", str(tmp_path / "s.db"))
    assert "no such file (nothing warmed yet" in res.stderr  # the config was read: defaults
    res = run("credentials", "--proxy", str(fifo), "--config", str(fifo))
    assert res.returncode == 3 and f"proxy {fifo} (from --proxy): no certificate" in res.stdout


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
