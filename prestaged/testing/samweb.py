"""A SAM web emulator for tests, benchmarks and ``prestaged demo --catalog samweb``.

``SamWebServer`` serves the read-only part of the SAM web REST API over HTTPS on 127.0.0.1, with
the paths and formats of the real server (see the team's ``samweb-and-catalogs.md``), under
``https://127.0.0.1:<port>/sam/<experiment>/api``:

========================================================  =======================================
``GET /definitions/name/<def>/files/list``                text, one name per line, streamed
  (``fileinfo=1``: ``name id size events``)
``GET /definitions/name/<def>/files/count``               text: the number of files
``GET /definitions/name/<def>/files/summary``             JSON ``file_count``, ``total_file_size``,
                                                          ``total_event_count``
``GET /definitions/name/<def>/describe``                  JSON (text with ``format=plain``)
``GET|POST /files/list`` (``dims=``), ``GET /files/count``  like the definition endpoints
``GET /files/locations?file_name=a&file_name=b``          JSON ``{name: [location objects]}``
``GET /files/name/<f>/locations``                         JSON list of location objects
``GET /files/name/<f>/locations/url?schema=https``        JSON list of URLs (``access_rules``)
========================================================  =======================================

Location objects carry ``location`` (as SAM writes it, tape suffix included), ``full_path``
(without the suffix), ``location_type`` and ``label``. Errors are JSON
``{"message": ..., "error": "DefinitionNotFound" | "FileNotFound" | "DimensionError"}`` with 404
or 400. Dimensions understood: ``defname: <name>``, ``file_name <a>[, <b> ...]`` and any query
registered with ``add_dims``; anything else is a 400 ``DimensionError``.

Listings come in definition order; SAM promises no order, and with ``reorder`` every listing
comes in another one (a retried listing included), as a database may answer the same query.

Request lines are held to the limit of the front ends in front of the real SAM: over 8190 bytes
(aiohttp's default ``max_line_size``, like Apache's ``LimitRequestLine``) aiohttp itself answers
400 before any handler runs, so such a request is not recorded. ``max_request_line`` sets a
lower limit, answered 414 like Apache does, and recorded.

Fault injection per endpoint (``inject("list", [Status(503), Status(503)])``: the next two
listings answer 503, then normal service) with the storage emulator's actions ``Status``,
``Delay``, ``Reset`` plus ``SamError`` (a JSON error body) and ``Truncate`` (a listing cut off
after some lines). Every request is counted per
endpoint and recorded (``stats``), with the client certificate's DN if one was presented.

Given a ``BearerCheck`` (``bearer=``) the emulator takes a WLCG token in place of the client
certificate: a request needs a certificate or an ``Authorization: Bearer`` token with a good
signature, lifetime and audience (no storage scope: SAM is no storage); anything else, a bad
token even beside a certificate, is answered 401 with SAM's JSON error (``"error":
"Unauthorized"``) and a ``WWW-Authenticate: Bearer`` challenge, before any injected action.

``ThreadedSamWebServer`` runs it on its own loop in a thread (for synchronous tests);
``python -m prestaged.testing.samweb --pki-dir DIR --definitions FILE`` runs it as a process.
Definitions files are JSON or TOML: ``{"definitions": {"name": [{"name": "a.root", "size": 1,
"locations": ["enstore:/pnfs/x(1@vr1)"]}, ...]}, "access_rules": [["enstore:/pnfs/", "https://
door/pnfs/"]]}``. Not for production: everything is kept in memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import socket
import ssl
import struct
import sys
import time
from collections import Counter, deque
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, Union

from aiohttp import web

from prestaged.testing.appserver import AppServer, ThreadedAppServer
from prestaged.testing.pki import load_or_create_pki
from prestaged.testing.storage import Delay, Reset, Serve, Status
from prestaged.testing.tokens import NO_TOKEN, BearerCheck

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib

__all__ = [
    "ACCESS_URL",
    "COUNT",
    "DESCRIBE",
    "DIMS_COUNT",
    "DIMS_LIST",
    "ENDPOINTS",
    "FILE_LOCATIONS",
    "LIST",
    "LOCATIONS",
    "SUMMARY",
    "Delay",
    "Reset",
    "SamError",
    "SamFile",
    "SamRequest",
    "SamStats",
    "SamWebServer",
    "Status",
    "ThreadedSamWebServer",
    "Truncate",
    "load_definitions",
    "main",
]

LIST = "list"
COUNT = "count"
SUMMARY = "summary"
DESCRIBE = "describe"
DIMS_LIST = "dims-list"
DIMS_COUNT = "dims-count"
LOCATIONS = "locations"
FILE_LOCATIONS = "file-locations"
ACCESS_URL = "access-url"
ENDPOINTS = (LIST, COUNT, SUMMARY, DESCRIBE, DIMS_LIST, DIMS_COUNT, LOCATIONS, FILE_LOCATIONS,
             ACCESS_URL)
"""Endpoint names for ``inject`` and ``stats.requests``."""

_LINES_PER_WRITE = 1000
_TAPE_SUFFIX = re.compile(r"\(([^()/]*)\)\s*$")
_DIMS_DEFNAME = re.compile(r"\s*defname\s*[:=]?\s*(\S+)\s*\Z", re.IGNORECASE)
_DIMS_FILE_NAME = re.compile(r"\s*file_name\s*[=]?\s*(.+?)\s*\Z", re.IGNORECASE)

T = TypeVar("T")
_Handler = Callable[[web.Request], Coroutine[Any, Any, web.StreamResponse]]


@dataclass(frozen=True)
class SamError:
    """Answer ``status`` with SAM's JSON error body ``{"message": message, "error": error}``."""

    status: int
    error: str
    message: str = ""


