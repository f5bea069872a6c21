"""``prestaged campaign add/run/list/show/hold/release/cancel/retry/mark-submitted/forget``.

``run`` processes a campaign in the foreground; ``add`` gives it to the running daemon. The
others ask the daemon when one answers at ``daemon.listen`` and work on the state database
otherwise (or with ``--state``): ``via_daemon`` decides, and the operator actions word their
result with the same ``apply_action`` either way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional
from urllib.parse import quote

from prestaged.cli.common import answer_of, checked_answer, context, open_store, via_daemon
from prestaged.cli.render import campaign_lines, campaign_list_lines
from prestaged.config import Config
from prestaged.errors import EXIT_HELD, ConfigError, ConflictError, PrestagedError, StateError
from prestaged.pacing import Rates
from prestaged.runtime import install_interrupt, run
from prestaged.state.db import driver_errors

if TYPE_CHECKING:
    from prestaged.campaign.runner import CampaignResult
    from prestaged.state.postgres import Connection
    from prestaged.state.store import Store

__all__ = [
    "cmd_campaign_action",
    "cmd_campaign_add",
    "cmd_campaign_forget",
    "cmd_campaign_list",
    "cmd_campaign_run",
    "cmd_campaign_show",
]

log = logging.getLogger(__name__)


def cmd_campaign_add(args: argparse.Namespace, cfg: Config) -> int:
    """``campaign add``: validate FILE here, then give it to the daemon (an error without one)."""
    from prestaged.campaign.spec import parse_campaign, read_campaign
    from prestaged.service.client import base_url, call

    text = read_campaign(args.file)
    campaign = parse_campaign(text, args.file)  # the daemon checks again; errors come out here
    body: dict[str, Any] = {"toml": text,
                            "source": str(args.file.resolve()), "held": args.held}
    doc = call(cfg, "POST", "/api/v1/campaigns", body)
    if doc is None:
        raise ConfigError(f"campaign add: no prestaged daemon answers at {base_url(cfg)} "
                          "(daemon.listen): start `prestaged serve`, or run the campaign in the "
                          f"foreground with `prestaged campaign run {args.file}`")
    doc = checked_answer(cfg, "POST", "/api/v1/campaigns", doc, {"added": bool})
    verb = "added" if doc["added"] else "replaced (submissions and ledger kept)"
    print(f"{campaign.name}: {verb}{', held' if args.held else ''}; `prestaged campaign show "
          f"{campaign.name}` follows it")
    return 0


def cmd_campaign_list(args: argparse.Namespace, cfg: Config) -> int:
    """``campaign list``: every campaign with its submissions by state."""
    from prestaged.campaign.repository import CampaignRepository

    doc = via_daemon(args, cfg, "GET", "/api/v1/campaigns", keys={"campaigns": list})
    rows: list[dict[str, Any]]
    if doc is not None:
        rows, source = doc["campaigns"], f"daemon {cfg.daemon.listen}"
    else:
        store = open_store(args, cfg, must_exist=True)
        try:
            rows = [{**r, "daemon": None} for r in CampaignRepository(store).summaries()]
        finally:
            store.close()
        source = f"state {store.where}"
    if args.json:
        print(json.dumps({"source": source, "campaigns": rows}, indent=2))
        return 0
    with answer_of(cfg, "GET", "/api/v1/campaigns", daemon=doc is not None):
        lines = campaign_list_lines(rows, source)
    print("\n".join(lines))
    return 0


def _claim(store: Store, name: str, lease: float) -> Optional[str]:
    """On a shared PostgreSQL state, the lease of campaign ``name`` for this foreground run,
    taken as the daemons take it (``[cluster] lease``): our owner id, or None for a campaign
    no daemon has (not registered: no daemon can run it). ``ConflictError`` (exit 2) when a
    live member holds it: a second runner would take its submission in ``submitting`` for a
    crash's. (On SQLite the runner's lock file keeps every runner apart.)"""
    from prestaged.state import cluster as shared

    owner = f"campaign-run:{socket.gethostname()}:{os.getpid()}"
    ours, holder = shared.claim_campaign(store, name, owner, lease)
    if ours:
        return owner
    if holder is None and name not in shared.pokes(store):
        return None
    raise ConflictError(f"campaign {name} is being run by the daemon member "
                        f"{holder or '(claiming it now)'} on this state: one runner per campaign "
                        "(act on it with `prestaged campaign hold/release/...`, or stop that "
                        "daemon first)")


def _sole_run(store: Store, name: str) -> Connection:
    """On a shared PostgreSQL state, make this the only ``campaign run`` of ``name`` on any
    host: a session advisory lock, held on a connection of its own until the run closes it
    (the server drops it with the connection, as the kernel drops the lock file's flock on
    SQLite). The lease (``_claim``) keeps the daemons out, but only of campaigns they have
    registered: two runs of an unregistered one on two hosts each took the other's live
    launch for a crash's. ``ConflictError`` (exit 2) when another run holds it."""
    from prestaged.state.postgres import connect

    assert store.url is not None
    key = f"prestaged campaign run {name}"
    # Its holder is named by its connection (pid and host, as the lock file names them).
    conn = connect(store.url, application_name=(
        f"{_RUN_LOCK}{os.getpid()}@{socket.gethostname()}"[:63]))
    try:
        got = conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                           (key,)).fetchone()
        if got and got[0]:
            return conn
        holder = conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.database = (SELECT oid FROM "
            "pg_database WHERE datname = current_database()) AND ((l.classid::bigint << 32) | "
            "l.objid::bigint) = hashtextextended(%s, 0)", (key,)).fetchone()
    except driver_errors() as e:
        conn.close()
        raise StateError(f"state {store.where}: cannot lock campaign {name}: {e}") from None
    conn.close()
    pid, _, host = str(holder[0] if holder else "").removeprefix(_RUN_LOCK).partition("@")
    who = f"prestaged pid {pid} on {host}" if pid.isdigit() else "another prestaged"
    raise ConflictError(f"campaign {name} is being run by {who} (`prestaged campaign run`, "
                        f"holding its lock on this state, {store.where}): one runner per "
                        "campaign")


