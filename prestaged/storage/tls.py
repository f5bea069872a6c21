"""TLS session resumption for the hops to dCache pools.

A pool connection is closed after its few bytes (a dCache mover lives as long as its
connection), so every file opens a new TLS connection to a pool. Offering the session of the
previous connection to the same pool turns the full handshake (certificate chain sent, signed
and verified) into an abbreviated one.

Neither aiohttp nor the event loops take a session, but both asyncio's and uvloop's TLS
transports build their ``SSLObject`` through ``SSLContext.wrap_bio``, which does. So
``enable_resumption`` wraps the context's ``wrap_bio`` once; the wrapper offers a session only
inside ``SessionCache.offering(host, port)`` (a ``ContextVar``, copied into any task the
connection is made in), and only to the server name it was cached for; it also hands the new
``SSLObject`` to the ``Hop`` that block yields (aiohttp may have released the connection, and the
fast path's one-shot hop has closed it, by the time the caller sees the answer). Every other
connection made with the context (doors, kept-alive fast-path connections) is unchanged.

A TLS 1.3 session is only resumable once its ticket has arrived, after the handshake: keep it
with ``Hop.remember()`` after reading the answer (before closing, or after a clean close: the
``SSLObject`` keeps its session). A server that refuses (no
tickets, no cache, a forgotten session) simply does a full handshake.
"""

from __future__ import annotations

import contextlib
import ssl
from collections import OrderedDict
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Optional

__all__ = ["Hop", "SessionCache", "enable_resumption"]

Key = tuple[str, int]
"""(server name as given to ``wrap_bio``, port)."""

_OFFER: ContextVar[Optional[Hop]] = ContextVar("prestaged_tls_offer", default=None)
_MARK = "_prestaged_resumption"


class SessionCache:
    """The last resumable ``ssl.SSLSession`` per (server name, port), least recently used
    dropped beyond ``size`` entries (default 256). Used from one event loop.

    Counters: ``offered`` (handshakes that offered a cached session), ``resumed`` (of those, the
    server accepted it).
    """

    def __init__(self, size: int = 256) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self._size = size
        self._sessions: OrderedDict[Key, ssl.SSLSession] = OrderedDict()
        self.offered = 0
        self.resumed = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, host: str, port: int) -> Optional[ssl.SSLSession]:
        """The session cached for ``host``:``port``, or None."""
        key = (host, port)
        session = self._sessions.get(key)
        if session is not None:
            self._sessions.move_to_end(key)
        return session

    def put(self, host: str, port: int, session: ssl.SSLSession) -> None:
        """Cache ``session`` for ``host``:``port`` (replacing the one there)."""
        key = (host, port)
        self._sessions[key] = session
        self._sessions.move_to_end(key)
        if len(self._sessions) > self._size:
            self._sessions.popitem(last=False)

    @contextlib.contextmanager
    def offering(self, host: str, port: int) -> Iterator[Hop]:
        """Within this block, a TLS connection to ``host`` made with a context passed through
        ``enable_resumption`` offers the session cached for ``host``:``port``; the ``Hop``
        yielded sees that connection's ``SSLObject``."""
        hop = Hop(self, (host, port))
        token = _OFFER.set(hop)
        try:
            yield hop
        finally:
            _OFFER.reset(token)
            # Copies of the context (a transport's, a task's) may outlive the block: do not let
            # them keep the SSLObject and its buffers alive too.
            hop.tls = None


class Hop:
    """One connection to ``key`` inside ``SessionCache.offering``: ``tls`` is its
    ``SSLObject`` once made (None before, or without TLS)."""

    __slots__ = ("cache", "key", "tls")

    def __init__(self, cache: SessionCache, key: Key) -> None:
        self.cache = cache
        self.key = key
        self.tls: Optional[ssl.SSLObject] = None

    def session(self, server_hostname: object) -> Optional[ssl.SSLSession]:
        """The session to offer a server named ``server_hostname`` (None: none cached, or not
        the server this hop is to)."""
        if server_hostname != self.key[0]:
            return None
        session = self.cache.get(*self.key)
        if session is not None:
            self.cache.offered += 1
        return session

    def remember(self) -> None:
        """Cache the connection's session if it can be resumed (count it if it was).

        Call it after reading the answer: a TLS 1.3 ticket arrives after the handshake, and
        the session read before it cannot be resumed.
        """
        tls = self.tls
        if tls is None:
            return
        if tls.session_reused:
            self.cache.resumed += 1
        session = tls.session
        if session is not None and (session.has_ticket or session.id):
            self.cache.put(*self.key, session)


def enable_resumption(context: ssl.SSLContext) -> None:
    """Let connections made with ``context`` inside ``SessionCache.offering`` resume a session.

    Idempotent; connections made outside ``offering`` (or with an explicit ``session``) are
    made exactly as before.
    """
    if getattr(context, _MARK, False):
        return
    plain = context.wrap_bio

    def wrap_bio(incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool = False,
                 server_hostname: Optional[str] = None, session: Optional[ssl.SSLSession] = None,
                 ) -> ssl.SSLObject:
        hop = _OFFER.get()
        if hop is None or server_side:
            return plain(incoming, outgoing, server_side, server_hostname, session)
        if session is None:
            session = hop.session(server_hostname)
        tls = hop.tls = plain(incoming, outgoing, server_side, server_hostname, session)
        return tls

    # An attribute of this instance: the class and other contexts stay as they are.
    setattr(context, "wrap_bio", wrap_bio)  # noqa: B010 (mypy: no assignment to a method)
    setattr(context, _MARK, True)