@dataclass(frozen=True)
class Truncate:
    """Stream only the first ``lines`` lines of a listing, then drop the connection."""

    lines: int


Action = Union[Serve, Status, Delay, Reset, SamError, Truncate]
_SERVE = Serve()


@dataclass(frozen=True)
class SamFile:
    """One file SAM knows: name, size (bytes), event count and location strings."""

    name: str
    size: int = 0
    locations: tuple[str, ...] = ()
    events: int = 0

    @classmethod
    def from_obj(cls, obj: Union[str, Mapping[str, Any], SamFile]) -> SamFile:
        """From a ``SamFile``, a bare name, or ``{"name", "size", "events", "locations"}``."""
        if isinstance(obj, SamFile):
            return obj
        if isinstance(obj, str):
            return cls(obj)
        return cls(
            name=str(obj["name"]),
            size=int(obj.get("size", 0)),
            locations=tuple(str(x) for x in obj.get("locations", ())),
            events=int(obj.get("events", 0)),
        )


@dataclass
class SamRequest:
    """One request as the emulator saw it (``status`` 0: reset or not answered)."""

    time: float
    endpoint: str
    method: str
    path: str
    names: int
    """File names asked for (bulk locations), else 0."""
    client_dn: Optional[str]
    action: str
    status: int = 0
    role: Optional[str] = None
    """The ``SAM-Role`` header, if sent."""
    line: int = 0
    """Bytes of the request line (method, target and HTTP version, without CRLF)."""
    bearer: bool = False
    """Whether it carried ``Authorization: Bearer`` (the token itself is never kept)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dict(self.__dict__)


@dataclass
class SamStats:
    """Requests per endpoint, every request, and the client DNs seen (None: anonymous); with a
    ``BearerCheck``, ``token_requests`` (requests carrying a bearer token) and
    ``auth_refusals`` (401s for want of a good token or a certificate)."""

    requests: Counter[str] = field(default_factory=Counter)
    records: list[SamRequest] = field(default_factory=list)
    client_dns: Counter[Optional[str]] = field(default_factory=Counter)
    token_requests: int = 0
    auth_refusals: int = 0

    @property
    def total(self) -> int:
        """Requests of every endpoint."""
        return sum(self.requests.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready snapshot."""
        return {
            "requests": dict(self.requests),
            "total": self.total,
            "client_dns": {str(k): v for k, v in self.client_dns.items()},
            "token_requests": self.token_requests,
            "auth_refusals": self.auth_refusals,
            "records": [r.to_dict() for r in self.records],
        }


