"""The shared vocabulary: what a file is, what one touch gave, what happened to a file, and
what text about it may be kept.

Every layer speaks these types; this module imports nothing of prestaged and does no I/O, so
persistence (``state``), catalogs and storage clients can use them without importing the
engine or each other.

Error text comes from servers (reason phrases) and libraries (exception messages, which often
quote the URL). Before it is kept (an ``Attempt``, then an ``Outcome``, the state store, the
report) it goes through ``error_text``: userinfo redacted, whitespace folded, at most
``ERROR_TEXT_MAX`` characters. ``redact`` is the one helper for any URL put into text;
``redacted_url`` shows a database URL (PostgreSQL state) with only its password hidden.
"""

from __future__ import annotations

import base64
import enum
import functools
import re
from dataclasses import dataclass
from typing import Optional

__all__ = [
    "ERROR_TEXT_MAX",
    "Attempt",
    "Failure",
    "FileRef",
    "Outcome",
    "Result",
    "TapeInfo",
    "classify_status",
    "error_text",
    "hide_secret",
    "printable",
    "printable_url",
    "redact",
    "redacted_url",
    "usable_origin",
]

ERROR_TEXT_MAX = 200
"""Characters of error text kept per attempt (a reason phrase may be megabytes long)."""

# scheme://userinfo@ up to the last "@" before the first "/" (or blank): a password holding an
# unescaped "@" (``https://u:p@ss@host/``) is redacted whole, as urlsplit and yarl read it, and
# so is one holding an unescaped "?" or "#". One holding a "/" reads as ``user:port/path``
# with a port that is no number (an invalid URL, still listed by someone): then up to the
# first "@".
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)(?:[^/\s@]*(?:@[^/\s@]*)*"
                       r"|[^/\s@:\[]*:(?=[^/\s@]*[^\d/\s@])[^\s@]*)@")


def host_start(url: str) -> int:
    """Where the host of ``url`` (``scheme://...``) starts: after its userinfo as ``redact``
    reads it, else right after ``://`` (-1 + 3 = 2 without a scheme)."""
    if "@" in url:
        match = _USERINFO.match(url)
        if match is not None:
            return match.end()
    return url.find("://") + 3


