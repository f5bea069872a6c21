"""The daemon's HTTP API (aiohttp): health, readiness, metrics, warm requests, dataset warmth,
campaigns.

``GET /healthz`` liveness; ``GET /readyz`` 200 when the store is open and the proxy has more
than ``credentials.min_lifetime`` left, else 503 with the reasons; ``GET /metrics`` Prometheus;
``POST /api/v1/warm`` ``{"definition": ..., "catalog": ...}`` -> 202 ``{"id": ...}`` (the id
of the run already queued or running for that definition, if there is one, with ``"merged":
true``; 429 with ``Retry-After`` while ``daemon.max_runs`` runs are queued or running);
``GET /api/v1/runs/<id>``; ``GET /api/v1/datasets`` and ``/api/v1/datasets/<name>``;
``GET /api/v1/members`` (the daemons sharing the state, as ``prestaged status --members
--json``); campaigns: ``GET|POST /api/v1/campaigns``, ``GET|DELETE /api/v1/campaigns/<name>``
(``DELETE``: forget a finished campaign), ``POST /api/v1/campaigns/<name>/<action>``
(``campaign.actions.ACTIONS``).

Errors are JSON ``{"error": "..."}``; the status is the error's own ``http_status`` (400 bad
input, 404 unknown, 409 refused transition, 503 the daemon cannot now), never a 500 for bad
input.

Who may do and see what. The token is ``Authorization: Bearer <token>`` with the content of
``daemon.token_file``; the daemon must have one when it listens beyond loopback.

- Campaign changes always need the token (403 without a token file): a campaign runs commands
  as the daemon's user, so only who can read the token file may add or steer one.
- With a token configured, it is also needed for warm requests and for operator data: runs
  (their errors may quote what a catalog answered) and the output of campaigns' submit
  commands (``output_tail``, left out of ``GET /api/v1/campaigns/<name>`` without it).
- Open to anyone who can connect: ``/healthz``, ``/readyz``, ``/metrics``, dataset warmth
  (counts per definition), the members (host names, pids, API addresses) and the campaign
  list and documents (states, reasons, job ids).
- Without a token (loopback only) every local user may request warms and read runs, but a
  definition named over the API is never a path: only a name in ``catalog.local.dir`` or of
  a remote catalog (``naming``), so the daemon reads no file a caller chose.

The API sees the daemon only through ``ApiPorts``, declared here: it can be served in-process
against any object with those methods (the tests use a fake).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import re
import ssl
from collections.abc import Awaitable, Collection, Mapping
from typing import Callable, Optional, Protocol, TypeVar

from aiohttp import ClientPayloadError, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestPayloadError

from prestaged.config import CATALOG_KINDS
from prestaged.errors import BusyError, ConfigError, PrestagedError
from prestaged.model import has_control, printable

__all__ = ["LISTEN", "MAX_BODY", "MAX_CONNECTIONS", "REQUEST_DEADLINE", "ApiPorts", "Handler",
           "JsonObject", "RunView", "build_app", "serve"]

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024
"""Bytes of a request body the API reads at most (413 beyond)."""

MAX_CONNECTIONS = 256
"""Connections the API holds open at once, each a file descriptor: one more is answered 503
and closed at once (over TLS, once its handshake is over, at most ``REQUEST_DEADLINE``).
Any local user could open 1,000 idle ones (no token needed to connect): they took every file
descriptor of a daemon under systemd (a soft ``LimitNOFILE`` of 1024), whose API then answered
nothing and whose runs could open no storage connection."""

REQUEST_DEADLINE = 30.0
"""Seconds a client has to send a request's line and headers (from connecting, or from the
previous answer on a kept-alive connection), then as many to send its body; a connection idle
that long between requests is closed too. A client that trickled, or sent nothing, held its
connection and a file descriptor for good."""

JsonObject = Mapping[str, object]
"""A JSON document the daemon hands the API (``web.json_response`` serialises it)."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RunView(Protocol):
    """A warm run as the API shows it."""

    @property
    def id(self) -> int:
        """The run's id (``/api/v1/runs/<id>``)."""
        ...

    @property
    def state(self) -> str:
        """queued, running, done or error."""
        ...

    def to_dict(self) -> dict[str, object]:
        """The run's JSON document."""
        ...


