"""Config loading: defaults, the shipped example, search order and errors that name the key."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable, Union, get_type_hints

import pytest

from prestaged.config import Config, find_config, load_config, parse_duration, replace_path
from prestaged.errors import ConfigError
from prestaged.testing.pki import TestPKI

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


def test_shipped_example_names_every_key() -> None:
    """config/prestaged.toml documents every key (set, or commented out where it has no
    default value): each field of each section appears as ``key =`` in its table, and each
    array of tables (``[[watch]]``, ``[[storage.path_map]]``...) with its keys."""
    import dataclasses
    import re
    import typing

    text = EXAMPLE.read_text()
    starts = {m.group(1): m.start() for m in re.finditer(
        r"^#? ?\[\[?([a-z_.]+)\]\]?\s*(?:#.*)?$", text, re.M)}
    missing = []

    def keys_of(table: str) -> str:
        start = starts[table]
        return text[start:min((p for p in starts.values() if p > start), default=len(text))]

    def walk(cls: type, table: str) -> None:
        if table and table not in starts:
            missing.append(f"[{table}]")
            return
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "source":
                continue
            kind = hints[f.name]
            inner = typing.get_args(kind)[0] if typing.get_origin(kind) is tuple else kind
            name = f"{table}.{f.name}".lstrip(".")
            if dataclasses.is_dataclass(inner):
                walk(typing.cast(type, inner), name)
            elif not table or not re.search(rf"^#? ?{f.name} = ", keys_of(table), re.M):
                missing.append(name)

    walk(Config, "")
    assert not missing, missing


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
         'storage.concurrency: expected an integer from 1 to 10000, got "ten"'),
        ("[storage]\nconcurrency = 0\n", "storage.concurrency: expected an integer from 1 to 10000, got 0"),
        ("[storage]\nconcurency = 3\n", "unknown key storage.concurency (did you mean storage.concurrency?)"),
        ("[storagee]\n", "unknown key storagee (did you mean storage?)"),
        ('[retry]\ntotal = "soon"\n', 'retry.total: expected a duration above 0 and at most 604800 s (seconds, or a '
         'string such as "90s", "15m", "6h" or "1h30m"), got "soon"'),
        ("[storage]\nrate = true\n", "storage.rate: expected a number from 0 to 1000000, got True"),
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
    with pytest.raises(ConfigError, match="--concurrency: expected an integer from 1 to 10000, got -1"):
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


# --- defect 1: every validation message is one whole sentence ---------------------------------

# A value each validated key refuses (of the right type); every key is also given `true`, which
# none of them accepts, for the wrong-type message.
BAD_CONFIG_VALUES: dict[str, object] = {
    "credentials.min_lifetime": -1, "credentials.method": "kerberos",
    "credentials.token_min_lifetime": "-5s",
    "storage.concurrency": 0, "storage.per_host": -3, "storage.bytes": 0,
    "storage.rate": -1.5, "storage.timeout": "0s", "storage.connect_timeout": 0,
    "storage.max_redirects": -1, "storage.queue": -1, "storage.stage": "sometimes",
    "storage.stage_batch": 501, "storage.stage_requests": 0, "storage.poll_min": 0,
    "storage.poll_max": "2d", "storage.poll_errors": 0, "storage.stage_timeout": "8d",
    "storage.pin_lifetime": 0,
    "storage.discovery_ttl": 0,
    "retry.attempts": 0, "retry.initial": -1, "retry.max": -2, "retry.jitter": -0.5,
    "retry.total": 0, "retry.max_retry_after": -1,
    "breaker.denials": 0, "breaker.token_denials": 0, "breaker.tls_failures": 0,
    "breaker.unreachable": -1,
    "catalog.samweb.base_url": "ftp://samweb/api", "catalog.samweb.experiment": "du ne",
    "catalog.samweb.host": "samweb:99999",
    "catalog.samweb.batch": 0, "catalog.samweb.parallel": 0, "catalog.samweb.timeout": 0,
    "catalog.samweb.retry_initial": -1, "catalog.samweb.retry_max": -1,
    "catalog.samweb.retry_for": -1, "catalog.samweb.url_mode": "both",
    "catalog.samweb.access_url_concurrency": 0, "catalog.samweb.schema": "HTTPS",
    "catalog.samweb.role": "pro duction",
    "catalog.default": "oracle", "watch[0].catalog": "oracle",
    "catalog.metacat.url": "metacat.fnal.gov/app", "catalog.metacat.auth": "kerberos",
    "catalog.metacat.page": 0, "catalog.metacat.timeout": 0,
    "catalog.metacat.retry_initial": -1, "catalog.metacat.retry_max": -1,
    "catalog.metacat.retry_for": -1,
    "catalog.rucio.url": "rucio", "catalog.rucio.auth_url": "ftp://rucio/auth",
    "catalog.rucio.account": "dune pro", "catalog.rucio.auth": "kerberos",
    "catalog.rucio.rse_preference": "FNAL_DCACHE", "catalog.rucio.chunk": 2000,
    "catalog.rucio.parallel": 0, "catalog.rucio.timeout": 0,
    "catalog.rucio.retry_initial": -1, "catalog.rucio.retry_max": -1,
    "catalog.rucio.retry_for": -1,
    "catalog.samweb.rewrite[0].location": "/pnfs/without-kind/",
    "catalog.samweb.rewrite[0].url": "fndca1/pnfs/",
    "storage.path_map[0].url_prefix": "fndca1:2880/pnfs/",
    "storage.path_map[0].path_prefix": "pnfs/fnal.gov/",
    "storage.tape_api[0].door": "https://fndca1:2880/pnfs/",
    "storage.tape_api[0].uri": "http://fndca1:3880/api/v1/tape",
    "state.fresh_for": -1, "state.batch": 0, "state.flush_interval": 0, "state.journal": "wal2",
    "state.keep_runs": -1, "state.tidy_every": "31d", "state.keep_campaigns": "3651d",
    "state.url": "mysql://db.example.org/prestaged",
    "output.progress_interval": 0, "output.log_level": "loud",
    "daemon.listen": "nope", "daemon.drain_timeout": -1, "daemon.credential_check": 0,
    "daemon.jitter": -0.1, "daemon.campaign_check": 0, "daemon.max_runs": 0,
    "cluster.lease": 0, "cluster.heartbeat": "-1s", "cluster.chunk": 0,
    "watch[0].definition": " ", "watch[0].every": 0, "watch[0].ready": 0,
}

# What an array-of-tables item needs besides the key under test.
ARRAY_ITEMS = {"watch": {"definition": "defs/a.txt"},
               "catalog.samweb.rewrite": {"location": "enstore:/pnfs/", "url": "https://h/"},
               "storage.path_map": {"url_prefix": "https://h/", "path_prefix": "/pnfs/"},
               "storage.tape_api": {"door": "https://h:2880", "uri": "https://h:3880/tape"}}

# "<key>: expected <what>, got <value>", where <what> does not stop on a fragment.
SENTENCE = re.compile(r"^(?P<key>[\w.\[\]]+): expected (?P<what>.+), got (?P<got>.+)$")
FRAGMENT = re.compile(r"(\bas\b[,)]?|\b(a|an|the|non-empty|positive|non-negative|fraction)"
                      r")$|\bas\s*,|\bas number\b")


def config_keys(cls: type[Any], wanted: Callable[[Any, dataclasses.Field[Any]], bool],
                prefix: str = "") -> list[str]:
    """Key paths of every setting whose (type, field) is ``wanted``, walking nested sections
    and arrays of tables."""
    keys = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if getattr(tp, "__origin__", None) is Union:
            tp = next(a for a in tp.__args__ if a is not type(None))
        if f.metadata.get("internal"):
            continue
        if getattr(tp, "__origin__", None) is tuple and dataclasses.is_dataclass(tp.__args__[0]):
            keys += config_keys(tp.__args__[0], wanted, f"{prefix}{f.name}[0].")
        elif dataclasses.is_dataclass(tp):
            keys += config_keys(tp, wanted, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        elif wanted(tp, f):
            keys.append(prefix + f.name)
    return keys


def validated_keys(cls: type[Any]) -> list[str]:
    """Key paths of every field carrying a value check."""
    return config_keys(cls, lambda tp, f: "check" in f.metadata)


def toml_value(value: object) -> str:
    """``value`` written as TOML."""
    return "true" if value is True else json.dumps(value)


def config_with(key: str, value: object) -> str:
    """A config file setting ``key`` (``a.b`` or ``a[0].b``) to ``value``, all else valid."""
    section, _, leaf = key.rpartition(".")
    if section.endswith("[0]"):
        table = section[:-3]
        item = {**ARRAY_ITEMS[table], leaf: value}
        return f"[[{table}]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in item.items())
    return f"[{section}]\n{leaf} = {toml_value(value)}\n"


def got(value: object) -> str:
    """How a message quotes a bad value."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def assert_sentence(message: str, key: str, value: object) -> None:
    """``message`` reads "<key>: expected <whole phrase>, got <value>"."""
    m = SENTENCE.match(message)
    assert m, message
    assert (m["key"], m["got"]) == (key, got(value)), message
    assert not FRAGMENT.search(m["what"]), message


