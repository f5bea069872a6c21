"""X.509 proxy and CA directory handling: find them, inspect them, refuse unusable ones early.

A grid proxy file holds the proxy certificate, its unencrypted private key and the issuer chain
(the user certificate, possibly more proxies). We check it before any transfer so that a user
gets one line naming the file and the fix ("expired at ...; run voms-proxy-init") instead of an
SSL alert from the storage halfway through a run.

Nothing here ever puts file contents or key material into a message or a log record: messages
name the file and the problem only.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Optional

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID, ObjectIdentifier

from prestaged.errors import CredentialError
from prestaged.files import exposed_mode
from prestaged.net import client_ssl_context
from prestaged.tokens import (
    TokenSource,
    check_token,
    describe_locations,
    find_token,
    read_credential_file,
    token_locations,
    warn_if_token_exposed,
)

__all__ = [
    "DEFAULT_CA_DIR",
    "KIND_END_ENTITY",
    "KIND_LEGACY_PROXY",
    "KIND_RFC3820_PROXY",
    "LEGACY_PROXY_HINT",
    "METHODS",
    "CredentialError",
    "Credentials",
    "ProxyInfo",
    "VomsAttributes",
    "check_ca_dir",
    "check_lifetime",
    "format_dn",
    "format_timedelta",
    "inspect_proxy",
    "load_credentials",
    "resolve_ca_dir",
    "resolve_proxy_path",
    "warn_if_exposed",
]

logger = logging.getLogger(__name__)

KIND_RFC3820_PROXY = "RFC 3820 proxy"
KIND_LEGACY_PROXY = "legacy Globus proxy"
KIND_END_ENTITY = "end-entity certificate"

DEFAULT_CA_DIR = Path("/etc/grid-security/certificates")

_PROXY_CERT_INFO = ObjectIdentifier("1.3.6.1.5.5.7.1.14")
_GLOBUS_PROXY_CERT_INFO = ObjectIdentifier("1.3.6.1.4.1.3536.1.222")
VOMS_CLOCK_SKEW = timedelta(minutes=5)
"""How far a VOMS server's clock may run ahead of ours before its attributes are "not valid
yet"."""
_VOMS_EXTENSION = ObjectIdentifier("1.3.6.1.4.1.8005.100.100.5")
"""The proxy extension holding the VOMS attribute certificates (a SEQUENCE OF SEQUENCE OF AC)."""
_VOMS_FQANS = "1.3.6.1.4.1.8005.100.100.4"
"""The AC attribute listing the FQANs (IetfAttrSyntax: the VO://host:port, then the FQANs)."""
_LEGACY_PROXY_CNS = frozenset({"proxy", "limited proxy"})
_RENEW_HINT = "run voms-proxy-init or grid-proxy-init"
LEGACY_PROXY_HINT = ("a legacy Globus proxy (CN=proxy, before RFC 3820), which servers on "
                     "OpenSSL refuse as signed by an unknown CA (XRootD: \"unknown ca\"); make "
                     "an RFC 3820 proxy: voms-proxy-init -rfc or grid-proxy-init -rfc")
"""Said of a legacy proxy at start and in every refusal naming it (``Credentials.hint``)."""

# A proxy file is a few KiB; refuse to slurp something that obviously is not one.
_MAX_PROXY_BYTES = 1 << 20
_CERT_BEGIN = b"-----BEGIN CERTIFICATE-----"
_CERT_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.DOTALL)
_KEY_BLOCK = re.compile(
    rb"-----BEGIN ((?:[A-Z0-9]+ )*PRIVATE KEY)-----.*?-----END \1-----", re.DOTALL
)
_KEY_BEGIN = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")
# OpenSSL capath lookups only find "<8 hex digit subject hash>.<n>" files.
_HASHED_CERT = re.compile(r"^[0-9a-f]{8}\.[0-9]+$")
_SSL_SOURCE_LINE = re.compile(r"\s*\(_ssl\.c:\d+\)$")

