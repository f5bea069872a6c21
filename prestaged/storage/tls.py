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
``SSLObject`` keeps its session). A server that refuses (no tickets, no cache, a forgotten
session) simply does a full handshake.

Taking a session out of a connection costs a copy in CPython (``i2d``/``d2i`` of the session
and the server's certificate, ~0.25 ms, as much as the copy made again to offer it). So after a
resumed hop the cached session stays while the pool accepts it; it is replaced after a full
handshake, once half its lifetime is gone, and at every hop for a pool that refused a session
it had accepted before (single-use tickets). Reusing a TLS 1.3 ticket lets an observer link the
connections (RFC 8446 C.4), which here all come from one client to one pool anyway.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Optional

__all__ = ["Hop", "SessionCache", "enable_resumption"]

Key = tuple[str, int]
"""(server name as given to ``wrap_bio``, port)."""

_OFFER: ContextVar[Optional[Hop]] = ContextVar("prestaged_tls_offer", default=None)
_MARK = "_prestaged_resumption"


class _Entry:
    """A cached session; ``proven`` once a server resumed it, ``single_use`` once the pool
    refused a proven session (kept when the session is replaced)."""

    __slots__ = ("proven", "session", "single_use")

    def __init__(self, session: ssl.SSLSession) -> None:
        self.session = session
        self.proven = False
        self.single_use = False


class SessionCache:
    """The last resumable ``ssl.SSLSession`` per (server name, port), least recently used
    dropped beyond ``size`` entries (default 256). Used from one event loop.

    Counters: ``offered`` (handshakes that offered a cached session), ``resumed`` (of those, the
    server accepted it), ``kept`` (sessions taken out of a connection and cached).
    """

    def __init__(self, size: int = 256) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self._size = size
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self.offered = 0
        self.resumed = 0
        self.kept = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, host: str, port: int) -> Optional[ssl.SSLSession]:
        """The session cached for ``host``:``port``, or None."""
        key = (host, port)
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry.session

    def put(self, host: str, port: int, session: ssl.SSLSession) -> None:
        """Cache ``session`` for ``host``:``port`` (replacing the one there)."""
        key = (host, port)
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = _Entry(session)
        else:
            entry.session, entry.proven = session, False
        self._entries.move_to_end(key)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def _keeps(self, key: Key, resumed: Optional[ssl.SSLSession]) -> bool:
        """Whether the cached session stays after a hop that resumed ``resumed`` (the cached one,
        proven now, or one it has replaced since); see the module docstring."""
        entry = self._entries.get(key)
        if entry is None or entry.single_use:
            return False
        cached = entry.session
        if time.time() - cached.time >= cached.timeout / 2:
            return False  # take a fresh one before the server lets this one expire
        if cached is resumed:
            entry.proven = True
        return True

    def _refused(self, key: Key, offered: Optional[ssl.SSLSession]) -> None:
        """A hop that offered ``offered`` made a full handshake: if the pool had accepted that
        session before, take every new session from now on."""
        entry = self._entries.get(key)
        if entry is not None and offered is not None and entry.session is offered and entry.proven:
            entry.single_use = True

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
    ``SSLObject`` once made (None before, or without TLS); ``offered`` the session offered."""

    __slots__ = ("cache", "key", "offered", "tls")

    def __init__(self, cache: SessionCache, key: Key) -> None:
        self.cache = cache
        self.key = key
        self.tls: Optional[ssl.SSLObject] = None
        self.offered: Optional[ssl.SSLSession] = None

    def session(self, server_hostname: object) -> Optional[ssl.SSLSession]:
        """The session to offer a server named ``server_hostname`` (None: none cached, or not
        the server this hop is to)."""
        if server_hostname != self.key[0]:
            return None
        session = self.cache.get(*self.key)
        if session is not None:
            self.cache.offered += 1
        self.offered = session
        return session

    def remember(self) -> None:
        """Cache the connection's session if it can be resumed (count it if it was), unless the
        session it resumed stays (see the module docstring).

        Call it after reading the answer: a TLS 1.3 ticket arrives after the handshake, and
        the session read before it cannot be resumed.
        """
        tls = self.tls
        if tls is None:
            return
        cache = self.cache
        if tls.session_reused:
            cache.resumed += 1
            if cache._keeps(self.key, self.offered):
                return
        else:
            cache._refused(self.key, self.offered)
        session = tls.session
        if session is not None and (session.has_ticket or session.id):
            cache.put(*self.key, session)
            cache.kept += 1


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