class ApiPorts(Protocol):
    """What the API needs from the daemon; errors are ``PrestagedError``s whose
    ``http_status`` is the answer's status."""

    @property
    def token(self) -> Optional[str]:
        """The bearer token mutating calls must present; None: none configured."""
        ...

    def readiness(self) -> list[str]:
        """Problems that make the daemon not ready (empty: ready)."""
        ...

    def submit(self, definition: str, catalog: Optional[str]) -> tuple[RunView, bool]:
        """Queue a warm of ``definition`` (catalog kind ``catalog``, None: the default), or
        join the run of it already queued or running: (the run, whether it was joined).
        ``BusyError`` when too many runs are queued or running."""
        ...

    def run(self, run_id: int) -> Optional[RunView]:
        """Run ``run_id``, or None when unknown."""
        ...

    async def datasets(self, name: Optional[str], catalog: Optional[str], *,
                       reasons: bool) -> list[JsonObject]:
        """Warmth of every recorded definition (``name`` None) or of the one named; with
        ``reasons`` False (no token where one is configured) without the last run's error,
        which may quote what a catalog or a storage answered (as ``GET /api/v1/runs``)."""
        ...

    async def members(self) -> list[JsonObject]:
        """The daemons registered in the state (``state.cluster.Member.to_dict``), alive or
        not by the ``[cluster] lease`` in force."""
        ...

    async def add_campaign(self, text: str, source: str, *, held: bool) -> tuple[str, bool]:
        """Store and run campaign file ``text``: (its name, whether it is new)."""
        ...

    async def campaign_action(self, name: str, action: str, *, stage: Optional[str],
                              submission: Optional[int], job_id: Optional[str]) -> str:
        """Apply an operator ``action``; the one-line account of what it did."""
        ...

    async def describe_campaign(self, name: str, *, output: bool) -> JsonObject:
        """``campaign show``'s document; ``output`` false leaves out commands' output."""
        ...

    async def forget_campaign(self, name: str) -> Mapping[str, int]:
        """Drop finished campaign ``name`` from the state: the rows dropped by kind."""
        ...

    async def campaign_summaries(self) -> list[JsonObject]:
        """``campaign list``'s rows."""
        ...

    def metrics_handler(self) -> Handler:
        """The handler of ``GET /metrics``."""
        ...


PORTS: web.AppKey[ApiPorts] = web.AppKey("ports", ApiPorts)


class _Gone(Exception):
    """The client closed its connection while we read its request."""


class _Refused(Exception):
    """An answer other than a ``PrestagedError``'s: 401/403 for authorisation, 408 for a body
    too slow to come."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal as ``{"error": ...}`` with the error's own status."""
    _first_request_came(request)
    try:
        return await handler(request)
    except _Refused as e:
        refusal = _error(e.status, str(e))
        if e.status == 408:  # the rest of a body that slow is not waited for on this connection
            refusal.force_close()
        return refusal
    except _Gone:  # nobody to answer; not an error of ours (no traceback in the log)
        log.debug("%s %s: the client went away mid-request", request.method, request.path)
        return web.Response(status=400)
    except BusyError as e:
        answer = _error(e.http_status, str(e))
        answer.headers["Retry-After"] = str(max(1, round(e.retry_after)))
        return answer
    except PrestagedError as e:
        body: dict[str, object] = {"error": str(e)}
        if e.http_status >= 500:  # the kind of failure, for the CLI's exit code (4xx say it)
            body["exit_code"] = e.exit_code
        return web.json_response(body, status=e.http_status)
    except web.HTTPException as e:
        # aiohttp's own refusals (no such path 404, method 405, a body over MAX_BODY 413) in
        # the same form; a redirect or success it raises is passed on as it is.
        if e.status < 400:
            raise
        answer = _error(e.status, e.reason if e.status != 413 else str(e.text or e.reason))
        if "Allow" in e.headers:
            answer.headers["Allow"] = e.headers["Allow"]
        return answer