# OpenSSL short names for X509_NAME_oneline-style DNs; anything else prints as a dotted OID.
_SHORT_NAMES = {
    NameOID.COMMON_NAME: "CN",
    NameOID.COUNTRY_NAME: "C",
    NameOID.LOCALITY_NAME: "L",
    NameOID.STATE_OR_PROVINCE_NAME: "ST",
    NameOID.STREET_ADDRESS: "street",
    NameOID.ORGANIZATION_NAME: "O",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
    NameOID.SERIAL_NUMBER: "serialNumber",
    NameOID.SURNAME: "SN",
    NameOID.GIVEN_NAME: "GN",
    NameOID.TITLE: "title",
    NameOID.INITIALS: "initials",
    NameOID.GENERATION_QUALIFIER: "generationQualifier",
    NameOID.DN_QUALIFIER: "dnQualifier",
    NameOID.PSEUDONYM: "pseudonym",
    NameOID.POSTAL_CODE: "postalCode",
    NameOID.DOMAIN_COMPONENT: "DC",
    NameOID.USER_ID: "UID",
    NameOID.EMAIL_ADDRESS: "emailAddress",
}


# --------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------


def format_dn(name: x509.Name) -> str:
    """Format a name in OpenSSL slash form, most significant RDN first: ``/DC=org/.../CN=x``.

    This is the form grid-mapfiles and ``voms-proxy-info`` use; multi-valued RDNs are written
    as consecutive ``/type=value`` pairs, like ``X509_NAME_oneline``.
    """
    parts = []
    for attribute in name:
        value = attribute.value
        text = value if isinstance(value, str) else value.hex()
        parts.append(f"/{_SHORT_NAMES.get(attribute.oid, attribute.oid.dotted_string)}={text}")
    return "".join(parts)


def _format_span(seconds: int) -> str:
    if seconds >= 86400:
        days, rest = divmod(seconds, 86400)
        return f"{days}d{rest // 3600:02d}h"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m"


def format_timedelta(td: timedelta) -> str:
    """Format a remaining lifetime for people: ``11h59m``, ``3d04h``, ``expired 2h10m ago``.

    Truncates to whole minutes (whole hours from one day on); negative spans are "expired".
    """
    seconds = int(td.total_seconds())
    if seconds < 0:
        return f"expired {_format_span(-seconds)} ago"
    return _format_span(seconds)


def _format_time(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _origin(source: str | None) -> str:
    if not source:
        return ""
    if source.startswith("default"):
        return " (default location)"
    return f" (from {source})"


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


# --------------------------------------------------------------------------------------------
# Proxy inspection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VomsAttributes:
    """One VOMS attribute certificate of a proxy, as ``voms-proxy-info -all`` shows it: the
    VO, its FQANs in order (the first is the one a storage maps by), the VOMS server that signed
    it (DN, ``host:port``) and its validity (tz-aware UTC), which may end before the proxy's.
    Shown, and its lifetime checked; its signature is the storage's to verify (``vomsdir``)."""

    vo: str
    fqans: tuple[str, ...]
    issuer: str
    uri: str
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True)
class ProxyInfo:
    """What a proxy (or plain certificate) file holds, as far as prestaged cares.

    ``subject``/``issuer`` describe the first certificate; ``identity`` is the DN of the first
    certificate in the chain that is not a proxy, i.e. the user a storage maps us to.
    ``not_before``/``not_after`` are tz-aware UTC and span the validity shared by every
    certificate in the file (latest start, earliest end).
    """

    path: Path
    subject: str
    identity: str
    issuer: str
    kind: str
    not_before: datetime
    not_after: datetime
    chain_length: int
    voms: tuple[VomsAttributes, ...] = ()
    """The VOMS attribute certificates of the proxy (none: a plain grid-proxy-init proxy)."""
    voms_error: Optional[str] = None
    """Why a VOMS extension present could not be read (then ``voms`` is empty)."""

    @property
    def is_proxy(self) -> bool:
        """True for RFC 3820 and legacy Globus proxies, false for a plain certificate."""
        return self.kind != KIND_END_ENTITY

    @property
    def usable_until(self) -> datetime:
        """When the proxy stops being usable as it is: at its own end, or its VOMS attributes'
        when they end first (a storage that maps by FQAN refuses it from then on)."""
        return min([self.not_after, *(v.not_after for v in self.voms)])

    def time_left(self, now: datetime | None = None) -> timedelta:
        """Usable lifetime left at ``now`` (default: the current UTC time), VOMS attributes
        included (``usable_until``); negative if expired."""
        return self.usable_until - (now if now is not None else _utcnow())


