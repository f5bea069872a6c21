"""systemd service notifications (``sd_notify(3)``) with the standard library only.

The protocol is one datagram of newline-separated ``KEY=VALUE`` assignments sent to the
``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``: a filesystem path, or an abstract socket written
with a leading ``@``. When the variable is unset (not started by systemd, or not
``Type=notify``) every call is a no-op, so the daemon calls the notifier unconditionally::

    notifier = Notifier.from_environment()
    notifier.ready()                  # READY=1: start-up finished
    notifier.status("3 watched")      # STATUS=..., shown by `systemctl status`
    interval = notifier.watchdog_interval()  # WatchdogSec= in seconds, or None
    notifier.watchdog()               # WATCHDOG=1, every interval / 2
    notifier.reloading()              # RELOADING=1 on SIGHUP ... then ready() again
    notifier.stopping(within)         # STOPPING=1 (EXTEND_TIMEOUT_USEC=) when the drain starts

Like libsystemd, each notification opens a fresh socket: there is nothing to close, and a
notifier survives systemd re-executing itself. Sending never raises: a notification is a hint
to the service manager, not a reason to stop serving, so failures are logged at debug level.

The daemon sends from its event loop. A state change (READY, RELOADING, STOPPING) waits up to
``SEND_TIMEOUT`` for room in the service manager's queue (systemd would otherwise miss it and,
for READY, fail the start); ``STATUS=`` and ``WATCHDOG=1`` never wait: when the queue is full
they are dropped, since the next one comes soon and a wait would stall every connection the
loop serves. (A notify socket nobody reads, as a test harness's after READY, held the daemon's
loop for a second per run started or ended: 31 s of a 110 s PostgreSQL bench run.)
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Mapping
from typing import Optional

__all__ = ["Notifier", "watchdog_interval"]

log = logging.getLogger(__name__)

_KEY = re.compile(r"[A-Z][A-Z0-9_]*\Z")

SEND_TIMEOUT = 1.0
"""Longest wait (seconds) for room in systemd's socket queue before a notification is
dropped; bounds how long a wedged service manager can stall the caller's event loop."""


def watchdog_interval(
    env: Optional[Mapping[str, str]] = None, pid: Optional[int] = None
) -> Optional[float]:
    """The watchdog timeout systemd expects pings within, in seconds, or None when disabled.

    Read from ``$WATCHDOG_USEC`` (microseconds, set by ``WatchdogSec=``). When
    ``$WATCHDOG_PID`` is set and is not ``pid`` (default: this process) the watchdog belongs to
    another process, e.g. a parent that exec'd us without clearing it, and None is returned.
    Missing, malformed or non-positive values also give None. Ping at half the interval.
    ``env`` defaults to ``os.environ``.
    """
    environ = os.environ if env is None else env
    usec = _positive_int(environ.get("WATCHDOG_USEC"), "WATCHDOG_USEC")
    if usec is None:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner:
        owner_pid = _positive_int(owner, "WATCHDOG_PID")
        if owner_pid != (os.getpid() if pid is None else pid):
            log.debug("WATCHDOG_PID=%s is not this process: watchdog not ours", owner)
            return None
    return usec / 1_000_000


def _positive_int(value: Optional[str], name: str) -> Optional[int]:
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        log.debug("%s=%r is not an integer: ignored", name, value)
        return None
    if number <= 0:
        log.debug("%s=%r is not positive: ignored", name, value)
        return None
    return number


