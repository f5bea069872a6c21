"""How prestaged runs its coroutines: the event loop, signals, and the loop's own noise.

Shared by the CLI and the daemon so that both pick the loop the same way (uvloop when it is
installed: faster TLS and I/O; ``PRESTAGED_EVENT_LOOP=asyncio`` forces the standard loop) and
both keep transport errors that the engine has already classified out of the user's way.
``probe_lag`` tells how long the loop was kept from running (the daemon's
``prestaged_event_loop_lag_seconds``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import threading
from collections.abc import Coroutine
from typing import Any, Callable, TypeVar

__all__ = ["install_interrupt", "probe_lag", "quiet_transport_errors", "run", "stop_signals"]

log = logging.getLogger(__name__)

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new event loop and return its result.

    The loop is uvloop's when it can be imported and ``PRESTAGED_EVENT_LOOP`` is not
    ``asyncio``; the loop's exception handler is ``quiet_transport_errors`` either way. The
    handlers of the stop signals are as before once it returns: a closed uvloop loop leaves its
    own behind, which ignore the signal (a Ctrl-C after a warm, in the same process, did
    nothing).
    """

    async def wrapped() -> T:
        asyncio.get_running_loop().set_exception_handler(quiet_transport_errors)
        return await main

    saved = _signal_handlers()
    try:
        if os.environ.get("PRESTAGED_EVENT_LOOP", "auto") != "asyncio":
            try:
                import uvloop
            except ImportError:
                pass
            else:
                result: T = uvloop.run(wrapped())
                return result
        return asyncio.run(wrapped())
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _signal_handlers() -> dict[signal.Signals, Any]:
    """The stop signals' handlers now (none outside the main thread: only it can set them;
    None, a handler not set from Python, is left alone)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    handlers = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}
    return {sig: h for sig, h in handlers.items() if h is not None}


def quiet_transport_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Log connection-level errors that the event loop reports on its own at debug level.

    Closing a connection after 4 bytes, or a server hanging up on our certificate, makes the
    loop's TLS transport report "Fatal error on SSL protocol" with a traceback; the engine has
    already classified the same failure, so it is noise for the user. Everything else goes to
    the loop's default handler.
    """
    exc = context.get("exception")
    message = str(context.get("message", ""))
    # uvloop also reports a RuntimeError ("the handler is closed") for a TLS connection that
    # is aborted while it still had bytes to send; its message names the transport.
    transport = message.startswith(("Fatal error on SSL", "SSL error", "Fatal read error",
                                     "Fatal write error", "SSL handshake failed"))
    if transport or isinstance(exc, (ssl.SSLError, ConnectionError, TimeoutError,
                                     asyncio.TimeoutError)):
        log.debug("transport: %s: %s", context.get("message"), exc)
        return
    loop.default_exception_handler(context)


def install_interrupt(stop: asyncio.Event) -> None:
    """First Ctrl-C/SIGTERM/SIGHUP sets ``stop`` (a clean stop with a partial summary); a
    second Ctrl-C raises ``KeyboardInterrupt`` at once. More SIGTERMs or SIGHUPs change
    nothing: one sent to the pid and to its process group (``timeout``, ``kill -- -PGID``, a
    closed terminal or ssh session) comes twice, and aborting on the second lost the partial
    summary (and, in uvloop's shutdown, printed a traceback). SIGHUP's default action killed
    the run with nothing recorded since the last write batch; an ignored SIGHUP (``nohup``)
    stays ignored (``stop_signals``). Call from inside the running loop."""
    loop = asyncio.get_running_loop()

    def first(signum: int) -> None:
        log.warning("interrupted: stopping (press Ctrl-C again to abort at once)")
        stop.set()
        if signum == signal.SIGINT:
            loop.remove_signal_handler(signum)
            signal.signal(signum, signal.default_int_handler)
        else:
            loop.add_signal_handler(signum, log.debug, "%s again: already stopping",
                                    signal.Signals(signum).name)

    for sig in stop_signals():
        loop.add_signal_handler(sig, first, sig)


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop a run: SIGINT, SIGTERM and SIGHUP, but not SIGHUP while it is
    ignored (``nohup``: the run is meant to outlive its terminal, and handling SIGHUP would
    undo that)."""
    if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
        return (signal.SIGINT, signal.SIGTERM)
    return _STOP_SIGNALS


async def probe_lag(observe: Callable[[float], None], every: float) -> None:
    """Until cancelled: every ``every`` seconds, ``observe`` how late the loop ran that timer.

    A timer runs late when something held the loop (a blocking call, a long callback): for
    that long nothing else ran, not the API, the touches, the heartbeats nor the watchdog.
    Timers run up to a millisecond or so late on an idle loop too."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + every
        await asyncio.sleep(every)
        observe(max(0.0, loop.time() - due))
