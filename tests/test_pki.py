"""Tests for the test PKI: OpenSSL-compatible hashing, proxy structure, real TLS handshakes."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import ssl
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from prestaged.credentials import validity
from prestaged.testing.pki import PROXY_CERT_INFO_OID, TestPKI, create_pki, subject_hash

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl binary not installed")

StartServer = Callable[[ssl.SSLContext], Awaitable[int]]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """One PKI per module: key generation dominates the cost."""
    return create_pki(tmp_path_factory.mktemp("pki") / "grid")


def _certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def _pem_labels(path: Path) -> list[str]:
    return re.findall(r"-----BEGIN ([A-Z ]+)-----", path.read_text())


def _openssl_hash(path: Path) -> str:
    assert OPENSSL is not None
    out = subprocess.run(
        [OPENSSL, "x509", "-subject_hash", "-noout", "-in", str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def _self_signed(path: Path, subject: x509.Name) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


# ---------------------------------------------------------------------------------------------
# subject_hash and the CA directory
# ---------------------------------------------------------------------------------------------


def test_create_pki_makes_parents_quickly(tmp_path: Path) -> None:
    """create_pki creates missing parents and stays cheap (~0.25 s; loose bound for busy CI)."""
    started = time.perf_counter()
    pki = create_pki(tmp_path / "a" / "b")
    assert time.perf_counter() - started < 3.0
    assert pki.root == tmp_path / "a" / "b"
    assert all(p.is_file() for p in (pki.ca_cert, pki.host_key, pki.user_cert, pki.user_key))


@needs_openssl
@pytest.mark.parametrize("which", ["ca_cert", "host_cert", "user_cert"])
def test_subject_hash_matches_openssl(pki: TestPKI, which: str) -> None:
    """subject_hash equals `openssl x509 -subject_hash` for the PKI's certificates."""
    path: Path = getattr(pki, which)
    assert subject_hash(_certs(path)[0]) == _openssl_hash(path)


@needs_openssl
@pytest.mark.parametrize(
    "subject",
    [
        x509.Name(
            [
                x509.NameAttribute(NameOID.COUNTRY_NAME, "CH"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "  Mixed   CASE\tOrg  "),
                x509.NameAttribute(NameOID.COMMON_NAME, "Ünïcode ÄÖ Name"),
            ]
        ),
        x509.Name(
            [
                x509.RelativeDistinguishedName(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Zeta"),
                        x509.NameAttribute(NameOID.COMMON_NAME, "Alpha"),
                    ]
                ),
                x509.RelativeDistinguishedName(
                    [x509.NameAttribute(NameOID.EMAIL_ADDRESS, "Some.One@Example.ORG")]
                ),
            ]
        ),
        x509.Name([x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "Long " * 60)]),
    ],
    ids=["whitespace-case-unicode", "multi-valued-rdn", "long-value"],
)
def test_subject_hash_canonicalisation_matches_openssl(tmp_path: Path, subject: x509.Name) -> None:
    """Whitespace, case, non-ASCII, multi-valued RDNs and long lengths hash like OpenSSL."""
    path = _self_signed(tmp_path / "cert.pem", subject)
    assert subject_hash(_certs(path)[0]) == _openssl_hash(path)


def test_ca_dir_holds_only_the_hashed_ca(pki: TestPKI) -> None:
    """ca_dir contains exactly <subject hash>.0 with the CA certificate."""
    ca = _certs(pki.ca_cert)[0]
    entries = list(pki.ca_dir.iterdir())
    assert [e.name for e in entries] == [f"{subject_hash(ca)}.0"]
    assert _certs(entries[0]) == [ca]


def test_host_and_user_certificates(pki: TestPKI) -> None:
    """Host cert is CN=localhost with loopback SANs; user DN is the documented slash form."""
    host = _certs(pki.host_cert)[0]
    san = host.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert pki.user_dn == "/DC=org/DC=prestaged-test/O=Test/CN=Test User"
    user = _certs(pki.user_cert)[0]
    assert user.subject.rfc4514_string() == "CN=Test User,O=Test,DC=prestaged-test,DC=org"
    assert user.signature_hash_algorithm is not None
    assert user.signature_hash_algorithm.name == "sha256"


def test_file_modes(pki: TestPKI) -> None:
    """Host key/cert are readable by a server user; private CA/user keys are 0600."""
    assert stat.S_IMODE(pki.host_key.stat().st_mode) == 0o644
    assert stat.S_IMODE(pki.host_cert.stat().st_mode) == 0o644
    assert stat.S_IMODE(pki.user_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pki.ca_key.stat().st_mode) == 0o600


# ---------------------------------------------------------------------------------------------
# Proxies
# ---------------------------------------------------------------------------------------------


