"""The SAM web catalog: a SAM definition (or a dimensions query) -> a stream of storage URLs.

Speaks the SAM web REST API (``https://<host>:8483/sam/<experiment>/api``) on aiohttp:

1. the definition's files, streamed as text lines
   (``/definitions/name/<def>/files/list?format=plain&fileinfo=1``: ``name id size events``;
   ``/files/list?dims=...`` for ``--dims``, POSTed when the query is longer than 1024 chars);
2. their locations in bulk, at most ``batch`` names per ``/files/locations?file_name=...``
   request and ``parallel`` requests in flight, turned into URLs by ``catalog.rewrite`` rules
   -- or, with ``url_mode = "access-url"``, SAM's own
   ``/files/name/<f>/locations/url?schema=https`` per file, ``access_url_concurrency`` at once.

``FileRef``s are yielded in listing order as soon as each batch is resolved, so the engine warms
the first files while later locations are still being fetched. Memory is bounded: besides the
batch being handed out, at most ``parallel`` batches are listed and resolving (or resolved) at
any time, and the listing itself is read only as fast as batches are consumed.

Whatever ``batch`` says, a bulk locations request carries only as many names as fit in
``MAX_LOCATIONS_TARGET`` bytes of request target: front ends refuse longer request lines. A
server that still finds a request too long (414, 431, or a 400 saying so) gets it again split in
halves, down to a single name, and later requests are kept under half the refused length.

Files whose locations match no rule are not silently dropped: they are counted in
``unresolved_count`` and the first ``MAX_UNRESOLVED_KEPT`` are kept in ``unresolved`` (name,
locations, reason) for the report.

With ``use_token`` (off by default: SAM web at Fermilab authenticates by certificate) every
request carries the bearer token, asked for when the request starts (so a renewed token file is
used); aiohttp drops it on a redirect to another origin.

Errors follow the real samweb client: 4xx answers are never retried and become one-line errors
(``definition 'x' not found in SAM (dune)``; 401/403 and TLS failures are credential errors,
exit 3; everything else exit 4); 5xx, 408, 429, timeouts and dropped connections are retried
with the project's ``RetryPolicy`` backoff (``retry_initial`` doubling up to ``retry_max``, plus
up to 50% jitter; a ``Retry-After`` is honoured, capped at ``retry_max``) for at most
``retry_for`` seconds. A listing cut off midway is requested again and
the names already seen are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar, Union
from urllib.parse import quote, urlsplit

import aiohttp
from yarl import URL

from prestaged._version import __version__
from prestaged.catalog.rewrite import Rewriter
from prestaged.config import SamWebConfig
from prestaged.errors import CatalogError, ConfigError, CredentialError, PrestagedError
from prestaged.model import FileRef
from prestaged.net import bearer_error, parse_retry_after, tls_cause
from prestaged.retry import RetryPolicy

if TYPE_CHECKING:
    from prestaged.credentials import Credentials
    from prestaged.tokens import TokenSource

__all__ = [
    "DEFAULT_HOST",
    "LONG_DIMS",
    "MAX_UNRESOLVED_KEPT",
    "SamWebCatalog",
    "Unresolved",
    "check_config",
    "resolve_base_url",
    "samweb_ssl_context",
]

log = logging.getLogger(__name__)

DEFAULT_HOST = "samweb.fnal.gov"
DEFAULT_PORT = 8483
LONG_DIMS = 1024
"""Dimensions longer than this (characters) are POSTed, like the samweb client does."""
MAX_UNRESOLVED_KEPT = 10_000
"""Unresolved files kept with their locations; beyond this only ``unresolved_count`` grows."""
MAX_LOCATIONS_TARGET = 6 * 1024
"""Longest request target (path and query, bytes) of one bulk locations GET. Apache's
``LimitRequestLine`` and aiohttp's ``max_line_size`` refuse request lines over 8190 bytes, nginx
over 8 KiB; this leaves room for the method, the version and a longer base path."""

_RETRYABLE_STATUS = frozenset({408, 429})
_EARLY_DROPS = 3  # connections dropped before any answer that mean "certificate refused"
_CHUNK = 64 * 1024
_MAX_MESSAGE = 300
_SAM_PATH = re.compile(r"/sam/([^/]+)/")
# How aiohttp (and some proxies) word a 400 for a request line or header over their limit.
_TOO_LONG_400 = re.compile(r"too (?:long|large)|got more than \d+ bytes", re.IGNORECASE)
_TOO_LONG_STATUS = frozenset({414, 431})
_NAME_PARAM = len("file_name=") + 1  # bytes of one query parameter besides the name, "&" included

T = TypeVar("T")


@dataclass(frozen=True)
class Unresolved:
    """A file SAM listed but that got no URL: its SAM locations and why."""

    name: str
    locations: tuple[str, ...]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"name": self.name, "locations": list(self.locations), "reason": self.reason}


# --- configuration -> endpoint and TLS ----------------------------------------------------------


def resolve_base_url(cfg: SamWebConfig, env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The API base URL and a label naming the experiment, as ``(base_url, label)``.

    Order: ``base_url``, ``$SAM_WEB_BASE_URL``, else ``https://<host>:8483/sam/<experiment>/api``
    with ``host`` from the config, ``$SAM_WEB_HOST`` or ``samweb.fnal.gov`` and ``experiment``
    from the config or ``$SAM_EXPERIMENT``. Raises ``ConfigError`` when nothing names the
    experiment.
    """
    environ = os.environ if env is None else env
    experiment = cfg.experiment or environ.get("SAM_EXPERIMENT") or None
    base = cfg.base_url or environ.get("SAM_WEB_BASE_URL") or None
    if base is None:
        if experiment is None:
            raise ConfigError(
                "SAM web: no experiment; give --experiment, set [catalog.samweb] experiment "
                "or base_url, or $SAM_EXPERIMENT"
            )
        host = cfg.host or environ.get("SAM_WEB_HOST") or DEFAULT_HOST
        base = f"https://{_with_port(host)}/sam/{quote(experiment, safe='')}/api"
    base = base.rstrip("/")
    if experiment is None:
        found = _SAM_PATH.search(urlsplit(base).path + "/")
        experiment = found.group(1) if found else (urlsplit(base).hostname or base)
    return base, experiment


