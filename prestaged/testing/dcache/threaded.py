"""The dCache emulator on its own event loop in a daemon thread, for synchronous code (the
in-process CLI of the tests): ``with ThreadedDCache(ssl, pool_ssl, DCacheConfig(...)) as site``;
``bearer=BearerCheck(...)`` and ``clock=`` are passed on to ``DCacheServer``.

Mutators and reads run on the emulator's loop and return once done, so the next request sees
them; ``stats()`` and ``replica()`` return copies.
"""

from __future__ import annotations

import dataclasses
import ssl
import time
from typing import Any, Callable, Optional

from prestaged.testing.dcache.model import DCacheConfig, Locality, Replica
from prestaged.testing.dcache.server import DCacheServer
from prestaged.testing.threaded import ThreadedServer
from prestaged.testing.tokens import BearerCheck

__all__ = ["ThreadedDCache"]


class ThreadedDCache(ThreadedServer[DCacheServer]):
    """A ``DCacheServer`` in a thread; see the module."""

    def __init__(self, ssl_context: ssl.SSLContext, pool_ssl_context: ssl.SSLContext,
                 config: Optional[DCacheConfig] = None, *, bearer: Optional[BearerCheck] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(lambda: DCacheServer(ssl_context, pool_ssl_context, config,
                                              bearer=bearer, clock=clock),
                         "dcache emulator")

    def add_file(self, path: str, size: int, locality: Locality, *, tape: str = "T0001",
                 atime: float = 0.0) -> None:
        """``core.add_file`` on the emulator's loop."""
        self._call(lambda: self.server.core.add_file(path, size, locality, tape=tape,
                                                     atime=atime))

    def door_url(self, path: str) -> str:
        """The door's URL of namespace ``path``."""
        return self.server.door_url(path)

    @property
    def tape_api_url(self) -> str:
        """The Tape REST endpoint the door advertises."""
        return self.server.tape_api_url

    def replica(self, path: str) -> Replica:
        """A copy of ``path``'s replica as it is now."""
        return self._call(lambda: dataclasses.replace(
            self.server.core.files[path], pins=dict(self.server.core.files[path].pins)))

    def evict(self, path: str) -> None:
        """Drop ``path``'s disk copy and pins (the LRU sweeper took it): tape-only again."""
        def evict() -> None:
            replica = self.server.core.files[path]
            replica.on_disk, replica.pins = False, {}
        self._call(evict)

    def expire_pins(self, path: str) -> None:
        """End ``path``'s pins now, as their lifetime passing would: LRU applies to it again."""
        def expire() -> None:
            replica = self.server.core.files[path]
            replica.pins = {rid: 0.0 for rid in replica.pins}
        self._call(expire)

    def stats(self) -> dict[str, Any]:
        """The emulator's statistics now (``DCacheStats.to_dict()``: with tokens also
        ``token_requests``, ``auth_refusals``, ``blocked``, ``pool_authorization``), with
        ``frontend_calls``."""
        def snapshot() -> dict[str, Any]:
            stats = self.server.core.stats
            return {**stats.to_dict(), "frontend_calls": list(stats.frontend_calls)}
        return self._call(snapshot)

    def set_discovery_body(self, text: Optional[str]) -> None:
        """Answer the discovery GET with ``text`` (None: the real document again)."""
        def set_body() -> None:
            self.server.discovery_body = text
        self._call(set_body)

    def fail(self, where: str, kind: str = "500", count: int = 1, *, after: bool = False,
             skip: int = 0) -> None:
        """``server.faults.add`` on the emulator's loop (see ``faults``)."""
        self._call(lambda: self.server.faults.add(where, kind, count, after=after, skip=skip))

    def hold_stage_answers(self) -> None:
        """``frontend.hold_stage_answers`` on the emulator's loop: stage requests are made at
        once, their answers held back until ``release_stage_answers``."""
        self._call(self.server.frontend.hold_stage_answers)

    def release_stage_answers(self) -> None:
        """``frontend.release_stage_answers`` on the emulator's loop."""
        self._call(self.server.frontend.release_stage_answers)

    def stage_answers_held(self) -> int:
        """Stage answers held back now (their requests made)."""
        return self._call(lambda: self.server.frontend.held)

    def path_error(self, path: str, message: str, count: Optional[int] = None) -> None:
        """``server.frontend.path_errors.add`` on the emulator's loop (see ``faults``)."""
        self._call(lambda: self.server.frontend.path_errors.add(path, message, count))

    def faults_served(self) -> dict[str, int]:
        """The passing failures answered so far, by ``"<where>:<kind>"``."""
        return self._call(lambda: dict(self.server.faults.served))