def _cert_kind(cert: x509.Certificate) -> str:
    oids = {extension.oid for extension in cert.extensions}
    if _PROXY_CERT_INFO in oids:
        return KIND_RFC3820_PROXY
    if _GLOBUS_PROXY_CERT_INFO in oids:
        return KIND_LEGACY_PROXY
    attributes = list(cert.subject)
    last = attributes[-1] if attributes else None
    if (
        last is not None
        and last.oid == NameOID.COMMON_NAME
        and last.value in _LEGACY_PROXY_CNS
        and cert.subject != cert.issuer
    ):
        return KIND_LEGACY_PROXY
    return KIND_END_ENTITY


def _voms(chain: list[x509.Certificate]) -> tuple[tuple[VomsAttributes, ...], Optional[str]]:
    """The VOMS attribute certificates of the first certificate of ``chain`` that has any
    (voms-proxy-init puts them in the proxy; a delegated proxy keeps them further down), and
    why they cannot be read when they cannot."""
    for cert in chain:
        try:
            ext = cert.extensions.get_extension_for_oid(_VOMS_EXTENSION)
        except (x509.ExtensionNotFound, ValueError):
            continue
        raw = ext.value.value if isinstance(ext.value, x509.UnrecognizedExtension) else b""
        try:
            return _voms_acs(raw), None
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError):
            return (), "its VOMS extension cannot be read (not attribute certificates)"
    return (), None


def _voms_acs(raw: bytes) -> tuple[VomsAttributes, ...]:
    """Parse a VOMS extension's value (asn1crypto: RFC 5755 attribute certificates)."""
    from asn1crypto import cms, core

    class _ACs(core.SequenceOf):  # type: ignore[misc]
        _child_spec = cms.AttributeCertificateV2

    class _ACSeq(core.SequenceOf):  # type: ignore[misc]
        _child_spec = _ACs

    out = []
    for acs in _ACSeq.load(raw, strict=True):
        for ac in acs:
            info = ac["ac_info"]
            period = info["att_cert_validity_period"].native
            names = info["issuer"].chosen["issuer_name"]
            issuer = next((_slash_name(n.chosen) for n in names if n.name == "directory_name"),
                          "")
            for attribute in info["attributes"]:
                if attribute["type"].dotted != _VOMS_FQANS:
                    continue
                for value in attribute["values"]:
                    syntax = cms.IetfAttrSyntax.load(value.dump()).native
                    authority = str((syntax["policy_authority"] or [""])[0])
                    vo, _, uri = authority.partition("://")
                    fqans = tuple(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                                  for v in syntax["values"])
                    out.append(VomsAttributes(vo, fqans, issuer, uri,
                                              _utc_time(period["not_before_time"]),
                                              _utc_time(period["not_after_time"])))
    return tuple(out)


def _utc_time(value: object) -> datetime:
    """An AC validity time as a tz-aware ``datetime``; ValueError for what asn1crypto gives a
    malformed one as (naive without a ``Z``, or its ``extended_datetime`` for year 0)."""
    if type(value) is not datetime or value.tzinfo is None:
        raise ValueError("VOMS attribute certificate validity is not a UTC time")
    return value


