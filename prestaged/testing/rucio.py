"""A Rucio server emulator for tests, benchmarks and demos, held to the real Rucio 41.5.1 client.

``RucioEmulator`` serves, on 127.0.0.1 (HTTPS with ``ssl_context``, else HTTP), the part of the
Rucio REST API that ``rucio.client.replicaclient.ReplicaClient`` needs to list replicas, with
the real server's paths, headers, status codes and error format
(``rucio/web/rest/flaskapi/v1/{auth,replicas,common}.py``):

=======================================  ===================================================
``GET /auth/userpass``                   ``X-Rucio-Account`` (optional), ``X-Rucio-Username``,
                                         ``X-Rucio-Password`` -> 200, the token in
                                         ``X-Rucio-Auth-Token``, its end in
                                         ``X-Rucio-Auth-Token-Expires``
``GET /auth/x509``, ``/auth/x509_proxy``  the DN of the TLS client certificate (a proxy's CNs
                                         stripped), ``X-Rucio-Account`` optional -> the same
``GET /auth/validate``                   the token's account, identity and lifetime (a
                                         Python dict's text, as the real server writes it)
``POST /replicas/list``                  JSON body -> ``application/x-json-stream``: one
                                         JSON object per line (see ``rucio_catalog``)
=======================================  ===================================================

Tokens last ``token_lifetime`` seconds (default 3600, as the real ``Token.expired_at``) on
``clock`` (default ``time.time``); a request with an unknown or expired token gets the real
401 ``CannotAuthenticate`` ("Cannot authenticate with given credentials"), and one without a
token the real 400 (``ValueError``, "Token must be set."). Errors carry the real
``ExceptionClass``/``ExceptionMessage`` headers (the message on one line, cut at 125
characters) and the JSON body ``{"ExceptionClass": ..., "ExceptionMessage": ...}``
(``application/octet-stream``). The real client re-authenticates on a 401 and retries.

With ``bearer`` (a ``BearerCheck``), a WLCG JWT sent as ``X-Rucio-Auth-Token`` is accepted,
as the real server's ``validate_jwt`` does, when its signature and lifetime are good, its
``aud`` holds every word of ``bearer_audience`` and its ``scope`` every word of
``bearer_scope`` (Rucio's ``[oidc] expected_audience``/``expected_scope`` defaults ``rucio``
and ``openid profile``), and its subject is in ``bearer_accounts`` (subject -> account). The
real server's issuer secrets and token caching are not emulated.

Request size: the real Flask app sets no ``MAX_CONTENT_LENGTH``; its limit is the ``r_dids``
schema's 1,000 DIDs per request (400 ``InvalidObject``). The emulator takes bodies up to
``client_max_size`` (default 1 GiB, Apache httpd's ``LimitRequestBody`` default since 2.4.54,
where aiohttp's own default would cap at 1 MiB).

Every request is counted per endpoint, with the DIDs each replica listing asked for, the files
it answered and the tokens issued per method (``stats``); no password or token is ever kept
in the stats or logged. ``ThreadedRucioEmulator`` runs it in a thread for synchronous clients;
``python -m prestaged.testing.rucio --spec FILE | --synthetic N`` runs it as a process. Not
emulated: metalink answers (406), other endpoints, VOs other than the default, OIDC flows.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import json
import logging
import re
import secrets
import ssl
import sys
import time
import uuid
from collections import Counter
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from aiohttp import web
from cryptography import x509

from prestaged.testing.appserver import AppServer, ThreadedAppServer
from prestaged.testing.pki import load_or_create_pki
from prestaged.testing.rucio_catalog import (
    ListRequest,
    RucioCatalog,
    RucioError,
    SyntheticFiles,
)
from prestaged.testing.rucio_spec import ProtocolSpec, RseSpec, RucioSpec, SpecError, load_spec
from prestaged.testing.tokens import BearerCheck

__all__ = [
    "AUTH_USERPASS",
    "AUTH_VALIDATE",
    "AUTH_X509",
    "ENDPOINTS",
    "LIST_REPLICAS",
    "RucioEmulator",
    "RucioStats",
    "SpecSource",
    "ThreadedRucioEmulator",
    "default_spec",
    "main",
]

log = logging.getLogger(__name__)

AUTH_USERPASS = "auth/userpass"
AUTH_X509 = "auth/x509"
AUTH_VALIDATE = "auth/validate"
LIST_REPLICAS = "replicas/list"
ENDPOINTS = (AUTH_USERPASS, AUTH_X509, AUTH_VALIDATE, LIST_REPLICAS)
"""Endpoint names of ``stats.requests``."""

JSON_STREAM = "application/x-json-stream"
METALINK = "application/metalink4+xml"
OCTET_STREAM = "application/octet-stream"
DATE_FORMAT = "%a, %d %b %Y %H:%M:%S UTC"
"""rucio.common.utils.DATE_FORMAT, of ``X-Rucio-Auth-Token-Expires``."""
_RECORDS_PER_WRITE = 500
_MAX_BODY = 1 << 30
_EXPOSE = ("X-Rucio-Auth-Token, X-Rucio-Auth-Token-Expires, X-Rucio-Auth-Account, "
           "X-Rucio-Auth-Accounts")
# rucio.core.authentication.strip_x509_proxy_attributes (RFC 2253 order: proxy CNs lead).
_PROXY_CNS = re.compile(r"^(CN=(limited proxy|proxy|[0-9]+),)+")

_Handler = Callable[[web.Request], Coroutine[Any, Any, web.StreamResponse]]
SpecSource = Union[RucioSpec, Path, str, Mapping[str, Any]]
"""What ``load_spec`` takes: a spec, a JSON file's path or a parsed document."""


