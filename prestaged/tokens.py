"""WLCG bearer tokens: find them, describe them, refuse unusable ones early, follow renewals.

prestaged is not the relying party: it never verifies a token's signature (the storage does).
It decodes the payload to tell the user what the token allows and until when, and to refuse a
token that cannot work (expired, not yet valid, about to expire, malformed) before any request,
because the server cannot be trusted to refuse promptly: XRootD's SciTokens plugin keeps an
accepted token for 60 s past its ``exp``.

Where tokens are (WLCG Bearer Token Discovery, after our own two places): ``--token-file``,
``[credentials] token_file``, ``$BEARER_TOKEN`` (the token itself), ``$BEARER_TOKEN_FILE``,
``$XDG_RUNTIME_DIR/bt_u<uid>``, ``/tmp/bt_u<uid>``. Surrounding whitespace is stripped and
empty values are skipped. A file named explicitly (the first two and ``$BEARER_TOKEN_FILE``)
that cannot be read is an error; the two default locations are only looked at.

htgettoken and condor's credmon rewrite the token file in place about every hour, so a
``TokenSource`` re-reads it when it changes (checked at most every ``recheck`` seconds).

Nothing here ever puts a token, or any part of it, into a message, a log record or a repr.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from prestaged.errors import CredentialError
from prestaged.files import exposed_mode, file_stamp, read_small, size_text
from prestaged.model import hide_secret

__all__ = [
    "WLCG_ANY_AUDIENCE",
    "FoundToken",
    "ScopeWarner",
    "TokenInfo",
    "TokenSource",
    "check_token",
    "describe_locations",
    "find_token",
    "inspect_token",
    "read_credential_file",
    "read_token_file",
    "scope_covers",
    "scopes_refuse",
    "token_locations",
    "url_path",
    "warn_if_token_exposed",
]

logger = logging.getLogger(__name__)

WLCG_ANY_AUDIENCE = "https://wlcg.cern.ch/jwt/v1/any"
_RENEW_HINT = "renew it (htgettoken, or whatever writes the token file)"
# A WLCG access token is 1-3 KiB; refuse to slurp something that obviously is not one.
_MAX_TOKEN_BYTES = 64 * 1024
_B64URL = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _format_time(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _span(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 0:
        return f"expired {_span(-seconds)} ago"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m"


# --------------------------------------------------------------------------------------------
# What a token says
# --------------------------------------------------------------------------------------------


_AUDIENCES_SHOWN = 3  # a token's audiences named in a message; the rest are counted


@dataclass(frozen=True)
class TokenInfo:
    """The claims of a token that a user and prestaged care about (never the token itself).

    ``source`` says where it was found (``--token-file``, ``$BEARER_TOKEN``...), ``path`` is
    its file (None for ``$BEARER_TOKEN``). Times are tz-aware UTC; ``not_before`` and
    ``issued_at`` are None when the token has no such claim.
    """

    source: str
    path: Optional[Path]
    issuer: str
    subject: str
    audience: tuple[str, ...]
    scopes: tuple[str, ...]
    groups: tuple[str, ...]
    expires: datetime
    not_before: Optional[datetime] = None
    issued_at: Optional[datetime] = None
    wlcg_ver: Optional[str] = None

    def time_left(self, now: Optional[datetime] = None) -> timedelta:
        """Lifetime left at ``now`` (default: the current UTC time); negative once expired."""
        return self.expires - (now if now is not None else _utcnow())

    def valid_at(self, now: Optional[datetime] = None) -> bool:
        """Whether the token can be sent at ``now`` (default: the current UTC time): past its
        ``nbf`` (if any) and before its ``exp``."""
        now = now if now is not None else _utcnow()
        return now < self.expires and (self.not_before is None or now >= self.not_before)

    @property
    def where(self) -> str:
        """``token /tmp/bt_u1000 (from $BEARER_TOKEN_FILE)`` or ``token from $BEARER_TOKEN``."""
        if self.path is None:
            return f"token from {self.source}"
        if self.source.startswith("default"):
            return f"token {self.path} (default location)"
        return f"token {self.path} (from {self.source})"

    def describe(self) -> str:
        """Names the token in messages that blame it: where, issuer, subject, scopes and
        audience. XRootD refuses a token for another storage with a bare 403 (the reason only
        in its log), so a refusal must show the audience beside the scopes: the user can then
        see which of the two does not name the storage."""
        scopes = " ".join(self.scopes) or "none"
        audience = " ".join(self.audience[:_AUDIENCES_SHOWN]) or "none"
        if len(self.audience) > _AUDIENCES_SHOWN:
            audience += f" (+{len(self.audience) - _AUDIENCES_SHOWN} more)"
        return (f"{self.where}: issuer {self.issuer}, subject {self.subject}, scopes {scopes}, "
                f"audience {audience}")


def _b64json(part: str, what: str, label: str) -> dict[str, Any]:
    if not _B64URL.fullmatch(part):
        raise CredentialError(f"{label}: malformed token (its {what} is not base64url)")
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError) as e:
        raise CredentialError(f"{label}: malformed token (its {what} is not JSON)") from e
    if not isinstance(value, dict):
        raise CredentialError(f"{label}: malformed token (its {what} is not a JSON object)")
    return value


def _when(claims: Mapping[str, Any], name: str, label: str) -> Optional[datetime]:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CredentialError(f"{label}: malformed token (claim {name} is not a number)")
    try:
        return datetime.fromtimestamp(value, timezone.utc)
    except (OverflowError, OSError, ValueError) as e:
        raise CredentialError(f"{label}: malformed token (claim {name} is out of range)") from e


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(str(v) for v in value if isinstance(v, (str, int, float)))
    return ()


_SIGNATURE_BYTES = {"ES256": 64, "ES384": 96, "ES512": 132, "EdDSA": 64,
                    "HS256": 32, "HS384": 48, "HS512": 64}
"""The signature length of the algorithms that make one of a fixed size."""


def _signature_fits(alg: str, signature: str) -> bool:
    """Whether the base64url ``signature`` has a length ``alg`` can make: a file read while
    being rewritten in place holds a JWT cut short, and most of the time inside its signature.
    RSA signatures are as long as the key (a multiple of 16 bytes, from 1024 bits, in
    practice); an algorithm not known here is not checked."""
    length = len(signature.rstrip("="))
    if length % 4 == 1:  # no byte string encodes to this
        return False
    size = length * 3 // 4
    if alg in _SIGNATURE_BYTES:
        return size == _SIGNATURE_BYTES[alg] or (alg == "EdDSA" and size == 114)
    if alg[:2] in ("RS", "PS"):
        return size >= 128 and size % 16 == 0
    return True


def inspect_token(text: str, *, source: str, path: Optional[Path] = None) -> TokenInfo:
    """Decode the JWT ``text`` (no signature check) and describe it.

    Raises :class:`CredentialError` naming ``source``/``path`` (never any of the text) when it
    is not a signed JWT (three base64url parts, JSON header and payload) or has no ``exp``.
    Expiry is not checked here: see :func:`check_token`.
    """
    label = f"token {path} (from {source})" if path is not None else f"token from {source}"
    parts = text.split(".")
    if len(parts) != 3 or not all(parts):
        raise CredentialError(f"{label}: malformed token (not a JWT: expected three "
                              "base64url parts separated by dots)")
    header = _b64json(parts[0], "header", label)
    claims = _b64json(parts[1], "payload", label)
    if not _B64URL.fullmatch(parts[2]):
        raise CredentialError(f"{label}: malformed token (its signature is not base64url)")
    alg = header.get("alg")
    if not _signature_fits(str(alg), parts[2]):
        raise CredentialError(f"{label}: malformed token (its {alg} signature has the wrong "
                              "length: cut short?)")
    expires = _when(claims, "exp", label)
    if expires is None:
        raise CredentialError(f"{label}: malformed token (no exp claim)")
    scope = claims.get("scope", "")
    groups = claims.get("wlcg.groups", claims.get("groups"))
    return TokenInfo(
        source=source,
        path=path,
        issuer=str(claims.get("iss", "?")),
        subject=str(claims.get("sub", "?")),
        audience=_strings(claims.get("aud")),
        scopes=tuple(scope.split()) if isinstance(scope, str) else _strings(scope),
        groups=_strings(groups),
        expires=expires,
        not_before=_when(claims, "nbf", label),
        issued_at=_when(claims, "iat", label),
        wlcg_ver=str(claims["wlcg.ver"]) if "wlcg.ver" in claims else None,
    )


def check_token(info: TokenInfo, min_lifetime: float, now: Optional[datetime] = None) -> None:
    """Raise :class:`CredentialError` unless ``info`` is valid at ``now`` (default: the current
    UTC time) for ``min_lifetime`` more seconds (``credentials.token_min_lifetime``)."""
    now = now if now is not None else _utcnow()
    if now >= info.expires:
        raise CredentialError(f"{info.where}: expired at {_format_time(info.expires)}; "
                              f"{_RENEW_HINT}")
    if info.not_before is not None and now < info.not_before:
        raise CredentialError(f"{info.where}: not valid before {_format_time(info.not_before)}"
                              " (is the clock of this host right?)")
    left = info.time_left(now).total_seconds()
    if left < min_lifetime:
        raise CredentialError(f"{info.where}: {_span(left)} left, less than "
                              f"credentials.token_min_lifetime ({_span(min_lifetime)}); "
                              f"{_RENEW_HINT}")


def url_path(url: str) -> str:
    """The path of ``scheme://host/path?query`` (percent-encoded as given), cheaply."""
    start = url.find("/", url.find("://") + 3)
    if start < 0:
        return "/"
    end = len(url)
    for mark in ("?", "#"):
        at = url.find(mark, start)
        if 0 <= at < end:
            end = at
    return url[start:end]


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part]