def _slash_name(name: object) -> str:
    """An asn1crypto ``x509.Name`` as ``format_dn`` prints a cryptography one."""
    rdns = [x509.RelativeDistinguishedName([
        x509.NameAttribute(ObjectIdentifier(attr["type"].dotted), str(attr["value"].native))
        for attr in rdn]) for rdn in name.chosen]  # type: ignore[attr-defined]
    return format_dn(x509.Name(rdns))


def validity(cert: x509.Certificate) -> tuple[datetime, datetime]:
    """``cert``'s not-before and not-after, timezone-aware (UTC) on every cryptography."""
    # The *_utc properties appeared in cryptography 42; the naive ones are UTC.
    before: datetime | None = getattr(cert, "not_valid_before_utc", None)
    after: datetime | None = getattr(cert, "not_valid_after_utc", None)
    if before is None or after is None:
        before = cert.not_valid_before.replace(tzinfo=timezone.utc)
        after = cert.not_valid_after.replace(tzinfo=timezone.utc)
    return before, after


def _read_proxy_file(path: Path, label: str) -> bytes:
    return read_credential_file(path, label, limit=_MAX_PROXY_BYTES, kind="proxy")


def _parse_certificates(data: bytes, label: str) -> list[x509.Certificate]:
    # Only the CERTIFICATE blocks: a broken key block must not read as a broken certificate.
    blocks = _CERT_BLOCK.findall(data)
    if not blocks:
        if _CERT_BEGIN in data:
            raise CredentialError(f"{label}: unparsable PEM certificate (no END line)")
        raise CredentialError(f"{label}: no certificate in file (expected PEM)")
    try:
        return x509.load_pem_x509_certificates(b"\n".join(blocks))
    except ValueError as e:
        raise CredentialError(f"{label}: unparsable PEM certificate") from e


def _check_private_key(data: bytes, cert: x509.Certificate, label: str) -> None:
    block = _KEY_BLOCK.search(data)
    if block is None:
        if _KEY_BEGIN.search(data):
            raise CredentialError(f"{label}: unparsable PEM private key")
        raise CredentialError(f"{label}: no private key in file")
    pem = block.group(0)
    if block.group(1).startswith(b"ENCRYPTED") or b"Proc-Type: 4,ENCRYPTED" in pem:
        raise CredentialError(f"{label}: private key is encrypted (a proxy key must not be)")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError as e:  # cryptography's "password was not given but key is encrypted"
        raise CredentialError(f"{label}: private key is encrypted (a proxy key must not be)") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CredentialError(f"{label}: unparsable PEM private key") from e
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    try:
        cert_public = cert.public_key().public_bytes(*spki)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CredentialError(f"{label}: unsupported public key in the first certificate") from e
    if key.public_key().public_bytes(*spki) != cert_public:
        raise CredentialError(f"{label}: private key does not match the first certificate")


def _identity(chain: list[x509.Certificate], kinds: list[str]) -> str:
    """The DN of the first certificate that is no proxy (``_check_chain`` saw there is one)."""
    return next(format_dn(cert.subject) for cert, kind in zip(chain, kinds)
                if kind == KIND_END_ENTITY)


def _check_chain(chain: list[x509.Certificate], kinds: list[str], label: str) -> None:
    """A proxy is sent with its chain down to the user certificate (servers trust only the
    CA that issued that one): each certificate issued by the next, and the user's among them.
    A file without it passed ``prestaged credentials`` (exit 0) and every server refused it."""
    for n, (cert, issuer) in enumerate(zip(chain, chain[1:]), 1):
        if kinds[n - 1] == KIND_END_ENTITY:
            return  # the user certificate: what follows (CA certificates) is not ours to judge
        if cert.issuer != issuer.subject:
            raise CredentialError(
                f"{label}: its chain is broken: certificate {n} was issued by "
                f"{format_dn(cert.issuer)}, not by the next in the file "
                f"({format_dn(issuer.subject)}): a proxy of a proxy without its middle? make it "
                "again from the full file")
    if KIND_END_ENTITY not in kinds:
        raise CredentialError(
            f"{label}: its chain is incomplete: the user certificate it was made from "
            f"({format_dn(chain[-1].issuer)}) is not in the file, and servers refuse a proxy "
            f"without it; {_RENEW_HINT}")


