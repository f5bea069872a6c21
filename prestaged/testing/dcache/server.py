"""The emulated dCache's door, pool and the server that runs them with the frontend.

The door (client certificate required, or a WLCG token: see ``auth``) answers GET with 302 to
the pool and a one-time ``?dcache-http-uuid=``; a GET of a tape-only file starts a recall and
holds the request up to ``door_timeout``, then 500 as dCache does (the recall goes on). The pool
serves one byte range, starts a mover (sets the replica's atime) per transfer and keeps it while
the connection is open, unless the client sent ``Connection: close`` or read the whole file. The
pool never looks at credentials: the one-time UUID authorises (it counts ``Authorization``
headers that reach it).
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
import uuid
from types import TracebackType
from typing import Any, Callable, Optional

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from prestaged.testing.dcache.auth import (
    DOWNLOAD,
    READ_METADATA,
    STAGE,
    DCacheAuth,
    limited,
    limiter_for,
)
from prestaged.testing.dcache.core import DCacheCore
from prestaged.testing.dcache.faults import Faults
from prestaged.testing.dcache.frontend import TAPE_API, TapeFrontend, frontend_app
from prestaged.testing.dcache.model import DCacheConfig, Replica, fs_path
from prestaged.testing.storage import generated_bytes
from prestaged.testing.tokens import BearerCheck

__all__ = ["DOOR_TIMEOUT_MESSAGE", "DCacheServer"]

DOOR_TIMEOUT_MESSAGE = "Internal problem: Request to [>PoolManager@dCacheDomain] timed out."
NO_STAGING = "File not online. Staging not allowed."
"""PoolManager's answer to a read of a tape-only file by a token without ``storage.stage``."""
DISCOVERY = "/.well-known/wlcg-tape-rest-api"
_RANGE = re.compile(r"bytes=(\d*)-(\d*)\Z")
HOST = "127.0.0.1"


class _MoverServer(web.Server):
    """aiohttp's low-level server that ends a connection's movers when the connection closes."""

    def __init__(self, pool: _Pool, **kwargs: Any) -> None:
        super().__init__(pool.handle, **kwargs)
        self._pool = pool

    def connection_lost(self, handler: RequestHandler, exc: Optional[BaseException] = None) -> None:
        super().connection_lost(handler, exc)
        self._pool.end_movers(handler)


class _Pool:
    def __init__(self, core: DCacheCore, door_url: Callable[[str], str]) -> None:
        self._core = core
        self._door_url = door_url
        self.transfers: dict[str, str] = {}  # one-time uuid -> path
        self._movers: dict[RequestHandler, list[Replica]] = {}

    def end_movers(self, handler: RequestHandler) -> None:
        replicas = self._movers.pop(handler, [])
        for replica in replicas:
            replica.movers -= 1
        if replicas:
            self._core.stats.open_movers -= len(replicas)
            self._core.changed()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self._core.stats.requests["pool:get"] += 1
        if "Authorization" in request.headers:
            self._core.stats.pool_authorization += 1
        path = self.transfers.pop(request.query.get("dcache-http-uuid", ""), None)
        if path is None:  # a used or unknown UUID: back to the door, as newer pools do
            return web.Response(status=307, headers={"Location": self._door_url(request.path)})
        replica = self._core.file(path)
        if replica is None or not replica.on_disk:
            return web.Response(status=404, text="File not on this pool\n")
        span = _byte_range(request.headers.get("Range"), replica.size)
        if span is None:
            return web.Response(status=416, headers={"Content-Range": f"bytes */{replica.size}"})
        self._start_mover(request.protocol, replica)
        start, stop = span
        whole = (start, stop) == (0, replica.size)
        headers = {} if whole else {"Content-Range": f"bytes {start}-{stop - 1}/{replica.size}"}
        response = web.Response(status=200 if whole else 206, headers=headers,
                                body=generated_bytes(path, start, stop))
        if whole or request.headers.get("Connection", "").lower() == "close":
            self.end_movers(request.protocol)
        return response

    def _start_mover(self, handler: Optional[RequestHandler], replica: Replica) -> None:
        replica.atime = time.time()
        replica.reads += 1
        self._core.stats.movers_started += 1
        self._core.stats.open_movers += 1
        if handler is not None:
            replica.movers += 1
            self._movers.setdefault(handler, []).append(replica)
        self._core.changed()