# --- authorisation --------------------------------------------------------------------------

def _authorized(request: web.Request) -> bool:
    """Whether the request carries the bearer token (always, when none is configured). One
    ``Authorization`` header, scheme in any case (RFC 7235); two are refused (400), since
    which one counts would be a guess. Compared in constant time, as bytes: a header that is
    not UTF-8 (surrogate escapes) compares unequal instead of raising."""
    token = request.app[PORTS].token
    if token is None:
        return True
    headers = request.headers.getall("Authorization", [])
    if len(headers) > 1:
        raise _Refused(400, "more than one Authorization header")
    scheme, _, given = (headers[0] if headers else "").partition(" ")
    if scheme.lower() != "bearer":
        given = ""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                               token.encode("utf-8", "surrogateescape"))


def _authorized_quietly(request: web.Request) -> bool:
    """``_authorized`` for open routes, which only show more with the token: a malformed
    ``Authorization`` header there shows less, it is not refused."""
    try:
        return _authorized(request)
    except _Refused:
        return False


def _catalog(kind: Optional[str]) -> Optional[str]:
    """A catalog kind a caller gave: one of ``CATALOG_KINDS`` (400 otherwise, ``""`` too)."""
    if kind is not None and kind not in CATALOG_KINDS:
        raise ConfigError(f"catalog: expected one of {', '.join(CATALOG_KINDS)}, got "
                          f"'{printable(kind[:40])}'")
    return kind


def _require_token(request: web.Request) -> None:
    if not _authorized(request):
        raise _Refused(401, "missing or wrong bearer token")


def _require_campaign_token(request: web.Request) -> None:
    """Campaign changes run commands as the daemon's user: they always need the bearer token,
    so only who can read ``daemon.token_file`` may make them (not every local user)."""
    if request.app[PORTS].token is None:
        raise _Refused(403, "campaign changes need daemon.token_file (a 0600 file holding a "
                            "bearer token): a campaign runs commands as the daemon's user")
    _require_token(request)


# --- request bodies -------------------------------------------------------------------------

