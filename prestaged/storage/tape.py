"""The WLCG Tape REST API v1 as dCache serves it: discovery, locality in bulk, staging, pins.

How the real movers (FTS3, gfal2, Rucio) talk to a tape-backed dCache, and what issue 13's
engine builds on (``reference/tape-rest.md`` has the facts):

* ``discover(door)``: ``GET <door>/.well-known/wlcg-tape-rest-api`` once per storage endpoint;
  the ``v1`` entry's ``uri`` is the frontend, usually on another port (3880) than the WebDAV door
  (2880): never assume the door's host:port. None when the door has no such document (404).
* ``archiveinfo(uri, paths)``: locality of many paths per request (at most ``ARCHIVEINFO_BATCH``;
  dCache silently answers only the first 10,000 of a longer list), matched by path, not position.
* ``stage(uri, paths, lifetime)``: stage requests of at most ``stage_batch`` paths (dCache refuses
  more than 500 with 413: a 413 halves the batch, remembered for that endpoint, and sends
  again); 429 and 503 are back-pressure, never a file's failure. A stage POST is not
  idempotent: it is sent again only when it surely made no request (429/503, or no connection
  at all); a timeout, a dropped connection or a 5xx after it was sent is ``StageUncertain``.
* ``poll(uri, id)``: a request's files; ``state`` and the spec's ``onDisk`` forms, ``CANCELLED``
  and gfal2's ``CANCELED``, any order, partial lists; a request the server forgot (404) says so.
* ``cancel``, ``release``: for the files of one request; never sent for no files (dCache
  cancels a whole request for an empty list).

Paths are sent as dCache's ``FsPath`` spells them (``fs_path``: no ``//``, ``.`` or ``..``,
no trailing ``/``), as gfal2 does: dCache stores a stage request's targets so and lists them so
in a poll (it would answer ``/a/b`` for a file asked as ``/a//b``), and a cancel naming a path
otherwise is refused. Answers are matched by that spelling too: ``archiveinfo`` gives each path
under the spelling it was asked by, ``poll`` lists files under ``fs_path``.

Every stage POST is reported to the optional ``on_stage`` hook with one of ``STAGE_RESULTS``
(the metrics count them; the client knows nothing of Prometheus): ``accepted`` (2xx),
``too_large`` (413, the batch is halved), ``throttled`` (each 429 or 503, waited out) or
``refused`` (any other answer, or none: a dropped connection or a timeout).

Errors: 401/403 are ``CredentialError`` naming the right staging needs (a WLCG token needs
``storage.stage``; ``storage.read`` cannot recall) and, with a token, the token; other refusals
are ``TapeRestError`` (exit 5) with the server's RFC 7807 ``detail``. Passing failures are
``TapeTransient``: a 5xx or 429 (``TapeBusy`` for 429/503: back-pressure), no answer, and for
the bulk service's requests (stage, poll) dCache's bare 400, which its frontend answers when its
message to the bulk service timed out. A call waits them out by ``policy`` (``Retry-After``
honoured, at least ``MIN_RETRY_AFTER``) and then raises them; ``patient=False`` raises them at
once, for a caller that retries on a schedule of its own (the stager's polls). The session
(client certificate) is the caller's.

A bearer token (``token``) goes to the doors (discovery) and to the frontends on a door's host:
the frontend's address comes from the document a door serves, so a frontend on another host
(another port of the door's host is fine: dCache's frontend listens on 3880, its WebDAV door on
2880) never gets it, and is warned about once. The hosts allowed are those of the doors
``discover`` was asked about, or named to ``allow`` (releasing pins recorded by an earlier run);
https only. aiohttp itself drops it on a redirect to another origin.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Optional, Union
from urllib.parse import quote, urlsplit

from prestaged.errors import CredentialError, StorageError
from prestaged.model import error_text, host_start, usable_origin
from prestaged.net import bearer_error, parse_retry_after, tls_cause
from prestaged.retry import MIN_RETRY_AFTER, RetryPolicy

if TYPE_CHECKING:
    import aiohttp

    from prestaged.tokens import TokenSource

__all__ = [
    "ARCHIVEINFO_BATCH",
    "BUSY",
    "DISCOVERY_PATH",
    "MIN_RETRY_AFTER",
    "STAGE_RESULTS",
    "FileLocality",
    "FileStage",
    "Locality",
    "StageRequest",
    "StageStatus",
    "StageUncertain",
    "TapeBusy",
    "TapeClient",
    "TapeDropped",
    "TapeRestError",
    "TapeTransient",
    "TapeUnreachable",
    "fs_path",
]

log = logging.getLogger(__name__)

DISCOVERY_PATH = "/.well-known/wlcg-tape-rest-api"
ARCHIVEINFO_BATCH = 1000
"""Paths per archiveinfo request (dCache answers at most 10,000 and drops the rest silently)."""
MAX_ANSWER = 8 << 20
"""Bytes of one answer read at most (an archiveinfo of 1,000 paths is about 100 KiB)."""
STAGE_LIMIT = 500
"""dCache's ``bulk.limits.max.targets-per-flat-request``: more paths per request get 413."""
STAGE_RESULTS = ("accepted", "too_large", "throttled", "refused")
"""What ``TapeClient(on_stage=...)`` is called with, once per stage POST (see the module)."""
BUSY = (429, 503)
"""Statuses of back-pressure: the server did nothing with the request and asks for patience."""


