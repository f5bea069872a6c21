"""prestaged verifies servers as OpenSSL, curl, gfal2 and XRootD do, on every Python: 3.13's
``create_default_context`` adds ``VERIFY_X509_STRICT``, which refuses certificates that every
grid client accepts (``net.client_ssl_context``)."""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cli_runner import run_cli
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from prestaged.catalog.http import catalog_ssl_context
from prestaged.net import client_ssl_context
from prestaged.testing.pki import TestPKI
from prestaged.testing.storage import ThreadedStorageServer


def _host_cert_without_aki(pki: TestPKI, tmp_path: Path) -> tuple[Path, Path]:
    """A 127.0.0.1 host certificate from the test CA with no authority key identifier, as
    older CAs issued them: valid for OpenSSL, refused by its strict mode."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path, key_path = tmp_path / "host-no-aki.pem", tmp_path / "host-no-aki.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _handshake(ctx: ssl.SSLContext, port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
            ctx.wrap_socket(sock, server_hostname="127.0.0.1"):
        pass


def test_storage_certificate_strict_mode_refuses_is_trusted(pki: TestPKI, proxy: Path,
                                                           tmp_path: Path) -> None:
    """A storage whose host certificate lacks an authority key identifier (OpenSSL's strict
    mode, Python 3.13's default, refuses it) is verified and warmed, and the catalogs'
    context trusts it too."""
    cert = _host_cert_without_aki(pki, tmp_path)
    with ThreadedStorageServer(pki.server_ssl_context(cert=cert)) as srv:
        strict = ssl.create_default_context(capath=str(pki.ca_dir))
        strict.verify_flags |= ssl.VERIFY_X509_STRICT
        with pytest.raises(ssl.SSLCertVerificationError, match="Authority Key Identifier"):
            _handshake(strict, srv.door_port)
        for ctx in (client_ssl_context(capath=str(pki.ca_dir)),
                    catalog_ssl_context(None, pki.ca_dir)):
            assert not ctx.verify_flags & ssl.VERIFY_X509_STRICT
            _handshake(ctx, srv.door_port)  # verified: no exception
        listing = tmp_path / "ds.txt"
        listing.write_text("".join(srv.url(f"/ds/f{i}") + "\n" for i in range(3)))
        res = run_cli("warm", str(listing), "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir),
                      "--no-state", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["counts"]["warm"] == 3