# Query parameters that carry a secret in storage URLs: a password, a bearer token or macaroon
# (XRootD's and dCache's ``authz=``), a presigned URL's signature and credentials (S3, GCS).
# Also in a fragment (``#access_token=``, OAuth's implicit flow) and where a server's words
# quote one without its URL (``Missing authz=T``): after a blank or at the start.
_SECRET_PARAMETER = re.compile(
    r"((?:[?&;#](?:password|passwd|pwd|token|access_token|bearer_token|authz|sig"
    r"|signature|authorization|x-amz-signature|x-amz-credential|x-amz-security-token"
    r"|x-goog-signature|x-goog-credential)"
    # After a blank only the unmistakable ones: "PWD=/home/u" in an env dump is no secret.
    r"|(?:^|(?<=\s))(?:password|passwd|token|access_token|bearer_token|authz))=)[^&#;\s]*",
    re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` (a URL, or text quoting URLs) with every URL's userinfo, and the value of every
    query parameter that carries a secret (``password``, ``token``, ``authz``, a signature...),
    replaced by ``***``: ``https://user:pw@host/f?authz=T`` -> ``https://***@host/f?authz=***``."""
    if "@" in text:  # the common case (neither) costs no regex
        text = _USERINFO.sub(r"\1***@", text)
    if "=" in text:
        text = _SECRET_PARAMETER.sub(r"\1***", text)
    return text


@functools.lru_cache(maxsize=4096)
def usable_origin(url: str) -> bool:
    """Whether a request can go to ``url``'s origin: it parses, has a host, and its port, if
    it names one, is from 1 to 65535. Not so for a typo in a list (``:99999``, ``https:///x``)
    or a discovery document's ``uri``: files at such a door are not asked their locality, each
    fails alone when touched ("bad URL: ..."). Called per door or per setting, not per file
    (hence the cache)."""
    from yarl import URL

    try:
        parsed = URL(url)
        port = parsed.explicit_port
        if not parsed.raw_host or not (port is None or 0 < port < 65536):
            return False
        # A label over 63 characters (or an empty one) is no host name: the resolver's IDNA
        # encoding raises UnicodeError, which once crashed a whole run.
        parsed.raw_host.encode("idna")
        return True
    except ValueError:  # UnicodeError too
        return False


_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
_QUERY_PASSWORD = re.compile(r"((?:^|&)(?:ssl)?password=)[^&#]*", re.IGNORECASE)
_CONNINFO_PASSWORD = re.compile(r"(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|\S*)",
                                re.IGNORECASE)


def redacted_url(url: str) -> str:
    """``url`` fit to show: the password of its userinfo and any ``password=``,
    ``sslpassword=`` or other secret parameter (``token=``, ``authz=``... as ``redact`` knows
    them) replaced by ``***``; the user, hosts, database and other parameters kept (an
    operator needs them to see which database and role were meant).

    ``postgresql://app:pw@db/state?sslmode=require`` -> ``postgresql://app:***@db/state?...``.
    Text that is no URL (a ``key=value`` connection string) has its ``password=`` hidden.
    """
    scheme = _URL_SCHEME.match(url)
    if scheme is None:
        return _CONNINFO_PASSWORD.sub(r"\1***", url)
    start = scheme.end()
    # The userinfo may end at the last "@" before the query, or before the first "/" (libpq's
    # reading, where a password may hold an unescaped "?"): hidden up to the later of the two,
    # so an unescaped "@", "/" or "?" in a password never shows (redact hides the user too,
    # which an operator needs).
    at = max(url.rfind("@", start, end if end >= 0 else len(url))
             for end in (url.find("?", start), url.find("/", start)))
    if at >= 0:
        user, colon, _ = url[start:at].partition(":")
        if colon:
            url = f"{url[:start]}{user}:***{url[at:]}"
    query = url.find("?", start if at < 0 else url.find("@", start))
    if query < 0:
        return url
    url = url[: query + 1] + _QUERY_PASSWORD.sub(r"\1***", url[query + 1:])
    return _SECRET_PARAMETER.sub(r"\1***", url) if "=" in url else url


_SECRETS: dict[str, None] = {}
"""The secrets ``scrub`` hides, newest last (a few: a daemon renews its token every hour)."""
_SECRETS_KEPT = 16
# A JWT, whole or its start: base64url of '{"' then more, up to three dot-separated parts.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}(?:\.[A-Za-z0-9_-]*){0,2}")


_PIECE = 16
"""The shortest piece of a secret ``scrub`` hides on its own (a server quoting a cut one)."""
_RUN = re.compile(f"[A-Za-z0-9_-]{{{_PIECE},}}")


class _Pieces:
    """Every ``_PIECE``-character window of the secrets: a run of text whose start is not one
    is no piece of a secret, known without searching them. Replaced whole on each change (a
    few thousand strings, once an hour): a thread scrubbing meanwhile sees the old or the new
    set, never a half-built one."""

    starts: frozenset[str] = frozenset()


def hide_secret(value: str) -> None:
    """Have ``scrub`` hide ``value`` (a bearer token, a password) wherever a server quotes it
    back: a reason phrase, an error body. A JWT's signature is hidden on its own too, and so is
    any run of ``_PIECE`` or more base64url characters cut from it."""
    value = value.strip()
    if len(value) < 8:  # too short to tell from ordinary words
        return
    parts = [value]
    if value.count(".") == 2 and len(value.rpartition(".")[2]) >= 16:
        parts.append(value.rpartition(".")[2])
    for part in parts:
        _SECRETS.pop(part, None)
        _SECRETS[part] = None
    while len(_SECRETS) > _SECRETS_KEPT:
        _SECRETS.pop(next(iter(_SECRETS)), None)  # pop: another thread may evict it too
    _Pieces.starts = frozenset(secret[i:i + _PIECE] for secret in list(_SECRETS)
                               for i in range(len(secret) - _PIECE + 1))


def _piece(match: re.Match[str]) -> str:
    run = match.group(0)
    if run[:_PIECE] in _Pieces.starts and any(run in secret for secret in list(_SECRETS)):
        return "***"
    return run


# A bearer credential as an HTTP header or a server's words write it: ``Bearer <token68>``
# of 16 characters or more with a digit in it (a JWT, a macaroon); not prose ("bearer
# token", "Bearer tokens/credentials", a path) nor a challenge's parameters ("Bearer
# scope=storage.read:/dune": a token68 has "=" only at its end).
_BEARER = re.compile(r"(\bbearer\s+)(?=[A-Za-z0-9._~+/-]*[0-9])[A-Za-z0-9._~+/-]{16,}=*"
                     r"(?![A-Za-z0-9._~+/=-])", re.IGNORECASE)


# HTTP Basic credentials as a header or a server's words write them: ``Basic <base64 of
# user:password>``. aiohttp sends a URL's ``user:password@`` (a file's, or a redirect's
# Location) that way, and a storage quoting the request's headers in its refusal put them in
# the report and the state. Only a token that decodes to something holding a ":" is hidden:
# not prose ("Basic auth", "basic authentication") nor a challenge ("Basic realm=...").
_BASIC = re.compile(r"(\bbasic\s+)([A-Za-z0-9+/]{4,}={0,2})(?![A-Za-z0-9+/=._~-])",
                    re.IGNORECASE)


def _basic(match: re.Match[str]) -> str:
    token = match.group(2)
    try:  # a server may quote it without its padding
        decoded = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
    except ValueError:  # binascii.Error: not base64 (a word, a wrong length)
        return match.group(0)
    return match.group(1) + "***" if b":" in decoded else match.group(0)


# A PEM private key (a proxy file's, a host key's) a command or a server prints: the block,
# or what of it a tail kept (its start cut off: up to its END line).
_PEM_KEY = re.compile(r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?"
                      r"(?:-----END \1PRIVATE KEY-----|\Z)", re.DOTALL)
_PEM_KEY_END = re.compile(r"\A.*?(-----END [A-Z0-9 ]*PRIVATE KEY-----)", re.DOTALL)


def _pem_keys(text: str) -> str:
    text = _PEM_KEY.sub(r"-----BEGIN \1PRIVATE KEY-----***-----END \1PRIVATE KEY-----", text)
    if text.count("PRIVATE KEY-----") % 2:  # an END without its BEGIN: the start was cut
        text = _PEM_KEY_END.sub(r"***\1", text, count=1)
    return text


def scrub(text: str) -> str:
    """``text`` (a server's words, an error, a log line) without the secrets ``hide_secret``
    was given (nor a run of 16 or more base64url characters cut from one: a server quoting
    the start of a signature), anything shaped like a JWT (or its first part), nor what
    follows ``Bearer `` or (a ``user:password`` in base64) ``Basic ``, nor a PEM private
    key's body, each replaced by ``***``."""
    if "eyJ" in text:
        text = _JWT.sub("***", text)
    if "earer" in text or "EARER" in text:
        text = _BEARER.sub(r"\1***", text)
    if "asic" in text or "ASIC" in text:
        text = _BASIC.sub(_basic, text)
    if "PRIVATE KEY-----" in text:
        text = _pem_keys(text)
    for secret in list(_SECRETS):
        if secret in text:
            text = text.replace(secret, "***")
    if _Pieces.starts:
        text = _RUN.sub(_piece, text)
    return text


_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7f, 0xa0)]}


def printable(text: str) -> str:
    """``text`` with control characters (C0, DEL, C1) written as ``\\xNN``: a server's bytes
    quoted in an error cannot move a terminal's cursor, colour it or break the line."""
    return text.translate(_CONTROLS)


_URL_CONTROLS = {c: "".join(f"%{b:02X}" for b in chr(c).encode()) for c in _CONTROLS}


def printable_url(url: str) -> str:
    """``url`` with control characters percent-encoded (ESC as ``%1B``, UTF-8 for C1), as a
    client sends them: the same URL to a server, and it cannot move a terminal's cursor."""
    return url.translate(_URL_CONTROLS)


def has_control(text: str) -> bool:
    """Whether ``text`` holds a control character (C0 such as a line break or NUL, DEL, C1)."""
    return any(ord(c) in _CONTROLS for c in text)


def error_text(text: str) -> str:
    """``text`` fit to keep: credentials redacted (and ``scrub``bed), whitespace runs folded to
    one space, cut to ``ERROR_TEXT_MAX`` characters (an ellipsis marks the cut)."""
    # Redact first: a cut could otherwise leave a password's head without its "@".
    text = printable(" ".join(scrub(redact(text)).split()))
    if len(text) <= ERROR_TEXT_MAX:
        return text
    return text[: ERROR_TEXT_MAX - 1] + "\u2026"


@dataclass(frozen=True)
class FileRef:
    """One file of a definition: its catalog name, the URL to touch and its size if known."""

    name: str
    url: str
    size: Optional[int] = None


class Result(str, enum.Enum):
    """Outcome class of one file (persisted: values are stable strings)."""

    WARM = "warm"
    EMPTY = "empty"
    MISSING = "missing"
    DENIED = "denied"
    FAILED = "failed"
    SKIPPED_FRESH = "skipped_fresh"

    def __str__(self) -> str:
        return self.value


class Failure(str, enum.Enum):
    """Why an attempt did not get an HTTP answer we can classify (drives retry and breakers)."""

    TIMEOUT = "timeout"
    RESET = "reset"  # connection dropped/reset mid-request
    UNREACHABLE = "unreachable"  # could not connect at all
    TLS = "tls"  # the handshake failed or the server refused our certificate: not retried
    # We refused the server's certificate (its name does not match the URL's host, unknown CA,
    # expired): a wrong URL or CA directory, not a problem of our credentials. Not retried.
    UNTRUSTED = "untrusted"
    PROTOCOL = "protocol"  # malformed answer, bad redirect, bad URL: not retried
    # Nothing was sent: our own credential cannot be used now (the bearer token expired
    # during the run). Not retried; the engine stops the run on the first one (exit 3).
    CREDENTIAL = "credential"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Attempt:
    """What one try at one URL gave: an HTTP status, or a ``Failure`` and its text."""

    status: Optional[int] = None
    data: int = 0
    """Bytes of file data read (<= n)."""
    failure: Optional[Failure] = None
    error: str = ""
    retry_after: Optional[float] = None
    """Seconds the server asked us to wait (Retry-After), if any."""
    size: Optional[int] = None
    """File size when the answer tells it (Content-Range total, or a 200's Content-Length)."""
    auth_error: str = ""
    """What a 401/403 said about our token (its ``WWW-Authenticate: Bearer`` error and
    description, ``net.bearer_error``: bounded, sanitised); empty when it said nothing."""

    def __post_init__(self) -> None:
        # The one place error text is made fit to keep, whoever built the attempt (both toucher
        # paths, the engine): a server's 5 MB reason phrase or a library's message quoting
        # ``https://user:pw@host/`` must not reach the outcome, the state store or the report.
        if self.error:
            object.__setattr__(self, "error", error_text(self.error))

    @property
    def result(self) -> Optional[Result]:
        """Outcome class of a final answer; None for failures and retryable statuses."""
        if self.failure is not None or self.status is None:
            return None
        if self.status in (200, 206) and self.size == 0:
            return Result.EMPTY
        return classify_status(self.status)


def classify_status(status: int) -> Optional[Result]:
    """Map a final HTTP status to a ``Result``; None means retryable (5xx, 429, 408)."""
    if status in (200, 206):
        return Result.WARM
    if status == 416:
        return Result.EMPTY
    if status in (404, 410):
        return Result.MISSING
    if status in (401, 403):
        return Result.DENIED
    if status >= 500 or status in (408, 429):
        return None
    return Result.FAILED


@dataclass(frozen=True)
class TapeInfo:
    """What the tape-aware path learned about one file (times are ``time.time()`` seconds).

    ``locality`` is the Tape REST ``archiveinfo`` answer (``DISK``, ``TAPE``,
    ``DISK_AND_TAPE``, ``LOST``, ``UNAVAILABLE``, ``NONE``); for a file prestaged staged, the
    stage ``request`` id and the Tape REST endpoint ``uri`` that holds its pin, when the server
    accepted that request (``requested_at``) and the pin lifetime in seconds it asked for
    (``lifetime``), when the file reached disk (``staged_at``) and until when it is pinned
    (``pinned_until``: landing plus the lifetime, known only once landed), or when the request
    ended without bringing it to disk (``ended_at``).
    """

    locality: str
    request: Optional[str] = None
    uri: Optional[str] = None
    staged_at: Optional[float] = None
    pinned_until: Optional[float] = None
    requested_at: Optional[float] = None
    lifetime: Optional[float] = None
    ended_at: Optional[float] = None


@dataclass(frozen=True)
class Outcome:
    """What happened to one file (error text never contains secrets; ``url`` is the file's
    identity, as the catalog gave it: only ``Tally.failures`` holds it redacted)."""

    url: str
    name: str
    result: Result
    status: Optional[int]
    bytes: int
    attempts: int
    elapsed: float
    """Seconds from the first try to the final answer."""
    error: str = ""
    tape: Optional[TapeInfo] = None
    """Locality and staging, when the storage told them (``storage.stage``)."""

    @property
    def staged(self) -> bool:
        """The file came from tape: prestaged staged it, then touched it."""
        return self.tape is not None and self.tape.staged_at is not None