def test_bad_value_table_covers_every_validated_key() -> None:
    """The table below names every config key that has a value check (and log_level)."""
    assert sorted(BAD_CONFIG_VALUES) == sorted([*validated_keys(Config), "output.log_level"])


@pytest.mark.parametrize("key", sorted(BAD_CONFIG_VALUES))
def test_every_config_error_is_a_whole_sentence(tmp_path: Path, key: str) -> None:
    """A refused value of any checked key reads "<key>: expected <what>, got <value>"."""
    for value in (BAD_CONFIG_VALUES[key], True):
        path = _write(tmp_path, config_with(key, value))
        with pytest.raises(ConfigError) as err:
            load_config(path)
        prefix = f"config {path}: "
        assert str(err.value).startswith(prefix)
        assert_sentence(str(err.value)[len(prefix):], key, value)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("daemon.listen", "nope",
     'daemon.listen: expected a "host:port" such as "127.0.0.1:9464" (an IPv6 address in '
     'brackets: "[::1]:9464"), got "nope"'),
    ("watch[0].definition", " ", 'watch[0].definition: expected a non-empty string, got " "'),
    ("watch[0].ready", 0, "watch[0].ready: expected a fraction in (0, 1] such as 0.99, got 0"),
])
def test_reported_fragment_messages_read_whole(tmp_path: Path, key: str, value: object,
                                               message: str) -> None:
    """The three messages of the review, which read "... as, got", "a non-empty, got"."""
    path = _write(tmp_path, config_with(key, value))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"config {path}: {message}"