def test_proxy_structure(pki: TestPKI, tmp_path: Path) -> None:
    """A proxy is cert, key, user cert; subject = user subject + numeric CN; critical PCI."""
    path = pki.make_proxy(tmp_path / "x509up")
    assert _pem_labels(path) == ["CERTIFICATE", "PRIVATE KEY", "CERTIFICATE"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    proxy, user = _certs(path)
    assert user == _certs(pki.user_cert)[0]
    assert proxy.issuer == user.subject
    assert list(proxy.subject)[:-1] == list(user.subject)
    last = list(proxy.subject)[-1]
    assert last.oid == NameOID.COMMON_NAME
    assert isinstance(last.value, str)
    assert last.value.isdigit()
    pci = proxy.extensions.get_extension_for_oid(PROXY_CERT_INFO_OID)
    assert pci.critical
    assert isinstance(pci.value, x509.UnrecognizedExtension)
    assert pci.value.value == bytes.fromhex("300c300a06082b06010505071501")
    ku = proxy.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert ku.value.key_encipherment
    assert proxy.signature_hash_algorithm is not None
    assert proxy.signature_hash_algorithm.name == "sha256"
    proxy.verify_directly_issued_by(user)


def test_proxy_lifetime_is_capped_by_user_cert(pki: TestPKI) -> None:
    """A proxy never outlives its issuer; expired=True ends it in the past."""
    user = _certs(pki.user_cert)[0]
    long = _certs(pki.make_proxy(lifetime=timedelta(days=5000)))[0]
    assert validity(long)[1] == validity(user)[1]
    short = _certs(pki.make_proxy(lifetime=timedelta(hours=1)))[0]
    now = datetime.now(timezone.utc)
    assert now + timedelta(minutes=58) < validity(short)[1] <= now + timedelta(hours=1)
    expired = _certs(pki.make_proxy(expired=True))[0]
    assert validity(expired)[1] < now


def test_proxy_of_proxy_and_custom_mode(pki: TestPKI, tmp_path: Path) -> None:
    """issuer=(proxy, proxy) chains a second proxy, carrying the whole chain along."""
    first = pki.make_proxy(tmp_path / "first")
    second = pki.make_proxy(tmp_path / "second", issuer=(first, first), mode=0o640)
    certs = _certs(second)
    assert len(certs) == 3
    assert certs[0].issuer == certs[1].subject
    assert stat.S_IMODE(second.stat().st_mode) == 0o640


def test_user_cert_file_foreign_and_second_user(pki: TestPKI, tmp_path: Path) -> None:
    """User cert file is no proxy; foreign proxy's CA is untrusted; make_proxy_for uses dn_for."""
    plain = pki.make_user_cert_file(tmp_path / "usercert+key.pem")
    assert _pem_labels(plain) == ["CERTIFICATE", "PRIVATE KEY"]
    assert stat.S_IMODE(plain.stat().st_mode) == 0o600
    assert _certs(plain)[0].extensions.get_extension_for_class(x509.BasicConstraints)

    foreign = _certs(pki.make_foreign_proxy())
    ca = _certs(pki.ca_cert)[0]
    assert foreign[1].issuer != ca.subject
    assert (pki.root / "other-ca" / "ca.pem").exists()

    other = _certs(pki.make_proxy_for("Other User"))
    assert other[1].issuer == ca.subject
    assert other[1].subject.rfc4514_string().startswith("CN=Other User,O=Test")
    assert pki.dn_for("Other User") == "/DC=org/DC=prestaged-test/O=Test/CN=Other User"
    again = _certs(pki.make_proxy_for("Other User"))
    assert again[1] == other[1]  # the second user is made once and reused


# ---------------------------------------------------------------------------------------------
# Real TLS handshakes on loopback
# ---------------------------------------------------------------------------------------------


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """Start TLS echo-ish servers on 127.0.0.1 that greet with the client's last CN."""
    servers: list[asyncio.Server] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer: dict[str, Any] | None = writer.get_extra_info("peercert")
        cn = "anonymous"
        if peer:
            cn = [v for rdn in peer["subject"] for k, v in rdn if k == "commonName"][-1]
        writer.write(f"hello {cn}\n".encode())
        await writer.drain()
        writer.close()

    async def start(ctx: ssl.SSLContext) -> int:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
        servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def _greeting(port: int, ctx: ssl.SSLContext) -> bytes:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"), 10
    )
    try:
        return await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()


# What OpenSSL names an alert received from the peer (SSLV3_ALERT_BAD_CERTIFICATE,
# TLSV1_ALERT_UNKNOWN_CA, TLSV13_ALERT_CERTIFICATE_REQUIRED, ...): the server refused us.
_PEER_ALERT = re.compile(r"(SSLV3|TLSV1|TLSV13)_ALERT_[A-Z_]+")