async def _json_object(request: web.Request) -> dict[str, object]:
    """The request body as a JSON object (an empty body is ``{}``); ``ConfigError`` otherwise."""
    if not request.can_read_body:
        return {}
    if request.content_type != "application/json":
        # A browser sends text/plain, a form or a blob without preflight (CORS "simple
        # requests"): any web page could POST a warm to a loopback daemon without a token.
        raise _Refused(415, "the request body must be JSON, sent as Content-Type: "
                            f"application/json (got {printable(request.content_type[:80])})")
    try:
        raw = await asyncio.wait_for(request.read(), REQUEST_DEADLINE)
    except asyncio.TimeoutError:
        raise _Refused(408, f"the request body did not come within {REQUEST_DEADLINE:g} s") \
            from None
    except web.HTTPException:
        raise  # 413: over MAX_BODY
    except (HttpProcessingError, RequestPayloadError) as e:  # a Content-Encoding that fails
        said = str(getattr(e, "message", "") or e).strip().splitlines()
        raise ConfigError(f"body cannot be read: {printable(said[-1] if said else '')}") \
            from None
    except (ConnectionError, ClientPayloadError) as e:  # the client went away mid-body
        raise _Gone from e
    try:
        body = json.loads(raw.decode(request.charset or "utf-8"))
    except (LookupError, ValueError):  # unknown charset, not UTF-8, not JSON, >4300 digits
        raise ConfigError("body is not JSON") from None
    except RecursionError:  # nested deeper than the parser's stack: bad input, not a 500
        raise ConfigError("body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ConfigError("body must be a JSON object")
    return body


def _encodable(text: str) -> bool:
    """Whether ``text`` is valid Unicode (JSON's ``"\\ud800"`` is a lone surrogate, which no
    file name, database or log can take)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _only(body: Mapping[str, object], keys: tuple[str, ...]) -> None:
    """``ConfigError`` naming the first key of ``body`` not among ``keys``: a misspelt key
    (``"defintion"``, ``"helds"``) is refused, never ignored."""
    unknown = sorted(k for k in body if k not in keys)
    if unknown:
        raise ConfigError(f"unknown key '{printable(unknown[0][:80])}' in the body: expected "
                          + ", ".join(keys))


def _query(request: web.Request, key: str) -> Optional[str]:
    """Query parameter ``key`` given at most once (400 for twice)."""
    values = request.query.getall(key, [])
    if len(values) > 1:
        raise ConfigError(f"query parameter {key} given {len(values)} times: give it once")
    return values[0] if values else None


T = TypeVar("T")


def _optional(body: Mapping[str, object], key: str, kind: type[T]) -> Optional[T]:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"{key}: expected {'a string' if kind is str else kind.__name__}, "
                          f"got {type(value).__name__}")
    return value


# --- handlers -------------------------------------------------------------------------------

async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: store open, credentials valid for longer than min_lifetime, not stopping."""
    problems = request.app[PORTS].readiness()
    if problems:
        return web.json_response({"status": "not ready", "problems": problems}, status=503)
    return web.json_response({"status": "ready"})


async def post_warm(request: web.Request) -> web.Response:
    """Queue a warm run: ``{"definition": str, "catalog": str (optional)}`` -> 202 + id."""
    _require_token(request)
    body = await _json_object(request)
    _only(body, ("definition", "catalog"))
    definition = body.get("definition")
    if not isinstance(definition, str) or not definition.strip():
        raise ConfigError('expected {"definition": "<name>", "catalog": "<kind>"}')
    if len(definition) > 1024 or not _encodable(definition):
        raise ConfigError("definition: expected a name of at most 1024 characters of valid "
                          f"text, got {printable(ascii(definition[:80]))}")
    catalog = _catalog(_optional(body, "catalog", str))
    info, merged = request.app[PORTS].submit(definition, catalog)
    return web.json_response({"id": info.id, "state": info.state, "merged": merged,
                              "href": f"/api/v1/runs/{info.id}"}, status=202)


async def get_run(request: web.Request) -> web.Response:
    """One run's state and live counts (operator data: the token when one is configured)."""
    _require_token(request)
    given = request.match_info["id"]
    # ASCII digits only: int() also takes " 1 ", "1_0" and other scripts' digits.
    if not re.fullmatch(r"[0-9]{1,18}", given):
        raise ConfigError(f"run id must be a whole number, got '{printable(given[:40])}'")
    run_id = int(given)
    info = request.app[PORTS].run(run_id)
    if info is None:
        return _error(404, f"no run {run_id}")
    return web.json_response(info.to_dict())


async def datasets(request: web.Request) -> web.Response:
    """Warmth of every recorded definition (as ``prestaged status --json``)."""
    rows = await request.app[PORTS].datasets(None, _catalog(_query(request, "catalog")),
                                             reasons=_authorized_quietly(request))
    return web.json_response({"definitions": rows})


async def dataset(request: web.Request) -> web.Response:
    """Warmth of one definition (``?catalog=`` narrows it)."""
    name = request.match_info["name"]
    rows = await request.app[PORTS].datasets(name, _catalog(_query(request, "catalog")),
                                             reasons=_authorized_quietly(request))
    if not rows:
        return _error(404, f"definition '{name}' has no record")
    return web.json_response(rows[0] if len(rows) == 1 else {"definitions": rows})


async def members(request: web.Request) -> web.Response:
    """The daemons sharing the state: ``{"members": [...]}``, each as in ``prestaged status
    --members --json``."""
    return web.json_response({"members": await request.app[PORTS].members()})


async def campaigns(request: web.Request) -> web.Response:
    """Every campaign: control, submissions by state, the daemon's task (``campaign list``)."""
    return web.json_response({"campaigns": await request.app[PORTS].campaign_summaries()})


async def post_campaign(request: web.Request) -> web.Response:
    """Add (or replace) a campaign: ``{"toml": <file text>, "source": <path>, "held": bool}``
    -> 201 added / 200 replaced, ``{"campaign": name}``; 400 names what is wrong in the file."""
    _require_campaign_token(request)
    body = await _json_object(request)
    text = _optional(body, "toml", str)
    if not text:
        raise ConfigError('expected {"toml": "<campaign file text>", "source": "<path>"}')
    _only(body, ("toml", "source", "held"))
    source = _optional(body, "source", str) or "<api>"
    if len(source) > 4096 or has_control(source):  # it is logged and listed
        raise ConfigError("source: expected the campaign file's path (at most 4096 characters, "
                          f"no control characters), got '{printable(source[:80])}'")
    held = bool(_optional(body, "held", bool))
    name, new = await request.app[PORTS].add_campaign(text, source, held=held)
    return web.json_response({"campaign": name, "added": new, "held": held,
                              "href": f"/api/v1/campaigns/{name}"}, status=201 if new else 200)


async def get_campaign(request: web.Request) -> web.Response:
    """One campaign: stages, controls, submissions with transitions and warmth; the submit
    commands' output only with the token when one is configured."""
    doc = await request.app[PORTS].describe_campaign(request.match_info["name"],
                                                     output=_authorized_quietly(request))
    return web.json_response(doc)


async def delete_campaign(request: web.Request) -> web.Response:
    """Forget a finished campaign (``campaign forget``) -> 200 ``{"campaign": name,
    "dropped": {kind: rows}}``; 404 unknown, 409 not finished (the answer says what is
    left)."""
    _require_campaign_token(request)
    name = request.match_info["name"]
    dropped = await request.app[PORTS].forget_campaign(name)
    return web.json_response({"campaign": name, "dropped": dict(dropped)})


async def campaign_action(request: web.Request) -> web.Response:
    """``hold``/``release``/``cancel`` (``{"stage": ...}`` optional), ``retry``
    (``{"submission": id}``) or ``mark-submitted`` (``{"submission": id, "job_id": ...}``)
    -> 200 ``{"result": <one line>}``."""
    _require_campaign_token(request)
    body = await _json_object(request)
    _only(body, ("stage", "submission", "job_id"))
    text = await request.app[PORTS].campaign_action(
        request.match_info["name"], request.match_info["action"],
        stage=_optional(body, "stage", str), submission=_optional(body, "submission", int),
        job_id=_optional(body, "job_id", str))
    return web.json_response({"result": text})


class _ClientFaults(logging.Filter):
    """aiohttp's server logs a request it could not parse (a bad header byte, an 8 KiB
    header) or a client gone mid-request at ERROR, with a traceback quoting the request's
    header line. Those are the client's doing: one WARNING line naming the fault, nothing
    quoted (the log formatter scrubs what gets through anyway)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (HttpProcessingError, RequestPayloadError, ConnectionError,
                            ClientPayloadError)):
            what = (getattr(exc, "message", "") or type(exc).__name__).strip()
            # Up to the bytes it quotes ("...when reading: b'Bearer T...'"), on one line.
            what = re.split(r"[\s:]*b['\"]", what.splitlines()[0] if what else "")[0]
            record.msg, record.args, record.exc_info, record.exc_text = (
                "API: refused a request: %s", (printable(what[:120]) or type(exc).__name__,),
                None, None)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def quiet_client_faults() -> None:
    """Install ``_ClientFaults`` on aiohttp's server logger (once)."""
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ClientFaults) for f in server.filters):
        server.addFilter(_ClientFaults())


