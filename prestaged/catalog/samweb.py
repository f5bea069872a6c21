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
used); over https only (an ``http://`` SAM with ``use_token`` is a ``ConfigError``), and a
redirect is followed on the same origin only (``catalog.http``). Nothing else secret goes to
SAM: the proxy is presented in the TLS handshake, and ``SAM-Role`` names a role.

Errors follow the real samweb client: 4xx answers are never retried and become one-line errors
(``definition 'x' not found in SAM (dune)``; 401/403 and TLS failures are credential errors,
exit 3; everything else exit 4); 5xx, 408, 429, timeouts and dropped connections are retried
with the project's ``RetryPolicy`` backoff (``retry_initial`` doubling up to ``retry_max``, plus
up to 50% jitter; a ``Retry-After`` is honoured, capped at ``retry_max``) for at most
``retry_for`` seconds. A listing cut off midway is requested again and the names already
handed out are skipped by name, not by count: SAM promises no order (``catalog.http.Handed``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional
from urllib.parse import quote, urlsplit

import aiohttp

from prestaged.catalog.http import (
    Call,
    Handed,
    HttpApi,
    Transient,
    UnresolvedLog,
    catalog_ssl_context,
    gather_or_cancel,
    lines,
    one_line,
    ordered,
    retry_settings,
)
from prestaged.catalog.rewrite import Rewriter
from prestaged.config import (
    HOST_PORT,
    HTTP_URL,
    PLAIN_NAME,
    SamWebConfig,
    env_value,
    plain_http,
    token_in_clear,
)
from prestaged.errors import CatalogError, ConfigError, CredentialError
from prestaged.model import FileRef, printable, redact
from prestaged.net import bearer_error

if TYPE_CHECKING:
    from prestaged.tokens import TokenSource

__all__ = [
    "DEFAULT_HOST",
    "LONG_DIMS",
    "SamWebCatalog",
    "check_config",
    "resolve_base_url",
    "samweb_ssl_context",
]

log = logging.getLogger(__name__)

DEFAULT_HOST = "samweb.fnal.gov"
DEFAULT_PORT = 8483
LONG_DIMS = 1024
"""Dimensions longer than this (characters) are POSTed, like the samweb client does."""
MAX_LOCATIONS_TARGET = 6 * 1024
"""Longest request target (path and query, bytes) of one bulk locations GET. Apache's
``LimitRequestLine`` and aiohttp's ``max_line_size`` refuse request lines over 8190 bytes, nginx
over 8 KiB; this leaves room for the method, the version and a longer base path."""

_SAM_PATH = re.compile(r"/sam/([^/]+)/")
# How aiohttp (and some proxies) word a 400 for a request line or header over their limit.
_TOO_LONG_400 = re.compile(r"too (?:long|large)|got more than \d+ bytes", re.IGNORECASE)
_TOO_LONG_STATUS = frozenset({414, 431})
_NAME_PARAM = len("file_name=") + 1  # bytes of one query parameter besides the name, "&" included



# --- configuration -> endpoint and TLS ----------------------------------------------------------


def resolve_base_url(cfg: SamWebConfig, env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The API base URL and a label naming the experiment, as ``(base_url, label)``.

    Order: ``base_url``, ``$SAM_WEB_BASE_URL``, else ``https://<host>:8483/sam/<experiment>/api``
    with ``host`` from the config, ``$SAM_WEB_HOST`` or ``samweb.fnal.gov`` and ``experiment``
    from the config or ``$SAM_EXPERIMENT``. Raises ``ConfigError`` when nothing names the
    experiment.
    """
    environ = os.environ if env is None else env
    experiment = cfg.experiment or env_value(environ, "SAM_EXPERIMENT", PLAIN_NAME)
    base = cfg.base_url or env_value(environ, "SAM_WEB_BASE_URL", HTTP_URL)
    if base is None:
        if experiment is None:
            raise ConfigError(
                "SAM web: no experiment; give --experiment, set [catalog.samweb] experiment "
                "or base_url, or $SAM_EXPERIMENT"
            )
        host = cfg.host or env_value(environ, "SAM_WEB_HOST", HOST_PORT) or DEFAULT_HOST
        base = f"https://{_with_port(host)}/sam/{quote(experiment, safe='')}/api"
    base = base.rstrip("/")
    if experiment is None:
        found = _SAM_PATH.search(urlsplit(base).path + "/")
        experiment = found.group(1) if found else (urlsplit(base).hostname or base)
    return base, experiment


def check_config(cfg: SamWebConfig, env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """Raise ``ConfigError`` unless ``cfg`` names a server and can make URLs (and, with
    ``use_token``, an https one); else return ``resolve_base_url(cfg, env)``. Costs no I/O:
    the CLI calls it before the proxy checks."""
    where = resolve_base_url(cfg, env)
    if cfg.use_token and plain_http(where[0]):
        key = "catalog.samweb.base_url" if cfg.base_url else "$SAM_WEB_BASE_URL"
        raise token_in_clear(key, "catalog.samweb.use_token = true")
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


samweb_ssl_context = catalog_ssl_context
"""The client TLS context SAM web gets (``catalog.http.catalog_ssl_context``)."""


# --- one request, classified -------------------------------------------------------------------


def _error_body(body: str) -> tuple[str, str]:
    """``(error, message)`` of a SAM error body: JSON ``{"error", "message"}`` or plain text.

    An HTML page (a proxy in front of SAM) gives no message: the status line says enough.
    """
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return "", "" if body.lstrip().startswith("<") else one_line(body)
    if isinstance(doc, dict):
        return one_line(str(doc.get("error") or "")), one_line(str(doc.get("message") or ""))
    return "", one_line(body)


@dataclass(frozen=True)
class _Call(Call):
    """A SAM request: what it is for, and how to word its errors."""

    definition: Optional[str] = None
    dims: bool = False
    missing_ok: bool = False
    splittable: bool = False
    """A request of many names: "too long" raises ``_TooLong`` for the caller to split it."""


class _NotFound(Exception):
    """404 for a request with ``missing_ok`` (a single file SAM does not know)."""


class _TooLong(Exception):
    """A ``splittable`` request refused as too long (414, 431, or a 400 saying so)."""


class _Api(HttpApi):
    """One aiohttp session to one SAM web server; every request classified (see module doc)."""

    service = "SAM web"

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
        limit = cfg.parallel + (
            cfg.access_url_concurrency if cfg.url_mode == "access-url" else 0
        )
        super().__init__(
            base_url, retry_settings(cfg, "catalog.samweb"), ssl_context, limit=limit,
            headers={"Accept": "application/json",
                     **({"SAM-Role": cfg.role} if cfg.role else {})},
            sleep=sleep, identity=identity,
        )
        self._token = token
        self.label = label
        self.cfg = cfg

    async def headers_for(self, call: Call) -> Optional[Mapping[str, str]]:
        if self._token is None:
            return None
        return {"Authorization": self._token.authorization()}  # CredentialError when expired

    def detail(self, status: int, reason: str, body: str) -> str:
        error, message = _error_body(body)
        return f"HTTP {status}" + (f" {error}" if error else "") + (
            f": {message}" if message else (f" {reason}" if reason and not error else "")
        )

    def tls_hint(self) -> str:
        return "check the CA directory and catalog.samweb.use_certificate"

    def status_error(self, call: Call, status: int, reason: str, body: str,
                     headers: Mapping[str, str]) -> Exception:
        assert isinstance(call, _Call)
        error, message = _error_body(body)
        detail = self.detail(status, reason, body)
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
        who = f"as {self.identity}" if self.identity else "anonymously (no certificate)"
        fix = ("check the proxy" if self.identity else
               "give a proxy (--proxy) or set catalog.samweb.use_certificate = true")
        return CredentialError(f"{sam} refused {call.what} {who} ({detail}); {fix}")


# --- the catalog -------------------------------------------------------------------------------


def _parse_list_line(line: str) -> Optional[tuple[str, Optional[int]]]:
    """``(name, size)`` from a ``name id size events`` line (size None if absent/unknown)."""
    parts = line.split()
    if not parts:
        return None
    size = _number(parts[2]) if len(parts) >= 3 else None
    return parts[0], size


def _number(text: str) -> Optional[int]:
    """A whole number SAM wrote (ASCII digits, at most 18 of them), else None: "²" passes
    ``isdigit`` and 5,000 digits pass ``int``'s limit no more, and either was a traceback."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


_PAGES = frozenset({"text/html", "application/xhtml+xml"})


def _check_listing(api: _Api, call: _Call, resp: aiohttp.ClientResponse) -> None:
    """``CatalogError`` for a listing answered as a web page: a login or maintenance page a
    front end answers 200 is no list of file names. (Other types pass: SAM documents none.)"""
    if resp.content_type not in _PAGES:
        return
    where = printable(redact(str(resp.url.with_query(None))))
    raise CatalogError(
        f"SAM web {where} answered {call.what} with {printable(resp.content_type[:80])}, not "
        "the text/plain list of files (a login or maintenance page in front of SAM?); check "
        "catalog.samweb.base_url")


def _location_text(entry: object) -> Optional[str]:
    """The location string of one SAM location object (``location``, else ``full_path``)."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict):
        value = entry.get("location") or entry.get("full_path")
        return value if isinstance(value, str) and value else None
    return None


_Entry = tuple[str, Optional[int]]


class SamWebCatalog(UnresolvedLog):
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
        super().__init__()
        self.listed = 0
        """Files SAM listed so far in the current ``files()`` pass."""
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
        except Transient as e:
            log.debug("SAM web: no file count (%s)", e.reason)
            return None
        return _number(str(text).strip())

    async def files(self) -> AsyncIterator[FileRef]:
        """Yield the resolved files in listing order, streaming (see the module docstring)."""
        self.listed = 0
        self._forget_unresolved()
        self._target_limit = MAX_LOCATIONS_TARGET
        started = time.monotonic()
        async with self._api() as api:
            listing = self._listing(api)
            pipeline = ordered(self._batches(api, listing),
                               lambda batch: self._resolve(api, batch), self.cfg.parallel)
            try:
                async for refs in pipeline:
                    for ref in refs:
                        yield ref
            finally:
                # The pipeline first: its feeder may still be inside the listing, which then
                # cannot be closed ("asynchronous generator is already running").
                await pipeline.aclose()
                await listing.aclose()
        log.info("SAM web: %d files listed, %d resolved, %d unresolved in %.1f s",
                 self.listed, self.listed - self.unresolved_count, self.unresolved_count,
                 time.monotonic() - started)
        if self.unresolved_count:
            log.warning("%d files got no URL and are reported as unresolved",
                        self.unresolved_count)

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
        """Stream ``(name, size)`` of every listed file; a cut-off listing is asked again and
        the files already handed out are skipped by name (``Handed``), whatever order it
        comes in."""
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
        handed = Handed()
        while True:
            count = 0
            handed.again()
            try:
                async with api.exchange(call, url, params=params, data=data) as resp:
                    _check_listing(api, call, resp)
                    async for line in lines(resp):
                        entry = _parse_list_line(line)
                        if entry is None:
                            continue
                        count += 1
                        if not handed.fresh(entry[0]):
                            continue
                        self.listed = len(handed)
                        backoff.reset()
                        yield entry
                return
            except Transient as e:
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
        call = _Call(f"locating {len(batch)} files", asked=len(batch), splittable=True)
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

        results = await gather_or_cancel(one(name, size) for name, size in batch)
        return [ref for ref in results if ref is not None]


def _name_bytes(name: str) -> int:
    """Upper bound of the bytes ``name`` adds to a bulk locations request target: its
    ``file_name=`` parameter and separator, percent-encoding every character that is not
    unreserved (yarl leaves some of those unencoded, never encodes more)."""
    return _NAME_PARAM + len(quote(name, safe=""))
