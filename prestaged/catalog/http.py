"""What the networked catalogs (SAM web, MetaCat, Rucio) share: one aiohttp session per server
with every request classified, time-bounded retries, streamed lines, unresolved files, and the
ordered batch pipeline that lets the engine warm the first files while later ones resolve.

Classification, the same for every server (the subclass words the errors):

- 200: the answer, handed to the caller (``HttpApi.exchange``);
- 5xx, 408, 429, a timeout, a dropped connection: ``Transient``, retried with the project's
  ``RetryPolicy`` backoff (``retry_initial`` doubling up to ``retry_max``, up to 50% jitter, a
  ``Retry-After`` honoured but capped at ``retry_max``) for at most ``retry_for`` seconds, then
  ``CatalogError`` (exit 4) naming the server and what was being asked;
- any other status: ``HttpApi.status_error`` (the subclass), never retried;
- a TLS failure, or a server that keeps hanging up before it ever answered (how a server
  refusing a client certificate looks under TLS 1.3): ``CredentialError`` (exit 3).

Credentials (``SECRET_HEADERS``: the bearer token, the MetaCat token, Rucio's tokens and
password) go over https only: a request that would carry one to an ``http://`` URL is refused
before it is sent, and redirects are followed on the same origin (scheme included) only.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import ssl
import time
from array import array
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Hashable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar, Union
from urllib.parse import quote

import aiohttp
from yarl import URL

from prestaged._version import __version__
from prestaged.config import CatalogServerKeys
from prestaged.errors import CatalogError, ConfigError, CredentialError, PrestagedError
from prestaged.model import FileRef, printable, redact
from prestaged.net import client_ssl_context, parse_retry_after, tls_cause
from prestaged.retry import RetryPolicy

if TYPE_CHECKING:
    from prestaged.credentials import Credentials

__all__ = [
    "ANSWER_PER_FILE",
    "MAX_UNRESOLVED_KEPT",
    "MIN_ANSWER",
    "SECRET_HEADERS",
    "Call",
    "Handed",
    "HttpApi",
    "RetrySettings",
    "Transient",
    "Unresolved",
    "UnresolvedLog",
    "answer_cap",
    "catalog_ssl_context",
    "gather_or_cancel",
    "line_blocks",
    "lines",
    "one_line",
    "ordered",
    "retry_settings",
]

log = logging.getLogger(__name__)

SECRET_HEADERS: Mapping[str, str] = {
    "authorization": "the bearer token",
    "x-authentication-token": "the MetaCat token",
    "x-rucio-auth-token": "the Rucio token",
    "x-rucio-password": "the Rucio password",
}
"""Request headers (lower case) that carry a credential, and what it is, for messages: sent
over https only."""
MAX_UNRESOLVED_KEPT = 10_000
"""Unresolved files kept with their locations; beyond this only the count grows."""
RETRYABLE_STATUS = frozenset({408, 429})
_EARLY_DROPS = 3  # connections dropped before any answer that mean "certificate refused"
_CHUNK = 64 * 1024
_MAX_MESSAGE = 300

T = TypeVar("T")
B = TypeVar("B")
A = TypeVar("A", bound="HttpApi")
Params = Union[Sequence[tuple[str, str]], Mapping[str, str], None]


class Transient(Exception):
    """A failure worth retrying: 5xx/408/429, a timeout or a dropped connection."""

    def __init__(self, reason: str, retry_after: Optional[float] = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def one_line(text: str, limit: int = _MAX_MESSAGE) -> str:
    """``text`` on one line (white space runs made one space), cut to ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


@dataclass(frozen=True)
class Call:
    """What a request is for, to word its errors (``what`` reads "listing the files of ..."),
    and how many files (names, DIDs) it asks about: that bounds its answer (``answer_cap``)."""

    what: str
    asked: int = 1


