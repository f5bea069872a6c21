"""``prestaged serve`` (the daemon) and ``prestaged demo``: each one call into the library."""

from __future__ import annotations

import argparse

from prestaged.config import Config
from prestaged.runtime import run

__all__ = ["cmd_demo", "cmd_serve"]


def cmd_serve(args: argparse.Namespace, cfg: Config) -> int:
    """``prestaged serve``: run the daemon until SIGTERM; its exit code."""
    from prestaged.service.daemon import Daemon  # aiohttp and prometheus_client: serve only

    return run(Daemon(cfg, cfg.source).run())


def cmd_demo(args: argparse.Namespace, cfg: Config) -> int:
    """``prestaged demo``: ``prestaged warm``'s exit code on a generated local dataset,
    warmed through the real entry point (``args.entry``, set by ``main``)."""
    from prestaged.demo import run_demo, run_tape_demo

    if args.tape:
        if args.demo_catalog != "local" or args.redirect:
            from prestaged.errors import ConfigError

            raise ConfigError("demo --tape: its dCache emulator always redirects to a pool and "
                              "its definition is a local file; drop --redirect and --catalog")
        return run_tape_demo(files=args.files, keep=args.keep, main=args.entry)
    return run_demo(files=args.files, redirect=args.redirect, keep=args.keep, main=args.entry,
                    catalog=args.demo_catalog)
