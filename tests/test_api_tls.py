"""The daemon's API over TLS (``daemon.tls_cert``/``tls_key``): the CLI talks https to it and
verifies it, a plain-HTTP client gets nothing, a client that does not trust it fails in one
line instead of falling back to the state file, a listener beyond loopback needs TLS, the key
must be the daemon's alone, a renewed certificate is served after a reload, and a TLS
handshake that never ends is cut off like a silent request."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import pytest
from cli_runner import run_cli
from cryptography import x509
from daemon_harness import DEADLINE, free_port, in_process, metric_value, until, write_config

from prestaged.config import load_config
from prestaged.credentials import validity
from prestaged.errors import ConfigError
from prestaged.service import api
from prestaged.service import client as api_client
from prestaged.service.tls import is_loopback, require_tls, server_host
from prestaged.state.store import Store
from prestaged.testing.pki import TestPKI, create_pki

TOKEN = "tls-api-t0ken-secret"


def _tls_config(tmp_path: Path, pki: TestPKI, proxy: Path, *, cert: tuple[Path, Path],
                extra: str = "") -> Path:
    """A daemon config on 127.0.0.1 serving TLS with ``cert`` (certificate, key) and requiring
    the bearer token ``TOKEN``; ``extra`` lines go in ``[daemon]``."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    return write_config(tmp_path, pki, proxy, free_port(), [], extra=(
        f'token_file = "{token_file}"\ntls_cert = "{cert[0]}"\ntls_key = "{cert[1]}"\n'
        'campaign_check = "1h"\n' + extra))


def _trusting(pki: TestPKI) -> ssl.SSLContext:
    """A client context trusting the test CA only (hostname checking on)."""
    return ssl.create_default_context(cafile=str(pki.ca_cert))


def _one_line(text: str) -> str:
    assert text.count("\n") == 1 and "Traceback" not in text, text
    return text.strip()


