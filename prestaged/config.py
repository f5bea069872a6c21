"""Configuration: TOML files loaded into frozen dataclasses, with errors that name the key path.

Search order (first that exists wins): ``--config``, ``$PRESTAGED_CONFIG``,
``$XDG_CONFIG_HOME/prestaged/prestaged.toml`` (unset: ``~/.config/prestaged/prestaged.toml``),
``/etc/prestaged/prestaged.toml``, built-in defaults.
An explicitly named file (``--config`` or ``$PRESTAGED_CONFIG``) must exist.

Durations are written as numbers of seconds or strings such as ``"90s"``, ``"15m"``, ``"6h"``,
``"1d"``, ``"1h30m"``; they are stored as float seconds.

Values are checked by ``Check`` rules attached to the fields (``check()``); every error reads
``<key>: expected <what>, got <value>``. ``build_section`` and the rules are public so that
other files (campaign files) are loaded and worded alike. One concern, a little over 500
lines: each section is documented key by key, and those docstrings are the reference.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, Union, get_type_hints

from prestaged.errors import ConfigError
from prestaged.files import read_small_text
from prestaged.model import redacted_url, usable_origin

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib

__all__ = [
    "DAY",
    "FRACTION",
    "HOUR",
    "MINUTE",
    "NON_EMPTY",
    "NON_NEGATIVE",
    "PLAIN_NAME",
    "POSITIVE",
    "BreakerConfig",
    "CatalogConfig",
    "CatalogServerKeys",
    "Check",
    "ClusterConfig",
    "Config",
    "CredentialsConfig",
    "DaemonConfig",
    "LocalCatalogConfig",
    "MetaCatConfig",
    "OutputConfig",
    "PathMap",
    "RetryConfig",
    "RewriteRule",
    "RucioConfig",
    "SamWebConfig",
    "StateConfig",
    "StorageConfig",
    "TapeApi",
    "WatchConfig",
    "build_section",
    "check",
    "checked",
    "default_config_paths",
    "door_key",
    "find_config",
    "load_config",
    "matches",
    "one_of",
    "parse_duration",
    "plain_http",
    "replace_path",
    "shown",
    "token_in_clear",
    "within",
]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)", re.IGNORECASE)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(value: object) -> float:
    """Parse ``30``, ``"30s"``, ``"15m"``, ``"6h"``, ``"1h30m"`` into seconds (float >= 0).

    Raises ``ValueError`` with a short description of the accepted forms.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, (int, float)):
        if value < 0 or not math.isfinite(value):
            raise ValueError("expected a non-negative duration")
        return float(value)
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", text):
            return float(text)
        if text and _DURATION_PART.sub("", text) == "":
            return sum(float(n) * _UNIT_SECONDS[u.lower()] for n, u in _DURATION_PART.findall(text))
    raise ValueError('expected a duration such as 30, "90s", "15m", "6h" or "1h30m"')


T = TypeVar("T")


class Duration(float):
    """Marker type for config fields holding seconds, accepting ``parse_duration`` forms."""


# --- validators: what a value must be, worded as a whole noun phrase --------------------------


@dataclass(frozen=True)
class Check:
    """A check of one config value: ``ok(value)`` is true when the value is acceptable, and
    ``expected`` says what is, as a whole noun phrase (``"a positive {noun}"``,
    ``'one of "a", "b"'``). Errors read ``<key>: expected <expected>, got <value>``; ``{noun}``
    stands for the field's type (``integer``, ``number``, ``duration``, ``string``), so one
    check serves every type it applies to. Attach it to a dataclass field with ``check()``."""

    ok: Callable[[Any], bool]
    expected: str

    def describe(self, noun: str) -> str:
        """The expected value as a noun phrase, for a field of type ``noun`` (``{a}`` is its
        article)."""
        return self.expected.format(noun=noun, a="an" if noun[0] in "aeiou" else "a")


def check(rule: Check) -> dict[str, Any]:
    """Field metadata (``field(metadata=check(POSITIVE))``) that ``build_section`` applies
    to the field's value after converting it to the field's type."""
    return {"check": rule}


POSITIVE = Check(lambda v: v > 0, "a positive {noun}")
"""Greater than 0 (integers, numbers, durations)."""
NON_NEGATIVE = Check(lambda v: v >= 0, "a non-negative {noun}")
"""0 or more (integers, numbers, durations)."""
FRACTION = Check(lambda v: 0 < v <= 1, "a fraction in (0, 1] such as 0.99")
"""A number greater than 0 and at most 1."""
NON_EMPTY = Check(lambda v: bool(v.strip()), "a non-empty {noun}")
"""A string with something other than white space."""
PLAIN_NAME = Check(lambda v: re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", v) is not None,
                   "a plain name (letters, digits, _.-; at most 100 characters)")
"""A name usable in file names and URLs: a letter or digit, then letters, digits, ``_.-``; at
most 100 characters (campaign and stage names make file names, whose limit is 255 bytes)."""


def checked(label: str, value: T, rule: Check, noun: str) -> T:
    """``value`` when ``rule`` accepts it, else the ``ConfigError`` a config key would get,
    naming ``label`` (a command-line option such as ``--limit``)."""
    if not rule.ok(value):
        raise ConfigError(f"{label}: expected {rule.describe(noun)}, got {shown(value)}")
    return value


def env_value(environ: Mapping[str, str], name: str, rule: Check) -> Optional[str]:
    """Variable ``name`` of ``environ`` (None when unset or empty) held to the ``rule`` of the
    config key it stands in for; the ``ConfigError`` names ``$name``."""
    value = environ.get(name) or None
    return None if value is None else checked(f"${name}", value, rule, "string")


def _number(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) and not v.is_integer() else f"{int(v)}"


def within(low: float, high: float, *, low_open: bool = False, unit: str = "") -> Check:
    """From ``low`` to ``high`` inclusive (``low`` excluded with ``low_open``); ``unit``
    words the bounds of durations (``within(0, DAY, unit="s")`` says "up to 86400 s")."""
    suffix = f" {unit}" if unit else ""
    if low_open:
        return Check(lambda v: low < v <= high,
                     f"{{a}} {{noun}} above {_number(low)} and at most {_number(high)}{suffix}")
    return Check(lambda v: low <= v <= high,
                 f"{{a}} {{noun}} from {_number(low)} to {_number(high)}{suffix}")


MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0


