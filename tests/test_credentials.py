"""Tests for proxy inspection, lifetime checks, location resolution and credential loading."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import ssl
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID, ObjectIdentifier

from prestaged.credentials import (
    KIND_END_ENTITY,
    KIND_LEGACY_PROXY,
    KIND_RFC3820_PROXY,
    CredentialError,
    Credentials,
    ProxyInfo,
    check_ca_dir,
    check_lifetime,
    format_timedelta,
    inspect_proxy,
    load_credentials,
    resolve_ca_dir,
    resolve_proxy_path,
    validity,
    warn_if_exposed,
)
from prestaged.errors import EXIT_CREDENTIALS
from prestaged.testing.pki import TestPKI, create_pki
from prestaged.testing.storage import ThreadedStorageServer

CA_DN = "/DC=org/DC=prestaged-test/CN=Prestaged Test CA"
PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----.*?-----END \1-----\n?", re.DOTALL)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """One PKI per module: key generation dominates the cost."""
    return create_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def proxy(pki: TestPKI) -> Path:
    """A valid 12 h RFC 3820 proxy of the test user, shared read-only."""
    return pki.make_proxy()


def _blocks(path: Path) -> list[bytes]:
    """The PEM blocks of a file, in order."""
    return [m.group(0) for m in PEM_BLOCK.finditer(path.read_bytes())]


def _key_body(pem: bytes) -> str:
    """The base64 body of a PEM block, on one line."""
    return "".join(pem.decode().strip().splitlines()[1:-1])


def _write(path: Path, *parts: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(b"".join(parts))
    path.chmod(mode)
    return path


def _forge(
    issuer_file: Path,
    path: Path,
    *,
    last_cn: str,
    lifetime: timedelta,
    extension: ObjectIdentifier | None = None,
    value: bytes = b"\x30\x00",
) -> Path:
    """Sign a proxy-like cert with the first cert/key of issuer_file, without lifetime capping."""
    chain = x509.load_pem_x509_certificates(issuer_file.read_bytes())
    key_pem = next(b for b in _blocks(issuer_file) if b"PRIVATE KEY" in b)
    issuer_key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(issuer_key, rsa.RSAPrivateKey)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([*chain[0].subject, x509.NameAttribute(NameOID.COMMON_NAME, last_cn)])
        )
        .issuer_name(chain[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + lifetime)
    )
    if extension is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(extension, value), critical=False
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    key_out = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    return _write(path, cert.public_bytes(serialization.Encoding.PEM), key_out, chain_pem)


def _error(path: Path) -> str:
    with pytest.raises(CredentialError) as info:
        inspect_proxy(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


# ---------------------------------------------------------------------------------------------
# inspect_proxy
# ---------------------------------------------------------------------------------------------


def test_inspect_rfc3820_proxy(pki: TestPKI, proxy: Path) -> None:
    """A proxy's subject is the user DN + /CN=<n>; identity and issuer are the user DN."""
    info = inspect_proxy(proxy)
    assert info.path == proxy
    assert re.fullmatch(re.escape(pki.user_dn) + r"/CN=\d+", info.subject)
    assert info.identity == pki.user_dn
    assert info.issuer == pki.user_dn
    assert info.kind == KIND_RFC3820_PROXY
    assert info.is_proxy
    assert info.chain_length == 2
    assert info.not_before.tzinfo is not None
    assert info.not_after.utcoffset() == timedelta(0)
    assert timedelta(hours=11, minutes=58) < info.time_left() <= timedelta(hours=12)


def test_inspect_plain_user_certificate(pki: TestPKI, tmp_path: Path) -> None:
    """A user cert + key file is an end-entity certificate whose identity is its subject."""
    info = inspect_proxy(pki.make_user_cert_file(tmp_path / "usercred.pem"))
    assert info.kind == KIND_END_ENTITY
    assert not info.is_proxy
    assert info.subject == info.identity == pki.user_dn
    assert info.issuer == CA_DN
    assert info.chain_length == 1


def test_identity_of_proxy_of_proxy(pki: TestPKI, proxy: Path, tmp_path: Path) -> None:
    """The identity skips every proxy in the chain and names the user."""
    second = pki.make_proxy(tmp_path / "second", issuer=(proxy, proxy))
    info = inspect_proxy(second)
    assert info.identity == pki.user_dn
    assert info.chain_length == 3
    assert info.issuer == inspect_proxy(proxy).subject


