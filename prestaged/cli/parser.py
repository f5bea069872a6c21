"""The ``prestaged`` argument parser: every subcommand, its options, and its handler.

Options that several commands share (the config file and verbosity, credentials, state, the
storage overrides, the definition and its catalog, the gate) are each declared once, in a
parent parser (argparse ``parents=``) that keeps them in their own titled group of ``--help``.
A command's own options are declared in a parent of their own (``own``) passed first, so that
its usage line names them before the shared ones. Every flag that overrides a config key is
listed in ``OVERRIDES``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, Optional

from prestaged import __version__
from prestaged.cli.campaign import (
    cmd_campaign_action,
    cmd_campaign_add,
    cmd_campaign_forget,
    cmd_campaign_list,
    cmd_campaign_run,
    cmd_campaign_show,
)
from prestaged.cli.credentials import cmd_credentials
from prestaged.cli.gate import cmd_submit, cmd_wait
from prestaged.cli.serve import cmd_demo, cmd_serve
from prestaged.cli.state import cmd_forget, cmd_history, cmd_status
from prestaged.cli.tape import cmd_release
from prestaged.cli.warm import cmd_files, cmd_warm
from prestaged.config import CATALOG_KINDS

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["OVERRIDES", "build_parser"]

OVERRIDES = {
    "min_lifetime": "credentials.min_lifetime",
    "auth": "credentials.method",
    "concurrency": "storage.concurrency",
    "per_host": "storage.per_host",
    "nbytes": "storage.bytes",
    "rate": "storage.rate",
    "timeout": "storage.timeout",
    "stage_mode": "storage.stage",
    "retries": "retry.attempts",
    "catalog": "catalog.default",
    "catalog_dir": "catalog.local.dir",
    "experiment": "catalog.samweb.experiment",
    "progress_interval": "output.progress_interval",
    "state": "state.path",
    "fresh_for": "state.fresh_for",
}
"""Flag destination -> the config key it overrides (through the config's own validation)."""


def _parent() -> argparse.ArgumentParser:
    # Parents carry no -h of their own: the command that inherits them adds it.
    return argparse.ArgumentParser(add_help=False)


def _common() -> argparse.ArgumentParser:
    p = _parent()
    g = p.add_argument_group("common options")
    g.add_argument("--config", type=Path, metavar="FILE",
                   help="config file (default: $PRESTAGED_CONFIG, $XDG_CONFIG_HOME/"
                        "prestaged/prestaged.toml (~/.config/...), /etc/prestaged/"
                        "prestaged.toml)")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    g.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


def _credentials() -> argparse.ArgumentParser:
    p = _parent()
    g = p.add_argument_group("credentials")
    g.add_argument("--proxy", type=Path, metavar="FILE",
                   help="X.509 proxy (default: credentials.proxy, $X509_USER_PROXY, "
                        "/tmp/x509up_u<uid>)")
    g.add_argument("--ca-dir", type=Path, metavar="DIR",
                   help="hashed CA directory (default: credentials.ca_dir, $X509_CERT_DIR, "
                        "/etc/grid-security/certificates)")
    g.add_argument("--min-lifetime", metavar="DURATION",
                   help="refuse a proxy with less time left (default 1h)")
    g.add_argument("--token-file", type=Path, metavar="FILE",
                   help="WLCG bearer token file (default: credentials.token_file, "
                        "$BEARER_TOKEN, $BEARER_TOKEN_FILE, $XDG_RUNTIME_DIR/bt_u<uid>, "
                        "/tmp/bt_u<uid>)")
    g.add_argument("--auth", choices=("auto", "token", "proxy"),
                   help="credentials to use: auto = the token and/or the proxy, whichever are "
                        "found (default: credentials.method, auto)")
    return p


def _source(*, option: bool) -> argparse.ArgumentParser:
    """DEFINITION (positional, or ``--definition`` when ``option``), catalog and SAM flags."""
    p = _parent()
    what = "definition name, or a text file of URLs (one per line)"
    if option:
        p.add_argument("--definition", metavar="DEFINITION", help=what + " (or --dims/--mql)")
    else:
        p.add_argument("definition", nargs="?", help=what + "; a MetaCat dataset is "
                                                            "namespace:name")
    p.add_argument("--catalog", help="catalog that resolves DEFINITION: local, samweb or "
                                     "metacat (default: catalog.default; --dims implies "
                                     "samweb, --mql metacat)")
    p.add_argument("--catalog-dir", metavar="DIR", help="directory of NAME.txt definitions")
    g = p.add_argument_group("SAM web")
    g.add_argument("--dims", metavar="DIMENSIONS",
                   help="files matching a SAM dimensions query instead of a definition")
    g.add_argument("-e", "--experiment",
                   help="SAM experiment (default: catalog.samweb.experiment, $SAM_EXPERIMENT)")
    g = p.add_argument_group("MetaCat")
    g.add_argument("--mql", metavar="QUERY",
                   help="files matching a MetaCat MQL query (\"files from ns:name where ...\") "
                        "instead of a dataset; replicas from Rucio")
    return p


def _state(*, warm: bool) -> argparse.ArgumentParser:
    """``--state``/``--fresh-for``; ``warm`` adds ``--no-state`` and ``--force``."""
    p = _parent()
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
    return p



def _tape_mode(value: str) -> str:
    """``--stage``'s value: the tape mode. (On ``campaign hold/release/cancel`` ``--stage``
    names a campaign stage; ``campaign run --stage reco2`` said only "invalid choice".)"""
    if value in ("auto", "never", "always"):
        return value
    raise argparse.ArgumentTypeError(
        f"{value!r} is no tape mode (auto, never, always): --stage here is how tape-only files "
        "are brought to disk, not a campaign stage (`campaign run` runs every stage; "
        "`campaign hold NAME --stage S` holds one)")

def _storage(timeout_flag: str) -> argparse.ArgumentParser:
    """The ``storage``/``retry`` overrides; ``timeout_flag`` names the per-attempt timeout
    (``--timeout`` for ``warm``; the gate's own ``--timeout`` is the whole wait)."""
    p = _parent()
    g = p.add_argument_group("storage")
    g.add_argument("--concurrency", type=int, metavar="N", help="files in flight (default 32)")
    g.add_argument("--per-host", type=int, metavar="N", help="connections per host (default 32)")
    g.add_argument("--bytes", dest="nbytes", type=int, metavar="N",
                   help="bytes read per file (default 4)")
    g.add_argument("--rate", type=float, metavar="FILES_PER_S",
                   help="limit per endpoint (default unlimited)")
    p.set_defaults(timeout_flag=timeout_flag)  # how errors name it
    g.add_argument(timeout_flag, dest="timeout", metavar="DURATION",
                   help="per attempt (default 60s)")
    g.add_argument("--retries", type=int, metavar="N", help="attempts per file (default 5)")
    g.add_argument("--stage", dest="stage_mode", type=_tape_mode, metavar="{auto,never,always}",
                   help="tape: auto stages tape-only files where the storage publishes the WLCG "
                        "Tape REST API and touches the rest; never only touches (a GET of a "
                        "tape-only file makes the door recall it and block); always fails "
                        "(exit 5) where the API is missing (default auto)")
    return p


def _gate() -> argparse.ArgumentParser:
    """``--ready``/``--timeout``/``--retry-every``/``--allow-empty`` of ``wait`` and
    ``submit``."""
    p = _parent()
    g = p.add_argument_group("gate")
    g.add_argument("--ready", type=float, default=1.0, metavar="FRACTION",
                   help="warm fraction of the definition required, in (0, 1] (default 1.0)")
    g.add_argument("--timeout", dest="gate_timeout", default="6h", metavar="DURATION",
                   help="give up (exit 1) when not ready within this long (default 6h)")
    g.add_argument("--retry-every", default="10s", metavar="DURATION",
                   help="first wait before retrying the cold files, doubling up to 10m "
                        "(default 10s)")
    g.add_argument("--allow-empty", action="store_true",
                   help="let a definition with no files pass (by default it fails with exit "
                        "4: an empty input is almost always a wrong name or query)")
    return p


@dataclass(frozen=True)
class _Parents:
    """Each shared option set, built once per ``build_parser`` and inherited by commands."""

    common: argparse.ArgumentParser
    credentials: argparse.ArgumentParser
    state: argparse.ArgumentParser
    warm_state: argparse.ArgumentParser
    definition: argparse.ArgumentParser
    definition_option: argparse.ArgumentParser
    storage: argparse.ArgumentParser
    attempt_storage: argparse.ArgumentParser
    gate: argparse.ArgumentParser

    @classmethod
    def build(cls) -> _Parents:
        """Every parent parser, fresh."""
        return cls(common=_common(), credentials=_credentials(), state=_state(warm=False),
                   warm_state=_state(warm=True), definition=_source(option=False),
                   definition_option=_source(option=True), storage=_storage("--timeout"),
                   attempt_storage=_storage("--attempt-timeout"), gate=_gate())

    def gated(self) -> list[argparse.ArgumentParser]:
        """What ``wait`` and ``submit`` take after their definition: gate, storage (with
        ``--attempt-timeout``), credentials, state, common."""
        return [self.gate, self.attempt_storage, self.credentials, self.state, self.common]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (exit 2), pointing at ``--help``
    instead of printing the whole usage block before the line that matters. Arguments no
    command takes are named by the top parser: ``parse_args`` points at the help of the
    command they were given to (``prestaged warm --help``, not ``prestaged --help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args: Optional[Sequence[str]] = None,  # type: ignore[override]
                   namespace: Optional[argparse.Namespace] = None) -> argparse.Namespace:
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            argv = list(sys.argv[1:] if args is None else args)
            help_of = _command_parser(self, argv)
            self.exit(2, f"{self.prog}: error: unrecognized arguments: {' '.join(extra)} "
                         f"(see {help_of.prog} --help)\n")
        return parsed


def _command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The (sub)command parser ``argv`` reaches: its first word naming a subcommand, then the
    same in what follows it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for i, word in enumerate(argv):
                if word in action.choices:
                    return _command_parser(action.choices[word], argv[i + 1:])
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand; each sets ``func`` to its ``Command``."""
    parser: argparse.ArgumentParser = _Parser(
        prog="prestaged",
        description="Prestage and keep warm grid datasets on tape-backed disk caches.",
    )
    parser.add_argument("--version", action="version", version=f"prestaged {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parents = _Parents.build()
    _add_warm(sub, parents)
    _add_files(sub, parents)
    _add_state_commands(sub, parents)
    _add_release(sub, parents)
    _add_forget(sub, parents)
    _add_gate_commands(sub, parents)
    _add_campaign_commands(sub, parents)
    _add_serve(sub, parents)
    _add_credentials(sub, parents)
    _add_demo(sub, parents)
    return parser


def _add_warm(sub: Subparsers, parents: _Parents) -> None:
    """``warm``: touch every file of a definition."""
    w = sub.add_parser("warm", help="touch the first bytes of every file of a definition",
                       description="Touch the first bytes of every file of a definition with an "
                                   "X.509-authenticated ranged GET, resetting the cache's "
                                   "LRU clock.",
                       parents=[parents.definition, parents.storage, parents.credentials,
                                parents.warm_state, parents.common])
    # Declared here, not in a parent: argparse moves a parent's mutually exclusive group out of
    # its titled group (Python 3.11 does, and 3.9), and --progress/--no-progress belong under
    # "output", so this group follows "common options" in warm --help.
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
    w.set_defaults(func=cmd_warm)


def _add_files(sub: Subparsers, parents: _Parents) -> None:
    """``files``: list the URLs of a definition."""
    own = _parent()
    own.add_argument("--json", action="store_true",
                     help="print one JSON document (names, URLs, sizes, unresolved files)")
    f = sub.add_parser("files", help="list the URLs a definition resolves to",
                       description="Resolve a definition through its catalog and print one URL "
                                   "per line (a list `prestaged warm` reads back); files that "
                                   "resolve to no URL are reported on stderr and make exit 1. "
                                   "Touches nothing.",
                       parents=[parents.definition, parents.credentials, own, parents.common])
    f.set_defaults(func=cmd_files)


def _add_state_commands(sub: Subparsers, parents: _Parents) -> None:
    """``status`` and ``history``: read the state database."""
    own = _parent()
    own.add_argument("definition", nargs="?", help="only this definition")
    own.add_argument("--catalog", dest="status_catalog", choices=CATALOG_KINDS,
                     help="only this catalog's definition")
    own.add_argument("--json", action="store_true", help="print one JSON document")
    own.add_argument("--members", action="store_true",
                     help="list the daemons sharing this state instead: host, pid, API "
                          "address, heartbeat age, alive or dead ([cluster] lease), leases held")
    s = sub.add_parser("status", help="how warm recorded definitions are",
                       description="Per definition: files, fresh within state.fresh_for, "
                                   "stale, failed by reason, never tried, and the last run; "
                                   "--members: the daemons sharing the state instead.",
                       parents=[own, parents.state, parents.common])
    s.set_defaults(func=cmd_status)

    own = _parent()
    own.add_argument("--limit", type=int, default=20, metavar="N",
                     help="runs shown (default 20)")
    own.add_argument("--json", action="store_true", help="print one JSON document")
    h = sub.add_parser("history", help="recent warm runs",
                       description="Recent runs, newest first, with their counts and result.",
                       parents=[own, parents.state, parents.common])
    h.set_defaults(func=cmd_history)


def _recorded_definition() -> argparse.ArgumentParser:
    """A command's own parser, holding a definition the state recorded and its catalog."""
    own = _parent()
    own.add_argument("definition", help="definition name, or the text file of URLs warmed")
    own.add_argument("--catalog", metavar="KIND", choices=CATALOG_KINDS,
                     help="catalog DEFINITION was warmed with: local, samweb or metacat "
                          "(default: catalog.default)")
    return own


def _add_forget(sub: Subparsers, parents: _Parents) -> None:
    """``forget``: drop a definition from the state."""
    own = _recorded_definition()
    own.add_argument("--force", action="store_true",
                     help="forget it even while watched, running or pinned")
    own.add_argument("--json", action="store_true", help="print one JSON document")
    f = sub.add_parser("forget", help="drop a definition and its history from the state",
                       description="Drop DEFINITION from the state database: its runs, its "
                                   "members, its watch rounds, and every file no definition "
                                   "lists any more (the catalog and the storage are not "
                                   "asked). Refused while this config watches it, while a run "
                                   "of it has no end recorded, or while prestaged's stage "
                                   "requests pin its files for it alone (run `prestaged "
                                   "release` first), unless --force. Exit 0 once forgotten; "
                                   "4 for a definition the state does not know; 2 when "
                                   "refused (nothing dropped).",
                       parents=[own, parents.state, parents.common])
    f.set_defaults(func=cmd_forget)


def _add_release(sub: Subparsers, parents: _Parents) -> None:
    """``release``: drop the tape pins prestaged holds on a definition's files."""
    own = _recorded_definition()
    own.add_argument("--json", action="store_true", help="print one JSON document")
    r = sub.add_parser("release", help="release the tape pins prestaged holds on a definition",
                       description="Release the disk pins that prestaged's stage requests hold "
                                   "for DEFINITION's files, as the state database recorded them "
                                   "(the catalog is not asked): one release request per stage "
                                   "request (files not on disk yet are cancelled first), then "
                                   "the pins are cleared in the state. A pin another "
                                   "definition relies on too is kept for it. The files "
                                   "stay on disk until the storage evicts them. Exit 0 also "
                                   "when nothing is pinned; 4 for a definition the state does "
                                   "not know; 3 or 5 when the storage refuses (what was "
                                   "released before is recorded).",
                       parents=[own, parents.credentials, parents.state, parents.common])
    r.set_defaults(func=cmd_release)


def _add_gate_commands(sub: Subparsers, parents: _Parents) -> None:
    """``wait`` and ``submit``: hold a submission until its input is warm."""
    own = _parent()
    own.add_argument("--json", action="store_true", help="print one JSON document")
    w = sub.add_parser("wait", help="warm a definition until enough of it is warm, or time out",
                       description="Warm the cold files of DEFINITION (files fresh within "
                                   "state.fresh_for are skipped) and retry them with backoff "
                                   "until the warm fraction reaches --ready: exit 0; exit 1 "
                                   "at --timeout naming the cold files. Usable as fife_launch's "
                                   "[prelaunch] script.",
                       parents=[parents.definition, own, *parents.gated()])
    w.set_defaults(func=cmd_wait)

    s = sub.add_parser("submit", help="run a command only once its input definition is warm",
                       usage="prestaged submit --definition DEFINITION [options] -- COMMAND "
                             "[ARGS...]",
                       description="Run the gate of `prestaged wait` on --definition, then "
                                   "COMMAND (no shell; stdin, stdout and stderr passed through) "
                                   "and exit with its exit code. COMMAND never runs when the "
                                   "gate fails (exit 1 on timeout, 2-5 as `warm`).",
                       parents=[parents.definition_option, *parents.gated()])
    s.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND",
                   help="the command and its arguments, after --")
    s.set_defaults(func=cmd_submit, json=False)


