"""A throw-away grid PKI for tests: a CA, a host certificate, users and RFC 3820 proxies.

Everything is made with ``cryptography`` (RSA 2048, SHA-256) under one directory, laid out like
a grid site: a hashed CA directory (``<subject hash>.0``, as in ``/etc/grid-security/
certificates``), ``hostcert.pem``/``hostkey.pem`` and proxy files in the
``proxy cert, proxy key, issuer chain`` order that ``voms-proxy-init`` writes. Keys are
unencrypted: this is test material only and must never be used outside tests.

Layout under ``root``::

    ca/ca.pem ca/ca.key              the test CA (key mode 0600)
    certificates/<hash>.0            the hashed CA directory (``TestPKI.ca_dir``)
    host/hostcert.pem host/hostkey.pem   CN=localhost (both 0644 so a server user can read them)
    user/usercert.pem user/userkey.pem   /DC=org/DC=prestaged-test/O=Test/CN=Test User
    users/<cn>/...                   further users made by ``make_proxy_for``
    other-ca/...                     a CA that is *not* trusted, made by ``make_foreign_proxy``
    proxies/                         proxies made without an explicit path
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import secrets
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from prestaged.credentials import validity

__all__ = [
    "PROXY_CERT_INFO_OID",
    "TestPKI",
    "create_pki",
    "load_or_create_pki",
    "load_pki",
    "subject_hash",
]

#: RFC 3820 ProxyCertInfo extension.
PROXY_CERT_INFO_OID = ObjectIdentifier("1.3.6.1.5.5.7.1.14")
#: ProxyCertInfo value: no path length limit, policy id-ppl-inheritAll (1.3.6.1.5.5.7.21.1).
_PROXY_CERT_INFO_INHERIT_ALL = bytes.fromhex("300c300a06082b06010505071501")

# X509_V_FLAG_ALLOW_PROXY_CERTS; ssl.VERIFY_ALLOW_PROXY_CERTS only exists from Python 3.10.
_ALLOW_PROXY_CERTS = ssl.VerifyFlags(getattr(ssl, "VERIFY_ALLOW_PROXY_CERTS", 0x40))

_KEY_SIZE = 2048
_CA_LIFETIME = timedelta(days=3650)
_EE_LIFETIME = timedelta(days=365)
# Back-dated so that expired proxies still start inside their issuer's validity.
_BACKDATE = timedelta(days=7)

_Key = rsa.RSAPrivateKey
_Attr = tuple[ObjectIdentifier, str, str]  # (OID, OpenSSL short name, value)

_DN_PREFIX: tuple[_Attr, ...] = (
    (NameOID.DOMAIN_COMPONENT, "DC", "org"),
    (NameOID.DOMAIN_COMPONENT, "DC", "prestaged-test"),
    (NameOID.ORGANIZATION_NAME, "O", "Test"),
)
_OTHER_DN_PREFIX: tuple[_Attr, ...] = (
    (NameOID.DOMAIN_COMPONENT, "DC", "org"),
    (NameOID.DOMAIN_COMPONENT, "DC", "other-test"),
    (NameOID.ORGANIZATION_NAME, "O", "Other"),
)
_USER_CN = "Test User"


# --------------------------------------------------------------------------------------------
# OpenSSL subject hash
# --------------------------------------------------------------------------------------------

# ASN.1 string tags that OpenSSL canonicalises (ASN1_MASK_CANON) and how to decode them.
_CANON_STRING_CODECS = {
    0x0C: "utf-8",  # UTF8String
    0x13: "latin-1",  # PrintableString
    0x14: "latin-1",  # T61String (OpenSSL treats it as Latin-1)
    0x16: "latin-1",  # IA5String
    0x1A: "latin-1",  # VisibleString
    0x1C: "utf-32-be",  # UniversalString
    0x1E: "utf-16-be",  # BMPString
}
_UTF8STRING = 0x0C
_SEQUENCE = 0x30
_SET = 0x31
_OSSL_SPACE = b" \t\n\x0b\x0c\r"
_SPACE_RUN = re.compile(rb"[ \t\n\x0b\x0c\r]+")


def _der_tlv(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """Read one DER TLV at ``pos``; return (tag, content, position after it)."""
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    end = pos + length
    if end > len(data):
        raise ValueError("truncated DER")
    return tag, data[pos:end], end


def _der_items(data: bytes) -> list[tuple[int, bytes]]:
    """Split concatenated DER TLVs into (tag, content) pairs."""
    items = []
    pos = 0
    while pos < len(data):
        tag, content, pos = _der_tlv(data, pos)
        items.append((tag, content))
    return items


def _der(tag: int, content: bytes) -> bytes:
    """Encode one DER TLV (definite length)."""
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(raw))) + raw + content


def _canon_value(tag: int, content: bytes) -> bytes:
    """OpenSSL ``asn1_string_canon``: UTF8String, trimmed, spaces collapsed, ASCII lowercased."""
    codec = _CANON_STRING_CODECS.get(tag)
    if codec is None:
        return _der(tag, content)
    text = content.decode(codec).encode("utf-8").strip(_OSSL_SPACE)
    # bytes.lower() only touches ASCII, exactly like ossl_tolower on a UTF-8 byte stream.
    return _der(_UTF8STRING, _SPACE_RUN.sub(b" ", text).lower())


def _der_set_of(elements: Sequence[bytes]) -> bytes:
    """DER SET OF: elements sorted by their encodings (shorter wins on a common prefix)."""
    return _der(_SET, b"".join(sorted(elements)))


def subject_hash(cert: x509.Certificate) -> str:
    """OpenSSL ``X509_NAME_hash`` of the certificate's subject as 8 lowercase hex digits.

    This is the "new" (OpenSSL >= 1.0) hash that ``openssl x509 -subject_hash``, ``c_rehash``
    and ``capath`` lookups use: SHA-1 over the canonical encoding of the name (every string
    value converted to UTF8String, trimmed, internal whitespace collapsed to one space, ASCII
    lowercased; the DER of the RDN SETs concatenated without the outer SEQUENCE), first four
    bytes read little-endian.
    """
    ((tag, name_content),) = _der_items(cert.subject.public_bytes())
    if tag != _SEQUENCE:
        raise ValueError("subject is not a DER SEQUENCE")
    canon = bytearray()
    for set_tag, rdn in _der_items(name_content):
        if set_tag != _SET:
            raise ValueError("RDN is not a DER SET")
        attributes = []
        for seq_tag, atv in _der_items(rdn):
            if seq_tag != _SEQUENCE:
                raise ValueError("attribute is not a DER SEQUENCE")
            (oid_tag, oid), (value_tag, value) = _der_items(atv)
            attributes.append(_der(_SEQUENCE, _der(oid_tag, oid) + _canon_value(value_tag, value)))
        canon += _der_set_of(attributes)
    digest = hashlib.sha1(bytes(canon)).digest()  # OpenSSL's name hash, not a security use
    return f"{int.from_bytes(digest[:4], 'little'):08x}"


# --------------------------------------------------------------------------------------------
# Certificate making
# --------------------------------------------------------------------------------------------


def _name(attrs: Sequence[_Attr]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, _, value in attrs])


def _slash_dn(attrs: Sequence[_Attr]) -> str:
    return "".join(f"/{short}={value}" for _, short, value in attrs)


def _new_key() -> _Key:
    return rsa.generate_private_key(public_exponent=65537, key_size=_KEY_SIZE)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: _Key,
    issuer_key: _Key,
    *,
    not_before: datetime,
    not_after: datetime,
    serial: int | None = None,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )


def _key_usage(
    *, digital_signature: bool = False, key_encipherment: bool = False, ca: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _make_ca(cn: str, prefix: Sequence[_Attr]) -> tuple[x509.Certificate, _Key]:
    key = _new_key()
    name = _name((*prefix[:2], (NameOID.COMMON_NAME, "CN", cn)))
    now = _now()
    cert = (
        _builder(name, name, key, key, not_before=now - _BACKDATE, not_after=now + _CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_end_entity(
    subject: x509.Name,
    ca_cert: x509.Certificate,
    ca_key: _Key,
    eku: ObjectIdentifier,
    san: x509.SubjectAlternativeName | None = None,
    lifetime: timedelta | None = None,
) -> tuple[x509.Certificate, _Key]:
    key = _new_key()
    now = _now()
    builder = (
        _builder(
            subject,
            ca_cert.subject,
            key,
            ca_key,
            not_before=now - _BACKDATE,
            not_after=now + (lifetime or _EE_LIFETIME),
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True, key_encipherment=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: _Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int) -> Path:
    """Write ``data`` so that it is never readable with a wider mode than ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    path.chmod(mode)
    return path