_RUN_LOCK = "prestaged-campaign-run/"
"""How the connection holding a ``campaign run``'s lock names itself (then ``pid@host``)."""


class _RunLock:
    """``_sole_run``'s lock, kept for the run. The server drops it with its connection (a
    restart, a failover: the run went on, and a second `campaign run` started beside it):
    ``still_ours`` takes it again on a new connection, or says another run has it now."""

    def __init__(self, store: Store, name: str) -> None:
        self.store, self.name = store, name
        self.conn: Optional[Connection] = _sole_run(store, name)

    def still_ours(self) -> bool:
        """Whether the lock is (again) this run's; False when another run took it."""
        if self.conn is not None:
            try:
                self.conn.execute("SELECT 1")
                return True
            except driver_errors():
                self.close()  # the server dropped it, and the lock with it
        try:
            self.conn = _sole_run(self.store, self.name)
        except ConflictError as e:
            log.error("%s; taken while this run's connection to the state was lost: this run "
                      "stops", e)
            return False
        except StateError:
            return True  # no server to lock anything with: nobody else can take it either
        log.warning("campaign %s: this run's lock went with its connection to the state; "
                    "taken again", self.name)
        return True

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(*driver_errors()):
                conn.close()


async def _keep_lock(lock: _RunLock, lost: Callable[[], None]) -> None:
    """Check ``lock`` every ``RUN_LOCK_CHECK`` seconds; ``lost()`` once another run has it."""
    while True:
        await asyncio.sleep(RUN_LOCK_CHECK)
        if not await asyncio.to_thread(lock.still_ours):
            lost()
            return


RUN_LOCK_CHECK = 2.0
"""Seconds between two checks that a ``campaign run``'s lock is still its own."""


