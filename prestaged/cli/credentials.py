"""``prestaged credentials`` (alias ``proxy``): what a run would present, and whether it can.

It shows the proxy (as ``voms-proxy-info`` would) and the bearer token's claims (issuer,
subject, audience, scopes, groups, time left), never the token, a signature or key material;
then checks them as a run would (``credentials.method``) and exits 3 with the run's message
when that check fails. Invoked as ``prestaged proxy`` it shows the proxy only, in the shape it
always had.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from typing import Any, Optional

from prestaged.cli.common import context
from prestaged.config import Config
from prestaged.errors import CredentialError
from prestaged.tokens import find_token

# prestaged.credentials imports cryptography (~0.1 s): loaded when this command runs, not when
# the CLI starts.

__all__ = ["cmd_credentials"]


def _utc(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _proxy_doc(args: argparse.Namespace, cfg: Config, *,
               required: bool) -> Optional[dict[str, Any]]:
    """The proxy's description, None when there is none to show (not named, not at the
    default location, and not ``required``); an unreadable one raises when ``required``."""
    from prestaged.credentials import inspect_proxy, resolve_proxy_path

    path, source = resolve_proxy_path(args.proxy, cfg.credentials.proxy)
    if not required and source.startswith("default") and not path.exists():
        return None
    try:
        info = inspect_proxy(path, source=None if source.startswith("default") else source)
    except CredentialError as e:
        if required:
            raise
        return {"path": str(path), "source": source, "error": str(e)}
    now = datetime.now(timezone.utc)
    doc: dict[str, Any] = {
        "path": str(info.path), "source": source, "subject": info.subject,
        "identity": info.identity, "issuer": info.issuer, "type": info.kind,
        "not_after": info.not_after.isoformat(),
        "seconds_left": int((info.not_after - now).total_seconds()),
        "voms": [{"vo": v.vo, "fqans": list(v.fqans), "issuer": v.issuer, "uri": v.uri,
                  "not_after": v.not_after.isoformat(),
                  "seconds_left": int((v.not_after - now).total_seconds())} for v in info.voms]}
    if info.voms_error:
        doc["voms_error"] = info.voms_error
    return doc


def _token_doc(args: argparse.Namespace, cfg: Config) -> Optional[dict[str, Any]]:
    """The token's claims (never its text), None when none is found; an error entry when one
    is found but cannot be read or decoded."""
    try:
        found = find_token(args.token_file, cfg.credentials.token_file)
        if found is None:
            return None
        info = found.inspect()
    except CredentialError as e:
        return {"error": str(e)}
    return {
        "path": str(info.path) if info.path is not None else None, "source": info.source,
        "issuer": info.issuer, "subject": info.subject, "audience": list(info.audience),
        "scopes": list(info.scopes), "groups": list(info.groups),
        "wlcg_ver": info.wlcg_ver,
        "issued_at": info.issued_at.isoformat() if info.issued_at else None,
        "not_before": info.not_before.isoformat() if info.not_before else None,
        "not_after": info.expires.isoformat(),
        "seconds_left": int(info.time_left().total_seconds()),
    }


def _timeleft(not_after: str) -> str:
    """``11h59m (until 2026-12-04 04:08:06 UTC)`` for an ISO time."""
    from prestaged.credentials import format_timedelta

    until = datetime.fromisoformat(not_after)
    return f"{format_timedelta(until - datetime.now(timezone.utc))} (until {_utc(until)})"


_NO_VOMS = "none (a storage that maps by VO role sees none: voms-proxy-init -voms VO)"


def _print_proxy(doc: dict[str, Any], indent: str = "") -> None:
    if "error" in doc:
        print(f"{indent}path      : {doc['path']} ({doc['source']})")
        print(f"{indent}error     : {doc['error']}")
        return
    print(f"{indent}path      : {doc['path']} ({doc['source']})")
    print(f"{indent}subject   : {doc['subject']}")
    print(f"{indent}identity  : {doc['identity']}")
    print(f"{indent}type      : {doc['type']}")
    print(f"{indent}timeleft  : {_timeleft(doc['not_after'])}")
    for voms in doc["voms"]:  # as voms-proxy-info -all shows them
        print(f"{indent}=== VO {voms['vo']} extension information ===")
        print(f"{indent}VO        : {voms['vo']}")
        print(f"{indent}issuer    : {voms['issuer']}")
        for fqan in voms["fqans"]:
            print(f"{indent}attribute : {fqan}")
        print(f"{indent}timeleft  : {_timeleft(voms['not_after'])}")
        print(f"{indent}uri       : {voms['uri']}")
    if not doc["voms"]:
        print(f"{indent}VOMS      : {doc.get('voms_error') or _NO_VOMS}")


def _print_token(doc: dict[str, Any]) -> None:
    if "error" in doc:
        print(f"  error     : {doc['error']}")
        return
    where = doc["path"] or doc["source"]
    print(f"  file      : {where}" + (f" ({doc['source']})" if doc["path"] else ""))
    print(f"  issuer    : {doc['issuer']}")
    print(f"  subject   : {doc['subject']}")
    print(f"  audience  : {' '.join(doc['audience']) or '(none)'}")
    print(f"  scopes    : {' '.join(doc['scopes']) or '(none)'}")
    if doc["groups"]:
        print(f"  groups    : {' '.join(doc['groups'])}")
    print(f"  timeleft  : {_timeleft(doc['not_after'])}")


def cmd_credentials(args: argparse.Namespace, cfg: Config) -> int:
    """``prestaged credentials``: describe the proxy and the token, then check them as a run
    would (``CredentialError``, exit 3, when it would fail). As ``prestaged proxy``: the proxy
    only, checked for its lifetime."""
    from prestaged.credentials import check_lifetime, inspect_proxy, resolve_proxy_path

    if args.command == "proxy":
        doc = _proxy_doc(args, cfg, required=True)
        assert doc is not None
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            _print_proxy(doc)
        path, source = resolve_proxy_path(args.proxy, cfg.credentials.proxy)
        check_lifetime(inspect_proxy(path, source=source), cfg.credentials.min_lifetime)
        return 0
    method = cfg.credentials.method
    proxy = None if method == "token" else _proxy_doc(args, cfg, required=False)
    token = None if method == "proxy" else _token_doc(args, cfg)
    if args.json:
        print(json.dumps({"method": method, "proxy": proxy, "token": token}, indent=2))
    else:
        print(f"method      : {method}")
        unused = f" not used (--auth {method})"  # not "none found": one may be configured
        print("proxy       :" + ("" if proxy else unused if method == "token" else " none found"))
        if proxy:
            _print_proxy(proxy, indent="  ")
        print("token       :" + ("" if token else unused if method == "proxy" else " none found"))
        if token:
            _print_token(token)
    creds = context(args, cfg).load_credentials()
    if not args.json:
        sent = [name for name, present in (("token", creds.token), ("proxy", creds.proxy))
                if present is not None]
        print(f"a run sends : {' and '.join(sent)}")
    return 0
