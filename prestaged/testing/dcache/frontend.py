"""The emulated dCache frontend: WLCG Tape REST API v1 and the namespace locality resource.

Behaviour follows dCache's implementation (``modules/dcache-frontend`` ``restful/resources/tape``
and ``modules/dcache-bulk``; /tmp/tapefid/REPORT.md lists what was checked): 201 with
``Location`` (the URL posted to + ``/`` + a UUID) and ``requestId``; a body of exactly one
non-empty ``files`` list; ``diskLifetime`` per file, read as ``java.time.Duration``; file states
SUBMITTED, STARTED, COMPLETED, FAILED, CANCELLED; timestamps in milliseconds, ``startedAt``
always given; errors as ``ErrorResponseProvider`` writes them (``status``, ``title``,
``detail``; 403/413/429 say only their reason phrase); 429 (checked first) and 413 limits, for
stage and for release alike; at most 10,000 archiveinfo paths read; trailing slashes on
``/stage/`` and ``/archiveinfo/`` accepted; the discovery document on the frontend as on the
door. ``/release/{id}`` answers 200 once the bulk service took it (a fire-and-forget RELEASE
request, even for an id it does not know); releasing a target still staging aborts its pin, as
dCache's pin manager does: the recall goes on, then the target fails "Operation was aborted",
unpinned.

Who may act on a stage request (poll, cancel, delete), as ``BulkService`` decides: its owner
(the same user: a token's subject, or a certificate's subject without proxy ``CN``s), with a
token no broader than the one that made it (``checkRestrictions``: each scope of the caller's
within one of the original's); else 403. With tokens (``DCacheAuth`` with a ``BearerCheck``;
activities in ``auth``) the login comes first: a token that does not verify, or no credential
at all, is 401 before any handler. Then a stage request is accepted from any login, and each
tape-only file whose path the token does not grant ``STAGE`` fails with PoolManager's "File not
online. Staging not allowed." (a file already on disk is pinned: that needs no recall);
``archiveinfo`` answers "Permission denied" for each path without ``READ_METADATA``; the
namespace resource is 403 without it.

Paths go by dCache's ``FsPath`` (``model.fs_path``): a stage request keeps its targets so and a
poll lists them so (``/a//b/./c`` is listed ``/a/b/c``); ``archiveinfo`` resolves a path so
but echoes it as sent; a cancel resolves the paths it names (``BulkService.validateTargets``);
the namespace resolves any spelling.

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
    Grants,
    Login,
    limited,
    limiter_for,
    subsumed,
)
from prestaged.testing.dcache.core import DCacheCore
from prestaged.testing.dcache.faults import Faults, PathErrors
from prestaged.testing.dcache.model import ARCHIVEINFO_LIMIT, DEFAULT_PIN, Replica, fs_path

__all__ = ["TAPE_API", "StageRequest", "TapeFrontend", "frontend_app"]

TAPE_API = "/api/v1/tape"
DISCOVERY = "/.well-known/wlcg-tape-rest-api"
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")
_DURATION = re.compile(r"([-+]?)P(?:([-+]?[0-9]+)D)?(T(?:([-+]?[0-9]+)H)?(?:([-+]?[0-9]+)M)?"
                       r"(?:([-+]?[0-9]+)(?:[.,]([0-9]{0,9}))?S)?)?", re.IGNORECASE)
"""``java.time.Duration.parse``'s pattern, which dCache's ``TimeUtils.validateDuration`` uses
for ``diskLifetime``: ``PT24H``, ``P2D``, ``pt1.5s``, ``-PT1H``; not ``P1DT``, ``P1W``, ``PT``."""


def _ms(t: Optional[float]) -> Optional[int]:
    return None if t is None else int(t * 1000)


NO_STAGING = "File not online. Staging not allowed."
PERMISSION_DENIED = "Permission denied"
NO_SUCH_FILE = "No such file or directory"
"""Chimera's ``FileNotFoundCacheException`` text; dCache follows it with ``: <path>``."""
NOT_A_FILE = "Not a regular file."
"""``PinManagerActivity.checkPinnable``: a stage target that is a directory fails so."""
ABORTED = "Operation was aborted"
"""A target whose pin was released while it was being staged (dCache's PinRequestProcessor
finds its pin no longer PINNING)."""