@dataclass(frozen=True)
class RetrySettings:
    """The per-server retry and timeout keys (``[catalog.<kind>]``), and their key prefix for
    messages (``catalog.samweb``)."""

    timeout: float
    retry_initial: float
    retry_max: float
    retry_for: float
    key: str


def retry_settings(cfg: CatalogServerKeys, key: str) -> RetrySettings:
    """The ``timeout``/``retry_*`` keys of the config section ``key`` (``catalog.samweb``)."""
    return RetrySettings(cfg.timeout, cfg.retry_initial, cfg.retry_max, cfg.retry_for, key)


class HttpApi:
    """One aiohttp session to one catalog server (``service`` names it in messages, e.g.
    ``SAM web``); every request classified as the module docstring says.

    Subclasses word errors (``status_error``), add headers (``headers_for``, asked before
    every request, so a renewed token is used) and say who was presented (``identity``).
    """

    service = "catalog"

    def __init__(
        self,
        base_url: str,
        retry: RetrySettings,
        ssl_context: Optional[ssl.SSLContext],
        *,
        limit: int,
        headers: Optional[Mapping[str, str]] = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        identity: Optional[str] = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry
        self._ssl = ssl_context
        self._limit = limit
        self._headers = {"User-Agent": f"prestaged/{__version__}", **(headers or {})}
        self._sleep = sleep
        self.identity = identity
        """The proxy's DN when one is presented, for messages (None: no certificate)."""
        # Bounded by time only (retry_for); Retry-After capped at retry_max by Backoff.
        self.policy = RetryPolicy(
            attempts=1 << 30, initial=retry.retry_initial, max=retry.retry_max, jitter=0.5,
            total=retry.retry_for, max_retry_after=retry.retry_max,
        )
        self._session: Optional[aiohttp.ClientSession] = None
        self._answered = False
        self._early_drops = 0
        self.on_request: Optional[Callable[[str], None]] = None
        """Told ``ok`` or ``error`` after every request (the daemon's metrics)."""

    async def __aenter__(self: A) -> A:
        connector = aiohttp.TCPConnector(limit=self._limit + 1,
                                         ssl=self._ssl if self._ssl is not None else True)
        timeout = self.retry.timeout
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout),
            headers=self._headers,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, *segments: str, base: Optional[str] = None) -> URL:
        """``base_url`` (or ``base``) + ``/``-joined ``segments``, each percent-encoded (``/``
        included)."""
        path = "/".join(quote(s, safe="") for s in segments)
        return URL(f"{base or self.base_url}/{path}", encoded=True)

    async def headers_for(self, call: Call) -> Optional[Mapping[str, str]]:
        """Extra headers of one request (a token); raising ``CredentialError`` sends nothing."""
        return None

    def detail(self, status: int, reason: str, body: str) -> str:
        """``HTTP 404: <the server's message>`` for an answer that is not 200; an HTML page (a
        proxy in front of the server) gives no message: the reason phrase says enough."""
        text = "" if body.lstrip().startswith("<") else one_line(body)
        return f"HTTP {status}" + (f": {text}" if text else (f" {reason}" if reason else ""))

    def status_error(self, call: Call, status: int, reason: str, body: str,
                     headers: Mapping[str, str]) -> Exception:
        """The error for a non-200 answer that is not worth retrying (the subclass words it)."""
        return CatalogError(f"{self.service} {self.base_url} failed {call.what}: "
                            f"{self.detail(status, reason, body)}")

    def tls_hint(self) -> str:
        """What to check when TLS with the server fails (the subclass names its keys)."""
        return "check the CA directory"

    @contextlib.asynccontextmanager
    async def exchange(
        self,
        call: Call,
        url: URL,
        *,
        method: Optional[str] = None,
        params: Params = None,
        data: Union[Mapping[str, str], str, bytes, None] = None,
        whole: bool = False,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One attempt: yield the 200 response, or raise ``Transient``/a ``PrestagedError``.

        Network errors while the caller reads the body are classified the same way. With
        ``whole`` (an answer read at once, not a streamed listing) the attempt also has a
        deadline of ``WHOLE_DEADLINE`` x ``timeout``: a server trickling a byte within every
        ``timeout`` held it for ever.
        """
        assert self._session is not None, "use `async with` first"
        if method is None:
            method = "GET" if data is None else "POST"
        headers = await self.headers_for(call)
        secret = _secret_in(headers) if url.scheme != "https" else None
        if secret is not None:
            # The configuration checks refuse this first; a last guard, nothing is sent.
            raise ConfigError(f"{self.service} {self.base_url}: not sending {secret} to a "
                              f"{url.scheme}:// URL (in clear); credentials go over https only")
        ok = False
        hops = 0
        t = self.retry.timeout
        deadline = {"timeout": aiohttp.ClientTimeout(
            total=WHOLE_DEADLINE * t, sock_connect=t, sock_read=t)} if whole else {}
        try:
            while True:
                # Redirects by hand: aiohttp drops only Authorization on another origin, and
                # our tokens and passwords also ride in X-Rucio-Auth-Token, X-Rucio-Password and
                # X-Authentication-Token. Only same-origin ones are followed.
                async with self._session.request(method, url, params=params, data=data,
                                                 headers=headers, allow_redirects=False,
                                                 **deadline) as resp:
                    self._answered = True
                    if resp.status in _REDIRECTS:
                        if hops == _MAX_HOPS:
                            raise CatalogError(
                                f"{self.service} {self.base_url} redirected {call.what} more "
                                f"than {_MAX_HOPS} times (a loop, or no Location)")
                        url, method, data = self._redirect(call, resp, method, data)
                        params, hops = None, hops + 1
                        continue
                    ok = resp.status == 200
                    if resp.status != 200:
                        body = await _error_body(resp) if resp.status < 600 else ""
                        raise self._classify(call, resp.status, resp.reason or "", body,
                                             resp.headers)
                    yield resp
                    break
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as e:
            ok = False
            raise Transient(self._timed_out(e, whole)) from None
        except aiohttp.ClientError as e:
            ok = False
            raise self._network_error(e) from e
        finally:
            if self.on_request is not None:
                self.on_request("ok" if ok else "error")

    def _timed_out(self, error: BaseException, whole: bool) -> str:
        """What timed out, and the key that sets it (``catalog.samweb.timeout = 120s``)."""
        t = self.retry.timeout
        key = f"{self.retry.key}.timeout = {t:g}s"
        if isinstance(error, aiohttp.ConnectionTimeoutError):
            return f"timed out connecting: no connection within {t:g} s ({key})"
        if isinstance(error, aiohttp.ServerTimeoutError):
            return f"timed out: nothing received for {t:g} s ({key})"
        if whole:  # the deadline of an answer read whole
            return (f"timed out: the answer took more than {WHOLE_DEADLINE * t:g} s "
                    f"({WHOLE_DEADLINE} x {key})")
        return f"timed out ({key})"

    def _redirect(self, call: Call, resp: aiohttp.ClientResponse, method: str,
                  data: Union[Mapping[str, str], str, bytes, None],
                  ) -> tuple[URL, str, Union[Mapping[str, str], str, bytes, None]]:
        """Where a redirect of ``call`` goes (URL, method, body): on the same origin only
        (scheme, host, port), else ``CatalogError`` naming it, nothing sent there."""
        location = resp.headers.get("Location", "")
        try:
            target = resp.url.join(URL(location))
        except ValueError:
            target = None
        if target is None or not target.is_absolute() or target.user is not None \
                or target.origin() != resp.url.origin():
            where = redact(location)[:200] if location else "nowhere (no Location)"
            raise CatalogError(
                f"{self.service} {self.base_url} redirected {call.what} to "
                f"{printable(where)}: not followed, since the credentials we send it would go "
                "along; point the catalog's url at that server")
        if resp.status == 303 or (resp.status in (301, 302) and method == "POST"):
            return target, "GET", None  # as browsers and aiohttp do
        return target, method, data

    def _classify(self, call: Call, status: int, reason: str, body: str,
                  headers: Mapping[str, str]) -> Exception:
        if status >= 500 or status in RETRYABLE_STATUS:
            return Transient(self.detail(status, reason, body),
                             parse_retry_after(headers.get("Retry-After")))
        return self.status_error(call, status, reason, body, headers)

    def _network_error(self, e: aiohttp.ClientError) -> Exception:
        tls = tls_cause(e)
        if tls is not None:
            who = f"the proxy of {self.identity}" if self.identity else "no client certificate"
            why = one_line(str(tls) or type(tls).__name__)
            return CredentialError(
                f"TLS with {self.service} {self.base_url} failed ({why}); we presented {who}; "
                f"{self.tls_hint()}"
            )
        if _dropped(e) and not self._answered:
            # A server that refuses the client certificate (or its absence) under TLS 1.3
            # simply closes the connection: after a few such drops before any answer at
            # all, say so instead of retrying for an hour.
            self._early_drops += 1
            if self._early_drops >= _EARLY_DROPS:
                who = (f"does not accept the proxy of {self.identity}" if self.identity
                       else "requires a client certificate (give a proxy with --proxy)")
                return CredentialError(
                    f"{self.service} {self.base_url} closed the connection "
                    f"{self._early_drops} times without answering; it probably {who}"
                )
        if isinstance(e, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
            return Transient(one_line(str(e) or type(e).__name__))
        return CatalogError(f"{self.service} {self.base_url}: "
                            f"{one_line(str(e) or type(e).__name__)}")

    async def fetch(self, call: Call, url: URL, *, params: Params = None,
                    json_body: bool = True, retry: bool = True) -> Any:
        """GET ``url`` with retries; the decoded JSON (or text, ``json_body=False``)."""
        backoff = self.backoff(call)
        while True:
            try:
                async with self.exchange(call, url, params=params, whole=True) as resp:
                    text = await _capped_text(self, call, resp)
                break
            except Transient as e:
                if not retry:
                    raise
                await backoff.wait(e)
        if not json_body:
            return text
        try:
            return json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: nested 100,000 deep
            raise CatalogError(f"{self.service} {self.base_url} answered {call.what} with "
                               "malformed JSON") from None

    def backoff(self, call: Call) -> Backoff:
        """Retry bookkeeping for one request (or one resumable stream)."""
        return Backoff(self.policy, self._sleep, f"{self.service} {self.base_url}", call.what,
                       service=self.service, key=f"{self.retry.key}.retry_for")


WHOLE_DEADLINE = 10
"""An answer read whole must come within this many ``timeout``s (20 minutes by default)."""

ANSWER_PER_FILE = 64 << 10
"""Bytes of an answer read whole allowed per file asked about (``Call.asked``): a file's
locations or replicas take about 1 KiB, so 500 DIDs are about 0.5 MiB of answer."""
MIN_ANSWER = 1 << 20
"""The cap of an answer read whole about one file or none (a count, a dataset's record)."""


def answer_cap(call: Call) -> int:
    """The largest answer read whole for ``call`` (bytes): ``ANSWER_PER_FILE`` per file asked,
    at least ``MIN_ANSWER``. A server streaming without end must not take the memory of the
    machine, nor a few requests in flight each a quarter GiB of it."""
    return max(MIN_ANSWER, call.asked * ANSWER_PER_FILE)


async def capped_body(client: HttpApi, call: Call, resp: aiohttp.ClientResponse) -> bytes:
    """``resp``'s body, ``CatalogError`` past ``answer_cap(call)`` bytes."""
    cap = answer_cap(call)
    data = bytearray()
    async for chunk in resp.content.iter_chunked(_CHUNK):
        data += chunk
        if len(data) > cap:
            raise CatalogError(f"{client.service} {client.base_url} answered {call.what} with "
                               f"more than {_size(cap)} (at most {ANSWER_PER_FILE >> 10} KiB "
                               "a file is read): that is no answer to it")
    return bytes(data)


def _size(n: int) -> str:
    """``n`` bytes as "1 MiB" or "31.2 MiB"."""
    return f"{n / (1 << 20):.3g} MiB"


async def _capped_text(client: HttpApi, call: Call, resp: aiohttp.ClientResponse) -> str:
    """``resp``'s body as text (``capped_body``)."""
    data = await capped_body(client, call, resp)
    return data.decode(resp.get_encoding() if resp.charset else "utf-8", errors="replace")


async def _error_body(resp: aiohttp.ClientResponse) -> str:
    """The first ``_CHUNK`` bytes of an error answer, as text: all a message quotes."""
    data = await resp.content.read(_CHUNK)
    return data.decode("utf-8", errors="replace")


_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_HOPS = 5
"""Same-origin redirects followed for one request (then the redirect is the answer)."""


def _secret_in(headers: Optional[Mapping[str, str]]) -> Optional[str]:
    """What the first credential among ``headers`` is (``SECRET_HEADERS``), or None."""
    for name in headers or ():
        secret = SECRET_HEADERS.get(name.lower())
        if secret is not None:
            return secret
    return None


def _dropped(exc: BaseException) -> bool:
    """True if ``exc`` is the server closing or resetting the connection without answering."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return True
    cause = getattr(exc, "os_error", None) or exc.__cause__
    return isinstance(exc, aiohttp.ClientOSError) and isinstance(
        cause if cause is not None else exc, ConnectionResetError
    )


class Backoff:
    """Retry bookkeeping for one request: how many tries, since when; the delays themselves
    come from ``RetryPolicy.delay`` (the project's one backoff formula)."""

    def __init__(
        self,
        policy: RetryPolicy,
        sleep: Callable[[float], Awaitable[None]],
        server: str,
        what: str,
        *,
        service: str,
        key: str,
    ) -> None:
        self.policy = policy
        self.sleep = sleep
        self.server = redact(server)  # a base URL may carry user:password
        self.what = what
        self.service = service
        self.key = key
        self.tries = 0
        self.started: Optional[float] = None

    def reset(self) -> None:
        """Forget earlier failures (the request made progress since)."""
        self.tries, self.started = 0, None

    async def wait(self, error: Transient) -> None:
        """Sleep before the next try, or raise ``CatalogError`` when the time budget is spent."""
        now = time.monotonic()
        if self.started is None:
            self.started = now
        self.tries += 1
        elapsed = now - self.started
        # A Retry-After beyond retry_max is capped, not a reason to give up (the config's
        # documented meaning): only retry_for ends the retries of a catalog request.
        asked = (None if error.retry_after is None
                 else min(error.retry_after, self.policy.max_retry_after))
        delay = self.policy.delay(self.tries, retry_after=asked, elapsed=elapsed)
        if delay is None:
            tries = f"{self.tries} tries" if self.tries > 1 else "1 try"
            raise CatalogError(
                f"{self.server} unreachable while {self.what}: {error.reason} "
                f"(gave up after {tries} in {elapsed:.0f} s; {self.key})"
            )
        log.warning("%s: %s while %s; retry %d in %.1f s",
                    self.service, error.reason, self.what, self.tries, delay)
        await self.sleep(delay)


def catalog_ssl_context(
    credentials: Optional[Credentials] = None, ca_dir: Optional[Path] = None
) -> ssl.SSLContext:
    """Client TLS context for a catalog: presenting the proxy of ``credentials``, or anonymous.

    Trusts the system's CAs plus the grid CA directory (``credentials.ca_dir``; anonymous:
    ``ca_dir`` if it exists): catalog servers may carry either kind of certificate.
    Raises ``CredentialError`` if OpenSSL refuses the proxy or the CA directory.
    """
    if credentials is not None:
        ctx = credentials.ssl_context()
        ctx.load_default_certs()
        return ctx
    ctx = client_ssl_context()
    if ca_dir is not None and ca_dir.is_dir():
        try:
            ctx.load_verify_locations(capath=str(ca_dir))
        except (ssl.SSLError, OSError) as e:
            raise CredentialError(f"CA directory {ca_dir}: OpenSSL cannot load it") from e
    return ctx


# --- unresolved files ----------------------------------------------------------------------


@dataclass(frozen=True)
class Unresolved:
    """A file the catalog listed but that got no URL: where the catalog says it is, and why."""

    name: str
    locations: tuple[str, ...]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"name": self.name, "locations": list(self.locations), "reason": self.reason}


class UnresolvedLog:
    """The unresolved files of one ``files()`` pass: all counted, the first
    ``MAX_UNRESOLVED_KEPT`` kept; the first one is logged as a WARNING, the others at DEBUG."""

    def __init__(self) -> None:
        self.unresolved: list[Unresolved] = []
        """The first ``MAX_UNRESOLVED_KEPT`` files that got no URL."""
        self.unresolved_count = 0
        """Files that got no URL (all of them, kept or not)."""

    def _unresolved(self, name: str, locations: tuple[str, ...], reason: str) -> None:
        self.unresolved_count += 1
        if len(self.unresolved) < MAX_UNRESOLVED_KEPT:
            self.unresolved.append(Unresolved(name, locations, reason))
        level = logging.WARNING if self.unresolved_count == 1 else logging.DEBUG
        log.log(level, "unresolved: %s (%s): %s", name, reason, ", ".join(locations) or "-")

    def _forget_unresolved(self) -> None:
        self.unresolved, self.unresolved_count = [], 0


# --- streams and pipelines -----------------------------------------------------------------


class Handed:
    """The files one listing pass has handed out, to resume a listing cut off midway by
    identity, not by position: SAM and MetaCat promise no order, and a listing asked again
    may come in another one (or with files added or removed before the cut).

    Each file is kept as its 8-byte ``hash()`` (keyed SipHash, per process: a catalog cannot
    make two names collide on purpose), in the order handed out: 8 MiB for a million files,
    no names. Asked again, a listing is compared position by position while it agrees (the
    usual case: nothing more is needed); at the first file out of place a sorted copy is made
    once and every later file is looked up in it, so files already handed out are skipped
    wherever they now come, and none is lost.
    """

    def __init__(self) -> None:
        self._hashes = array("q")
        self._limit = 0
        self._pos = 0
        self._sorted: Optional[array[int]] = None

    def __len__(self) -> int:
        return len(self._hashes)

    def again(self) -> None:
        """The listing is being answered again from its start."""
        self._limit, self._pos, self._sorted = len(self._hashes), 0, None

    def fresh(self, key: Hashable) -> bool:
        """Whether the file ``key`` (its name), next in the listing, is not handed out yet;
        if so it counts as handed out from now on."""
        h = hash(key)
        if self._sorted is None:
            if self._pos >= self._limit:  # past everything handed out before
                self._hashes.append(h)
                return True
            if self._hashes[self._pos] == h:
                self._pos += 1
                return False
            log.info("catalog: a listing asked again comes in another order after %d files; "
                     "skipping the %d files handed out before by name", self._pos, self._limit)
            self._sorted = array("q", sorted(self._hashes[:self._limit]))
        i = bisect.bisect_left(self._sorted, h)
        if i < len(self._sorted) and self._sorted[i] == h:
            return False
        self._hashes.append(h)
        return True


MAX_LINE = 64 << 10
"""The longest line of a listing (a file name and its fields are a few hundred bytes)."""


def _bounded(resp: aiohttp.ClientResponse, tail: bytes) -> bytes:
    """``tail``, the start of a line, unless it is longer than ``MAX_LINE``: then it is no
    listing (and gluing chunks to it again and again took quadratic time and memory)."""
    if len(tail) > MAX_LINE:
        raise CatalogError(f"{resp.url.origin()} answered a line longer than "
                           f"{MAX_LINE >> 10} KiB: that is no file listing")
    return tail


async def line_blocks(resp: aiohttp.ClientResponse) -> AsyncIterator[list[bytes]]:
    """The complete lines of a streamed body, a list per 64 KiB read (no newlines; a last line
    without one included): one await per block, not per line, for listings of 10^5 records."""
    tail = b""
    async for chunk in resp.content.iter_chunked(_CHUNK):
        parts = (tail + chunk).split(b"\n")
        tail = _bounded(resp, parts.pop())
        if parts:
            yield parts
    if tail:
        yield [tail]


async def lines(resp: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """Text lines of a streamed body, read in 64 KiB chunks (cheaper than one await per line)."""
    tail = b""
    async for chunk in resp.content.iter_chunked(_CHUNK):
        parts = (tail + chunk).split(b"\n")
        tail = _bounded(resp, parts.pop())
        for raw in parts:
            yield raw.decode("utf-8", errors="replace")
    if tail:
        yield tail.decode("utf-8", errors="replace")


async def gather_or_cancel(coros: Iterable[Awaitable[T]]) -> list[T]:
    """``gather`` that cancels the others as soon as one fails, then raises that failure."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def ordered(
    batches: AsyncGenerator[B, None],
    resolve: Callable[[B], Awaitable[list[FileRef]]],
    parallel: int,
) -> AsyncGenerator[list[FileRef], None]:
    """``resolve(batch)`` for every batch, handed out in batch order, with up to ``parallel``
    batches resolving at once while the earlier ones are handed out (a list per batch: the
    caller yields the files, one generator step per file instead of two).

    Memory stays bounded: besides the batch being handed out, at most ``parallel`` batches are
    resolving (or resolved) at any time, and ``batches`` is read only as fast as they are
    consumed. An error from ``batches`` reaches the consumer after the batches before it; an
    error of a batch when its turn comes. Stopping early cancels everything still running.
    """
    slots = asyncio.Semaphore(parallel)
    ready: asyncio.Queue[Optional[asyncio.Future[list[FileRef]]]] = asyncio.Queue()

    async def feed() -> None:
        try:
            async for batch in batches:
                await slots.acquire()
                ready.put_nowait(asyncio.ensure_future(resolve(batch)))
        except Exception as e:  # handed to the consumer, in order, after the batches before it
            failed: asyncio.Future[list[FileRef]] = asyncio.get_running_loop().create_future()
            failed.set_exception(e)
            await slots.acquire()
            ready.put_nowait(failed)
        finally:
            await batches.aclose()
        ready.put_nowait(None)

    feeder = asyncio.ensure_future(feed())
    try:
        while True:
            batch = await ready.get()
            if batch is None:
                break
            try:
                refs = await batch
            finally:
                slots.release()
            yield refs
        await feeder
    finally:
        await _cancel_all(feeder, ready)


async def _cancel_all(
    feeder: asyncio.Future[None],
    ready: asyncio.Queue[Optional[asyncio.Future[list[FileRef]]]],
) -> None:
    """Stop the feeder and every batch still queued, and wait until they are gone."""
    pending: list[asyncio.Future[Any]] = [feeder]
    while not ready.empty():
        item = ready.get_nowait()
        if item is not None:
            pending.append(item)
    for fut in pending:
        fut.cancel()
    results = await asyncio.gather(*pending, return_exceptions=True)
    for result in results:
        if isinstance(result, PrestagedError):
            log.debug("catalog: dropped after stop: %s", result)
