"""The storage behind the dCache emulator: namespace, disk pool with LRU eviction, tape library.

Times are in seconds of the event loop (``asyncio.sleep``); replica access times are
``time.time()`` seconds. Nothing here speaks HTTP: the door, pool and frontend drive it.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

__all__ = ["DCACHE_RATE", "DCacheConfig", "DCacheStats", "Disk", "Locality", "Replica",
           "TapeLibrary", "fs_path"]

#: dCache's defaults, which the emulator may lower for a test but never raise: a client that
#: only works against wider limits must fail here as it would on a real dCache. (The request
#: rates of dCache 11.2+, ``DCACHE_RATE``, are a site setting many tests leave out, as a site
#: that raised them would: ``DCacheConfig.rate_overall``.)
MAX_TARGETS = 500  # bulk.limits.max.targets-per-flat-request
MAX_REQUESTS = 5000  # max-requests-per-user (unfinished)
ARCHIVEINFO_LIMIT = 10_000  # paths answered per archiveinfo request
DEFAULT_PIN = 2 * 24 * 3600.0  # seconds a stage pins for without diskLifetime


def fs_path(path: str) -> str:
    """``path`` as dCache's ``FsPath`` spells it: empty and ``.`` elements dropped, ``..``
    resolved (at the root it stays there), no trailing ``/``. dCache stores a stage request's
    targets so (``JdbcRequestTargetDao``) and lists them so in a poll; its namespace resolves
    any spelling of a path to the same file. Written here apart from the client's own, so
    that the emulator checks the client rather than agreeing with it."""
    parts: list[str] = []
    for element in path.split("/"):
        if element in ("", "."):
            continue
        if element == "..":
            if parts:
                parts.pop()
            continue
        parts.append(element)
    return "/" + "/".join(parts)


class Locality(str, enum.Enum):
    """Where a file's copies are, as set up by a test."""

    DISK = "disk"  # disk only (precious; never evicted, cannot be staged)
    TAPE = "tape"  # tape only (NEARLINE)
    DISK_AND_TAPE = "disk+tape"  # cached replica of a tape file
    LOST = "lost"  # disk-only, no pool up: dCache reports UNAVAILABLE, cannot stage it