def _add_campaign_commands(sub: Subparsers, parents: _Parents) -> None:
    """``campaign add/run/list/show/hold/release/cancel/retry/mark-submitted/forget``: stages
    of gated submissions, in the foreground or through the daemon."""
    c = sub.add_parser("campaign", help="run or show a campaign of gated submissions",
                       description="A campaign file (TOML) lists stages; each stage's input is "
                                   "split into submissions that are submitted only once their "
                                   "input slice is warm.")
    csub = c.add_subparsers(dest="campaign_command", metavar="ACTION", required=True)
    _add_campaign_run_add(csub, parents)
    _add_campaign_views(csub, parents)
    _add_campaign_actions(csub, parents)


def _add_campaign_run_add(csub: Subparsers, parents: _Parents) -> None:
    """``campaign run`` (in the foreground) and ``campaign add`` (to the daemon)."""
    r = csub.add_parser("run", help="process a campaign in the foreground",
                        description="Process FILE's stages in `after` order: gate each "
                                    "submission's slice, run its submit command, poll its "
                                    "complete command. Exit 0 when every stage is drained and "
                                    "complete (or cancelled), 1 when a submission failed or is "
                                    "launch_unknown, 75 when a hold (`campaign hold`) kept it "
                                    "from launching more. While a submission is submitted and "
                                    "its complete command has not exited 0, its slice is warmed "
                                    "again every keep_warm. Running it again resumes; nothing "
                                    "is submitted twice.",
                        parents=[parents.attempt_storage, parents.credentials, parents.state,
                                 parents.common])
    r.add_argument("file", type=Path, metavar="FILE", help="campaign file (TOML)")
    r.set_defaults(func=cmd_campaign_run)

    own = _parent()
    own.add_argument("file", type=Path, metavar="FILE", help="campaign file (TOML)")
    own.add_argument("--held", action="store_true",
                     help="hold it at once: nothing is created or launched until `release`")
    a = csub.add_parser("add", help="give a campaign to the running daemon",
                        description="Validate FILE and send it to the daemon (`prestaged "
                                    "serve` at daemon.listen), which stores it in its state "
                                    "database and runs it like `campaign run`, resuming it "
                                    "after a restart. Adding a campaign of the same name again "
                                    "replaces its stages and keeps its submissions and ledger.",
                        parents=[own, parents.common])
    a.set_defaults(func=cmd_campaign_add)


