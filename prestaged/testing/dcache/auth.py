"""Who a request to the emulated dCache is, and what a WLCG token lets it do there.

Without a ``BearerCheck`` every request came through TLS with a client certificate (the door and
frontend require one) and may do anything, as before. With one, a request is logged in the way
dCache's ``AuthenticationHandler`` does it: an ``Authorization: Bearer`` token must verify
(else 401, dCache's shape: the reason as status phrase, ``WWW-Authenticate: Basic
realm="dCache"``); without a token the client certificate is the identity; with neither the
request is anonymous, which the door and frontend refuse with 401.

What a token allows follows dCache's ``WlcgProfileScope`` (gPlazma's oidc plugin): each scope
grants activities on its path (relative to the check's ``base_path``):

==================  =====================================================================
activity            granted by
==================  =====================================================================
``DOWNLOAD``        ``storage.read``, ``storage.stage``
``READ_METADATA``   ``storage.read``, ``storage.stage``, ``storage.poll``, ``storage.create``,
                    ``storage.modify``
``STAGE``           ``storage.stage`` only: ``storage.read`` never brings a file from tape
==================  =====================================================================

A certificate holder has no such restriction. ``DCacheAuth.login`` decides the request and
counts it in ``DCacheStats``: ``token_requests`` and ``auth_refusals`` per site and status.
``limited`` puts dCache 11.2's blocking of clients with repeated 401s in front of a handler.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, Union

from aiohttp import web

from prestaged.testing.authz import AuthErrorLimiter, RefusalStyle, client_address, refusal
from prestaged.testing.dcache.model import DCacheConfig, DCacheStats
from prestaged.testing.tokens import NO_TOKEN, BearerCheck, TokenIssuer, Verdict

__all__ = ["DOWNLOAD", "READ_METADATA", "STAGE", "DCacheAuth", "Grants", "Login",
           "bearer_document", "limited", "load_bearer", "subsumed"]

DOWNLOAD = ("storage.read", "storage.stage")
READ_METADATA = ("storage.read", "storage.stage", "storage.poll", "storage.create",
                 "storage.modify")
STAGE = ("storage.stage",)
R = TypeVar("R", bound=web.BaseRequest)

_ACTIVITIES = {
    "storage.read": frozenset({"LIST", "READ_METADATA", "DOWNLOAD"}),
    "storage.create": frozenset({"READ_METADATA", "UPLOAD", "MANAGE", "UPDATE_METADATA"}),
    "storage.modify": frozenset({"LIST", "READ_METADATA", "UPLOAD", "MANAGE", "DELETE",
                                 "UPDATE_METADATA"}),
    "storage.stage": frozenset({"LIST", "READ_METADATA", "DOWNLOAD", "STAGE"}),
    "storage.poll": frozenset({"READ_METADATA"}),
}
"""dCache's activities per WLCG scope (gPlazma ``oidc`` plugin, ``WlcgProfileScope``)."""

Grants = tuple[tuple[frozenset[str], str], ...]
"""A token login's restriction as dCache's ``MultiTargetedRestriction`` holds it: (activities,
namespace path) per storage scope."""


def _under(path: str, root: str) -> bool:
    return root in ("/", path) or path.startswith(root.rstrip("/") + "/")


def subsumed(original: Optional[Grants], caller: Optional[Grants]) -> bool:
    """dCache's ``BulkService.checkRestrictions``: may a login restricted by ``caller`` (None:
    unrestricted, a certificate) act on a bulk request made under ``original``? Only if the
    caller is unrestricted, or each of its grants lies within one of the original's (fewer or
    the same activities, on the same path or below it): ``original.isSubsumedBy(caller)``. A
    token broader than the one that staged is refused, a narrower one is not."""
    if caller is None:
        return True
    if original is None:
        return False
    return all(any(acts <= o_acts and _under(path, o_path) for o_acts, o_path in original)
               for acts, path in caller)


@dataclass(frozen=True)
class Login:
    """A request's identity: ``user`` names it (``token:<sub>``, the certificate subject, or
    ``anonymous`` when tokens are off); a token login keeps the verified claims for the length
    of the request only, to decide per path."""

    user: str
    check: Optional[BearerCheck] = field(default=None, repr=False)
    claims: Optional[Mapping[str, Any]] = field(default=None, repr=False)

    def grants(self) -> Optional[Grants]:
        """This login's restriction (None: unrestricted, no token)."""
        if self.check is None or self.claims is None:
            return None
        scope = self.claims.get("scope", "")
        base = self.check.base_path.rstrip("/")
        out = []
        for item in scope.split() if isinstance(scope, str) else ():
            name, _, spath = item.partition(":")
            if name in _ACTIVITIES:
                out.append((_ACTIVITIES[name], (base + "/" + spath.strip("/")).rstrip("/") or "/"))
        return tuple(out)

    def allows(self, verbs: Collection[str], path: str) -> bool:
        """Whether this identity may do what one of ``verbs`` grants on ``path``."""
        if self.check is None or self.claims is None:
            return True
        return self.check.allows(self.claims, verbs, path)