# --- the listener ---------------------------------------------------------------------------

_SILENT: dict[int, asyncio.TimerHandle] = {}
"""Connections that have not sent a whole request yet (by ``id`` of their handler, which the
timer keeps alive), each with the timer that closes it ``REQUEST_DEADLINE`` after connecting.
aiohttp before 3.14 (all Python 3.9 has) closes no connection before its first request."""


def _first_request_came(request: web.Request) -> None:
    timer = _SILENT.pop(id(request.protocol), None)
    if timer is not None:
        timer.cancel()


def _close_silent(handler: web.RequestHandler, loop: asyncio.AbstractEventLoop,
                  late: bool = False) -> None:
    if _SILENT.pop(id(handler), None) is None:
        return
    if handler.transport is not None:
        log.debug("API: closed a connection that sent no request within %g s",
                  REQUEST_DEADLINE)
        handler.force_close()
    elif not late:
        # Still in its TLS handshake (the handler has no transport before it ends), which the
        # listener cuts off at this same deadline; one that ends between the two timers is
        # looked at once more, later, so that it cannot stay open without a deadline.
        _SILENT[id(handler)] = loop.call_later(REQUEST_DEADLINE, _close_silent, handler, loop,
                                               True)


class _TooMany(asyncio.Protocol):
    """A connection beyond ``MAX_CONNECTIONS``: answered 503 (in clear) and closed, so that it
    holds no file descriptor; what it sends is not read."""

    def __init__(self, in_clear: bool) -> None:
        self._in_clear = in_clear

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._in_clear and isinstance(transport, asyncio.WriteTransport):
            body = json.dumps({"error": f"the daemon has {MAX_CONNECTIONS} API connections "
                                        "open; try again later"}).encode()
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                            b"application/json\r\nRetry-After: 1\r\nConnection: close\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        transport.close()