@dataclass(frozen=True)
class DCacheConfig:
    """The emulator's model and limits; times in seconds, sizes in bytes.

    ``drives`` tape drives each take ``mount_seconds`` to mount a tape and ``file_seconds`` per
    file read once mounted. ``door_timeout`` is ``webdav.mover.timeout`` (dCache: 180 s).
    ``disk_capacity`` (None: unlimited) bounds the pool; recalls evict unpinned cached replicas,
    least recently accessed first. ``max_targets`` (<= 500) and ``max_requests`` (<= 5000) are
    the frontend's 413 and 429 limits.
    """

    drives: int = 1
    mount_seconds: float = 0.0
    file_seconds: float = 0.0
    door_timeout: float = 180.0
    disk_capacity: Optional[int] = None
    max_targets: int = MAX_TARGETS
    max_requests: int = MAX_REQUESTS
    sitename: str = "prestaged-test"
    discovery: bool = True
    """The door serves ``/.well-known/wlcg-tape-rest-api``; False: 404 there, as a door that
    does not publish it (the frontend still serves the API: ``[[storage.tape_api]]``)."""
    door_root: str = ""
    """dCache's ``webdav.root``: the door serves namespace path ``door_root + URL path`` (a door
    with root ``/pnfs/fnal.gov/usr`` has ``/dune/f`` for ``/pnfs/fnal.gov/usr/dune/f``)."""
    stagers: Optional[tuple[str, ...]] = None
    """Common names of the certificate users allowed to stage (None: everyone); others get a
    403 on ``/stage`` (a stand-in for dCache's stage protection; tokens go by their scope)."""
    auth_max_errors: int = 3
    """``webdav.limits.error.max-allowed`` (dCache 11.2+): a client is blocked once this many
    401s have been answered to it, each within ``auth_error_window`` of the one before."""
    auth_error_window: float = 20.0
    """``webdav.limits.error.block.window.time``: seconds a 401 is remembered."""
    auth_block_seconds: float = 10.0
    """``webdav.limits.rate.per-client.block.window.time``: seconds a blocked client gets 429."""
    rate_overall: Optional[float] = None
    """``webdav.limits.rate.overall``: requests a second to door, and to frontend, from all
    clients together; dCache 11.2+ has 1000 (``DCACHE_RATE``). None (the default here): no
    request-rate limit, as before 11.2 or where a site raised it out of reach. Tests that
    assert exact request counts keep None; ``test_tape_warm`` runs prestaged against 1000."""
    rate_client_percent: float = 25.0
    """``webdav.limits.rate.per-client.fractions``: one client's share of ``rate_overall``."""
    client_idle_seconds: float = 10.0
    """``webdav.limits.blocked-clients.idle-time``: a client's rate limiter is dropped after so
    long without requests; a rate 429's ``Retry-After`` is drawn from 1 to this - 1."""

    def __post_init__(self) -> None:
        if self.drives < 1:
            raise ValueError(f"drives must be >= 1, got {self.drives}")
        for name in ("mount_seconds", "file_seconds", "door_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.disk_capacity is not None and self.disk_capacity < 0:
            raise ValueError(f"disk_capacity must be >= 0 or None, got {self.disk_capacity}")
        if not 1 <= self.max_targets <= MAX_TARGETS:
            raise ValueError(f"max_targets must be 1-{MAX_TARGETS} (dCache's limit)")
        if self.door_root and (not self.door_root.startswith("/")
                               or self.door_root.endswith("/")):
            raise ValueError(f"door_root must start and not end with /, got {self.door_root!r}")
        if not 1 <= self.max_requests <= MAX_REQUESTS:
            raise ValueError(f"max_requests must be 1-{MAX_REQUESTS} (dCache's limit)")
        if self.auth_max_errors < 1 or self.auth_error_window <= 0 or self.auth_block_seconds <= 0:
            raise ValueError("auth_max_errors must be >= 1 and the auth windows > 0")
        if self.rate_overall is not None and not (
                self.rate_overall > 0 and 0 < self.rate_client_percent <= 100
                and self.client_idle_seconds >= 2):
            raise ValueError("rate_overall must be > 0 (or None), rate_client_percent in "
                             "(0, 100] and client_idle_seconds >= 2")


DCACHE_RATE = 1000.0
"""dCache 11.2's ``webdav.limits.rate.overall`` and ``frontend.limits.rate.overall``."""


@dataclass
class Replica:
    """One file: ``tape`` is its volume (None: no tape copy); ``pins`` maps a stage request id to
    the ``time.time()`` its pin ends; ``atime`` is the last mover start (``time.time()``) or
    recall; ``reads`` counts mover starts, i.e. client reads (a recall is not one); ``movers``
    those still open (dCache's link count: the sweeper skips a replica in use)."""

    path: str
    size: int
    tape: Optional[str]
    on_disk: bool
    readable: bool = True
    atime: float = 0.0
    reads: int = 0
    movers: int = 0
    pins: dict[str, float] = field(default_factory=dict)

    def pinned(self, now: float) -> bool:
        """True while any pin on it has not expired."""
        return any(end > now for end in self.pins.values())

    @property
    def archive_locality(self) -> str:
        """Tape REST ``archiveinfo`` locality: DISK, TAPE, DISK_AND_TAPE or UNAVAILABLE."""
        if not self.readable:
            return "UNAVAILABLE"
        if self.on_disk:
            return "DISK_AND_TAPE" if self.tape else "DISK"
        return "TAPE"

    @property
    def file_locality(self) -> str:
        """Namespace ``fileLocality``: ONLINE, NEARLINE, ONLINE_AND_NEARLINE or UNAVAILABLE."""
        return {"DISK": "ONLINE", "TAPE": "NEARLINE", "DISK_AND_TAPE": "ONLINE_AND_NEARLINE",
                "UNAVAILABLE": "UNAVAILABLE"}[self.archive_locality]


@dataclass
class DCacheStats:
    """What the emulator saw. ``requests`` counts ``"<site>:<kind>"`` (site door, pool or
    frontend; kind such as ``get``, ``stage``, ``poll``, ``archiveinfo``); ``door_tape_gets``
    counts door GETs of tape-only files and ``door_blocked_seconds`` the time they held the door;
    ``max_paths`` is the most paths one frontend request carried (refused ones included);
    ``frontend_calls`` lists each frontend request as ``"METHOD /path"``. With tokens:
    ``token_requests`` counts requests carrying ``Authorization: Bearer`` per site (door,
    frontend), ``auth_refusals`` refusals per ``"<site>:<status>"`` (401, 403), ``blocked`` the
    429s answered per site to clients blocked for repeated 401s; ``pool_authorization`` counts
    pool requests that came with an ``Authorization`` header (the one-time UUID is all a pool
    needs: a careful client never sends its token there)."""

    requests: Counter[str] = field(default_factory=Counter)
    frontend_calls: list[str] = field(default_factory=list)
    door_tape_gets: int = 0
    door_blocked_seconds: float = 0.0
    mounts: int = 0
    recalled: int = 0
    evicted: int = 0
    max_paths: int = 0
    movers_started: int = 0
    open_movers: int = 0
    token_requests: Counter[str] = field(default_factory=Counter)
    auth_refusals: Counter[str] = field(default_factory=Counter)
    blocked: Counter[str] = field(default_factory=Counter)
    throttled: Counter[str] = field(default_factory=Counter)
    pool_authorization: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"requests": dict(self.requests), "door_tape_gets": self.door_tape_gets,
                "door_blocked_seconds": self.door_blocked_seconds, "mounts": self.mounts,
                "recalled": self.recalled, "evicted": self.evicted, "max_paths": self.max_paths,
                "movers_started": self.movers_started, "open_movers": self.open_movers,
                "token_requests": dict(self.token_requests),
                "auth_refusals": dict(self.auth_refusals), "blocked": dict(self.blocked),
                "throttled": dict(self.throttled),
                "pool_authorization": self.pool_authorization}


