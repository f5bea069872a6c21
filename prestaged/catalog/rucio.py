"""Rucio, the replica catalog: file DIDs (``scope:name``) -> one https URL per file.

Speaks Rucio's REST API as the real client (``rucio.client.replicaclient``) does:

- **Login**, once, and again only when the token expires or the server refuses it:
  ``GET {auth_url}/auth/x509`` presenting the proxy, or ``GET {auth_url}/auth/userpass`` with
  ``X-Rucio-Username``/``X-Rucio-Password``; both with ``X-Rucio-Account`` when an account is
  configured (``[catalog.rucio] account``, else ``$RUCIO_ACCOUNT``). The token comes back in
  ``X-Rucio-Auth-Token`` and is kept until 5 minutes before ``X-Rucio-Auth-Token-Expires``.
  With ``auth = "token"`` the WLCG bearer token itself goes in ``X-Rucio-Auth-Token`` (Rucio
  validates JWTs against its identity providers), asked for before every request so that a
  renewed token file is used.
- **Replicas**: ``POST {url}/replicas/list`` with ``{"dids": [{"scope", "name"}, ...],
  "schemes": ["davs", "https"], "domain": "wan", "all_states": false}`` (plus
  ``rse_expression``), at most ``chunk`` DIDs per request. The answer is
  ``application/x-json-stream``: one JSON object per line, ``pfns`` keyed by URL with ``rse``,
  ``type`` (DISK or TAPE) and ``priority``. An answer (at most ``chunk`` lines of about 1 KiB)
  is read whole (at most ``catalog.http.ANSWER_PER_FILE`` a DID) and decoded by ``msgspec``
  into ``Answer``s, only the fields used. An unknown DID is silently left out of the answer:
  answers are matched to requests by ``scope:name``.

``pick`` chooses one PFN per file: DISK before TAPE, then ``rse_preference`` order (unlisted
RSEs after the listed ones), then Rucio's priority; ``davs://`` becomes ``https://`` (WebDAV
over TLS is https to the touch and the Tape REST paths).

Over https only: every request carries a token (the WLCG one, or the login token) and a login
the password or the proxy, so ``RucioConfig`` refuses an ``http://`` url (and auth_url, but
with ``auth = "token"``), and ``HttpApi`` sends none of them to an http:// URL whatever the
config.

Errors: 401/403 -> ``CredentialError`` (exit 3) quoting Rucio's ``ExceptionClass`` and
``ExceptionMessage``; another 4xx -> ``CatalogError`` (exit 4); 5xx, 408, 429, timeouts and
dropped connections are retried for ``retry_for`` (``catalog.http``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Optional

import msgspec

from prestaged.catalog.http import (
    Call,
    HttpApi,
    Transient,
    capped_body,
    one_line,
    retry_settings,
)
from prestaged.config import RucioConfig
from prestaged.errors import CatalogError, ConfigError, CredentialError
from prestaged.model import hide_secret

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from prestaged.tokens import TokenSource

__all__ = ["SCHEMES", "Answer", "Pfn", "Replica", "RucioApi", "pick", "rucio_login_mode"]

log = logging.getLogger(__name__)

SCHEMES = ("davs", "https")
"""URL schemes asked of Rucio: both reach a WebDAV door over TLS."""
_DATE_FORMAT = "%a, %d %b %Y %H:%M:%S UTC"  # rucio.common.utils.DATE_FORMAT
_RENEW_BEFORE = 300.0  # seconds before a login token's expiry when it is renewed
_UNKNOWN_LIFETIME = 1800.0  # a login token whose expiry cannot be read is renewed this soon
_TYPE_ORDER = {"DISK": 0, "TAPE": 1}


class Pfn(msgspec.Struct):
    """What Rucio says of one PFN (``pfns[url]``); other fields are not decoded."""

    rse: str = "?"
    type: str = "DISK"
    priority: int = 1 << 30


class Answer(msgspec.Struct):
    """One line of a ``/replicas/list`` answer: a file, its PFNs, and (``states``) every RSE
    holding it, even those the schemes filter left without a PFN (seen on Rucio 41.5.1). The
    other fields (``rses``: the URLs again, per RSE; checksums) are skipped, not decoded: this
    runs for every file of a dataset."""

    scope: str
    name: str
    pfns: dict[str, Pfn] = {}
    states: dict[str, msgspec.Raw] = {}


_ANSWERS: msgspec.json.Decoder[Answer] = msgspec.json.Decoder(Answer)


@dataclass(frozen=True)
class Replica:
    """The PFN chosen for a file, as https."""

    url: str
    rse: str
    type: str
    priority: int


def rucio_login_mode(cfg: RucioConfig, *, have_token: bool) -> str:
    """``x509``, ``userpass`` or ``token``: ``cfg.auth``, with ``auto`` made the token when
    one was found, else the proxy. ``ConfigError`` when userpass lacks its keys. (Whatever the
    mode, a token would go to an ``http://`` Rucio: ``RucioConfig`` refuses one.)"""
    mode = cfg.auth
    if mode == "auto":
        mode = "token" if have_token else "x509"
    if mode == "userpass" and (cfg.username is None or cfg.password_file is None):
        missing = "username" if cfg.username is None else "password_file"
        raise ConfigError(f'catalog.rucio.{missing}: required with catalog.rucio.auth = '
                          '"userpass"')
    return mode


def pick(pfns: Mapping[str, Pfn], preference: Sequence[str]) -> Optional[Replica]:
    """The replica to touch among ``pfns`` (Rucio's ``{url: {rse, type, priority}}``), as
    https; None when none has an https/davs URL. See the module docstring for the order.
    One pass, no object but the winner's (it runs for every file of a dataset)."""
    best: Optional[tuple[tuple[int, int, int, str], str, Pfn]] = None
    unlisted = len(preference)
    for url, about in pfns.items():
        scheme, sep, rest = url.partition("://")
        if not sep or scheme.lower() not in SCHEMES:
            continue
        kind = about.type.upper()
        rank = preference.index(about.rse) if about.rse in preference else unlisted
        key = (_TYPE_ORDER.get(kind, 2), rank, about.priority, url)
        if best is None or key < best[0]:
            best = (key, rest, about)
    if best is None:
        return None
    _, rest, about = best
    return Replica("https://" + rest, about.rse, about.type.upper(), about.priority)


@dataclass(frozen=True)
class _Login(Call):
    """A login request: sent without the Rucio token."""


@dataclass(frozen=True)
class _Listing(Call):
    """A replica listing: a 401 with a login token renews it once and asks again."""


class RucioApi(HttpApi):
    """One session to Rucio (and its auth server) for one catalog pass; see the module doc.

    ``mode`` is ``rucio_login_mode``'s; ``identity`` the proxy's DN (x509); ``token`` the WLCG
    token (mode ``token``); ``password`` the userpass password (never logged or shown).
    """

    service = "Rucio"

    def __init__(self, cfg: RucioConfig, mode: str, ssl_context: Optional[ssl.SSLContext], *,
                 identity: Optional[str] = None, token: Optional[TokenSource] = None,
                 password: Optional[str] = None, account: Optional[str] = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 clock: Callable[[], float] = time.time) -> None:
        if cfg.url is None:
            raise ConfigError("catalog.rucio.url: not set; the MetaCat catalog resolves its "
                              "files' replicas through Rucio (e.g. https://dune-rucio.fnal.gov)")
        if mode == "token" and token is None:
            raise CredentialError("catalog.rucio.auth is token but no bearer token was found "
                                  "(see `prestaged credentials`)")
        super().__init__(cfg.url, retry_settings(cfg, "catalog.rucio"), ssl_context,
                         limit=cfg.parallel + 1, sleep=sleep, identity=identity)
        self.cfg = cfg
        self.mode = mode
        self.account = account or cfg.account
        """``X-Rucio-Account``: ``account`` (the caller's ``$RUCIO_ACCOUNT``), else the
        config's; None: the identity's default account."""
        self.auth_url = (cfg.auth_url or cfg.url).rstrip("/")
        self._wlcg = token
        self._password = password
        if password:
            hide_secret(password)
        self._clock = clock
        self._login_token: Optional[str] = None
        self._login_until = 0.0
        self._login_lock = asyncio.Lock()
        self.logins = 0
        """Logins made (each a request to the auth server)."""

    # --- authentication -----------------------------------------------------------------

    def _account(self) -> dict[str, str]:
        return {"X-Rucio-Account": self.account} if self.account else {}

    async def headers_for(self, call: Call) -> Optional[Mapping[str, str]]:
        if isinstance(call, _Login):
            if self.mode == "userpass":
                assert self.cfg.username is not None and self._password is not None
                return {**self._account(), "X-Rucio-Username": self.cfg.username,
                        "X-Rucio-Password": self._password}
            return self._account()
        # As the client: the stream type asked for on listings only (Rucio answers 406 to a
        # login that asks for it).
        accept = ({"Accept": "application/x-json-stream", "Content-Type": "application/json"}
                  if isinstance(call, _Listing) else {})
        if self.mode == "token":
            assert self._wlcg is not None
            # The JWT itself; CredentialError (nothing sent) when it has expired.
            return {**self._account(), **accept,
                    "X-Rucio-Auth-Token": self._wlcg.authorization()[len("Bearer "):]}
        return {**self._account(), **accept, "X-Rucio-Auth-Token": await self._logged_in()}

    async def _logged_in(self) -> str:
        """The login token, logging in when there is none or it is about to expire."""
        async with self._login_lock:
            if self._login_token is None or self._clock() >= self._login_until:
                await self._login()
            assert self._login_token is not None
            return self._login_token

    async def _login(self) -> None:
        kind = "x509" if self.mode == "x509" else "userpass"
        call = _Login(f"logging in ({kind}" + (f", account {self.account})"
                                                 if self.account else ")"))
        url = self.url("auth", kind, base=self.auth_url)
        backoff = self.backoff(call)
        while True:
            try:
                async with self.exchange(call, url, whole=True) as resp:
                    token = resp.headers.get("X-Rucio-Auth-Token")
                    expires = resp.headers.get("X-Rucio-Auth-Token-Expires")
                break
            except Transient as e:
                await backoff.wait(e)
        if not token:
            raise CatalogError(f"Rucio {self.auth_url} answered {call.what} without an "
                               "X-Rucio-Auth-Token")
        hide_secret(token)
        self.logins += 1
        self._login_token = token
        self._login_until = self._expiry(expires) - _RENEW_BEFORE
        log.info("Rucio: logged in to %s (%s)%s", self.auth_url, kind,
                 f" as {self.identity}" if kind == "x509" and self.identity else "")

    def _expiry(self, header: Optional[str]) -> float:
        """The login token's expiry (``clock`` seconds) from Rucio's header, or a guess."""
        try:
            when = datetime.strptime(header or "", _DATE_FORMAT).replace(tzinfo=timezone.utc)
            return when.timestamp() - time.time() + self._clock()
        except ValueError:
            return self._clock() + _UNKNOWN_LIFETIME + _RENEW_BEFORE

    # --- errors ---------------------------------------------------------------------------

    def detail(self, status: int, reason: str, body: str) -> str:
        cls, message = _rucio_error(body)
        if not cls and not message:
            return super().detail(status, reason, body)
        return f"HTTP {status} {cls}" + (f": {message}" if message else "")

    def tls_hint(self) -> str:
        return "check the CA directory and catalog.rucio.url/auth_url"

    def status_error(self, call: Call, status: int, reason: str, body: str,
                     headers: Mapping[str, str]) -> Exception:
        detail = self.detail(status, reason, body)
        if status in (401, 403):
            if isinstance(call, _Listing) and self.mode != "token":
                return _Refused(detail)
            return CredentialError(f"Rucio {self._where(call)} refused {call.what} "
                                   f"{self._who()} ({detail}); {self._fix()}")
        return CatalogError(f"Rucio {self._where(call)} failed {call.what}: {detail}")

    def _where(self, call: Call) -> str:
        return self.auth_url if isinstance(call, _Login) else self.base_url

    def _who(self) -> str:
        account = f"account {self.account}" if self.account else "its default account"
        if self.mode == "token":
            assert self._wlcg is not None
            return f"for {account} with {self._wlcg.info.describe()}"
        if self.mode == "userpass":
            return f"for {account} as user {self.cfg.username}"
        who = self.identity or "no certificate"
        return f"for {account} as {who}"

    def _fix(self) -> str:
        if self.mode == "token":
            return "check the token's audience and issuer for Rucio, or set catalog.rucio.auth"
        if self.mode == "userpass":
            return "check catalog.rucio.username, password_file and account"
        return "check the proxy, catalog.rucio.account and that the DN is a Rucio identity"

    # --- replicas -------------------------------------------------------------------------

    async def list_replicas(self, dids: Sequence[tuple[str, str]]) -> dict[str, Answer]:
        """Rucio's answer for ``dids`` (``(scope, name)``), ``{"scope:name": answer}``; DIDs
        Rucio does not know are absent. Retried as the module docstring says; a refused login
        token is renewed once."""
        body: dict[str, Any] = {
            "dids": [{"scope": scope, "name": name} for scope, name in dids],
            "schemes": list(SCHEMES), "domain": "wan", "all_states": False,
        }
        if self.cfg.rse_expression:
            body["rse_expression"] = self.cfg.rse_expression
        payload = msgspec.json.encode(body)  # several times faster than aiohttp's json.dumps
        call = _Listing(f"listing the replicas of {len(dids)} files", asked=len(dids))
        url = self.url("replicas", "list")
        backoff = self.backoff(call)
        renewed = False
        while True:
            logins = self.logins
            try:
                # At most ``chunk`` (<= 1,000) lines of about 1 KiB: read whole, decoded at once.
                async with self.exchange(call, url, method="POST", data=payload,
                                         whole=True) as resp:
                    text = await capped_body(self, call, resp)
                return _answers(text)
            except Transient as e:
                await backoff.wait(e)
            except _Refused as e:
                if renewed:
                    raise CredentialError(f"Rucio {self.base_url} refused {call.what} "
                                          f"{self._who()} ({e}); {self._fix()}") from None
                log.info("Rucio refused the login token (%s); logging in again", e)
                if self.logins == logins:  # nobody else has renewed it meanwhile
                    self._login_token = None
                renewed = True


class _Refused(Exception):
    """A listing refused with a login token (expired early, revoked): log in again once."""


def _answers(text: bytes) -> dict[str, Answer]:
    """``{"scope:name": answer}`` of a ``/replicas/list`` body (x-json-stream)."""
    try:
        answers = _ANSWERS.decode_lines(text)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise CatalogError(f"Rucio answered a replica listing with a line that is not a "
                           f"replica record ({one_line(str(e), 120)})") from None
    return {f"{a.scope}:{a.name}": a for a in answers}


def _rucio_error(body: str) -> tuple[str, str]:
    """``(ExceptionClass, ExceptionMessage)`` of a Rucio error body (JSON), else empty."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return "", ""
    if not isinstance(doc, dict):
        return "", ""
    return (one_line(str(doc.get("ExceptionClass") or "")),
            one_line(str(doc.get("ExceptionMessage") or "")))