def inspect_proxy(path: Path, *, source: str | None = None) -> ProxyInfo:
    """Read a proxy (or certificate + key) PEM file and describe it.

    Raises :class:`CredentialError` with one line naming the file (and ``source``, e.g.
    ``"$X509_USER_PROXY"``, when given) if it is missing, unreadable, holds no certificate or
    no private key, has an encrypted key, a key that does not match the first certificate, or
    unparsable PEM. Expiry is not checked here: see :func:`check_lifetime`.
    """
    label = f"proxy {path}{_origin(source)}"
    data = _read_proxy_file(path, label)
    chain = _parse_certificates(data, label)
    _check_private_key(data, chain[0], label)
    try:
        kinds = [_cert_kind(cert) for cert in chain]
    except ValueError as e:  # duplicate or malformed extensions
        raise CredentialError(f"{label}: certificate with malformed extensions") from e
    if kinds[0] != KIND_END_ENTITY:
        _check_chain(chain, kinds, label)
    periods = [validity(cert) for cert in chain]
    voms, voms_error = _voms(chain)
    return ProxyInfo(
        path=path,
        subject=format_dn(chain[0].subject),
        identity=_identity(chain, kinds),
        issuer=format_dn(chain[0].issuer),
        kind=kinds[0],
        not_before=max(before for before, _ in periods),
        not_after=min(after for _, after in periods),
        chain_length=len(chain),
        voms=voms,
        voms_error=voms_error,
    )


def check_lifetime(info: ProxyInfo, min_lifetime: float, now: datetime | None = None) -> None:
    """Raise :class:`CredentialError` unless ``info`` is valid at ``now`` for ``min_lifetime`` s,
    its VOMS attributes too (a storage that maps by FQAN refuses a proxy whose attributes
    expired, however long the proxy itself lasts).

    ``min_lifetime`` is ``credentials.min_lifetime`` in seconds (0 only requires "not expired");
    ``now`` defaults to the current UTC time.
    """
    now = now if now is not None else _utcnow()
    label = f"proxy {info.path}"
    spans = [(label, info.not_before, info.not_after, _RENEW_HINT)]
    # An AC starts when its VOMS server says: allow that server's clock some skew, as VOMS
    # validators do.
    spans += [(f"{label}: its VOMS attributes ({v.vo}, {v.fqans[0] if v.fqans else 'no FQAN'})",
               v.not_before - VOMS_CLOCK_SKEW, v.not_after,
               f"run voms-proxy-init -voms {v.vo or '<vo>'}") for v in info.voms]
    minimum = format_timedelta(timedelta(seconds=min_lifetime))
    for what, not_before, not_after, hint in spans:
        if now >= not_after:
            raise CredentialError(f"{what}: expired at {_format_time(not_after)} ({hint})")
        if now < not_before:
            raise CredentialError(f"{what}: not valid before {_format_time(not_before)} (is the "
                                  "clock of this host right?)")
        left = not_after - now
        if left.total_seconds() < min_lifetime:
            raise CredentialError(f"{what}: {format_timedelta(left)} left, less than "
                                  f"credentials.min_lifetime ({minimum}); {hint}")


def warn_if_exposed(path: Path) -> bool:
    """Log a warning if group or others have any access to ``path``; return True if warned.

    Missing or unreadable files are not warned about (``inspect_proxy`` reports those).
    """
    mode = exposed_mode(path)
    if mode is None:
        return False
    logger.warning(
        "proxy %s is accessible to group/others (mode %04o); run: chmod 600 %s", path, mode, path
    )
    return True


