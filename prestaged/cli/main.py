"""The ``prestaged`` entry point: parse, load the config, set up logging, run one command.

Every flag overrides its config key (``--concurrency`` -> ``storage.concurrency``, see
``parser.OVERRIDES``) through the same validation as the config file. A ``PrestagedError``
becomes one line on stderr and its exit code; only bugs print tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import traceback
from typing import Optional

from prestaged.cli.common import Command
from prestaged.cli.parser import OVERRIDES, build_parser
from prestaged.config import Config, find_config, load_config, replace_path, shown
from prestaged.errors import EXIT_INTERRUPTED, ConfigError, PrestagedError
from prestaged.model import printable, redact, scrub

__all__ = ["main"]

_LABELS = {"nbytes": "--bytes", "stage_mode": "--stage"}
"""The flag of an ``OVERRIDES`` destination named otherwise."""
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``prestaged`` console script; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
        args.entry = main  # for a command that drives the entry point itself (the demo)
        command: Command = args.func
        cfg = _load(args)
        _setup_logging(args, cfg)
        return command(args, cfg)
    except PrestagedError as e:
        print(f"prestaged: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("prestaged: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        # A bug keeps its traceback, but not the secrets its words may quote (a library's
        # error holding a URL's password, an ?authz= token, an Authorization header): as the
        # log lines are (_Scrubbing), and with Python's own exit status for it.
        print(scrub(redact(traceback.format_exc())), end="", file=sys.stderr)
        return 1


def _load(args: argparse.Namespace) -> Config:
    """The config file (``--config`` or the usual places) with the command line's flags."""
    cfg = load_config(find_config(args.config))
    for dest, key in OVERRIDES.items():
        value = getattr(args, dest, None)
        if value is not None:
            label = _LABELS.get(dest) or "--" + dest.replace("_", "-")
            if dest == "timeout":
                label = getattr(args, "timeout_flag", label)
            if dest == "state":  # a file named on the command line wins over state.url too
                _check_state_file(value)
                cfg = replace_path(cfg, "state.url", None)
            cfg = replace_path(cfg, key, value, label=label)
    return cfg


def _check_state_file(value: str) -> None:
    """``--state`` names a file: not empty (an unset variable in a script), not a URL (which
    would have made a SQLite file named after it, password and all)."""
    if not value.strip():
        raise ConfigError('--state: expected a file path, got ""')
    if _URL_SCHEME.match(value):
        raise ConfigError(f"--state: expected a file path, got {shown(value)}: a PostgreSQL "
                          "state goes in [state] url of the config (its password in ~/.pgpass, "
                          "not on a command line, which every user sees in ps)")


class _Scrubbing(logging.Formatter):
    """Log lines without secrets, whoever wrote them: ours are careful already, but a
    library's are not (aiohttp's server quotes a malformed request's header line, token and
    all, in its error and traceback). URL credentials are redacted, known secrets, JWTs and
    ``Bearer`` values scrubbed (``model.redact``, ``model.scrub``)."""

    def format(self, record: logging.LogRecord) -> str:
        return scrub(redact(super().format(record)))

    def formatMessage(self, record: logging.LogRecord) -> str:
        # The message on one line, control characters escaped (a campaign's list item, a
        # server's words): a traceback, added after it, keeps its lines.
        return printable(super().formatMessage(record))


def _setup_logging(args: argparse.Namespace, cfg: Config) -> None:
    """``output.log_level``, or DEBUG for ``-v``, WARNING for ``-q``, as one-line messages on
    stderr."""
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
    handler.setFormatter(_Scrubbing("prestaged: %(levelname)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