@pytest.mark.parametrize("url", [
    "postgresql://prestaged@db.example.org/prestaged",
    "postgresql:///prestaged?host=/run/postgresql",
    "postgres://prestaged:pw@db1:5432,db2:5432/prestaged?sslmode=verify-full",
])
def test_state_url_takes_libpq_urls(tmp_path: Path, url: str) -> None:
    """[state] url accepts libpq's URL forms (TCP, unix socket, several hosts) as written;
    state.path stays unset, SQLite remains the default otherwise."""
    cfg = load_config(_write(tmp_path, f'[state]\nurl = "{url}"\n'))
    assert (cfg.state.url, cfg.state.path) == (url, None)
    assert Config().state.url is None


def test_refused_state_url_does_not_echo_its_password(tmp_path: Path) -> None:
    """A refused URL is quoted back with its password hidden, in the userinfo or a parameter."""
    path = _write(tmp_path, '[state]\nurl = "mysql://app:hunter2@db/x?password=hunter3"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).endswith('got "mysql://app:***@db/x?password=***"')
    assert "hunter" not in str(err.value)


def test_cluster_heartbeat_over_a_third_of_the_lease_is_refused(tmp_path: Path) -> None:
    """A heartbeat slower than lease/3 would make a live member look dead after one late beat:
    refused, naming both keys; the defaults (60 s, 5 s) and lease = 3 heartbeats load."""
    path = _write(tmp_path, '[cluster]\nlease = "10s"\nheartbeat = "4s"\n')
    with pytest.raises(ConfigError, match=r"cluster\.heartbeat 4s: at most a third of "
                                          r"cluster\.lease \(10s\)"):
        load_config(path)
    assert load_config(_write(tmp_path, '[cluster]\nlease = "9s"\nheartbeat = "3s"\n')
                       ).cluster.lease == 9.0
    assert (Config().cluster.lease, Config().cluster.heartbeat) == (60.0, 5.0)


@pytest.mark.parametrize(("daemon", "message"), [
    ('tls_cert = "c.pem"', r"daemon\.tls_key: required with daemon\.tls_cert"),
    ('tls_key = "k.pem"', r"daemon\.tls_cert: required with daemon\.tls_key"),
])
def test_api_tls_keys_come_together(tmp_path: Path, daemon: str, message: str) -> None:
    """A certificate without its key (or a key alone) cannot serve TLS: each refused at load,
    naming the keys; the three together load (tls_ca alone is a CLI's: see test_api_tls)."""
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, f"[daemon]\n{daemon}\n"))
    cfg = load_config(_write(tmp_path, '[daemon]\ntls_cert = "c.pem"\ntls_key = "k.pem"\n'
                                       'tls_ca = "ca.pem"\n')).daemon
    assert (cfg.tls_cert, cfg.tls_key, cfg.tls_ca) == (
        tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem")


def test_state_path_and_url_together_are_refused(tmp_path: Path) -> None:
    """Both a SQLite file and a PostgreSQL URL: which one is meant? Refused, naming both keys."""
    path = _write(tmp_path, '[state]\npath = "s.db"\nurl = "postgresql:///prestaged"\n')
    with pytest.raises(ConfigError, match=r"state\.path and state\.url are both set"):
        load_config(path)


def test_flag_overrides_word_errors_alike() -> None:
    """A command-line override is checked by the same rule and named by its flag."""
    with pytest.raises(ConfigError) as err:
        replace_path(Config(), "storage.rate", -1, label="--rate")
    assert str(err.value) == "--rate: expected a number from 0 to 1000000, got -1"


def test_state_option_wins_over_a_configured_url(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """--state FILE works on that SQLite file even when the config names a PostgreSQL URL
    (no "both set" error); without it, the URL is not silently replaced by the file."""
    from prestaged.cli import main
    from prestaged.state.store import Store

    config = _write(tmp_path, '[state]\nurl = "postgresql:///prestaged?host=/nonexistent"\n'
                              '[daemon]\nlisten = "127.0.0.1:1"\n')  # no daemon to ask
    state = tmp_path / "state.db"
    Store(state).open().close()
    assert main(["history", "--config", str(config), "--state", str(state), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"] == []
    assert main(["history", "--config", str(config), "--json"]) == 69
    err = capsys.readouterr().err  # the URL's database, unreachable: never the file
    assert "state postgresql:///prestaged?host=/nonexistent: cannot connect" in err, err


def test_a_state_path_in_a_directory_that_does_not_exist_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], pki: TestPKI, proxy: Path) -> None:
    """``--state /data/prestagd/state.db`` (a typo) made the whole directory tree and a new,
    empty state without a word: every file was warmed again and recorded where nobody looks.
    It is one line naming the missing directory (exit 2), and nothing is made."""
    from prestaged.cli import main

    definition = tmp_path / "ds.txt"
    definition.write_text("https://127.0.0.1:1/pnfs/a\n")
    typo = tmp_path / "prestagd" / "sub" / "state.db"
    config = _write(tmp_path, '[daemon]\nlisten = "127.0.0.1:1"\n')
    assert main(["warm", str(definition), "--config", str(config), "--state", str(typo),
                 "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir)]) == 2
    err = capsys.readouterr().err
    assert f"state {typo}: no directory {typo.parent} (a new state is made only in an " \
           "existing directory" in err, err
    assert not (tmp_path / "prestagd").exists()


def test_the_config_repr_hides_the_state_url_password(tmp_path: Path) -> None:
    """repr() of the loaded config (a traceback's, a debugger's) showed state.url's password;
    the user, host, database and other parameters stay."""
    config = tmp_path / "c.toml"
    config.write_text('[state]\nurl = "postgresql://app:pg%40pw-3141@db/state?sslmode=require"\n')
    cfg = load_config(config)
    # Booleans asserted, not the values: a failure would print the password.
    leaked = "pg%40pw-3141" in repr(cfg) or "pg%40pw-3141" in str(cfg.state)
    assert not leaked, "the password is in the repr"
    kept = cfg.state.url == "postgresql://app:pg%40pw-3141@db/state?sslmode=require"
    assert kept, "state.url itself changed"
    assert "url='postgresql://app:***@db/state?sslmode=require'" in repr(cfg)


@pytest.mark.parametrize("listen", ["[::1:9464", "::1:9464", "[::1]]:9464", "[nothost]:9464",
                                    "a b:9464", "h/x:9464", "user@h:9464", "h?q:9464"])
def test_a_listen_address_no_url_can_hold_is_refused_at_load(tmp_path: Path,
                                                             listen: str) -> None:
    """``daemon.listen`` must make the daemon's URL: "[::1:9464" passed the check and every
    command asking the daemon ended in a ValueError traceback ("Invalid IPv6 URL"); an IPv6
    literal without brackets or a host with a space or a slash was taken and then asked as
    another host."""
    path = _write(tmp_path, config_with("daemon.listen", listen))
    with pytest.raises(ConfigError, match=r'daemon\.listen: expected a "host:port"'):
        load_config(path)


@pytest.mark.parametrize("listen", ["127.0.0.1:9464", "[::1]:9464", "[::]:9464",
                                    "0.0.0.0:1", "localhost:65535", "prestaged.example.org:80"])
def test_listen_addresses_of_every_form_load(tmp_path: Path, listen: str) -> None:
    """Host names, IPv4 and bracketed IPv6 literals (wildcards too) are listen addresses."""
    assert load_config(_write(tmp_path, config_with("daemon.listen", listen))).daemon.listen \
        == listen


def test_a_config_or_campaign_file_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    """A UTF-8 byte-order mark (Notepad writes one) starts a config or a campaign file: it
    loads as without one (lists of URLs took it already); it was "invalid TOML: Invalid
    statement (at line 1, column 1)", naming nothing one could see."""
    from prestaged.campaign.spec import load_campaign

    path = tmp_path / "c.toml"
    path.write_bytes(b"\xef\xbb\xbf[storage]\nconcurrency = 7\n")
    assert load_config(path).storage.concurrency == 7
    campaign = tmp_path / "camp.toml"
    campaign.write_bytes(b'\xef\xbb\xbfname = "c1"\n[[stage]]\nname = "s1"\ninput = "d"\n'
                         b'submit = "true"\n')
    assert load_campaign(campaign).name == "c1"
