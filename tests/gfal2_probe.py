"""Drive the real grid client (gfal2 + its HTTP plugin) against a storage URL; print JSON.

Run by /usr/bin/python3 (Debian's python3-gfal2), not by the project's venv:
``gfal2_probe.py status URL`` | ``bring_online PIN TIMEOUT URL...`` | ``poll TOKEN URL`` |
``archive_poll URL...`` | ``release TOKEN URL...`` | ``read N URL`` (open, read N bytes). The
client certificate and CA directory come from X509_USER_PROXY and X509_CERT_DIR, as in gfal2's
own start-up; a WLCG bearer token from BEARER_TOKEN, which gfal2 then uses instead of the proxy
(for every URL: door, frontend, and whatever a redirect leads to). Each command prints one JSON
object; a gfal2 error is ``{"error": message, "code": errno}``. The request ids gfal2 calls
"token" are stage request ids, not bearer tokens.
"""

from __future__ import annotations

import json
import sys

import gfal2  # type: ignore[import-not-found]


def _errors(errs: object) -> list[object]:
    """gfal2's per-file error list as messages (None for a file without error)."""
    return [None if e is None else str(e) for e in (errs if isinstance(errs, list) else [errs])]


def main(argv: list[str]) -> dict[str, object]:
    """Run one command; return what gfal2 answered."""
    ctx = gfal2.creat_context()
    command, args = argv[0], argv[1:]
    try:
        if command == "status":
            return {"status": ctx.getxattr(args[0], "user.status")}
        if command == "bring_online":
            pin, timeout, urls = int(args[0]), int(args[1]), args[2:]
            errs, token = ctx.bring_online(urls, pin, timeout, True)
            return {"token": token, "errors": _errors(errs)}
        if command == "poll":  # one URL: gfal2's 0 (pending) or 1 (on disk), or its error
            return {"result": ctx.bring_online_poll(args[1], args[0])}
        if command == "archive_poll":
            return {"errors": _errors(ctx.archive_poll(args))}
        if command == "release":
            return {"errors": _errors(ctx.release(args[1:], args[0]))}
        if command == "read":
            return {"bytes": len(ctx.open(args[1], "r").read_bytes(int(args[0])))}
    except gfal2.GError as e:
        return {"error": e.message, "code": e.code}
    raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