def _load_cert_chain(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def _load_key(path: Path) -> _Key:
    data = path.read_bytes()
    match = re.search(
        rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", data, re.S
    )
    if match is None:
        raise ValueError(f"{path}: no private key")
    key = serialization.load_pem_private_key(match.group(0), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise TypeError(f"{path}: test PKI keys are RSA")
    return key


def _san(name: str) -> x509.GeneralName:
    """A subjectAltName entry: an IP address when ``name`` is one, else a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _cn_dir(cn: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", cn).strip("_") or "user"


# --------------------------------------------------------------------------------------------
# The PKI
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestPKI:
    """Paths of a test PKI made by :func:`create_pki`, and factories for proxies and TLS contexts.

    ``user_dn`` is the user's DN in OpenSSL slash form (``/DC=org/.../CN=Test User``), the form
    grid-mapfiles use. All proxy factories write ``proxy cert, proxy key, issuer chain`` files
    with mode 0600 unless told otherwise.
    """

    __test__ = False  # not a pytest test class, despite the name

    root: Path
    ca_dir: Path
    ca_cert: Path
    ca_key: Path
    host_cert: Path
    host_key: Path
    user_cert: Path
    user_key: Path
    user_dn: str

    def make_proxy(
        self,
        path: Path | None = None,
        *,
        lifetime: timedelta = timedelta(hours=12),
        expired: bool = False,
        issuer: tuple[Path, Path] | None = None,
        mode: int = 0o600,
    ) -> Path:
        """Write an RFC 3820 proxy (inheritAll, SHA-256) and return its path.

        ``issuer`` is ``(certificate file, key file)`` and defaults to the test user; its
        certificate file may hold a chain (pass a proxy file twice to make a proxy of a proxy),
        all of which is appended after the new proxy's key. ``lifetime`` starts now and is cut
        to the issuer's own expiry; ``expired=True`` makes the proxy end one hour ago instead.
        Without ``path`` the file goes to ``<root>/proxies/`` under a random name.
        """
        cert_file, key_file = issuer if issuer is not None else (self.user_cert, self.user_key)
        chain = _load_cert_chain(cert_file)
        issuer_cert, issuer_key = chain[0], _load_key(key_file)
        now = _now()
        if expired:
            not_after = now - timedelta(hours=1)
            not_before = not_after - lifetime
        else:
            not_before = now - timedelta(minutes=5)  # tolerate clock skew, like grid-proxy-init
            not_after = min(now + lifetime, validity(issuer_cert)[1])
        serial = secrets.randbelow(2**31 - 1) + 1
        subject = x509.Name(
            [*issuer_cert.subject, x509.NameAttribute(NameOID.COMMON_NAME, str(serial))]
        )
        key = _new_key()
        proxy = (
            _builder(
                subject,
                issuer_cert.subject,
                key,
                issuer_key,
                not_before=not_before,
                not_after=not_after,
                serial=serial,
            )
            .add_extension(
                x509.UnrecognizedExtension(PROXY_CERT_INFO_OID, _PROXY_CERT_INFO_INHERIT_ALL),
                critical=True,
            )
            .add_extension(_key_usage(digital_signature=True, key_encipherment=True), critical=True)
            .sign(issuer_key, hashes.SHA256())
        )
        if path is None:
            path = self.root / "proxies" / f"x509up_{secrets.token_hex(4)}"
        data = _cert_pem(proxy) + _key_pem(key) + b"".join(_cert_pem(c) for c in chain)
        return _write(path, data, mode)

    def make_user_cert_file(self, path: Path | None = None) -> Path:
        """Write the plain user certificate followed by its key (not a proxy), mode 0600."""
        if path is None:
            path = self.root / "proxies" / f"usercert_{secrets.token_hex(4)}.pem"
        return _write(path, self.user_cert.read_bytes() + self.user_key.read_bytes(), 0o600)

    def make_foreign_proxy(
        self,
        path: Path | None = None,
        *,
        lifetime: timedelta = timedelta(hours=12),
        expired: bool = False,
        mode: int = 0o600,
    ) -> Path:
        """Write a proxy of a user whose CA (under ``<root>/other-ca``) is not in ``ca_dir``.

        The foreign CA and user are made on first use and reused afterwards.
        """
        other = self.root / "other-ca"
        user_cert, user_key = other / "usercert.pem", other / "userkey.pem"
        if not (user_cert.exists() and user_key.exists()):
            ca_cert, ca_key = _make_ca("Other Test CA", _OTHER_DN_PREFIX)
            _write(other / "ca.pem", _cert_pem(ca_cert), 0o644)
            _write(other / "ca.key", _key_pem(ca_key), 0o600)
            subject = _name((*_OTHER_DN_PREFIX, (NameOID.COMMON_NAME, "CN", "Foreign User")))
            cert, key = _make_end_entity(subject, ca_cert, ca_key, ExtendedKeyUsageOID.CLIENT_AUTH)
            _write(user_key, _key_pem(key), 0o600)
            _write(user_cert, _cert_pem(cert), 0o644)
        return self.make_proxy(
            path, lifetime=lifetime, expired=expired, issuer=(user_cert, user_key), mode=mode
        )

    def dn_for(self, cn: str) -> str:
        """The slash-form DN of the user that :meth:`make_proxy_for` makes for ``cn``."""
        return _slash_dn((*_DN_PREFIX, (NameOID.COMMON_NAME, "CN", cn)))

    def make_proxy_for(
        self,
        cn: str,
        path: Path | None = None,
        *,
        lifetime: timedelta = timedelta(hours=12),
        expired: bool = False,
        mode: int = 0o600,
    ) -> Path:
        """Write a proxy of a second user of the same CA, DN ``/DC=org/.../O=Test/CN=<cn>``.

        The user certificate is made on first use under ``<root>/users/`` and reused afterwards;
        :meth:`dn_for` gives its DN.
        """
        home = self.root / "users" / _cn_dir(cn)
        user_cert, user_key = home / "usercert.pem", home / "userkey.pem"
        if not (user_cert.exists() and user_key.exists()):
            ca_cert = _load_cert_chain(self.ca_cert)[0]
            subject = _name((*_DN_PREFIX, (NameOID.COMMON_NAME, "CN", cn)))
            cert, key = _make_end_entity(
                subject, ca_cert, _load_key(self.ca_key), ExtendedKeyUsageOID.CLIENT_AUTH
            )
            _write(user_key, _key_pem(key), 0o600)
            _write(user_cert, _cert_pem(cert), 0o644)
        return self.make_proxy(
            path, lifetime=lifetime, expired=expired, issuer=(user_cert, user_key), mode=mode
        )

    def make_host_cert(self, *names: str,
                       lifetime: timedelta | None = None) -> tuple[Path, Path]:
        """A server certificate and key (mode 0600) for ``names`` only, from the test CA: DNS
        names, and IP addresses for names that are one (``"127.0.0.1"``). A server that
        presents one without ``127.0.0.1`` there has a certificate that does not match its
        name on 127.0.0.1. ``lifetime``: valid that long from now (default as other end
        entities)."""
        ca_cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        ca_key = _load_key(self.ca_key)
        san = x509.SubjectAlternativeName([_san(n) for n in names])
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        cert, key = _make_end_entity(subject, ca_cert, ca_key, ExtendedKeyUsageOID.SERVER_AUTH,
                                     san, lifetime)
        tag = secrets.token_hex(4)
        return (_write(self.root / "host" / f"{tag}.pem", _cert_pem(cert), 0o644),
                _write(self.root / "host" / f"{tag}.key", _key_pem(key), 0o600))

    def server_ssl_context(self, *, require_client_cert: bool = True,
                           cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        """A server context with the host certificate (or ``cert``, a (certificate, key) pair
        from ``make_host_cert``) that verifies clients (proxies allowed).

        Clients must present a certificate unless ``require_client_cert`` is false, in which
        case one is requested and verified if sent (like XrdHttp).
        """
        ctx = _server_context()
        ctx.load_verify_locations(capath=str(self.ca_dir))
        ctx.load_cert_chain(*(cert or (self.host_cert, self.host_key)))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        ctx.verify_flags |= _ALLOW_PROXY_CERTS
        return ctx

    def pool_ssl_context(self) -> ssl.SSLContext:
        """A dCache pool's server context: the host certificate, and no client certificate
        asked for (the door's one-time ``dcache-http-uuid`` authorises the read). A context
        that asks for one would make every client send, and the server verify and keep in its
        session tickets, a certificate chain that a real pool never sees."""
        ctx = _server_context()
        ctx.load_cert_chain(self.host_cert, self.host_key)
        ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def client_ssl_context(self, proxy: Path) -> ssl.SSLContext:
        """A client context trusting ``ca_dir`` and presenting the proxy file ``proxy``."""
        ctx = ssl.create_default_context(capath=str(self.ca_dir))
        ctx.load_cert_chain(proxy)
        return ctx


def _server_context() -> ssl.SSLContext:
    """A server-side TLS context on every Python: on 3.9, ``create_default_context(CLIENT_AUTH)``
    is a generic ``PROTOCOL_TLS`` one, which refuses server-only settings (``num_tickets``)."""
    return ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)


def create_pki(root: Path) -> TestPKI:
    """Create a CA, its hashed CA directory, a localhost host certificate and a user under ``root``.

    ``root`` and its parents are created as needed. Takes roughly 0.2 s (three RSA 2048 keys).
    """
    root.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _make_ca("Prestaged Test CA", _DN_PREFIX)
    host_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    )
    host_cert, host_key = _make_end_entity(
        host_subject, ca_cert, ca_key, ExtendedKeyUsageOID.SERVER_AUTH, san
    )
    user_attrs = (*_DN_PREFIX, (NameOID.COMMON_NAME, "CN", _USER_CN))
    user_cert, user_key = _make_end_entity(
        _name(user_attrs), ca_cert, ca_key, ExtendedKeyUsageOID.CLIENT_AUTH
    )

    ca_dir = root / "certificates"
    ca_dir.mkdir(exist_ok=True)
    ca_dir.chmod(0o755)
    pki = TestPKI(
        root=root,
        ca_dir=ca_dir,
        ca_cert=_write(root / "ca" / "ca.pem", _cert_pem(ca_cert), 0o644),
        ca_key=_write(root / "ca" / "ca.key", _key_pem(ca_key), 0o600),
        # World-readable host key: a server dropping root (XRootD as user xrootd) must read it.
        host_cert=_write(root / "host" / "hostcert.pem", _cert_pem(host_cert), 0o644),
        host_key=_write(root / "host" / "hostkey.pem", _key_pem(host_key), 0o644),
        user_cert=_write(root / "user" / "usercert.pem", _cert_pem(user_cert), 0o644),
        user_key=_write(root / "user" / "userkey.pem", _key_pem(user_key), 0o600),
        user_dn=_slash_dn(user_attrs),
    )
    _write(ca_dir / f"{subject_hash(ca_cert)}.0", _cert_pem(ca_cert), 0o644)
    for sub in ("ca", "host", "user"):
        (root / sub).chmod(0o755)
    return pki


def load_pki(root: Path) -> TestPKI:
    """Rebuild the ``TestPKI`` that ``create_pki(root)`` made earlier, from its file layout."""
    user_cert = root / "user" / "usercert.pem"
    subject = x509.load_pem_x509_certificate(user_cert.read_bytes()).subject
    return TestPKI(
        root=root,
        ca_dir=root / "certificates",
        ca_cert=root / "ca" / "ca.pem",
        ca_key=root / "ca" / "ca.key",
        host_cert=root / "host" / "hostcert.pem",
        host_key=root / "host" / "hostkey.pem",
        user_cert=user_cert,
        user_key=root / "user" / "userkey.pem",
        user_dn="".join(f"/{a.rfc4514_attribute_name}={a.value!s}" for a in subject),
    )


def load_or_create_pki(root: Path) -> TestPKI:
    """The PKI under ``root``: loaded if ``create_pki`` made it before, else created."""
    return load_pki(root) if (root / "ca").exists() else create_pki(root)