def check_config(cfg: SamWebConfig, env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """Raise ``ConfigError`` unless ``cfg`` names a server and can make URLs; else return
    ``resolve_base_url(cfg, env)``. Costs no I/O: the CLI calls it before the proxy checks."""
    where = resolve_base_url(cfg, env)
    if cfg.url_mode == "rewrite" and not cfg.rewrite:
        raise ConfigError(
            "catalog.samweb.rewrite: no rules to turn SAM locations into URLs; add "
            "[[catalog.samweb.rewrite]] tables (config/prestaged.toml has the Fermilab "
            'ones) or set catalog.samweb.url_mode = "access-url"'
        )
    return where


def _with_port(host: str) -> str:
    """``host`` with the SAM web port 8483 unless it names a port already."""
    try:
        port = urlsplit(f"//{host}").port
    except ValueError:
        port = None
    return host if port else f"{host}:{DEFAULT_PORT}"


def samweb_ssl_context(
    credentials: Optional[Credentials] = None, ca_dir: Optional[Path] = None
) -> ssl.SSLContext:
    """Client TLS context for SAM: presenting the proxy of ``credentials``, or anonymous.

    Trusts the system's CAs plus the grid CA directory (``credentials.ca_dir``; anonymous:
    ``ca_dir`` if it exists): SAM servers may carry either kind of certificate.
    Raises ``CredentialError`` if OpenSSL refuses the proxy or the CA directory.
    """
    if credentials is not None:
        ctx = credentials.ssl_context()
        ctx.load_default_certs()
        return ctx
    ctx = ssl.create_default_context()
    if ca_dir is not None and ca_dir.is_dir():
        try:
            ctx.load_verify_locations(capath=str(ca_dir))
        except (ssl.SSLError, OSError) as e:
            raise CredentialError(f"CA directory {ca_dir}: OpenSSL cannot load it") from e
    return ctx


# --- one request, classified -------------------------------------------------------------------


class _Transient(Exception):
    """A failure worth retrying: 5xx/408/429, a timeout or a dropped connection."""

    def __init__(self, reason: str, retry_after: Optional[float] = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def _one_line(text: str, limit: int = _MAX_MESSAGE) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _error_body(body: str) -> tuple[str, str]:
    """``(error, message)`` of a SAM error body: JSON ``{"error", "message"}`` or plain text.

    An HTML page (a proxy in front of SAM) gives no message: the status line says enough.
    """
    try:
        doc = json.loads(body)
    except ValueError:
        return "", "" if body.lstrip().startswith("<") else _one_line(body)
    if isinstance(doc, dict):
        return _one_line(str(doc.get("error") or "")), _one_line(str(doc.get("message") or ""))
    return "", _one_line(body)


@dataclass(frozen=True)
class _Call:
    """What a request is for, to word its errors (``what`` reads "listing the files of ...")."""

    what: str
    definition: Optional[str] = None
    dims: bool = False
    missing_ok: bool = False
    splittable: bool = False
    """A request of many names: "too long" raises ``_TooLong`` for the caller to split it."""


class _NotFound(Exception):
    """404 for a request with ``missing_ok`` (a single file SAM does not know)."""


class _TooLong(Exception):
    """A ``splittable`` request refused as too long (414, 431, or a 400 saying so)."""


class _Api:
    """One aiohttp session to one SAM web server; every request classified (see module doc)."""

    def __init__(
        self,
        base_url: str,
        label: str,
        cfg: SamWebConfig,
        ssl_context: Optional[ssl.SSLContext],
        identity: Optional[str],
        sleep: Callable[[float], Awaitable[None]],
        token: Optional[TokenSource] = None,
    ) -> None:
        self.base_url = base_url
        self._token = token
        self.label = label
        self.cfg = cfg
        self._ssl = ssl_context
        self._identity = identity
        self._sleep = sleep
        # Bounded by time only (retry_for), like the samweb client; Retry-After capped at
        # retry_max by _Backoff.
        self._policy = RetryPolicy(
            attempts=1 << 30, initial=cfg.retry_initial, max=cfg.retry_max, jitter=0.5,
            total=cfg.retry_for, max_retry_after=cfg.retry_max,
        )
        self._session: Optional[aiohttp.ClientSession] = None
        self._answered = False
        self._early_drops = 0
        self.on_request: Optional[Callable[[str], None]] = None
        """Told ``ok`` or ``error`` after every request (the daemon's metrics)."""

    async def __aenter__(self) -> _Api:
        limit = self.cfg.parallel + (
            self.cfg.access_url_concurrency if self.cfg.url_mode == "access-url" else 0
        )
        connector = aiohttp.TCPConnector(
            limit=limit + 1, ssl=self._ssl if self._ssl is not None else True
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self.cfg.timeout, sock_read=self.cfg.timeout
            ),
            headers={"Accept": "application/json", "User-Agent": f"prestaged/{__version__}",
                     **({"SAM-Role": self.cfg.role} if self.cfg.role else {})},
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, *segments: str) -> URL:
        """``base_url`` + ``/``-joined ``segments``, each percent-encoded (``/`` included)."""
        path = "/".join(quote(s, safe="") for s in segments)
        return URL(f"{self.base_url}/{path}", encoded=True)

    @contextlib.asynccontextmanager
    async def exchange(
        self,
        call: _Call,
        url: URL,
        *,
        params: Union[Sequence[tuple[str, str]], Mapping[str, str], None] = None,
        data: Optional[Mapping[str, str]] = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One attempt: yield the 200 response, or raise ``_Transient``/a ``PrestagedError``.

        Network errors while the caller reads the body are classified the same way.
        """
        assert self._session is not None, "use `async with _Api(...)`"
        method = "GET" if data is None else "POST"
        headers = None
        if self._token is not None:  # CredentialError when it expired: nothing is sent
            headers = {"Authorization": self._token.authorization()}
        ok = False
        try:
            async with self._session.request(method, url, params=params, data=data,
                                             headers=headers) as resp:
                self._answered = True
                ok = resp.status == 200
                if resp.status != 200:
                    body = await resp.text(errors="replace") if resp.status < 600 else ""
                    raise self._status_error(call, resp.status, resp.reason or "", body,
                                             resp.headers)
                yield resp
        except asyncio.TimeoutError:
            ok = False
            raise _Transient("timed out") from None
        except aiohttp.ClientError as e:
            ok = False
            raise self._network_error(e) from e
        finally:
            if self.on_request is not None:
                self.on_request("ok" if ok else "error")

    def _status_error(
        self, call: _Call, status: int, reason: str, body: str, headers: Mapping[str, str]
    ) -> Exception:
        error, message = _error_body(body)
        detail = f"HTTP {status}" + (f" {error}" if error else "") + (
            f": {message}" if message else (f" {reason}" if reason and not error else "")
        )
        if status >= 500 or status in _RETRYABLE_STATUS:
            return _Transient(detail, parse_retry_after(headers.get("Retry-After")))
        sam = f"SAM ({self.label})"
        if status == 404 and call.missing_ok:
            return _NotFound(detail)
        if status == 404 and call.definition is not None and error in ("", "DefinitionNotFound"):
            tail = f": {message}" if message else ""
            return CatalogError(f"definition '{call.definition}' not found in {sam}{tail}")
        if status == 400 and (error == "DimensionError" or call.dims):
            return CatalogError(f"{sam} rejected the dimensions: {message or detail}")
        if status in (401, 403):
            return self._refused(call, sam, detail, headers)
        if status in _TOO_LONG_STATUS or (status == 400 and _TOO_LONG_400.search(body)):
            if call.splittable:
                return _TooLong(detail)
            return CatalogError(f"{sam} refused {call.what}: request too long ({detail})")
        return CatalogError(f"{sam} failed {call.what}: {detail}")

    def _refused(self, call: _Call, sam: str, detail: str,
                 headers: Mapping[str, str]) -> CredentialError:
        """A 401/403: who we presented ourselves as, and what to check."""
        if self._token is not None:
            said = bearer_error(headers.get("WWW-Authenticate"))
            detail += f"; the server says: {said}" if said else ""
            return CredentialError(
                f"{sam} refused {call.what} with {self._token.info.describe()} ({detail}); "
                "check the token's audience and scopes for SAM, or set "
                "catalog.samweb.use_token = false")
        who = f"as {self._identity}" if self._identity else "anonymously (no certificate)"
        fix = ("check the proxy" if self._identity else
               "give a proxy (--proxy) or set catalog.samweb.use_certificate = true")
        return CredentialError(f"{sam} refused {call.what} {who} ({detail}); {fix}")

    def _network_error(self, e: aiohttp.ClientError) -> Exception:
        tls = tls_cause(e)
        if tls is not None:
            who = f"the proxy of {self._identity}" if self._identity else "no client certificate"
            why = _one_line(str(tls) or type(tls).__name__)
            return CredentialError(
                f"TLS with SAM web {self.base_url} failed ({why}); we presented {who}; "
                "check the CA directory and catalog.samweb.use_certificate"
            )
        if _dropped(e) and not self._answered:
            # A server that refuses the client certificate (or its absence) under TLS 1.3
            # simply closes the connection: after a few such drops before any answer at
            # all, say so instead of retrying for an hour.
            self._early_drops += 1
            if self._early_drops >= _EARLY_DROPS:
                who = (f"does not accept the proxy of {self._identity}" if self._identity
                       else "requires a client certificate (give a proxy with --proxy)")
                return CredentialError(
                    f"SAM web {self.base_url} closed the connection {self._early_drops} times "
                    f"without answering; it probably {who}"
                )
        if isinstance(e, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
            return _Transient(_one_line(str(e) or type(e).__name__))
        return CatalogError(f"SAM web {self.base_url}: {_one_line(str(e) or type(e).__name__)}")

    async def fetch(
        self,
        call: _Call,
        url: URL,
        *,
        params: Union[Sequence[tuple[str, str]], Mapping[str, str], None] = None,
        json_body: bool = True,
        retry: bool = True,
    ) -> Any:
        """GET ``url`` with retries; the decoded JSON (or text, ``json_body=False``)."""
        backoff = self.backoff(call)
        while True:
            try:
                async with self.exchange(call, url, params=params) as resp:
                    text = await resp.text(errors="replace")
                break
            except _Transient as e:
                if not retry:
                    raise
                await backoff.wait(e)
        if not json_body:
            return text
        try:
            return json.loads(text)
        except ValueError:
            raise CatalogError(
                f"SAM ({self.label}) answered {call.what} with malformed JSON"
            ) from None

    def backoff(self, call: _Call) -> _Backoff:
        """Retry bookkeeping for one request (or one resumable stream)."""
        return _Backoff(self._policy, self._sleep, f"SAM web {self.base_url}", call.what)


def _dropped(exc: BaseException) -> bool:
    """True if ``exc`` is the server closing or resetting the connection without answering."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return True
    cause = getattr(exc, "os_error", None) or exc.__cause__
    return isinstance(exc, aiohttp.ClientOSError) and isinstance(
        cause if cause is not None else exc, ConnectionResetError
    )


class _Backoff:
    """Retry bookkeeping for one request: how many tries, since when; the delays themselves
    come from ``RetryPolicy.delay`` (the project's one backoff formula)."""

    def __init__(
        self,
        policy: RetryPolicy,
        sleep: Callable[[float], Awaitable[None]],
        server: str,
        what: str,
    ) -> None:
        self.policy = policy
        self.sleep = sleep
        self.server = server
        self.what = what
        self.tries = 0
        self.started: Optional[float] = None

    def reset(self) -> None:
        """Forget earlier failures (the request made progress since)."""
        self.tries, self.started = 0, None

    async def wait(self, error: _Transient) -> None:
        """Sleep before the next try, or raise ``CatalogError`` when the time budget is spent."""
        now = time.monotonic()
        if self.started is None:
            self.started = now
        self.tries += 1
        elapsed = now - self.started
        # A Retry-After beyond retry_max is capped, not a reason to give up (the config's
        # documented meaning): only retry_for ends the retries of a catalog request.
        asked = (None if error.retry_after is None
                 else min(error.retry_after, self.policy.max_retry_after))
        delay = self.policy.delay(self.tries, retry_after=asked, elapsed=elapsed)
        if delay is None:
            tries = f"{self.tries} tries" if self.tries > 1 else "1 try"
            raise CatalogError(
                f"{self.server} unreachable while {self.what}: {error.reason} "
                f"(gave up after {tries} in {elapsed:.0f} s; catalog.samweb.retry_for)"
            )
        log.warning("SAM web: %s while %s; retry %d in %.1f s",
                    error.reason, self.what, self.tries, delay)
        await self.sleep(delay)


# --- the catalog -------------------------------------------------------------------------------


def _parse_list_line(line: str) -> Optional[tuple[str, Optional[int]]]:
    """``(name, size)`` from a ``name id size events`` line (size None if absent/unknown)."""
    parts = line.split()
    if not parts:
        return None
    size = int(parts[2]) if len(parts) >= 3 and parts[2].isdigit() else None
    return parts[0], size


def _location_text(entry: object) -> Optional[str]:
    """The location string of one SAM location object (``location``, else ``full_path``)."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict):
        value = entry.get("location") or entry.get("full_path")
        return value if isinstance(value, str) and value else None
    return None


_Entry = tuple[str, Optional[int]]


class SamWebCatalog:
    """Files of a SAM definition (or of ``dims``) as ``FileRef``s; see the module docstring.

    ``ssl_context`` presents the proxy or not (``samweb_ssl_context``); None uses aiohttp's
    default verification. ``identity`` (the proxy's DN, or None for anonymous) only words
    errors. ``token``: the bearer token, sent with every request when ``cfg.use_token``
    (ignored otherwise; missing then: ``CredentialError``). ``env`` replaces ``os.environ`` for
    the ``SAM_*`` variables and ``sleep`` the backoff sleep (tests). Raises ``ConfigError`` if
    the server or the rules are not configured.
    """

    name = "samweb"

    def __init__(
        self,
        definition: str,
        cfg: SamWebConfig,
        ssl_context: Optional[ssl.SSLContext] = None,
        *,
        dims: Optional[str] = None,
        identity: Optional[str] = None,
        env: Mapping[str, str] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        token: Optional[TokenSource] = None,
    ) -> None:
        self.base_url, self.experiment = check_config(cfg, env)
        if cfg.use_token and token is None:
            raise CredentialError("catalog.samweb.use_token is true but no bearer token was "
                                  "found (see `prestaged credentials`)")
        self._token = token if cfg.use_token else None
        self.definition = definition
        self.dims = dims
        self.cfg = cfg
        self.source = self.base_url
        """Where the files come from, for summaries."""
        self._ssl = ssl_context
        self._identity = identity
        self._sleep = sleep
        self._rewriter = Rewriter(cfg.rewrite)
        self.listed = 0
        """Files SAM listed so far in the current ``files()`` pass."""
        self.unresolved: list[Unresolved] = []
        """The first ``MAX_UNRESOLVED_KEPT`` files that got no URL."""
        self.unresolved_count = 0
        """Files that got no URL (all of them, kept or not)."""
        self.on_request: Optional[Callable[[str], None]] = None
        """Told ``ok`` or ``error`` after every request to SAM (metrics)."""
        self._target_limit = MAX_LOCATIONS_TARGET
        """Request target bytes allowed per bulk locations GET; lowered when SAM says "too long"."""

    def _api(self) -> _Api:
        api = _Api(self.base_url, self.experiment, self.cfg, self._ssl, self._identity,
                   self._sleep, self._token)
        api.on_request = self.on_request
        return api

    def _listing_call(self) -> _Call:
        if self.dims is not None:
            return _Call("listing the files matching the dimensions", dims=True)
        return _Call(f"listing the files of definition '{self.definition}'",
                     definition=self.definition)

    async def estimate(self) -> Optional[int]:
        """The file count from SAM (one try, no retries), or None when SAM cannot say now.

        Raises the usual errors for answers that will not change (unknown definition, bad
        dimensions, refused credentials).
        """
        if self.dims is not None:
            if len(self.dims) > LONG_DIMS:
                return None
            call = _Call("counting the files matching the dimensions", dims=True)
            params: Optional[dict[str, str]] = {"dims": self.dims}
            path: tuple[str, ...] = ("files", "count")
        else:
            call = _Call(f"counting the files of definition '{self.definition}'",
                         definition=self.definition)
            params, path = None, ("definitions", "name", self.definition, "files", "count")
        try:
            async with self._api() as api:
                text = await api.fetch(call, api.url(*path), params=params, json_body=False,
                                       retry=False)
        except _Transient as e:
            log.debug("SAM web: no file count (%s)", e.reason)
            return None
        text = str(text).strip()
        return int(text) if text.isdigit() else None

    async def files(self) -> AsyncIterator[FileRef]:
        """Yield the resolved files in listing order, streaming (see the module docstring)."""
        self.listed, self.unresolved, self.unresolved_count = 0, [], 0
        self._target_limit = MAX_LOCATIONS_TARGET
        started = time.monotonic()
        async with self._api() as api:
            slots = asyncio.Semaphore(self.cfg.parallel)
            ready: asyncio.Queue[Optional[asyncio.Future[list[FileRef]]]] = asyncio.Queue()
            feeder = asyncio.ensure_future(self._feed(api, slots, ready))
            try:
                while True:
                    batch = await ready.get()
                    if batch is None:
                        break
                    try:
                        refs = await batch
                    finally:
                        slots.release()
                    for ref in refs:
                        yield ref
                await feeder
            finally:
                await _cancel_all(feeder, ready)
        log.info("SAM web: %d files listed, %d resolved, %d unresolved in %.1f s",
                 self.listed, self.listed - self.unresolved_count, self.unresolved_count,
                 time.monotonic() - started)
        if self.unresolved_count:
            log.warning("%d files got no URL and are reported as unresolved",
                        self.unresolved_count)

    async def _feed(
        self,
        api: _Api,
        slots: asyncio.Semaphore,
        ready: asyncio.Queue[Optional[asyncio.Future[list[FileRef]]]],
    ) -> None:
        """List names, cut them into batches and start resolving each while a slot is free."""
        listing = self._listing(api)
        batches = self._batches(api, listing)
        try:
            async for batch in batches:
                await slots.acquire()
                ready.put_nowait(asyncio.ensure_future(self._resolve(api, batch)))
        except Exception as e:  # handed to the consumer, in order, after the batches before it
            failed: asyncio.Future[list[FileRef]] = asyncio.get_running_loop().create_future()
            failed.set_exception(e)
            await slots.acquire()
            ready.put_nowait(failed)
        finally:
            await batches.aclose()
            await listing.aclose()
        ready.put_nowait(None)

    async def _batches(
        self, api: _Api, listing: AsyncIterator[_Entry]
    ) -> AsyncGenerator[list[_Entry], None]:
        """Cut the listing into batches of at most ``batch`` names; in ``rewrite`` mode also of
        at most ``_target_limit`` bytes of bulk locations request target (see the module doc).
        A full batch goes out at once, without waiting for the next listed name."""
        by_bytes = self.cfg.url_mode == "rewrite"
        base = len(api.url("files", "locations").raw_path)
        batch: list[_Entry] = []
        size = base
        async for entry in listing:
            cost = _name_bytes(entry[0]) if by_bytes else 0
            if batch and size + cost > self._target_limit:
                yield batch
                batch, size = [], base
            batch.append(entry)
            size += cost
            if len(batch) >= self.cfg.batch:
                yield batch
                batch, size = [], base
        if batch:
            yield batch

    async def _listing(self, api: _Api) -> AsyncGenerator[_Entry, None]:
        """Stream ``(name, size)`` of every listed file; resume a cut-off listing by skipping."""
        call = self._listing_call()
        params: dict[str, str] = {"format": "plain", "fileinfo": "1"}
        data: Optional[dict[str, str]] = None
        if self.dims is None:
            url = api.url("definitions", "name", self.definition, "files", "list")
        else:
            url = api.url("files", "list")
            if len(self.dims) > LONG_DIMS:
                data = {"dims": self.dims}
            else:
                params["dims"] = self.dims
        backoff = api.backoff(call)
        seen = 0
        while True:
            count = 0
            try:
                async with api.exchange(call, url, params=params, data=data) as resp:
                    async for line in _lines(resp):
                        entry = _parse_list_line(line)
                        if entry is None:
                            continue
                        count += 1
                        if count <= seen:
                            continue
                        seen = count
                        self.listed = seen
                        backoff.reset()
                        yield entry
                return
            except _Transient as e:
                if count:
                    log.info("SAM web: listing cut off after %d files; listing again", count)
                await backoff.wait(e)

    async def _resolve(self, api: _Api, batch: list[_Entry]) -> list[FileRef]:
        if self.cfg.url_mode == "access-url":
            return await self._access_urls(api, batch)
        return await self._locate(api, batch)

    async def _locate(self, api: _Api, batch: list[_Entry]) -> list[FileRef]:
        """Bulk locations of ``batch``, rewritten to URLs."""
        doc = await self._locations(api, batch)
        refs = []
        for name, size in batch:
            entries = doc.get(name)
            locations = tuple(
                loc for loc in map(_location_text, entries if isinstance(entries, list) else [])
                if loc is not None
            )
            url = self._rewriter.url_for(name, locations)
            if url is not None:
                refs.append(FileRef(name=name, url=url, size=size))
            elif locations:
                self._unresolved(name, locations, "no rewrite rule matches its locations")
            else:
                self._unresolved(name, locations, "SAM knows no location")
        return refs

    async def _locations(self, api: _Api, batch: Sequence[_Entry]) -> dict[str, Any]:
        """SAM's ``{name: [location objects]}`` for ``batch``, in one request or, when SAM
        finds that one too long, in halves asked one after the other (``parallel`` requests
        in flight stays true) down to single names."""
        call = _Call(f"locating {len(batch)} files", splittable=True)
        url = api.url("files", "locations")
        try:
            doc = await api.fetch(call, url, params=[("file_name", name) for name, _ in batch])
        except _TooLong as e:
            if len(batch) == 1:
                raise CatalogError(
                    f"SAM ({self.experiment}) refused locating file '{batch[0][0]}': request "
                    f"too long ({e}) even with this one name in it"
                ) from None
            self._shrink_target(len(url.raw_path) + sum(_name_bytes(n) for n, _ in batch), e)
            half = len(batch) // 2
            return {**await self._locations(api, batch[:half]),
                    **await self._locations(api, batch[half:])}
        if not isinstance(doc, dict):
            raise CatalogError(f"SAM ({self.experiment}) answered {call.what} with "
                               f"{type(doc).__name__}, not an object of file names")
        return doc

    def _shrink_target(self, refused: int, why: _TooLong) -> None:
        """Keep later batches under half of a request target SAM refused (``refused`` bytes
        at most), so that a stricter front end costs a few split requests, not every batch."""
        limit = refused // 2
        if limit < self._target_limit:
            log.warning("SAM web: a locations request of up to %d bytes was refused as too "
                        "long (%s); asking at most %d bytes per request from now on",
                        refused, why, limit)
            self._target_limit = limit

    async def _access_urls(self, api: _Api, batch: list[_Entry]) -> list[FileRef]:
        """SAM's own access URL for every file of ``batch``, a bounded number at once."""
        limit = asyncio.Semaphore(self.cfg.access_url_concurrency)

        async def one(name: str, size: Optional[int]) -> Optional[FileRef]:
            call = _Call(f"asking for the access URL of {name}", missing_ok=True)
            url = api.url("files", "name", name, "locations", "url")
            async with limit:
                try:
                    urls = await api.fetch(call, url, params={"schema": self.cfg.schema})
                except _NotFound:
                    self._unresolved(name, (), "SAM does not know the file")
                    return None
            found = [u for u in (urls if isinstance(urls, list) else []) if isinstance(u, str)]
            if not found:
                self._unresolved(name, (), f"SAM has no {self.cfg.schema} URL for it")
                return None
            return FileRef(name=name, url=found[0], size=size)

        results = await _gather_or_cancel(one(name, size) for name, size in batch)
        return [ref for ref in results if ref is not None]

    def _unresolved(self, name: str, locations: tuple[str, ...], reason: str) -> None:
        self.unresolved_count += 1
        if len(self.unresolved) < MAX_UNRESOLVED_KEPT:
            self.unresolved.append(Unresolved(name, locations, reason))
        if self.unresolved_count == 1:
            log.warning("unresolved: %s (%s): %s", name, reason, ", ".join(locations) or "-")
        else:
            log.debug("unresolved: %s (%s): %s", name, reason, ", ".join(locations) or "-")


def _name_bytes(name: str) -> int:
    """Upper bound of the bytes ``name`` adds to a bulk locations request target: its
    ``file_name=`` parameter and separator, percent-encoding every character that is not
    unreserved (yarl leaves some of those unencoded, never encodes more)."""
    return _NAME_PARAM + len(quote(name, safe=""))


async def _lines(resp: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """Text lines of a streamed body, read in 64 KiB chunks (cheaper than one await per line)."""
    tail = b""
    async for chunk in resp.content.iter_chunked(_CHUNK):
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        for raw in lines:
            yield raw.decode("utf-8", errors="replace")
    if tail:
        yield tail.decode("utf-8", errors="replace")


async def _gather_or_cancel(coros: Iterable[Awaitable[T]]) -> list[T]:
    """``gather`` that cancels the others as soon as one fails, then raises that failure."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _cancel_all(
    feeder: asyncio.Future[None],
    ready: asyncio.Queue[Optional[asyncio.Future[list[FileRef]]]],
) -> None:
    """Stop the feeder and every batch still queued, and wait until they are gone."""
    pending: list[asyncio.Future[Any]] = [feeder]
    while not ready.empty():
        item = ready.get_nowait()
        if item is not None:
            pending.append(item)
    for fut in pending:
        fut.cancel()
    results = await asyncio.gather(*pending, return_exceptions=True)
    for result in results:
        if isinstance(result, PrestagedError):
            log.debug("SAM web: dropped after stop: %s", result)
