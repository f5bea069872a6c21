"""The emulated dCache frontend: WLCG Tape REST API v1 and the namespace locality resource.

Behaviour follows dCache's implementation (see ../shared/reference/tape-rest.md): 201 with
``Location`` and ``requestId``; file states SUBMITTED, STARTED, COMPLETED, FAILED, CANCELLED;
timestamps in milliseconds; RFC 7807 problem JSON; 429 (checked first) and 413 limits; at most
10,000 archiveinfo answers; trailing slashes on ``/stage/`` and ``/archiveinfo/`` accepted.
``/release/{id}`` always answers 200 (dCache sends a fire-and-forget RELEASE bulk request, even
for an id it does not know); releasing a target still staging aborts its pin, as dCache's pin
manager does: the recall goes on, then the target fails "Operation was aborted", unpinned.

With tokens (``DCacheAuth`` with a ``BearerCheck``; activities in ``auth``) the login comes
first: a token that does not verify, or no credential at all, is 401 before any handler. Then,
as dCache: a stage request is accepted from any login, and each tape-only file whose path the
token does not grant ``STAGE`` fails with PoolManager's "File not online. Staging not allowed."
(a file already on disk is pinned: that needs no recall); ``archiveinfo`` answers "Permission
denied" for each path without ``READ_METADATA``; the namespace resource is 403 without it. Our
choice where dCache compares the caller with the request's owner: polling needs
``READ_METADATA`` on every path of the request, cancel, delete and release ``STAGE``; else 403.

Paths go by dCache's ``FsPath`` (``model.fs_path``): a stage request keeps its targets so and a
poll lists them so (``/a//b/./c`` is listed ``/a/b/c``); ``archiveinfo`` resolves a path so
but echoes it as sent; a cancel names paths as the request lists them (any other spelling is
"not in request", 400); the namespace resolves any spelling.

A test may hold the answers of stage POSTs back (``hold_stage_answers``, until
``release_stage_answers``): each request is made at once, and its answer waits, as dCache's
bulk service, when it is slow, makes the request before the frontend answers. A client stopped
meanwhile has left a request on the server that only the answer names.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Optional

from aiohttp import web

from prestaged.testing.authz import AuthErrorLimiter
from prestaged.testing.dcache.auth import (
    READ_METADATA,
    STAGE,
    DCacheAuth,
    Login,
    limited,
    limiter_for,
)
from prestaged.testing.dcache.core import DCacheCore
from prestaged.testing.dcache.faults import Faults, PathErrors
from prestaged.testing.dcache.model import ARCHIVEINFO_LIMIT, DEFAULT_PIN, Replica, fs_path

__all__ = ["TAPE_API", "StageRequest", "TapeFrontend", "frontend_app"]

TAPE_API = "/api/v1/tape"
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")
_DURATION = re.compile(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?\Z")


def _ms(t: Optional[float]) -> Optional[int]:
    return None if t is None else int(t * 1000)


NO_STAGING = "File not online. Staging not allowed."
PERMISSION_DENIED = "Permission denied"
ABORTED = "Operation was aborted"
"""A target whose pin was released while it was being staged (dCache's PinRequestProcessor
finds its pin no longer PINNING)."""


@dataclass
class _File:
    path: str
    may_stage: bool = True
    state: str = "SUBMITTED"
    error: Optional[str] = None
    started: Optional[float] = None
    finished: Optional[float] = None
    released: bool = False
    """Released before it was pinned: its pin is aborted (see ``TapeFrontend.release``)."""

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"path": self.path, "state": self.state}
        if self.error is not None:
            doc["error"] = self.error
        for key, t in (("startedAt", self.started), ("finishedAt", self.finished)):
            if t is not None:
                doc[key] = _ms(t)
        return doc


@dataclass
class StageRequest:
    """One stage request: ``files`` by path, pin ``lifetime`` in seconds, owner ``user``."""

    id: str
    user: str
    lifetime: float
    files: dict[str, _File]
    created: float = field(default_factory=time.time)
    started: Optional[float] = None

    @property
    def finished(self) -> bool:
        """True once every file is COMPLETED, FAILED or CANCELLED."""
        return all(f.state in TERMINAL for f in self.files.values())

    def to_json(self) -> dict[str, Any]:
        """The ``GET /stage/{id}`` document."""
        doc: dict[str, Any] = {"id": self.id, "createdAt": _ms(self.created),
                               "files": [f.to_json() for f in self.files.values()]}
        if self.started is not None:
            doc["startedAt"] = _ms(self.started)
        if self.finished:
            doc["completedAt"] = _ms(max((f.finished or self.created)
                                         for f in self.files.values()))
        return doc


def problem(status: int, detail: str) -> web.Response:
    """An RFC 7807 answer the way dCache writes it (``status`` as a string)."""
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": str(status),
            "detail": detail}
    return web.json_response(body, status=status, content_type="application/problem+json")


def parse_lifetime(text: Any) -> float:
    """Seconds of an ISO 8601 ``diskLifetime`` such as ``PT24H`` or ``P2D``; ValueError else."""
    m = _DURATION.match(text) if isinstance(text, str) else None
    if m is None or not any(m.groups()):
        raise ValueError(f"invalid diskLifetime {text!r}")
    d, h, mi, s = (int(g or 0) for g in m.groups())
    return float(((d * 24 + h) * 60 + mi) * 60 + s)


async def _body(request: web.Request, key: str) -> list[Any]:
    """The list under ``key`` of a JSON object body; web.HTTPBadRequest (as problem) if not."""
    try:
        doc = json.loads(await request.read())
    except ValueError:
        raise _Problem(400, "Request body is not valid JSON") from None
    items = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise _Problem(400, f"Request body has no \"{key}\" list")
    return items


class _Problem(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class TapeFrontend:
    """Handlers of the frontend; requests are kept in memory for the emulator's life."""

    def __init__(self, core: DCacheCore, auth: Optional[DCacheAuth] = None,
                 limiter: Optional[AuthErrorLimiter] = None,
                 faults: Optional[Faults] = None) -> None:
        self.core = self._core = core
        self.faults = faults or Faults()
        """Passing failures a test sets (``faults``)."""
        self.path_errors = PathErrors()
        """Per-path archiveinfo errors a test sets (``faults``)."""
        self.auth = auth or DCacheAuth(None, core.stats)
        cfg = core.config
        self.limiter = limiter or limiter_for(cfg)
        self.requests: dict[str, StageRequest] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._logins: dict[int, Login] = {}  # id(request) -> its login, while it is handled
        self._hold: Optional[asyncio.Event] = None  # set: held stage answers are sent
        self.held = 0
        """Stage answers held back now (their requests made: see the module)."""

    def hold_stage_answers(self) -> None:
        """From now on, make each stage request at once and hold its answer back until
        ``release_stage_answers`` (on the emulator's loop)."""
        if self._hold is None or self._hold.is_set():
            self._hold = asyncio.Event()

    def release_stage_answers(self) -> None:
        """Send the held stage answers, and answer at once from now on."""
        if self._hold is not None:
            self._hold.set()
            self._hold = None

    def _login(self, request: web.Request) -> Login:
        return self._logins[id(request)]

    def _require(self, request: web.Request, verbs: tuple[str, ...], paths: Iterable[str]
                 ) -> None:
        """403 (problem JSON, counted) unless the login may do ``verbs`` on every path."""
        login = self._login(request)
        if not all(login.allows(verbs, p) for p in paths):
            self.auth.count("frontend", 403)
            raise _Problem(403, PERMISSION_DENIED)

    def _count(self, kind: str, paths: int = 0) -> None:
        self._core.stats.requests[f"frontend:{kind}"] += 1
        self._core.stats.max_paths = max(self._core.stats.max_paths, paths)

    # stage

    async def stage(self, request: web.Request) -> web.StreamResponse:
        files = await _body(request, "files")
        self._count("stage", len(files))
        login = self._login(request)
        user = login.user
        stagers = self._core.config.stagers
        if stagers is not None and login.claims is None and \
                not any(f"'{cn}')" in user for cn in stagers):
            raise _Problem(403, "Permission denied: staging is not allowed for this user")
        unfinished = sum(1 for r in self.requests.values() if r.user == user and not r.finished)
        if unfinished >= self._core.config.max_requests:
            raise _Problem(429, f"User has {unfinished} unfinished requests; "
                                f"the limit is {self._core.config.max_requests}")
        if len(files) > self._core.config.max_targets:
            raise _Problem(413, f"Request has {len(files)} targets; at most "
                                f"{self._core.config.max_targets} are allowed")
        paths, lifetime = self._stage_targets(files)
        req = StageRequest(uuid.uuid4().hex, user, lifetime,
                           {p: _File(p, login.allows(STAGE, p)) for p in paths})
        self.requests[req.id] = req
        task = asyncio.create_task(self._run(req))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        hold = self._hold
        if hold is not None:  # a test's slow bulk service: made, not answered yet
            self.held += 1
            try:
                await hold.wait()
            finally:
                self.held -= 1
        location = f"{request.url.origin()}{TAPE_API}/stage/{req.id}"
        return web.json_response({"requestId": req.id}, status=201,
                                 headers={"Location": location})

    @staticmethod
    def _stage_targets(files: list[Any]) -> tuple[list[str], float]:
        paths: list[str] = []
        lifetime = DEFAULT_PIN
        for item in files:
            if not isinstance(item, dict) or not isinstance(item.get("path"), str):
                raise _Problem(400, "Each file needs a \"path\"")
            paths.append(fs_path(item["path"]))  # stored resolved, as JdbcRequestTargetDao
            if "diskLifetime" in item:
                try:
                    lifetime = parse_lifetime(item["diskLifetime"])
                except ValueError as e:
                    raise _Problem(400, str(e)) from None
        return paths, lifetime

    async def _run(self, req: StageRequest) -> None:
        await asyncio.sleep(0)  # a poll right after the POST sees SUBMITTED, as on dCache
        req.started = time.time()
        await asyncio.gather(*(self._stage_file(req, f) for f in list(req.files.values())))

    async def _stage_file(self, req: StageRequest, f: _File) -> None:
        if f.state != "SUBMITTED":
            return
        f.state, f.started = "STARTED", time.time()
        replica = self._core.file(f.path)
        error = self._refusal(replica)
        if error is None and replica is not None and not replica.on_disk:
            error = await self._core.recall(replica) if f.may_stage else NO_STAGING
        if f.state == "CANCELLED":
            return
        if error is None and f.released:
            error = ABORTED  # the recall went on: the file is on disk, unpinned
        if error is None and replica is not None and replica.on_disk:
            replica.pins[req.id] = time.time() + req.lifetime
            f.state = "COMPLETED"
        else:
            f.state, f.error = "FAILED", error or "File was evicted before it could be pinned"
        f.finished = time.time()
        self._core.changed()

    @staticmethod
    def _refusal(replica: Optional[Replica]) -> Optional[str]:
        if replica is None:
            return "No such file or directory"
        if replica.tape is None:
            return "Cannot stage DISK only files"
        if not replica.readable:
            return "File is unavailable"
        return None

    def _request(self, request: web.Request) -> StageRequest:
        req = self.requests.get(request.match_info["id"])
        if req is None:
            raise _Problem(404, f"Stage request {request.match_info['id']} not found")
        return req

    async def poll(self, request: web.Request) -> web.StreamResponse:
        self._count("poll")
        req = self._request(request)
        self._require(request, READ_METADATA, req.files)
        return web.json_response(req.to_json())

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        req = self._request(request)
        self._require(request, STAGE, req.files)
        paths = await _body(request, "paths")
        self._count("cancel", len(paths))
        unknown = [p for p in paths if p not in req.files]
        if unknown:
            # dCache puts this message in a header and sends no body.
            return web.Response(status=400, headers={"X-Error": f"{unknown[0]} not in request"})
        for f in (req.files.values() if not paths else (req.files[p] for p in paths)):
            if f.state not in TERMINAL:
                f.state, f.finished = "CANCELLED", time.time()
        self._core.changed()
        return web.Response(status=200)

    async def delete(self, request: web.Request) -> web.StreamResponse:
        self._count("delete")
        req = self._request(request)
        self._require(request, STAGE, req.files)
        for f in req.files.values():
            if f.state not in TERMINAL:
                f.state, f.finished = "CANCELLED", time.time()
        del self.requests[req.id]
        return web.Response(status=200)

    async def release(self, request: web.Request) -> web.StreamResponse:
        """As dCache: a fire-and-forget RELEASE bulk request, so always 200 (an unknown id,
        or a path not in the request, releases nothing). The pin of a target still staging is
        aborted: the target fails "Operation was aborted" once its recall ends, unpinned."""
        paths = await _body(request, "paths")
        self._count("release", len(paths))
        req = self.requests.get(request.match_info["id"])
        if req is None:
            return web.Response(status=200)
        self._require(request, STAGE, req.files)
        for path in paths:
            f = req.files.get(path)
            if f is None:
                continue
            if f.state not in TERMINAL:
                f.released = True
            replica = self._core.files.get(path)
            if replica is not None:
                replica.pins.pop(req.id, None)
        self._core.changed()
        return web.Response(status=200)

    # locality

    async def archiveinfo(self, request: web.Request) -> web.StreamResponse:
        paths = await _body(request, "paths")
        self._count("archiveinfo", len(paths))
        # dCache does not refuse more: it silently answers the first 10,000 distinct paths.
        distinct = list(dict.fromkeys(p for p in paths if isinstance(p, str)))[:ARCHIVEINFO_LIMIT]
        login = self._login(request)
        answer: list[dict[str, str]] = []
        for path in distinct:
            replica = self._core.file(path)
            error = self.path_errors.take(fs_path(path))
            if error is not None:
                answer.append({"path": path, "error": error})
            elif not login.allows(READ_METADATA, fs_path(path)):
                answer.append({"path": path, "error": PERMISSION_DENIED})
            elif replica is None:
                answer.append({"path": path, "error": "No such file or directory"})
            else:
                answer.append({"path": path, "locality": replica.archive_locality})
        return web.json_response(answer)

    async def namespace(self, request: web.Request) -> web.StreamResponse:
        self._count("namespace")
        path = fs_path(request.match_info["path"])
        self._require(request, READ_METADATA, (path,))
        replica = self._core.file(path)
        if replica is not None:
            doc: dict[str, Any] = {"fileType": "REGULAR", "size": replica.size,
                                   "mtime": _ms(replica.atime)}
            if request.query.get("locality") == "true":
                doc["fileLocality"] = replica.file_locality
            return web.json_response(doc)
        if any(p.startswith(path.rstrip("/") + "/") for p in self._core.files):
            doc = {"fileType": "DIR"}
            if request.query.get("locality") == "true":
                doc["fileLocality"] = "NONE"
            return web.json_response(doc)
        raise _Problem(404, f"Path {path} does not exist")