def scope_covers(scopes: tuple[str, ...], verb: str, path: str) -> bool:
    """Whether some ``verb:/dir`` scope (``storage.read``...) can cover the URL path ``path``.

    A scope's path is relative to the issuer's base path at the storage (``/dune`` may mean
    ``/pnfs/fnal.gov/usr/dune``), which a client cannot know: a scope covers ``path`` when its
    components appear in ``path`` as a run starting at some component (``/`` and a scope
    without a path cover everything). A yes is "may be allowed"; a no is surely refused.
    """
    want = _components(path)
    for scope in scopes:
        name, _, spath = scope.partition(":")
        if name != verb:
            continue
        have = _components(spath)
        if not have:
            return True
        n = len(have)
        if any(want[i:i + n] == have for i in range(len(want) - n + 1)):
            return True
    return False


def scopes_refuse(info: TokenInfo, verb: str, path: str) -> bool:
    """Whether ``info``'s scopes surely do not allow ``verb`` on ``path``: it has
    ``storage.*`` scopes and none covers it (:func:`scope_covers`). A token whose rights come
    from its groups (``wlcg.groups``, no storage scope) is not judged: False."""
    if not any(scope.startswith("storage.") for scope in info.scopes):
        return False
    return not scope_covers(info.scopes, verb, path)


