"""The daemon's HTTP API (aiohttp): health, readiness, metrics, warm requests, dataset warmth.

``GET /healthz`` liveness; ``GET /readyz`` 200 when the store is open and the proxy has more
than ``credentials.min_lifetime`` left, else 503 with the reasons; ``GET /metrics`` Prometheus;
``POST /api/v1/warm`` ``{"definition": ..., "catalog": ...}`` -> 202 ``{"id": ...}``;
``GET /api/v1/runs/<id>``; ``GET /api/v1/datasets`` and ``/api/v1/datasets/<name>``;
campaigns (``daemon_campaigns``): ``GET|POST /api/v1/campaigns``, ``GET
/api/v1/campaigns/<name>``, ``POST /api/v1/campaigns/<name>/<action>`` (``ACTIONS``).
Errors are JSON ``{"error": "..."}`` with a 4xx status, never a 500 for bad input. Mutating
calls need ``Authorization: Bearer <token>`` whenever the daemon has a token (it must have one
when it listens beyond loopback); campaign changes need it always (403 without a token file),
since a campaign runs commands as the daemon's user.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import TYPE_CHECKING, Any, Optional

from aiohttp import web

from prestaged.errors import CatalogError, ConfigError, PrestagedError, StateError

if TYPE_CHECKING:
    from prestaged.service.daemon import Daemon

__all__ = ["build_app"]

DAEMON: web.AppKey[Daemon] = web.AppKey("daemon")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: store open, credentials valid for longer than min_lifetime, not stopping."""
    problems = request.app[DAEMON].readiness()
    if problems:
        return web.json_response({"status": "not ready", "problems": problems}, status=503)
    return web.json_response({"status": "ready"})