@dataclass
class _File:
    path: str
    may_stage: bool = True
    lifetime: float = DEFAULT_PIN
    """Seconds its pin lasts: its own ``diskLifetime``, else dCache's default (2 days)."""
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
        # StagedFileInfo: a target that ended without starting shows startedAt = finishedAt.
        started = self.started if self.started is not None else self.finished
        for key, t in (("startedAt", started), ("finishedAt", self.finished)):
            if t is not None:
                doc[key] = _ms(t)
        return doc


@dataclass
class StageRequest:
    """One stage request: ``files`` by path (each with its pin lifetime), owner ``user``, and
    ``grants`` the restriction of the login that made it (None: unrestricted, a certificate)."""

    id: str
    user: str
    files: dict[str, _File]
    grants: Optional[Grants] = None
    created: float = field(default_factory=time.time)
    started: Optional[float] = None
    _done: bool = field(default=False, init=False, repr=False, compare=False)

    @property
    def finished(self) -> bool:
        """True once every file is COMPLETED, FAILED or CANCELLED. Remembered once true (a
        file never leaves those states): every bulk POST counts the user's unfinished
        requests, and looking at every file of every finished request each time made a
        200,000-file stage and release quadratic in the emulator."""
        if not self._done:
            self._done = all(f.state in TERMINAL for f in self.files.values())
        return self._done

    def to_json(self) -> dict[str, Any]:
        """The ``GET /stage/{id}`` document."""
        # StageRequestInfo: startedAt is createdAt until the bulk service started the request.
        doc: dict[str, Any] = {"id": self.id, "createdAt": _ms(self.created),
                               "startedAt": _ms(self.started or self.created),
                               "files": [f.to_json() for f in self.files.values()]}
        if self.finished:
            doc["completedAt"] = _ms(max((f.finished or self.created)
                                         for f in self.files.values()))
        return doc


_REASONS = {403: "Forbidden", 413: "Request Entity Too Large", 429: "Too Many Requests"}
"""JAX-RS reason phrases of the statuses dCache's frontend answers through a bare
``WebApplicationException`` (``ForbiddenException``, ``ClientErrorException``): for those its
``ErrorResponseProvider`` gives the phrase as ``detail`` too, whatever the bulk service said."""


def problem(status: int, detail: str) -> web.Response:
    """An error the way dCache's ``ErrorResponseProvider`` writes it: RFC 7807 members
    ``status`` (a string), ``title`` and ``detail``, no ``type``, served as plain
    ``application/json`` (nothing there sets ``application/problem+json``). 403, 413 and 429
    carry only their reason phrase."""
    title = _REASONS.get(status) or HTTPStatus(status).phrase
    body = {"status": str(status), "title": title,
            "detail": title if status in _REASONS else detail}
    return web.json_response(body, status=status)


def parse_lifetime(text: Any) -> float:
    """Seconds of an ISO 8601 ``diskLifetime`` as ``java.time.Duration.parse`` reads it
    (``PT24H``, ``P2D``...); ValueError for what it refuses (a ``T`` with nothing after it,
    weeks, months, years, no number at all)."""
    m = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if m is None or (m.group(3) or "").upper() == "T" \
            or not any(m.group(i) for i in (2, 4, 5, 6)):
        raise ValueError(f"invalid diskLifetime {text!r}")
    d, h, mi, sec = (int(m.group(i) or 0) for i in (2, 4, 5, 6))
    frac = float("0." + m.group(7)) if m.group(7) else 0.0
    if (m.group(6) or "").startswith("-"):
        frac = -frac
    seconds = ((d * 24 + h) * 60 + mi) * 60 + sec + frac
    return -seconds if m.group(1) == "-" else float(seconds)


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