def one_of(*choices: str) -> Check:
    """One of ``choices`` exactly (strings)."""
    return Check(lambda v: v in choices,
                 "one of " + ", ".join(json.dumps(c) for c in choices))


CATALOG_KINDS = ("local", "samweb", "metacat")
"""Catalog backends this build knows (``--catalog``, ``catalog.default``, a watch's and a
campaign's ``catalog``)."""
CATALOG = one_of(*CATALOG_KINDS)


def matches(pattern: str, expected: str) -> Check:
    """A string matching the regular expression ``pattern`` in full, described as ``expected``
    (a noun phrase; write ``{{`` for a literal brace)."""
    compiled = re.compile(pattern)
    return Check(lambda v: compiled.fullmatch(v) is not None, expected)


# "<kind>:<path>" as SAM writes it; the kind alone ("rucio:") is a valid prefix too.
_LOCATION_PREFIX = matches(r"(?s)[A-Za-z][A-Za-z0-9_.+-]*:.*",
                           'a SAM location prefix such as "enstore:/pnfs/dune/"')
_URL_FORM = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s]+(/[^?#\s]*)?")
_HTTP_FORM = re.compile(r"https?://[^/?#@\s]+(/[^?#\s]*)?")  # no user:password@


def _url_base(v: str) -> bool:
    return _URL_FORM.fullmatch(v) is not None and usable_origin(v)


def _http_url(v: str) -> bool:
    return _HTTP_FORM.fullmatch(v) is not None and usable_origin(v)


def _door(v: str) -> bool:
    return re.fullmatch(r"https://[^/?#@\s]+/?", v) is not None and usable_origin(v)


def _https_url(v: str) -> bool:
    return v.startswith("https://") and _http_url(v)


def door_key(door: str) -> tuple[str, int]:
    """``door`` (``https://host[:port]``, as checked by ``_door``) as (lower-case host, port):
    ``https://FNDCA1.fnal.gov:443`` and ``https://fndca1.fnal.gov/`` are one door."""
    from yarl import URL

    url = URL(door)
    return (url.host or "").lower(), url.port or 443


def _host_port(v: str) -> bool:
    return re.fullmatch(r"[^/?#@\s]+", v) is not None and usable_origin(f"https://{v}")


_URL_BASE = Check(_url_base,
                  'a URL base such as "https://fndca1.fnal.gov:2880/pnfs/fnal.gov/usr/" (a host, '
                  'a port up to 65535)')
HTTP_URL = Check(_http_url,
                 'an http(s) URL such as "https://samweb.fnal.gov:8483/sam/dune/api" (a host, a '
                 'port up to 65535, no user:password)')
"""A catalog server's URL (config keys and the variables standing in for them)."""
HOST_PORT = Check(_host_port,
                  'a host name with an optional port, such as "samweb.fnal.gov" or '
                  '"samweb.fnal.gov:8483"')
"""A server's ``host[:port]``."""
_DOOR = Check(_door, 'a door such as "https://fndca1.fnal.gov:2880" (https, a host, a port up '
               'to 65535, no path)')
_HTTPS_URL = Check(_https_url, 'an https URL such as "https://fndca1.fnal.gov:3880/api/v1/tape" '
                   '(a host, a port up to 65535, no user:password)')
_NAMESPACE_PATH = matches(r"/[^\s?#]*",
                          'an absolute namespace path such as "/pnfs/fnal.gov/usr/"')
_SCHEME = matches(r"[a-z][a-z0-9+.-]*", 'a URL scheme such as "https"')
# libpq's two URI schemes; the rest (hosts, socket directory, parameters) libpq itself checks
# when prestaged connects, so that a URL it accepts is never refused here.
_POSTGRES_URL = matches(r"postgres(?:ql)?://[^\s]*",
                        'a PostgreSQL URL such as "postgresql://prestaged@db.example.org/'
                        'prestaged" or "postgresql:///prestaged?host=/run/postgresql"')


def _is_listen(v: str) -> bool:
    host, sep, port = v.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        return False
    # The daemon's URL is made of it (``http://<listen>``): a host name or IPv4 address, or
    # an IPv6 literal in brackets ("[::1:80" was a ValueError traceback in every command
    # that asks the daemon; "::1:80" and "a b:80" were asked as other hosts).
    if host.startswith("["):
        if not host.endswith("]"):
            return False
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    return re.fullmatch(r"[^/?#@\s\[\]:]+", host) is not None and usable_origin(f"http://{v}")


_LISTEN = Check(_is_listen, 'a "host:port" such as "127.0.0.1:9464" (an IPv6 address in '
                'brackets: "[::1]:9464")')


# Duration ranges of the settings below (seconds).
_UP_TO_A_DAY = within(0, DAY, low_open=True, unit="s")
_UP_TO_AN_HOUR = within(0, HOUR, low_open=True, unit="s")
_UP_TO_A_WEEK = within(0, 7 * DAY, low_open=True, unit="s")
_UP_TO_A_YEAR = within(0, 365 * DAY, low_open=True, unit="s")
_ZERO_TO_A_DAY = within(0, DAY, unit="s")
_ZERO_TO_AN_HOUR = within(0, HOUR, unit="s")
_ZERO_TO_30_DAYS = within(0, 30 * DAY, unit="s")
_ZERO_TO_A_YEAR = within(0, 365 * DAY, unit="s")
_ZERO_TO_TEN_YEARS = within(0, 3650 * DAY, unit="s")


# --- sections ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CredentialsConfig:
    """``[credentials]``: where the X.509 proxy, the bearer token and the CA directory are,
    which to use, and how fresh they must be."""

    proxy: Optional[Path] = None
    """Proxy file; unset means ``$X509_USER_PROXY`` then ``/tmp/x509up_u<uid>``."""
    ca_dir: Optional[Path] = None
    """Hashed CA directory; unset: ``$X509_CERT_DIR``, ``/etc/grid-security/certificates``."""
    min_lifetime: Duration = field(default=Duration(3600.0), metadata=check(_ZERO_TO_30_DAYS))
    """Refuse to start when the proxy has less than this left (seconds; default 1 h)."""
    token_file: Optional[Path] = None
    """WLCG bearer token file; unset: ``$BEARER_TOKEN``, ``$BEARER_TOKEN_FILE``,
    ``$XDG_RUNTIME_DIR/bt_u<uid>``, ``/tmp/bt_u<uid>`` (WLCG Bearer Token Discovery)."""
    method: str = field(default="auto", metadata=check(one_of("auto", "token", "proxy")))
    """``auto``: send the token when one is found and present the proxy when one is found (both
    when both are); ``token``/``proxy``: only that one, which must be there (exit 3)."""
    token_min_lifetime: Duration = field(default=Duration(60.0),
                                         metadata=check(_ZERO_TO_30_DAYS))
    """Refuse a token with less than this left (seconds; default 60 s). Tokens live about an
    hour and are renewed in place: the daemon and long runs re-read the file."""


@dataclass(frozen=True)
class PathMap:
    """One ``[[storage.path_map]]`` table: file URLs starting with ``url_prefix`` have the
    namespace path ``path_prefix`` + the rest of the URL's path (percent-decoded), as the Tape
    REST API names files. Needed where the door serves the namespace under another root."""

    url_prefix: str = field(metadata=check(_URL_BASE))
    """E.g. ``https://fndca1.fnal.gov:2880/dune/``."""
    path_prefix: str = field(metadata=check(_NAMESPACE_PATH))
    """E.g. ``/pnfs/fnal.gov/usr/dune/``."""


@dataclass(frozen=True)
class TapeApi:
    """One ``[[storage.tape_api]]`` table: the WLCG Tape REST API of the files at ``door``, for a
    door that publishes no discovery document (``/.well-known/wlcg-tape-rest-api``) or one that
    should not be asked. The door is then never asked; the token, if any, goes to ``uri``'s
    host (it is named here, not by the storage)."""

    door: str = field(metadata=check(_DOOR))
    """The files' ``https://host:port``, e.g. ``https://fndca1.fnal.gov:2880``."""
    uri: str = field(metadata=check(_HTTPS_URL))
    """Its Tape REST API v1 endpoint, e.g. ``https://fndca1.fnal.gov:3880/api/v1/tape``."""


@dataclass(frozen=True)
class StorageConfig:
    """``[storage]``: how files are touched."""

    concurrency: int = field(default=32, metadata=check(within(1, 10_000)))
    """Files in flight at once (and the connection pool size)."""
    per_host: int = field(default=32, metadata=check(within(1, 10_000)))
    """Connections at once to one host (door or pool)."""
    bytes: int = field(default=4, metadata=check(within(1, 1 << 20)))
    """Bytes read from the start of each file (``Range: bytes=0-(n-1)``)."""
    rate: float = field(default=0.0, metadata=check(within(0, 1_000_000)))
    """Files per second per endpoint; 0 means unlimited."""
    timeout: Duration = field(default=Duration(60.0), metadata=check(_UP_TO_A_DAY))
    """Limit for one attempt on one file, redirects included (seconds)."""
    connect_timeout: Duration = field(default=Duration(15.0), metadata=check(_UP_TO_AN_HOUR))
    """Limit for connecting and the TLS handshake (seconds)."""
    max_redirects: int = field(default=5, metadata=check(within(0, 20)))
    """Redirects followed per file (a dCache door redirects once, to a pool)."""
    queue: int = field(default=0, metadata=check(within(0, 1_000_000)))
    """Files buffered between catalog and workers; 0 means 4 x concurrency."""
    fast_path: bool = True
    """Send plain ranged GETs on lean keep-alive connections (httptools), aiohttp for the rest;
    false: everything through aiohttp. Results are the same either way."""
    allow_plain_http: bool = False
    """Touch ``http://`` URLs; by default they fail ("plain http refused"): a request in clear
    exposes the bearer token and the file names. Redirects from https to http are never
    followed, whatever this says."""
    stage: str = field(default="auto", metadata=check(one_of("auto", "never", "always")))
    """Tape staging: ``auto`` asks an endpoint that advertises the WLCG Tape REST API where each
    file is and stages tape-only files before touching them (others are only touched);
    ``never`` touches every file with a ranged GET; ``always`` fails (exit 5) for an endpoint
    without the API."""
    stage_batch: int = field(default=200, metadata=check(within(1, 500)))
    """Files per stage request (dCache refuses more than 500; a 413 halves it)."""
    stage_requests: int = field(default=50, metadata=check(within(1, 5000)))
    """Open stage requests per endpoint at most."""
    poll_min: Duration = field(default=Duration(2.0), metadata=check(_UP_TO_AN_HOUR))
    """First wait before polling a stage request, and the wait after a poll that showed
    progress (seconds)."""
    poll_max: Duration = field(default=Duration(300.0), metadata=check(_UP_TO_A_DAY))
    """Longest wait between two polls of one stage request; the wait doubles up to it."""
    poll_errors: int = field(default=10, metadata=check(within(1, 1000)))
    """Polls of one stage request that may fail in a row (5xx, no answer) before its unfinished
    files fail, and stage POSTs that find no connection in a row before the files waiting for
    one fail; with the doubling waits, 10 outlast a frontend down for 18 minutes or more."""
    stage_timeout: Duration = field(default=Duration(DAY), metadata=check(_UP_TO_A_WEEK))
    """A file not on disk this long after its stage request is cancelled and fails."""
    pin_lifetime: Duration = field(default=Duration(DAY), metadata=check(_UP_TO_A_WEEK))
    """How long a staged file is pinned on disk (the request's ``diskLifetime``)."""
    discovery_ttl: Duration = field(default=Duration(HOUR), metadata=check(_UP_TO_A_DAY))
    """How long the daemon trusts an endpoint's Tape REST discovery document (seconds)."""
    path_map: tuple[PathMap, ...] = ()
    """``[[storage.path_map]]`` rules from file URLs to namespace paths; first match wins; a
    URL no rule matches uses its own path."""
    tape_api: tuple[TapeApi, ...] = ()
    """``[[storage.tape_api]]``: doors whose Tape REST API is named here instead of discovered."""

    def __post_init__(self) -> None:
        if self.poll_max < self.poll_min:
            raise ConfigError(f"storage.poll_max ({self.poll_max:g} s) must not be below "
                              f"storage.poll_min ({self.poll_min:g} s)")
        seen: dict[tuple[str, int], int] = {}
        for i, api in enumerate(self.tape_api):
            first = seen.setdefault(door_key(api.door), i)
            if first != i:
                raise ConfigError(f"storage.tape_api[{i}].door: {api.door} is the door of "
                                  f"storage.tape_api[{first}] too (one entry per door)")


@dataclass(frozen=True)
class RetryConfig:
    """``[retry]``: exponential backoff with jitter for 5xx, 429, timeouts and resets."""

    attempts: int = field(default=5, metadata=check(within(1, 100)))
    """Tries per file, the first included."""
    initial: Duration = field(default=Duration(0.5), metadata=check(_ZERO_TO_AN_HOUR))
    """First backoff (seconds); doubles each retry."""
    max: Duration = field(default=Duration(30.0), metadata=check(_ZERO_TO_A_DAY))
    """Largest backoff between two tries (seconds)."""
    jitter: float = field(default=0.5, metadata=check(within(0, 10)))
    """Random extra delay, as a fraction of the backoff (0.5 = up to +50%)."""
    total: Duration = field(default=Duration(600.0), metadata=check(_UP_TO_A_WEEK))
    """Time budget for one file across all its tries (seconds)."""
    max_retry_after: Duration = field(default=Duration(300.0), metadata=check(_ZERO_TO_A_DAY))
    """Largest server ``Retry-After`` honoured (seconds); longer asks give up on the file."""


@dataclass(frozen=True)
class BreakerConfig:
    """``[breaker]``: stop a run early when an endpoint refuses us again and again."""

    denials: int = field(default=20, metadata=check(within(1, 1_000_000)))
    """Consecutive 401/403 answers from one endpoint that stop a run sending no bearer token
    (exit 3)."""
    token_denials: int = field(default=3, metadata=check(within(1, 1_000_000)))
    """Consecutive 401/403 answers from one endpoint that stop a run sending a bearer token
    (exit 3). Low: a refused token is refused for every file, and dCache blocks a client at
    its 3rd 401, each within 20 s of the one before."""
    tls_failures: int = field(default=5, metadata=check(within(1, 1_000_000)))
    """Consecutive refused connections (TLS handshake failures, or hang-ups by an endpoint that
    never answered) that stop the run (exit 3)."""
    unreachable: int = field(default=50, metadata=check(within(1, 1_000_000)))
    """Consecutive files failing to connect (after retries) that stop the run (exit 5)."""


@dataclass(frozen=True)
class LocalCatalogConfig:
    """``[catalog.local]``: definitions as text files of URLs."""

    dir: Optional[Path] = None
    """Directory holding ``NAME.txt`` definition files for ``prestaged warm NAME``."""


@dataclass(frozen=True)
class RewriteRule:
    """One ``[[catalog.samweb.rewrite]]`` table: a SAM location prefix and the URL base for it.

    A file at ``location`` (tape suffix ``(597@vr0337m8)`` removed) that starts with
    ``location`` here gets the URL ``url`` + the rest of the location + ``/`` + the file name.
    A prefix that does not end in ``/`` or ``:`` only matches whole path components.
    """

    location: str = field(metadata=check(_LOCATION_PREFIX))
    """Location prefix, e.g. ``enstore:/pnfs/dune/`` or ``dcache:/pnfs/dune/``."""
    url: str = field(metadata=check(_URL_BASE))
    """What replaces the prefix, e.g. ``https://fndca1.fnal.gov:2880/pnfs/fnal.gov/usr/dune/``."""


@dataclass(frozen=True)
class CatalogServerKeys:
    """The keys every networked catalog section has (``[catalog.samweb]``, ``.metacat``,
    ``.rucio``): how long to wait for its server, and how long to retry it."""

    timeout: Duration = field(default=Duration(120.0), metadata=check(_UP_TO_A_DAY))
    """Connect limit, and longest wait for the next bytes of an answer (seconds)."""
    retry_initial: Duration = field(default=Duration(1.0), metadata=check(_ZERO_TO_AN_HOUR))
    """First backoff after a 5xx, timeout or dropped connection (seconds); doubles each retry."""
    retry_max: Duration = field(default=Duration(60.0), metadata=check(_ZERO_TO_A_DAY))
    """Largest backoff between two tries (seconds); also caps a server's ``Retry-After``."""
    retry_for: Duration = field(default=Duration(3600.0), metadata=check(_ZERO_TO_30_DAYS))
    """Give up on an unanswered request after retrying this long (seconds; 0: never retry)."""


def plain_http(url: Optional[str]) -> bool:
    """Whether ``url`` (a catalog server's) is plain ``http://``: no credential goes there."""
    return url is not None and url.startswith("http://")


def token_in_clear(where: str, setting: str, would: str = "send the bearer token to it",
                   fix: Optional[str] = None) -> ConfigError:
    """The error for a credential (a token, a password) that ``setting``
    (``catalog.samweb.use_token = true``) would expose at the ``http://`` URL of ``where`` (a
    key or ``$VARIABLE``): ``would`` says how, ending before "in clear" ("send the MetaCat
    token to it"); ``fix`` is the other way out than an https URL (default: change the key
    ``setting`` names; "" when there is none)."""
    other = f"change {setting.partition(' ')[0]}" if fix is None else fix
    return ConfigError(f"{where}: an http:// URL, and {setting} would {would} in clear; give "
                       "an https:// URL (credentials go over https only)"
                       + (f" or {other}" if other else ""))


@dataclass(frozen=True)
class SamWebConfig(CatalogServerKeys):
    """``[catalog.samweb]``: the SAM web REST API and how its locations become URLs."""

    base_url: Optional[str] = field(default=None, metadata=check(HTTP_URL))
    """API base; unset: ``$SAM_WEB_BASE_URL``, else ``https://<host>:8483/sam/<experiment>/api``."""
    host: Optional[str] = field(default=None, metadata=check(HOST_PORT))
    """SAM web host; unset: ``$SAM_WEB_HOST``, then ``samweb.fnal.gov``."""
    experiment: Optional[str] = field(default=None, metadata=check(PLAIN_NAME))
    """Experiment (``dune``, ``uboone``, ...); unset: ``$SAM_EXPERIMENT``."""
    batch: int = field(default=500, metadata=check(within(1, 10_000)))
    """File names per bulk ``/files/locations`` request (the samweb client sends 50)."""
    parallel: int = field(default=4, metadata=check(within(1, 64)))
    """Location requests in flight at once (bounds the files held in memory, too)."""
    url_mode: str = field(default="rewrite", metadata=check(one_of("rewrite", "access-url")))
    """``rewrite``: locations -> URLs by the rules; ``access-url``: ask SAM per file."""
    access_url_concurrency: int = field(default=16, metadata=check(within(1, 1000)))
    """Per-file access-URL requests in flight at once (``url_mode = "access-url"``)."""
    schema: str = field(default="https", metadata=check(_SCHEME))
    """URL scheme asked for in ``access-url`` mode."""
    use_certificate: Optional[bool] = None
    """Present the X.509 proxy to SAM; unset: when a usable proxy is found, else anonymous."""
    use_token: bool = False
    """Send the bearer token (``Authorization: Bearer``) with every SAM request. Off by
    default: SAM web at Fermilab authenticates by certificate."""
    role: Optional[str] = field(default=None, metadata=check(PLAIN_NAME))
    """SAM role sent as the ``SAM-Role`` header (e.g. ``production``); unset: no header, SAM
    uses ``default``."""
    rewrite: tuple[RewriteRule, ...] = ()
    """Location -> URL rules, first match wins (``[[catalog.samweb.rewrite]]`` tables)."""

    def __post_init__(self) -> None:
        if self.use_token and plain_http(self.base_url):
            raise token_in_clear("catalog.samweb.base_url", "catalog.samweb.use_token = true")


@dataclass(frozen=True)
class MetaCatConfig(CatalogServerKeys):
    """``[catalog.metacat]``: DUNE's file catalog MetaCat (datasets ``namespace:name``, MQL
    queries); the files' replicas come from ``[catalog.rucio]``."""

    url: Optional[str] = field(default=None, metadata=check(HTTP_URL))
    """Server URL as the metacat client takes it, application prefix included (e.g.
    ``https://metacat.fnal.gov:9443/dune_meta_prod/app``); unset: ``$METACAT_SERVER_URL``."""
    auth: str = field(default="auto", metadata=check(one_of("auto", "metacat", "token",
                                                              "none")))
    """``metacat``: the MetaCat token (``token_file``, else the token library's entry for
    ``url``, as ``metacat auth login`` leaves it) as ``X-Authentication-Token``; ``token``: the
    WLCG bearer token (``[credentials]``) as ``Authorization: Bearer``; ``none``: anonymous
    (MetaCat reads need no token); ``auto``: the MetaCat token when there is one, else none
    (the WLCG token is sent to MetaCat only with ``token``). A token goes over https only:
    ``metacat`` or ``token`` with an ``http://`` URL is refused (exit 2); ``auto`` (without
    ``token_file``) reads an ``http://`` MetaCat anonymously, with a WARNING when it leaves a
    token library entry unsent."""
    token_file: Optional[Path] = None
    """File holding a MetaCat token; unset: the token library. Set, with ``auth = "auto"`` and
    an ``http://`` URL, it is refused (exit 2): it would be sent in clear."""
    token_library: Optional[Path] = None
    """The metacat client's token library (lines ``<server URL> <token>``); unset:
    ``$HOME/.token_library``, ``./.token_library``, ``/tmp/.token_library``, as the client."""
    page: int = field(default=10_000, metadata=check(within(1, 1_000_000)))
    """Files per page of an MQL query (``(QUERY) ordered skip K limit N``, as the client
    pages); a page cut off midway is asked again."""

    def __post_init__(self) -> None:
        self.refuse_in_clear(self.url, "catalog.metacat.url")

    def refuse_in_clear(self, url: Optional[str], where: str) -> None:
        """``ConfigError`` (``token_in_clear``) when ``url``, the server's (named ``where``: this
        key or ``$METACAT_SERVER_URL``), is plain http and these settings would send it a
        token: ``auth = "token"`` or ``"metacat"``, or ``"auto"`` with ``token_file`` set. (A
        token ``auto`` finds in the token library is not sent there; see ``auth``.)"""
        if not plain_http(url):
            return
        if self.auth == "token":
            raise token_in_clear(where, 'catalog.metacat.auth = "token"')
        if self.auth == "metacat":
            raise token_in_clear(where, 'catalog.metacat.auth = "metacat"',
                                 "send the MetaCat token to it")
        if self.auth == "auto" and self.token_file is not None:
            raise token_in_clear(where, 'catalog.metacat.token_file (with auth = "auto")',
                                 "send the MetaCat token to it",
                                 'set catalog.metacat.auth = "none" to read anonymously')


# What each catalog.rucio.auth would expose at an http:// url (every request carries a
# token; with userpass and no auth_url the login goes there too), and at an http:// auth_url.
_RUCIO_SENDS = {
    "token": "send the bearer token to it",
    "x509": "send the login token Rucio hands out (X-Rucio-Auth-Token) to it",
    "userpass": "send the login token Rucio hands out (X-Rucio-Auth-Token) to it",
    "auto": "send the bearer token, or the login token Rucio hands out, to it",
}
_USERPASS_HERE = "send the password, then the login token Rucio hands out, to it"
_LOGIN_IN_CLEAR = "log in there without TLS (no proxy can be presented) and get the login token"
_RUCIO_LOGIN_SENDS = {
    "x509": _LOGIN_IN_CLEAR,
    "userpass": "send the password to it",
    "auto": _LOGIN_IN_CLEAR,
}


@dataclass(frozen=True)
class RucioConfig(CatalogServerKeys):
    """``[catalog.rucio]``: the replica catalog that turns MetaCat's files into URLs."""

    url: Optional[str] = field(default=None, metadata=check(HTTP_URL))
    """Rucio server (``rucio_host``), e.g. ``https://dune-rucio.fnal.gov``. An ``http://`` one
    is refused (exit 2): every request carries a token (the WLCG one, or the login token
    Rucio hands out), which must not go in clear."""
    auth_url: Optional[str] = field(default=None, metadata=check(HTTP_URL))
    """Rucio authentication server (``auth_host``); unset: ``url``. An ``http://`` one is
    refused (exit 2) unless ``auth = "token"`` (which never logs in): a userpass login sends the
    password, and any login gets the login token back, in clear (nor can an x509 login present
    the proxy without TLS)."""
    account: Optional[str] = field(default=None, metadata=check(PLAIN_NAME))
    """Rucio account (``X-Rucio-Account``); unset: ``$RUCIO_ACCOUNT``, else (X.509 only) the
    identity's default account."""
    auth: str = field(default="auto", metadata=check(one_of("auto", "x509", "userpass",
                                                              "token")))
    """``x509``: log in with the proxy (``/auth/x509``); ``userpass``: with ``username`` and
    ``password_file`` (``/auth/userpass``); ``token``: send the WLCG bearer token itself;
    ``auto``: the token when one was found, else the proxy."""
    username: Optional[str] = None
    """User name of a ``userpass`` identity."""
    password_file: Optional[Path] = None
    """File holding the ``userpass`` password (never logged)."""
    rse_expression: Optional[str] = None
    """Only replicas on RSEs matching this Rucio RSE expression; unset: all."""
    rse_preference: tuple[str, ...] = field(default=(), metadata=check(PLAIN_NAME))
    """RSEs in order of preference (after DISK before TAPE); unlisted RSEs come after, in
    Rucio's priority order. Empty: Rucio's priority alone."""
    chunk: int = field(default=500, metadata=check(within(1, 1000)))
    """Files per ``/replicas/list`` request (Rucio struggles above 1,000)."""
    parallel: int = field(default=4, metadata=check(within(1, 64)))
    """Replica requests in flight at once (bounds the files held in memory, too)."""

    def __post_init__(self) -> None:
        setting = f'catalog.rucio.auth = "{self.auth}"'
        if plain_http(self.url):
            login_too = self.auth == "userpass" and self.auth_url is None
            raise token_in_clear("catalog.rucio.url", setting,
                                 _USERPASS_HERE if login_too else _RUCIO_SENDS[self.auth],
                                 fix="")
        if self.auth != "token" and plain_http(self.auth_url):
            raise token_in_clear("catalog.rucio.auth_url", setting,
                                 _RUCIO_LOGIN_SENDS[self.auth], fix="")


@dataclass(frozen=True)
class CatalogConfig:
    """``[catalog]``: which catalog resolves a definition name."""

    default: str = field(default="local", metadata=check(CATALOG))
    """Catalog used when ``--catalog`` is not given."""
    local: LocalCatalogConfig = field(default_factory=LocalCatalogConfig)
    samweb: SamWebConfig = field(default_factory=SamWebConfig)
    metacat: MetaCatConfig = field(default_factory=MetaCatConfig)
    rucio: RucioConfig = field(default_factory=RucioConfig)


@dataclass(frozen=True)
class StateConfig:
    """``[state]``: the record of what was warmed when: a SQLite file (default), or a
    PostgreSQL database that several daemons share."""

    path: Optional[Path] = None
    """Database file; unset: ``$XDG_STATE_HOME/prestaged/state.db`` (``~/.local/state/...``)."""
    url: Optional[str] = field(default=None, metadata=check(_POSTGRES_URL))
    """PostgreSQL database instead of the file, as a libpq URL:
    ``postgresql://USER@HOST/DB`` or ``postgresql:///DB?host=/run/postgresql`` (unix socket);
    keep its password in ``~/.pgpass`` (or ``?passfile=``) rather than here. Unset: SQLite."""
    fresh_for: Duration = field(default=Duration(6 * 3600.0), metadata=check(_ZERO_TO_A_YEAR))
    """Files touched successfully within this long are skipped unless ``--force`` (0: never)."""
    batch: int = field(default=500, metadata=check(within(1, 100_000)))
    """Outcomes per write transaction; a crash loses at most one batch (re-warmed next time)."""
    flush_interval: Duration = field(default=Duration(1.0), metadata=check(_UP_TO_AN_HOUR))
    """Longest time an outcome waits before it is written (seconds)."""
    journal: str = field(default="auto", metadata=check(one_of("auto", "wal", "delete")))
    """The SQLite file's journal: ``auto`` is WAL on a local filesystem and the rollback
    journal (``delete``) on a network one (NFS, AFS, EOS...), where WAL works on one host only."""
    keep_runs: int = field(default=1000, metadata=check(within(0, 10_000_000)))
    """Runs kept per definition, the newest: older ones are dropped as each run ends and by
    the daemon's tidy (0: keep every run)."""
    tidy_every: Duration = field(default=Duration(DAY), metadata=check(_ZERO_TO_30_DAYS))
    """How often the daemon drops what the state no longer needs (runs beyond ``keep_runs``,
    files no definition lists and no pin holds, finished watch rounds but each watch's last,
    campaigns finished longer ago than ``keep_campaigns``); the first tidy comes at most 10
    minutes after start (0: never)."""
    keep_campaigns: Duration = field(default=Duration(30 * DAY),
                                     metadata=check(_ZERO_TO_TEN_YEARS))
    """How long the daemon's tidy keeps a finished campaign (every stage done or cancelled,
    every submission final) for ``campaign list/show``, then drops it and its history
    (0: keep it for ever; ``prestaged campaign forget`` drops one at once)."""

    def __repr__(self) -> str:
        # The config's repr (a traceback's, a debugger's, a test failure's) must not carry the
        # password of state.url: the dataclass one, but with the URL as redacted_url shows it.
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.url is not None:
            shown["url"] = redacted_url(self.url)
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def __post_init__(self) -> None:
        if self.path is not None and self.url is not None:
            raise ConfigError("state.path and state.url are both set: set path for a SQLite "
                              "file or url for a PostgreSQL database, not both (--state "
                              "names a file instead of either)")


@dataclass(frozen=True)
class DaemonConfig:
    """``[daemon]``: ``prestaged serve``'s HTTP listener and lifecycle."""

    listen: str = field(default="127.0.0.1:9464", metadata=check(_LISTEN))
    """Address of the HTTP API and /metrics; loopback by default. Any other address requires
    ``token_file`` and ``tls_cert``/``tls_key``."""
    token_file: Optional[Path] = None
    """File (mode 0600) holding the bearer token that mutating API calls must present;
    required whenever ``listen`` is not a loopback address."""
    tls_cert: Optional[Path] = None
    """PEM certificate (then any intermediates) the API and /metrics are served with over TLS
    1.2 or later, e.g. the host certificate ``/etc/grid-security/hostcert.pem``; set with
    ``tls_key``. Required whenever ``listen`` is not a loopback address: the bearer token
    would cross the network in clear. Unset: plain HTTP. The CLI talks https when it (or
    ``tls_ca``) is set.
    Re-read on reload (SIGHUP) for new connections."""
    tls_key: Optional[Path] = None
    """The private key of ``tls_cert`` (PEM, unencrypted), in a file no group or other user
    may read (0600 or 0400, as ``token_file``): whoever reads it can pose as the daemon to
    the CLI and collect the bearer token."""
    tls_ca: Optional[Path] = None
    """CA file or hashed CA directory the CLI verifies the daemon's certificate against
    (hostname checking on: the host of ``listen``, or this host's name for 0.0.0.0 and ::).
    Unset: the grid CA directory of ``credentials.ca_dir`` (else ``$X509_CERT_DIR``, else
    ``/etc/grid-security/certificates``), which holds the CA of a grid host certificate. Set
    alone (the CLI's config on another host, without the daemon's key), it makes the CLI talk
    https; ``serve`` refuses it without ``tls_cert``."""
    drain_timeout: Duration = field(default=Duration(30.0), metadata=check(_ZERO_TO_A_DAY))
    """On SIGTERM, how long running warms may go on before they are stopped (seconds)."""
    credential_check: Duration = field(default=Duration(30.0), metadata=check(_UP_TO_A_DAY))
    """How often the proxy file is checked for renewal and expiry (seconds)."""
    jitter: float = field(default=0.1, metadata=check(within(0, 0.9)))
    """Scheduled re-warms start up to this fraction of ``every`` early or late."""
    campaign_check: Duration = field(default=Duration(300.0), metadata=check(_UP_TO_A_WEEK))
    """How often a campaign that stopped short (held, a failed submission, its catalog
    unreachable) is looked at again; operator actions through the API act at once (seconds)."""
    max_runs: int = field(default=100, metadata=check(within(1, 10_000)))
    """Warm runs running at once: the runs of watches (and chunks) beyond them wait queued.
    An API request while this many are queued or running answers 429 (a request for a
    definition already queued or running joins that run instead)."""

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            given, missing = (("tls_cert", "tls_key") if self.tls_key is None
                              else ("tls_key", "tls_cert"))
            raise ConfigError(f"daemon.{missing}: required with daemon.{given} (the API's "
                              "certificate and its key, both PEM files)")


@dataclass(frozen=True)
class ClusterConfig:
    """``[cluster]``: several daemons sharing one PostgreSQL state (``state.url``) share its
    work through leases in the database (README "Running several daemons")."""

    lease: Duration = field(default=Duration(60.0), metadata=check(_UP_TO_A_DAY))
    """A member whose heartbeat is older than this is dead; its leases (renewed every third of
    this) expire at most this long after it died, and another member takes its work (s)."""
    heartbeat: Duration = field(default=Duration(5.0), metadata=check(_UP_TO_AN_HOUR))
    """How often a member heartbeats and looks for work to claim (s): a dead member's work is
    taken over within ``lease`` plus this."""
    chunk: int = field(default=10_000, metadata=check(within(1, 10_000_000)))
    """Files per chunk of a watch round on a shared state; members claim chunks independently."""

    def __post_init__(self) -> None:
        if self.heartbeat * 3 > self.lease:
            raise ConfigError(f"cluster.heartbeat {self.heartbeat:g}s: at most a third of "
                              f"cluster.lease ({self.lease:g}s), or a live member would look "
                              "dead after one late heartbeat")


@dataclass(frozen=True)
class WatchConfig:
    """One ``[[watch]]`` table: a definition the daemon keeps warm."""

    definition: str = field(metadata=check(NON_EMPTY))
    """Definition name (or, for the local catalog, a path to a URL list)."""
    catalog: Optional[str] = field(default=None, metadata=check(CATALOG))
    """Catalog resolving it; unset: ``catalog.default``."""
    every: Duration = field(default=Duration(6 * 3600.0), metadata=check(_UP_TO_A_YEAR))
    """Re-warm interval (seconds); files touched within it are not touched again."""
    ready: float = field(default=1.0, metadata=check(FRACTION))
    """Fraction of the definition that must be warm for it to count as ready."""


@dataclass(frozen=True)
class OutputConfig:
    """``[output]``: progress reporting."""

    progress_interval: Duration = field(default=Duration(30.0), metadata=check(_UP_TO_A_DAY))
    """Seconds between one-line progress reports when stderr is not a terminal."""
    log_level: str = "info"
    """One of debug, info, warning, error."""

    def __post_init__(self) -> None:
        if self.log_level.lower() not in {"debug", "info", "warning", "error"}:
            raise ConfigError(
                "output.log_level: expected one of debug, info, warning, error, "
                f'got "{self.log_level}"'
            )


@dataclass(frozen=True)
class Config:
    """The whole configuration; every section has defaults, so ``Config()`` is valid."""

    credentials: CredentialsConfig = field(default_factory=CredentialsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    state: StateConfig = field(default_factory=StateConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    watch: tuple[WatchConfig, ...] = ()
    """``[[watch]]`` definitions kept warm by ``prestaged serve``."""
    source: Optional[Path] = field(default=None, metadata={"internal": True})
    """File this was loaded from, or None for built-in defaults."""


# --- loading ----------------------------------------------------------------------------------


def default_config_paths(env: Mapping[str, str] | None = None) -> list[Path]:
    """Implicit locations searched after ``--config`` and ``$PRESTAGED_CONFIG``."""
    env = os.environ if env is None else env
    home = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".config")
    return [Path(home) / "prestaged" / "prestaged.toml", Path("/etc/prestaged/prestaged.toml")]


def find_config(explicit: Path | None, env: Mapping[str, str] | None = None) -> Path | None:
    """Return the config file to load per the search order, or None for built-in defaults."""
    env = os.environ if env is None else env
    if explicit is not None:
        return explicit
    if env.get("PRESTAGED_CONFIG"):
        return Path(env["PRESTAGED_CONFIG"])
    for candidate in default_config_paths(env):
        if candidate.is_file():
            return candidate
    return None


CONFIG_MAX_BYTES = 1 << 20
"""A config file's largest size (one of ours is a few KiB; /dev/zero is not one)."""


def load_config(path: Path | None) -> Config:
    """Load and validate ``path`` (None: built-in defaults). Raises ``ConfigError`` (exit 2)."""
    if path is None:
        return Config()
    text = read_small_text(path, CONFIG_MAX_BYTES, "config")  # TOML is UTF-8
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path}: invalid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"config {path}: invalid TOML: nested too deeply") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise ConfigError(f"config {path}: invalid TOML: {e}") from None
    base = path.parent
    try:
        cfg = build_section(Config, data, "", base)
    except ConfigError as e:
        raise ConfigError(f"config {path}: {e}") from None
    loaded: Config = dataclasses.replace(cfg, source=path)
    return loaded


def replace_path(cfg: Any, dotted: str, value: Any, label: str | None = None) -> Any:
    """Return a copy of the frozen dataclass ``cfg`` with ``a.b.c`` set to ``value`` (validated).

    Used by the CLI so that every flag overrides its config key through the same checks;
    ``label`` (e.g. ``--concurrency``) names the value in errors instead of the key path.
    """
    head, _, rest = dotted.partition(".")
    if rest:
        inner = replace_path(getattr(cfg, head), rest, value, label or dotted)
        return dataclasses.replace(cfg, **{head: inner})
    hints = get_type_hints(type(cfg))
    fld = {f.name: f for f in dataclasses.fields(cfg)}[head]
    converted = _convert(hints[head], fld, value, label or dotted, Path.cwd())
    return dataclasses.replace(cfg, **{head: converted})




def build_section(cls: type[T], data: object, prefix: str, base: Path) -> T:
    """``cls`` (a frozen dataclass whose fields may carry ``check()`` metadata) built from the
    TOML table ``data``: each value converted to its field's type and checked, nested tables
    and arrays of tables built alike. ``prefix`` is the key path of ``data`` with its trailing
    dot (``"storage."``; ``""`` for the top level), named in every error; relative paths are
    taken from ``base``. Raises ``ConfigError`` (a whole sentence naming the key) for an
    unknown key, a missing required key, or a value of the wrong type or out of range."""
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"{where}: expected a table, got {shown(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)  # type: ignore[arg-type]
              if not f.metadata.get("internal")}
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    # Keys the caller took out of ``data`` before (``metadata={"internal": True, "key":
    # True}``: a campaign stage's ``after``) are keys all the same, and named in hints.
    keys = [*fields, *(f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                       if f.metadata.get("key"))]
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            known = ", ".join(sorted(keys))
            raise ConfigError(f"unknown key {prefix}{key}{hint}; keys here: {known}")
        fld = fields[key]
        kwargs[key] = _convert(hints[key], fld, value, prefix + key, base)
    required = [
        name for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if required:
        raise ConfigError(f"{prefix}{required[0]}: required key missing")
    return cls(**kwargs)


def _table_array(tp: Any, value: object, key: str, base: Path) -> tuple[Any, ...]:
    """An array of tables (``[[a.b]]``) as a tuple of ``tp``; errors name ``key[i].field``."""
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected an array of tables ([[{key}]]), got {shown(value)}")
    return tuple(build_section(tp, item, f"{key}[{i}].", base) for i, item in enumerate(value))


def _string_array(fld: dataclasses.Field[Any], value: object, key: str) -> tuple[str, ...]:
    """An array of strings, each passing the field's check; errors name ``key[i]``."""
    if not isinstance(value, list):
        raise ConfigError(f'{key}: expected an array of strings such as ["A", "B"], '
                          f"got {shown(value)}")
    rule: Optional[Check] = fld.metadata.get("check")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(f"{key}[{i}]: expected a string, got {shown(item)}")
        if rule is not None and not rule.ok(item):
            raise ConfigError(f"{key}[{i}]: expected {rule.describe('string')}, "
                              f"got {shown(item)}")
    return tuple(value)


def _hidden(text: str) -> str:
    """``text`` with any password in it hidden: a URL's (``redacted_url``), or what precedes the
    ``@`` of a ``user:password@host`` written without a scheme."""
    if "://" not in text and "@" in text:
        return "***@" + text.rpartition("@")[2]
    return redacted_url(text)


def _strings_hidden(value: object) -> object:
    if isinstance(value, str):
        return _hidden(value)
    if isinstance(value, dict):
        return {k: _strings_hidden(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strings_hidden(v) for v in value]
    return value


def shown(value: object) -> str:
    """``value`` as an error message quotes it after "got": strings in double quotes (JSON
    escapes), anything else as its ``repr``; any password in a string, or in the strings of a
    table or array written where a string goes, hidden (``redacted_url``)."""
    if isinstance(value, str):
        return json.dumps(_hidden(value), ensure_ascii=False)
    return repr(_strings_hidden(value))


_NOUNS: dict[Any, str] = {Duration: "duration", int: "integer", float: "number", str: "string"}
_DURATION_FORMS = ' (seconds, or a string such as "90s", "15m", "6h" or "1h30m")'


def _typed(tp: Any, value: object) -> Any:
    """``value`` as type ``tp`` (one of ``_NOUNS``); ``ValueError`` when it is not one."""
    if isinstance(value, bool):  # a TOML true/false is no number and no string
        raise ValueError(value)
    if tp is Duration:
        return Duration(parse_duration(value))
    if tp is int and isinstance(value, int):
        return value
    if tp is float and isinstance(value, (int, float)):
        if not math.isfinite(value):  # TOML has inf and nan; no setting means either
            raise ValueError(value)
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    raise ValueError(value)


def _convert(tp: Any, fld: dataclasses.Field[Any], value: object, key: str, base: Path) -> Any:
    optional = False
    if getattr(tp, "__origin__", None) is Union:
        args = [a for a in tp.__args__ if a is not type(None)]
        optional, tp = True, args[0]
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, key + ".", base)  # type: ignore[arg-type]
    if getattr(tp, "__origin__", None) is tuple:
        item, rest = tp.__args__[0], tp.__args__[1:]
        if rest == (Ellipsis,) and item is str:
            return _string_array(fld, value, key)
        if rest != (Ellipsis,) or not dataclasses.is_dataclass(item):  # pragma: no cover
            raise TypeError(f"unsupported config type {tp!r} for {key}")
        return _table_array(item, value, key, base)
    if optional and value in ("", None):
        return None
    got = shown(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {got}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)) or "\x00" in str(value):
            raise ConfigError(f"{key}: expected a path (a string without NUL bytes), got {got}")
        try:
            p = Path(value).expanduser()
        except RuntimeError:  # ~name of no user: "Could not determine home directory."
            raise ConfigError(f"{key}: {got}: no such user's home directory") from None
        return p if p.is_absolute() else base / p
    if tp not in _NOUNS:  # pragma: no cover - a programming error in the dataclasses above
        raise TypeError(f"unsupported config type {tp!r} for {key}")
    # One phrase for both failures (wrong type, or out of range), from the field's check when
    # it has one: "expected a positive integer, got ..." whichever way the value is wrong.
    rule: Optional[Check] = fld.metadata.get("check")
    noun = _NOUNS[tp]
    expected = rule.describe(noun) if rule else ("an " if noun[0] in "aeiou" else "a ") + noun
    try:
        converted = _typed(tp, value)
    except ValueError:
        forms = _DURATION_FORMS if tp is Duration else ""
        raise ConfigError(f"{key}: expected {expected}{forms}, got {got}") from None
    if rule is not None and not rule.ok(converted):
        raise ConfigError(f"{key}: expected {expected}, got {got}")
    return converted
