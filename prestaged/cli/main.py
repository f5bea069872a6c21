"""The ``prestaged`` command line: parse, load config, call one library function, exit code.

Every flag overrides its config key (``--concurrency`` -> ``storage.concurrency``) through the
same validation as the config file. A ``PrestagedError`` becomes one line on stderr and its exit
code; only bugs print tracebacks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from prestaged._version import __version__
from prestaged.config import Config, find_config, load_config, replace_path
from prestaged.errors import (
    EXIT_HELD,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SOME_FAILED,
    ConfigError,
    PrestagedError,
)
from prestaged.runtime import install_interrupt, run

if TYPE_CHECKING:
    from prestaged.catalog import Catalog
    from prestaged.context import Context
    from prestaged.credentials import Credentials
    from prestaged.gate import GateResult
    from prestaged.state.store import Store

__all__ = ["build_parser", "main"]

log = logging.getLogger("prestaged")

# flag dest -> config key it overrides
_OVERRIDES = {
    "min_lifetime": "credentials.min_lifetime",
    "concurrency": "storage.concurrency",
    "per_host": "storage.per_host",
    "nbytes": "storage.bytes",
    "rate": "storage.rate",
    "timeout": "storage.timeout",
    "retries": "retry.attempts",
    "catalog": "catalog.default",
    "catalog_dir": "catalog.local.dir",
    "experiment": "catalog.samweb.experiment",
    "progress_interval": "output.progress_interval",
    "state": "state.path",
    "fresh_for": "state.fresh_for",
}


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--config", type=Path, metavar="FILE",
                   help="config file (default: $PRESTAGED_CONFIG, ~/.config/prestaged/"
                        "prestaged.toml, /etc/prestaged/prestaged.toml)")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    g.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")


def _credentials(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("credentials")
    g.add_argument("--proxy", type=Path, metavar="FILE",
                   help="X.509 proxy (default: credentials.proxy, $X509_USER_PROXY, "
                        "/tmp/x509up_u<uid>)")
    g.add_argument("--ca-dir", type=Path, metavar="DIR",
                   help="hashed CA directory (default: credentials.ca_dir, $X509_CERT_DIR, "
                        "/etc/grid-security/certificates)")
    g.add_argument("--min-lifetime", metavar="DURATION",
                   help="refuse a proxy with less time left (default 1h)")


def _source_args(p: argparse.ArgumentParser, *, option: bool = False) -> None:
    """DEFINITION (positional, or ``--definition`` when ``option``), catalog and SAM flags."""
    what = "definition name, or a text file of URLs (one per line)"
    if option:
        p.add_argument("--definition", metavar="DEFINITION", help=what + " (or --dims)")
    else:
        p.add_argument("definition", nargs="?", help=what)
    p.add_argument("--catalog", help="catalog that resolves DEFINITION: local or samweb "
                                     "(default: catalog.default; --dims implies samweb)")
    p.add_argument("--catalog-dir", metavar="DIR", help="directory of NAME.txt definitions")
    g = p.add_argument_group("SAM web")
    g.add_argument("--dims", metavar="DIMENSIONS",
                   help="files matching a SAM dimensions query instead of a definition")
    g.add_argument("-e", "--experiment",
                   help="SAM experiment (default: catalog.samweb.experiment, $SAM_EXPERIMENT)")


def _state_args(p: argparse.ArgumentParser, *, warm: bool) -> None:
    g = p.add_argument_group("state")
    g.add_argument("--state", metavar="FILE",
                   help="state database (default: state.path, "
                        "$XDG_STATE_HOME/prestaged/state.db)")
    g.add_argument("--fresh-for", metavar="DURATION",
                   help="files touched within this long count as fresh (default 6h)")
    if warm:
        g.add_argument("--no-state", action="store_true",
                       help="run without the state database: no skipping, no record")
        g.add_argument("--force", action="store_true",
                       help="touch fresh files too (still recorded)")


def _storage_args(p: argparse.ArgumentParser, timeout_flag: str) -> None:
    """The ``storage``/``retry`` overrides; ``timeout_flag`` names the per-attempt timeout."""
    g = p.add_argument_group("storage")
    g.add_argument("--concurrency", type=int, metavar="N", help="files in flight (default 32)")
    g.add_argument("--per-host", type=int, metavar="N", help="connections per host (default 32)")
    g.add_argument("--bytes", dest="nbytes", type=int, metavar="N",
                   help="bytes read per file (default 4)")
    g.add_argument("--rate", type=float, metavar="FILES_PER_S",
                   help="limit per endpoint (default unlimited)")
    g.add_argument(timeout_flag, dest="timeout", metavar="DURATION",
                   help="per attempt (default 60s)")
    g.add_argument("--retries", type=int, metavar="N", help="attempts per file (default 5)")


def _gate_args(p: argparse.ArgumentParser) -> None:
    """``--ready``/``--timeout`` of the gate, then the warm, credential and state flags."""
    g = p.add_argument_group("gate")
    g.add_argument("--ready", type=float, default=1.0, metavar="FRACTION",
                   help="warm fraction of the definition required, in (0, 1] (default 1.0)")
    g.add_argument("--timeout", dest="gate_timeout", default="6h", metavar="DURATION",
                   help="give up (exit 1) when not ready within this long (default 6h)")
    g.add_argument("--retry-every", default="10s", metavar="DURATION",
                   help="first wait before retrying the cold files, doubling up to 10m "
                        "(default 10s)")
    _storage_args(p, "--attempt-timeout")
    _credentials(p)
    _state_args(p, warm=False)
    _common(p)


def _add_gate_commands(sub: Any) -> None:
    """``wait`` and ``submit``: hold a submission until its input is warm."""
    w = sub.add_parser("wait", help="warm a definition until enough of it is warm, or time out",
                       description="Warm the cold files of DEFINITION (files fresh within "
                                   "state.fresh_for are skipped) and retry them with backoff "
                                   "until the warm fraction reaches --ready: exit 0; exit 1 "
                                   "at --timeout naming the cold files. Usable as fife_launch's "
                                   "[prelaunch] script.")
    _source_args(w)
    w.add_argument("--json", action="store_true", help="print one JSON document")
    _gate_args(w)
    w.set_defaults(func=_cmd_wait)

    s = sub.add_parser("submit", help="run a command only once its input definition is warm",
                       usage="prestaged submit --definition DEFINITION [options] -- COMMAND "
                             "[ARGS...]",
                       description="Run the gate of `prestaged wait` on --definition, then "
                                   "COMMAND (no shell; stdin, stdout and stderr passed through) "
                                   "and exit with its exit code. COMMAND never runs when the "
                                   "gate fails (exit 1 on timeout, 2-5 as `warm`).")
    _source_args(s, option=True)
    s.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND",
                   help="the command and its arguments, after --")
    _gate_args(s)
    s.set_defaults(func=_cmd_submit, json=False)


def _add_campaign_commands(sub: Any) -> None:
    """``campaign add/run/list/show/hold/release/cancel/retry/mark-submitted``: stages of
    gated submissions, in the foreground or through the daemon."""
    c = sub.add_parser("campaign", help="run or show a campaign of gated submissions",
                       description="A campaign file (TOML) lists stages; each stage's input is "
                                   "split into submissions that are submitted only once their "
                                   "input slice is warm.")
    csub = c.add_subparsers(dest="campaign_command", metavar="ACTION", required=True)
    r = csub.add_parser("run", help="process a campaign in the foreground",
                        description="Process FILE's stages in `after` order: gate each "
                                    "submission's slice, run its submit command, poll its "
                                    "complete command. Exit 0 when every stage is drained and "
                                    "complete (or cancelled), 1 when a submission failed or is "
                                    "launch_unknown, 75 when a hold (`campaign hold`) kept it "
                                    "from launching more. While a submission is submitted and "
                                    "its complete command has not exited 0, its slice is warmed "
                                    "again every keep_warm. Running it again resumes; nothing "
                                    "is submitted twice.")
    r.add_argument("file", type=Path, metavar="FILE", help="campaign file (TOML)")
    _storage_args(r, "--attempt-timeout")
    _credentials(r)
    _state_args(r, warm=False)
    _common(r)
    r.set_defaults(func=_cmd_campaign_run)
    a = csub.add_parser("add", help="give a campaign to the running daemon",
                        description="Validate FILE and send it to the daemon (`prestaged "
                                    "serve` at daemon.listen), which stores it in its state "
                                    "database and runs it like `campaign run`, resuming it "
                                    "after a restart. Adding a campaign of the same name again "
                                    "replaces its stages and keeps its submissions and ledger.")
    a.add_argument("file", type=Path, metavar="FILE", help="campaign file (TOML)")
    a.add_argument("--held", action="store_true",
                   help="hold it at once: nothing is created or launched until `release`")
    _common(a)
    a.set_defaults(func=_cmd_campaign_add)
    li = csub.add_parser("list", help="every campaign with its submissions by state",
                         description="Campaigns known to the running daemon (or, without one "
                                     "or with --state, to the state database).")
    li.add_argument("--json", action="store_true", help="print one JSON document")
    _state_args(li, warm=False)
    _common(li)
    li.set_defaults(func=_cmd_campaign_list)
    s = csub.add_parser("show", help="stages, submissions and their states",
                        description="Stages, controls and submissions of a campaign, with "
                                    "their states, reasons, job ids and how much of each slice "
                                    "is warm: from the running daemon, or (without one, or "
                                    "with --state) from the state database.")
    s.add_argument("campaign", metavar="FILE|NAME", help="campaign file or campaign name")
    s.add_argument("--json", action="store_true",
                   help="print one JSON document (with every transition)")
    _state_args(s, warm=False)
    _common(s)
    s.set_defaults(func=_cmd_campaign_show)
    controls = (
        ("hold", "hold a campaign or stage: `run` creates and launches nothing there "
                 "(a launch due waits; a drainingn slice is chosen only after release)"),
        ("release", "lift a hold; launch_unknown submissions are retried as new submissions"),
        ("cancel", "cancel a campaign or stage for good: nothing more is created or "
                   "launched; queued, prestaging and ready submissions become cancelled"),
    )
    for action, text in controls:
        p = csub.add_parser(action, help=text.split(":")[0].split(";")[0], description=text)
        p.add_argument("campaign", metavar="NAME", help="campaign name")
        p.add_argument("--stage", help="only this stage")
        _state_args(p, warm=False)
        _common(p)
        p.set_defaults(func=_cmd_campaign_action, action=action)
    m = csub.add_parser("mark-submitted", help="record a launch_unknown submission as launched",
                        description="The operator's answer to launch_unknown when the job was "
                                    "in fact launched: the submission becomes submitted with "
                                    "JOB_ID (then `run` polls its complete command).")
    m.add_argument("campaign", metavar="NAME", help="campaign name")
    m.add_argument("--submission", type=int, required=True, metavar="ID",
                   help="submission id (as `campaign show` lists it)")
    m.add_argument("--job-id", required=True, metavar="JOB_ID", help="the launched job's id")
    _state_args(m, warm=False)
    _common(m)
    m.set_defaults(func=_cmd_campaign_action, action="mark-submitted")
    rt = csub.add_parser("retry", help="recover a failed, launch_failed or launch_unknown "
                                       "submission",
                         description="A new submission takes over the slice of submission ID "
                                     "(failed: its gate timed out or it never completed; "
                                     "launch_failed; launch_unknown) and is gated and "
                                     "submitted again by the daemon's next pass or the next "
                                     "`campaign run`. Nothing is ever retried automatically.")
    rt.add_argument("campaign", metavar="NAME", help="campaign name")
    rt.add_argument("--submission", type=int, required=True, metavar="ID",
                    help="submission id (as `campaign show` lists it)")
    _state_args(rt, warm=False)
    _common(rt)
    rt.set_defaults(func=_cmd_campaign_action, action="retry")


def _via_daemon(args: argparse.Namespace, cfg: Config, method: str, path: str,
                body: Optional[dict[str, Any]] = None) -> Optional[Any]:
    """The daemon's answer to ``method path``, or None when ``--state`` was given or nothing
    listens at ``daemon.listen`` (then the command works on the state database itself). A
    daemon that does not answer in time is an error, never "no daemon" (see ``client``)."""
    from prestaged.errors import NotFoundError
    from prestaged.service.client import call

    if getattr(args, "state", None) is not None:
        return None
    try:
        return call(cfg, method, path, body)
    except NotFoundError as e:
        raise NotFoundError(f"{e} (asked the daemon at {cfg.daemon.listen}; --state FILE works "
                            "on a state file instead)") from None


def _cmd_campaign_add(args: argparse.Namespace, cfg: Config) -> int:
    from prestaged.campaign.spec import load_campaign
    from prestaged.service.client import base_url, call

    campaign = load_campaign(args.file)  # the daemon checks again; errors come out here first
    body: dict[str, Any] = {"toml": args.file.read_text(encoding="utf-8"),
                            "source": str(args.file.resolve()), "held": args.held}
    doc = call(cfg, "POST", "/api/v1/campaigns", body)
    if doc is None:
        raise ConfigError(f"campaign add: no prestaged daemon answers at {base_url(cfg)} "
                          "(daemon.listen): start `prestaged serve`, or run the campaign in the "
                          f"foreground with `prestaged campaign run {args.file}`")
    verb = "added" if doc["added"] else "replaced (submissions and ledger kept)"
    print(f"{campaign.name}: {verb}{', held' if args.held else ''}; `prestaged campaign show "
          f"{campaign.name}` follows it")
    return 0


def _cmd_campaign_list(args: argparse.Namespace, cfg: Config) -> int:
    from prestaged.campaign.repository import CampaignRepository as CampaignState

    doc = _via_daemon(args, cfg, "GET", "/api/v1/campaigns")
    if doc is not None:
        rows, source = doc["campaigns"], f"daemon {cfg.daemon.listen}"
    else:
        store = _open_store(args, cfg, must_exist=True)
        try:
            rows = [{**r, "daemon": None} for r in CampaignState(store).summaries()]
        finally:
            store.close()
        source = f"state {store.path}"
    if args.json:
        print(json.dumps({"source": source, "campaigns": rows}, indent=2))
        return 0
    if not rows:
        print(f"no campaigns ({source})")
    for r in rows:
        task = r["daemon"]["status"] if r["daemon"] else "-"
        counts = ", ".join(f"{k} {v}" for k, v in sorted(r["submissions"].items())) or "none"
        print(f"{r['campaign']:<24} {r['control'] or '':<9} daemon {task:<8} submissions: "
              f"{counts}")
    return 0


def _cmd_campaign_action(args: argparse.Namespace, cfg: Config) -> int:
    """hold, release, cancel, retry, mark-submitted: through the daemon when one answers,
    else on the state database; the same ``apply_action`` words the result either way."""
    from urllib.parse import quote

    from prestaged.campaign.actions import apply_action
    from prestaged.campaign.repository import CampaignRepository as CampaignState

    body: dict[str, Any] = {"stage": getattr(args, "stage", None),
                            "submission": getattr(args, "submission", None),
                            "job_id": getattr(args, "job_id", None)}
    body = {k: v for k, v in body.items() if v is not None}
    doc = _via_daemon(args, cfg, "POST",
                      f"/api/v1/campaigns/{quote(args.campaign, safe='')}/{args.action}", body)
    if doc is not None:
        print(doc["result"])
        return 0
    store = _open_store(args, cfg, must_exist=args.action in ("retry", "mark-submitted"))
    try:
        print(apply_action(CampaignState(store), args.campaign, args.action, ahead=True,
                           **body))
    finally:
        store.close()
    return 0


def _context(args: argparse.Namespace, cfg: Config) -> Context:
    """The context of this command: ``cfg`` with ``--proxy``/``--ca-dir`` when given."""
    from prestaged.context import Context  # the storage stack: not for status or --help

    return Context(cfg, proxy=getattr(args, "proxy", None), ca_dir=getattr(args, "ca_dir", None))


def _cmd_campaign_run(args: argparse.Namespace, cfg: Config) -> int:
    from prestaged.campaign.runner import CampaignResult, run_campaign
    from prestaged.campaign.spec import load_campaign

    campaign = load_campaign(args.file)
    ctx = _context(args, cfg)
    creds = ctx.load_credentials()
    kind = campaign.defaults.catalog or cfg.catalog.default
    catalog_creds = ctx.catalog_credentials(creds) if kind == "samweb" else None
    settings = ctx.warm_settings(creds)
    store = ctx.open_store()

    async def go() -> CampaignResult:
        stop = asyncio.Event()
        install_interrupt(stop)
        async with ctx.make_toucher(creds.ssl_context()) as toucher:
            return await run_campaign(
                campaign, store, gate=ctx.gate(store, toucher, settings, stop=stop),
                open_catalog=lambda d: ctx.open_catalog(kind, d, creds=catalog_creds),
                workdir=store.path.parent / "campaigns", stop=stop,
                rewarm=ctx.rewarm(store, toucher, settings, stop=stop))

    try:
        result = run(go())
    finally:
        store.close()
    for stage, outcome in result.stages.items():
        print(f"{campaign.name}/{stage}: {outcome}")
    if result.exit_code == EXIT_HELD:
        print(f"prestaged: campaign {campaign.name} is held: nothing more launched (exit "
              f"{EXIT_HELD}); `prestaged campaign release {campaign.name} [--stage S]` "
              "and run it again", file=sys.stderr)
    return result.exit_code


def _cmd_campaign_show(args: argparse.Namespace, cfg: Config) -> int:
    from urllib.parse import quote

    from prestaged.campaign.repository import CampaignRepository as CampaignState
    from prestaged.campaign.spec import load_campaign

    name = args.campaign
    if Path(name).is_file():
        name = load_campaign(Path(name)).name
    doc = _via_daemon(args, cfg, "GET", f"/api/v1/campaigns/{quote(name, safe='')}")
    if doc is not None:
        doc["source"] = f"daemon {cfg.daemon.listen}"
    else:
        store = _open_store(args, cfg, must_exist=True)
        try:
            doc = CampaignState(store).describe(name, store.path.parent / "campaigns",
                                                cfg.state.fresh_for)
        finally:
            store.close()
        doc["source"] = f"state {store.path}"
        if not doc["submissions"] and not doc["control"]:
            from prestaged.errors import CatalogError

            raise CatalogError(f"campaign '{name}' has no submissions in state {store.path}")
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    _print_campaign(doc)
    return 0


def _print_campaign(doc: dict[str, Any]) -> None:
    """``campaign show``'s text: the campaign, then each stage and its submissions."""
    task = doc.get("daemon")
    head = f"{doc['campaign']}: {doc['control'] or 'active'}"
    if task:
        head += f"; daemon: {task['status']}" + (f" ({task['detail']})" if task["detail"] else "")
    print(f"{head}  [{doc['source']}]")
    for stage in doc["stages"]:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(stage["counts"].items())) or "none"
        control = f" [{stage['control']}]" if stage["control"] else ""
        print(f"{doc['campaign']}/{stage['name']}{control}: {counts}")
        for s in (s for s in doc["submissions"] if s["stage"] == stage["name"]):
            files = "-" if s["n_files"] is None else str(s["n_files"])
            warm = "-" if s["warm_of"] is None else f"{s['warm']}/{s['warm_of']}"
            print(f"  #{s['id']:<4} {s['item']:<12} {s['state']:<14} files {files:<6} "
                  f"warm {warm:<9} job {s['job_id'] or '-'}  {_ago(s['updated'])}: "
                  f"{s['reason'] or '-'}")