def _add_campaign_views(csub: Subparsers, parents: _Parents) -> None:
    """``campaign list`` and ``campaign show``."""
    own = _parent()
    own.add_argument("--json", action="store_true", help="print one JSON document")
    li = csub.add_parser("list", help="every campaign with its submissions by state",
                         description="Campaigns known to the running daemon (or, without one "
                                     "or with --state, to the state database).",
                         parents=[own, parents.state, parents.common])
    li.set_defaults(func=cmd_campaign_list)

    own = _parent()
    own.add_argument("campaign", metavar="FILE|NAME", help="campaign file or campaign name")
    own.add_argument("--json", action="store_true",
                     help="print one JSON document (with every transition)")
    s = csub.add_parser("show", help="stages, submissions and their states",
                        description="Stages, controls and submissions of a campaign, with "
                                    "their states, reasons, job ids and how much of each slice "
                                    "is warm: from the running daemon, or (without one, or "
                                    "with --state) from the state database.",
                        parents=[own, parents.state, parents.common])
    s.set_defaults(func=cmd_campaign_show)


def _add_campaign_actions(csub: Subparsers, parents: _Parents) -> None:
    """The operator's actions: hold, release, cancel, mark-submitted, retry, forget."""
    on_state = [parents.state, parents.common]
    named = _parent()
    named.add_argument("campaign", metavar="NAME", help="campaign name")
    staged = _parent()
    staged.add_argument("--stage", help="only this stage")
    submission = _parent()
    submission.add_argument("--submission", type=int, required=True, metavar="ID",
                            help="submission id (as `campaign show` lists it)")
    controls = (
        ("hold", "hold a campaign or stage: `run` creates and launches nothing there "
                 "(a launch due waits; a drainingn slice is chosen only after release)"),
        ("release", "lift a hold; launch_unknown submissions are retried as new submissions"),
        ("cancel", "cancel a campaign or stage for good: nothing more is created or "
                   "launched; queued, prestaging and ready submissions become cancelled"),
    )
    for action, text in controls:
        p = csub.add_parser(action, help=text.split(":")[0].split(";")[0], description=text,
                            parents=[named, staged, *on_state])
        p.set_defaults(func=cmd_campaign_action, action=action)

    job_id = _parent()
    job_id.add_argument("--job-id", required=True, metavar="JOB_ID",
                        help="the launched job's id")
    m = csub.add_parser("mark-submitted", help="record a launch_unknown submission as launched",
                        description="The operator's answer to launch_unknown when the job was "
                                    "in fact launched: the submission becomes submitted with "
                                    "JOB_ID (then `run` polls its complete command).",
                        parents=[named, submission, job_id, *on_state])
    m.set_defaults(func=cmd_campaign_action, action="mark-submitted")

    rt = csub.add_parser("retry", help="recover a failed, launch_failed or launch_unknown "
                                       "submission",
                         description="A new submission takes over the slice of submission ID "
                                     "(failed: its gate timed out or it never completed; "
                                     "launch_failed; launch_unknown) and is gated and "
                                     "submitted again by the daemon's next pass or the next "
                                     "`campaign run`. Nothing is ever retried automatically.",
                         parents=[named, submission, *on_state])
    rt.set_defaults(func=cmd_campaign_action, action="retry")

    own = _parent()
    own.add_argument("--json", action="store_true", help="print one JSON document")
    fg = csub.add_parser("forget", help="drop a finished campaign from the state",
                         description="Drop campaign NAME and its history (registration, "
                                     "submissions and their transitions, drainingn ledger, "
                                     "holds and cancels) from the state database, in one "
                                     "transaction, through the running daemon (or, without one "
                                     "or with --state, on the state database). Only a finished "
                                     "campaign: its last run ended with every stage done or "
                                     "cancelled, and every submission is final (exit 2 names "
                                     "those that are not); exit 4 for an unknown campaign. The "
                                     "daemon's tidy does it by itself after [state] "
                                     "keep_campaigns.",
                         parents=[named, own, *on_state])
    fg.set_defaults(func=cmd_campaign_forget)