# --------------------------------------------------------------------------------------------
# Where tokens are
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FoundToken:
    """A token found by :func:`find_token`: its text (never shown), where it came from."""

    text: str = field(repr=False)
    source: str
    path: Optional[Path]

    def __post_init__(self) -> None:
        hide_secret(self.text)  # a server quoting it back is never shown

    def inspect(self) -> TokenInfo:
        """The token's claims (:func:`inspect_token`)."""
        return inspect_token(self.text, source=self.source, path=self.path)


def token_locations(cli: Optional[Path], configured: Optional[Path],
                    env: Optional[Mapping[str, str]] = None,
                    uid: Optional[int] = None) -> list[tuple[str, Optional[Path], bool]]:
    """Every place looked at, in order: ``(source, path, explicit)``; ``path`` is None for
    ``$BEARER_TOKEN`` (its value is the token); an ``explicit`` file must be readable."""
    environ = os.environ if env is None else env
    uid = os.getuid() if uid is None else uid
    places: list[tuple[str, Optional[Path], bool]] = []
    if cli is not None:
        places.append(("--token-file", cli, True))
    if configured is not None:
        places.append(("credentials.token_file", configured, True))
    places.append(("$BEARER_TOKEN", None, False))
    if environ.get("BEARER_TOKEN_FILE", "").strip():
        places.append(("$BEARER_TOKEN_FILE", Path(environ["BEARER_TOKEN_FILE"].strip()), True))
    runtime = environ.get("XDG_RUNTIME_DIR", "").strip()
    if runtime:
        places.append(("default $XDG_RUNTIME_DIR/bt_u<uid>", Path(runtime) / f"bt_u{uid}", False))
    places.append(("default /tmp/bt_u<uid>", Path(f"/tmp/bt_u{uid}"), False))
    return places