def _add_state_commands(sub: Any) -> None:
    """``status`` and ``history``: read the state database."""
    s = sub.add_parser("status", help="how warm recorded definitions are",
                       description="Per definition: files, fresh within state.fresh_for, "
                                   "stale, failed by reason, never tried, and the last run.")
    s.add_argument("definition", nargs="?", help="only this definition")
    s.add_argument("--catalog", dest="status_catalog", help="only this catalog's definition")
    s.add_argument("--json", action="store_true", help="print one JSON document")
    _state_args(s, warm=False)
    _common(s)
    s.set_defaults(func=_cmd_status)

    h = sub.add_parser("history", help="recent warm runs",
                       description="Recent runs, newest first, with their counts and result.")
    h.add_argument("--limit", type=int, default=20, metavar="N", help="runs shown (default 20)")
    h.add_argument("--json", action="store_true", help="print one JSON document")
    _state_args(h, warm=False)
    _common(h)
    h.set_defaults(func=_cmd_history)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="prestaged",
        description="Prestage and keep warm grid datasets on tape-backed disk caches.",
    )
    parser.add_argument("--version", action="version", version=f"prestaged {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    w = sub.add_parser("warm", help="touch the first bytes of every file of a definition",
                       description="Touch the first bytes of every file of a definition with an "
                                   "X.509-authenticated ranged GET, resetting the cache's "
                                   "LRU clock.")
    _source_args(w)
    _storage_args(w, "--timeout")
    _credentials(w)
    _state_args(w, warm=True)
    o = w.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON document")
    o.add_argument("--dry-run", action="store_true",
                   help="list the URLs that would be touched; touch nothing")
    bar = o.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="bar", action="store_true", default=None,
                     help="progress bar even when stderr is not a terminal")
    bar.add_argument("--no-progress", dest="bar", action="store_false",
                     help="periodic progress lines instead of a bar")
    o.add_argument("--progress-interval", metavar="DURATION",
                   help="between progress lines when not a terminal (default 30s)")
    _common(w)
    w.set_defaults(func=_cmd_warm)

    f = sub.add_parser("files", help="list the URLs a definition resolves to",
                       description="Resolve a definition through its catalog and print one URL "
                                   "per line (a list `prestaged warm` reads back); files that "
                                   "resolve to no URL are reported on stderr and make exit 1. "
                                   "Touches nothing.")
    _source_args(f)
    _credentials(f)
    f.add_argument("--json", action="store_true",
                   help="print one JSON document (names, URLs, sizes, unresolved files)")
    _common(f)
    f.set_defaults(func=_cmd_files)

    _add_state_commands(sub)
    _add_gate_commands(sub)
    _add_campaign_commands(sub)

    v = sub.add_parser("serve", help="run the daemon: keep [[watch]] definitions warm, HTTP API",
                       description="Run as a service (systemd Type=notify): warm the config's "
                                   "[[watch]] definitions on schedule, take warm requests on the "
                                   "HTTP API, serve /metrics. SIGHUP reloads, SIGTERM drains.")
    _common(v)
    v.set_defaults(func=_cmd_serve)

    p = sub.add_parser("proxy", help="show the X.509 proxy prestaged would use",
                       description="Show the proxy's DN, type and time left; exit 3 if unusable.")
    _credentials(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    _common(p)
    p.set_defaults(func=_cmd_proxy)

    d = sub.add_parser("demo", help="warm a generated dataset on a local test storage",
                       description="Start a test HTTPS storage on 127.0.0.1 with a fresh test PKI, "
                                   "warm a generated definition through the real CLI, clean up.")
    d.add_argument("--files", type=int, default=2000, metavar="N", help="files (default 2000)")
    d.add_argument("--redirect", action="store_true",
                   help="door redirects to a pool, like dCache")
    d.add_argument("--keep", action="store_true", help="keep the temporary directory")
    d.add_argument("--catalog", dest="demo_catalog", choices=("local", "samweb"),
                   default="local",
                   help="resolve the definition with a local file (default) or through a "
                        "SAM web emulator")
    _common(d)
    d.set_defaults(func=_cmd_demo)
    return parser


def _load(args: argparse.Namespace) -> Config:
    cfg = load_config(find_config(args.config))
    for dest, key in _OVERRIDES.items():
        value = getattr(args, dest, None)
        if value is not None:
            cfg = replace_path(cfg, key, value, label="--" + dest.replace("_", "-")
                               if dest != "nbytes" else "--bytes")
    return cfg


def _setup_logging(args: argparse.Namespace, cfg: Config) -> None:
    level = cfg.output.log_level.upper()
    if args.verbose:
        level = "DEBUG"
    elif args.quiet:
        level = "WARNING"
    # Our own handler, replaced on every call (not basicConfig, which does nothing once the
    # root logger has a handler): main() may run more than once in a process (tests, demo).
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "prestaged-cli"]:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name("prestaged-cli")
    handler.setFormatter(logging.Formatter("prestaged: %(levelname)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("asyncio").setLevel(logging.WARNING)


def _cmd_proxy(args: argparse.Namespace, cfg: Config) -> int:
    from prestaged.credentials import (
        check_lifetime,
        format_timedelta,
        inspect_proxy,
        resolve_proxy_path,
    )

    path, source = resolve_proxy_path(args.proxy, cfg.credentials.proxy)
    info = inspect_proxy(path)
    left = info.time_left()
    if args.json:
        print(json.dumps({
            "path": str(info.path), "source": source, "subject": info.subject,
            "identity": info.identity, "issuer": info.issuer, "type": info.kind,
            "not_after": info.not_after.isoformat(), "seconds_left": int(left.total_seconds()),
        }, indent=2))
    else:
        print(f"path      : {info.path} ({source})")
        print(f"subject   : {info.subject}")
        print(f"identity  : {info.identity}")
        print(f"type      : {info.kind}")
        until = f"{info.not_after:%Y-%m-%d %H:%M:%S} UTC"
        print(f"timeleft  : {format_timedelta(left)} (until {until})")
    check_lifetime(info, cfg.credentials.min_lifetime)
    return 0


def _open(args: argparse.Namespace, cfg: Config) -> Catalog:
    """The catalog for the command line's DEFINITION or --dims."""
    ctx = _context(args, cfg)
    return ctx.open_catalog(args.catalog, ctx.definition_name(args.definition, args.dims),
                            dims=args.dims)


def _cmd_warm(args: argparse.Namespace, cfg: Config) -> int:
    if args.dry_run:
        return run(_dry_run(_open(args, cfg), as_json=args.json))
    ctx = _context(args, cfg)
    catalog, creds = ctx.open_for_warm(args.catalog, args.definition, args.dims)
    bar = sys.stderr.isatty() if args.bar is None else args.bar
    if args.json or args.quiet:
        bar = False
    store = None if args.no_state else ctx.open_store()
    try:
        return run(_warm(catalog, ctx, creds, bar=bar, as_json=args.json, quiet=args.quiet,
                         store=store, force=args.force))
    finally:
        if store is not None:
            store.close()


def _gate(args: argparse.Namespace, cfg: Config) -> GateResult:
    """Run the gate of ``wait``/``submit`` on the command line's definition."""
    from prestaged.config import parse_duration
    from prestaged.gate import check_ready, wait_until_ready

    try:
        timeout = parse_duration(args.gate_timeout)
    except ValueError as e:
        raise ConfigError(f"--timeout: {e}") from e
    try:
        retry = parse_duration(args.retry_every)
    except ValueError as e:
        raise ConfigError(f"--retry-every: {e}") from e
    check_ready(args.ready)
    ctx = _context(args, cfg)
    catalog, creds = ctx.open_for_warm(args.catalog, args.definition, args.dims)
    settings = ctx.warm_settings(creds)
    store = ctx.open_store()

    async def gate() -> GateResult:
        stop = asyncio.Event()
        install_interrupt(stop)
        async with ctx.make_toucher(creds.ssl_context()) as toucher:
            return await wait_until_ready(catalog, settings, toucher, store,
                                          fresh_for=cfg.state.fresh_for, ready=args.ready,
                                          timeout=timeout, retry_initial=retry, stop=stop)

    try:
        return run(gate())
    finally:
        store.close()


def _cmd_wait(args: argparse.Namespace, cfg: Config) -> int:
    result = _gate(args, cfg)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    elif result.passed:
        print(result.summary())
    if not result.passed:
        print(f"prestaged: error: {result.summary()}", file=sys.stderr)
    return result.exit_code


def _cmd_submit(args: argparse.Namespace, cfg: Config) -> int:
    from prestaged.gate import run_command

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise ConfigError("submit: give the command after --, e.g. "
                          "prestaged submit --definition D -- fife_launch -c job.cfg")
    result = _gate(args, cfg)
    if not result.passed:
        print(f"prestaged: error: {result.summary()}; not running {argv[0]}", file=sys.stderr)
        return result.exit_code
    if not args.quiet:
        print(f"prestaged: {result.summary()}; running {argv[0]}", file=sys.stderr)
    sys.stdout.flush()
    try:
        return run_command(argv)
    except OSError as e:
        print(f"prestaged: error: {argv[0]}: cannot run: {e.strerror or e}", file=sys.stderr)
        return 127 if isinstance(e, FileNotFoundError) else 126


def _open_store(args: argparse.Namespace, cfg: Config, *, must_exist: bool = False) -> Store:
    return _context(args, cfg).open_store(must_exist=must_exist)


def _ago(when: Optional[float]) -> str:
    import time

    if when is None:
        return "-"
    from prestaged.credentials import format_timedelta

    return format_timedelta(timedelta(seconds=max(0.0, time.time() - when))) + " ago"


def _daemon_status(args: argparse.Namespace, cfg: Config) -> Optional[list[Any]]:
    """Warmth as the running daemon (``daemon.listen``) reports it, or None when none answers.

    An explicit ``--state`` always reads that file instead.
    """
    import urllib.parse

    from prestaged.state.store import DatasetStatus, RunRecord

    query = urllib.parse.urlencode({"catalog": args.status_catalog} if args.status_catalog
                                   else {})
    doc = _via_daemon(args, cfg, "GET", f"/api/v1/datasets?{query}")
    if doc is None:
        return None
    rows = []
    for d in doc.get("definitions", []):
        if args.definition is not None and d["definition"] != args.definition:
            continue
        last = RunRecord(**d["last_run"]) if d.get("last_run") else None
        rows.append(DatasetStatus(**{**d, "last_run": last}))
    log.debug("status from the daemon at %s", cfg.daemon.listen)
    return rows


def _cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    rows = _daemon_status(args, cfg)
    source = f"daemon http://{cfg.daemon.listen}"
    if rows is None:
        store = _open_store(args, cfg, must_exist=True)
        try:
            rows = store.status(cfg.state.fresh_for, args.definition, args.status_catalog)
        finally:
            store.close()
        source = f"state {store.path}"
    if args.definition is not None and not rows:
        from prestaged.errors import CatalogError

        raise CatalogError(f"definition '{args.definition}' has no record in {source}")
    if args.json:
        print(json.dumps({"source": source, "fresh_for_seconds": cfg.state.fresh_for,
                          "definitions": [r.to_dict() for r in rows]}, indent=2))
        return 0
    print(f"{'definition':<32} {'catalog':<8} {'files':>8} {'fresh':>8} {'stale':>7} "
          f"{'failed':>7} {'never':>7}  last run")
    for r in rows:
        last = "-"
        if r.last_run is not None:
            lr = r.last_run
            last = f"{_ago(lr.started)}, {lr.reason or 'running'} (exit {lr.exit_code})"
        failed = sum(r.failed.values())
        print(f"{r.definition:<32} {r.catalog:<8} {r.files:>8} {r.fresh:>8} {r.stale:>7} "
              f"{failed:>7} {r.never:>7}  {last}")
        if r.failed:
            print("  failed: " + ", ".join(f"{k} {v}" for k, v in sorted(r.failed.items())))
    return 0


def _cmd_history(args: argparse.Namespace, cfg: Config) -> int:
    store = _open_store(args, cfg, must_exist=True)
    try:
        runs = store.runs(limit=args.limit)
    finally:
        store.close()
    if args.json:
        print(json.dumps({"state": str(store.path), "runs": [r.to_dict() for r in runs]},
                         indent=2))
        return 0
    for r in runs:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(r.counts.items()) if v) or "-"
        print(f"#{r.id:<5} {_ago(r.started):<14} {r.catalog}:{r.definition}  "
              f"exit {r.exit_code if r.exit_code is not None else '-'}  "
              f"{r.reason or 'running'}  [{counts}]")
    return 0


def _source(catalog: Any) -> str:
    return str(getattr(catalog, "source", None) or getattr(catalog, "path", catalog.definition))


_SHOWN_UNRESOLVED = 20


def _unresolved_json(catalog: Any) -> dict[str, Any]:
    """``unresolved``/``unresolved_count`` for a JSON document ({} for catalogs without)."""
    count = int(getattr(catalog, "unresolved_count", 0))
    if not hasattr(catalog, "unresolved_count"):
        return {}
    kept = [u.to_dict() for u in catalog.unresolved]
    return {"unresolved_count": count, "unresolved": kept,
            "unresolved_omitted": max(0, count - len(kept))}


def _unresolved_text(catalog: Any, *, limit: Optional[int] = _SHOWN_UNRESOLVED) -> str:
    """Lines naming the files that got no URL ("" when there are none)."""
    count = int(getattr(catalog, "unresolved_count", 0))
    if not count:
        return ""
    kept = catalog.unresolved if limit is None else catalog.unresolved[:limit]
    more = "" if len(kept) == count else f" ({len(kept)} shown; --json lists more)"
    lines = [f"unresolved: {count} file{'s' if count != 1 else ''} got no URL and "
             f"{'were' if count != 1 else 'was'} not touched{more}:"]
    for u in kept:
        lines.append(f"  {u.name}  {u.reason}: {', '.join(u.locations) or '-'}")
    return "\n".join(lines)


def _with_unresolved(catalog: Any, code: int) -> int:
    """Unresolved files fail a run that is otherwise all warm, like a missing file does."""
    if code == EXIT_OK and int(getattr(catalog, "unresolved_count", 0)):
        return EXIT_SOME_FAILED
    return code


async def _dry_run(catalog: Any, *, as_json: bool) -> int:
    seen: set[str] = set()
    urls = []
    async for ref in catalog.files():
        if ref.url in seen:
            continue
        seen.add(ref.url)
        if as_json:
            urls.append(ref.url)
        else:
            print(ref.url)
    code = _with_unresolved(catalog, EXIT_OK)
    if as_json:
        print(json.dumps({"definition": catalog.definition, "catalog": catalog.name,
                          "files": len(seen), "urls": urls, **_unresolved_json(catalog),
                          "exit_code": code}, indent=2))
    else:
        print(f"# {len(seen)} files would be touched; nothing was touched", file=sys.stderr)
        if code:
            print(_unresolved_text(catalog), file=sys.stderr)
    return code


def _cmd_files(args: argparse.Namespace, cfg: Config) -> int:
    return run(_list_files(_open(args, cfg), as_json=args.json))


async def _list_files(catalog: Any, *, as_json: bool) -> int:
    """``prestaged files``: every resolved file, then the unresolved ones; exit 1 if any."""
    files = []
    count = 0
    async for ref in catalog.files():
        count += 1
        if as_json:
            files.append({"name": ref.name, "url": ref.url, "size": ref.size})
        else:
            print(ref.url)
    code = _with_unresolved(catalog, EXIT_OK)
    if as_json:
        print(json.dumps({"definition": catalog.definition, "catalog": catalog.name,
                          "source": _source(catalog), "resolved": count, "files": files,
                          **_unresolved_json(catalog), "exit_code": code}, indent=2))
        return code
    unresolved = getattr(catalog, "unresolved_count", 0)
    print(f"# {catalog.definition} ({catalog.name} catalog: {_source(catalog)}): {count} files "
          f"resolved, {unresolved} unresolved", file=sys.stderr)
    if unresolved:
        print(_unresolved_text(catalog, limit=None), file=sys.stderr)
    return code


async def _warm(catalog: Catalog, ctx: Context, creds: Credentials, *, bar: bool,
                as_json: bool, quiet: bool, store: Optional[Store], force: bool) -> int:
    from prestaged.cli.render import Progress, report_json, report_text
    from prestaged.runner import run_definition
    from prestaged.warm import Tally

    stop = asyncio.Event()
    install_interrupt(stop)
    tally = Tally(total_hint=await catalog.estimate())
    interval = 0.1 if bar else ctx.cfg.output.progress_interval
    progress = Progress(tally, bar=bar, interval=interval)
    if not as_json and not quiet:
        progress.start()
    try:
        async with ctx.make_toucher(creds.ssl_context()) as toucher:
            report = await run_definition(catalog, ctx.warm_settings(creds), toucher, store=store,
                                          fresh_for=ctx.cfg.state.fresh_for, force=force,
                                          tally=tally, stop=stop)
    finally:
        await progress.stop()
    where = dict(definition=catalog.definition, catalog=catalog.name, source=_source(catalog))
    code = _with_unresolved(catalog, report.exit_code)
    if as_json:
        doc = report_json(report, **where)
        doc.update(_unresolved_json(catalog))
        doc["exit_code"] = code
        print(json.dumps(doc, indent=2))
    elif not quiet or code:
        print(report_text(report, **where))
        if getattr(catalog, "unresolved_count", 0):
            print(_unresolved_text(catalog))
    if report.aborted is not None:
        print(f"prestaged: error: {report.aborted}", file=sys.stderr)
    return code


def _cmd_serve(args: argparse.Namespace, cfg: Config) -> int:
    from prestaged.service.daemon import Daemon

    return run(Daemon(cfg, cfg.source).run())


def _cmd_demo(args: argparse.Namespace, cfg: Config) -> int:
    from prestaged.demo import run_demo

    return run_demo(files=args.files, redirect=args.redirect, keep=args.keep, main=main,
                    catalog=args.demo_catalog)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``prestaged`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace, Config], int] = args.func
    try:
        cfg = _load(args)
        _setup_logging(args, cfg)
        return func(args, cfg)
    except PrestagedError as e:
        print(f"prestaged: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("prestaged: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