async def _stage_body(request: web.Request) -> list[Any]:
    """The ``files`` of a stage request body, checked as ``StageResources.toBulkRequest``
    does: a JSON object whose only member is a non-empty ``files`` list (400 else)."""
    files = await _body(request, "files")
    doc = json.loads(await request.read())
    if not files:
        raise _Problem(400, "request contains no files.")
    others = sorted(k for k in doc if k != "files")
    if others:
        raise _Problem(400, f"unrecognized payload element(s): {json.dumps(others)}")
    return files


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
        files = await _stage_body(request)
        self._count("stage", len(files))
        login = self._login(request)
        user = login.user
        stagers = self._core.config.stagers
        if stagers is not None and login.claims is None and \
                not any(f"'{cn}')" in user for cn in stagers):
            raise _Problem(403, "Permission denied: staging is not allowed for this user")
        self._bulk_limits(user, len(files))
        targets = self._stage_targets(files)
        req = StageRequest(str(uuid.uuid4()), user,
                           {p: _File(p, login.allows(STAGE, p), lifetime)
                            for p, lifetime in targets.items()}, login.grants())
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
        # BulkService: the request's URL prefix (the URL posted to) + "/" + its uuid.
        location = f"{request.url.with_query(None)}/{req.id}"
        return web.json_response({"requestId": req.id}, status=201,
                                 headers={"Location": location})

    def _bulk_limits(self, user: str, targets: int) -> None:
        """``BulkService``'s checks of a new bulk request (stage, release): the user's quota of
        unfinished requests first (429), then the targets of a flat request (413)."""
        unfinished = sum(1 for r in self.requests.values() if r.user == user and not r.finished)
        if unfinished >= self._core.config.max_requests:
            raise _Problem(429, f"User has {unfinished} unfinished requests; "
                                f"the limit is {self._core.config.max_requests}")
        if targets > self._core.config.max_targets:
            raise _Problem(413, f"The number of targets {targets} exceeds maximum "
                                f"{self._core.config.max_targets} for directory expansion NONE.")

    @staticmethod
    def _stage_targets(files: list[Any]) -> dict[str, float]:
        """Pin lifetime by target, as ``StageResources.toBulkRequest`` and ``StageActivity``
        take them: each path stored resolved (``JdbcRequestTargetDao`` reads it back through
        ``FsPath``), its ``diskLifetime`` kept under the path as sent and looked up under the
        resolved one (a path sent as ``/a//b`` gets the default), 400 for a malformed file."""
        sent: dict[str, float] = {}
        targets: dict[str, float] = {}
        for i, item in enumerate(files):
            if not isinstance(item, dict):
                raise _Problem(400, f"file object {i} is not a JSON object")
            if "path" not in item:
                raise _Problem(400, f"file object {i} has no path.")
            path = item["path"]
            if not isinstance(path, str):
                raise _Problem(400, f"file object {i}: path is not a string")
            if "diskLifetime" in item:
                try:
                    sent[path] = parse_lifetime(item["diskLifetime"])
                except ValueError as e:
                    raise _Problem(400, str(e)) from None
            if "targetedMetadata" in item:
                meta = item["targetedMetadata"]
                if not isinstance(meta, dict) or not all(isinstance(v, dict)
                                                         for v in meta.values()):
                    raise _Problem(400, f"file object {i}: targetedMetadata is not an object "
                                        "of objects")
            targets.setdefault(fs_path(path), DEFAULT_PIN)
        return {p: sent.get(p, DEFAULT_PIN) for p in targets}

    async def _run(self, req: StageRequest) -> None:
        await asyncio.sleep(0)  # a poll right after the POST sees SUBMITTED, as on dCache
        req.started = time.time()
        await asyncio.gather(*(self._stage_file(req, f) for f in list(req.files.values())))

    async def _stage_file(self, req: StageRequest, f: _File) -> None:
        if f.state != "SUBMITTED":
            return
        f.state, f.started = "STARTED", time.time()
        replica = self._core.file(f.path)
        error = self._refusal(replica, f.path)
        if error is None and replica is not None and not replica.on_disk:
            error = await self._core.recall(replica) if f.may_stage else NO_STAGING
        if f.state == "CANCELLED":
            return
        if error is None and f.released:
            error = ABORTED  # the recall went on: the file is on disk, unpinned
        if error is None and replica is not None and replica.on_disk:
            replica.pins[req.id] = time.time() + f.lifetime
            f.state = "COMPLETED"
        else:
            f.state, f.error = "FAILED", error or "File was evicted before it could be pinned"
        f.finished = time.time()
        self._core.changed()

    def _refusal(self, replica: Optional[Replica], path: str) -> Optional[str]:
        if replica is None:
            if self._core.is_dir(path):
                return NOT_A_FILE  # PinManagerActivity.checkPinnable
            return f"{NO_SUCH_FILE}: {path}"
        if replica.tape is None:
            return "Cannot stage DISK only files"
        if not replica.readable:
            return "File is unavailable"
        return None

    def _request(self, request: web.Request) -> StageRequest:
        """The stage request the URL names, if the login may act on it: 404 when none is
        known, 403 (``BulkPermissionDeniedException``) when its login's restriction does not
        cover this one's or it is another user's (``JdbcBulkRequestStore.isRequestSubject``)."""
        rid = request.match_info["id"]
        req = self.requests.get(rid)
        if req is None:
            raise _Problem(404, f"request {rid} not found")
        login = self._login(request)
        if not subsumed(req.grants, login.grants()) or login.user != req.user:
            self.auth.count("frontend", 403)
            raise _Problem(403, rid)
        return req

    async def poll(self, request: web.Request) -> web.StreamResponse:
        self._count("poll")
        req = self._request(request)
        return web.json_response(req.to_json())

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        """As ``StageResources.cancel`` and ``BulkService``: paths resolved as ``FsPath``
        (any spelling of a target names it); a path not in the request is 400 with the reason
        in ``title``/``detail`` headers and no body; an empty list cancels the whole request;
        targets already ended stay as they are."""
        paths = await _body(request, "paths")
        req = self._request(request)
        self._count("cancel", len(paths))
        resolved = [fs_path(p) if isinstance(p, str) else p for p in paths]
        if any(p not in req.files for p in resolved):
            return web.Response(status=400, headers={
                "title": "File missing from stage request", "detail": "HTTP 400 Bad Request"})
        for f in (req.files.values() if not paths else (req.files[p] for p in resolved)):
            if f.state not in TERMINAL:
                f.state, f.finished = "CANCELLED", time.time()
        self._core.changed()
        return web.Response(status=200)

    async def delete(self, request: web.Request) -> web.StreamResponse:
        self._count("delete")
        req = self._request(request)
        for f in req.files.values():
            if f.state not in TERMINAL:
                f.state, f.finished = "CANCELLED", time.time()
        del self.requests[req.id]
        return web.Response(status=200)

    async def release(self, request: web.Request) -> web.StreamResponse:
        """As dCache's ``ReleaseResources``: a fire-and-forget RELEASE bulk request, so 200
        once the bulk service took it (an unknown id, a path not in the request, or another
        user's request releases nothing), but that request is held to the bulk service's
        limits like any other (429, then 413). The pin of a target still staging is aborted:
        the target fails "Operation was aborted" once its recall ends, unpinned."""
        paths = await _body(request, "paths")
        self._count("release", len(paths))
        if not all(isinstance(p, str) for p in paths):
            raise _Problem(400, "badly formed json object: paths must be strings")
        login = self._login(request)
        self._bulk_limits(login.user, len(paths))
        req = self.requests.get(request.match_info["id"])
        if req is None or req.user != login.user:  # PinManager: not the pin's owner
            return web.Response(status=200)
        for path in map(fs_path, paths):
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
        """As ``ArchiveInfoResources``: the first 10,000 entries of ``paths`` (any more are
        dropped without a word, before duplicates are merged), each a string (400 else);
        each answered under the spelling sent, a directory as ``NONE``
        (``PoolMonitorV5.getFileLocality``)."""
        paths = await _body(request, "paths")
        self._count("archiveinfo", len(paths))
        first = paths[:ARCHIVEINFO_LIMIT]
        if not all(isinstance(p, str) for p in first):
            raise _Problem(400, "badly formed json object: paths must be strings")
        login = self._login(request)
        answer: list[dict[str, str]] = []
        for path in dict.fromkeys(first):
            resolved = fs_path(path)
            replica = self._core.file(path)
            error = self.path_errors.take(resolved)
            if error is not None:
                answer.append({"path": path, "error": error})
            elif not login.allows(READ_METADATA, resolved):
                answer.append({"path": path, "error": PERMISSION_DENIED})
            elif replica is not None:
                answer.append({"path": path, "locality": replica.archive_locality})
            elif self._core.is_dir(resolved):
                answer.append({"path": path, "locality": "NONE"})
            else:
                answer.append({"path": path, "error": f"{NO_SUCH_FILE}: {resolved}"})
        return web.json_response(answer)

    async def discovery(self, request: web.Request) -> web.StreamResponse:
        """``/.well-known/wlcg-tape-rest-api``: dCache's frontend serves the same document as
        its doors (``WellKnownWlcgProducerFactory``, one file for every service)."""
        self._count("discovery")
        if not self._core.config.discovery:
            return web.Response(status=404, text="File not found\n")
        return web.json_response({
            "sitename": self._core.config.sitename, "description": "prestaged dCache emulator",
            "endpoints": [{"uri": f"{request.url.origin()}{TAPE_API}", "version": "v1",
                           "metadata": {}}]})

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
        if self._core.is_dir(path):
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
        # The discovery document is served to anyone (a bad token still fails first).
        login = frontend.auth.login(request, "frontend", anonymous=request.path == DISCOVERY)
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
    r.add_get(DISCOVERY, frontend.discovery)
    return app