@dataclass
class RucioStats:
    """Requests per endpoint (``ENDPOINTS``), the DIDs asked for per replica listing (in
    order), the files answered in all, tokens issued per method (``userpass``, ``x509``) and
    the 401s. Never a secret."""

    requests: Counter[str] = field(default_factory=Counter)
    dids_per_request: list[int] = field(default_factory=list)
    files_listed: int = 0
    tokens_issued: Counter[str] = field(default_factory=Counter)
    auth_refusals: int = 0

    @property
    def total(self) -> int:
        """Requests of every endpoint."""
        return sum(self.requests.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready snapshot."""
        return {"requests": dict(self.requests), "total": self.total,
                "dids_per_request": self.dids_per_request, "files_listed": self.files_listed,
                "tokens_issued": dict(self.tokens_issued),
                "auth_refusals": self.auth_refusals}


@dataclass(frozen=True)
class _Token:
    account: str
    identity: str
    expires: float
    """On the server's clock (seconds since the epoch)."""


def _salted(salt: bytes, password: str) -> str:
    """How Rucio stores a password: SHA-256 of salt + password (hex)."""
    return hashlib.sha256(salt + password.encode()).hexdigest()


def _utc(epoch: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).replace(tzinfo=None)


def _error(status: int, exception_class: str, message: str,
           headers: Optional[Mapping[str, str]] = None) -> web.Response:
    """generate_http_error_flask: JSON body, ExceptionClass/ExceptionMessage headers."""
    one_line = message.replace("\n", " ").replace("\r", " ")
    if len(one_line) > 125:
        one_line = one_line[:125] + "..."
    out = dict(headers or {})
    out.update({"ExceptionClass": exception_class.replace("\n", " ").replace("\r", " "),
                "ExceptionMessage": one_line})
    body = json.dumps({"ExceptionClass": exception_class, "ExceptionMessage": message})
    return web.Response(status=status, body=body.encode(), headers=out,
                        content_type=OCTET_STREAM)


def _from_rucio_error(e: RucioError, headers: Optional[Mapping[str, str]] = None
                      ) -> web.Response:
    if e.text is not None:  # a non-Rucio exception: Flask answers its text
        return web.Response(status=e.status, text=e.text, content_type="text/html",
                            headers=dict(headers or {}))
    return _error(e.status, e.exception_class, e.message, headers)


def _accepts(request: web.Request, types: Sequence[str]) -> Optional[str]:
    """The first of ``types`` the Accept header allows (werkzeug's ``best_match`` at equal
    quality); ``types[0]`` without an Accept header; None when none is acceptable."""
    header = request.headers.get("Accept")
    if not header:
        return types[0]
    best: Optional[tuple[float, int, str]] = None
    for item in header.split(","):
        mime, *params = (p.strip() for p in item.split(";"))
        quality = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    quality = float(p[2:])
                except ValueError:
                    quality = 0.0
        for rank, t in enumerate(types):
            if quality > 0 and (mime in ("*/*", "*", t) or mime == t.split("/")[0] + "/*"):
                key = (quality, -rank, t)
                best = key if best is None or key > best else best
    return best[2] if best else None


def _has_words(claim: Any, required: str) -> bool:
    """rucio.common.utils.all_oidc_req_claims_present for one claim: every space-separated
    word of ``required`` is in ``claim`` (a space-separated string or a list)."""
    have = claim.split(" ") if isinstance(claim, str) else claim if isinstance(claim, list) \
        else []
    return all(word in have for word in required.split(" ") if word)


def _peer_dn(request: web.BaseRequest) -> Optional[str]:
    """The client certificate's subject in RFC 2253 order, as Apache's ``SSL_CLIENT_S_DN``
    (the leaf: a proxy's own DN)."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        return None
    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


class RucioEmulator(AppServer):
    """The emulator (see the module docstring). Use ``async with`` or ``start()``/``stop()``.

    ``spec``: the world (a ``RucioSpec``, a path or a parsed document; default
    ``default_spec()``); ``synthetic``: generated files on top of it. ``token_lifetime`` in
    seconds; ``clock`` gives the time in seconds since the epoch. ``bearer``,
    ``bearer_accounts``, ``bearer_audience`` and ``bearer_scope`` accept WLCG JWTs (module
    docstring). ``client_max_size``: the largest
    request body in bytes."""

    def __init__(
        self,
        spec: Optional[SpecSource] = None,
        *,
        synthetic: Optional[SyntheticFiles] = None,
        ssl_context: Optional[ssl.SSLContext] = None,
        host: str = "127.0.0.1",
        port: int = 0,
        token_lifetime: float = 3600.0,
        clock: Callable[[], float] = time.time,
        bearer: Optional[BearerCheck] = None,
        bearer_accounts: Optional[Mapping[str, str]] = None,
        bearer_audience: str = "rucio",
        bearer_scope: str = "openid profile",
        client_max_size: int = _MAX_BODY,
    ) -> None:
        if token_lifetime <= 0:
            raise ValueError(f"token_lifetime {token_lifetime} s: must be positive")
        super().__init__(ssl_context, host, port)
        self.spec = default_spec() if spec is None else load_spec(spec)
        self.catalog = RucioCatalog(self.spec, synthetic)
        self.token_lifetime = token_lifetime
        self.clock = clock
        self.bearer = bearer
        self.bearer_accounts = dict(bearer_accounts or {})
        self.bearer_audience = bearer_audience
        self.bearer_scope = bearer_scope
        self.client_max_size = client_max_size
        self.stats = RucioStats()
        self._tokens: dict[str, _Token] = {}
        self._salt = secrets.token_bytes(16)
        # username -> (salted password, accounts); DN -> accounts. Passwords are not kept.
        self._userpass: dict[str, tuple[str, list[str]]] = {}
        for u in self.spec.users:
            entry = self._userpass.setdefault(u.username, (_salted(self._salt, u.password), []))
            entry[1].append(u.account)
        self._x509: dict[str, list[str]] = {}
        for x in self.spec.x509:
            self._x509.setdefault(x.dn, []).append(x.account)

    def reset_stats(self) -> None:
        """Forget every request seen so far."""
        self.stats = RucioStats()

    # --- lifecycle

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=self.client_max_size)
        app.add_routes([
            web.get("/auth/userpass", self._wrap(AUTH_USERPASS, self._userpass_token)),
            web.get("/auth/x509", self._wrap(AUTH_X509, self._x509_token)),
            web.get("/auth/x509_proxy", self._wrap(AUTH_X509, self._x509_token)),
            web.get("/auth/validate", self._wrap(AUTH_VALIDATE, self._validate)),
            web.post("/replicas/list", self._wrap(LIST_REPLICAS, self._list_replicas)),
            web.post("/replicas/list/", self._wrap(LIST_REPLICAS, self._list_replicas)),
        ])
        return app

    @property
    def base_url(self) -> str:
        """The client's ``rucio_host`` and ``auth_host``: ``http(s)://127.0.0.1:<port>``."""
        scheme = "https" if self._ssl is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def _wrap(self, endpoint: str, handler: _Handler) -> _Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.stats.requests[endpoint] += 1
            resp = await handler(request)
            self.stats.auth_refusals += int(resp.status == 401)
            return resp

        return handle

    # --- authentication

    def _auth_headers(self, request: web.Request) -> dict[str, str]:
        """The auth views' ``get_headers()`` plus the content and caching headers."""
        return {
            "Access-Control-Allow-Origin": request.headers.get("Origin", "None"),
            "Access-Control-Allow-Headers": request.headers.get(
                "Access-Control-Request-Headers", "None"),
            "Access-Control-Allow-Methods": "*", "Access-Control-Allow-Credentials": "true",
            "Access-Control-Expose-Headers": _EXPOSE,
            "Cache-Control": "no-cache, no-store, max-age=0, must-revalidate",
            "Pragma": "no-cache",
        }

    def _issue(self, method: str, account: str, identity: str, request: web.Request,
               headers: dict[str, str]) -> web.Response:
        """A new token for ``account``: ``<account>-<identity>-<appid>-<uuid hex>`` as
        rucio.core.authentication makes them."""
        appid = request.headers.get("X-Rucio-AppID", "unknown")
        token = f"{account}-{identity}-{appid}-{uuid.uuid4().hex}"
        expires = self.clock() + self.token_lifetime
        self._tokens[token] = _Token(account, identity, expires)
        self.stats.tokens_issued[method] += 1
        log.info("Rucio emulator: %s token for account %s", method, account)
        headers.update({"X-Rucio-Auth-Account": account, "X-Rucio-Auth-Token": token,
                        "X-Rucio-Auth-Token-Expires": _utc(expires).strftime(DATE_FORMAT)})
        resp = web.Response(status=200, body=b"", headers=headers, content_type=OCTET_STREAM)
        resp.headers.add("Cache-Control", "post-check=0, pre-check=0")
        return resp

    def _not_acceptable(self, request: web.Request, types: Sequence[str]
                        ) -> Optional[web.Response]:
        if _accepts(request, types) is not None:
            return None
        return _error(406, "UnsupportedRequestedContentType",
                      f"The requested content type {request.headers.get('Accept')} is not "
                      f"supported. Use {list(types)}.")

    def _several(self, accounts: list[str], headers: dict[str, str]) -> web.Response:
        """206: the accounts of an identity with several and no default (Rucio's spec has no
        default account)."""
        headers["X-Rucio-Auth-Accounts"] = ",".join(accounts)
        return web.Response(status=206, text=json.dumps(accounts), headers=headers,
                            content_type=OCTET_STREAM)

    async def _userpass_token(self, request: web.Request) -> web.StreamResponse:
        refused = self._not_acceptable(request, [OCTET_STREAM])
        if refused is not None:
            return refused
        headers = self._auth_headers(request)
        account = request.headers.get("X-Rucio-Account")
        username = request.headers.get("X-Rucio-Username")
        password = request.headers.get("X-Rucio-Password")
        if not username or not password:
            return _error(401, "CannotAuthenticate",
                          "Cannot authenticate without passing all required arguments", headers)
        stored, accounts = self._userpass.get(username, ("", []))
        if not account:
            if not accounts:
                return _error(401, "IdentityError",
                              "Cannot authenticate. The identity does not exist.", headers)
            if len(accounts) > 1:
                return self._several(accounts, headers)
            account = accounts[0]
        if account not in accounts or not secrets.compare_digest(
                stored, _salted(self._salt, password)):
            log.info("Rucio emulator: userpass refused for account %s", account)
            return _error(401, "CannotAuthenticate",
                          f"Cannot authenticate to account {account} with given credentials",
                          headers)
        return self._issue("userpass", account, username, request, headers)

    async def _x509_token(self, request: web.Request) -> web.StreamResponse:
        refused = self._not_acceptable(request, [OCTET_STREAM])
        if refused is not None:
            return refused
        headers = self._auth_headers(request)
        account = request.headers.get("X-Rucio-Account")
        dn = _peer_dn(request)
        if not dn:
            return _error(401, "CannotAuthenticate", "Cannot get DN", headers)
        dn = _PROXY_CNS.sub("", dn)
        accounts = self._x509.get(dn, [])
        if not account:
            if not accounts:
                return _error(401, "IdentityError",
                              f"Identity error.\nDetails: Identity '{dn}' of type "
                              "'IdentityType.X509' does not exist!", headers)
            if len(accounts) > 1:
                multiple = request.headers.get("X-Rucio-Allow-Return-Multiple-Accounts", "")
                if multiple.lower() != "true":
                    return _error(401, "CannotAuthenticate",
                                  "Multiple accounts associated with the provided identity",
                                  headers)
                return self._several(accounts, headers)
            account = accounts[0]
        if account not in accounts:
            log.info("Rucio emulator: x509 refused for account %s", account)
            return _error(401, "CannotAuthenticate",
                          f"Cannot authenticate to account {account} with given credentials",
                          headers)
        return self._issue("x509", account, dn, request, headers)

    def _token(self, request: web.Request) -> Optional[_Token]:
        """The valid token ``request`` carries, None when it has none that is valid now."""
        text = request.headers.get("X-Rucio-Auth-Token", "").strip()
        found = self._tokens.get(text)
        now = self.clock()
        if found is not None:
            if found.expires > now:
                return found
            del self._tokens[text]
            return None
        if self.bearer is None or text.count(".") != 2:
            return None
        verdict = self.bearer.authorize("Bearer " + text, ())
        account = self.bearer_accounts.get(verdict.subject or "")
        claims = verdict.claims
        if not verdict.granted or account is None or claims is None or not (
                _has_words(claims.get("aud"), self.bearer_audience)
                and _has_words(claims.get("scope"), self.bearer_scope)):
            return None
        return _Token(account, f"SUB={verdict.subject}, ISS={claims.get('iss', '')}",
                      float(claims.get("exp", now)))

    async def _validate(self, request: web.Request) -> web.StreamResponse:
        refused = self._not_acceptable(request, [OCTET_STREAM])
        if refused is not None:
            return refused
        if not request.headers.get("X-Rucio-Auth-Token"):
            return _error(400, "ValueError", "Token must be set.")
        token = self._token(request)
        headers = self._auth_headers(request)
        if token is None:
            # The gateway's CannotAuthenticate is uncaught by the view: a 500, whose message
            # is traceback.format_exc() called outside any exception.
            return _error(500, "CannotAuthenticate", "NoneType: None\n", headers)
        result = {"account": token.account, "identity": token.identity,
                  "lifetime": _utc(token.expires), "audience": None, "authz_scope": None,
                  "vo": "def"}
        return web.Response(status=200, text=str(result), headers=headers,
                            content_type=OCTET_STREAM)

    # --- replicas

    def _cors(self, request: web.Request) -> dict[str, str]:
        """The replicas blueprint's ``after_request`` headers (None values become 'None')."""
        return {"Access-Control-Allow-Origin": request.headers.get("Origin", "None"),
                "Access-Control-Allow-Headers": request.headers.get(
                    "Access-Control-Request-Headers", "None"),
                "Access-Control-Allow-Methods": "*", "Access-Control-Allow-Credentials": "true"}

    async def _list_replicas(self, request: web.Request) -> web.StreamResponse:
        cors = self._cors(request)
        if not request.headers.get("X-Rucio-Auth-Token"):
            return _error(400, "ValueError", "Token must be set.", cors)
        if self._token(request) is None:
            return _error(401, "CannotAuthenticate", "Cannot authenticate with given credentials",
                          cors)
        content_type = _accepts(request, [JSON_STREAM, METALINK])
        if content_type != JSON_STREAM:
            return _error(406, "UnsupportedRequestedContentType",
                          f"The requested content type {request.headers.get('Accept')} is not "
                          f"supported by the emulator (no metalink). Use ['{JSON_STREAM}'].",
                          cors)
        body = await self._json_body(request)
        if isinstance(body, web.Response):
            body.headers.update(cors)
            return body
        try:
            req = ListRequest.from_body(body, request.query)
            self.stats.dids_per_request.append(len(req.dids))
            records = self.catalog.list_replicas(req)
            first = next(records, None)
        except RucioError as e:
            return _from_rucio_error(e, cors)
        if first is None:
            return web.Response(status=200, body=b"", content_type=JSON_STREAM, headers=cors)
        return await self._stream(request, first, records, cors)

    async def _json_body(self, request: web.Request) -> Any:
        """The body as a JSON object, else the real 400 (json_parameters)."""
        raw = await request.read()
        try:
            body = json.loads(raw.decode("utf-8", "replace"))
        except ValueError:
            return _error(400, "ValueError", "cannot decode json parameter dictionary")
        if not isinstance(body, dict):
            return _error(400, "TypeError", "body must be a json dictionary")
        return body

    async def _stream(self, request: web.Request, first: str, rest: Iterator[str],
                      headers: dict[str, str]) -> web.StreamResponse:
        resp = web.StreamResponse(headers=headers)
        resp.content_type = JSON_STREAM  # exactly: the client compares the whole header
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        lines = [first]
        try:
            for line in rest:
                lines.append(line)
                if len(lines) >= _RECORDS_PER_WRITE:
                    await self._write(resp, lines)
                    lines = []
        except RucioError as e:
            # The real server fails inside its generator after the headers went out: the
            # stream breaks off. Send what was made, then drop the connection.
            await self._write(resp, lines)
            log.info("Rucio emulator: replica listing broken off: %s", e)
            if request.transport is not None:
                request.transport.close()
            return resp
        await self._write(resp, lines)
        await resp.write_eof()
        return resp

    async def _write(self, resp: web.StreamResponse, lines: list[str]) -> None:
        self.stats.files_listed += len(lines)
        await resp.write("".join(lines).encode())


# --- in a thread -------------------------------------------------------------------------------


class ThreadedRucioEmulator(ThreadedAppServer[RucioEmulator]):
    """A ``RucioEmulator`` on its own event loop in a daemon thread, for synchronous clients
    such as the real ``ReplicaClient``. Takes the same arguments; ``stats`` is the live object
    (read it once requests are over)."""

    def __init__(self, spec: Optional[SpecSource] = None, **kwargs: Any) -> None:
        super().__init__(lambda: RucioEmulator(spec, **kwargs), "Rucio emulator")

    @property
    def stats(self) -> RucioStats:
        """The live ``RucioStats``."""
        return self.server.stats


# --- command line ------------------------------------------------------------------------------


def default_spec(storage: str = "https://127.0.0.1:2880/pnfs/dune") -> RucioSpec:
    """A world with scope ``dune``, ``DISK_RSE`` (``storage``'s scheme, host, port and path as
    its one protocol) and ``TAPE_RSE`` (the same door, path + ``/tape``), and the userpass
    identity ``root``/``root``/``secret`` for demos."""
    scheme, rest = storage.split("://", 1)
    hostport, _, prefix = rest.partition("/")
    hostname, _, port = hostport.rpartition(":")
    disk = ProtocolSpec(scheme, hostname, int(port), "/" + prefix.strip("/"))
    tape = ProtocolSpec(scheme, hostname, int(port), "/" + prefix.strip("/") + "/tape")
    return RucioSpec.from_dict({
        "scopes": ["dune"],
        "rses": [RseSpec("DISK_RSE", "DISK", (disk,)).to_dict(),
                 RseSpec("TAPE_RSE", "TAPE", (tape,)).to_dict()],
        "users": [{"account": "root", "username": "root", "password": "secret"}],
    })


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m prestaged.testing.rucio",
        description="Run the Rucio emulator on 127.0.0.1 until SIGTERM/SIGINT. Prints one JSON "
                    "line {port, base_url, pid} once listening.")
    p.add_argument("--spec", type=Path, help="the world as a rucio_spec JSON file (default: "
                   "DISK_RSE and TAPE_RSE on --storage, userpass root/root/secret)")
    p.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="add N generated files dune:synthetic_<i>.root in dataset "
                        "dune:synthetic, with a replica on each of --synthetic-rses")
    p.add_argument("--synthetic-rses", default="DISK_RSE,TAPE_RSE",
                   help="comma-separated RSEs of the generated files (default: %(default)s)")
    p.add_argument("--storage", default="https://127.0.0.1:2880/pnfs/dune",
                   help="the storage URL of the default spec's RSEs (default: %(default)s)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    p.add_argument("--token-lifetime", type=float, default=3600.0,
                   help="token lifetime in seconds (default: %(default)s)")
    p.add_argument("--pki-dir", type=Path,
                   help="serve HTTPS with this test PKI (created if DIR/ca does not exist); a "
                        "client certificate is asked for, needed for x509 only; default: HTTP")
    p.add_argument("--stats-file", type=Path, help="write the request statistics here on exit")
    return p


async def _serve_cli(args: argparse.Namespace) -> None:
    spec = load_spec(args.spec) if args.spec else default_spec(args.storage)
    synthetic = None
    if args.synthetic:
        rses = tuple(r for r in args.synthetic_rses.split(",") if r)
        synthetic = SyntheticFiles(args.synthetic, rses=rses)
    ctx = (load_or_create_pki(args.pki_dir).server_ssl_context(require_client_cert=False)
           if args.pki_dir else None)
    server = RucioEmulator(spec, synthetic=synthetic, ssl_context=ctx, port=args.port,
                         token_lifetime=args.token_lifetime)
    await server.serve_until_signalled()
    if args.stats_file is not None:
        args.stats_file.write_text(json.dumps(server.stats.to_dict()) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m prestaged.testing.rucio``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        asyncio.run(_serve_cli(args))
    except (SpecError, ValueError, OSError) as e:
        sys.stderr.write(f"prestaged.testing.rucio: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    from prestaged.testing.process import exit_quietly

    exit_quietly(main)