_NO_DISCOVERY = (401, 403, 404, 405)
_NO_DISCOVERY_WITH_TOKEN = (403, 404, 405)
"""Answers to the discovery GET that mean "no Tape REST API published here"."""


class TapeRestError(StorageError):
    """The Tape REST API refused a request or answered something we cannot read (exit 5)."""


class TapeTransient(TapeRestError):
    """A passing failure (see the module): another try later may well succeed.
    ``retry_after``: the seconds the server asked us to wait (None: it did not say)."""

    def __init__(self, message: str, retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TapeBusy(TapeTransient):
    """429 or 503: back-pressure. The request was not carried out (a stage POST so answered
    made no request)."""


class TapeUnreachable(TapeTransient):
    """No connection could be made (refused, timed out connecting, TLS handshake failed, or a
    TLS alert refusing our certificate right after it): nothing was acted upon."""


class TapeDropped(TapeTransient):
    """The connection was made, then closed (reset, hung up) before any answer, without a TLS
    alert: how a server dropping an unmapped certificate looks (XRootD's ``http.gridmap
    required``), as well as a server restarting."""


class StageUncertain(TapeRestError):
    """A stage POST that may have reached the server but whose answer was lost (a timeout or a
    dropped connection after it was sent, a 5xx, dCache's bare 400): the server may have made
    a request we will never hear of, so it is not sent again (a second one would pin twice)."""


class Locality(str, enum.Enum):
    """Where a file's replicas are (``archiveinfo``)."""

    DISK = "DISK"
    TAPE = "TAPE"
    DISK_AND_TAPE = "DISK_AND_TAPE"
    LOST = "LOST"
    NONE = "NONE"
    UNAVAILABLE = "UNAVAILABLE"

    @property
    def on_disk(self) -> bool:
        """A ranged GET reads it from disk now (no recall)."""
        return self in (Locality.DISK, Locality.DISK_AND_TAPE)


@dataclass(frozen=True)
class FileLocality:
    """One path's answer: a ``locality``, or the server's ``error`` for it (unknown path...)."""

    path: str
    locality: Optional[Locality]
    error: str = ""


class StageState(str, enum.Enum):
    """A file's state in a stage request (``CANCELED``, gfal2's spelling, is read as this)."""

    SUBMITTED = "SUBMITTED"
    STARTED = "STARTED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


@dataclass(frozen=True)
class FileStage:
    """One file of a stage request as a poll shows it."""

    path: str
    state: StageState
    error: str = ""

    @property
    def done(self) -> bool:
        """Nothing more will happen to it in this request."""
        return self.state in (StageState.COMPLETED, StageState.FAILED, StageState.CANCELLED)


@dataclass(frozen=True)
class StageRequest:
    """A stage request the server accepted: its id and the paths it covers."""

    id: str
    paths: tuple[str, ...]


@dataclass(frozen=True)
class StageStatus:
    """A poll's answer: the files it listed, by path (possibly not all of the request's), or
    ``found = False`` when the server no longer knows the request (404)."""

    id: str
    files: dict[str, FileStage] = field(default_factory=dict)
    found: bool = True


Sleep = Callable[[float], Awaitable[None]]
Observe = Callable[[Optional[int]], None]
"""Called once per try of a request with its HTTP status (None: no answer)."""


@dataclass(frozen=True)
class _How:
    """How ``TapeClient._call`` reads the answers to one request (see there)."""

    allow: tuple[int, ...]
    observe: Optional[Observe]
    once: bool
    passing: Callable[[int, str], bool]


def fs_path(path: str) -> str:
    """``path`` as dCache's ``FsPath`` resolves it: empty and ``.`` elements dropped, ``..``
    taken back (never above the root), no trailing ``/``: ``/pnfs//a/./b/`` is ``/pnfs/a/b``."""
    parts: list[str] = []
    for element in path.split("/"):
        if element == "..":
            if parts:
                parts.pop()
        elif element not in ("", "."):
            parts.append(element)
    return "/" + "/".join(parts)


def _host(url: str) -> Optional[str]:
    """The lower-case host of an ``https`` URL (None for any other scheme or no host)."""
    try:
        parts = urlsplit(url)
        return parts.hostname if parts.scheme == "https" else None
    except ValueError:
        return None


class TapeClient:
    """The Tape REST API over the caller's ``session`` (its TLS context authenticates) and
    ``token`` (default None: a bearer token sent where the module says).

    ``stage_batch``: paths per stage request (default 200, as FTS3; at most 500). ``policy``:
    how passing failures (back-pressure, 5xx, dropped connections) are waited out (attempts,
    time budget, ``Retry-After``). ``sleep`` is ``asyncio.sleep`` and ``clock``
    ``time.monotonic`` (tests replace them; seconds). ``on_stage`` (default None) is called
    with one of ``STAGE_RESULTS`` for every stage POST, retries included.
    """

    def __init__(self, session: aiohttp.ClientSession, *, stage_batch: int = 200,
                 policy: Optional[RetryPolicy] = None, sleep: Sleep = asyncio.sleep,
                 on_stage: Optional[Callable[[str], None]] = None,
                 token: Optional[TokenSource] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 1 <= stage_batch <= STAGE_LIMIT:
            raise ValueError(f"stage_batch must be 1..{STAGE_LIMIT}, got {stage_batch}")
        self.session = session
        self.stage_batch = stage_batch
        self.policy = policy or RetryPolicy(attempts=8, initial=1.0, max=60.0, total=600.0)
        self._sleep = sleep
        self._clock = clock
        self._limits: dict[str, int] = {}
        """Endpoint URI -> paths per stage request it took, learned from its 413s."""
        self._on_stage = on_stage
        self._token = token
        self.ready: Optional[Callable[[], Awaitable[None]]] = None
        """Awaited before every request (the daemon: until its credentials are valid)."""
        self.check: Optional[Callable[[], None]] = None
        """Called before every request: ``CredentialError`` when the credentials presented
        cannot be used now (a command's expired proxy)."""
        self._hosts: set[str] = set()
        """Hosts the token may go to: those of the doors (see the module)."""
        self.configured: frozenset[str] = frozenset()
        """Hosts the token may go to as well: those of ``[[storage.tape_api]]`` entries (set
        anew when the config is)."""
        self._warned: set[str] = set()

    @property
    def sleep(self) -> Sleep:
        """How this client waits (``asyncio.sleep``, or a test's): its callers back off with
        it too."""
        return self._sleep

    def batch_for(self, uri: str) -> int:
        """Paths per stage request to ``uri`` now: ``stage_batch``, or fewer once ``uri``
        refused a bigger request with 413 (remembered for the client's life)."""
        return min(self.stage_batch, self._limits.get(uri, STAGE_LIMIT))

    def use_token(self, token: Optional[TokenSource]) -> None:
        """Send ``token`` from now on (a renewal the daemon found on reload); None: none."""
        self._token = token

    def allow(self, door: str) -> None:
        """Let the token go to ``door``'s host (an ``https`` URL of the storage: a door, or a
        file on it), and so to a frontend there."""
        host = _host(door)
        if host is not None:
            self._hosts.add(host)

    def _authorization(self, url: str) -> Optional[str]:
        """The ``Authorization`` value for a request to ``url`` starting now, if it gets one;
        ``CredentialError`` when the token cannot be used now."""
        if self._token is None or not self._trusted(_host(url)):
            return None
        return self._token.authorization()

    def _trusted(self, host: Optional[str]) -> bool:
        return host is not None and (host in self._hosts or host in self.configured)

    def _check_frontend(self, door: str, uri: str) -> None:
        if self._token is not None and not self._trusted(_host(uri)) and uri not in self._warned:
            self._warned.add(uri)
            log.warning("%s: its Tape REST API %s is on another host: the bearer token is not "
                        "sent there (only to the storage's doors' hosts)", door, error_text(uri))

    # --- discovery and locality -------------------------------------------------------------

    async def discover(self, door: str) -> Optional[str]:
        """The v1 endpoint URI advertised by ``door`` (``https://host:port``), or None when the
        door publishes no Tape REST API: 404, or a refusal of the path (dCache serves the
        document to anyone; XRootD answers 403 "Opening path ... is disallowed", a plain web
        server may answer 401 or 405). ``TapeRestError`` for a document we cannot read (the
        caller decides: ``stage = auto`` warns and reads by GET, ``always`` fails);
        ``TapeUnreachable`` when no connection to the door can be made (not retried: its
        touches cannot block it either, and fail the same way, breakers included); another
        ``TapeTransient`` when the door answered 5xx, or nothing, until the policy gave up:
        that says nothing of the API, and a GET there of a tape-only file would hold a door
        thread for minutes."""
        url = door.rstrip("/") + DISCOVERY_PATH
        self.allow(door)
        # dCache serves the document to anyone but answers 401 to a token it cannot verify:
        # with a token sent, 401 is that token refused (exit 3), not "no API here" (and each
        # further 401 would count toward dCache's block of the client).
        allow = _NO_DISCOVERY if self._token is None else _NO_DISCOVERY_WITH_TOKEN
        status, doc = await self._call("GET", url, None, allow=allow, reconnect=False)
        if status in _NO_DISCOVERY:
            log.debug("%s: %d, so no Tape REST API there", url, status)
            return None
        endpoints = doc.get("endpoints") if isinstance(doc, dict) else None
        if not isinstance(endpoints, list):
            raise TapeRestError(f"{url}: no endpoints list in the discovery document")
        uris = {str(e.get("version")): e.get("uri") for e in endpoints if isinstance(e, dict)}
        uri = uris.get("v1")
        if not isinstance(uri, str) or uri[:8].lower() != "https://":
            raise TapeRestError(f"{url}: no https v1 endpoint in the discovery document "
                                f"(versions: {', '.join(sorted(uris)) or 'none'})")
        if not usable_origin(uri):
            raise TapeRestError(f"{url}: the discovery document's v1 uri is no usable URL: "
                                f"{error_text(uri)}")
        if "@" in uri[:host_start(uri)] or any(c in uri for c in "?#"):
            # Userinfo beside our token was a traceback; a query or fragment would swallow the
            # paths we append to the uri.
            raise TapeRestError(f"{url}: the discovery document's v1 uri has a user, a query "
                                f"or a fragment: {error_text(uri)}")
        self._check_frontend(door, uri)
        return uri.rstrip("/")

    async def archiveinfo(self, uri: str, paths: Sequence[str]) -> dict[str, FileLocality]:
        """Locality of every path (batches of ``ARCHIVEINFO_BATCH``), under the spelling it
        was asked by (see the module). A path the server did not answer is absent from the
        result (the caller asks again)."""
        out: dict[str, FileLocality] = {}
        for i in range(0, len(paths), ARCHIVEINFO_BATCH):
            asked: dict[str, list[str]] = {}  # fs_path -> the spellings asked
            for path in dict.fromkeys(paths[i:i + ARCHIVEINFO_BATCH]):
                asked.setdefault(fs_path(path), []).append(path)
            _, doc = await self._call("POST", f"{uri}/archiveinfo", {"paths": list(asked)})
            if not isinstance(doc, list):
                raise TapeRestError(f"{uri}/archiveinfo: expected a list, got "
                                    f"{type(doc).__name__}")
            for item in doc:
                answer = _file_locality(item)
                if answer is None:
                    continue
                for path in asked.get(fs_path(answer.path), ()):
                    # A path answered twice keeps the answer that does not send it to the
                    # door: "TAPE" then "DISK" must not make us range-read a tape-only file.
                    earlier = out.get(path)
                    if earlier is None or _on_disk(earlier) >= _on_disk(answer):
                        out[path] = replace(answer, path=path)
        return out

    # --- staging ----------------------------------------------------------------------------

    async def stage(self, uri: str, paths: Sequence[str], lifetime: float, *,
                    most: Optional[int] = None,
                    on_made: Optional[Callable[[StageRequest], None]] = None,
                    patient: bool = True) -> list[StageRequest]:
        """Stage ``paths`` with a pin of ``lifetime`` seconds, ``batch_for(uri)`` paths a
        request (halved on 413, remembered); returns the requests made, in order.

        ``most`` (default None: as many as needed): make at most so many requests; the paths
        left are not sent (those in no request returned). ``on_made`` hears each request the
        moment it was accepted, so that none is lost when a later one fails. ``patient``
        (default True): back-pressure and failed connections are waited out by the policy;
        False: ``TapeBusy``/``TapeUnreachable`` at once (nothing of that try was made).
        ``StageUncertain`` when a try may have made a request we did not hear of."""
        made: list[StageRequest] = []
        todo = list(dict.fromkeys(paths))
        while todo and (most is None or len(made) < most):
            batch = self.batch_for(uri)
            chunk, rest = todo[:batch], todo[batch:]
            body = {"files": [{"path": fs_path(p), "diskLifetime": _iso_duration(lifetime)}
                              for p in chunk]}
            status, doc = await self._call("POST", f"{uri}/stage", body, allow=(413,),
                                           observe=self._stage_answered, patient=patient,
                                           once=True, passing=_passing_bulk)
            if status == 413:
                if len(chunk) == 1:
                    raise TapeRestError(f"{uri}/stage: refused a request of one path (413)")
                self._limits[uri] = max(1, len(chunk) // 2)
                log.info("%s/stage: 413 for %d paths; sending %d a request from now on", uri,
                         len(chunk), self._limits[uri])
                continue
            request_id = doc.get("requestId") if isinstance(doc, dict) else None
            if not isinstance(request_id, str) or not request_id:
                raise TapeRestError(f"{uri}/stage: accepted, but named no requestId")
            request = StageRequest(request_id, tuple(chunk))
            made.append(request)
            if on_made is not None:
                on_made(request)
            todo = rest
        return made

    def _stage_answered(self, status: Optional[int]) -> None:
        if self._on_stage is not None:
            self._on_stage(_stage_result(status))

    async def poll(self, uri: str, request_id: str, *, patient: bool = True) -> StageStatus:
        """Request ``request_id``'s files as the server lists them now, by ``fs_path``.
        ``patient`` False: a passing failure is raised at once (the caller polls again)."""
        status, doc = await self._call("GET", f"{uri}/stage/{_segment(request_id)}", None,
                                       allow=(404,), patient=patient, passing=_passing_bulk)
        if status == 404:
            return StageStatus(request_id, found=False)
        files = doc.get("files") if isinstance(doc, dict) else None
        if not isinstance(files, list):  # a proxy's page, say: worth polling again
            raise TapeTransient(f"{uri}/stage/{request_id}: no files list in the answer")
        out: dict[str, FileStage] = {}
        for item in files:
            stage = _file_stage(item)
            if stage is not None:
                out[fs_path(stage.path)] = stage
        return StageStatus(request_id, out)

    async def cancel(self, uri: str, request_id: str, paths: Sequence[str]) -> None:
        """Cancel ``paths`` of request ``request_id`` (a request the server forgot is fine).
        No paths: nothing is sent, for dCache cancels the whole request when the list is
        empty (``BulkService``: an empty ``paths`` means every target)."""
        if not paths:
            return
        await self._call("POST", f"{uri}/stage/{_segment(request_id)}/cancel",
                         {"paths": [fs_path(p) for p in paths]}, allow=(404,))

    async def release(self, uri: str, request_id: str, paths: Sequence[str]) -> None:
        """Drop the pins request ``request_id`` made on ``paths`` (none: nothing is sent; each
        release is a bulk request of its own on dCache, counted toward the user's quota)."""
        if not paths:
            return
        await self._call("POST", f"{uri}/release/{_segment(request_id)}",
                         {"paths": [fs_path(p) for p in paths]}, allow=(404,))

    # --- one call ---------------------------------------------------------------------------

    async def _call(self, method: str, url: str, body: Optional[Mapping[str, Any]],
                    allow: tuple[int, ...] = (),
                    observe: Optional[Observe] = None, *,
                    patient: bool = True, reconnect: bool = True, once: bool = False,
                    passing: Optional[Callable[[int, str], bool]] = None) -> tuple[int, Any]:
        """(status, JSON document) of ``method url``; ``allow``ed statuses are returned with
        None. ``observe`` hears every try's status (None: no answer).

        A passing failure (``TapeTransient``) is no connection, no answer, or an answer that
        ``passing(status, text)`` (default ``_passing``) says is one. ``patient``: wait those
        out by the policy, then raise the last; else raise it at once. ``reconnect`` False: a
        connection that cannot be made raises ``TapeUnreachable`` at once. ``once`` (a
        request that is not idempotent): anything after which the server may have acted (no
        answer once sent, a passing answer other than ``BUSY``) is ``StageUncertain``."""
        how = _How(allow, observe, once, passing or _passing)
        tries = 0
        start = self._clock()
        while True:
            tries += 1
            answer = await self._try(method, url, body, how)
            if not isinstance(answer, TapeTransient):
                return answer
            if not patient or (not reconnect and isinstance(answer, TapeUnreachable)):
                raise answer
            delay = self.policy.delay(tries, retry_after=answer.retry_after,
                                      elapsed=self._clock() - start)
            why = str(answer.args[0]).removeprefix(f"{url}: ")
            if delay is None:
                raise type(answer)(f"{url}: gave up after {tries} tries: {why}",
                                   answer.retry_after)
            log.info("%s: %s; trying again in %.1f s", url, why, delay)
            await self._sleep(delay)

    async def _try(self, method: str, url: str, body: Optional[Mapping[str, Any]], how: _How
                   ) -> Union[tuple[int, Any], TapeTransient]:
        """One try of ``_call``: its (status, document), or the passing failure to retry."""
        import aiohttp

        if self.ready is not None:
            await self.ready()
        if self.check is not None:
            self.check()
        auth = self._authorization(url)
        headers = None if auth is None else {"Authorization": auth}
        try:
            # Redirects are not followed: one to plain http or to another origin would carry
            # the request (a stage of our paths) there; dCache's frontend has none.
            async with self.session.request(method, url, json=body, headers=headers,
                                            allow_redirects=False) as resp:
                if how.observe is not None:
                    how.observe(resp.status)
                return await self._read(url, resp, how, auth is not None)
        except aiohttp.InvalidURL as e:  # a discovery document's uri, say
            raise TapeRestError(f"{url}: bad URL: {error_text(str(e))}") from None
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
            # No connection, so nothing was sent: safe to send again, even a stage.
            if how.observe is not None:
                how.observe(None)
            return TapeUnreachable(f"{url}: {_reason(e)}")
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                asyncio.TimeoutError) as e:
            if how.observe is not None:
                how.observe(None)
            if tls_cause(e) is not None:
                # A TLS alert (unknown CA, bad or expired certificate): under TLS 1.3 a server
                # refusing our certificate says so after our side of the handshake is over, so
                # it surfaces here, not as a connection error. It refused the connection before
                # reading any request (a stage made nothing): unreachable, as a failed handshake
                # is, so the discovery gives up at once instead of backing off for a minute.
                return TapeUnreachable(f"{url}: {_reason(e)}")
            if how.once:
                raise StageUncertain(f"{url}: {_reason(e)}") from None
            if isinstance(e, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
                return TapeDropped(f"{url}: {_reason(e)}")
            return TapeTransient(f"{url}: {_reason(e)}")
        except (aiohttp.ClientError, ValueError) as e:  # a malformed answer, say
            raise TapeRestError(f"{error_text(url)}: {_reason(e)}") from None

    async def _read(self, url: str, resp: aiohttp.ClientResponse, how: _How, sent: bool
                    ) -> Union[tuple[int, Any], TapeTransient]:
        """What answer ``resp`` means (see ``_call``); ``sent``: it carried our token."""
        status = resp.status
        if 300 <= status < 400:
            where = error_text(resp.headers.get("Location", "") or "nowhere")
            raise TapeRestError(f"{error_text(url)}: redirected ({status}) to {where}: not "
                                "followed")
        text = await _body(url, resp)
        if status in how.allow:
            return status, None
        if 200 <= status < 300:
            return status, _json(url, text)
        if status in (401, 403):
            # dCache puts its reason in the status line, with an empty body.
            raise self._refused(url, status, text or (resp.reason or ""), sent,
                                resp.headers.getall("WWW-Authenticate", ()))
        # A proxy's HTML error page says no more than its status line does.
        detail = (resp.reason or "(no detail)") if text.lstrip().startswith("<") else \
            _problem(text)
        why = f"{url}: {status} {detail}"
        if not how.passing(status, text):
            raise TapeRestError(why)
        if how.once and status not in BUSY:
            raise StageUncertain(why)
        kind = TapeBusy if status in BUSY else TapeTransient
        return kind(why, _retry_after(resp.headers.get("Retry-After")))

    def _refused(self, url: str, status: int, text: str, sent: bool,
                 challenges: Sequence[str]) -> CredentialError:
        """The error of a 401/403 to ``url``: what the server said, and which right is missing
        (with a token: which token, and whether it was sent at all)."""
        said = bearer_error(", ".join(challenges))
        why = f"{status}: {_problem(text)}" + (f"; the server says: {said}" if said else "")
        if self._token is None:
            return CredentialError(f"{url}: the Tape REST API refused us ({why}); staging needs "
                                   "the right to stage (for a WLCG token: storage.stage)")
        token = self._token.info.describe()
        if not sent:
            return CredentialError(
                f"{url}: the Tape REST API refused us ({why}); the bearer token was not sent "
                "there: it is not on the host of a storage door we asked")
        if url.endswith(DISCOVERY_PATH):
            return CredentialError(f"{url}: the storage refused {token} ({why}); check the "
                                   "token's audience, issuer and lifetime")
        return CredentialError(f"{url}: the Tape REST API refused {token} ({why}); staging needs "
                               "storage.stage covering the files' paths")


async def _body(url: str, resp: aiohttp.ClientResponse) -> str:
    """The answer's text, at most ``MAX_ANSWER`` bytes (a door that serves every path as a file
    must not make us read one whole), undecodable bytes replaced (then it is no JSON)."""
    data = bytearray()
    while len(data) <= MAX_ANSWER:
        chunk = await resp.content.read(MAX_ANSWER + 1 - len(data))
        if not chunk:
            break
        data += chunk
    if len(data) > MAX_ANSWER:
        raise TapeRestError(f"{url}: the answer is larger than {MAX_ANSWER >> 20} MiB")
    return data.decode("utf-8", errors="replace")


def _passing(status: int, text: str) -> bool:
    """Whether an answer is a passing failure: a 5xx or 429 (the server, or a proxy before it,
    cannot answer now)."""
    return status == 429 or status >= 500


def _passing_bulk(status: int, text: str) -> bool:
    """``_passing``, or dCache's bare 400 to a request for its bulk service (stage, poll): its
    frontend's message to the bulk service timed out (``BulkServiceCommunicator``)."""
    return _passing(status, text) or (status == 400 and not text.strip())


def _retry_after(value: Optional[str]) -> Optional[float]:
    """A ``Retry-After`` header in seconds, at least ``MIN_RETRY_AFTER`` (None: none)."""
    seconds = parse_retry_after(value)
    return None if seconds is None else max(MIN_RETRY_AFTER, seconds)


def _reason(e: BaseException) -> str:
    """An exception's text for a message (its type when it has none)."""
    return error_text(str(e) or type(e).__name__)


def _segment(request_id: str) -> str:
    """A server-chosen request id as one path segment: ``../x``, ``?`` or ``#`` in it cannot
    move the request elsewhere on the frontend."""
    return quote(request_id, safe="")


def _stage_result(status: Optional[int]) -> str:
    """The ``STAGE_RESULTS`` entry of a stage POST's answer (None: there was none)."""
    if status is not None and 200 <= status < 300:
        return "accepted"
    if status == 413:
        return "too_large"
    if status in (429, 503):
        return "throttled"
    return "refused"


def _json(url: str, text: str) -> Any:
    try:
        return json.loads(text) if text.strip() else None
    except (ValueError, RecursionError):  # RecursionError: nested 100,000 deep
        raise TapeRestError(f"{url}: the answer is not JSON") from None


def _problem(text: str) -> str:
    """The ``detail`` (or ``title``) of an RFC 7807 problem document, else the text, bounded."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, dict):
        text = str(doc.get("detail") or doc.get("title") or text)
    return error_text(text) or "(no detail)"


def _on_disk(answer: FileLocality) -> bool:
    return answer.locality is not None and answer.locality.on_disk


def _file_locality(item: object) -> Optional[FileLocality]:
    if not isinstance(item, dict) or not isinstance(item.get("path"), str):
        return None
    path = item["path"]
    if item.get("error"):
        return FileLocality(path, None, error_text(str(item["error"])))
    try:
        return FileLocality(path, Locality(str(item.get("locality"))))
    except ValueError:
        return FileLocality(path, None, f"unknown locality {item.get('locality')!r}")


_STATES = {s.value: s for s in StageState} | {"CANCELED": StageState.CANCELLED}


def _file_stage(item: object) -> Optional[FileStage]:
    if not isinstance(item, dict) or not isinstance(item.get("path"), str):
        return None
    error = error_text(str(item.get("error") or ""))
    state = _STATES.get(str(item.get("state", "")).upper())
    if state is None:  # the spec's other form: onDisk true/false
        on_disk = item.get("onDisk")
        if on_disk is True:
            state = StageState.COMPLETED
        elif error:
            state = StageState.FAILED
        else:
            state = StageState.STARTED
    return FileStage(item["path"], state, error)


def _iso_duration(seconds: float) -> str:
    """``seconds`` as an ISO 8601 duration (``PT86400S``), as ``diskLifetime`` takes it."""
    return f"PT{max(1, int(seconds))}S"