def load_definitions(path: Path) -> dict[str, Any]:
    """Read a definitions file (JSON, or TOML by suffix) into ``SamWebServer`` keyword args.

    Keys: ``experiment``, ``definitions`` (name -> list of files), ``dims`` (query -> list of
    file names) and ``access_rules`` (list of ``[location prefix, URL base]``).
    """
    raw = path.read_bytes()
    doc = tomllib.loads(raw.decode()) if path.suffix == ".toml" else json.loads(raw)
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected an object with a 'definitions' key")
    out: dict[str, Any] = {"definitions": doc.get("definitions", {})}
    if "experiment" in doc:
        out["experiment"] = str(doc["experiment"])
    if "access_rules" in doc:
        out["access_rules"] = [(str(a), str(b)) for a, b in doc["access_rules"]]
    if "dims" in doc:
        out["dims"] = doc["dims"]
    return out


def _peer_dn(request: web.BaseRequest) -> Optional[str]:
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        return None
    names = {"commonName": "CN", "organizationName": "O", "domainComponent": "DC",
             "countryName": "C", "organizationalUnitName": "OU"}
    return "".join(f"/{names.get(k, k)}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)


def _location_object(location: str) -> dict[str, Any]:
    suffix = _TAPE_SUFFIX.search(location)
    label = suffix.group(1).split("@", 1)[-1] if suffix else None
    return {
        "location": location,
        "full_path": _TAPE_SUFFIX.sub("", location),
        "location_type": "tape" if label else "disk",
        "label": label,
    }


def _error(status: int, error: str, message: str) -> web.Response:
    return web.json_response({"message": message, "error": error}, status=status)


def _request_line_bytes(request: web.BaseRequest) -> int:
    """Bytes of ``request``'s request line as sent: ``METHOD SP target SP HTTP/x.y``."""
    version = f"HTTP/{request.version.major}.{request.version.minor}"
    return len(request.method) + len(request.raw_path.encode()) + len(version) + 2


def _uri_too_long(line: int, limit: int) -> web.Response:
    """Apache's answer to a request line over ``LimitRequestLine`` (an HTML page)."""
    return web.Response(
        status=414, content_type="text/html",
        text="<html><head><title>414 Request-URI Too Long</title></head><body>"
             f"<p>The requested URL's length ({line} bytes of request line) exceeds the "
             f"capacity limit ({limit}) for this server.</p></body></html>\n",
    )


class SamWebServer(AppServer):
    """The emulator (see the module docstring). Use ``async with`` or ``start()``/``stop()``.

    ``definitions``: name -> files (``SamFile``, a name, or a dict, see ``SamFile.from_obj``).
    ``dims``: dimensions query -> file names. ``access_rules``: ``(location prefix, URL base)``
    pairs the server uses to answer ``locations/url`` (the real rules are SAM's secret).
    ``ssl_context`` decides whether clients must present a certificate.
    ``max_request_line`` (bytes; None: only aiohttp's 8190): a longer request line is answered
    414 without reaching SAM, as by a stricter front end. ``bearer`` (None: certificates only,
    optional or required by ``ssl_context``) accepts tokens in place of a certificate (see the
    module docstring); ``ssl_context`` must then not require a certificate. ``reorder``: every
    listing in another order (see the module docstring).
    """

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        *,
        experiment: str = "test",
        definitions: Optional[Mapping[str, Iterable[Any]]] = None,
        dims: Optional[Mapping[str, Sequence[str]]] = None,
        access_rules: Sequence[tuple[str, str]] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        max_request_line: Optional[int] = None,
        bearer: Optional[BearerCheck] = None,
        reorder: bool = False,
    ) -> None:
        if bearer is not None and ssl_context.verify_mode == ssl.CERT_REQUIRED:
            raise ValueError("with bearer tokens clients without a certificate must get through"
                             " TLS: use server_ssl_context(require_client_cert=False)")
        super().__init__(ssl_context, host, port)
        self.bearer = bearer
        self.max_request_line = max_request_line
        self.reorder = reorder
        self._listings = 0
        self.experiment = experiment
        self.access_rules = list(access_rules)
        self.stats = SamStats()
        self._files: dict[str, tuple[int, SamFile]] = {}
        self._definitions: dict[str, list[str]] = {}
        self._dims: dict[str, list[str]] = {}
        self._injected: dict[str, deque[Action]] = {}
        self._cuts: dict[int, int] = {}  # id(request) -> lines to send (Truncate)
        for name, files in (definitions or {}).items():
            self.add_definition(name, files)
        for query, names in (dims or {}).items():
            self.add_dims(query, names)

    # --- content and faults (call on the server's loop, or through the threaded wrapper)

    def add_files(self, files: Iterable[Any]) -> list[str]:
        """Declare files (see ``SamFile.from_obj``); returns their names."""
        names = []
        for obj in files:
            f = SamFile.from_obj(obj)
            number = self._files[f.name][0] if f.name in self._files else len(self._files) + 1
            self._files[f.name] = (number, f)
            names.append(f.name)
        return names

    def add_definition(self, name: str, files: Iterable[Any]) -> None:
        """Define (or redefine) ``name`` as ``files``, declaring them too."""
        self._definitions[name] = self.add_files(files)

    def add_dims(self, query: str, names: Sequence[str]) -> None:
        """Make the dimensions ``query`` (exact text) select the files ``names``."""
        self._dims[query] = list(names)

    def inject(self, endpoint: str, actions: Sequence[Action]) -> None:
        """Apply ``actions`` to the next requests of ``endpoint`` (one each), then serve."""
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; one of {', '.join(ENDPOINTS)}")
        self._injected.setdefault(endpoint, deque()).extend(actions)

    def reset_stats(self) -> None:
        """Forget every request seen so far."""
        self.stats = SamStats()

    # --- lifecycle

    def _app(self) -> web.Application:
        app = web.Application()
        app.add_routes(self._routes(f"/sam/{self.experiment}/api"))
        return app

    @property
    def base_url(self) -> str:
        """``https://127.0.0.1:<port>/sam/<experiment>/api``."""
        return f"https://{self.host}:{self.port}/sam/{self.experiment}/api"

    # --- request handling

    def _routes(self, prefix: str) -> list[web.RouteDef]:
        d = prefix + "/definitions/name/{defname}"
        return [
            web.get(d + "/files/list", self._wrap(LIST, self._def_list)),
            web.get(d + "/files/count", self._wrap(COUNT, self._def_count)),
            web.get(d + "/files/summary", self._wrap(SUMMARY, self._def_summary)),
            web.get(d + "/describe", self._wrap(DESCRIBE, self._def_describe)),
            web.get(prefix + "/files/list", self._wrap(DIMS_LIST, self._dims_list)),
            web.post(prefix + "/files/list", self._wrap(DIMS_LIST, self._dims_list)),
            web.get(prefix + "/files/count", self._wrap(DIMS_COUNT, self._dims_count)),
            web.get(prefix + "/files/locations", self._wrap(LOCATIONS, self._locations)),
            web.get(prefix + "/files/name/{fname}/locations",
                    self._wrap(FILE_LOCATIONS, self._file_locations)),
            web.get(prefix + "/files/name/{fname}/locations/url",
                    self._wrap(ACCESS_URL, self._access_url)),
        ]

    def _wrap(self, endpoint: str, handler: _Handler) -> _Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            line = _request_line_bytes(request)
            # A front end refuses a long line before SAM sees it: no injected action is used,
            # nor by a request refused for its credentials.
            too_long = self.max_request_line is not None and line > self.max_request_line
            dn = _peer_dn(request)
            bearer = request.headers.get("Authorization", "").startswith("Bearer ")
            refused = None if too_long else self._authorize(request, dn, bearer)
            # `is not None`: a Response is a MutableMapping, falsy while empty on aiohttp 3.10,
            # where a refusal was served as if granted.
            queue = None if too_long or refused is not None else self._injected.get(endpoint)
            action = queue.popleft() if queue else _SERVE
            record = SamRequest(
                time=time.monotonic(), endpoint=endpoint, method=request.method,
                path=request.path, names=len(request.query.getall("file_name", [])),
                client_dn=dn, role=request.headers.get("SAM-Role"), line=line, bearer=bearer,
                action="too long" if too_long else "unauthorized" if refused is not None
                else repr(action),
            )
            self.stats.requests[endpoint] += 1
            self.stats.client_dns[record.client_dn] += 1
            self.stats.records.append(record)
            if too_long:
                resp: web.StreamResponse = _uri_too_long(line, self.max_request_line or 0)
            else:
                resp = refused if refused is not None else await self._apply(action, request,
                                                                             handler)
            record.status = resp.status
            return resp

        return handle

    def _authorize(self, request: web.Request, dn: Optional[str], bearer: bool
                   ) -> Optional[web.Response]:
        """None when ``request`` may be served (see the module docstring), else the 401."""
        if self.bearer is None:
            return None
        self.stats.token_requests += int(bearer)
        verdict = self.bearer.authorize(request.headers.get("Authorization"), ())
        if verdict.granted or (verdict.kind == NO_TOKEN and dn is not None):
            return None
        self.stats.auth_refusals += 1
        message = "No client certificate or bearer token" if verdict.kind == NO_TOKEN \
            else f"Bearer token rejected: {verdict.reason}"
        response = _error(401, "Unauthorized", message)
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    async def _apply(
        self, action: Action, request: web.Request, handler: _Handler
    ) -> web.StreamResponse:
        if isinstance(action, Status):
            headers = {"Retry-After": action.retry_after} if action.retry_after else None
            return web.Response(status=action.code, body=action.body, headers=headers,
                                content_type="text/plain")
        if isinstance(action, SamError):
            return _error(action.status, action.error, action.message)
        if isinstance(action, Reset):
            return await _reset(request)
        if isinstance(action, Delay):
            await asyncio.sleep(action.seconds)
        if isinstance(action, Truncate):
            self._cuts[id(request)] = action.lines
        try:
            return await handler(request)
        finally:
            self._cuts.pop(id(request), None)

    def _definition(self, request: web.Request) -> Union[list[str], web.Response]:
        name = request.match_info["defname"]
        names = self._definitions.get(name)
        if names is None:
            return _error(404, "DefinitionNotFound", f"Definition {name} not found")
        return names

    async def _stream_names(self, request: web.Request, names: list[str]) -> web.StreamResponse:
        self._listings += 1
        if self.reorder:  # another order on every request, reproducibly across test runs
            names = random.Random(self._listings).sample(names, len(names))
        resp = web.StreamResponse(status=200)
        resp.content_type = "text/plain"
        await resp.prepare(request)
        info = request.query.get("fileinfo") == "1"
        cut = self._cuts.get(id(request))
        for start in range(0, len(names), _LINES_PER_WRITE):
            if cut is not None and start >= cut:
                # Close (FIN, not RST: what was written arrives) before the chunked end marker.
                request.protocol.force_close()
                if request.transport is not None:
                    request.transport.close()
                return resp
            lines = []
            stop = start + _LINES_PER_WRITE if cut is None else min(start + _LINES_PER_WRITE, cut)
            for name in names[start:stop]:
                if info:
                    number, f = self._files[name]
                    lines.append(f"{name} {number} {f.size} {f.events}\n")
                else:
                    lines.append(name + "\n")
            await resp.write("".join(lines).encode())
        await resp.write_eof()
        return resp

    async def _def_list(self, request: web.Request) -> web.StreamResponse:
        names = self._definition(request)
        return names if isinstance(names, web.Response) else await self._stream_names(
            request, names)

    async def _def_count(self, request: web.Request) -> web.StreamResponse:
        names = self._definition(request)
        if isinstance(names, web.Response):
            return names
        return web.Response(text=f"{len(names)}\n", content_type="text/plain")

    async def _def_summary(self, request: web.Request) -> web.StreamResponse:
        names = self._definition(request)
        if isinstance(names, web.Response):
            return names
        files = [self._files[n][1] for n in names]
        return web.json_response({
            "file_count": len(files),
            "total_file_size": sum(f.size for f in files),
            "total_event_count": sum(f.events for f in files),
        })

    async def _def_describe(self, request: web.Request) -> web.StreamResponse:
        names = self._definition(request)
        if isinstance(names, web.Response):
            return names
        name = request.match_info["defname"]
        doc = {"defname": name, "dimensions": f"emulated definition of {len(names)} files",
               "username": "prestaged-test", "group": self.experiment}
        if request.query.get("format") == "plain":
            text = "".join(f"{k}: {v}\n" for k, v in doc.items())
            return web.Response(text=text, content_type="text/plain")
        return web.json_response(doc)

    async def _query(self, request: web.Request) -> Union[list[str], web.Response]:
        dims = request.query.get("dims")
        if dims is None and request.method == "POST":
            dims = (await request.post()).get("dims")  # type: ignore[assignment]
        if not isinstance(dims, str) or not dims.strip():
            return _error(400, "DimensionError", "No dimensions given")
        if dims in self._dims:
            return self._dims[dims]
        m = _DIMS_DEFNAME.match(dims)
        if m is not None:
            names = self._definitions.get(m.group(1))
            if names is None:
                return _error(404, "DefinitionNotFound", f"Definition {m.group(1)} not found")
            return names
        m = _DIMS_FILE_NAME.match(dims)
        if m is not None:
            wanted = [n.strip() for n in m.group(1).split(",") if n.strip()]
            return [n for n in wanted if n in self._files]
        return _error(400, "DimensionError", f"Unable to parse dimensions: {dims[:200]}")

    async def _dims_list(self, request: web.Request) -> web.StreamResponse:
        names = await self._query(request)
        return names if isinstance(names, web.Response) else await self._stream_names(
            request, names)

    async def _dims_count(self, request: web.Request) -> web.StreamResponse:
        names = await self._query(request)
        if isinstance(names, web.Response):
            return names
        return web.Response(text=f"{len(names)}\n", content_type="text/plain")

    async def _locations(self, request: web.Request) -> web.StreamResponse:
        doc = {}
        for name in request.query.getall("file_name", []):
            known = self._files.get(name)
            if known is not None:
                doc[name] = [_location_object(loc) for loc in known[1].locations]
        return web.json_response(doc)

    def _file(self, request: web.Request) -> Union[SamFile, web.Response]:
        name = request.match_info["fname"]
        known = self._files.get(name)
        if known is None:
            return _error(404, "FileNotFound", f"File {name} not found")
        return known[1]

    async def _file_locations(self, request: web.Request) -> web.StreamResponse:
        f = self._file(request)
        if isinstance(f, web.Response):
            return f
        return web.json_response([_location_object(loc) for loc in f.locations])

    async def _access_url(self, request: web.Request) -> web.StreamResponse:
        f = self._file(request)
        if isinstance(f, web.Response):
            return f
        schema = request.query.get("schema", "https")
        wanted = request.query.get("location")
        urls = []
        for loc in f.locations:
            path = _TAPE_SUFFIX.sub("", loc)
            if wanted and not path.startswith(wanted):
                continue
            for prefix, base in self.access_rules:
                if path.startswith(prefix) and base.startswith(schema + "://"):
                    rest = path[len(prefix):].strip("/")
                    urls.append("/".join(p for p in (base.rstrip("/"), rest, f.name) if p))
                    break
        return web.json_response(urls)