def describe_locations(places: list[tuple[str, Optional[Path], bool]]) -> str:
    """The places :func:`token_locations` gave, for a "no token" message."""
    return ", ".join("$BEARER_TOKEN" if path is None else
                     (str(path) if source.startswith("default") else f"{path} ({source})")
                     for source, path, _ in places)


def read_credential_file(path: Path, label: str, *, limit: int, kind: str) -> bytes:
    """The bytes of credential file ``path`` (a ``kind`` file: "token", "proxy"), at most
    ``limit`` of them; ``CredentialError`` naming ``label`` if it is missing, a directory,
    unreadable or larger."""
    try:
        data = read_small(path, limit)
    except FileNotFoundError as e:
        raise CredentialError(f"{label}: no such file") from e
    except IsADirectoryError as e:
        raise CredentialError(f"{label}: is a directory, not a {kind} file") from e
    except PermissionError as e:
        raise CredentialError(f"{label}: permission denied (cannot read the file)") from e
    except OSError as e:
        raise CredentialError(f"{label}: cannot read: {e.strerror or type(e).__name__}") from e
    if len(data) > limit:
        raise CredentialError(f"{label}: larger than {size_text(limit)}, not a {kind} file")
    return data


def warn_if_token_exposed(path: Path) -> bool:
    """Log a WARNING if group or others have any access to token file ``path`` (whoever reads
    a bearer token can use it until it expires); True if warned. Like the proxy's."""
    mode = exposed_mode(path)
    if mode is None:
        return False
    logger.warning("token %s is accessible to group/others (mode %04o); run: chmod 600 %s",
                   path, mode, path)
    return True


def read_token_file(path: Path, label: str) -> str:
    """The stripped text of token file ``path``; ``CredentialError`` naming ``label``."""
    data = read_credential_file(path, label, limit=_MAX_TOKEN_BYTES, kind="token")
    try:
        return data.decode("ascii").strip()
    except UnicodeDecodeError as e:
        raise CredentialError(f"{label}: malformed token (not ASCII text)") from e


def find_token(cli: Optional[Path], configured: Optional[Path],
               env: Optional[Mapping[str, str]] = None,
               uid: Optional[int] = None,
               empty: Optional[list[Path]] = None) -> Optional[FoundToken]:
    """The first token in :func:`token_locations` order, or None when there is none.

    An explicitly named file that is missing or unreadable raises :class:`CredentialError`,
    and so does an empty ``--token-file`` or ``credentials.token_file``; other empty values
    (and a missing default file) are skipped, as the discovery spec says. An empty file
    skipped is appended to ``empty`` (when given), and is a WARNING when another token is
    used instead (a renewal caught between truncate and write, or a tool that failed after
    truncating: the token the user meant is not the one sent).
    """
    environ = os.environ if env is None else env
    skipped: list[str] = []
    for source, path, explicit in token_locations(cli, configured, environ, uid):
        if path is None:
            value = environ.get("BEARER_TOKEN", "").strip()
            if value:
                return _found(FoundToken(value, source, None), skipped)
            continue
        label = f"token {path} (from {source})"
        if not explicit and not path.exists():
            continue
        text = read_token_file(path, label)
        if text:
            return _found(FoundToken(text, source, path), skipped)
        if source in _NAMED:
            # The discovery spec skips empty values; a file named to prestaged itself is the
            # token the user chose, and another one found further on was sent instead.
            raise CredentialError(f"{label} holds no token (it is empty)")
        skipped.append(label)
        if empty is not None:
            empty.append(path)
    return None


