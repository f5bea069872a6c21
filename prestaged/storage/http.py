"""The touch over HTTP(S): one ranged GET of a file's first bytes, classified.

``GET`` with ``Range: bytes=0-(n-1)``; at most ``n`` bytes of file data are read whatever the
status. 206 and 200 are warm (200 means the server ignored Range: the connection is closed after
``n`` bytes so the rest of the file is never transferred); 416 is an empty file; 404/410 missing;
401/403 denied. Redirects (a dCache door sending us to a pool) are followed here rather than by
aiohttp so that the connection to the redirect target is closed after the read (a dCache pool
mover lives as long as its connection) while the connection to the door stays in the pool.
Each pool hop offers the TLS session of the previous hop to the same pool (``storage.tls``), so
closing costs an abbreviated handshake rather than a full one.

Plain URLs go through ``storage.fast`` first (pre-built request bytes on pooled keep-alive
connections, answers parsed by httptools): it gives the same ``Attempt`` for a final answer, and
reads a door's redirect target (when plain too) on a one-shot connection of its own, with the
same TLS session offer. Anything else (a target that is not plain, a second redirect, failures,
malformed or missing answers) goes back to the aiohttp path here, which classifies it exactly as
without the fast path; a pool hop that fails is not retried on its own (its one-time URL may be
spent) but the whole file is, from its URL.

Redirects are followed to ``https`` only (or from ``http`` to ``http``, after the engine let an
``http`` URL through): a door sending us from https to ``http://`` would expose the request
(and a bearer token) in clear, and ``file:``/``ftp:`` are no storage of ours. Anything else
aiohttp raises about one URL is that URL's failed ``Attempt``, never an exception out of
``touch``.

With a bearer token (``token``), each touch asks it for the ``Authorization`` value when it
starts (so a renewed token file is used by the touches that start after), and sends it to the
file's URL only, and over https only (a plain-http URL goes without it). A redirect target of
another origin (scheme, host or port) never gets it, nor does any later hop, as aiohttp itself
drops ``Authorization`` on a cross-origin redirect (a dCache pool is authorised by the one-time
URL of the redirect). The fast path's one-shot hops never carry it; a redirect to the same
origin is followed by the aiohttp path, which sends it. A token that cannot be used now
(expired, not yet valid) sends nothing: the touch is a ``Failure.CREDENTIAL`` attempt carrying
the ``CredentialError``'s text.

This module does one attempt; retries, breakers and throttling live in ``prestaged.warm``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Optional, Union

from yarl import URL

from prestaged._version import __version__
from prestaged.errors import CredentialError
from prestaged.model import Attempt, Failure
from prestaged.net import bearer_error, parse_retry_after, tls_cause
from prestaged.storage.attempt import (
    CONTENT_RANGE_TOTAL,
    DENIED,
    DRAIN_LIMIT,
    LISTING_ERROR,
    REDIRECTS,
    is_listing,
    past_the_end,
    status_error,
)
from prestaged.storage.fast import (
    RESOLVE_TTL,
    Answer,
    Endpoint,
    FastPath,
    FastPathStats,
    Redirect,
    connect_timeout_text,
)
from prestaged.storage.tls import Hop, SessionCache, enable_resumption

if TYPE_CHECKING:
    import aiohttp

    from prestaged.tokens import TokenSource

__all__ = ["FastPathStats", "HttpToucher"]

_ENCODED = re.compile(r"https?://[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]*")


def _aiohttp() -> Any:
    """The aiohttp module, imported on first use: a run that the fast path serves entirely
    (plain URLs, no redirect, no failure) never loads it (~0.17 s of start-up)."""
    import aiohttp

    return aiohttp


def _size(resp: aiohttp.ClientResponse) -> Optional[int]:
    """The file size an answer reveals: a 206's Content-Range total or a 200's length."""
    if resp.status == 206:
        match = CONTENT_RANGE_TOTAL.search(resp.headers.get("Content-Range", ""))
        return int(match.group(1)) if match else None
    if resp.status == 200:
        return resp.content_length
    return None


def _describe(exc: BaseException) -> str:
    """The text of ``exc`` (an ``Attempt`` folds, bounds and redacts it)."""
    return str(exc) or type(exc).__name__


def _untrusted(e: ssl.SSLCertVerificationError, server: str) -> Attempt:
    """We refused the certificate of ``server`` (``host:port``, the door's or a pool's it
    redirected to: a pool's was blamed on the door): say which way, the name first (a wrong
    host name is the usual cause, and it is not our proxy's fault)."""
    inner = getattr(e, "certificate_error", e)  # aiohttp's ClientConnectorCertificateError
    why = str(getattr(inner, "verify_message", None) or inner)
    if "hostname mismatch" in why.lower() or "ip address mismatch" in why.lower():
        text = f"the certificate of {server} does not match its name ({why})"
    else:
        text = f"the certificate of {server} is not trusted ({why}; check the CA directory)"
    return Attempt(failure=Failure.UNTRUSTED, error=text)


def _refused_redirect(source: URL, target: URL, status: int) -> Optional[Attempt]:
    """The failure of a redirect from ``source`` (the URL that answered it) to ``target`` that
    we do not follow, or None.

    Only ``https`` targets are followed, and ``http`` ones from an ``http`` source: never a
    downgrade from TLS (at any hop), never another scheme (``file:``, ``ftp:``, ``davs:``...).
    """
    scheme = target.scheme
    if scheme == "https" or (scheme == "http" and source.scheme == "http"):
        return None
    return Attempt(status=status, failure=Failure.PROTOCOL, error=f"refused redirect to {target}")


_Origin = tuple[str, str, Optional[int]]


def _origin(url: URL) -> _Origin:
    """Scheme, host and port (explicit or the scheme's default) of an absolute ``url``: a
    bearer token goes only where all three are those of the URL it was sent with."""
    return url.scheme, (url.raw_host or "").lower(), url.port


class HttpToucher:
    """Touches URLs over the fast path's connections and one pooled ``aiohttp.ClientSession``
    (built in ``start()`` without the fast path, else when first needed).

    ``nbytes``: bytes read per file (default 4). ``timeout``: seconds for one attempt including
    redirects; ``connect_timeout``: seconds to connect + handshake. ``limit``/``limit_per_host``
    bound sockets overall and per host (the fast path's kept-alive and one-shot connections and
    aiohttp's pool, each). ``fast_path`` (default True): try plain URLs, and the redirect targets
    they lead to, on ``storage.fast`` connections first. ``token`` (default None): the bearer
    token sent to each file's URL (never to a redirect target elsewhere; see the module).
    """

    def __init__(
        self,
        ssl_context: Optional[ssl.SSLContext],
        *,
        nbytes: int = 4,
        limit: int = 32,
        limit_per_host: int = 32,
        timeout: float = 60.0,
        connect_timeout: float = 15.0,
        max_redirects: int = 5,
        fast_path: bool = True,
        token: Optional[TokenSource] = None,
    ) -> None:
        self.nbytes = nbytes
        self._token = token
        # The fast path's Authorization line, encoded once per token (not once per request).
        self._auth_value = ""
        self._auth_line = b""
        self.max_redirects = max_redirects
        self._ssl = ssl_context
        self._limit = limit
        self._limit_per_host = limit_per_host
        self._total = timeout
        self._connect_timeout = connect_timeout
        self._headers = {
            "Range": f"bytes=0-{nbytes - 1}",
            "Accept-Encoding": "identity",
            "User-Agent": f"prestaged/{__version__}",
        }
        # Pool movers end when their connection does; newer dCache also honours the header.
        # (The door request sends the session's default headers: no per-request merge.)
        self._pool_headers = {"Connection": "close"}
        self._session: Optional[aiohttp.ClientSession] = None
        self._timeout: Optional[aiohttp.ClientTimeout] = None
        self._started = False
        self._use_fast = fast_path
        self._fast: Optional[FastPath] = None
        self._fast_stats: Optional[FastPathStats] = None
        self._tls = SessionCache()

    @property
    def tls_sessions(self) -> SessionCache:
        """Pool TLS sessions kept for resumption (``offered``/``resumed`` count handshakes)."""
        return self._tls

    @property
    def fast_path_stats(self) -> Optional[FastPathStats]:
        """Counters of the fast path, kept after ``close()`` (None: off, or never started)."""
        return self._fast_stats

    async def start(self) -> None:
        """Open the connection pools; pool hops made with the SSL context resume sessions."""
        if self._ssl is not None:
            enable_resumption(self._ssl)
        if self._use_fast:
            lines = "".join(f"{k}: {v}\r\n" for k, v in self._headers.items())
            self._fast = FastPath(self._ssl, nbytes=self.nbytes, headers=lines.encode("ascii"),
                                  limit=self._limit, limit_per_host=self._limit_per_host,
                                  connect_timeout=self._connect_timeout)
            self._fast_stats = self._fast.stats
        else:
            self._open_session()
        self._started = True

    def _open_session(self) -> aiohttp.ClientSession:
        """The aiohttp session (made on first use when the fast path is on)."""
        if self._session is not None:
            return self._session
        aio = _aiohttp()
        self._timeout = aio.ClientTimeout(total=self._total,
                                              sock_connect=self._connect_timeout)
        connector = aio.TCPConnector(
            limit=self._limit,
            limit_per_host=self._limit_per_host,
            ssl=self._ssl if self._ssl is not None else True,
            ttl_dns_cache=RESOLVE_TTL,  # seconds; the fast path keeps names as long
        )
        session: aiohttp.ClientSession = aio.ClientSession(
            connector=connector,
            headers=self._headers,
            cookie_jar=aio.DummyCookieJar(),  # storage sets none; filtering costs per request
            timeout=self._timeout,
            auto_decompress=False,
            skip_auto_headers=("Accept",),
        )
        self._session = session
        return session

    def _is_open(self) -> bool:
        """Between ``start()`` and ``close()`` (a method: it changes across an await)."""
        return self._started

    async def close(self) -> None:
        """Close every pooled connection."""
        self._started = False
        if self._fast is not None:
            self._fast.close()
            self._fast = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> HttpToucher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def touch(self, url: str) -> Attempt:
        """One attempt at ``url``: follow redirects, read at most ``nbytes``, classify.

        Never raises for a URL or an answer, however bad: it is the file's failed ``Attempt``
        (``unsupported scheme davs://``, ``refused redirect to http://...``).
        """
        if not self._started:
            raise RuntimeError("HttpToucher.start() was not called")
        auth: Optional[str] = None
        # Never in clear: a plain-http URL (storage.allow_plain_http) goes without the token.
        if self._token is not None and url[:8].lower() == "https://":  # schemes ignore case
            try:
                auth = self._token.authorization()
            except CredentialError as e:
                return Attempt(failure=Failure.CREDENTIAL, error=str(e))
        fast = self._fast
        route = None
        if fast is not None:
            route = fast.route(url) if auth is None else fast.route(url, self._line(auth))
        if fast is None or route is None:
            return await self._slow(self._open_session(), url, auth=auth)
        deadline = fast.loop.time() + self._total
        answer = await fast.fetch(*route, self._total)
        if isinstance(answer, Attempt):
            return answer
        source, hop = url, 1
        if isinstance(answer, Redirect) and self.max_redirects > 0:
            target = self._hop_target(url, answer)
            if isinstance(target, Attempt):
                return target
            pool = None
            if target is not None and (auth is None or not self._same_origin(url, target)):
                # (a same-origin target gets the token: the aiohttp path below sends it)
                pool = fast.hop_route(str(target))
            if target is not None and pool is not None:
                answer = await self._pool_hop(fast, *pool, deadline - fast.loop.time())
                if isinstance(answer, Attempt):
                    return answer
                if answer is not None:  # the pool redirects too: aiohttp goes on from there
                    # (off the token's origin: no later hop gets it)
                    source, hop, auth = str(target), 2, None
                # else: the whole file again through aiohttp, from its URL (a pool's one-time
                # URL may be spent: its mover ended with the connection)
        if not self._is_open():
            # close() ran while this file was in flight (a run stopping): no new session, which
            # nothing would close; the same answer a closed aiohttp session gives.
            return Attempt(failure=Failure.RESET, error="connection pool closed")
        remaining = deadline - fast.loop.time()
        if remaining <= 0:
            return Attempt(failure=Failure.TIMEOUT, error="timed out")
        # Anything but a final answer goes to aiohttp, within what is left of the time limit: a
        # redirect's target (as its hop 1, or 2 after a pool's redirect), else the URL again,
        # classified as without the fast path.
        session = self._open_session()
        timeout = _aiohttp().ClientTimeout(total=remaining, sock_connect=self._connect_timeout)
        return await self._slow(session, source, redirect=answer, hop=hop, timeout=timeout,
                                auth=auth)

    def _line(self, auth: str) -> bytes:
        """The fast path's ``Authorization`` line (and end of head) for the value ``auth``."""
        if auth != self._auth_value:  # a new token: encode it once
            # ASCII by construction: TokenSource only takes base64url JWTs.
            self._auth_line = b"Authorization: " + auth.encode("ascii") + b"\r\n\r\n"
            self._auth_value = auth
        return self._auth_line

    @staticmethod
    def _same_origin(url: str, target: URL) -> bool:
        """Whether ``target`` (a redirect from the fast-path URL ``url``) is ``url``'s origin."""
        return _origin(URL(url, encoded=True)) == _origin(target)

    @staticmethod
    def _hop_target(url: str, redirect: Redirect) -> Union[URL, Attempt, None]:
        """Where the door's ``redirect`` from ``url`` (a fast-path URL) sends us, as the aiohttp
        path resolves it; the refusal if we do not follow it; None if yarl refuses it (aiohttp
        then says why)."""
        try:
            source = URL(url, encoded=True)  # the fast path takes encoded URLs only
            target = source.join(URL(redirect.location))
        except (ValueError, TypeError):
            return None
        return _refused_redirect(source, target, redirect.status) or target

    async def _pool_hop(self, fast: FastPath, ep: Endpoint, request: bytes,
                        timeout: float) -> Answer:
        """A redirect target's answer on a one-shot fast-path connection (closed after the
        answer), offering and then keeping the pool's TLS session like the aiohttp path."""
        with self._tls.offering(ep.host, ep.port) as pool:
            answer = await fast.fetch(ep, request, timeout)
            if isinstance(answer, Attempt) and answer.status:
                pool.remember()
        return answer

    async def _slow(self, session: aiohttp.ClientSession, url: str, *,
                    redirect: Optional[Redirect] = None, hop: int = 1,
                    timeout: Optional[aiohttp.ClientTimeout] = None,
                    auth: Optional[str] = None) -> Attempt:
        """The touch through aiohttp; with ``redirect`` (the answer ``url`` gave), from its
        target on, as hop number ``hop``. ``auth``: the ``Authorization`` value ``url`` was
        (or is) sent with; hops to ``url``'s origin get it too, until one leaves it."""
        aiohttp = _aiohttp()
        try:
            # A URL made only of characters legal in an encoded URL needs no requoting by yarl
            # (5% of the per-file CPU); anything else is quoted as usual.
            target = URL(url, encoded=_ENCODED.fullmatch(url) is not None)
        except (ValueError, TypeError) as e:
            return Attempt(failure=Failure.PROTOCOL, error=f"bad URL: {_describe(e)}")
        if target.scheme not in ("http", "https"):
            return Attempt(failure=Failure.PROTOCOL,
                           error=f"unsupported scheme {target.scheme or '(none)'}://")
        if auth is not None and target.raw_user is not None:
            # aiohttp's words were "Cannot combine AUTHORIZATION header with AUTH argument".
            return Attempt(failure=Failure.PROTOCOL,
                           error="bad URL: it names a user (user:password@) and a bearer "
                                 "token goes with it: one request sends one of them; drop "
                                 "the URL's user:password, or --auth proxy")
        try:
            origin = _origin(target) if auth is not None else None
            if redirect is None:
                return await self._within(timeout, self._follow(
                    session, target, timeout=timeout, auth=auth, origin=origin))
            nxt = target.join(URL(redirect.location))
            refused = _refused_redirect(target, nxt, redirect.status)
            if refused is not None:
                return refused
            return await self._within(timeout, self._follow(
                session, nxt, first_hop=hop, timeout=timeout, auth=auth, origin=origin))
        except aiohttp.ConnectionTimeoutError:
            # No TCP connection or TLS handshake within connect_timeout: an endpoint that does
            # not answer, counted toward the unreachable breaker like a refused connection.
            return Attempt(failure=Failure.UNREACHABLE,
                           error=connect_timeout_text(self._connect_timeout))
        except asyncio.TimeoutError:
            return Attempt(failure=Failure.TIMEOUT, error="timed out")
        except aiohttp.ClientConnectorError as e:
            tls = tls_cause(e, handshake=True)
            if isinstance(tls, ssl.SSLCertVerificationError):
                return _untrusted(tls, f"{e.host}:{e.port}")
            if tls is not None:
                why = _describe(tls) if str(tls) else "connection closed during the TLS handshake"
                return Attempt(failure=Failure.TLS, error=f"TLS handshake failed: {why}")
            return Attempt(failure=Failure.UNREACHABLE, error=_describe(e))
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            tls = tls_cause(e)
            if tls is not None:
                return Attempt(failure=Failure.TLS, error=_describe(tls))
            return Attempt(failure=Failure.RESET, error=_describe(e))
        except aiohttp.ClientResponseError as e:
            return Attempt(failure=Failure.PROTOCOL, error=_describe(e))
        except (aiohttp.InvalidURL, ValueError) as e:
            return Attempt(failure=Failure.PROTOCOL, error=f"bad URL: {_describe(e)}")
        except aiohttp.ClientError as e:
            # Whatever else aiohttp refuses about this URL or its answer fails this file only.
            return Attempt(failure=Failure.PROTOCOL, error=_describe(e))

    async def _within(self, timeout: Optional[aiohttp.ClientTimeout],
                      hops: Awaitable[Attempt]) -> Attempt:
        """``hops`` (every request of one attempt) within the attempt's total time: each
        request's own timeout is all of it, so six slow hops took six times ``--timeout``."""
        chosen = timeout or self._timeout
        total = chosen.total if chosen is not None else None
        if total is None:
            return await hops
        return await asyncio.wait_for(hops, total)

    async def _follow(self, session: aiohttp.ClientSession, target: URL, *, first_hop: int = 0,
                      timeout: Optional[aiohttp.ClientTimeout] = None,
                      auth: Optional[str] = None, origin: Optional[_Origin] = None) -> Attempt:
        for hop in range(first_hop, self.max_redirects + 1):
            headers = None if hop == 0 else self._pool_headers
            if auth is not None:
                if _origin(target) == origin:
                    headers = {**(headers or {}), "Authorization": auth}
                else:
                    auth = None  # left the token's origin: never sent again, even back there
            host, port = (target.raw_host or "").rstrip("."), target.port or 0
            offer = self._tls.offering(host, port) if hop else contextlib.nullcontext()
            with offer as pool:
                async with session.get(target, headers=headers, allow_redirects=False,
                                       timeout=timeout or self._timeout) as resp:
                    if resp.status not in REDIRECTS:
                        return await self._final(resp, pool)
                    location = resp.headers.get("Location")
                    if not location:
                        return Attempt(status=resp.status, failure=Failure.PROTOCOL,
                                       error=f"HTTP {resp.status} redirect without Location")
                    await self._drain(resp)
                    nxt = resp.url.join(URL(location))
                    refused = _refused_redirect(resp.url, nxt, resp.status)
                    if refused is not None:
                        return refused
                    target = nxt
        return Attempt(failure=Failure.PROTOCOL, error=f"more than {self.max_redirects} redirects")

    async def _final(self, resp: aiohttp.ClientResponse, pool: Optional[Hop]) -> Attempt:
        """Read and classify a final answer; from a pool (after a redirect), keep its TLS
        session and close its connection."""
        aiohttp = _aiohttp()
        status = resp.status
        size = _size(resp)
        headless = size == 0 or (
            status == 206 and past_the_end(resp.headers.get("Content-Range", "")))
        listing = False
        if headless:
            # Nothing to read: XRootD 5.5 answers an empty file, or a range past the end of a
            # short one, with a 206, the asked range's Content-Length and no body. Do not wait
            # for bytes that never come.
            data = 0
        elif status in (200, 206):
            try:
                head = await self._read_head(resp)
                data = len(head)
                listing = status == 200 and is_listing(head)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
                # The server answered, then its body broke off (a pool dying mid-read, a
                # truncated chunk): this file's failure, retried, never a refused connection
                # (it counted toward the credentials breaker: exit 3 blaming the proxy).
                resp.close()
                return Attempt(status=status, failure=Failure.RESET,
                               error=f"HTTP {status}, then the body broke off: {_describe(e)}",
                               size=size)
        else:
            data = 0
            await self._drain(resp)
        if pool is not None:
            pool.remember()  # after the answer: a TLS 1.3 ticket follows the handshake
        if headless or pool is not None:
            resp.close()
        if listing:  # a directory: nothing warmed (storage.attempt.is_listing)
            return Attempt(status=status, data=data, failure=Failure.PROTOCOL,
                           error=LISTING_ERROR, size=size)
        auth = ""
        if status in DENIED:
            auth = bearer_error(", ".join(resp.headers.getall("WWW-Authenticate", ())))
        return Attempt(
            status=status,
            data=data,
            retry_after=parse_retry_after(resp.headers.get("Retry-After")),
            error="" if status < 400 else status_error(status, resp.reason or "", auth),
            size=size,
            auth_error=auth,
        )

    async def _read_head(self, resp: aiohttp.ClientResponse) -> bytes:
        """Read at most ``nbytes`` of body (returned); close the connection if more would
        follow."""
        length = resp.content_length
        if length is not None and length <= self.nbytes:
            return await resp.read()
        chunks: list[bytes] = []
        got = 0
        while got < self.nbytes:
            chunk = await resp.content.read(self.nbytes - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if not resp.content.at_eof():
            # The server ignored Range (or sent more than asked): drop the connection so the
            # rest of the file is never transferred.
            resp.close()
        return b"".join(chunks)

    @staticmethod
    async def _drain(resp: aiohttp.ClientResponse) -> None:
        length = resp.content_length
        if length is not None and length <= DRAIN_LIMIT:
            await resp.read()
        else:
            resp.close()