def _take(store: Store, name: str, lease: float) -> tuple[Optional[_RunLock], Optional[str]]:
    """On a shared PostgreSQL state, campaign ``name`` for this foreground run: the lock of
    ``_sole_run`` and the lease of ``_claim`` (None, None on SQLite: the runner's lock file)."""
    if store.url is None:
        return None, None
    lock = _RunLock(store, name)
    try:
        return lock, _claim(store, name, lease)
    except BaseException:
        lock.close()
        raise


def _let_go(store: Store, name: str, lock: Optional[_RunLock], owner: Optional[str]) -> None:
    """Give up what ``_take`` took."""
    if owner is not None:
        from prestaged.state import cluster as shared

        with contextlib.suppress(*driver_errors(PrestagedError)):
            shared.release_campaign(store, name, owner)
    if lock is not None:
        lock.close()


@dataclass(frozen=True)
class _Holder:
    """This foreground run as the holder of a campaign's lease (``cluster.LeaseHolder``)."""

    id: str
    lease: float


def _is_file(arg: str) -> bool:
    """Whether ``arg`` names a file; a name too long to be a path, or one we may not look
    into, is no file (it is then checked as a campaign name)."""
    try:
        return Path(arg).is_file()
    except (OSError, ValueError):
        return False


def cmd_campaign_show(args: argparse.Namespace, cfg: Config) -> int:
    """``campaign show``: stages, controls and submissions of one campaign (FILE or NAME)."""
    from prestaged.campaign.actions import check_names
    from prestaged.campaign.repository import CampaignRepository
    from prestaged.campaign.spec import load_campaign

    name = args.campaign
    if _is_file(name):
        name = load_campaign(Path(name)).name
    check_names(name)
    path = f"/api/v1/campaigns/{quote(name, safe='')}"
    doc = via_daemon(args, cfg, "GET", path,
                     keys={"campaign": str, "stages": list, "submissions": list})
    daemon = doc is not None
    if doc is not None:
        doc["source"] = f"daemon {cfg.daemon.listen}"
    else:
        store = open_store(args, cfg, must_exist=True)
        try:
            doc = CampaignRepository(store).describe(name, store.path.parent / "campaigns",
                                                cfg.state.fresh_for)
        finally:
            store.close()
        doc["source"] = f"state {store.where}"
        if not doc["submissions"] and not doc["control"]:
            from prestaged.errors import CatalogError

            raise CatalogError(f"campaign '{name}' has no submissions in state {store.where}")
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    with answer_of(cfg, "GET", path, daemon=daemon):
        lines = campaign_lines(doc)
    print("\n".join(lines))
    return 0


def cmd_campaign_action(args: argparse.Namespace, cfg: Config) -> int:
    """hold, release, cancel, retry, mark-submitted: through the daemon when one answers,
    else on the state database; the same ``apply_action`` words the result either way."""
    from prestaged.campaign.actions import apply_action, check_names
    from prestaged.campaign.repository import CampaignRepository

    body: dict[str, Any] = {"stage": getattr(args, "stage", None),
                            "submission": getattr(args, "submission", None),
                            "job_id": getattr(args, "job_id", None)}
    body = {k: v for k, v in body.items() if v is not None}
    check_names(args.campaign, body.get("stage"))  # before any daemon or state is touched
    doc = via_daemon(args, cfg, "POST",
                     f"/api/v1/campaigns/{quote(args.campaign, safe='')}/{args.action}", body,
                     keys={"result": str})
    if doc is not None:
        print(doc["result"])
        return 0
    store = open_store(args, cfg, must_exist=args.action in ("retry", "mark-submitted"))
    try:
        print(apply_action(CampaignRepository(store), args.campaign, args.action, ahead=True,
                           **body))
    finally:
        store.close()
    return 0