async def _assert_rejected(port: int, ctx: ssl.SSLContext) -> None:
    """Assert that the server refused the client: not that the client refused the server.

    Under TLS 1.3 the client's handshake completes (having verified the server) before the
    server checks the client certificate, so the refusal shows up on the first read: as the
    server's alert or, through asyncio's SSL transport, as EOF (accepted clients always get a
    greeting). A client-side failure, above all its own certificate verification, fails.
    """
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"), 10
        )
    except ssl.SSLCertVerificationError as e:
        pytest.fail(f"the client refused the server ({e.verify_message}): that proves nothing "
                    "about the server's checks")
    except (ssl.SSLError, ConnectionError) as e:
        pytest.fail(f"the client's handshake failed ({e!r}); the server must refuse after it")
    try:
        assert writer.get_extra_info("peercert"), "the client did not verify the server"
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
        except ssl.SSLError as e:
            assert _PEER_ALERT.fullmatch(e.reason or ""), f"not an alert from the server: {e!r}"
            return
        except ConnectionResetError:
            return  # the server closing abortively: still its refusal, after our handshake
        assert line == b"", f"server accepted the client and said {line!r}"
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()


async def test_assert_rejected_fails_when_the_client_does_not_trust_the_server(
    pki: TestPKI, start_server: StartServer
) -> None:
    """A client that cannot verify the server's CA is no proof of a server-side rejection."""
    pki.make_foreign_proxy()  # makes the other CA
    untrusting = ssl.create_default_context(cafile=str(pki.root / "other-ca" / "ca.pem"))
    untrusting.load_cert_chain(pki.make_proxy())  # a proxy the server would accept
    port = await start_server(pki.server_ssl_context())
    with pytest.raises(pytest.fail.Exception, match="the client refused the server"):
        await _assert_rejected(port, untrusting)


async def test_assert_rejected_fails_when_the_server_accepts(
    pki: TestPKI, start_server: StartServer
) -> None:
    """The helper does not pass for a client the server lets in."""
    port = await start_server(pki.server_ssl_context())
    with pytest.raises(AssertionError, match="server accepted the client"):
        await _assert_rejected(port, pki.client_ssl_context(pki.make_proxy()))


async def test_tls_accepts_valid_proxy(pki: TestPKI, start_server: StartServer) -> None:
    """A server from server_ssl_context() accepts client_ssl_context(proxy) for a valid proxy."""
    proxy = pki.make_proxy()
    cn = list(_certs(proxy)[0].subject)[-1].value
    assert isinstance(cn, str)
    port = await start_server(pki.server_ssl_context())
    assert await _greeting(port, pki.client_ssl_context(proxy)) == f"hello {cn}\n".encode()


async def test_tls_accepts_proxy_of_proxy_in_strict_mode(
    pki: TestPKI, start_server: StartServer
) -> None:
    """A two-level proxy passes with VERIFY_X509_STRICT on both ends (the Python 3.13 default)."""
    first = pki.make_proxy()
    second = pki.make_proxy(issuer=(first, first))
    server_ctx = pki.server_ssl_context()
    server_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    client_ctx = pki.client_ssl_context(second)
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    port = await start_server(server_ctx)
    assert (await _greeting(port, client_ctx)).startswith(b"hello ")


async def test_tls_rejects_foreign_proxy(pki: TestPKI, start_server: StartServer) -> None:
    """A proxy from a CA outside ca_dir is refused."""
    port = await start_server(pki.server_ssl_context())
    await _assert_rejected(port, pki.client_ssl_context(pki.make_foreign_proxy()))


async def test_tls_rejects_expired_proxy(pki: TestPKI, start_server: StartServer) -> None:
    """An expired proxy is refused."""
    port = await start_server(pki.server_ssl_context())
    await _assert_rejected(port, pki.client_ssl_context(pki.make_proxy(expired=True)))


async def test_tls_rejects_client_without_certificate(
    pki: TestPKI, start_server: StartServer
) -> None:
    """require_client_cert=True refuses a client that presents no certificate."""
    port = await start_server(pki.server_ssl_context())
    anonymous = ssl.create_default_context(capath=str(pki.ca_dir))
    await _assert_rejected(port, anonymous)


async def test_tls_optional_client_certificate(pki: TestPKI, start_server: StartServer) -> None:
    """require_client_cert=False lets a client without a certificate in, like XrdHttp."""
    port = await start_server(pki.server_ssl_context(require_client_cert=False))
    anonymous = ssl.create_default_context(capath=str(pki.ca_dir))
    assert await _greeting(port, anonymous) == b"hello anonymous\n"
