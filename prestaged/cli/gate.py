"""``prestaged wait`` and ``prestaged submit``: hold a submission until its input is warm.

Both run the same gate (``prestaged.gate.wait_until_ready``) on the command line's definition;
``submit`` then runs the user's command, passing our stdin, stdout and stderr through.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import TYPE_CHECKING

from prestaged.cli.common import context
from prestaged.config import Check, Config, shown
from prestaged.errors import ConfigError
from prestaged.runtime import install_interrupt, run

if TYPE_CHECKING:
    from prestaged.gate import GateResult

__all__ = ["cmd_submit", "cmd_wait"]


def cmd_wait(args: argparse.Namespace, cfg: Config) -> int:
    """``prestaged wait``: the gate's exit code (0 ready, 1 timed out, 3-5 and 130 as
    ``warm``), with its summary on stdout or its error on stderr."""
    result = _gate(args, cfg)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    elif result.passed:
        print(result.summary())
    if not result.passed:
        print(f"prestaged: error: {result.summary()}", file=sys.stderr)
    return result.exit_code


def cmd_submit(args: argparse.Namespace, cfg: Config) -> int:
    """``prestaged submit``: the command's own exit code once the gate passed, else the gate's
    (the command never runs then); 126/127 when the command cannot be run."""
    from prestaged.gate import run_command

    argv: list[str] = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise ConfigError("submit: give the command after --, e.g. "
                          "prestaged submit --definition D -- fife_launch -c job.cfg")
    result = _gate(args, cfg)
    if not result.passed:
        print(f"prestaged: error: {result.summary()}; not running {argv[0]}", file=sys.stderr)
        return result.exit_code
    if not args.quiet:
        print(f"prestaged: {result.summary()}; running {argv[0]}", file=sys.stderr)
    sys.stdout.flush()  # our lines before the command's, whatever it writes to the same stream
    try:
        return run_command(argv)
    except OSError as e:
        print(f"prestaged: error: {argv[0]}: cannot run: {e.strerror or e}", file=sys.stderr)
        return 127 if isinstance(e, FileNotFoundError) else 126


def _duration(label: str, text: str, rule: Check) -> float:
    """``text`` as seconds, within ``rule``; the config's wording for what is wrong."""
    from prestaged.config import checked, parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError as e:
        raise ConfigError(f"{label}: {e}, got {shown(text)}") from None
    return checked(label, seconds, rule, "duration")


def _gate(args: argparse.Namespace, cfg: Config) -> GateResult:
    """Run the gate of ``wait``/``submit`` on the command line's definition."""
    from prestaged.config import DAY, within
    from prestaged.gate import check_ready, wait_until_ready

    timeout = _duration("--timeout", args.gate_timeout, within(0, 30 * DAY, low_open=True,
                                                               unit="s"))
    retry = _duration("--retry-every", args.retry_every, within(0, DAY, low_open=True,
                                                               unit="s"))
    ready = check_ready(args.ready)
    ctx = context(args, cfg)
    catalog, creds = ctx.open_for_warm(args.catalog, args.definition, args.dims, args.mql)
    settings = ctx.warm_settings(creds)
    store = ctx.open_store()

    async def gate() -> GateResult:
        stop = asyncio.Event()
        install_interrupt(stop)
        async with ctx.storage(creds) as (toucher, tape):
            return await wait_until_ready(catalog, settings, toucher, store,
                                          fresh_for=cfg.state.fresh_for, ready=ready,
                                          timeout=timeout, retry_initial=retry, stop=stop,
                                          allow_empty=args.allow_empty, tape=tape)

    try:
        return run(gate())
    finally:
        store.close()