# --------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------


def resolve_proxy_path(
    cli: Path | None,
    configured: Path | None,
    env: Mapping[str, str] | None = None,
    uid: int | None = None,
) -> tuple[Path, str]:
    """Pick the proxy file and say where the choice came from.

    Order: ``--proxy``, config ``credentials.proxy``, ``$X509_USER_PROXY`` (if non-empty),
    ``/tmp/x509up_u<uid>``. ``env`` defaults to ``os.environ`` and ``uid`` to the real uid.
    Returns ``(path, source)`` with source ``"--proxy"``, ``"credentials.proxy"``,
    ``"$X509_USER_PROXY"`` or ``"default /tmp/x509up_u<uid>"``.
    """
    environ = os.environ if env is None else env
    default = Path(f"/tmp/x509up_u{os.getuid() if uid is None else uid}")
    return _first(
        [(cli, "--proxy"), (configured, "credentials.proxy"),
         (environ.get("X509_USER_PROXY"), "$X509_USER_PROXY")],
        default,
    )


def _first(choices: list[tuple[Path | str | None, str]], default: Path) -> tuple[Path, str]:
    """The first set (non-empty) choice as ``(path, source)``, else the default location."""
    for value, source in choices:
        if value:
            return Path(value), source
    return default, f"default {default}"


def resolve_ca_dir(
    cli: Path | None,
    configured: Path | None,
    env: Mapping[str, str] | None = None,
) -> tuple[Path, str]:
    """Pick the trusted CA directory and say where the choice came from.

    Order: ``--ca-dir``, config ``credentials.ca_dir``, ``$X509_CERT_DIR`` (if non-empty),
    ``/etc/grid-security/certificates``. ``env`` defaults to ``os.environ``. Returns
    ``(path, source)`` like :func:`resolve_proxy_path`.
    """
    environ = os.environ if env is None else env
    return _first(
        [(cli, "--ca-dir"), (configured, "credentials.ca_dir"),
         (environ.get("X509_CERT_DIR"), "$X509_CERT_DIR")],
        DEFAULT_CA_DIR,
    )


def check_ca_dir(path: Path, source: str) -> None:
    """Raise :class:`CredentialError` unless ``path`` is a usable OpenSSL hashed CA directory.

    Usable means a directory holding at least one ``<subject hash>.<n>`` file, which is all an
    OpenSSL ``capath`` lookup can find; a directory of ``*.pem``/``*.crt`` files without hash
    names gets an "run openssl rehash" hint.
    """
    label = f"CA directory {path}{_origin(source)}"
    try:
        names = [entry.name for entry in path.iterdir()]
    except FileNotFoundError as e:
        raise CredentialError(
            f"{label}: no such directory; install the grid CA certificates"
            " or set --ca-dir or $X509_CERT_DIR"
        ) from e
    except NotADirectoryError as e:
        raise CredentialError(f"{label}: not a directory") from e
    except PermissionError as e:
        raise CredentialError(f"{label}: permission denied (cannot list it)") from e
    except OSError as e:
        raise CredentialError(f"{label}: cannot list: {e.strerror or type(e).__name__}") from e
    if any(_HASHED_CERT.match(name) for name in names):
        return
    if any(name.endswith((".pem", ".crt")) for name in names):
        raise CredentialError(
            f"{label}: has *.pem/*.crt files but no hashed <hash>.0 names;"
            f" run: openssl rehash {path}"
        )
    raise CredentialError(f"{label}: contains no CA certificates (<hash>.0, *.pem or *.crt)")


# --------------------------------------------------------------------------------------------
# Putting it together
# --------------------------------------------------------------------------------------------


def _no_password() -> bytes:
    # Given to load_cert_chain so that an encrypted key fails instead of prompting on a tty.
    return b""