async def test_the_cli_talks_https_to_a_daemon_serving_tls(
        pki: TestPKI, proxy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`status` asks the daemon over https (verified against credentials.ca_dir, the name
    127.0.0.1 in the certificate); `campaign add` sends the token over it and is accepted;
    the token shows nowhere."""
    config = _tls_config(tmp_path, pki, proxy, cert=pki.make_host_cert("127.0.0.1"))
    port = int(load_config(config).daemon.listen.rpartition(":")[2])
    campaign = tmp_path / "c.toml"
    (tmp_path / "ds.txt").write_text("https://127.0.0.1:1/f\n")
    campaign.write_text(f'name = "c"\n[[stage]]\nname = "one"\ninput = "{tmp_path / "ds.txt"}"'
                        '\nsubmit = "true"\n')
    caplog.set_level(logging.DEBUG)
    async with in_process(config, token=TOKEN, tls=_trusting(pki)) as d:
        status = await asyncio.to_thread(run_cli, "status", "--config", str(config), "--json")
        added = await asyncio.to_thread(run_cli, "campaign", "add", "--config", str(config),
                                        "--held", str(campaign))
        listed = (await d.http("GET", "/api/v1/campaigns"))[1]
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["source"] == f"daemon https://127.0.0.1:{port}"
    assert added.returncode == 0, added.stderr
    assert [c["campaign"] for c in listed["campaigns"]] == ["c"]
    outputs = [status.stdout, status.stderr, added.stdout, added.stderr, caplog.text]
    assert not [o for o in outputs if TOKEN in o]


async def test_a_cli_config_with_tls_ca_alone_talks_https(
        pki: TestPKI, proxy: Path, tmp_path: Path) -> None:
    """A CLI's config on another host has no daemon key: daemon.tls_ca alone makes it talk
    https (verified against that CA) and send the token; a daemon given tls_ca without a
    certificate refuses to start, rather than serve HTTP to CLIs expecting https."""
    from prestaged.config import DaemonConfig

    config = _tls_config(tmp_path, pki, proxy, cert=pki.make_host_cert("127.0.0.1"))
    daemon = load_config(config).daemon
    client = tmp_path / "client.toml"
    client.write_text(f'[daemon]\nlisten = "{daemon.listen}"\ntoken_file = "{daemon.token_file}"'
                      f'\ntls_ca = "{pki.ca_cert}"\n')
    async with in_process(config, token=TOKEN, tls=_trusting(pki)):
        res = await asyncio.to_thread(run_cli, "campaign", "list", "--config", str(client),
                                      "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["campaigns"] == []
    with pytest.raises(ConfigError, match=r"daemon\.tls_ca: set without daemon\.tls_cert"):
        require_tls(DaemonConfig(tls_ca=pki.ca_cert))


async def test_a_plain_http_client_gets_nothing_from_the_tls_listener(
        pki: TestPKI, proxy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A request in clear to the TLS listener gets no HTTP answer and no data, its token is
    not logged; a CLI whose config lacks tls_cert fails in one line (exit 69), it does not
    read the state file instead."""
    config = _tls_config(tmp_path, pki, proxy, cert=pki.make_host_cert("127.0.0.1"))
    port = int(load_config(config).daemon.listen.rpartition(":")[2])
    plain = tmp_path / "plain.toml"
    plain.write_text("\n".join(line for line in config.read_text().splitlines()
                               if not line.startswith("tls_")))
    caplog.set_level(logging.DEBUG)
    async with in_process(config, token=TOKEN, tls=_trusting(pki)):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /api/v1/campaigns HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n")
        try:
            got = await asyncio.wait_for(reader.read(), DEADLINE)
        except ConnectionResetError:
            got = b""
        writer.close()
        res = await asyncio.to_thread(run_cli, "status", "--config", str(plain))
    assert b"HTTP/" not in got and b"campaigns" not in got, got
    assert res.returncode == 69 and res.stdout == "", (res.returncode, res.stdout, res.stderr)
    assert _one_line(res.stderr).startswith(
        f"prestaged: error: the daemon at http://127.0.0.1:{port} (daemon.listen) did not "
        "answer GET /api/v1/datasets: "), res.stderr
    assert "or serving https (daemon.tls_cert)?" in res.stderr
    assert TOKEN not in caplog.text


async def test_a_cli_speaking_tls_to_a_plain_http_daemon_fails_in_one_line(
        pki: TestPKI, proxy: Path, tmp_path: Path) -> None:
    """The reverse mismatch: a CLI config with tls_cert, the daemon serving plain HTTP on
    loopback: exit 69 with one line saying TLS failed, not a fallback to the state file."""
    config = write_config(tmp_path, pki, proxy, free_port(), [])
    port = int(load_config(config).daemon.listen.rpartition(":")[2])
    cert, key = pki.make_host_cert("127.0.0.1")
    client = tmp_path / "client.toml"
    client.write_text(config.read_text().replace(
        "[daemon]\n", f'[daemon]\ntls_cert = "{cert}"\ntls_key = "{key}"\n'))
    async with in_process(config):
        res = await asyncio.to_thread(run_cli, "status", "--config", str(client))
    assert (res.returncode, res.stdout) == (69, ""), res.stderr
    assert _one_line(res.stderr).startswith(
        f"prestaged: error: TLS with the daemon at https://127.0.0.1:{port} (daemon.listen) "
        "failed GET /api/v1/datasets: "), res.stderr
    assert res.stderr.endswith("does it serve https (daemon.tls_cert)? --state FILE works on a "
                               "state file instead\n")


@pytest.mark.parametrize("case", ["untrusted CA", "other name"])
async def test_a_cli_that_cannot_verify_the_daemon_fails_in_one_line(
        pki: TestPKI, proxy: Path, tmp_path: Path, case: str) -> None:
    """A daemon certificate from a CA the CLI does not trust (daemon.tls_ca names another),
    or one that does not name 127.0.0.1: `status` exits 3 with one line saying why and what
    to set, and does not fall back to the state file (which is there and would answer)."""
    if case == "untrusted CA":
        other = create_pki(tmp_path / "other-pki")
        config = _tls_config(tmp_path, pki, proxy, cert=pki.make_host_cert("127.0.0.1"),
                             extra=f'tls_ca = "{other.ca_cert}"\n')
        expected = ("its certificate does not verify (unable to get local issuer certificate) "
                    f"against daemon.tls_ca {other.ca_cert}; set daemon.tls_ca to the CA that "
                    "issued daemon.tls_cert")
    else:
        config = _tls_config(tmp_path, pki, proxy, cert=pki.make_host_cert("elsewhere.invalid"))
        expected = ("its certificate does not verify (IP address mismatch, certificate is not "
                    f"valid for '127.0.0.1') against CA directory {pki.ca_dir} "
                    "(credentials.ca_dir); daemon.tls_cert must name 127.0.0.1, the host "
                    "daemon.listen is reached at")
    port = int(load_config(config).daemon.listen.rpartition(":")[2])
    async with in_process(config, token=TOKEN, tls=_trusting(pki)):
        assert (tmp_path / "state.db").exists()
        res = await asyncio.to_thread(run_cli, "status", "--config", str(config))
    assert (res.returncode, res.stdout) == (3, ""), res.stderr
    assert _one_line(res.stderr) == (
        f"prestaged: error: the daemon at https://127.0.0.1:{port} (daemon.listen): {expected}")


async def test_a_cli_whose_ca_cannot_be_loaded_reads_the_state_when_no_daemon_runs(
        pki: TestPKI, proxy: Path, tmp_path: Path) -> None:
    """With ``daemon.tls_cert`` set and the CA to verify the daemon missing, ``status`` failed
    with exit 3 even when no daemon ran (the TLS context was built before connecting); it now
    reads the state file then, and still fails in one line when a daemon answers."""
    config = _tls_config(tmp_path, pki, proxy, cert=pki.make_host_cert("127.0.0.1"),
                         extra=f'tls_ca = "{tmp_path / "no-such-ca"}"\n')
    Store(tmp_path / "state.db").open().close()  # a state, as a stopped daemon leaves it
    res = await asyncio.to_thread(run_cli, "status", "--config", str(config))
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    async with in_process(config, token=TOKEN, tls=_trusting(pki)):
        res = await asyncio.to_thread(run_cli, "status", "--config", str(config))
    assert res.returncode == 3, res.stderr
    assert _one_line(res.stderr) == (f"prestaged: error: daemon.tls_ca {tmp_path / 'no-such-ca'}"
                                     ": no such file or directory")


@pytest.mark.parametrize(("listen", "loopback"), [
    ("127.0.0.1:9464", True), ("127.8.9.10:9464", True), ("[::1]:9464", True),
    ("localhost:9464", True), ("0.0.0.0:9464", False), ("[::]:9464", False),
    ("192.0.2.7:9464", False), ("prestaged.example.org:9464", False),
])
def test_only_a_loopback_listener_may_go_without_tls(listen: str, loopback: bool) -> None:
    """``require_tls`` passes loopback addresses without TLS and refuses any other in one
    sentence naming daemon.listen and the keys to set; with tls_cert set every one passes."""
    from prestaged.config import DaemonConfig

    assert is_loopback(listen) == loopback
    if loopback:
        require_tls(DaemonConfig(listen=listen))
    else:
        with pytest.raises(ConfigError) as err:
            require_tls(DaemonConfig(listen=listen))
        assert str(err.value) == (
            f"daemon.listen {listen} is not loopback, and over plain HTTP the bearer token "
            "would cross the network in clear: set daemon.tls_cert and daemon.tls_key (e.g. "
            "the host certificate and key), or listen on 127.0.0.1")
    require_tls(DaemonConfig(listen=listen, tls_cert=Path("c"), tls_key=Path("k")))


def test_the_cli_names_the_host_the_certificate_must_name() -> None:
    """The client reaches a wildcard listener by this host's name (what a host certificate
    names), an IPv6 literal in brackets, any other host as written."""
    import socket

    assert server_host("0.0.0.0:9464") == server_host("[::]:9464") == socket.getfqdn()
    assert server_host("[::1]:9464") == "[::1]"
    assert server_host("prestaged.example.org:9464") == "prestaged.example.org"


def test_the_cli_never_sends_the_token_in_clear_beyond_loopback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config whose listen is not loopback and has no tls_cert (a daemon would refuse it):
    a call with the token is refused in one line before any connection is made."""
    token = tmp_path / "token"
    token.write_text(TOKEN)
    config = tmp_path / "c.toml"
    config.write_text(f'[daemon]\nlisten = "192.0.2.7:9464"\ntoken_file = "{token}"\n')

    def connect(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the client connected")

    monkeypatch.setattr(urllib.request, "urlopen", connect)
    with pytest.raises(ConfigError) as err:
        api_client.call(load_config(config), "POST", "/api/v1/campaigns", {})
    assert str(err.value) == (
        "daemon.listen 192.0.2.7:9464 is not loopback and neither daemon.tls_cert nor "
        "daemon.tls_ca is set: not sending the bearer token there in clear; set "
        "daemon.tls_ca (the CA of the daemon's certificate) to talk https to it")


@pytest.mark.parametrize("fault", ["others read it", "another key", "not PEM"])
async def test_a_tls_key_that_cannot_be_the_daemons_is_refused_at_start(
        pki: TestPKI, proxy: Path, tmp_path: Path, fault: str) -> None:
    """A key group or others can read (whoever reads it can pose as the daemon and collect the
    token), a key of another certificate, a file that is no PEM: the daemon does not start,
    with one sentence naming daemon.tls_key (and the fix)."""
    cert, key = pki.make_host_cert("127.0.0.1")
    if fault == "others read it":
        key.chmod(0o640)
        expected = f"daemon.tls_key {key}: readable by others (mode 640); chmod 600 it"
    elif fault == "another key":
        key = pki.make_host_cert("127.0.0.1")[1]
        expected = f"daemon.tls_key {key}: not the key of daemon.tls_cert {cert}"
    else:
        key.write_text("not a key\n")
        expected = f"daemon.tls_cert {cert}, daemon.tls_key {key}: OpenSSL cannot load them"
    config = _tls_config(tmp_path, pki, proxy, cert=(cert, key))
    with pytest.raises(ConfigError) as err:
        async with in_process(config):
            pass
    assert str(err.value).startswith(expected), str(err.value)
    assert not (tmp_path / "state.db").exists()  # refused before anything was opened


def _acl(path: Path, *entries: tuple[int, int, int]) -> None:
    """Give ``path`` a POSIX ACL of its owner, group and other entries from its mode plus
    ``entries`` (tag, permissions, id) and a read mask, as ``setfacl`` would (skipped where
    the file system has no ACLs)."""
    import errno
    import os
    import struct

    nobody = 0xFFFFFFFF
    mode = path.stat().st_mode
    base = [(0x01, (mode >> 6) & 7, nobody), (0x04, (mode >> 3) & 7, nobody),
            (0x10, 4, nobody), (0x20, mode & 7, nobody)]
    data = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e)
                                           for e in sorted([*base, *entries]))
    try:
        os.setxattr(path, "system.posix_acl_access", data)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            pytest.skip(f"no POSIX ACLs on {path.parent}")
        raise


@pytest.mark.parametrize(("who", "expected"), [
    ("the daemon's user", None),
    ("another user", "readable by others (an ACL entry for user 65534)"),
    ("a group", "readable by others (an ACL entry for group 65534)"),
    ("no ACL, mode 0440", "readable by others (mode 440)"),
    ("a pipe", "not a regular file"),
])
def test_a_key_readable_by_the_daemons_user_alone_passes_even_by_an_acl(
        pki: TestPKI, tmp_path: Path, who: str, expected: str | None) -> None:
    """systemd's LoadCredential= may hand the key over as a 0400 root file with an ACL for the
    service's user, whose mask shows as group bits (0440): that passes; an ACL for another user
    or a group, real group bits, or a pipe (whose open would hang the start) are refused."""
    import os

    from prestaged.config import DaemonConfig
    from prestaged.service.tls import server_tls

    cert, key = pki.make_host_cert("127.0.0.1")
    key.chmod(0o400)
    if who == "the daemon's user":
        _acl(key, (0x02, 4, os.getuid()))
        assert key.stat().st_mode & 0o777 == 0o440
    elif who == "another user":
        _acl(key, (0x02, 4, 65534))
    elif who == "a group":
        _acl(key, (0x08, 4, 65534))
    elif who == "a pipe":
        key = tmp_path / "fifo"
        os.mkfifo(key, 0o600)
    else:
        key.chmod(0o440)
    cfg = DaemonConfig(tls_cert=cert, tls_key=key)
    if expected is None:
        assert server_tls(cfg) is not None
        return
    with pytest.raises(ConfigError) as err:
        server_tls(cfg)
    assert str(err.value).startswith(f"daemon.tls_key {key}: {expected}"), str(err.value)


def _serial(pem: Path) -> int:
    return x509.load_pem_x509_certificate(pem.read_bytes()).serial_number


def _not_after(pem: Path) -> float:
    return validity(x509.load_pem_x509_certificate(pem.read_bytes()))[1].timestamp()


async def _served_serial(port: int, pki: TestPKI) -> int:
    """The serial number of the certificate a new connection to the daemon is shown."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_trusting(pki))
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return x509.load_der_x509_certificate(der).serial_number


async def test_a_reload_serves_the_renewed_certificate_to_new_connections(
        pki: TestPKI, proxy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A renewed certificate and key written over the files are shown to new connections
    after a reload (SIGHUP), without a restart, and the expiry gauge follows; a reload finding
    a key others can read keeps the certificate in use, saying so at ERROR."""
    first = pki.make_host_cert("127.0.0.1", lifetime=timedelta(days=3))
    renewed = pki.make_host_cert("127.0.0.1", lifetime=timedelta(days=90))
    cert, key = tmp_path / "hostcert.pem", tmp_path / "hostkey.pem"
    cert.write_bytes(first[0].read_bytes())
    key.write_bytes(first[1].read_bytes())
    key.chmod(0o600)
    config = _tls_config(tmp_path, pki, proxy, cert=(cert, key))
    port = int(load_config(config).daemon.listen.rpartition(":")[2])
    listen = f"127.0.0.1:{port}"

    async def expiry() -> Optional[float]:
        return metric_value(await d.metrics(), "prestaged_api_certificate_expiry_timestamp_"
                            "seconds", listen=listen)
    async with in_process(config, token=TOKEN, tls=_trusting(pki)) as d:
        assert await _served_serial(port, pki) == _serial(first[0])
        assert await expiry() == _not_after(first[0])
        cert.write_bytes(renewed[0].read_bytes())
        key.write_bytes(renewed[1].read_bytes())
        d.daemon.request_reload()

        async def renewed_served() -> bool:
            return await _served_serial(port, pki) == _serial(renewed[0])
        await until("the renewed certificate served", renewed_served)
        assert await expiry() == _not_after(renewed[0])
        key.chmod(0o644)
        d.daemon.request_reload()

        async def refused() -> bool:
            return "keeping the API's certificate in use" in caplog.text
        await until("the reload refused the exposed key", refused)
        assert await _served_serial(port, pki) == _serial(renewed[0])
        assert await expiry() == _not_after(renewed[0])
        assert (await d.http("GET", "/healthz"))[0] == 200
    assert f"reload: daemon.tls_key {key}: readable by others (mode 644)" in caplog.text


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(), DEADLINE)
    except (ConnectionResetError, ssl.SSLError):
        return b""


async def test_a_tls_connection_that_never_sends_a_request_is_cut_off(
        pki: TestPKI, proxy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection that never starts its TLS handshake, one that stops in the middle of its
    ClientHello, and one whose handshake ends but that sends no request are each closed once
    ``REQUEST_DEADLINE`` has passed (the handshake's own timeout was asyncio's 60 s), and the
    daemon serves everyone else meanwhile."""
    monkeypatch.setattr(api, "REQUEST_DEADLINE", 0.5)
    config = _tls_config(tmp_path, pki, proxy, cert=pki.make_host_cert("127.0.0.1"))
    port = int(load_config(config).daemon.listen.rpartition(":")[2])
    async with in_process(config, token=TOKEN, tls=_trusting(pki)) as d:
        start = time.monotonic()
        silent = await asyncio.open_connection("127.0.0.1", port)
        half = await asyncio.open_connection("127.0.0.1", port)
        half[1].write(b"\x16\x03\x01\x02\x00\x01")  # a ClientHello's first bytes, no more
        done = await asyncio.open_connection("127.0.0.1", port, ssl=_trusting(pki))
        got = await asyncio.gather(*(_until_closed(r) for r, _ in (silent, half, done)))
        took = time.monotonic() - start
        assert (await d.http("GET", "/healthz"))[0] == 200
        for _, writer in (silent, half, done):
            writer.close()
    assert took < DEADLINE / 2, f"silent TLS clients kept for {took:.1f} s"
    assert got[2] == b""  # no answer to a request never sent
    assert not [g for g in got[:2] if b"HTTP/" in g]