def test_a_proxy_without_its_chain_is_refused_naming_what_is_missing(
        pki: TestPKI, proxy: Path, tmp_path: Path) -> None:
    """A proxy file without the user certificate, or a proxy of a proxy without its middle,
    passed `prestaged credentials` (exit 0, identity and time left shown) and every server
    refused it: servers trust only the CA, so the chain down to the user's certificate must
    be sent. Each is now one error naming what is missing."""
    cert, key, _user = _blocks(proxy)
    with pytest.raises(CredentialError, match=re.escape(
            f"its chain is incomplete: the user certificate it was made from ({pki.user_dn}) "
            "is not in the file")):
        inspect_proxy(_write(tmp_path / "bare", cert, key))
    nested = pki.make_proxy(tmp_path / "nested", issuer=(proxy, proxy))
    blocks = _blocks(nested)
    certs = [b for b in blocks if b"CERTIFICATE" in b]
    keys = [b for b in blocks if b"PRIVATE KEY" in b]
    assert len(certs) == 3  # the proxy of a proxy, the proxy, the user
    assert inspect_proxy(nested).identity == pki.user_dn
    with pytest.raises(CredentialError, match="its chain is broken: certificate 1 was issued by"):
        inspect_proxy(_write(tmp_path / "no-middle", certs[0], keys[0], certs[2]))


def test_legacy_proxies_are_recognised(proxy: Path, tmp_path: Path) -> None:
    """CN=proxy / CN=limited proxy subjects and the Globus OID mark legacy proxies."""
    for cn in ("proxy", "limited proxy"):
        info = inspect_proxy(_forge(proxy, tmp_path / cn, last_cn=cn, lifetime=timedelta(hours=1)))
        assert info.kind == KIND_LEGACY_PROXY
        assert info.is_proxy
    globus = _forge(
        proxy,
        tmp_path / "globus",
        last_cn="12345",
        lifetime=timedelta(hours=1),
        extension=ObjectIdentifier("1.3.6.1.4.1.3536.1.222"),
    )
    assert inspect_proxy(globus).kind == KIND_LEGACY_PROXY


def test_lifetime_is_minimum_over_chain(proxy: Path, tmp_path: Path) -> None:
    """A proxy outliving its issuing proxy is only usable until the issuer expires."""
    short = _forge(proxy, tmp_path / "short", last_cn="1", lifetime=timedelta(hours=1))
    long = _forge(short, tmp_path / "long", last_cn="2", lifetime=timedelta(hours=48))
    chain = x509.load_pem_x509_certificates(long.read_bytes())
    assert len(chain) == 4
    assert validity(chain[0])[1] > validity(chain[1])[1]
    info = inspect_proxy(long)
    assert info.not_after == min(validity(c)[1] for c in chain)
    assert info.not_after == validity(chain[1])[1]
    assert info.not_before == max(validity(c)[0] for c in chain)


def test_an_unreadable_voms_extension_is_said_and_the_proxy_still_usable(
        proxy: Path, tmp_path: Path) -> None:
    """A VOMS extension that holds no attribute certificates: ``voms_error`` says so, no
    attributes, and the proxy's lifetime is its own (the storage decides what it makes of it)."""
    voms = ObjectIdentifier("1.3.6.1.4.1.8005.100.100.5")
    for value, error in [(b"\x04\x03abc", True), (b"\x30\x00", False)]:
        path = _forge(proxy, tmp_path / "p", last_cn="123", lifetime=timedelta(hours=2),
                      extension=voms, value=value)
        info = inspect_proxy(path)
        assert info.voms == () and info.usable_until == info.not_after
        assert (info.voms_error == "its VOMS extension cannot be read (not attribute "
                "certificates)") is error
        check_lifetime(info, 3600)