@dataclass(frozen=True)
class Credentials:
    """What requests present: the checked proxy (client certificate), the bearer token (an
    ``Authorization`` header, re-read when its file is renewed), or both; and the CA directory
    to verify servers against. At least one of ``proxy`` and ``token`` is set."""

    proxy: Optional[ProxyInfo]
    ca_dir: Path
    token: Optional[TokenSource] = None

    def hint(self) -> str:
        """Names the credentials in messages that blame them: ``proxy PATH (IDENTITY)``, the
        token's issuer, subject and scopes (never its text), or both."""
        parts = []
        if self.token is not None:
            parts.append(self.token.info.describe())
        if self.proxy is not None:
            legacy = f"; {LEGACY_PROXY_HINT}" if self.proxy.kind == KIND_LEGACY_PROXY else ""
            parts.append(f"proxy {self.proxy.path} ({self.proxy.identity}{legacy})")
        return " and ".join(parts)

    def ssl_context(self) -> ssl.SSLContext:
        """Build a client SSL context trusting ``ca_dir`` and presenting the proxy (if any).

        Raises :class:`CredentialError` naming the file if OpenSSL refuses to load either.
        """
        try:
            ctx = client_ssl_context(capath=str(self.ca_dir))
        except (ssl.SSLError, OSError) as e:
            raise CredentialError(
                f"CA directory {self.ca_dir}: OpenSSL cannot load it ({_ssl_reason(e)})"
            ) from e
        if self.proxy is None:
            return ctx
        try:
            ctx.load_cert_chain(self.proxy.path, password=_no_password)
        except (ssl.SSLError, OSError) as e:
            raise CredentialError(
                f"proxy {self.proxy.path}: OpenSSL cannot load it ({_ssl_reason(e)})"
            ) from e
        return ctx


def _ssl_reason(error: OSError) -> str:
    # SSLError.reason is an OpenSSL reason code such as "KEY_VALUES_MISMATCH": never contents.
    if isinstance(error, ssl.SSLError) and error.reason:
        return str(error.reason)
    return _SSL_SOURCE_LINE.sub("", error.strerror or type(error).__name__)


def _inspect_resolved(path: Path, source: str) -> ProxyInfo:
    if source.startswith("default") and not path.exists():
        raise CredentialError(
            f"no X.509 proxy: {path} (default location) does not exist;"
            " set --proxy or $X509_USER_PROXY, or run voms-proxy-init"
        )
    return inspect_proxy(path, source=source)


METHODS = ("auto", "token", "proxy")


def _load_token(cli: Optional[Path], configured: Optional[Path], method: str,
                min_lifetime: float, env: Optional[Mapping[str, str]], uid: Optional[int],
                now: Optional[datetime], empty: list[Path]) -> Optional[TokenSource]:
    """The token ``method`` allows, found and checked; None when auto finds none. Empty token
    files skipped are added to ``empty``."""
    if method == "proxy":
        return None
    found = find_token(cli, configured, env, uid, empty)
    if found is None:
        if method == "token":
            places = describe_locations(token_locations(cli, configured, env, uid))
            raise CredentialError(f"no bearer token (credentials.method = token): "
                                  f"{_empty_note(empty)}looked at {places}; run htgettoken or "
                                  "set --token-file")
        return None
    check_token(found.inspect(), min_lifetime, now)
    if found.path is not None:
        warn_if_token_exposed(found.path)
    return TokenSource(found)


def _empty_note(empty: list[Path]) -> str:
    """``X is empty; `` for the token files found empty, to start a "no token" message."""
    if not empty:
        return ""
    return f"{' and '.join(map(str, empty))} {'is' if len(empty) == 1 else 'are'} empty; "