def _byte_range(header: Optional[str], size: int) -> Optional[tuple[int, int]]:
    """(start, stop) of a single range (the whole file without one); None if unsatisfiable."""
    m = _RANGE.match(header or "")
    if m is None:
        return 0, size
    first, last = m.groups()
    if not first:
        start, stop = max(0, size - int(last or 0)), size
    else:
        start, stop = int(first), min(size, int(last) + 1 if last else size)
    return (start, stop) if start < stop else None


class DCacheServer:
    """An emulated dCache on 127.0.0.1: WebDAV door, pool and Tape REST frontend, each on its own
    port, over one namespace, disk and tape library (``DCacheConfig``). ``ssl_context`` serves
    the door and frontend (give one that requires client certificates); ``pool_ssl_context``
    the pool, which authorises by its one-time UUID. Use ``async with`` or start/stop.

    ``bearer`` (default None: certificates only) makes door and frontend accept WLCG tokens as
    dCache does (see ``prestaged.testing.dcache.auth``); ``ssl_context`` must then request but
    not require a client certificate. Door and frontend each block a client that collected
    ``config.auth_max_errors`` 401s (429 with ``Retry-After`` for ``auth_block_seconds``), timed
    by ``clock`` (seconds; ``time.monotonic`` by default: tests pass their own)."""

    def __init__(self, ssl_context: ssl.SSLContext, pool_ssl_context: ssl.SSLContext,
                 config: Optional[DCacheConfig] = None, *, bearer: Optional[BearerCheck] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if bearer is not None and ssl_context.verify_mode == ssl.CERT_REQUIRED:
            raise ValueError("with bearer tokens the door and frontend must let clients without a"
                             " certificate through: use server_ssl_context("
                             "require_client_cert=False)")
        self._ssl = {"door": ssl_context, "frontend": ssl_context, "pool": pool_ssl_context}
        self.core = DCacheCore(config or DCacheConfig())
        self.auth = DCacheAuth(bearer, self.core.stats)
        cfg = self.core.config
        self.limiters = {site: limiter_for(cfg, clock) for site in ("door", "frontend")}
        """dCache 11.2's blocking of clients with repeated 401s, per service."""
        self.faults = Faults()
        """Passing failures of frontend and discovery a test sets (``faults``)."""
        self.frontend = TapeFrontend(self.core, self.auth, self.limiters["frontend"],
                                     self.faults)
        self._pool = _Pool(self.core, self.door_url)
        self._runners: list[web.BaseRunner] = []
        self._ports: dict[str, int] = {}
        self.discovery_body: Optional[str] = None
        """A test fault: the door answers the discovery GET with this text (200, JSON type)."""

    async def start(self) -> None:
        """Listen on the pool, frontend and door (in that order) and start the tape drives."""
        self.core.library.start()
        try:
            await self._listen("pool", web.ServerRunner(
                _MoverServer(self._pool, handler_cancellation=True, access_log=None)))
            await self._listen("frontend", web.AppRunner(frontend_app(self.frontend),
                                                         access_log=None))
            door = web.Server(self._door, handler_cancellation=True, access_log=None)
            await self._listen("door", web.ServerRunner(door))
        except BaseException:
            await self.stop()
            raise

    async def _listen(self, site: str, runner: web.BaseRunner) -> None:
        await runner.setup()
        self._runners.append(runner)
        await web.TCPSite(runner, HOST, 0, ssl_context=self._ssl[site]).start()
        self._ports[site] = runner.addresses[0][1]

    async def stop(self) -> None:
        """Close every site and stop the drives. Idempotent."""
        self.frontend.release_stage_answers()  # a held answer would hold the cleanup up
        runners, self._runners = self._runners, []
        for runner in reversed(runners):
            await runner.cleanup()
        await self.core.library.stop()

    async def __aenter__(self) -> DCacheServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: Optional[type[BaseException]],
                        exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        await self.stop()

    def _base(self, site: str) -> str:
        return f"https://{HOST}:{self._ports[site]}"

    def door_url(self, path: str) -> str:
        """The door's URL of namespace ``path``: ``https://127.0.0.1:<door port><path>``, less
        the ``door_root``."""
        root = self.core.config.door_root
        if root and not path.startswith(root + "/"):
            raise ValueError(f"{path} is not under the door root {root}")
        return self._base("door") + path[len(root):]

    @property
    def tape_api_url(self) -> str:
        """The discovered Tape REST endpoint, ``https://127.0.0.1:<frontend port>/api/v1/tape``."""
        return self._base("frontend") + TAPE_API

    @property
    def frontend_url(self) -> str:
        """``https://127.0.0.1:<frontend port>``."""
        return self._base("frontend")

    # the door

    async def _door(self, request: web.BaseRequest) -> web.StreamResponse:
        return await limited(self.limiters["door"], self.core.stats, "door", request,
                             self._door_request)

    async def _door_request(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path == DISCOVERY:
            self.core.stats.requests["door:discovery"] += 1
            fault = self.faults.take("discovery", "door")
            if fault is not None:
                return Faults.answer(request, fault)
            # Served to anyone, but a token that does not verify fails the login first.
            login = self.auth.login(request, "door", anonymous=True)
            if isinstance(login, web.Response):
                return login
            if not self.core.config.discovery:
                return web.Response(status=404, text="File not found\n")
            if self.discovery_body is not None:
                return web.Response(text=self.discovery_body, content_type="application/json")
            return web.json_response({
                "sitename": self.core.config.sitename, "description": "prestaged dCache emulator",
                "endpoints": [{"uri": self.tape_api_url, "version": "v1", "metadata": {}}]})
        self.core.stats.requests[f"door:{request.method.lower()}"] += 1
        path = fs_path(self.core.config.door_root + request.path)  # the namespace's spelling
        verbs = DOWNLOAD if request.method == "GET" else READ_METADATA
        login = self.auth.login(request, "door", verbs, (path,))
        if isinstance(login, web.Response):
            return login
        replica = self.core.file(path)
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405)
        if replica is None:
            return web.Response(status=404, text="File not found\n")
        if request.method == "HEAD":  # metadata only: no mover, the LRU clock does not move
            return web.Response(status=200, headers={"Content-Length": str(replica.size)})
        if not replica.on_disk:
            if not login.allows(STAGE, path):  # PoolManager: no recall without STAGE
                self.auth.count("door", 403)
                return web.Response(status=403, text=NO_STAGING + "\n")
            return await self._door_nearline(replica)
        return self._redirect(replica)

    def _redirect(self, replica: Replica) -> web.StreamResponse:
        transfer = uuid.uuid4().hex
        self._pool.transfers[transfer] = replica.path
        location = f"{self._base('pool')}{replica.path}?dcache-http-uuid={transfer}"
        return web.Response(status=302, headers={"Location": location})

    async def _door_nearline(self, replica: Replica) -> web.StreamResponse:
        """Hold the request while the file is recalled, up to ``door_timeout``."""
        stats, began = self.core.stats, time.monotonic()
        stats.door_tape_gets += 1
        self.core.changed()
        try:
            if replica.tape is None or not replica.readable:
                await asyncio.sleep(self.core.config.door_timeout)
            else:
                recall = self.core.recall(replica)
                await asyncio.wait_for(asyncio.shield(recall), self.core.config.door_timeout)
        except asyncio.TimeoutError:
            return web.Response(status=500, text=DOOR_TIMEOUT_MESSAGE + "\n")
        finally:
            stats.door_blocked_seconds += time.monotonic() - began
        if not replica.on_disk:
            return web.Response(status=500, text=DOOR_TIMEOUT_MESSAGE + "\n")
        return self._redirect(replica)