class Notifier:
    """Sends ``sd_notify`` messages to ``address`` (a ``$NOTIFY_SOCKET`` value), or does
    nothing when ``address`` is None.

    ``address`` is an absolute path or ``@name`` for an abstract socket; anything else (e.g.
    systemd 254's ``vsock:`` addresses, used inside VMs) is refused with ``ValueError``.
    ``watchdog`` is the watchdog timeout in seconds (None: no watchdog), returned by
    ``watchdog_interval()``. Usually built by ``from_environment()``.
    """

    def __init__(self, address: Optional[str] = None, *, watchdog: Optional[float] = None) -> None:
        if address is not None and not address.startswith(("/", "@")):
            raise ValueError(
                f"NOTIFY_SOCKET={address!r}: expected an absolute path or @abstract-name"
            )
        self._address = address
        # Abstract socket names start with a NUL byte where systemd writes "@".
        self._target = None if address is None else (
            "\0" + address[1:] if address.startswith("@") else address
        )
        self._watchdog = watchdog

    @classmethod
    def from_environment(cls, env: Optional[Mapping[str, str]] = None) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET`` and ``$WATCHDOG_USEC``/``$WATCHDOG_PID`` of
        ``env`` (default ``os.environ``); a disabled one when ``NOTIFY_SOCKET`` is unset, empty
        or an address family this module does not speak (logged as a warning)."""
        environ = os.environ if env is None else env
        address = environ.get("NOTIFY_SOCKET") or None
        interval = watchdog_interval(environ)
        try:
            return cls(address, watchdog=interval)
        except ValueError as e:
            log.warning("%s; systemd notifications disabled", e)
            return cls(None)

    @property
    def enabled(self) -> bool:
        """True when notifications are sent somewhere."""
        return self._address is not None

    @property
    def address(self) -> Optional[str]:
        """The socket address as given (``@name`` for abstract sockets), or None."""
        return self._address

    def watchdog_interval(self) -> Optional[float]:
        """Watchdog timeout in seconds (``WatchdogSec=``), or None; ping at half of it."""
        return self._watchdog

    def ready(self, status: Optional[str] = None) -> bool:
        """``READY=1``: start-up (or a reload) finished; with ``STATUS=`` when given."""
        if status is None:
            return self.send(READY=1)
        return self.send(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """``STATUS=text``: one line shown by ``systemctl status`` (newlines become spaces);
        dropped rather than waited for when the queue is full."""
        return self._notify({"STATUS": text}, wait=False)

    def reloading(self) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC=`` (``CLOCK_MONOTONIC`` in microseconds, which
        ``Type=notify-reload`` on systemd >= 253 requires; older ones ignore it). Send
        ``ready()`` when the reload is done."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(RELOADING=1, MONOTONIC_USEC=now_usec)

    def stopping(self, within: Optional[float] = None) -> bool:
        """``STOPPING=1``: shutdown (the drain) has begun; with ``within`` (seconds) also
        ``EXTEND_TIMEOUT_USEC=``, so that systemd (236 and later) waits that long from now
        before it kills the service, when that is beyond ``TimeoutStopSec=`` (it never
        shortens it)."""
        if within is None:
            return self.send(STOPPING=1)
        return self.send(STOPPING=1, EXTEND_TIMEOUT_USEC=int(within * 1_000_000))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the main loop is alive; harmless when no watchdog is configured;
        dropped rather than waited for when the queue is full."""
        return self._notify({"WATCHDOG": 1}, wait=False)

    def send(self, **fields: object) -> bool:
        """Send ``KEY=value`` assignments in one datagram, in the order given.

        Values are formatted with ``str()``; a newline inside one would start a new
        assignment, so newlines become spaces. Returns True when the datagram was sent, False
        when disabled, given no fields, or the send failed (logged at debug level, never
        raised). Keys must be upper-case ``sd_notify`` variable names: anything else is a bug
        and raises ``ValueError``. Waits up to ``SEND_TIMEOUT`` for room in the queue.
        """
        return self._notify(fields, wait=True)

    def _notify(self, fields: Mapping[str, object], *, wait: bool) -> bool:
        for key in fields:
            if not _KEY.match(key):
                raise ValueError(f"sd_notify key {key!r}: expected upper-case letters, digits, _")
        if self._target is None or not fields:
            return False
        message = "\n".join(f"{k}={_one_line(v)}" for k, v in fields.items())
        return self._send(self._target, message.encode("utf-8", "replace"), wait)

    def _send(self, target: str, datagram: bytes, wait: bool) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(SEND_TIMEOUT if wait else 0.0)
                sock.sendto(datagram, target)
        except OSError as e:
            log.debug("sd_notify to %s failed: %s", self._address, e)
            return False
        return True


def _one_line(value: object) -> str:
    return str(value).replace("\r", " ").replace("\n", " ")