class _Doors:
    """The listener's protocol factory: an aiohttp handler per connection while fewer than
    ``MAX_CONNECTIONS`` are open, a ``_TooMany`` beyond. Open are aiohttp's connections and
    those accepted that have not reached it yet: in clear that is a moment, over TLS the
    handshake (at most ``REQUEST_DEADLINE``; a TLS connection that gave up before counts
    until then)."""

    def __init__(self, server: web.Server, loop: asyncio.AbstractEventLoop,
                 in_clear: bool) -> None:
        self._server, self._loop, self._in_clear = server, loop, in_clear
        self._grace = 1.0 if in_clear else REQUEST_DEADLINE
        self._coming: dict[int, tuple[web.RequestHandler, float]] = {}  # by id of the handler
        self._full = False

    def open(self) -> int:
        """Connections open now (by the count above)."""
        now = self._loop.time()
        self._coming = {key: (h, made) for key, (h, made) in self._coming.items()
                        if h.transport is None and now - made < self._grace}
        return len(self._server.connections) + len(self._coming)

    def __call__(self) -> asyncio.BaseProtocol:
        if self.open() >= MAX_CONNECTIONS:
            if not self._full:  # once per episode: a flood must not flood the log too
                log.warning("API: %d connections open; refusing more until some close",
                            MAX_CONNECTIONS)
            self._full = True
            return _TooMany(self._in_clear)
        self._full = False
        handler = self._server()
        self._coming[id(handler)] = (handler, self._loop.time())
        _SILENT[id(handler)] = self._loop.call_later(REQUEST_DEADLINE, _close_silent, handler,
                                                     self._loop)
        return handler