def test_voms_validity_times_must_be_utc() -> None:
    """asn1crypto gives a GeneralizedTime without ``Z`` as a naive datetime and year 0 as its
    own ``extended_datetime``: both are malformed attributes (then ``voms_error``), never a
    comparison that raises later (a traceback in ``warm`` and ``credentials``)."""
    from asn1crypto.util import extended_datetime

    from prestaged.credentials import _utc_time

    good = datetime(2030, 1, 1, tzinfo=timezone.utc)
    assert _utc_time(good) is good
    for bad in (datetime(2030, 1, 1), extended_datetime(0, 1, 1, tzinfo=timezone.utc), None):
        with pytest.raises(ValueError):
            _utc_time(bad)


def test_missing_file(tmp_path: Path) -> None:
    """A missing proxy is reported as 'no such file' with its path."""
    assert _error(tmp_path / "nope").endswith(": no such file")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    """A directory given as proxy is reported as such."""
    assert "is a directory" in _error(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(proxy: Path, tmp_path: Path) -> None:
    """A proxy the user cannot read is reported as permission denied."""
    path = _write(tmp_path / "locked", proxy.read_bytes(), mode=0o000)
    assert "permission denied" in _error(path)


def test_permission_error_is_reported(
    proxy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PermissionError while opening becomes 'permission denied' (runs as root too)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("prestaged.tokens.read_small", refuse)  # the reader of both
    assert "permission denied" in _error(proxy)


def test_file_without_key(pki: TestPKI) -> None:
    """A certificate-only file (e.g. usercert.pem) has no private key."""
    assert _error(pki.user_cert).endswith("no private key in file")


def test_file_without_certificate(pki: TestPKI, tmp_path: Path) -> None:
    """A key-only file (e.g. userkey.pem) has no certificate."""
    path = _write(tmp_path / "keyonly", pki.user_key.read_bytes())
    assert "no certificate in file" in _error(path)


def test_garbage_file(tmp_path: Path) -> None:
    """Random bytes are no certificate, and the message does not echo them."""
    path = _write(tmp_path / "garbage", b"hello\x00\xff this is not PEM SECRETSTUFF")
    message = _error(path)
    assert "no certificate in file" in message
    assert "SECRETSTUFF" not in message


def test_corrupt_certificate_pem(proxy: Path, tmp_path: Path) -> None:
    """A CERTIFICATE block with a broken body is unparsable PEM."""
    cert, key, user = _blocks(proxy)
    broken = cert[:80] + b"!!!!" + cert[84:]
    assert "unparsable PEM certificate" in _error(_write(tmp_path / "bad", broken, key, user))


def test_corrupt_key_pem(proxy: Path, tmp_path: Path) -> None:
    """A PRIVATE KEY block with a broken body is unparsable, and a lone BEGIN line too."""
    cert, key, user = _blocks(proxy)
    for junk in (b"A" * 64, b"!" * 64):  # valid base64 of bad DER, then invalid base64
        broken = key.replace(key.splitlines()[3], junk)
        assert "unparsable PEM private key" in _error(_write(tmp_path / "a", cert, broken, user))
    truncated = key.splitlines(keepends=True)[0] + b"AAAA\n"
    assert "unparsable PEM private key" in _error(_write(tmp_path / "b", cert, truncated))


@pytest.mark.parametrize(
    "fmt",
    [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL],
    ids=["pkcs8", "traditional"],
)
def test_encrypted_key(proxy: Path, tmp_path: Path, fmt: serialization.PrivateFormat) -> None:
    """An encrypted proxy key (PKCS#8 or Proc-Type) is refused as encrypted."""
    cert, key_pem, user = _blocks(proxy)
    key = serialization.load_pem_private_key(key_pem, password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM, fmt, serialization.BestAvailableEncryption(b"secret")
    )
    path = _write(tmp_path / "encrypted", cert, encrypted, user)
    assert "private key is encrypted" in _error(path)


def test_key_does_not_match_certificate(pki: TestPKI, proxy: Path, tmp_path: Path) -> None:
    """A key belonging to another certificate is refused."""
    cert, _key, user = _blocks(proxy)
    path = _write(tmp_path / "mismatch", cert, pki.user_key.read_bytes(), user)
    assert "private key does not match the first certificate" in _error(path)


def test_errors_are_credential_errors_with_exit_code_3(tmp_path: Path) -> None:
    """CredentialError carries the credentials exit code."""
    with pytest.raises(CredentialError) as info:
        inspect_proxy(tmp_path / "nope")
    assert info.value.exit_code == EXIT_CREDENTIALS


# ---------------------------------------------------------------------------------------------
# Lifetime
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("td", "text"),
    [
        (timedelta(hours=11, minutes=59, seconds=59), "11h59m"),
        (timedelta(days=3, hours=4, minutes=50), "3d04h"),
        (timedelta(minutes=30), "0h30m"),
        (timedelta(hours=1), "1h00m"),
        (timedelta(0), "0h00m"),
        (-timedelta(hours=2, minutes=10, seconds=5), "expired 2h10m ago"),
        (-timedelta(days=2, hours=1), "expired 2d01h ago"),
    ],
)
def test_format_timedelta(td: timedelta, text: str) -> None:
    """format_timedelta truncates to minutes (hours past a day) and words negative spans."""
    assert format_timedelta(td) == text


def test_expired_proxy(pki: TestPKI) -> None:
    """An expired proxy fails check_lifetime naming the file, the UTC time and the fix."""
    path = pki.make_proxy(expired=True)
    info = inspect_proxy(path)
    with pytest.raises(CredentialError) as err:
        check_lifetime(info, 0)
    message = str(err.value)
    expected_at = info.not_after.strftime("%Y-%m-%d %H:%M:%S")
    assert message == (
        f"proxy {path}: expired at {expected_at} UTC (run voms-proxy-init or grid-proxy-init)"
    )


def test_not_yet_valid(proxy: Path) -> None:
    """A proxy checked before its start reports 'not valid before'."""
    info = inspect_proxy(proxy)
    with pytest.raises(CredentialError, match="not valid before"):
        check_lifetime(info, 0, now=info.not_before - timedelta(hours=1))


def test_short_lifetime(proxy: Path) -> None:
    """Less left than min_lifetime is an error stating both spans."""
    info = inspect_proxy(proxy)
    now = info.not_after - timedelta(minutes=30)
    with pytest.raises(CredentialError) as err:
        check_lifetime(info, 3600, now=now)
    assert str(err.value).startswith(
        f"proxy {proxy}: 0h30m left, less than credentials.min_lifetime (1h00m)"
    )
    check_lifetime(info, 1800, now=now)  # exactly enough is fine
    assert info.time_left(now) == timedelta(minutes=30)


# ---------------------------------------------------------------------------------------------
# Permissions
# ---------------------------------------------------------------------------------------------


def test_warn_if_exposed(pki: TestPKI, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A 0644 proxy is warned about (path and mode, no contents); a 0600 one is not."""
    caplog.set_level(logging.WARNING, logger="prestaged.credentials")
    private = pki.make_proxy(tmp_path / "private")
    assert not warn_if_exposed(private)
    assert caplog.records == []
    exposed = pki.make_proxy(tmp_path / "exposed", mode=0o644)
    assert warn_if_exposed(exposed)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert str(exposed) in record.getMessage()
    assert "0644" in record.getMessage()
    assert not warn_if_exposed(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# Locations
# ---------------------------------------------------------------------------------------------


def test_resolve_proxy_path_order() -> None:
    """--proxy beats credentials.proxy beats $X509_USER_PROXY beats /tmp/x509up_u<uid>."""
    env = {"X509_USER_PROXY": "/env/proxy"}
    cli, conf = Path("/cli/proxy"), Path("/conf/proxy")
    assert resolve_proxy_path(cli, conf, env, 7) == (cli, "--proxy")
    assert resolve_proxy_path(None, conf, env, 7) == (conf, "credentials.proxy")
    assert resolve_proxy_path(None, None, env, 7) == (Path("/env/proxy"), "$X509_USER_PROXY")
    default = (Path("/tmp/x509up_u7"), "default /tmp/x509up_u7")
    assert resolve_proxy_path(None, None, {}, 7) == default
    assert resolve_proxy_path(None, None, {"X509_USER_PROXY": ""}, 7) == default
    assert resolve_proxy_path(None, None, {})[0] == Path(f"/tmp/x509up_u{os.getuid()}")


def test_resolve_ca_dir_order() -> None:
    """--ca-dir beats credentials.ca_dir beats $X509_CERT_DIR beats /etc/grid-security."""
    env = {"X509_CERT_DIR": "/env/certs"}
    cli, conf = Path("/cli/certs"), Path("/conf/certs")
    assert resolve_ca_dir(cli, conf, env) == (cli, "--ca-dir")
    assert resolve_ca_dir(None, conf, env) == (conf, "credentials.ca_dir")
    assert resolve_ca_dir(None, None, env) == (Path("/env/certs"), "$X509_CERT_DIR")
    default = Path("/etc/grid-security/certificates")
    assert resolve_ca_dir(None, None, {}) == (default, f"default {default}")


def test_check_ca_dir(pki: TestPKI, tmp_path: Path) -> None:
    """Missing, non-directory, empty and unhashed CA directories are refused with the source."""
    check_ca_dir(pki.ca_dir, "--ca-dir")
    with pytest.raises(CredentialError) as err:
        check_ca_dir(tmp_path / "nope", "$X509_CERT_DIR")
    assert str(err.value).startswith(
        f"CA directory {tmp_path / 'nope'} (from $X509_CERT_DIR): no such directory"
    )
    with pytest.raises(CredentialError, match="not a directory"):
        check_ca_dir(pki.ca_cert, "credentials.ca_dir")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CredentialError, match=r"\(default location\): contains no CA"):
        check_ca_dir(empty, "default /etc/grid-security/certificates")
    (empty / "ca.pem").write_bytes(pki.ca_cert.read_bytes())
    with pytest.raises(CredentialError, match="openssl rehash"):
        check_ca_dir(empty, "--ca-dir")


# ---------------------------------------------------------------------------------------------
# load_credentials and the SSL context
# ---------------------------------------------------------------------------------------------


def _load(proxy: Path | None, ca_dir: Path | None, **kwargs: object) -> Credentials:
    return load_credentials(
        proxy=proxy,
        proxy_configured=None,
        ca_dir=ca_dir,
        ca_dir_configured=None,
        min_lifetime=3600,
        env={},
        **kwargs,  # type: ignore[arg-type]
    )


async def test_load_credentials_and_handshake(pki: TestPKI, proxy: Path) -> None:
    """Loaded credentials give a context that passes a real mutual-TLS handshake."""
    creds = _load(proxy, pki.ca_dir)
    assert creds.proxy.identity == pki.user_dn
    assert creds.ca_dir == pki.ca_dir

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert")
        writer.write(b"ok\n" if peer else b"anonymous\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=pki.server_ssl_context())
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=creds.ssl_context(), server_hostname="localhost"
        )
        assert await asyncio.wait_for(reader.readline(), 10) == b"ok\n"
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


def test_load_credentials_from_environment(pki: TestPKI, proxy: Path) -> None:
    """$X509_USER_PROXY and $X509_CERT_DIR are used when nothing else is given."""
    env = {"X509_USER_PROXY": str(proxy), "X509_CERT_DIR": str(pki.ca_dir)}
    creds = load_credentials(
        proxy=None,
        proxy_configured=None,
        ca_dir=None,
        ca_dir_configured=None,
        min_lifetime=0,
        env=env,
    )
    assert creds.proxy.path == proxy
    assert creds.ca_dir == pki.ca_dir


def test_load_credentials_missing_default_proxy(pki: TestPKI) -> None:
    """A missing default proxy says where it looked and how to get one."""
    uid = 2_000_000_000 + os.getpid() % 1000  # a /tmp/x509up_u<uid> nobody has
    with pytest.raises(CredentialError) as err:
        _load(None, pki.ca_dir, uid=uid)
    assert str(err.value) == (
        f"no X.509 proxy: /tmp/x509up_u{uid} (default location) does not exist;"
        " set --proxy or $X509_USER_PROXY, or run voms-proxy-init"
    )


def test_load_credentials_names_the_source(pki: TestPKI, tmp_path: Path) -> None:
    """A missing proxy from the environment is reported with its source."""
    missing = tmp_path / "gone"
    with pytest.raises(CredentialError) as err:
        load_credentials(
            proxy=None,
            proxy_configured=None,
            ca_dir=pki.ca_dir,
            ca_dir_configured=None,
            min_lifetime=0,
            env={"X509_USER_PROXY": str(missing)},
        )
    assert str(err.value) == f"proxy {missing} (from $X509_USER_PROXY): no such file"


def test_load_credentials_refuses_expiring_proxy_and_missing_ca_dir(
    pki: TestPKI, tmp_path: Path
) -> None:
    """min_lifetime is enforced and a missing CA directory is refused."""
    short = pki.make_proxy(tmp_path / "short", lifetime=timedelta(minutes=30))
    with pytest.raises(CredentialError, match=r"less than credentials\.min_lifetime"):
        _load(short, pki.ca_dir)
    with pytest.raises(CredentialError, match=r"\(from --ca-dir\): no such directory"):
        _load(pki.make_proxy(tmp_path / "ok"), tmp_path / "no-certs")


def test_load_credentials_warns_about_exposed_proxy(
    pki: TestPKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A group/other-readable proxy still loads, with a warning."""
    caplog.set_level(logging.WARNING, logger="prestaged.credentials")
    exposed = pki.make_proxy(tmp_path / "exposed", mode=0o640)
    _load(exposed, pki.ca_dir)
    assert any("chmod 600" in r.getMessage() for r in caplog.records)


def test_ssl_context_wraps_openssl_errors(pki: TestPKI, proxy: Path, tmp_path: Path) -> None:
    """Credentials.ssl_context turns an OpenSSL refusal into a CredentialError naming the file."""
    cert, _key, user = _blocks(proxy)
    bad = _write(tmp_path / "mismatch", cert, pki.user_key.read_bytes(), user)
    info = inspect_proxy(proxy)
    forged = ProxyInfo(**{**info.__dict__, "path": bad})
    with pytest.raises(CredentialError) as err:
        Credentials(proxy=forged, ca_dir=pki.ca_dir).ssl_context()
    assert str(err.value).startswith(f"proxy {bad}: OpenSSL cannot load it")


def test_ssl_context_never_prompts_for_a_passphrase(
    pki: TestPKI, proxy: Path, tmp_path: Path
) -> None:
    """An encrypted key fails in ssl_context instead of prompting on the terminal."""
    cert, key_pem, user = _blocks(proxy)
    key = serialization.load_pem_private_key(key_pem, password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    path = _write(tmp_path / "enc", cert, encrypted, user)
    forged = ProxyInfo(**{**inspect_proxy(proxy).__dict__, "path": path})
    with pytest.raises(CredentialError, match="OpenSSL cannot load it"):
        Credentials(proxy=forged, ca_dir=pki.ca_dir).ssl_context()


# ---------------------------------------------------------------------------------------------
# No secrets in messages or logs
# ---------------------------------------------------------------------------------------------


def test_no_key_material_in_errors_or_logs(
    pki: TestPKI, proxy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No PEM markers or key base64 ever reach a CredentialError message or a log record."""
    caplog.set_level(logging.DEBUG)
    cert, key_pem, user = _blocks(proxy)
    user_key = pki.user_key.read_bytes()
    key = serialization.load_pem_private_key(key_pem, password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.BestAvailableEncryption(b"secret"),
    )
    files = {
        "mismatch": (cert, user_key, user),
        "key-only": (key_pem, user_key),
        "encrypted": (cert, encrypted, user),
        "broken-key": (cert, key_pem.replace(key_pem.splitlines()[2], b"!" * 64), user),
        "garbage-with-key": (b"junk ", key_pem[:200], b" junk"),
        "exposed": (cert, key_pem, user),
    }
    messages: list[str] = []
    for name, parts in files.items():
        path = _write(tmp_path / name, *parts, mode=0o644)
        for attempt in (
            lambda p=path: inspect_proxy(p),
            lambda p=path: _load(p, pki.ca_dir, now=datetime(2000, 1, 1, tzinfo=timezone.utc)),
            lambda p=path: _load(p, pki.ca_dir),
            lambda p=path: Credentials(
                ProxyInfo(**{**inspect_proxy(proxy).__dict__, "path": p}), pki.ca_dir
            ).ssl_context(),
        ):
            try:
                attempt()
            except CredentialError as e:
                messages.append(str(e))
    assert len(messages) >= 15
    text = "\n".join(messages) + "\n" + caplog.text
    assert "PRIVATE KEY" not in text
    assert "-----BEGIN" not in text
    for secret in (key_pem, user_key, encrypted):
        body = _key_body(secret)
        chunks = {body[i : i + 16] for i in range(0, len(body) - 16, 8)}
        assert not any(chunk in text for chunk in chunks)
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert base64.b64encode(der[40:80]).decode() not in text


async def test_a_command_presents_the_proxy_file_as_it_is_when_each_touch_starts(
        pki: TestPKI, storage: ThreadedStorageServer, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """`warm`, `wait`, `submit` and `campaign run` kept the proxy they started with, though
    the README said they take up a renewed one: a `wait` whose proxy was renewed on disk
    ended with exit 3 once the first expired. Each touch now presents the file as it is (a
    rewrite with another CA's proxy is refused by the storage: that is what it presented);
    a rewrite that is no usable proxy keeps the previous one; and a proxy that has expired
    fails the touch at once, naming it, with nothing sent."""
    from prestaged.credentials import Credentials, inspect_proxy
    from prestaged.model import Failure
    from prestaged.service.toucher import ProxyFollower, SharedToucher
    from prestaged.storage.http import HttpToucher

    path = pki.make_proxy(tmp_path / "x509up")
    creds = Credentials(proxy=inspect_proxy(path), ca_dir=pki.ca_dir)
    shared = SharedToucher(lambda ctx: HttpToucher(ctx, limit=2, limit_per_host=2), 2)
    shared.valid.set()
    await shared.install(creds.ssl_context())
    follower = ProxyFollower(creds, shared, recheck=0.0)
    url = storage.url("/f")
    try:
        assert (await follower.touch(url)).status == 206
        pki.make_foreign_proxy(path)  # renewed from another CA: the storage refuses it
        refused = await follower.touch(url)
        assert refused.status is None and refused.failure in (Failure.TLS, Failure.RESET)
        pki.make_proxy(path)  # renewed properly
        assert (await follower.touch(url)).status == 206
        path.write_text("not a proxy\n")
        assert (await follower.touch(url)).status == 206  # the previous one is kept
        assert "proxy changed but cannot be used" in caplog.text
        stale = pki.make_proxy(tmp_path / "x509up_stale", expired=True)
        gone = ProxyFollower(Credentials(proxy=inspect_proxy(stale), ca_dir=pki.ca_dir),
                             shared, recheck=3600.0)
        expired = await gone.touch(url)
        assert expired.failure is Failure.CREDENTIAL and "expired at" in expired.error
        assert str(stale) in expired.error
    finally:
        await shared.close()


async def test_a_renewed_proxy_reaches_the_tape_client_with_no_touch_at_all(
        pki: TestPKI, tmp_path: Path) -> None:
    """A dataset all on tape makes no touch until files land: the proxy was looked at only
    before touches, so its Tape REST polls kept the first proxy past its end (exit 5 after 8
    tries) while a renewal sat on disk. ``follow`` looks every ``recheck`` seconds."""
    from prestaged.credentials import Credentials, inspect_proxy
    from prestaged.service.toucher import ProxyFollower, SharedToucher
    from prestaged.storage.http import HttpToucher

    class Tape:
        installed: list[ssl.SSLContext] = []

        def install(self, ctx: ssl.SSLContext, token: object) -> None:
            self.installed.append(ctx)

    path = pki.make_proxy(tmp_path / "x509up", lifetime=timedelta(hours=1))
    creds = Credentials(proxy=inspect_proxy(path), ca_dir=pki.ca_dir)
    shared = SharedToucher(lambda ctx: HttpToucher(ctx, limit=1, limit_per_host=1), 1)
    shared.valid.set()
    await shared.install(creds.ssl_context())
    tape = Tape()
    follower = ProxyFollower(creds, shared, tape, recheck=0.02)  # type: ignore[arg-type]
    following = asyncio.ensure_future(follower.follow())
    try:
        pki.make_proxy(path, lifetime=timedelta(hours=12))  # renewed; nothing is touched
        deadline = asyncio.get_running_loop().time() + 30
        while not tape.installed:
            assert asyncio.get_running_loop().time() < deadline, "the renewal never reached tape"
            await asyncio.sleep(0.02)  # polling with a deadline
        proxy = follower.creds.proxy
        assert proxy is not None and proxy.time_left() > timedelta(hours=11)
    finally:
        following.cancel()
        await shared.close()