def _found(found: FoundToken, skipped: list[str]) -> FoundToken:
    if skipped:
        where = (f"token {found.path} (from {found.source})" if found.path is not None
                 else f"token from {found.source}")
        logger.warning("%s is empty: skipped; using %s instead", " and ".join(skipped), where)
    return found


_NAMED = ("--token-file", "credentials.token_file")
"""Token places named to prestaged itself (not discovered): an empty one is an error."""


# --------------------------------------------------------------------------------------------
# The live token
# --------------------------------------------------------------------------------------------


class TokenSource:
    """The token requests carry, re-read from its file when the file changes.

    ``found`` is the token at start (checked by the caller). The file (if any) is looked at
    again at most every ``recheck`` seconds (default 1), so requests that start a little after
    a rewrite carry the new token. A change is taken once the file has stopped changing (the
    same size, mtime and inode at two looks ``settle`` seconds or more apart; default 0.5, 0:
    at once): until then a writer may be half-way through it. A rewritten file that cannot be
    read or decoded, or whose token cannot be sent now (expired, not valid yet) while the
    previous one can, keeps the previous token (a WARNING once per change). ``clock`` is
    ``time.monotonic`` by default. Thread-safe: the catalog may read it from a worker thread.
    """

    def __init__(self, found: FoundToken, *, recheck: float = 1.0, settle: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._text = found.text
        self._info = found.inspect()
        self._path = found.path
        self._recheck = recheck
        self._clock = clock
        self._stamp = file_stamp(found.path) if found.path is not None else None
        self._next = clock() + recheck
        self._settle = settle
        self._pending: Optional[tuple[tuple[int, int, int], float]] = None
        """A change seen but not yet taken: the file's stamp then and when (``clock``)."""
        self._early: Optional[tuple[str, TokenInfo]] = None
        """A renewal read while not valid yet (``nbf`` ahead), kept for when it is."""
        self._lock = threading.Lock()
        self.version = 0
        """Counts renewals seen (0: the token found at start)."""

    def __repr__(self) -> str:
        return f"TokenSource({self._info.where})"

    @property
    def info(self) -> TokenInfo:
        """The current token's claims (after any renewal seen so far)."""
        return self._info

    def refresh(self) -> bool:
        """Re-read the file now if it changed; True if a new token was taken.

        A renewal that cannot be sent now (expired, or ``nbf`` still ahead: the issuer's clock
        runs ahead of ours) does not replace a token that can (a WARNING); one not valid yet is
        taken once it is, or once the token in use expires."""
        path = self._path
        if path is None:
            return False
        with self._lock:
            self._next = self._clock() + self._recheck
            stamp = file_stamp(path)
            if stamp is None or stamp == self._stamp:
                self._pending = None
                taken = self._take_early()
            elif not self._settled(stamp):
                taken = False
            else:
                self._stamp, self._pending, self._early = stamp, None, None
                taken = self._reread(path)
            info = self._info
        if taken:
            logger.info("token %s re-read: subject %s, %s left", path, info.subject,
                        _span(info.time_left().total_seconds()))
            warn_if_token_exposed(path)
        return taken

    def _settled(self, stamp: tuple[int, int, int]) -> bool:
        """Whether the changed file has stopped changing: its stamp is the one a look at least
        ``settle`` seconds ago saw. A file rewritten in place (truncated, then written) is
        otherwise read half-written, and a JWT cut inside its signature still decodes."""
        if self._settle <= 0:
            return True
        now = self._clock()
        if self._pending is None or self._pending[0] != stamp:
            self._pending = (stamp, now)
            self._next = min(self._next, now + self._settle)  # look again soon
            return False
        return now - self._pending[1] >= self._settle

    def _reread(self, path: Path) -> bool:
        """Read the changed file; take its token unless it is unusable (see ``refresh``)."""
        try:
            text = read_token_file(path, f"token {path}")
            hide_secret(text)  # as the first one: a server quoting it back is never shown
            info = inspect_token(text, source=self._info.source, path=path)
        except CredentialError as e:
            logger.warning("token file changed but cannot be used: %s; keeping the "
                           "previous token", e)
            return False
        if text == self._text:
            return False
        now = _utcnow()
        if info.valid_at(now) or not self._info.valid_at(now):
            self._take(text, info)
            return True
        try:
            check_token(info, 0.0, now)
        except CredentialError as e:
            logger.warning("token file changed but cannot be used now: %s; keeping the "
                           "previous token (%s left)", e,
                           _span(self._info.time_left(now).total_seconds()))
        if now < info.expires:
            self._early = (text, info)  # not valid yet: taken when it is
        return False

    def _take_early(self) -> bool:
        """Take the renewal put aside as not valid yet, once it is valid or the token in use
        is not."""
        early = self._early
        if early is None:
            return False
        now = _utcnow()
        if early[1].valid_at(now) or not self._info.valid_at(now):
            self._early = None
            self._take(*early)
            return True
        return False

    def _take(self, text: str, info: TokenInfo) -> None:
        self._text, self._info = text, info
        self.version += 1

    def _current(self) -> str:
        if self._path is not None and self._clock() >= self._next:
            self.refresh()
        return self._text

    def expired(self, now: Optional[datetime] = None) -> bool:
        """Whether the current token (after looking for a renewal) has expired at ``now``."""
        self._current()
        return self._info.time_left(now).total_seconds() <= 0

    def usable(self, now: Optional[datetime] = None) -> bool:
        """Whether the current token (after looking for a renewal) can be sent at ``now``:
        not expired and past its ``nbf``."""
        self._current()
        return self._info.valid_at(now)

    def authorization(self) -> str:
        """The ``Authorization`` header value for a request starting now.

        Raises :class:`CredentialError` when the current token (after looking for a renewal)
        has expired or is not yet valid: nothing must be sent with it.
        """
        text = self._current()
        now = _utcnow()
        info = self._info
        if not info.valid_at(now):
            check_token(info, 0.0, now)
        return "Bearer " + text


class ScopeWarner:
    """Warns once per endpoint (``scheme://host:port``) and token when no scope of the token
    can cover the path of a URL about to be read (``storage.read``) or staged
    (``storage.stage``): the storage will refuse it. A warning, not a refusal: the scope's base
    path at the storage is unknown here (see :func:`scope_covers`)."""

    def __init__(self, token: TokenSource, verb: str) -> None:
        self._token = token
        self._verb = verb
        self._warned: set[tuple[str, int]] = set()
        self._checked: set[tuple[str, str, int]] = set()  # (endpoint, directory, version)

    def see(self, endpoint: str, path: str) -> None:
        """Look at one ``path`` on ``endpoint``; log a WARNING the first time one is not
        covered for this endpoint and token. Each directory is looked at once."""
        version = self._token.version
        folder = (endpoint, path.rpartition("/")[0], version)
        if folder in self._checked or (endpoint, version) in self._warned:
            return
        if len(self._checked) >= 10_000:
            self._checked.clear()
        self._checked.add(folder)
        info = self._token.info
        if scope_covers(info.scopes, self._verb, path):
            return
        self._warned.add((endpoint, version))
        logger.warning("%s: no %s scope covers %s on %s; the storage will refuse it (ask for "
                       "a token with %s for that path)", info.describe(), self._verb, path,
                       endpoint, self._verb)
