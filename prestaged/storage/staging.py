"""Bringing tape-only files to disk the way the real movers do: staged in batches, a bounded
number of open requests, polled with backoff, each file handed on the moment it is on disk.

``Stager(client, uri, settings).run(paths)`` yields one ``Staged`` per path, in the order the
files land (or fail), so the caller can touch each one at once and its atime is fresh when the
job comes. A run's engine feeds paths as the catalog yields them instead: ``add(paths)`` any
number of times, ``close()`` after the last, and ``landed()`` yields until every path added has
ended. The policy (issue 13):

* at most ``max_requests`` open stage requests on the endpoint, ``batch`` paths each (fewer once
  the server refused a bigger one with 413: the client keeps what it learned), one request per
  stage POST and a free slot for each;
* back-pressure on a stage POST (429, 503: dCache's per-user quota of unfinished requests can
  last hours) is waited out, ``Retry-After`` honoured, else from ``poll_min`` doubling to
  ``poll_max``, while the open requests go on being polled; never a file's failure, until the
  endpoint has refused every new request for ``timeout``: then what waits is "stage timed
  out". A stage POST that found no connection is sent again the same way, ``poll_errors`` times
  in a row at most. One that may have reached the server but whose answer was lost (a timeout,
  a dropped connection, a 5xx: ``StageUncertain``) is not sent again, since a second request
  would pin twice and nobody would follow the first: its files fail saying so (the next run asks
  again; by then the first request may have brought them to disk);
* each request is polled from ``poll_min`` seconds, doubling to ``poll_max``, and back to
  ``poll_min`` when a poll shows progress; files may come in any order or be missing from a poll;
* a poll that fails (a 5xx, no answer, dCache's bare 400, an unreadable answer) concerns that
  request alone: it is polled again on the same doubling schedule, and after ``poll_errors``
  failed polls in a row its unfinished files fail with the last error (FTS3 likewise retries a
  poll error and then fails that request's files); back-pressure (429, 503) on a poll is waited
  out without counting. A refusal of our credentials (401/403) still ends the run;
* ``FAILED``: staged once more in a new request, then reported with the server's error;
  ``CANCELLED`` (by someone else): reported; a request the server forgot (404 on poll): its
  unfinished paths are staged again once;
* ``timeout`` after a request was made: its unfinished paths are cancelled and reported as
  "stage timed out" (a cancel that fails is logged: the pins end on their own);
* ``adopt(id, paths, age)``: a request an earlier run made ``age`` seconds ago (still pinned,
  not landed) is followed instead of asking again, polled at once, its timeout counted from
  when it was made; what it does not bring to disk is staged anew (FAILED there was the file's
  first try, so the new request is its one more; cancelled or forgotten by the server, or
  refused to us (401/403: made under other credentials, which dCache lets no one else poll):
  as if never asked), and so is a path its first poll does not list or already shows COMPLETED (the
  locality just said TAPE: that answer may be from before an eviction);
* a stop (the task running ``landed()`` cancelled) while a stage POST is on its way does not
  abandon it: the frontend may have made the request already. ``settle(timeout)`` waits for
  its answer and tells ``on_request`` of the request made, as of one answered before the stop
  (the state keeps it: the next run follows it rather than pinning twice, ``release`` frees
  its pin); one unanswered by then is given up with a WARNING.

Stagers of one endpoint sharing a ``RequestSlots`` (the daemon's concurrent runs, whose
definitions may share files) never ask twice for one file: a path another stager has asked
for (its claim lasts while that stager runs) is followed in that stager's request at once,
needing no slot (polled here too, as if this stager had made it: FAILED gets the usual one
more try, made by whichever stager sees it first and followed by the other), and a path whose
request another stager is making right now waits for that request's id. A followed request
that times out here is cancelled by its owner, not by the follower. A request of a stager
still running that ``adopt`` is handed (the state already recorded it) is followed the same
way, not as an earlier run's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Callable, Optional

from prestaged.errors import CredentialError
from prestaged.storage.tape import (
    StageRequest,
    StageState,
    StageStatus,
    StageUncertain,
    TapeBusy,
    TapeClient,
    TapeRestError,
    TapeTransient,
    TapeUnreachable,
    fs_path,
)

__all__ = ["RequestSlots", "Staged", "Stager", "StagingSettings"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagingSettings:
    """How staging paces itself; times in seconds (defaults: FTS3-like batches of 200, 50 open
    requests, polls from 2 s to 5 min, 24 h to give up, pins of 24 h; 10 failed polls of a
    request in a row, or stage POSTs without a connection, fail its files: about 13 minutes
    of polls doubling from 2 s to 5 min, where FTS3 allows 3 polls 10 minutes apart)."""

    batch: int = 200
    max_requests: int = 50
    poll_min: float = 2.0
    poll_max: float = 300.0
    timeout: float = 24 * 3600.0
    lifetime: float = 24 * 3600.0
    poll_errors: int = 10


@dataclass(frozen=True)
class Staged:
    """How one path's staging ended: ``on_disk`` (then touch it), or not with ``error``.
    ``request_id`` names the request that brought it (for a later release); ``seconds`` from
    its first stage request to the answer."""

    path: str
    on_disk: bool
    error: str = ""
    request_id: Optional[str] = None
    seconds: float = 0.0


@dataclass
class _Open:
    """A stage request not finished yet: its unfinished paths and when to poll it next."""

    id: str
    paths: set[str]
    made: float
    delay: float
    due: float
    seen: set[str] = field(default_factory=set)
    adopted: bool = False
    """Made by an earlier run: a path it does not bring to disk is simply staged anew."""
    polls: int = 0
    slot: bool = True
    """It holds a request slot here (False: another stager's request, followed)."""
    errors: int = 0
    """Polls of it that failed in a row."""


@dataclass
class _Sent:
    """A stage POST of ``paths`` that a stop left on its way (see ``Stager.settle``)."""

    post: asyncio.Future[list[StageRequest]]
    paths: list[str]


def _retrieved(post: asyncio.Future[list[StageRequest]]) -> None:
    """A stage POST left on its way ended: its error is taken here, so that asyncio does not
    report it as never retrieved when no ``settle`` waits for it."""
    if not post.cancelled():
        post.exception()


@dataclass
class _Claim:
    """A path some stager has asked for: in ``request`` (None while the POST is on its way),
    made at ``made`` (the stagers' clock)."""

    owner: Stager
    request: Optional[str]
    made: float


class RequestSlots:
    """Open stage requests per endpoint, shared by every stager of a ``TapeAccess`` (the
    daemon's concurrent runs): at most ``limit`` per endpoint URI. A stager waiting for a slot
    is woken (its ``waiters`` event set) when another gives one back. ``claims`` holds the
    paths each stager has asked for, so that no other stager asks for them again."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used: Counter[str] = Counter()
        self.waiters: set[asyncio.Event] = set()
        self.claims: dict[tuple[str, str], _Claim] = {}
        """(uri, path) -> the stager that asked for it, and in which request."""
        self.owners: dict[tuple[str, str], Stager] = {}
        """(uri, request id) -> the running stager that made it."""

    def wake(self) -> None:
        """Wake every waiting stager (a slot or a claim changed)."""
        for event in self.waiters:
            event.set()

    def free(self, uri: str) -> bool:
        """A request may be made to ``uri`` now."""
        return self.used[uri] < self.limit

    def take(self, uri: str) -> None:
        """One request of ``uri`` is open (or being made)."""
        self.used[uri] += 1

    def release(self, uri: str, n: int) -> None:
        """``n`` requests of ``uri`` ended (or are no longer followed); wake the waiters."""
        if n <= 0:
            return
        self.used[uri] = max(0, self.used[uri] - n)
        self.wake()


class Stager:
    """Stages paths on the Tape REST endpoint ``uri`` through ``client``; see the module."""

    def __init__(self, client: TapeClient, uri: str, settings: Optional[StagingSettings] = None,
                 *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 on_request: Optional[Callable[[StageRequest], None]] = None,
                 on_follow: Optional[Callable[[StageRequest, float], None]] = None,
                 slots: Optional[RequestSlots] = None,
                 hopeless: Optional[Callable[[str], bool]] = None) -> None:
        self.client = client
        self._hopeless = hopeless or (lambda path: False)
        """Whether a failed stage of a path is surely refused again (the token cannot stage
        it): such a path is not asked for once more."""
        self.uri = uri
        self.s = settings or StagingSettings()
        self._clock = clock
        self._sleep = sleep
        self._on_request = on_request
        self._on_follow = on_follow
        self._open: dict[str, _Open] = {}
        self._first: dict[str, float] = {}  # path -> time of its first stage request
        self._restaged: set[str] = set()
        self._todo: deque[str] = deque()
        self._held: list[str] = []  # paths whose request another stager is making right now
        self._added: set[str] = set()
        self._closed = False
        self._ended = False  # landed() has returned: nothing may take a slot any more
        self._wake = asyncio.Event()
        self._slots = slots if slots is not None else RequestSlots(self.s.max_requests)
        self._slots.waiters.add(self._wake)
        self._ended_here: list[Staged] = []  # ended outside a poll (a stage POST): yielded next
        self._resume_at = 0.0  # no stage POST before this (the endpoint refused the last)
        self._refused_since: Optional[float] = None  # first of the stage POSTs refused in a row
        self._refusals = 0
        self._sent: list[_Sent] = []  # stage POSTs a stop left on their way: see settle

    def add(self, paths: Iterable[str]) -> None:
        """Stage ``paths`` too (a path already added is ignored); those another stager has
        asked for are followed (or held) at once, needing no slot."""
        new = [p for p in dict.fromkeys(paths) if p not in self._added]
        self._added.update(new)
        self._todo.extend(self._mine(new))
        self._wake.set()

    def adopt(self, request_id: str, paths: Iterable[str], age: float = 0.0) -> None:
        """Follow ``request_id``, which an earlier run made ``age`` seconds ago for ``paths`` (a
        path already added is ignored): poll it at once instead of asking for the paths again.
        It takes a request slot like the requests this stager makes (it is open on the
        server); once ``landed()`` has ended, nothing is adopted."""
        new = [p for p in dict.fromkeys(paths) if p not in self._added]
        if not new or self._ended:
            return
        self._added.update(new)
        # Paths another running stager has asked for are not an earlier run's: those claimed
        # in this very request are followed there as live, the others (retried elsewhere
        # since, or being asked for now) are sorted like new paths.
        earlier: list[str] = []
        for path in new:
            claim = self._slots.claims.get((self.uri, path))
            if claim is None:
                earlier.append(path)
            elif claim.request == request_id:
                self._follow(request_id, [path], claim.made)
            else:
                self._todo.extend(self._mine([path]))
        self._wake.set()
        if not earlier:
            return
        now = self._clock()
        made = now - max(0.0, age)
        for path in earlier:
            self._first[path] = made
        request = self._open.get(request_id)
        if request is None:
            self._slots.take(self.uri)
            request = self._open[request_id] = _Open(request_id, set(), made, self.s.poll_min,
                                                     now, adopted=True)
        request.paths.update(earlier)

    def _follow(self, request_id: str, paths: list[str], made: float) -> None:
        """Follow ``paths`` in another running stager's request ``request_id`` (made at
        ``made``): polled here like an own request, without a slot (it holds one there);
        ``on_follow`` hears of it with the request's age."""
        now = self._clock()
        for path in paths:
            self._first.setdefault(path, made)
        request = self._open.get(request_id)
        if request is None:
            request = self._open[request_id] = _Open(request_id, set(), made, self.s.poll_min,
                                                     now, slot=False)
        request.paths.update(paths)
        if self._on_follow is not None:
            self._on_follow(StageRequest(request_id, tuple(paths)), max(0.0, now - made))

    def close(self) -> None:
        """No more paths will be added: ``landed()`` ends once the added ones have."""
        self._closed = True
        self._wake.set()

    async def run(self, paths: Iterable[str]) -> AsyncIterator[Staged]:
        """Stage every path (duplicates once) and yield each as it lands on disk or fails."""
        self.add(paths)
        self.close()
        async for staged in self.landed():
            yield staged

    async def landed(self) -> AsyncIterator[Staged]:
        """Yield each added path as it lands on disk or fails, until ``close()`` and all ended.
        Leaving early (the caller stops) gives this stager's request slots back."""
        try:
            async for staged in self._landed():
                yield staged
        finally:
            self._ended = True
            self._slots.release(self.uri, sum(r.slot for r in self._open.values()))
            self._open.clear()
            self._slots.waiters.discard(self._wake)
            self._drop_claims()

    @property
    def unanswered(self) -> int:
        """Stage POSTs a stop left on their way whose answer has not come yet (``settle``)."""
        return sum(not sent.post.done() for sent in self._sent)

    async def settle(self, timeout: float) -> None:
        """After a stop (``landed()`` cancelled): wait up to ``timeout`` seconds for the
        answers of the stage POSTs it left on their way, and tell ``on_request`` of each
        request they made, as of a request answered before the stop, so that the state keeps
        it (the next run follows it, ``release`` frees its pin). The frontend makes the request
        before it answers: dropped unheard, it was asked for again by the next run, and its
        pin was freed by nobody. A POST still unanswered then (or when this is cancelled: a
        second Ctrl-C) is given up with one WARNING: the next run may ask for its files
        again."""
        sent, self._sent = self._sent, []
        try:
            waiting = {s.post for s in sent if not s.post.done()}
            if waiting:
                await asyncio.wait(waiting, timeout=timeout)
        finally:
            unknown = [s for s in sent if not self._heard(s)]
            if unknown:
                files = sum(len(s.paths) for s in unknown)
                what = ("a stage request" if len(unknown) == 1 else
                        f"{len(unknown)} stage requests")
                log.warning("%s to %s may have been made for %d files, but no answer came "
                            "before the run stopped; the next run may ask for them again (a "
                            "second pin, which ends after its lifetime)", what, self.uri, files)

    def _heard(self, sent: _Sent) -> bool:
        """Whether the answer of ``sent`` is known (its requests told to ``on_request``); a
        POST still on its way is cancelled."""
        post = sent.post
        if not post.done():
            post.cancel()
            return False
        if post.cancelled():
            return False
        e = post.exception()
        if e is None:
            for request in post.result():
                if self._on_request is not None:
                    self._on_request(request)
            return True
        if isinstance(e, StageUncertain):
            log.info("%s (after the run stopped)", e)
            return False
        log.info("%s (after the run stopped): no stage request was made", e)
        return True

    def _drop_claims(self) -> None:
        """This stager ended: its claims and requests are no longer followed by it."""
        slots = self._slots
        for key in [k for k, c in slots.claims.items() if c.owner is self]:
            del slots.claims[key]
        for key in [k for k, o in slots.owners.items() if o is self]:
            del slots.owners[key]
        slots.wake()  # stagers holding paths for one of ours ask for them themselves now

    def _claim(self, path: str, request: Optional[str], made: float = 0.0) -> None:
        """Record that this stager asks for ``path`` in ``request`` (None: being made)."""
        self._slots.claims[(self.uri, path)] = _Claim(self, request, made)

    def _claim_again(self, path: str, ended: str) -> None:
        """``path`` is to be asked for anew after request ``ended`` failed or was lost: this
        stager makes that request unless another stager already makes (or made) one, whose
        request ``_mine`` then follows."""
        claim = self._slots.claims.get((self.uri, path))
        if claim is None or claim.owner is self or claim.request == ended:
            self._claim(path, None)

    def _unclaim(self, path: str) -> None:
        """``path`` ended here: others may ask for it."""
        key = (self.uri, path)
        claim = self._slots.claims.get(key)
        if claim is not None and claim.owner is self:
            del self._slots.claims[key]

    async def _landed(self) -> AsyncIterator[Staged]:
        while True:
            self._wake.clear()
            await self._submit()
            ended, self._ended_here = self._ended_here, []
            for done in ended:
                yield done
            if not self._open:
                if self._closed and not self._todo and not self._held:
                    return
                await self._idle()
                continue
            request = min(self._open.values(), key=lambda r: r.due)
            due = min(request.due, self._resume_at) if self._waiting() else request.due
            wait = due - self._clock()
            if wait > 0 and not await self._pause(wait):
                continue  # new paths came while a slot is free: submit them first
            if due < request.due:
                continue  # the endpoint may take stage requests again: submit first
            for done in await self._poll(request):
                yield done

    def _waiting(self) -> bool:
        """Paths wait for the endpoint to take stage requests again, with a slot free."""
        return bool(self._todo) and self._resume_at > self._clock() and \
            self._slots.free(self.uri)

    async def _idle(self) -> None:
        """Nothing to poll: wait for paths, the close, a slot another stager of this endpoint
        gave back, or the end of a back-off of the stage POSTs."""
        if self._waiting():
            await self._pause(self._resume_at - self._clock())
        else:
            await self._wake.wait()

    async def _pause(self, seconds: float) -> bool:
        """Sleep ``seconds``; False when woken early by new paths that a free slot can take."""
        if not self._held and (self._closed or not self._slots.free(self.uri)):
            await self._sleep(seconds)
            return True
        sleeping = asyncio.ensure_future(self._sleep(seconds))
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeping, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeping, woken):
                task.cancel()
            await asyncio.gather(sleeping, woken, return_exceptions=True)
        return not (woken.done() and not woken.cancelled())

    def _mine(self, paths: Iterable[str]) -> list[str]:
        """Of ``paths``, those no other stager has asked for (to ask for here); those in
        another's request are followed there, those whose request is being made wait in
        ``_held`` (looked at again at each ``_submit``)."""
        mine: list[str] = []
        follow: dict[str, tuple[float, list[str]]] = {}
        for path in paths:
            claim = self._slots.claims.get((self.uri, path))
            if claim is None or claim.owner is self:
                mine.append(path)
            elif claim.request is None:
                self._held.append(path)
            else:
                follow.setdefault(claim.request, (claim.made, []))[1].append(path)
        for request_id, (made, followed) in follow.items():
            self._follow(request_id, followed, made)
        return mine

    async def _submit(self) -> None:
        """Fill the free request slots with batches of waiting paths, one request per POST
        (and per slot), unless the endpoint refused the last POST (``_refused``)."""
        if self._held:
            held, self._held = self._held, []
            self._todo.extendleft(reversed(self._mine(held)))
        while self._todo and self._slots.free(self.uri) and self._clock() >= self._resume_at:
            chunk = self._next_chunk()
            if not chunk:
                break
            now = self._clock()
            for path in chunk:
                self._first.setdefault(path, now)
                self._claim(path, None)  # others wait for this request's id
            self._slots.take(self.uri)  # before the await: no other stager takes it meanwhile
            # Its own task, shielded: a stop (this task cancelled) does not abandon a POST the
            # frontend may already have made a request of; ``settle`` hears its answer.
            post = asyncio.ensure_future(self.client.stage(self.uri, chunk, self.s.lifetime,
                                                           most=1, patient=False))
            try:
                made = await asyncio.shield(post)
            except (TapeBusy, TapeUnreachable) as e:  # no request made: ask again later
                self._put_back(chunk)
                self._refused(e, now)
                return
            except StageUncertain as e:
                for path in chunk:
                    self._unclaim(path)
                self._uncertain(chunk, e, now)
                continue
            except asyncio.CancelledError:
                for path in chunk:
                    self._unclaim(path)
                if not post.cancelled():  # the run stops with the POST sent: see ``settle``
                    post.add_done_callback(_retrieved)
                    self._sent.append(_Sent(post, chunk))
                raise
            except BaseException:
                for path in chunk:
                    self._unclaim(path)
                raise
            finally:
                self._slots.release(self.uri, 1)  # wakes the stagers holding these paths
            self._refusals, self._refused_since = 0, None
            for request in made:
                self._opened(request, now)
            sent = {p for r in made for p in r.paths}
            self._put_back([p for p in chunk if p not in sent])  # a 413 split the chunk

    def _next_chunk(self) -> list[str]:
        """The next batch of waiting paths to ask for (those another stager asked for are
        followed there instead); at most as many as the endpoint takes in one request."""
        # Each path is looked at once, when its turn comes: O(1) a path, however long the
        # queue (a path claimed meanwhile by another stager is followed then).
        size = min(self.s.batch, self.client.batch_for(self.uri))
        chunk: list[str] = []
        while self._todo and len(chunk) < size:
            take = min(size - len(chunk), len(self._todo))
            chunk += self._mine([self._todo.popleft() for _ in range(take)])
        return chunk

    def _opened(self, request: StageRequest, now: float) -> None:
        """``request`` was made at ``now``: it takes a slot and is polled from now on."""
        self._slots.take(self.uri)
        self._slots.owners[(self.uri, request.id)] = self
        for path in request.paths:
            self._claim(path, request.id, now)
        self._open[request.id] = _Open(request.id, set(request.paths), now, self.s.poll_min,
                                       now + self.s.poll_min)
        if self._on_request is not None:
            self._on_request(request)

    def _put_back(self, paths: list[str]) -> None:
        """``paths`` were not asked for: first in line again, for any stager to ask."""
        for path in paths:
            self._unclaim(path)
        self._todo.extendleft(reversed(paths))

    def _refused(self, e: TapeTransient, now: float) -> None:
        """The endpoint made no request of the last POST (``e``): try again after its
        ``Retry-After``, else after ``poll_min`` doubling to ``poll_max``. Back-pressure is
        waited out until it has lasted ``timeout``, a missing connection ``poll_errors``
        times in a row; then every waiting path fails."""
        self._refusals += 1
        if self._refused_since is None:
            self._refused_since = now
        if isinstance(e, TapeBusy) and now - self._refused_since >= self.s.timeout:
            self._fail_waiting(f"stage timed out after {self.s.timeout:g}s: the endpoint "
                               f"took no new stage request all that time ({e})", now)
            return
        if not isinstance(e, TapeBusy) and self._refusals >= self.s.poll_errors:
            self._fail_waiting(f"stage failed: no connection to the endpoint "
                               f"{self._refusals} times in a row ({e})", now)
            return
        backoff = min(self.s.poll_max, self.s.poll_min * 2.0 ** min(self._refusals - 1, 64))
        delay = e.retry_after if e.retry_after is not None else backoff
        if isinstance(e, TapeBusy):  # ask once more at the end, however long it asks for
            delay = max(0.0, min(delay, self._refused_since + self.s.timeout - now))
        self._resume_at = now + delay
        log.info("%s; asking for %d waiting files again in %.1f s", e, len(self._todo), delay)

    def _fail_waiting(self, why: str, now: float) -> None:
        """Every path waiting to be asked for ends with ``why``; the next POST starts afresh."""
        log.warning("%s: %d files not staged: %s", self.uri, len(self._todo), why)
        for path in self._todo:
            self._first.setdefault(path, now)
            self._ended_here.append(Staged(path, False, why, None, now - self._first[path]))
        self._todo.clear()
        self._refusals, self._refused_since, self._resume_at = 0, None, 0.0

    def _uncertain(self, chunk: list[str], e: StageUncertain, now: float) -> None:
        """The POST of ``chunk`` may have made a request whose id we never heard: not sent
        again (see the module); its files fail saying so."""
        log.warning("%s; not sent again for its %d files: a second request would pin them "
                    "twice and the first would be followed by nobody", e, len(chunk))
        why = (f"stage failed: the stage request may have been made but its answer was lost "
               f"({e}); not asked again in this run, so as not to pin twice")
        self._ended_here += [Staged(p, False, why, None, now - self._first[p]) for p in chunk]

    def _forget(self, request: _Open) -> None:
        """``request`` is no longer open: its slot is free."""
        del self._open[request.id]
        if request.slot:
            self._slots.owners.pop((self.uri, request.id), None)
            self._slots.release(self.uri, 1)

    async def _poll(self, request: _Open) -> list[Staged]:
        """Poll ``request``; what ended in it, and its next poll time."""
        now = self._clock()
        try:
            status = await self.client.poll(self.uri, request.id, patient=False)
        except TapeRestError as e:  # this request's trouble, not the run's (401/403 are)
            return await self._poll_failed(request, now, e)
        except CredentialError as e:
            if not (request.adopted and request.polls == 0):
                raise
            # dCache lets only the request's owner poll it, with a token no broader than the
            # one that made it: an earlier run's, under other credentials (a renewed token of
            # other scopes, another user's proxy on a shared state), is not ours to follow.
            # Asked anew: if our credentials cannot stage at all, that request says so.
            return self._lost(request, refused=e)
        if not status.found:
            return self._lost(request)
        request.errors = 0
        ended = self._landed_in(request, status, now)
        request.polls += 1
        if not request.paths:
            self._forget(request)
            return ended
        if now - request.made >= self.s.timeout:
            return ended + await self._timed_out(request, now)
        # Progress resets the backoff: files of one tape tend to land together.
        request.delay = (self.s.poll_min if ended else
                         min(self.s.poll_max, request.delay * 2))
        request.due = now + request.delay
        return ended

    def _landed_in(self, request: _Open, status: StageStatus, now: float) -> list[Staged]:
        out = []
        first_look = request.adopted and request.polls == 0
        for path in sorted(request.paths):  # sorted: a stable order for the caller and tests
            f = status.files.get(fs_path(path))  # listed as dCache spells it (H1)
            if first_look and (f is None or f.state is StageState.COMPLETED):
                # Not in it (a path_map changed?), or on disk before the locality said TAPE:
                # ask anew rather than wait for nothing or touch an evicted file.
                request.paths.discard(path)
                self._todo.extend(self._mine([path]))
                continue
            if f is None or not f.done:
                continue  # still on its way, or left out of this answer
            request.paths.discard(path)
            if f.state is StageState.COMPLETED:
                out.append(Staged(path, True, "", request.id, now - self._first[path]))
            elif f.state is StageState.FAILED and self._hopeless(path):
                out.append(Staged(path, False, f"stage failed: {f.error or 'failed'}",
                                  request.id, now - self._first[path]))
            elif request.adopted:  # an earlier run's request: ask for the file now, as new
                if f.state is StageState.FAILED:
                    self._restaged.add(path)  # that was its first try: this is the one more
                    self._claim_again(path, request.id)
                self._todo.extend(self._mine([path]))  # or follow another's request for it
                log.info("the earlier stage request %s of %s ended %s; asking anew", request.id,
                         path, f.state.value)
            elif f.state is StageState.FAILED and path not in self._restaged:
                self._restaged.add(path)  # one more try in a new request
                self._claim_again(path, request.id)  # one stager makes it; others follow
                self._todo.extend(self._mine([path]))  # or follow another's request for it
                log.info("stage of %s failed (%s); asking once more", path, f.error)
            else:
                why = f.error or ("cancelled" if f.state is StageState.CANCELLED else "failed")
                out.append(Staged(path, False, f"stage failed: {why}", request.id,
                                  now - self._first[path]))
        return out

    def _lost(self, request: _Open, refused: Optional[CredentialError] = None
              ) -> list[Staged]:
        """The server forgot ``request`` (404), or (an earlier run's) will not show it to us
        (``refused``): stage its unfinished paths again, once."""
        self._forget(request)
        out = []
        for path in sorted(request.paths):
            if request.adopted:
                # an earlier run's request: this is the first ask
                self._todo.extend(self._mine([path]))
            elif path in self._restaged:
                out.append(Staged(path, False, "stage failed: the stage request was lost "
                                  "twice", request.id, self._clock() - self._first[path]))
            else:
                self._restaged.add(path)
                self._claim_again(path, request.id)
                self._todo.extend(self._mine([path]))  # or follow another's request for it
        log.log(logging.INFO if refused is None else logging.WARNING,
                "stage request %s is %s; %d paths asked again", request.id,
                "gone (404)" if refused is None else f"refused to us ({refused})",
                len(request.paths))
        return out

    async def _poll_failed(self, request: _Open, now: float, e: TapeRestError
                           ) -> list[Staged]:
        """A poll of ``request`` failed with ``e``: poll it again later, backing off (a busy
        server's ``Retry-After`` honoured), until ``timeout``; after ``poll_errors`` failures
        in a row (back-pressure does not count) its unfinished files fail with ``e``."""
        busy = isinstance(e, TapeBusy)
        if not busy:
            request.errors += 1
        if request.errors >= self.s.poll_errors:
            return self._given_up(request, now, e)
        if now - request.made >= self.s.timeout:
            return await self._timed_out(request, now)
        request.delay = min(self.s.poll_max, request.delay * 2)
        asked = e.retry_after if isinstance(e, TapeTransient) else None
        request.due = now + max(request.delay, asked or 0.0)
        log.log(logging.INFO if busy else logging.WARNING,
                "%s; polling stage request %s again in %.1f s%s", e, request.id,
                request.due - now, "" if busy else
                f" ({request.errors} of {self.s.poll_errors} failed polls in a row)")
        return []

    def _given_up(self, request: _Open, now: float, e: TapeRestError) -> list[Staged]:
        """``poll_errors`` polls of ``request`` failed in a row: its unfinished files fail."""
        paths = sorted(request.paths)
        self._forget(request)
        for path in paths:
            self._unclaim(path)
        log.warning("%s: %d polls of stage request %s failed in a row; its %d unfinished "
                    "files fail", self.uri, request.errors, request.id, len(paths))
        why = f"stage failed: {request.errors} polls of its request failed in a row ({e})"
        return [Staged(p, False, why, request.id, now - self._first[p]) for p in paths]

    async def _timed_out(self, request: _Open, now: float) -> list[Staged]:
        """Cancel what ``request`` did not bring to disk within ``timeout``; report it."""
        paths = sorted(request.paths)
        owned_elsewhere = not request.slot and (self.uri, request.id) in self._slots.owners
        self._forget(request)
        for path in paths:
            self._unclaim(path)
        if not owned_elsewhere:  # another run's request: its own timeout cancels it
            try:
                await self.client.cancel(self.uri, request.id, paths)
            except TapeRestError as e:  # the files time out all the same
                log.warning("%s; stage request %s was not cancelled: its pins end on their "
                            "own (or with prestaged release)", e, request.id)
        return [Staged(p, False, f"stage timed out after {self.s.timeout:g}s", request.id,
                       now - self._first[p]) for p in paths]
