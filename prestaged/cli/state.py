"""``prestaged status`` and ``prestaged history``: what the state database (or the running
daemon) knows of past warm runs; ``status --members``: the daemons sharing the state;
``prestaged forget``: drop a definition from it."""

from __future__ import annotations

import argparse
import json
import logging
import urllib.parse
from typing import TYPE_CHECKING, Optional

from prestaged.cli.common import answer_of, open_store, recorded_definition, via_daemon
from prestaged.cli.render import history_lines, member_lines, status_lines
from prestaged.config import Config

if TYPE_CHECKING:
    from prestaged.state.store import DatasetStatus

__all__ = ["cmd_forget", "cmd_history", "cmd_status"]

log = logging.getLogger(__name__)


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    """``prestaged status``: warmth per definition, from the daemon or the state database;
    ``CatalogError`` (exit 4) for a named definition with no record."""
    if args.members:
        return _members(args, cfg)
    names = _names(args, cfg)
    rows = _daemon_status(args, cfg, names)
    if rows is not None:
        from prestaged.service.client import base_url

        source = f"daemon {base_url(cfg)}"
    else:
        store = open_store(args, cfg, must_exist=True)
        try:
            rows = []
            for name in names:
                rows = store.status(cfg.state.fresh_for, name, args.status_catalog)
                if rows:
                    break
        finally:
            store.close()
        source = f"state {store.where}"
    if args.definition is not None and not rows:
        from prestaged.errors import CatalogError

        raise CatalogError(f"definition '{args.definition}' has no record in {source}")
    if args.json:
        print(json.dumps({"source": source, "fresh_for_seconds": cfg.state.fresh_for,
                          "definitions": [r.to_dict() for r in rows]}, indent=2))
        return 0
    print("\n".join(status_lines(rows)))
    return 0


def _members(args: argparse.Namespace, cfg: Config) -> int:
    """``status --members``: the daemons registered in the state (``state.cluster.members``),
    read from the state database itself (a daemon that does not answer is listed too), alive
    when their heartbeat is within ``[cluster] lease`` of the config in force."""
    from prestaged.state.cluster import members

    if args.definition is not None or args.status_catalog is not None:
        from prestaged.errors import ConfigError

        raise ConfigError("status --members lists the daemons: it takes no definition or "
                          "--catalog")
    store = open_store(args, cfg, must_exist=True)
    try:
        rows = members(store)
    finally:
        store.close()
    lease = float(cfg.cluster.lease)
    if args.json:
        print(json.dumps({"state": store.where, "lease_seconds": lease,
                          "members": [m.to_dict(lease) for m in rows]}, indent=2))
        return 0
    print("\n".join(member_lines(rows, lease) if rows else [f"no members ({store.where})"]))
    return 0


def cmd_history(args: argparse.Namespace, cfg: Config) -> int:
    """``prestaged history``: the most recent runs of the state database, newest first."""
    from prestaged.config import checked, within

    limit = checked("--limit", args.limit, within(1, 100_000), "integer")
    store = open_store(args, cfg, must_exist=True)
    try:
        runs = store.runs(limit=limit)
    finally:
        store.close()
    if args.json:
        print(json.dumps({"state": store.where, "runs": [r.to_dict() for r in runs]},
                         indent=2))
        return 0
    for line in history_lines(runs):
        print(line)
    return 0


def _names(args: argparse.Namespace, cfg: Config) -> list[Optional[str]]:
    """The names to look the definition up by, in turn: as given (None: every definition),
    then, for a local definition file given by a relative path, the absolute path ``warm``
    recorded it under (``status ds.txt`` finds what ``warm ds.txt`` did)."""
    from prestaged.catalog.local import recorded_name

    given = args.definition
    if given is None or args.status_catalog not in (None, "local"):
        return [given]
    recorded = recorded_name(given, cfg.catalog.local.dir)
    return [given] if recorded == given else [given, recorded]


def _daemon_status(args: argparse.Namespace, cfg: Config, names: list[Optional[str]]
                   ) -> Optional[list[DatasetStatus]]:
    """Warmth as the running daemon (``daemon.listen``) reports it, or None when none answers;
    only the definition of the first of ``names`` it knows (None: all).

    An explicit ``--state`` always reads that file instead.
    """
    from prestaged.state.store import DatasetStatus, RunRecord

    query = urllib.parse.urlencode({"catalog": args.status_catalog} if args.status_catalog
                                   else {})
    path = "/api/v1/datasets" + (f"?{query}" if query else "")
    doc = via_daemon(args, cfg, "GET", path, keys={"definitions": list})
    if doc is None:
        return None
    known = doc["definitions"]
    with answer_of(cfg, "GET", path):
        wanted = next((n for n in names
                       if n is None or any(d["definition"] == n for d in known)), names[0])
        rows = []
        for d in known:
            if wanted is not None and d["definition"] != wanted:
                continue
            last = RunRecord(**d["last_run"]) if d.get("last_run") else None
            rows.append(DatasetStatus(**{**d, "last_run": last}))
        status_lines(rows)  # what the command prints must read, too: fields of other types
    log.debug("status from the daemon at %s", cfg.daemon.listen)
    return rows


def cmd_forget(args: argparse.Namespace, cfg: Config) -> int:
    """``prestaged forget``: drop a definition, its runs and the files only it listed from the
    state. ``NotFoundError`` (exit 4) for a definition the state does not know;
    ``ConflictError`` (exit 2, nothing dropped) while it is watched by this config, running,
    or pinned, unless ``--force``."""
    from prestaged.errors import ConflictError

    kind = cfg.catalog.default  # --catalog overrides it, checked
    definition = recorded_definition(cfg, kind, args.definition)
    if not args.force and any(
            (w.catalog or cfg.catalog.default) == kind
            and recorded_definition(cfg, kind, w.definition) == definition for w in cfg.watch):
        raise ConflictError(f"definition {definition!r} (catalog {kind}) is watched by this "
                            "config's [[watch]]: the daemon would record it again; remove the "
                            "watch first (--force forgets it anyway)")
    store = open_store(args, cfg, must_exist=True)
    try:
        dropped = store.forget(kind, definition, force=args.force)
    finally:
        store.close()
    if args.json:
        print(json.dumps({"state": store.where, "catalog": kind, "definition": definition,
                          "dropped": dropped.to_dict()}, indent=2))
        return 0
    print(f"forgot {definition} (catalog {kind}) in state {store.where}: {dropped.runs:,} runs, "
          f"{dropped.files:,} files no definition lists any more, {dropped.rounds:,} watch rounds")
    return 0