async def _reset(request: web.BaseRequest) -> web.StreamResponse:
    """Abort the connection with a TCP RST; aiohttp then cancels this handler."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    await asyncio.get_running_loop().create_future()
    raise AssertionError("unreachable")  # pragma: no cover


# --- in a thread -------------------------------------------------------------------------------


class ThreadedSamWebServer(ThreadedAppServer[SamWebServer]):
    """A ``SamWebServer`` on its own event loop in a daemon thread, for synchronous code.

    Takes the same arguments. Mutators run on the server's loop and return once applied;
    ``stats`` is the live object (read it once requests are over).
    """

    def __init__(self, ssl_context: ssl.SSLContext, **kwargs: Any) -> None:
        super().__init__(lambda: SamWebServer(ssl_context, **kwargs), "SAM web emulator")

    @property
    def stats(self) -> SamStats:
        """The live ``SamStats``."""
        return self.server.stats

    def add_definition(self, name: str, files: Iterable[Any]) -> None:
        """See ``SamWebServer.add_definition``."""
        items = list(files)
        self._call(lambda: self.server.add_definition(name, items))

    def add_dims(self, query: str, names: Sequence[str]) -> None:
        """See ``SamWebServer.add_dims``."""
        self._call(lambda: self.server.add_dims(query, names))

    def inject(self, endpoint: str, actions: Sequence[Action]) -> None:
        """See ``SamWebServer.inject``."""
        self._call(lambda: self.server.inject(endpoint, actions))

    def reset_stats(self) -> None:
        """See ``SamWebServer.reset_stats``."""
        self._call(self.server.reset_stats)


# --- command line ------------------------------------------------------------------------------




def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m prestaged.testing.samweb",
        description="Run the SAM web emulator on 127.0.0.1 until SIGTERM/SIGINT. Prints one "
                    "JSON line {port, base_url, pid} once listening.",
    )
    p.add_argument("--pki-dir", type=Path, required=True,
                   help="test PKI directory; created with create_pki() if DIR/ca does not exist")
    p.add_argument("--definitions", type=Path, required=True,
                   help="JSON or TOML file of definitions (see the module docstring)")
    p.add_argument("--experiment", help="experiment in the URL (default: the file's, or test)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    p.add_argument("--require-cert", action="store_true",
                   help="refuse clients without a certificate (default: optional)")
    p.add_argument("--stats-file", type=Path, help="write the request statistics here on exit")
    return p


async def _serve_cli(args: argparse.Namespace) -> None:
    root: Path = args.pki_dir
    pki = load_or_create_pki(root)
    kwargs = load_definitions(args.definitions)
    if args.experiment:
        kwargs["experiment"] = args.experiment
    server = SamWebServer(pki.server_ssl_context(require_client_cert=args.require_cert),
                          port=args.port, **kwargs)
    await server.serve_until_signalled()
    if args.stats_file is not None:
        args.stats_file.write_text(json.dumps(server.stats.to_dict()) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m prestaged.testing.samweb``; returns the exit code."""
    args = _parser().parse_args(argv)
    asyncio.run(_serve_cli(args))
    return 0


if __name__ == "__main__":
    from prestaged.testing.process import exit_quietly

    exit_quietly(main)