async def serve(app: web.Application, host: str, port: int, *, shutdown_timeout: float,
                tls: Optional[ssl.SSLContext] = None,
                ) -> tuple[web.AppRunner, asyncio.AbstractServer]:
    """Serve ``app`` on ``host:port``, over TLS with ``tls`` (None: plain HTTP): its runner
    (``cleanup()`` it) and its listener (close it first). A connection that sends no whole
    request within ``REQUEST_DEADLINE`` of connecting is closed, a TLS handshake not done by
    then too, and so is a kept-alive one idle or trickling that long (aiohttp's
    ``keepalive_timeout``); beyond ``MAX_CONNECTIONS`` open, a new one is closed at once.
    ``OSError`` if the address cannot be had."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout,
                           keepalive_timeout=REQUEST_DEADLINE)
    await runner.setup()
    loop = asyncio.get_running_loop()
    server = runner.server
    assert server is not None

    connection = _Doors(server, loop, in_clear=tls is None)
    try:
        if tls is None:
            listener = await loop.create_server(connection, host, port, reuse_address=True)
        else:  # asyncio's default handshake timeout is 60 s
            listener = await loop.create_server(connection, host, port, reuse_address=True,
                                                ssl=tls, ssl_handshake_timeout=REQUEST_DEADLINE)
    except OSError:
        await runner.cleanup()
        raise
    return runner, listener


def _host_name(request: web.Request) -> str:
    """The name (or address) in the request's ``Host`` header, lower case, without its port
    or a final dot."""
    host = request.headers.get("Host", "").strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0].rstrip(".") if ":" in host else host.rstrip(".")


def _local_host(name: str, names: Collection[str]) -> bool:
    """Whether ``name`` is an IP address, ``localhost`` (or under it) or among ``names``."""
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return name == "localhost" or name.endswith(".localhost") or name in names


def _hosts_checked(names: Collection[str]) -> Middleware:
    """Middleware refusing (421) a request whose ``Host`` is not ``_local_host``: DNS
    rebinding. A web page of evil.example whose name is then made to resolve to 127.0.0.1
    reaches a loopback daemon from the user's browser as its own origin, and reads what it
    answers (runs, campaigns' output when there is no token) or requests warms."""
    wanted = frozenset(n.lower().rstrip(".") for n in names)

    @web.middleware
    async def hosts_checked(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not _local_host(_host_name(request), wanted):
            raise _Refused(421, "the Host header names neither this host nor an address: "
                                f"ask for http://{request.app[LISTEN]}")
        return await handler(request)
    return hosts_checked


LISTEN: web.AppKey[str] = web.AppKey("listen", str)


def build_app(ports: ApiPorts, *, listen: str = "", hosts: Optional[Collection[str]] = None,
              ) -> web.Application:
    """The aiohttp application serving ``ports`` at ``listen`` (``host:port``, for messages).
    With ``hosts`` (served in clear, on loopback) a request's ``Host`` must be an IP address,
    ``localhost`` or one of ``hosts`` (421 otherwise); None: not checked (over TLS a browser
    led to the daemon under another name refuses its certificate)."""
    # Request bodies are small JSON documents (a campaign file is a few KiB): a larger one is
    # refused with 413 before it is read.
    middlewares: list[Middleware] = [_errors]
    if hosts is not None:
        middlewares.append(_hosts_checked(hosts))
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY)
    app[LISTEN] = listen
    quiet_client_faults()
    app[PORTS] = ports
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", ports.metrics_handler())
    app.router.add_post("/api/v1/warm", post_warm)
    app.router.add_get("/api/v1/runs/{id}", get_run)
    app.router.add_get("/api/v1/datasets", datasets)
    app.router.add_get("/api/v1/datasets/{name:.+}", dataset)
    app.router.add_get("/api/v1/members", members)
    app.router.add_get("/api/v1/campaigns", campaigns)
    app.router.add_post("/api/v1/campaigns", post_campaign)
    app.router.add_get("/api/v1/campaigns/{name}", get_campaign)
    app.router.add_delete("/api/v1/campaigns/{name}", delete_campaign)
    app.router.add_post("/api/v1/campaigns/{name}/{action}", campaign_action)
    return app