def _add_serve(sub: Subparsers, parents: _Parents) -> None:
    """``serve``: the daemon."""
    v = sub.add_parser("serve", help="run the daemon: keep [[watch]] definitions warm, HTTP API",
                       description="Run as a service (systemd Type=notify): warm the config's "
                                   "[[watch]] definitions on schedule, take warm requests on the "
                                   "HTTP API, serve /metrics. SIGHUP reloads, SIGTERM drains.",
                       parents=[parents.common])
    v.set_defaults(func=cmd_serve)


def _add_credentials(sub: Subparsers, parents: _Parents) -> None:
    """``credentials`` (alias ``proxy``): the proxy and token a run would use."""
    own = _parent()
    own.add_argument("--json", action="store_true", help="print one JSON document")
    p = sub.add_parser("credentials", aliases=["proxy"],
                       help="show the proxy and bearer token prestaged would use",
                       description="Show the X.509 proxy (DN, type, time left) and the bearer "
                                   "token (issuer, subject, audience, scopes, groups, time "
                                   "left; never the token itself), then check them as a run "
                                   "would: exit 3 if unusable. As 'proxy': the proxy only.",
                       parents=[parents.credentials, own, parents.common])
    p.set_defaults(func=cmd_credentials)


def _add_demo(sub: Subparsers, parents: _Parents) -> None:
    """``demo``: the whole warm path on this machine."""
    own = _parent()
    own.add_argument("--files", type=int, default=2000, metavar="N", help="files (default 2000)")
    own.add_argument("--redirect", action="store_true",
                     help="door redirects to a pool, like dCache")
    own.add_argument("--keep", action="store_true", help="keep the temporary directory")
    own.add_argument("--catalog", dest="demo_catalog", choices=CATALOG_KINDS,
                     default="local",
                     help="resolve the definition with a local file (default), through a "
                          "SAM web emulator, or through MetaCat and Rucio emulators")
    own.add_argument("--tape", action="store_true",
                     help="a cold dataset on an emulated tape-backed dCache (door, pool, Tape "
                          "REST frontend, 2 drives): staged in bulk, then touched")
    d = sub.add_parser("demo", help="warm a generated dataset on a local test storage",
                       description="Start a test HTTPS storage on 127.0.0.1 with a fresh test "
                                   "PKI, warm a generated definition through the real CLI, "
                                   "clean up.",
                       parents=[own, parents.common])
    d.set_defaults(func=cmd_demo)