_PROXY_CN = re.compile(r"\d+|proxy|limited proxy")


def _certificate_user(request: web.BaseRequest) -> Optional[str]:
    """The user a client certificate maps to: its subject without the ``CN`` elements that
    proxies add (RFC 3820's number, legacy ``proxy``), as gPlazma maps every proxy of one user
    to the same account: a renewed proxy is the same owner of the requests it made."""
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        return None
    subject = list(cert.get("subject", ()))
    while len(subject) > 1 and len(subject[-1]) == 1 and subject[-1][0][0] == "commonName" \
            and _PROXY_CN.fullmatch(str(subject[-1][0][1])):
        subject.pop()
    return repr(tuple(subject))


class DCacheAuth:
    """Logs requests in against ``bearer`` (None: certificates only), counting in ``stats``."""

    def __init__(self, bearer: Optional[BearerCheck], stats: DCacheStats) -> None:
        self.bearer = bearer
        self._stats = stats

    def login(self, request: web.BaseRequest, site: str, verbs: Collection[str] = (),
              paths: Iterable[str] = (), *, anonymous: bool = False
              ) -> Union[Login, web.Response]:
        """The ``Login`` of ``request`` at ``site`` (``door`` or ``frontend``), or the refusal to
        answer: a token must verify and grant one of ``verbs`` on every one of ``paths`` (403
        when it does not); ``anonymous`` lets a request without any credential through (the
        discovery document)."""
        user = _certificate_user(request)
        if self.bearer is None:
            return Login(user or "anonymous")
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            self._stats.token_requests[site] += 1
            verdict = self.bearer.authorize(header, verbs, paths)
            if verdict.granted:
                return Login(f"token:{verdict.subject}", self.bearer, verdict.claims)
            return self.refuse(site, verdict)
        if user is not None or anonymous:
            return Login(user or "anonymous")
        return self.refuse(site, Verdict(NO_TOKEN))

    def refuse(self, site: str, verdict: Verdict) -> web.Response:
        """dCache's answer to ``verdict`` at ``site``, counted."""
        response = refusal(RefusalStyle.DCACHE, verdict)
        self.count(site, response.status)
        return response

    def count(self, site: str, status: int) -> None:
        """Count a refusal with ``status`` at ``site``."""
        self._stats.auth_refusals[f"{site}:{status}"] += 1


def limiter_for(cfg: DCacheConfig, clock: Callable[[], float] = time.monotonic
                ) -> AuthErrorLimiter:
    """One service's ``RateLimitedHandlerList`` (door or frontend) as ``cfg`` sets it up, timed
    by ``clock``."""
    return AuthErrorLimiter(cfg.auth_max_errors, cfg.auth_error_window, cfg.auth_block_seconds,
                            clock, rate_overall=cfg.rate_overall,
                            client_percent=cfg.rate_client_percent,
                            idle_seconds=cfg.client_idle_seconds)


async def limited(limiter: AuthErrorLimiter, stats: DCacheStats, site: str, request: R,
                  handler: Callable[[R], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """``handler(request)`` unless ``limiter`` blocks the client (429, counted in
    ``stats.blocked[site]``); a 401 answer counts against the client."""
    client = client_address(request)
    busy = limiter.blocked(client)
    if busy is not None:
        stats.blocked[site] += 1
        return busy
    busy = limiter.throttled(client)
    if busy is not None:
        stats.throttled[site] += 1
        return busy
    response = await handler(request)
    limiter.answered(client, response.status)
    return response


def bearer_document(check: BearerCheck) -> dict[str, Any]:
    """What ``load_bearer`` reads: the issuer's URL and public JWKS, the audiences and the base
    path of ``check`` (no private key, no token)."""
    return {"issuer": check.issuer.url, "jwks": check.issuer.jwks(),
            "audiences": sorted(check.audiences), "base_path": check.base_path}


def load_bearer(path: Path) -> BearerCheck:
    """The ``BearerCheck`` of a ``bearer_document`` written as JSON to ``path``; ValueError
    naming what is wrong."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        issuer = TokenIssuer.from_jwks(str(doc["issuer"]), doc["jwks"])
        audiences = [str(a) for a in doc["audiences"]]
        return BearerCheck(issuer, audiences, str(doc.get("base_path", "/")))
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a bearer document (issuer, jwks, audiences, base_path):"
                         f" {e}") from None
