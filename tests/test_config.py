"""Config loading: defaults, the shipped example, search order and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from prestaged.config import Config, find_config, load_config, parse_duration, replace_path
from prestaged.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "prestaged.toml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "prestaged.toml"
    path.write_text(text)
    return path


def test_shipped_example_loads_and_equals_defaults() -> None:
    """config/prestaged.toml documents the defaults: loading it changes nothing."""
    cfg = load_config(EXAMPLE)
    assert cfg.source == EXAMPLE
    assert cfg == Config(source=EXAMPLE)


def test_values_and_durations_are_parsed(tmp_path: Path) -> None:
    """Numbers, duration strings and relative paths become typed values."""
    cfg = load_config(_write(tmp_path, """
[storage]
concurrency = 64
timeout = "1m30s"
[credentials]
min_lifetime = "2h"
proxy = "proxy.pem"
[catalog.local]
dir = "/defs"
"""))
    assert cfg.storage.concurrency == 64
    assert cfg.storage.timeout == 90.0
    assert cfg.credentials.min_lifetime == 7200.0
    assert cfg.credentials.proxy == tmp_path / "proxy.pem"
    assert cfg.catalog.local.dir == Path("/defs")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[storage]\nconcurrency = "ten"\n',
         'storage.concurrency: expected a positive integer, got "ten"'),
        ("[storage]\nconcurrency = 0\n", "storage.concurrency: expected a positive integer, got 0"),
        ("[storage]\nconcurency = 3\n", "unknown key storage.concurency (did you mean storage.concurrency?)"),
        ("[storagee]\n", "unknown key storagee (did you mean storage?)"),
        ('[retry]\ntotal = "soon"\n', 'retry.total: expected a duration'),
        ("[storage]\nrate = true\n", "storage.rate: expected a number, got True"),
        ("storage = 3\n", "storage: expected a table"),
        ('[output]\nlog_level = "loud"\n', 'output.log_level: expected one of debug'),
    ],
)
def test_bad_values_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    """Wrong types, bad values and unknown keys raise ConfigError naming file and key path."""
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)
    assert err.value.exit_code == 2


def test_bad_toml_names_line(tmp_path: Path) -> None:
    """A TOML syntax error names the file and the line."""
    path = _write(tmp_path, "[storage]\nconcurrency = = 3\n")
    with pytest.raises(ConfigError, match=r"invalid TOML: .*line 2") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_missing_explicit_file() -> None:
    """An explicitly named config file that does not exist is an error, not the defaults."""
    with pytest.raises(ConfigError, match="no such file"):
        load_config(Path("/nonexistent/prestaged.toml"))


def test_search_order(tmp_path: Path) -> None:
    """--config beats $PRESTAGED_CONFIG, which beats ~/.config; nothing found means defaults."""
    home = tmp_path / "home"
    user = home / ".config" / "prestaged" / "prestaged.toml"
    env = {"HOME": str(home)}
    assert find_config(None, env) in (None, Path("/etc/prestaged/prestaged.toml"))
    user.parent.mkdir(parents=True)
    user.write_text("")
    assert find_config(None, env) == user
    env["PRESTAGED_CONFIG"] = str(tmp_path / "env.toml")
    assert find_config(None, env) == tmp_path / "env.toml"
    assert find_config(tmp_path / "cli.toml", env) == tmp_path / "cli.toml"


def test_replace_path_validates_with_flag_label() -> None:
    """CLI overrides go through the same checks and name the flag."""
    cfg = replace_path(Config(), "storage.concurrency", 8, label="--concurrency")
    assert cfg.storage.concurrency == 8
    with pytest.raises(ConfigError, match="--concurrency: expected a positive integer, got -1"):
        replace_path(cfg, "storage.concurrency", -1, label="--concurrency")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(30, 30.0), ("90s", 90.0), ("15m", 900.0), ("6h", 21600.0), ("1h30m", 5400.0),
     ("500ms", 0.5), ("2", 2.0), ("1d", 86400.0)],
)
def test_parse_duration(text: object, seconds: float) -> None:
    """Durations accept seconds and unit strings."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "6 hours", "h", "-3", True, "1x"])
def test_parse_duration_rejects(text: object) -> None:
    """Nonsense durations are rejected."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)