class Disk:
    """The pool's disk: bytes used, and room made by evicting unpinned cached replicas by atime."""

    def __init__(self, capacity: Optional[int], files: dict[str, Replica], stats: DCacheStats):
        self._capacity = capacity
        self._files = files
        self._stats = stats

    def used(self) -> int:
        """Bytes of replicas on disk."""
        return sum(r.size for r in self._files.values() if r.on_disk)

    def make_room(self, size: int) -> bool:
        """Evict least recently accessed cached, unpinned replicas until ``size`` bytes fit;
        False (nothing evicted beyond need) when pinned or disk-only replicas leave no room.
        A replica being read (an open mover) is skipped, as dCache's sweeper skips an entry
        whose link count is not 0 (``SpaceSweeper2``: "File skipped by sweeper (in use)")."""
        if self._capacity is None:
            return True
        now = time.time()
        free = self._capacity - self.used()
        victims = sorted((r for r in self._files.values()
                          if r.on_disk and r.tape and not r.pinned(now) and not r.movers),
                         key=lambda r: r.atime)
        if free + sum(r.size for r in victims) < size:
            return False
        for r in victims:
            if free >= size:
                break
            r.on_disk = False
            free += r.size
            self._stats.evicted += 1
        return True


class TapeLibrary:
    """Drives reading queued recalls grouped by tape: a drive takes the tape whose recall waits
    longest, mounts it (unless it is mounted there already) and reads every file queued for it,
    including files queued while it reads. One tape is in at most one drive.

    ``on_read(path)`` runs when a file has been read; it returns an error text or None.
    """

    def __init__(self, config: DCacheConfig, stats: DCacheStats,
                 on_read: Callable[[str], Optional[str]]) -> None:
        self._config = config
        self._stats = stats
        self._on_read = on_read
        self._queue: OrderedDict[str, list[str]] = OrderedDict()  # tape -> paths, oldest first
        self._waiting: dict[str, asyncio.Future[Optional[str]]] = {}
        self._mounted: list[Optional[str]] = [None] * config.drives
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start one task per drive."""
        self._tasks = [asyncio.create_task(self._drive(i)) for i in range(self._config.drives)]

    async def stop(self) -> None:
        """Stop the drives; recalls still waiting are cancelled."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for fut in self._waiting.values():
            fut.cancel()

    def recall(self, path: str, tape: str) -> asyncio.Future[Optional[str]]:
        """Queue ``path`` (once) for reading from ``tape``; the future gives None or an error."""
        fut = self._waiting.get(path)
        if fut is None:
            fut = self._waiting[path] = asyncio.get_running_loop().create_future()
            self._queue.setdefault(tape, []).append(path)
            self._wake.set()
        return fut

    def _next_tape(self, drive: int) -> Optional[str]:
        mine = self._mounted[drive]
        if mine is not None and self._queue.get(mine):
            return mine
        others = {t for i, t in enumerate(self._mounted) if i != drive}
        return next((t for t, paths in self._queue.items() if paths and t not in others), None)

    async def _drive(self, drive: int) -> None:
        while True:
            tape = self._next_tape(drive)
            if tape is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._mounted[drive] != tape:
                self._mounted[drive] = tape  # claimed before the mount so no other drive takes it
                self._stats.mounts += 1
                await asyncio.sleep(self._config.mount_seconds)
            await self._read_all(tape)

    async def _read_all(self, tape: str) -> None:
        paths = self._queue[tape]
        while paths:
            await asyncio.sleep(self._config.file_seconds)
            path = paths.pop(0)
            error = self._on_read(path)
            fut = self._waiting.pop(path)
            if not fut.done():
                fut.set_result(error)
        del self._queue[tape]
