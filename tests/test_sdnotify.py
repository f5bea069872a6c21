"""sd_notify: datagrams reach a real AF_UNIX socket standing in for systemd's $NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from prestaged.service import sdnotify
from prestaged.service.sdnotify import Notifier, watchdog_interval

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs AF_UNIX")

WAIT = 10.0
"""Deadline (seconds) for a datagram that should already be queued."""


class Receiver:
    """The service manager's end: a bound SOCK_DGRAM socket and the address systemd would pass."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address

    def recv(self) -> str:
        """The next datagram, decoded; fails the test if none arrives by the deadline."""
        return self.sock.recv(65536).decode()

    def fields(self) -> dict[str, str]:
        """The next datagram as a dict of its KEY=VALUE lines."""
        return dict(line.split("=", 1) for line in self.recv().split("\n"))


def _bound(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(WAIT)
    sock.bind(address)
    return sock


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    """A socket bound to a filesystem path under tmp_path."""
    path = tmp_path / "n.sock"
    if len(os.fsencode(path)) >= 108:  # sun_path limit
        pytest.skip(f"tmp_path too long for an AF_UNIX address: {path}")
    with _bound(str(path)) as sock:
        yield Receiver(sock, str(path))


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    """A socket bound to a unique name in the abstract namespace (systemd writes it "@name")."""
    name = f"prestaged-test-{uuid.uuid4().hex}"
    with _bound("\0" + name) as sock:
        yield Receiver(sock, "@" + name)


def test_ready_reaches_a_path_socket(receiver: Receiver) -> None:
    """ready() sends exactly READY=1 to a filesystem-path NOTIFY_SOCKET."""
    assert Notifier(receiver.address).ready() is True
    assert receiver.recv() == "READY=1"


def test_ready_reaches_an_abstract_socket(abstract_receiver: Receiver) -> None:
    """An '@name' NOTIFY_SOCKET is the abstract socket '\\0name'."""
    assert Notifier(abstract_receiver.address).ready() is True
    assert abstract_receiver.recv() == "READY=1"


def test_ready_with_status_is_one_datagram(receiver: Receiver) -> None:
    """ready(status) sends READY=1 and STATUS= together, READY first."""
    Notifier(receiver.address).ready("3 watched")
    assert receiver.recv() == "READY=1\nSTATUS=3 watched"


def test_status_newlines_cannot_inject_assignments(receiver: Receiver) -> None:
    """A newline in a STATUS text becomes a space instead of starting a new assignment."""
    Notifier(receiver.address).status("warming dune-a\nREADY=1\r\nx")
    assert receiver.fields() == {"STATUS": "warming dune-a READY=1  x"}


def test_reloading_carries_monotonic_usec(receiver: Receiver) -> None:
    """reloading() sends RELOADING=1 with MONOTONIC_USEC read from CLOCK_MONOTONIC in µs."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier(receiver.address).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    got = receiver.fields()
    assert got["RELOADING"] == "1"
    assert before <= int(got["MONOTONIC_USEC"]) <= after


def test_stopping_and_watchdog(receiver: Receiver) -> None:
    """stopping() sends STOPPING=1 and watchdog() sends WATCHDOG=1, one datagram each."""
    notifier = Notifier(receiver.address)
    notifier.stopping()
    notifier.watchdog()
    assert [receiver.recv(), receiver.recv()] == ["STOPPING=1", "WATCHDOG=1"]


def test_stopping_within_asks_systemd_for_the_time_in_the_same_datagram(
        receiver: Receiver) -> None:
    """stopping(within=S) carries EXTEND_TIMEOUT_USEC in microseconds with STOPPING=1."""
    Notifier(receiver.address).stopping(within=125.5)
    assert receiver.recv() == "STOPPING=1\nEXTEND_TIMEOUT_USEC=125500000"


def test_send_keeps_field_order_and_formats_values(receiver: Receiver) -> None:
    """send(**fields) joins KEY=str(value) lines in the order given."""
    assert Notifier(receiver.address).send(STATUS="draining", EXTEND_TIMEOUT_USEC=5_000_000)
    assert receiver.recv() == "STATUS=draining\nEXTEND_TIMEOUT_USEC=5000000"


def test_send_rejects_keys_that_are_not_sd_notify_names(receiver: Receiver) -> None:
    """A lower-case or punctuated key is a programming error and raises ValueError."""
    with pytest.raises(ValueError, match="ready"):
        Notifier(receiver.address).send(ready=1)


def test_send_without_fields_sends_nothing(receiver: Receiver) -> None:
    """send() with no fields returns False and puts no datagram on the socket."""
    assert Notifier(receiver.address).send() is False
    receiver.sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        receiver.sock.recv(1)


def test_notifications_come_from_the_calling_process(tmp_path: Path) -> None:
    """The kernel-attached sender PID is ours, as NotifyAccess=main requires."""
    path = str(tmp_path / "c.sock")
    with _bound(path) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        Notifier(path).watchdog()
        _, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
    creds = [data for level, kind, data in ancillary
             if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
    assert creds
    assert struct.unpack("3i", creds[0])[0] == os.getpid()


def test_disabled_notifier_is_a_no_op() -> None:
    """Without a socket address every call returns False and nothing raises."""
    notifier = Notifier(None)
    assert notifier.enabled is False
    assert not any([notifier.ready(), notifier.status("x"), notifier.reloading(),
                    notifier.stopping(), notifier.watchdog(), notifier.send(READY=1)])


def test_send_failure_is_logged_not_raised(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """A socket path with nobody listening makes send() return False and log at debug."""
    notifier = Notifier(str(tmp_path / "gone.sock"))
    with caplog.at_level(logging.DEBUG, logger="prestaged.service.sdnotify"):
        assert notifier.ready() is False
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert "gone.sock" in caplog.records[0].getMessage()


def _fill(receiver: Receiver) -> None:
    """Fill the receiving socket's queue, as a service manager that reads nothing."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
        filler.setblocking(False)
        for _ in range(100_000):
            try:
                filler.sendto(b"WATCHDOG=1", receiver.address)
            except BlockingIOError:
                return
    pytest.fail("the receiving queue never filled up")


def test_full_queue_times_out_instead_of_blocking(receiver: Receiver,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """When systemd's queue is full, a state change waits SEND_TIMEOUT, then returns False."""
    monkeypatch.setattr(sdnotify, "SEND_TIMEOUT", 0.2)
    _fill(receiver)
    started = time.monotonic()
    assert Notifier(receiver.address).stopping() is False
    assert time.monotonic() - started >= 0.2


def test_status_and_watchdog_never_wait_for_a_full_queue(
        receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """STATUS= and WATCHDOG=1 are dropped at once when the queue is full (the daemon's event
    loop sends them on every run it starts or ends); they arrive once there is room."""
    monkeypatch.setattr(sdnotify, "SEND_TIMEOUT", 30.0)
    _fill(receiver)
    notifier = Notifier(receiver.address)
    started = time.monotonic()
    assert [notifier.status(f"{i} running") for i in range(20)] == [False] * 20
    assert notifier.watchdog() is False
    assert time.monotonic() - started < 10.0  # not 21 x SEND_TIMEOUT
    receiver.sock.setblocking(False)
    with pytest.raises(BlockingIOError):  # drain: the service manager catches up
        while True:
            receiver.sock.recv(65536)
    receiver.sock.settimeout(WAIT)
    assert notifier.status("caught up") is True
    assert receiver.fields() == {"STATUS": "caught up"}


def test_from_environment_reads_notify_socket(receiver: Receiver,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """from_environment() uses $NOTIFY_SOCKET of os.environ by default."""
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.address)
    notifier = Notifier.from_environment()
    assert notifier.enabled and notifier.address == receiver.address
    notifier.ready()
    assert receiver.recv() == "READY=1"


def test_from_environment_without_socket_is_disabled() -> None:
    """An unset or empty NOTIFY_SOCKET gives a disabled notifier."""
    assert Notifier.from_environment({}).enabled is False
    assert Notifier.from_environment({"NOTIFY_SOCKET": ""}).enabled is False


def test_from_environment_refuses_unsupported_addresses(
        caplog: pytest.LogCaptureFixture) -> None:
    """A vsock: or relative NOTIFY_SOCKET disables notifications with a warning."""
    with caplog.at_level(logging.WARNING, logger="prestaged.service.sdnotify"):
        assert Notifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled is False
        assert Notifier.from_environment({"NOTIFY_SOCKET": "run/notify"}).enabled is False
    assert len(caplog.records) == 2
    assert "vsock:2:1234" in caplog.records[0].getMessage()


def test_constructor_refuses_unsupported_addresses() -> None:
    """Notifier() itself raises ValueError for an address that is neither a path nor @name."""
    with pytest.raises(ValueError, match="absolute path"):
        Notifier("relative.sock")


def test_from_environment_reads_the_watchdog() -> None:
    """WATCHDOG_USEC for this process becomes watchdog_interval() in seconds."""
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "60000000",
           "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_environment(env).watchdog_interval() == 60.0
    assert Notifier.from_environment({}).watchdog_interval() is None


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "60000000"}, 60.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "4242"}, 0.5),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "not-a-pid"}, None),
        ({"WATCHDOG_USEC": "sixty"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    """WATCHDOG_USEC in seconds, only when WATCHDOG_PID is unset or names this process."""
    assert watchdog_interval(env, pid=4242) == expected


def test_watchdog_interval_defaults_to_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without arguments, os.environ and os.getpid() are used."""
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None
