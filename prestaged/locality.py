"""The tape-aware path of a run (issue 13): ask the storage where files are, stage the tape-only
ones in bulk, and hand each file to the touch only once it is on disk.

For every storage endpoint (door ``https://host:port``) of a run, ``TapeRouter`` asks the door
once whether it publishes the WLCG Tape REST API (``TapeDirectory``; the daemon keeps the
answers ``storage.discovery_ttl``), unless ``[[storage.tape_api]]`` names the door's endpoint.
Where there is one, the files of each admitted chunk go to one ``archiveinfo`` request (so
locality is pipelined with the catalog stream) and then:

* ``DISK``, ``DISK_AND_TAPE``: touched at once, as without tape;
* ``TAPE``: staged (``storage.staging.Stager``, one per endpoint, fed as the files come), and
  touched the moment a poll shows them on disk (the atime must be fresh when the job comes);
* ``LOST``, ``UNAVAILABLE``, ``NONE``: failed with that reason, never read;
* a per-path error: dCache gives the root cause of any failure there. "No such file", "not
  found", "does not exist": missing; "Permission denied": denied (counted toward the run's
  denial breaker, as a touch's 403: exit 3 when they come in a row); anything else (a
  namespace lookup that timed out...) is asked again, ``ARCHIVEINFO_TRIES`` times in all with
  a backoff, then failed with the server's message.

``storage.stage``: ``auto`` does the above where the API is published and touches elsewhere
(a discovery document it cannot read is warned about, and those files are touched); ``always``
stops the run (exit 5) at an endpoint without it; ``never`` builds no router at all. A door
whose discovery answers 5xx, or nothing, until the client's policy gives up says nothing of
the API: the last answer it gave is used if the daemon has one, else its files fail for this
run naming it (a later run asks again), never read by GET, which would block a door thread on
a tape-only file. A door that cannot be connected to at all is touched (its touches fail the
same way, blocking nothing). An archiveinfo request that fails the same way fails the files
it asked about. Other refusals by the frontend are the run's end: 401/403 exit 3 (staging
needs ``storage.stage``), anything else exit 5 — a failure to learn locality is never replaced
by a GET that would block the door.

What was learned is noted per file (``note``: the state store's tape columns) the moment it is
known: the locality, the stage request holding the pin, when the file reached disk. A tape-only
file that an earlier run's request is still bringing to disk (``resume``: the state's open
requests) is followed in that request, not asked for again: a rerun after a timeout, a Ctrl-C,
a crash or a cluster chunk taken over makes no duplicate request and keeps the pin it holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Protocol, Union
from urllib.parse import unquote, urlsplit

from prestaged.config import PathMap, StorageConfig, TapeApi, door_key
from prestaged.errors import CredentialError, PrestagedError, StorageError, StorageSetupError
from prestaged.model import FileRef, Outcome, Result, TapeInfo
from prestaged.retry import RetryPolicy
from prestaged.storage.staging import RequestSlots, Staged, Stager, StagingSettings
from prestaged.storage.tape import (
    ARCHIVEINFO_BATCH,
    FileLocality,
    Locality,
    StageRequest,
    TapeClient,
    TapeDropped,
    TapeRestError,
    TapeTransient,
    TapeUnreachable,
    fs_path,
)
from prestaged.tokens import ScopeWarner, TokenSource, scopes_refuse

if TYPE_CHECKING:
    import ssl

    import aiohttp

__all__ = [
    "TapeAccess",
    "TapeDirectory",
    "TapeProbe",
    "TapeRouter",
    "TapeSettings",
    "TapeTally",
    "namespace_path",
]

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 120.0
"""Seconds one Tape REST request may take (an archiveinfo of 1,000 paths takes a few)."""

STAGE_ANSWER_GRACE = 10.0
"""Seconds a stopped run waits for the answers of the stage POSTs it had sent (the frontend
makes the request before answering, and dCache's bulk service can be slow to), to record the
requests made, for the next run to follow and ``release`` to free. Not ``REQUEST_TIMEOUT``:
a Ctrl-C is not held for two minutes; a second one stops at once. The daemon's stop allows
for it (``STOP_RUNS_GRACE``, 30 s, after ``daemon.drain_timeout``)."""

UNKNOWN_HINT = 3
"""Paths an endpoint must not know, and none it knows, before ``path_map`` is suggested."""

ARCHIVEINFO_TRIES = 3
"""Times a path is asked about whose archiveinfo answer was left out or an unclear error."""

STALE_RETRY = 300.0
"""Seconds a door's last discovery answer is used on, when asking again failed, before the
door is asked once more."""

_MISSING = ("no such file", "not found", "does not exist", "doesn't exist")
_DENIED = ("permission denied", "not permitted", "not allowed", "access denied", "forbidden",
           "unauthorized", "unauthorised")
"""Per-path archiveinfo errors that say the file is missing, or that we may not see it."""

_UNREADABLE = {
    Locality.LOST: "locality LOST: the storage has no readable copy",
    Locality.UNAVAILABLE: "locality UNAVAILABLE: its copies are on offline pools or tapes",
    Locality.NONE: "locality NONE: the storage holds no copy",
}


@dataclass(frozen=True)
class TapeSettings:
    """The ``[storage]`` keys of the tape path (see ``config.StorageConfig``)."""

    mode: str = "auto"
    batch: int = 200
    staging: StagingSettings = field(default_factory=StagingSettings)
    path_map: tuple[PathMap, ...] = ()
    discovery_ttl: float = 3600.0
    tape_api: tuple[TapeApi, ...] = ()

    @classmethod
    def from_config(cls, st: StorageConfig) -> TapeSettings:
        """Settings from ``[storage]`` (after command-line overrides)."""
        return cls(mode=st.stage, batch=st.stage_batch, path_map=st.path_map,
                   discovery_ttl=st.discovery_ttl, tape_api=st.tape_api,
                   staging=StagingSettings(batch=st.stage_batch, max_requests=st.stage_requests,
                                           poll_min=st.poll_min, poll_max=st.poll_max,
                                           poll_errors=st.poll_errors,
                                           timeout=st.stage_timeout, lifetime=st.pin_lifetime))


def namespace_path(url: str, path_map: Sequence[PathMap] = ()) -> str:
    """The namespace path the Tape REST API knows ``url``'s file by: the first ``path_map``
    rule whose ``url_prefix`` starts the URL maps it, else the URL's own path; percent-decoded
    (``%20`` is a space in the namespace), query and fragment dropped, and spelled as dCache's
    ``FsPath`` (``fs_path``): a rule with ``/`` on both sides of the join, or a URL's ``//``, would
    otherwise name a file the server lists under another spelling in its polls."""
    for rule in path_map:
        if url.startswith(rule.url_prefix):
            rest = urlsplit("https://h/" + url[len(rule.url_prefix):]).path[1:]
            return fs_path(rule.path_prefix + unquote(rest))
    return fs_path(unquote(urlsplit(url).path))


class TapeProbe(Protocol):
    """Hears staging events for metrics (``metrics.Metrics`` is the real one)."""

    def staging(self, delta: int) -> None:
        """Files with an open stage request went up (or down) by ``delta``."""
        ...

    def file_staged(self, seconds: float) -> None:
        """A file reached disk ``seconds`` after its first stage request."""
        ...


class StagingFiles:
    """The files runs follow a stage request for, shared by the runs of one ``TapeAccess``
    (the daemon's): a file two runs follow (watched definitions sharing it, the second run
    following the first's request) is one file staging and lands once, for the metrics.
    Keys are ``(frontend uri, path)``."""

    def __init__(self) -> None:
        self._followers: Counter[tuple[str, str]] = Counter()
        self._landed: set[tuple[str, str]] = set()

    def begin(self, key: tuple[str, str]) -> bool:
        """A run follows ``key`` now; True when no other run did (the file starts staging)."""
        self._followers[key] += 1
        return self._followers[key] == 1

    def landed(self, key: tuple[str, str]) -> bool:
        """A run saw ``key`` reach disk; True for the first of its followers to see it."""
        if key in self._landed or key not in self._followers:
            return False
        self._landed.add(key)
        return True

    def end(self, key: tuple[str, str]) -> bool:
        """A run no longer follows ``key``; True when it was the last (it left staging)."""
        self._followers[key] -= 1
        if self._followers[key] > 0:
            return False
        del self._followers[key]
        self._landed.discard(key)
        return True


@dataclass
class TapeTally:
    """Live counters of the tape path of a run (progress displays and the summary)."""

    located: Counter[str] = field(default_factory=Counter)
    """Files by the locality ``archiveinfo`` gave."""
    requested: int = 0
    """Files put in stage requests (a file asked twice counts once)."""
    on_disk: int = 0
    """Staged files that reached disk."""
    endpoints: dict[str, Optional[str]] = field(default_factory=dict)
    """Door -> its Tape REST endpoint (None: none, files touched directly)."""

    @property
    def staging(self) -> int:
        """Files asked for and not on disk yet (or failed)."""
        return self.requested - self.on_disk


_Found = Union[str, None, TapeRestError]


class TapeDirectory:
    """Which doors publish a Tape REST API: their v1 endpoint, or None. Answers are kept
    ``ttl`` seconds (the daemon shares one directory between runs); errors are not kept, but a
    door that fails to answer (``TapeTransient``) when asked again keeps its last answer for
    ``STALE_RETRY`` more seconds. The doors of ``configured`` (``[[storage.tape_api]]``) are
    never asked: their entry holds."""

    def __init__(self, ttl: float = 3600.0, clock: Callable[[], float] = time.monotonic,
                 configured: Sequence[TapeApi] = ()) -> None:
        self.ttl = ttl
        self._clock = clock
        self._found: dict[str, tuple[Optional[str], float]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._configured: dict[tuple[str, int], str] = {}
        self.configure(configured)

    def configure(self, configured: Sequence[TapeApi]) -> None:
        """Use ``configured`` from now on (a reloaded config)."""
        self._configured = {door_key(api.door): api.uri.rstrip("/") for api in configured}

    async def lookup(self, client: TapeClient, door: str) -> _Found:
        """``door``'s endpoint, None without one, or the ``TapeRestError`` of a discovery
        document that cannot be read or of a door that did not answer (``TapeTransient``,
        unless an earlier answer is kept: see the class; 401/403 raise ``CredentialError``)."""
        if self._configured:
            uri = self._configured.get(door_key(door))
            if uri is not None:
                return uri
        lock = self._locks.setdefault(door, asyncio.Lock())
        async with lock:  # concurrent runs of the daemon ask once
            kept = self._found.get(door)
            if kept is not None and self._clock() - kept[1] < self.ttl:
                return kept[0]
            try:
                uri = await client.discover(door)
            except TapeTransient as e:
                if kept is None:
                    return e
                log.warning("%s; using what it said before (%s) for %.0f s more", e,
                            kept[0] or "no Tape REST API", min(self.ttl, STALE_RETRY))
                self._found[door] = (kept[0], self._clock() - self.ttl + min(self.ttl,
                                                                             STALE_RETRY))
                return kept[0]
            except TapeRestError as e:
                return e
            self._found[door] = (uri, self._clock())
            return uri


class TapeAccess:
    """The Tape REST side of the storage for runs: an aiohttp session presenting our
    credentials (``ssl_context``, and the bearer ``token`` if any: sent to the doors and the
    frontends on their hosts, see ``storage.tape``), the ``TapeClient`` over it and the
    ``TapeDirectory``. ``async with`` it; the daemon keeps one for its life, the CLI one per
    command. ``on_stage`` hears the result of every stage request (metrics)."""

    def __init__(self, ssl_context: Optional[ssl.SSLContext], settings: TapeSettings, *,
                 policy: Optional[RetryPolicy] = None,
                 on_stage: Optional[Callable[[str], None]] = None,
                 token: Optional[TokenSource] = None) -> None:
        self._settings = settings
        self.directory = TapeDirectory(settings.discovery_ttl, configured=settings.tape_api)
        self.slots = RequestSlots(settings.staging.max_requests)
        """Open stage requests per endpoint, shared by every run of this access."""
        self.staging = StagingFiles()
        """The files its runs follow a stage request for, each counted once (metrics)."""
        self._ssl = ssl_context
        self._policy = policy
        self._on_stage = on_stage
        self._token = token
        self.ready: Optional[Callable[[], Awaitable[None]]] = None
        """Awaited before every Tape REST request (the daemon: until its credentials are
        valid, so that an expired token pauses staging as it pauses touching)."""
        self._check: Optional[Callable[[], None]] = None
        self._session: Optional[aiohttp.ClientSession] = None
        self._retired: list[aiohttp.ClientSession] = []
        self._closing: set[asyncio.Task[None]] = set()
        self._client: Optional[TapeClient] = None

    @property
    def settings(self) -> TapeSettings:
        """The ``[storage]`` keys in force; set anew on a reload (the daemon's access lives on)."""
        return self._settings

    @settings.setter
    def settings(self, settings: TapeSettings) -> None:
        self._settings = settings
        self.directory.ttl = settings.discovery_ttl
        self.directory.configure(settings.tape_api)
        if self._client is not None:
            self._allow_configured(self._client)

    def _allow_configured(self, client: TapeClient) -> None:
        # Named in the config, not by a storage: a bearer token may go there (release too),
        # for as long as the config names them.
        client.configured = frozenset(
            host for host in (urlsplit(api.uri).hostname for api in self._settings.tape_api)
            if host is not None)

    @property
    def client(self) -> TapeClient:
        """The client; only inside ``async with``."""
        if self._client is None:
            raise RuntimeError("TapeAccess is not open: use async with")
        return self._client

    def _new_session(self) -> aiohttp.ClientSession:
        import aiohttp

        connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True,
                                         limit=16)
        return aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT))

    async def __aenter__(self) -> TapeAccess:
        self._session = self._new_session()
        self._client = TapeClient(self._session, stage_batch=self.settings.batch,
                                  policy=self._policy, on_stage=self._on_stage,
                                  token=self._token)
        self._client.ready = self.ready
        self._client.check = self._check
        self._allow_configured(self._client)
        return self

    def check_credentials_with(self, check: Callable[[], None]) -> None:
        """Call ``check`` before every Tape REST request: ``CredentialError`` stops the run
        with exit 3 (a command's expired proxy: staging went on with it, and a dataset all on
        tape ended with exit 5 "Server disconnected" after 8 tries)."""
        self._check = check
        if self._client is not None:
            self._client.check = check

    @property
    def token(self) -> Optional[TokenSource]:
        """The bearer token sent to the doors and their hosts' frontends (None: none)."""
        return self._token

    def install(self, ssl_context: Optional[ssl.SSLContext],
                token: Optional[TokenSource] = None) -> None:
        """Present ``ssl_context`` and send ``token`` (renewed credentials) from now on: new
        requests, those of stagers already running included, go through a new session;
        requests in flight end on the old one, which is closed once ``REQUEST_TIMEOUT`` (their
        longest) has passed, or with the access. (Kept to the end, a daemon leaked a session,
        its connector and its SSL context at every reload and proxy renewal.)"""
        self._ssl = ssl_context
        self._token = token
        if self._client is None:
            return
        self._client.use_token(token)
        if self._session is not None:
            old = self._session
            self._retired.append(old)
            asyncio.get_running_loop().call_later(REQUEST_TIMEOUT + 1.0, self._close_retired, old)
        self._session = self._client.session = self._new_session()

    def _close_retired(self, session: aiohttp.ClientSession) -> None:
        if session in self._retired:  # not yet closed with the access
            self._retired.remove(session)
            task = asyncio.ensure_future(session.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    @property
    def retired(self) -> int:
        """Sessions replaced by ``install`` and not closed yet (requests may still end on
        them)."""
        return len(self._retired) + len(self._closing)

    async def __aexit__(self, *exc: object) -> None:
        for session in [*self._retired, *([self._session] if self._session else [])]:
            await session.close()
        self._retired.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        self._session = self._client = None


Resume = Callable[[list[str]], Awaitable[dict[str, TapeInfo]]]
"""The stage requests earlier runs left open on some file URLs, whatever their age
(``StoreRecorder.open_stages``)."""

Touch = Callable[[FileRef, Optional[TapeInfo]], Awaitable[None]]
"""Queue a file for the touch, with what the tape path knows of it (None: its door has no
Tape REST API)."""


class TapeRouter:
    """One run's tape path; see the module. The engine calls ``route`` for each admitted
    chunk of one door, ``close`` after the last (it returns once every staged file has been
    handed to ``touch`` or ``finish``), and ``abort`` when the run stops early.

    ``touch`` queues a file for the touch; ``skip`` counts a fresh file found on disk (one
    touched within ``fresh_for``: not touched again); ``finish`` ends a file without touching it;
    ``fail`` stops the run (a refusal by the frontend while staging); ``note`` records what
    was learned (the state store); ``resume`` tells the stage requests earlier runs left open;
    ``deny`` (default: ``finish``) ends a file archiveinfo says we may not see, with the door
    it is on (the run's denial breaker counts it).
    """

    def __init__(self, access: TapeAccess, tally: TapeTally, *, touch: Touch,
                 skip: Callable[[FileRef], None],
                 finish: Callable[[Outcome], None], fail: Callable[[PrestagedError], None],
                 note: Optional[Callable[[str, TapeInfo], None]] = None,
                 probe: Optional[TapeProbe] = None, resume: Optional[Resume] = None,
                 clock: Callable[[], float] = time.time,
                 deny: Optional[Callable[[str, Outcome], None]] = None) -> None:
        self.access = access
        self.s = access.settings
        self.tally = tally
        self._touch = touch
        self._skip = skip
        self._finish = finish
        self._fail = fail
        self._deny = deny or (lambda door, outcome: finish(outcome))
        self._silent: dict[str, str] = {}  # door -> why its files fail: discovery unanswered
        self._note = note
        self._probe = probe
        self._resume = resume
        self._clock = clock  # the state's time (its database's): pins are compared with it
        self._stagers: dict[str, Stager] = {}
        self._pending: dict[str, dict[str, list[FileRef]]] = {}  # uri -> path -> its files
        self._lifetimes: dict[str, dict[str, float]] = {}  # uri -> request id -> pin asked
        self._tasks: list[asyncio.Task[None]] = []
        self._warned: set[str] = set()
        self._known: set[str] = set()  # endpoints that knew a path (or were warned they did not)
        self._unknown: Counter[str] = Counter()  # endpoint -> paths it did not know, so far
        self._asked: set[str] = set()  # paths put in a stage request (counted once)
        self._following: set[tuple[str, str]] = set()  # (uri, path) in access.staging
        token = access.token
        self._stage_scopes = ScopeWarner(token, "storage.stage") if token is not None else None

    async def route(self, door: str, files: Sequence[tuple[FileRef, str]],
                    fresh: frozenset[str] = frozenset()) -> None:
        """Send ``files`` (ref, https URL) of ``door`` where their locality says; those whose
        ref URL is in ``fresh`` are skipped while on disk (staged again when not)."""
        uri = None if door in self._silent else await self._endpoint(door)
        if door in self._silent:  # it did not say whether it has the API: no GET
            self._fail_all(files, self._silent[door])
            return
        if uri is None:
            for ref, _ in files:
                if ref.url in fresh:
                    self._skip(ref)
                else:
                    await self._touch(ref, None)
            return
        paths = [namespace_path(url, self.s.path_map) for _, url in files]
        try:
            found = await self._archiveinfo(uri, paths)
        except TapeTransient as e:  # this chunk's files, not the run (nor a GET)
            self._fail_all(files, f"locality unknown: {e}")
            return
        self._check_known(uri, paths, found)
        staged: list[str] = []
        for (ref, _), path in zip(files, paths):
            staged += await self._one(door, uri, ref, path, found.get(path), ref.url in fresh)
        if staged:
            await self._stage(uri, staged)

    def _fail_all(self, files: Sequence[tuple[FileRef, str]], why: str) -> None:
        for ref, _ in files:
            self._finish(_ended(ref, Result.FAILED, why, None))

    async def _endpoint(self, door: str) -> Optional[str]:
        """``door``'s Tape REST endpoint, or None (touch its files); a door that did not
        answer is put in ``_silent`` for the rest of the run (its files fail)."""
        found = await self.access.directory.lookup(self.access.client, door)
        # A door we cannot connect to, or that hangs up on every try before answering (how
        # one refusing our certificate looks under TLS 1.3), holds no door thread for a GET:
        # its files are touched, and the touches' breakers say why (exit 3 for a refusal).
        unreachable = isinstance(found, (TapeUnreachable, TapeDropped))
        if isinstance(found, TapeTransient) and not unreachable:
            self._silent[door] = (f"{found}: the door did not say whether it has a Tape REST "
                                  "API; not read through it, where a tape-only file would hold "
                                  "a door thread (a later run asks again)")
            log.warning("%s; its files fail in this run", found)
            return None
        if isinstance(found, TapeRestError):
            if self.s.mode == "always":
                raise StorageError(f"{found} (storage.stage = always)")
            if door not in self._warned:
                self._warned.add(door)
                # Unreachable: its touches fail the same way and the breakers say why.
                level = logging.INFO if unreachable else logging.WARNING
                log.log(level, "%s; touching its files without asking their locality", found)
            found = None
        elif found is None and self.s.mode == "always":
            raise StorageSetupError(f"{door} publishes no WLCG Tape REST API (no "
                                    "/.well-known/wlcg-tape-rest-api); storage.stage = always "
                                    "needs it, or a [[storage.tape_api]] entry naming it for "
                                    "this door (auto touches such files directly)")
        self.tally.endpoints[door] = found
        return found

    async def _archiveinfo(self, uri: str, paths: list[str]) -> dict[str, FileLocality]:
        """Locality of ``paths``. Paths the server left out of its answer (dCache answers at
        most 10,000 a request and drops the rest without a word) are asked again at once,
        paths answered with an unclear error after a backoff, ``ARCHIVEINFO_TRIES`` times in
        all. ``TapeTransient`` when a request fails until the client's policy gives up."""
        client = self.access.client
        found = await client.archiveinfo(uri, paths)
        for tries in range(1, ARCHIVEINFO_TRIES):
            unclear = [p for p in dict.fromkeys(paths) if p in found and _unclear(found[p])]
            again = [p for p in dict.fromkeys(paths) if p not in found] + unclear
            if not again:
                break
            if unclear:
                delay = client.policy.backoff(tries)
                log.info("%s/archiveinfo: %d paths answered with an error such as %r; asking "
                         "again in %.1f s", uri, len(unclear), found[unclear[0]].error, delay)
                await client.sleep(delay)
            for i in range(0, len(again), ARCHIVEINFO_BATCH):
                found.update(await client.archiveinfo(uri, again[i:i + ARCHIVEINFO_BATCH]))
        return found

    def _check_known(self, uri: str, paths: list[str], found: dict[str, FileLocality]) -> None:
        """Warn once per endpoint when it knows none of the first ``UNKNOWN_HINT`` or more paths
        asked: the URLs' paths are most likely not its namespace paths (``path_map``)."""
        if uri in self._known:
            return
        unknown = [p for p in paths if p in found and found[p].locality is None
                   and _path_error(found[p].error) is Result.MISSING]
        if len(unknown) < len(paths):
            self._known.add(uri)  # it knows some: a missing file is just missing
            return
        self._unknown[uri] += len(unknown)
        if self._unknown[uri] >= UNKNOWN_HINT:
            self._known.add(uri)  # said once
            log.warning("%s/archiveinfo knows none of the %d paths asked (%s: %s); if the "
                        "storage's namespace path is not the URL's path (a door with a "
                        "webdav.root), map them with [[storage.path_map]]", uri,
                        self._unknown[uri], unknown[0], found[unknown[0]].error)

    async def _one(self, door: str, uri: str, ref: FileRef, path: str,
                   answer: Optional[FileLocality], fresh: bool) -> list[str]:
        """Route one file of ``door``; the paths (zero or one) to stage."""
        if answer is None:
            self._finish(_ended(ref, Result.FAILED, f"{uri}/archiveinfo did not answer for "
                                f"it, {ARCHIVEINFO_TRIES} times", None))
            return []
        if answer.locality is None:
            result = _path_error(answer.error)
            outcome = _ended(ref, result, f"archiveinfo: {answer.error}", None)
            if result is Result.DENIED:
                self._deny(door, outcome)
            else:
                self._finish(outcome)
            return []
        where = answer.locality
        self.tally.located[where.value] += 1
        info = TapeInfo(where.value)
        if self._note is not None:
            self._note(ref.url, info)
        if where.on_disk:
            if fresh:
                self._skip(ref)
            else:
                await self._touch(ref, info)
            return []
        if where is not Locality.TAPE:
            self._finish(_ended(ref, Result.FAILED, _UNREADABLE[where], info))
            return []
        if self._stage_scopes is not None:
            self._stage_scopes.see(uri, path)
        waiting = self._pending.setdefault(uri, {}).setdefault(path, [])
        waiting.append(ref)
        return [path] if len(waiting) == 1 else []

    async def _stage(self, uri: str, paths: list[str]) -> None:
        """Stage ``paths``; those an earlier run's request is still bringing to disk (at this
        endpoint) are followed in that request instead, unless it was made more than
        ``storage.stage_timeout`` ago: then it is cancelled and the paths asked for anew."""
        stager = self._stager(uri)
        pending = self._pending[uri]
        earlier = {} if self._resume is None else await self._resume(
            [ref.url for path in paths for ref in pending[path]])
        follow: dict[str, list[str]] = {}
        stale: dict[str, list[str]] = {}
        made: dict[str, TapeInfo] = {}
        fresh = []
        now = self._clock()
        for path in paths:
            info = next((earlier[r.url] for r in pending[path] if r.url in earlier), None)
            if info is None or info.request is None or info.uri != uri:
                fresh.append(path)
                continue
            made[info.request] = info
            if info.requested_at is not None and \
                    now - info.requested_at >= self.s.staging.timeout:
                stale.setdefault(info.request, []).append(path)
                fresh.append(path)
            else:
                follow.setdefault(info.request, []).append(path)
        for request, cancelled in stale.items():
            await self._cancel_stale(uri, stager, made[request], cancelled)
        for request, followed in follow.items():
            log.info("following stage request %s of an earlier run for %d files", request,
                     len(followed))
            self._asked_for(uri, followed)
            self._adopted(uri, made[request], followed)
            # Its timeout runs from when the server accepted it, as the state recorded (not
            # from this rerun, nor from a pin lifetime that may have changed since).
            when = made[request].requested_at
            stager.adopt(request, followed, 0.0 if when is None else now - when)
        if fresh:
            stager.add(fresh)

    async def _cancel_stale(self, uri: str, stager: Stager, info: TapeInfo,
                            paths: list[str]) -> None:
        """Cancel ``paths`` in an earlier run's request ``info``, made more than
        ``storage.stage_timeout`` ago and never seen to land or end (its run stopped first:
        a crash, a Ctrl-C, a ``wait`` that gave up), as that run's timeout would have; note
        that it ended for them (``status`` showed them staging for ever). A cancel that fails
        is logged: the paths are asked for anew all the same."""
        assert info.request is not None
        log.info("cancelling stage request %s of an earlier run for %d files: made more than "
                 "stage_timeout (%gs) ago without bringing them to disk", info.request,
                 len(paths), self.s.staging.timeout)
        try:
            await stager.client.cancel(uri, info.request, paths)
        except (TapeRestError, CredentialError) as e:  # made under other credentials?
            log.warning("%s; stage request %s of an earlier run was not cancelled: its pins "
                        "end on their own", e, info.request)
        ended = TapeInfo("TAPE", info.request, uri, ended_at=self._clock())
        self._note_request(uri, info.request, paths, ended)

    def _stager(self, uri: str) -> Stager:
        stager = self._stagers.get(uri)
        if stager is None:
            stager = self._stagers[uri] = Stager(
                self.access.client, uri, self.s.staging,
                on_request=lambda r: self._requested(uri, r),
                on_follow=lambda r, age: self._requested(uri, r, age), slots=self.access.slots,
                hopeless=self._unstageable)
            self._tasks.append(asyncio.create_task(self._land(uri, stager)))
        return stager

    def _requested(self, uri: str, request: StageRequest, age: float = 0.0) -> None:
        """A stage request was made ``age`` seconds ago (by this run, or by another run of the
        daemon that this one follows): note it on each of its files, with when it was made and
        the pin it asked for (its pin's end is known once the file lands)."""
        lifetime = self.s.staging.lifetime
        self._lifetimes.setdefault(uri, {})[request.id] = lifetime
        self._note_request(uri, request.id, request.paths,
                           TapeInfo("TAPE", request.id, uri, requested_at=self._clock() - age,
                                    lifetime=lifetime))
        self._asked_for(uri, request.paths)

    def _adopted(self, uri: str, info: TapeInfo, paths: Sequence[str]) -> None:
        """An earlier run's request ``info`` (as the state recorded it) is followed for
        ``paths``: this run's definition relies on its pin too. Its pin lasts the lifetime that
        request asked for, whatever ``storage.pin_lifetime`` says today."""
        assert info.request is not None
        lifetime = self.s.staging.lifetime if info.lifetime is None else info.lifetime
        self._lifetimes.setdefault(uri, {})[info.request] = lifetime
        self._note_request(uri, info.request, paths, info)

    def _note_request(self, uri: str, request: str, paths: Sequence[str],
                      info: TapeInfo) -> None:
        """Note ``info`` (request ``request`` made or followed) on the files of ``paths``."""
        if self._note is None:
            return
        pending = self._pending.get(uri, {})
        for path in paths:
            for ref in pending.get(path, ()):
                self._note(ref.url, info)

    def _asked_for(self, uri: str, paths: Sequence[str]) -> None:
        """``paths`` are in a stage request (ours or an earlier run's): count them as asked,
        once each (a path asked again after FAILED or a lost request counts once), and as
        staging while this run follows them, once each whatever other runs follow them too."""
        fresh = [p for p in paths if p not in self._asked]
        self._asked.update(fresh)
        self.tally.requested += len(fresh)
        started = 0
        for path in paths:
            key = (uri, path)
            if key not in self._following:
                self._following.add(key)
                if self.access.staging.begin(key):
                    started += 1
        if self._probe is not None and started:
            self._probe.staging(started)

    def _unfollow(self, key: tuple[str, str]) -> None:
        """This run no longer follows ``key``: it leaves staging if no other run does."""
        if key in self._following:
            self._following.discard(key)
            if self.access.staging.end(key) and self._probe is not None:
                self._probe.staging(-1)

    async def _land(self, uri: str, stager: Stager) -> None:
        """Hand each file of ``uri``'s stager on as it lands (or fails)."""
        try:
            async for staged in stager.landed():
                await self._landed(uri, staged)
        except PrestagedError as e:
            self._fail(e)

    async def _landed(self, uri: str, staged: Staged) -> None:
        files = self._pending.get(uri, {}).pop(staged.path, [])
        key = (uri, staged.path)
        first = staged.on_disk and self.access.staging.landed(key)
        self._unfollow(key)
        now = self._clock()
        if not staged.on_disk:
            # Timed out (and cancelled), failed twice, cancelled or lost: no longer staging,
            # and nobody relies on that request for these files.
            info = TapeInfo("TAPE", staged.request_id, uri, ended_at=now)
            for ref in files:
                if self._note is not None and staged.request_id is not None:
                    self._note(ref.url, info)
                self._finish(_ended(ref, Result.FAILED, staged.error, info))
            if self._unstageable(staged.path):
                self._fail(self._no_stage_right(uri, staged))
            return
        self.tally.on_disk += 1
        if self._probe is not None and first:  # once per landing, however many runs saw it
            self._probe.file_staged(staged.seconds)
        # A pin starts when the file is pinned on disk, not when it was asked for: its end is
        # this landing (seen at most one poll after it) plus the lifetime its request asked.
        lifetime = self._lifetimes.get(uri, {}).get(staged.request_id or "",
                                                    self.s.staging.lifetime)
        info = TapeInfo("TAPE", staged.request_id, uri, now, now + lifetime)
        for ref in files:
            if self._note is not None:
                self._note(ref.url, info)
            await self._touch(ref, info)

    def _unstageable(self, path: str) -> bool:
        """Whether the token's scopes surely do not let it stage ``path`` (as the
        ``storage.stage`` warning judged). A token whose rights come from its groups (no
        ``storage.*`` scope) is not judged: its failures are the storage's."""
        token = self.access.token
        return token is not None and scopes_refuse(token.info, "storage.stage", path)

    def _no_stage_right(self, uri: str, staged: Staged) -> CredentialError:
        """The run's end (exit 3) when a stage the token cannot make failed: the token, not
        the storage, is what to change."""
        assert self.access.token is not None
        why = staged.error[len("stage failed: "):] if staged.error.startswith(
            "stage failed: ") else staged.error
        return CredentialError(
            f"{self.access.token.info.describe()}: {uri} did not stage {staged.path} ({why}); "
            "staging from tape needs a storage.stage scope covering the files' paths, and this "
            "token has none (ask for one: htgettoken --scopes)")

    async def close(self) -> None:
        """No more files: wait until every staged file was handed on."""
        for stager in self._stagers.values():
            stager.close()
        if self._tasks:
            await asyncio.gather(*self._tasks)

    async def abort(self) -> None:
        """Stop staging now (the run is ending early); open requests stay on the server,
        noted in the state, for ``prestaged release``. Stage POSTs already sent get
        ``STAGE_ANSWER_GRACE`` seconds to answer, so that the requests they made are noted
        too (``Stager.settle``)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        sent = sum(stager.unanswered for stager in self._stagers.values())
        if sent:
            what = ("the answer of a stage request" if sent == 1 else
                    f"the answers of {sent} stage requests")
            log.info("stopping: waiting up to %g s for %s already sent, to keep the requests "
                     "made", STAGE_ANSWER_GRACE, what)
        try:
            await asyncio.gather(*(stager.settle(STAGE_ANSWER_GRACE)
                                   for stager in self._stagers.values()))
        finally:  # a second Ctrl-C (cancelled here) leaves no file counted as staging
            for key in list(self._following):
                self._unfollow(key)  # no longer followed by this run


def _path_error(error: str) -> Result:
    """What a per-path archiveinfo error means: ``MISSING``, ``DENIED``, or ``FAILED`` for
    one that says neither (asked again, then failed with it)."""
    text = error.lower()
    if any(words in text for words in _MISSING):
        return Result.MISSING
    if any(words in text for words in _DENIED):
        return Result.DENIED
    return Result.FAILED


def _unclear(answer: FileLocality) -> bool:
    """An error answer that says neither missing nor denied: worth asking again."""
    return answer.locality is None and _path_error(answer.error) is Result.FAILED


def _ended(ref: FileRef, result: Result, error: str, info: Optional[TapeInfo]) -> Outcome:
    return Outcome(url=ref.url, name=ref.name, result=result, status=None, bytes=0,
                   attempts=0, elapsed=0.0, error=error, tape=info)