def _load_proxy(cli: Optional[Path], configured: Optional[Path], method: str,
                min_lifetime: float, have_token: bool, env: Optional[Mapping[str, str]],
                uid: Optional[int], now: Optional[datetime]) -> Optional[ProxyInfo]:
    """The proxy ``method`` allows, found and checked; None when auto finds none, or finds an
    unusable one in the default location while a token is there (warned)."""
    if method == "token":
        return None
    path, source = resolve_proxy_path(cli, configured, env, uid)
    default = source.startswith("default")
    if method == "auto" and default and not path.exists():
        return None
    try:
        info = _inspect_resolved(path, source)
        check_lifetime(info, min_lifetime, now)
    except CredentialError as e:
        if method == "auto" and default and have_token:
            # A stale proxy left in /tmp must not break a run the token can do (a server checks
            # a presented certificate before it reads the token); one named explicitly must.
            logger.warning("not presenting the proxy: %s; using the bearer token only", e)
            return None
        raise
    warn_if_exposed(path)
    return info


def load_credentials(
    *,
    proxy: Optional[Path],
    proxy_configured: Optional[Path],
    ca_dir: Optional[Path],
    ca_dir_configured: Optional[Path],
    min_lifetime: float,
    method: str = "proxy",
    token_file: Optional[Path] = None,
    token_configured: Optional[Path] = None,
    token_min_lifetime: float = 60.0,
    env: Optional[Mapping[str, str]] = None,
    uid: Optional[int] = None,
    now: Optional[datetime] = None,
) -> Credentials:
    """Find, inspect and check the credentials ``method`` asks for, and the CA directory;
    prove OpenSSL can load them.

    ``method``: ``auto`` (a token when one is found, the proxy when one is found, both when
    both are), ``token`` or ``proxy`` (only that one, which must be there). ``proxy``,
    ``token_file`` and ``ca_dir`` come from the command line and ``*_configured`` from the
    config file; see :func:`resolve_proxy_path`, :func:`prestaged.tokens.token_locations` and
    :func:`resolve_ca_dir` for the fallbacks. The proxy must stay valid for ``min_lifetime``
    and the token for ``token_min_lifetime`` seconds after ``now``. A proxy readable by
    others is only warned about. Raises :class:`CredentialError` (exit code 3) with one line,
    listing every place looked at when nothing is found.
    """
    if method not in METHODS:
        raise CredentialError(f"credentials.method: expected one of {', '.join(METHODS)}, "
                              f"got {method!r}")
    empty: list[Path] = []
    token = _load_token(token_file, token_configured, method, token_min_lifetime, env, uid,
                        now, empty)
    info = _load_proxy(proxy, proxy_configured, method, min_lifetime, token is not None, env,
                       uid, now)
    if token is None and info is None:
        places = describe_locations(token_locations(token_file, token_configured, env, uid))
        proxy_path, _ = resolve_proxy_path(proxy, proxy_configured, env, uid)
        raise CredentialError(
            f"no credentials: no bearer token ({_empty_note(empty)}looked at {places}) and no "
            f"X.509 proxy (looked at {proxy_path}); run htgettoken or voms-proxy-init, or set "
            "--token-file or --proxy")
    ca_path, ca_source = resolve_ca_dir(ca_dir, ca_dir_configured, env)
    check_ca_dir(ca_path, ca_source)
    credentials = Credentials(proxy=info, ca_dir=ca_path, token=token)
    credentials.ssl_context()
    if token is None and empty:
        logger.warning("token %s: skipped, and no other bearer token found; using the proxy "
                       "alone", _empty_note(empty).rstrip("; "))
    if info is not None and info.kind == KIND_LEGACY_PROXY:
        logger.warning("proxy %s: %s", info.path, LEGACY_PROXY_HINT)
    if info is not None:
        roles = "".join(f" as {v.fqans[0]}" for v in info.voms[:1] if v.fqans)
        logger.info("using %s %s of %s%s, %s left", info.kind, info.path, info.identity, roles,
                    format_timedelta(info.time_left(now)))
    if token is not None:
        t = token.info
        logger.info("using %s, %s left", t.describe(), format_timedelta(t.time_left(now)))
    logger.info("CA directory %s (%s)", ca_path, ca_source)
    return credentials
