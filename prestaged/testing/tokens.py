"""A WLCG token issuer for tests: ES256 keys, tokens minted with ``cryptography``, its JWKS and
OpenID discovery document served over HTTPS on 127.0.0.1, and the check a storage makes.

``TokenIssuer`` mints tokens with the WLCG profile's claims (iss, sub, aud, scope, wlcg.ver, iat
a few seconds in the past, nbf, exp, jti; header kid and typ) and verifies them as a relying
party does (signature, exp, nbf, aud, and the scope against the path under the issuer's base
path). ``IssuerServer`` serves ``{issuer}/.well-known/openid-configuration`` and its
``jwks_uri`` with the test CA's host certificate. The emulators (test storage, SAM web, dCache)
take a ``BearerCheck`` to accept tokens; the real XRootD gets the JWKS through the key cache of
scitokens-cpp (``prestaged.testing.xrootd``).
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

__all__ = ["GRANTED", "INSUFFICIENT_SCOPE", "INVALID", "NO_TOKEN", "BearerCheck",
           "IssuerServer", "TokenIssuer", "TokenRejected", "Verdict", "scope_allows"]

WLCG_ANY = "https://wlcg.cern.ch/jwt/v1/any"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_b64(n: int) -> str:
    return _b64(n.to_bytes(32, "big"))


class TokenRejected(Exception):
    """Why a relying party refuses a token (``str()``: a short reason, never the token)."""


class TokenIssuer:
    """An issuer at ``url`` (e.g. ``https://localhost:PORT/issuer``; set by ``IssuerServer``)
    with one ES256 key ``kid``."""

    def __init__(self, url: str = "https://localhost/issuer", *, kid: str = "prestaged-test"
                 ) -> None:
        self.url = url
        self.kid = kid
        self._key: Optional[ec.EllipticCurvePrivateKey] = ec.generate_private_key(ec.SECP256R1())
        self._public = self._key.public_key()

    @classmethod
    def from_jwks(cls, url: str, jwks: Mapping[str, Any]) -> TokenIssuer:
        """A verify-only issuer (``mint`` raises) at ``url`` with the first EC P-256 key of
        ``jwks``, as ``jwks()`` publishes it: what an emulator in another process needs."""
        try:
            jwk = next(k for k in jwks["keys"] if k.get("kty") == "EC" and k.get("crv") == "P-256")
            public = ec.EllipticCurvePublicNumbers(
                int.from_bytes(_unb64(jwk["x"]), "big"), int.from_bytes(_unb64(jwk["y"]), "big"),
                ec.SECP256R1()).public_key()
        except (KeyError, TypeError, StopIteration, ValueError) as e:
            raise ValueError("jwks has no EC P-256 key with kid, x and y") from e
        issuer = cls(url, kid=str(jwk["kid"]))
        issuer._key, issuer._public = None, public
        return issuer

    # --- minting -------------------------------------------------------------------------

    def mint(self, scope: str = "storage.read:/", *, audience: Any = WLCG_ANY,
             subject: str = "prestaged-test-user", lifetime: float = 3600.0,
             not_before: Optional[float] = None, issued_ago: float = 5.0,
             issuer: Optional[str] = None, kid: Optional[str] = None,
             groups: Optional[list[str]] = None, foreign_key: bool = False,
             now: Optional[float] = None, **claims: Any) -> str:
        """A signed token. ``lifetime`` seconds from ``now`` (negative: already expired);
        ``not_before`` seconds from now (default: the issue time); ``issued_ago``: iat this
        many seconds in the past (servers allow no clock skew). ``foreign_key`` signs with a
        key the JWKS does not have. Extra ``claims`` are added as given."""
        now = time.time() if now is None else now
        iat = int(now - issued_ago)
        payload: dict[str, Any] = {
            "iss": issuer if issuer is not None else self.url,
            "sub": subject,
            "aud": audience,
            "scope": scope,
            "wlcg.ver": "1.0",
            "iat": iat,
            "nbf": int(now + not_before) if not_before is not None else iat,
            "exp": int(now + lifetime),
            "jti": secrets.token_hex(16),
        }
        if groups is not None:
            payload["wlcg.groups"] = groups
        payload.update(claims)
        header = {"alg": "ES256", "typ": "JWT", "kid": kid if kid is not None else self.kid}
        signing = (_b64(json.dumps(header, separators=(",", ":")).encode()) + "."
                   + _b64(json.dumps(payload, separators=(",", ":")).encode()))
        if self._key is None:
            raise RuntimeError("a verify-only issuer (from_jwks) cannot mint tokens")
        key = ec.generate_private_key(ec.SECP256R1()) if foreign_key else self._key
        der = key.sign(signing.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return signing + "." + _b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    # --- publishing ----------------------------------------------------------------------

    def jwks(self) -> dict[str, Any]:
        """The issuer's JSON Web Key Set (public key only)."""
        numbers = self._public.public_numbers()
        return {"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig",
                          "kid": self.kid, "x": _int_b64(numbers.x), "y": _int_b64(numbers.y)}]}

    def openid_configuration(self) -> dict[str, Any]:
        """The OpenID discovery document: ``issuer`` and ``jwks_uri``."""
        return {"issuer": self.url, "jwks_uri": f"{self.url}/jwks",
                "token_endpoint": f"{self.url}/token",
                "id_token_signing_alg_values_supported": ["ES256"]}

    # --- relying party -------------------------------------------------------------------

    def verify(self, token: str, *, audiences: Collection[str],
               now: Optional[float] = None) -> dict[str, Any]:
        """The claims of ``token`` if it is ours, signed, in its lifetime and for one of
        ``audiences`` (or the WLCG "any" audience); else ``TokenRejected``."""
        parts = token.split(".")
        if len(parts) != 3:
            raise TokenRejected("not a JWT")
        try:
            header = json.loads(_unb64(parts[0]))
            claims = json.loads(_unb64(parts[1]))
            raw = _unb64(parts[2])
        except ValueError as e:
            raise TokenRejected("malformed token") from e
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise TokenRejected("malformed token")
        if header.get("alg") != "ES256" or header.get("kid") != self.kid:
            raise TokenRejected("unknown signing key")
        if claims.get("iss") != self.url:
            raise TokenRejected("unknown issuer")
        if len(raw) != 64:
            raise TokenRejected("bad signature")
        signature = encode_dss_signature(int.from_bytes(raw[:32], "big"),
                                         int.from_bytes(raw[32:], "big"))
        try:
            self._public.verify(signature, (parts[0] + "." + parts[1]).encode(),
                                          ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as e:
            raise TokenRejected("bad signature") from e
        now = time.time() if now is None else now
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if not isinstance(exp, (int, float)) or now >= exp:
            raise TokenRejected("token expired")
        if isinstance(nbf, (int, float)) and now < nbf:
            raise TokenRejected("token not yet valid")
        aud = claims.get("aud")
        given = {aud} if isinstance(aud, str) else set(aud) if isinstance(aud, list) else set()
        if WLCG_ANY not in given and not given & set(audiences):
            raise TokenRejected("wrong audience")
        return claims


def scope_allows(claims: Mapping[str, Any], verb: str, path: str, base_path: str = "/") -> bool:
    """Whether ``claims``' scope grants ``verb`` (``storage.read``...) on namespace ``path``,
    scope paths being relative to ``base_path`` (as a storage configured for the issuer sees
    them)."""
    scope = claims.get("scope", "")
    if not isinstance(scope, str):
        return False
    base = base_path.rstrip("/")
    for item in scope.split():
        name, _, spath = item.partition(":")
        if name != verb:
            continue
        root = (base + "/" + spath.strip("/")).rstrip("/") or "/"
        if root in ("/", path) or path.startswith(root + "/"):
            return True
    return False


GRANTED = "granted"
NO_TOKEN = "no token"
INVALID = "invalid"
INSUFFICIENT_SCOPE = "insufficient scope"


@dataclass(frozen=True)
class Verdict:
    """What ``BearerCheck.authorize`` decided about one request: ``kind`` is ``GRANTED``,
    ``NO_TOKEN`` (no ``Authorization: Bearer``), ``INVALID`` (signature, issuer, lifetime or
    audience) or ``INSUFFICIENT_SCOPE`` (a good token that does not cover the request);
    ``reason`` says why it was refused (None when granted; never token text). ``subject`` and
    ``claims`` are the verified token's (None without one): use them for further per-path
    decisions with ``BearerCheck.allows``, never keep them."""

    kind: str
    reason: Optional[str] = None
    subject: Optional[str] = None
    claims: Optional[Mapping[str, Any]] = field(default=None, repr=False, compare=False)

    @property
    def granted(self) -> bool:
        """True when the request may go on."""
        return self.kind == GRANTED


@dataclass
class BearerCheck:
    """What a storage emulator checks of ``Authorization: Bearer``: ``issuer``'s signature,
    lifetime, one of ``audiences``, and the scope against the path under ``base_path``.
    ``seen`` counts requests that carried a token; ``accepted_jti`` keeps the distinct ``jti``
    values of granted requests (to prove renewals reach the server without keeping tokens);
    ``refusals`` counts the reasons of refused tokens (``"token expired"``...)."""

    issuer: TokenIssuer
    audiences: Collection[str]
    base_path: str = "/"
    seen: int = 0
    accepted_jti: list[str] = field(default_factory=list)
    refusals: Counter[str] = field(default_factory=Counter)

    def check(self, authorization: Optional[str], verb: str, path: str) -> Optional[str]:
        """None when ``authorization`` grants ``verb`` on ``path``; else why not. A request
        without a bearer token gives ``"no token"``."""
        return self.authorize(authorization, (verb,), (path,)).reason

    def authorize(self, authorization: Optional[str], verbs: Collection[str],
                  paths: Iterable[str] = ()) -> Verdict:
        """Whether ``authorization`` (the header's value, or None) carries a valid token whose
        scope grants, on every one of ``paths``, at least one of ``verbs`` (``storage.read``
        ...). No ``paths``: a valid token is enough (authentication only; per-path decisions
        then go through ``allows``)."""
        if not authorization or not authorization.startswith("Bearer "):
            return Verdict(NO_TOKEN, NO_TOKEN)
        self.seen += 1
        try:
            claims = self.issuer.verify(authorization[7:].strip(), audiences=self.audiences)
        except TokenRejected as e:
            return self._refuse(Verdict(INVALID, str(e)))
        subject = str(claims.get("sub", ""))
        for path in paths:
            if not self.allows(claims, verbs, path):
                reason = f"scope does not grant {' or '.join(verbs)} on {path}"
                return self._refuse(Verdict(INSUFFICIENT_SCOPE, reason, subject, claims))
        jti = str(claims.get("jti", ""))
        if jti and jti not in self.accepted_jti[-8:]:
            self.accepted_jti.append(jti)
        return Verdict(GRANTED, None, subject, claims)

    def allows(self, claims: Mapping[str, Any], verbs: Collection[str], path: str) -> bool:
        """Whether verified ``claims`` grant one of ``verbs`` on ``path`` (under
        ``base_path``)."""
        return any(scope_allows(claims, verb, path, self.base_path) for verb in verbs)

    def _refuse(self, verdict: Verdict) -> Verdict:
        self.refusals[verdict.reason or ""] += 1
        return verdict


class IssuerServer:
    """Serves ``issuer``'s discovery document and JWKS over HTTPS on 127.0.0.1 (no client
    certificate asked), with the test CA's host certificate; ``start()`` sets ``issuer.url``
    to ``https://localhost:PORT/issuer`` (the name the host certificate has)."""

    def __init__(self, issuer: TokenIssuer, server_ssl: Any, *, port: int = 0) -> None:
        self.issuer = issuer
        self._ssl = server_ssl
        self._port = port
        self._runner: Any = None
        self.port = 0
        self.requests = 0

    async def start(self) -> None:
        """Listen; the issuer's URL then names this server."""
        from aiohttp import web

        async def document(request: web.Request) -> web.Response:
            self.requests += 1
            if request.path.endswith("/jwks"):
                return web.json_response(self.issuer.jwks())
            return web.json_response(self.issuer.openid_configuration())

        app = web.Application()
        app.router.add_get("/issuer/.well-known/openid-configuration", document)
        app.router.add_get("/issuer/jwks", document)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self._port, ssl_context=self._ssl)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.issuer.url = f"https://localhost:{self.port}/issuer"

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def write_token(path: Path, token: str) -> Path:
    """Write ``token`` to ``path`` (mode 0600) the way htgettoken does: a new file renamed
    over the old one, so a reader never sees half a token."""
    tmp = path.with_name(path.name + f".{secrets.token_hex(4)}.tmp")
    tmp.write_text(token + "\n")
    tmp.chmod(0o600)
    tmp.replace(path)
    return path