def cmd_campaign_forget(args: argparse.Namespace, cfg: Config) -> int:
    """``campaign forget``: drop a finished campaign's rows (registration, submissions, their
    transitions, ledger, controls) in one transaction, through the daemon when one answers,
    else on the state database. ``NotFoundError`` (exit 4) for an unknown campaign;
    ``ConflictError`` (exit 2, nothing dropped) for one that is not finished, naming what is
    left, or that a process runs now."""
    from prestaged.campaign.actions import check_names
    from prestaged.campaign.repository import CampaignRepository
    from prestaged.campaign.runner import one_runner

    name = args.campaign
    check_names(name)  # before any daemon or state is touched
    doc = via_daemon(args, cfg, "DELETE", f"/api/v1/campaigns/{quote(name, safe='')}",
                     keys={"dropped": dict})
    if doc is not None:
        dropped, source = doc["dropped"], f"daemon {cfg.daemon.listen}"
    else:
        store = open_store(args, cfg, must_exist=True)
        try:
            repo = CampaignRepository(store)
            if name not in repo.names():
                from prestaged.errors import NotFoundError

                raise NotFoundError(f"no campaign '{name}' in state {store.where}")
            # Not under a run of it: a `campaign run` (its lock, on any host of a shared
            # state) or, on a shared state, a daemon member (its lease).
            if store.url is None:
                with one_runner(store.path.parent / "campaigns", name):
                    dropped = repo.forget(name)
            else:
                lock, owner = _take(store, name, cfg.cluster.lease)
                try:
                    dropped = repo.forget(name, lease=owner)
                finally:
                    _let_go(store, name, lock, owner)
        finally:
            store.close()
        source = f"state {store.where}"
    if args.json:
        print(json.dumps({"source": source, "campaign": name, "dropped": dropped}, indent=2))
        return 0
    print(f"forgot campaign {name} ({source}): {dropped.get('submissions', 0):,} submissions, "
          f"{dropped.get('events', 0):,} transitions, {dropped.get('ledger', 0):,} ledger files")
    return 0


def cmd_campaign_run(args: argparse.Namespace, cfg: Config) -> int:
    """``campaign run``: the campaign in the foreground; 0 done, 1 failed, 75 held, 130."""
    from prestaged.campaign.runner import run_campaign
    from prestaged.campaign.spec import load_campaign

    campaign = load_campaign(args.file)
    ctx = context(args, cfg)
    creds = ctx.load_credentials()
    kind = campaign.defaults.catalog or cfg.catalog.default
    catalog_creds = (ctx.catalog_credentials(creds) if kind == "samweb"
                     else creds if kind == "metacat" else None)
    settings = ctx.warm_settings(creds)
    store = ctx.open_store()
    lease = cfg.cluster.lease
    try:
        lock, owner = _take(store, campaign.name, lease)
    except BaseException:
        store.close()
        raise

    async def go() -> CampaignResult:
        stop = asyncio.Event()
        install_interrupt(stop)
        keepers = []
        if owner is not None:  # renewed as the daemons renew theirs; lost: stop the run
            from prestaged.service.cluster import keep_lease

            keepers.append(asyncio.ensure_future(keep_lease(
                store, _Holder(owner, lease), "campaign", (campaign.name,), stop.set)))
        if lock is not None:
            keepers.append(asyncio.ensure_future(_keep_lock(lock, stop.set)))
        rates = Rates()  # the gates and keep-warm runs are one client at the storage
        try:
            async with ctx.storage(creds) as (toucher, tape):
                return await run_campaign(
                    campaign, store, gate=ctx.gate(store, toucher, settings, stop=stop,
                                                   tape=tape, rates=rates),
                    open_catalog=lambda d: ctx.open_catalog(kind, d, creds=catalog_creds),
                    workdir=store.path.parent / "campaigns", stop=stop,
                    rewarm=ctx.rewarm(store, toucher, settings, stop=stop, tape=tape,
                                      rates=rates),
                    release=ctx.release(store, tape, stop=stop), owner=owner)
        finally:
            for keeper in keepers:
                keeper.cancel()

    try:
        result = run(go())
    finally:
        _let_go(store, campaign.name, lock, owner)
        store.close()
    for stage, outcome in result.stages.items():
        print(f"{campaign.name}/{stage}: {outcome}")
    if result.exit_code == EXIT_HELD:
        print(f"prestaged: campaign {campaign.name} is held: nothing more launched (exit "
              f"{EXIT_HELD}); `prestaged campaign release {campaign.name} [--stage S]` "
              "and run it again", file=sys.stderr)
    return result.exit_code