def _authorized(request: web.Request) -> bool:
    token = request.app[DAEMON].token
    if token is None:
        return True
    given = request.headers.get("Authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


async def post_warm(request: web.Request) -> web.Response:
    """Queue a warm run: ``{"definition": str, "catalog": str (optional)}`` -> 202 + id."""
    if not _authorized(request):
        return _error(401, "missing or wrong bearer token")
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error(400, "body is not JSON")
    if not isinstance(body, dict) or not isinstance(body.get("definition"), str) \
            or not body["definition"].strip():
        return _error(400, 'expected {"definition": "<name>", "catalog": "<kind>"}')
    catalog = body.get("catalog")
    if catalog is not None and not isinstance(catalog, str):
        return _error(400, "catalog: expected a string")
    try:
        info = request.app[DAEMON].submit(body["definition"], catalog)
    except CatalogError as e:
        return _error(404, str(e))
    except ConfigError as e:
        return _error(400, str(e))
    except PrestagedError as e:
        return _error(503, str(e))
    return web.json_response({"id": info.id, "state": info.state,
                              "href": f"/api/v1/runs/{info.id}"}, status=202)


async def get_run(request: web.Request) -> web.Response:
    """One run's state and live counts."""
    try:
        run_id = int(request.match_info["id"])
    except ValueError:
        return _error(400, "run id must be an integer")
    info = request.app[DAEMON].runs.get(run_id)
    if info is None:
        return _error(404, f"no run {run_id}")
    return web.json_response(info.to_dict())


async def _status(request: web.Request, name: Any) -> list[dict[str, Any]]:
    daemon = request.app[DAEMON]
    store = daemon.store
    assert store is not None
    rows = await asyncio.to_thread(store.status, daemon.cfg.state.fresh_for, name,
                                   request.query.get("catalog"))
    return [r.to_dict() for r in rows]


async def datasets(request: web.Request) -> web.Response:
    """Warmth of every recorded definition (as ``prestaged status --json``)."""
    return web.json_response({"definitions": await _status(request, None)})


async def dataset(request: web.Request) -> web.Response:
    """Warmth of one definition (``?catalog=`` narrows it)."""
    name = request.match_info["name"]
    rows = await _status(request, name)
    if not rows:
        return _error(404, f"definition '{name}' has no record")
    return web.json_response(rows[0] if len(rows) == 1 else {"definitions": rows})


def _failure(e: PrestagedError) -> web.Response:
    """The HTTP answer to a refused request: 404 unknown, 409 refused transition, 400 bad
    input, 503 anything else (the daemon is stopping...)."""
    if isinstance(e, CatalogError):
        return _error(404, str(e))
    if isinstance(e, StateError):
        return _error(409, str(e))
    if isinstance(e, ConfigError):
        return _error(400, str(e))
    return _error(503, str(e))


async def _json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object (an empty body is ``{}``); ``ConfigError`` otherwise."""
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError("body is not JSON") from None
    if not isinstance(body, dict):
        raise ConfigError("body must be a JSON object")
    return body


def _optional(body: dict[str, Any], key: str, kind: type) -> Any:
    value = body.get(key)
    wrong_type = value is not None and not isinstance(value, kind)
    if wrong_type or (isinstance(value, bool) and kind is not bool):  # bool is an int
        raise ConfigError(f"{key}: expected {'a string' if kind is str else kind.__name__}")
    return value


def _campaign_refusal(request: web.Request) -> Optional[web.Response]:
    """Campaign changes run commands as the daemon's user: they always need the bearer token,
    so only who can read ``daemon.token_file`` may make them (not every local user)."""
    if request.app[DAEMON].token is None:
        return _error(403, "campaign changes need daemon.token_file (a 0600 file holding a "
                           "bearer token): a campaign runs commands as the daemon's user")
    if not _authorized(request):
        return _error(401, "missing or wrong bearer token")
    return None


async def campaigns(request: web.Request) -> web.Response:
    """Every campaign: control, submissions by state, the daemon's task (``campaign list``)."""
    daemon = request.app[DAEMON]
    docs = await asyncio.to_thread(daemon.campaigns.summaries)
    return web.json_response({"campaigns": docs})


async def post_campaign(request: web.Request) -> web.Response:
    """Add (or replace) a campaign: ``{"toml": <file text>, "source": <path>, "held": bool}``
    -> 201 added / 200 replaced, ``{"campaign": name}``; 400 names what is wrong in the file."""
    refused = _campaign_refusal(request)
    if refused is not None:
        return refused
    try:
        body = await _json_object(request)
        text = _optional(body, "toml", str)
        if not text:
            raise ConfigError('expected {"toml": "<campaign file text>", "source": "<path>"}')
        source = _optional(body, "source", str) or "<api>"
        held = bool(_optional(body, "held", bool))
        campaign, new = request.app[DAEMON].campaigns.add(text, source, held=held)
    except PrestagedError as e:
        return _failure(e)
    return web.json_response({"campaign": campaign.name, "added": new, "held": held,
                              "href": f"/api/v1/campaigns/{campaign.name}"},
                             status=201 if new else 200)


async def get_campaign(request: web.Request) -> web.Response:
    """One campaign: stages, controls, submissions with transitions and warmth."""
    daemon = request.app[DAEMON]
    try:
        doc = await asyncio.to_thread(daemon.campaigns.describe, request.match_info["name"])
    except PrestagedError as e:
        return _failure(e)
    return web.json_response(doc)


async def campaign_action(request: web.Request) -> web.Response:
    """``hold``/``release``/``cancel`` (``{"stage": ...}`` optional), ``retry``
    (``{"submission": id}``) or ``mark-submitted`` (``{"submission": id, "job_id": ...}``)
    -> 200 ``{"result": <one line>}``."""
    refused = _campaign_refusal(request)
    if refused is not None:
        return refused
    try:
        body = await _json_object(request)
        text = request.app[DAEMON].campaigns.act(
            request.match_info["name"], request.match_info["action"],
            stage=_optional(body, "stage", str), submission=_optional(body, "submission", int),
            job_id=_optional(body, "job_id", str))
    except PrestagedError as e:
        return _failure(e)
    return web.json_response({"result": text})


def build_app(daemon: Daemon) -> web.Application:
    """The aiohttp application serving ``daemon``."""
    app = web.Application()
    app[DAEMON] = daemon
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", daemon.metrics.aiohttp_handler())
    app.router.add_post("/api/v1/warm", post_warm)
    app.router.add_get("/api/v1/runs/{id}", get_run)
    app.router.add_get("/api/v1/datasets", datasets)
    app.router.add_get("/api/v1/datasets/{name:.+}", dataset)
    app.router.add_get("/api/v1/campaigns", campaigns)
    app.router.add_post("/api/v1/campaigns", post_campaign)
    app.router.add_get("/api/v1/campaigns/{name}", get_campaign)
    app.router.add_post("/api/v1/campaigns/{name}/{action}", campaign_action)
    return app