_FRONTEND = web.AppKey("frontend", TapeFrontend)


@web.middleware
async def _gate(request: web.Request, handler: Any) -> web.StreamResponse:
    """Record the call; then dCache's client blocking and the login, before any handler."""
    frontend = request.app[_FRONTEND]
    stats = frontend.core.stats
    stats.frontend_calls.append(f"{request.method} {request.path}")
    # A test's passing failure: before the request is handled, or after (its answer lost).
    fault = frontend.faults.take(getattr(request.match_info.handler, "__name__", ""))
    if fault is not None and not fault.after:
        return Faults.answer(request, fault)

    async def login_then(request: web.Request) -> web.StreamResponse:
        login = frontend.auth.login(request, "frontend")
        if isinstance(login, web.Response):
            return login
        frontend._logins[id(request)] = login
        try:
            response: web.StreamResponse = await handler(request)
        finally:
            del frontend._logins[id(request)]
        return response

    answer = await limited(frontend.limiter, stats, "frontend", request, login_then)
    return answer if fault is None else Faults.answer(request, fault)


@web.middleware
async def _problems(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except _Problem as e:
        return problem(e.status, e.detail)
    return response


def frontend_app(frontend: TapeFrontend) -> web.Application:
    """The aiohttp application serving ``frontend`` under /api/v1."""
    app = web.Application(middlewares=[_gate, _problems])
    app[_FRONTEND] = frontend
    r = app.router
    for suffix in ("", "/"):
        r.add_post(f"{TAPE_API}/stage{suffix}", frontend.stage)
        r.add_post(f"{TAPE_API}/archiveinfo{suffix}", frontend.archiveinfo)
    r.add_get(TAPE_API + "/stage/{id}", frontend.poll)
    r.add_post(TAPE_API + "/stage/{id}/cancel", frontend.cancel)
    r.add_delete(TAPE_API + "/stage/{id}", frontend.delete)
    r.add_post(TAPE_API + "/release/{id}", frontend.release)
    r.add_get("/api/v1/namespace/{path:.*}", frontend.namespace)
    return app
