"""The WLCG Tape REST API v1 as dCache serves it: discovery, locality in bulk, staging, pins.

How the real movers (FTS3, gfal2, Rucio) talk to a tape-backed dCache, and what issue 13's
engine builds on (``reference/tape-rest.md`` has the facts):

* ``discover(door)``: ``GET <door>/.well-known/wlcg-tape-rest-api`` once per storage endpoint;
  the ``v1`` entry's ``uri`` is the frontend, usually on another port (3880) than the WebDAV door
  (2880): never assume the door's host:port. None when the door has no such document (404).
* ``archiveinfo(uri, paths)``: locality of many paths per request (at most ``ARCHIVEINFO_BATCH``;
  dCache silently answers only the first 10,000 of a longer list), matched by path, not position.
* ``stage(uri, paths, lifetime)``: stage requests of at most ``stage_batch`` paths (dCache refuses
  more than 500 with 413: a 413 halves the batch and sends again); 429 and 503 are back-pressure,
  waited out (``Retry-After`` honoured) by ``policy``, never a file's failure.
* ``poll(uri, id)``: a request's files; ``state`` and the spec's ``onDisk`` forms, ``CANCELLED``
  and gfal2's ``CANCELED``, any order, partial lists; a request the server forgot (404) says so.
* ``cancel``, ``release``: for the files of one request.

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
are ``TapeRestError`` (exit 5) with the server's RFC 7807 ``detail``. The session (client
certificate) is the caller's.

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
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Optional
from urllib.parse import quote, urlsplit

from prestaged.errors import CredentialError, StorageError
from prestaged.model import error_text, host_start, usable_origin
from prestaged.net import bearer_error, parse_retry_after
from prestaged.retry import RetryPolicy

if TYPE_CHECKING:
    import aiohttp

    from prestaged.tokens import TokenSource

__all__ = [
    "ARCHIVEINFO_BATCH",
    "DISCOVERY_PATH",
    "STAGE_RESULTS",
    "FileLocality",
    "FileStage",
    "Locality",
    "StageRequest",
    "StageStatus",
    "TapeClient",
    "TapeRestError",
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


_NO_DISCOVERY = (401, 403, 404, 405)
_NO_DISCOVERY_WITH_TOKEN = (403, 404, 405)
"""Answers to the discovery GET that mean "no Tape REST API published here"."""


class TapeRestError(StorageError):
    """The Tape REST API refused a request or answered something we cannot read (exit 5)."""


class TapeUnreachable(TapeRestError):
    """No answer at all: the connection failed, was refused or dropped (discovery)."""


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
    how 429/503 back-pressure and dropped connections are waited out (attempts, time budget,
    ``Retry-After``). ``sleep`` is ``asyncio.sleep`` (tests replace it). ``on_stage`` (default
    None) is called with one of ``STAGE_RESULTS`` for every stage POST, retries included.
    """

    def __init__(self, session: aiohttp.ClientSession, *, stage_batch: int = 200,
                 policy: Optional[RetryPolicy] = None, sleep: Sleep = asyncio.sleep,
                 on_stage: Optional[Callable[[str], None]] = None,
                 token: Optional[TokenSource] = None) -> None:
        if not 1 <= stage_batch <= STAGE_LIMIT:
            raise ValueError(f"stage_batch must be 1..{STAGE_LIMIT}, got {stage_batch}")
        self.session = session
        self.stage_batch = stage_batch
        self.policy = policy or RetryPolicy(attempts=8, initial=1.0, max=60.0, total=600.0)
        self._sleep = sleep
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
        ``TapeUnreachable`` when the door cannot be reached or refuses our connection (not
        retried: the touches of its files will tell why, breakers included)."""
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

    async def stage(self, uri: str, paths: Sequence[str],
                    lifetime: float) -> list[StageRequest]:
        """Stage ``paths`` with a pin of ``lifetime`` seconds, ``stage_batch`` paths a request
        (halved on 413); returns the requests made, in order."""
        made: list[StageRequest] = []
        todo = list(dict.fromkeys(paths))
        batch = self.stage_batch
        while todo:
            chunk, rest = todo[:batch], todo[batch:]
            body = {"files": [{"path": fs_path(p), "diskLifetime": _iso_duration(lifetime)}
                              for p in chunk]}
            status, doc = await self._call("POST", f"{uri}/stage", body, allow=(413,),
                                           observe=self._stage_answered)
            if status == 413:
                if batch == 1:
                    raise TapeRestError(f"{uri}/stage: refused a request of one path (413)")
                batch = max(1, batch // 2)
                log.info("%s/stage: 413 for %d paths; sending %d a request", uri, len(chunk),
                         batch)
                continue
            request_id = doc.get("requestId") if isinstance(doc, dict) else None
            if not isinstance(request_id, str) or not request_id:
                raise TapeRestError(f"{uri}/stage: accepted, but named no requestId")
            made.append(StageRequest(request_id, tuple(chunk)))
            todo = rest
        return made

    def _stage_answered(self, status: Optional[int]) -> None:
        if self._on_stage is not None:
            self._on_stage(_stage_result(status))

    async def poll(self, uri: str, request_id: str) -> StageStatus:
        """Request ``request_id``'s files as the server lists them now, by ``fs_path``."""
        status, doc = await self._call("GET", f"{uri}/stage/{_segment(request_id)}", None,
                                       allow=(404,))
        if status == 404:
            return StageStatus(request_id, found=False)
        files = doc.get("files") if isinstance(doc, dict) else None
        if not isinstance(files, list):
            raise TapeRestError(f"{uri}/stage/{request_id}: no files list in the answer")
        out: dict[str, FileStage] = {}
        for item in files:
            stage = _file_stage(item)
            if stage is not None:
                out[fs_path(stage.path)] = stage
        return StageStatus(request_id, out)

    async def cancel(self, uri: str, request_id: str, paths: Sequence[str]) -> None:
        """Cancel ``paths`` of request ``request_id`` (a request the server forgot is fine)."""
        await self._call("POST", f"{uri}/stage/{_segment(request_id)}/cancel",
                         {"paths": [fs_path(p) for p in paths]}, allow=(404,))

    async def release(self, uri: str, request_id: str, paths: Sequence[str]) -> None:
        """Drop the pins request ``request_id`` made on ``paths``."""
        await self._call("POST", f"{uri}/release/{_segment(request_id)}",
                         {"paths": [fs_path(p) for p in paths]}, allow=(404,))

    # --- one call ---------------------------------------------------------------------------

    async def _call(self, method: str, url: str, body: Optional[Mapping[str, Any]],
                    allow: tuple[int, ...] = (),
                    observe: Optional[Observe] = None,
                    reconnect: bool = True) -> tuple[int, Any]:
        """(status, JSON document) of ``method url``, back-pressure (429, 503) and dropped
        connections waited out by the policy; ``allow``ed statuses are returned with None.
        ``observe`` hears every try's status (None: no answer). Without ``reconnect`` a
        connection that fails is ``TapeUnreachable`` at once."""
        import aiohttp

        tries = 0
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            tries += 1
            retry_after: Optional[float] = None
            if self.ready is not None:
                await self.ready()
            if self.check is not None:
                self.check()
            auth = self._authorization(url)
            headers = None if auth is None else {"Authorization": auth}
            try:
                # Redirects are not followed: one to plain http or to another origin would
                # carry the request (a stage of our paths) there; dCache's frontend has none.
                async with self.session.request(method, url, json=body, headers=headers,
                                                allow_redirects=False) as resp:
                    status = resp.status
                    if observe is not None:
                        observe(status)
                    if 300 <= status < 400:
                        where = error_text(resp.headers.get("Location", "") or "nowhere")
                        raise TapeRestError(f"{error_text(url)}: redirected ({status}) to "
                                            f"{where}: not followed")
                    text = await _body(url, resp)
                    if status in allow:
                        return status, None
                    if 200 <= status < 300:
                        return status, _json(url, text)
                    if status in (401, 403):
                        # dCache puts its reason in the status line, with an empty body.
                        raise self._refused(url, status, text or (resp.reason or ""),
                                            auth is not None,
                                            resp.headers.getall("WWW-Authenticate", ()))
                    if status not in (429, 503):
                        raise TapeRestError(f"{url}: {status} {_problem(text)}")
                    why = f"{status} {_problem(text)}"
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            except aiohttp.InvalidURL as e:  # a discovery document's uri, say
                raise TapeRestError(f"{url}: bad URL: {error_text(str(e))}") from None
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                    asyncio.TimeoutError) as e:
                if observe is not None:
                    observe(None)
                why = error_text(str(e) or type(e).__name__)
                if not reconnect:
                    raise TapeUnreachable(f"{url}: {why}") from None
            except (aiohttp.ClientError, ValueError) as e:  # a malformed answer, say
                raise TapeRestError(f"{error_text(url)}: {error_text(str(e) or type(e).__name__)}"
                                    ) from None
            elapsed = loop.time() - start
            delay = self.policy.delay(tries, retry_after=retry_after, elapsed=elapsed)
            if delay is None:
                raise TapeRestError(f"{url}: gave up after {tries} tries: {why}")
            log.info("%s: %s; trying again in %.1f s", url, why, delay)
            await self._sleep(delay)

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
