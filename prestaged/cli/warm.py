"""``prestaged warm`` (and its ``--dry-run``) and ``files``: one definition's files touched or
listed."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import TYPE_CHECKING, Optional

from prestaged.catalog import unresolved_in
from prestaged.cli.common import context
from prestaged.cli.render import (
    Progress,
    report_json,
    report_text,
    source_of,
    unresolved_json,
    unresolved_text,
)
from prestaged.config import Config
from prestaged.errors import EXIT_OK, EXIT_SOME_FAILED, PrestagedError
from prestaged.model import printable_url
from prestaged.runtime import install_interrupt, run

if TYPE_CHECKING:
    from prestaged.catalog import Catalog
    from prestaged.context import Context
    from prestaged.credentials import Credentials
    from prestaged.state.store import Store
    from prestaged.warm import Tally

__all__ = ["cmd_files", "cmd_warm"]

log = logging.getLogger(__name__)


def cmd_warm(args: argparse.Namespace, cfg: Config) -> int:
    """``prestaged warm``: touch every file of the definition (or only list them with
    ``--dry-run``); the run's exit code."""
    if args.dry_run:
        return run(_dry_run(_open(args, cfg), as_json=args.json))
    ctx = context(args, cfg)
    catalog, creds = ctx.open_for_warm(args.catalog, args.definition, args.dims, args.mql)
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


def cmd_files(args: argparse.Namespace, cfg: Config) -> int:
    """``prestaged files``: the definition's URLs, touching nothing; exit 1 for unresolved."""
    return run(_list_files(_open(args, cfg), as_json=args.json))


def _open(args: argparse.Namespace, cfg: Config) -> Catalog:
    """The catalog for the command line's DEFINITION, --dims or --mql."""
    ctx = context(args, cfg)
    return ctx.open_catalog(args.catalog,
                            ctx.definition_name(args.definition, args.dims, args.mql),
                            dims=args.dims, mql=args.mql)


def _with_unresolved(catalog: Catalog, code: int) -> int:
    """Unresolved files fail a run that is otherwise all warm, like a missing file does."""
    if code == EXIT_OK and unresolved_in(catalog):
        return EXIT_SOME_FAILED
    return code


async def _dry_run(catalog: Catalog, *, as_json: bool) -> int:
    """``warm --dry-run``: each URL once, in catalog order; nothing is touched."""
    seen: set[str] = set()
    urls = []
    async for ref in catalog.files():
        if ref.url in seen:
            continue
        seen.add(ref.url)
        if as_json:
            urls.append(ref.url)
        else:
            print(printable_url(ref.url))
    code = _with_unresolved(catalog, EXIT_OK)
    if as_json:
        print(json.dumps({"definition": catalog.definition, "catalog": catalog.name,
                          "files": len(seen), "urls": urls, **unresolved_json(catalog),
                          "exit_code": code}, indent=2))
    else:
        print(f"# {len(seen)} files would be touched; nothing was touched", file=sys.stderr)
        if code:
            print(unresolved_text(catalog), file=sys.stderr)
    return code


async def _list_files(catalog: Catalog, *, as_json: bool) -> int:
    """``prestaged files``: every resolved file, then the unresolved ones; exit 1 if any."""
    files = []
    count = 0
    async for ref in catalog.files():
        count += 1
        if as_json:
            files.append({"name": ref.name, "url": ref.url, "size": ref.size})
        else:
            print(printable_url(ref.url))
    code = _with_unresolved(catalog, EXIT_OK)
    if as_json:
        print(json.dumps({"definition": catalog.definition, "catalog": catalog.name,
                          "source": source_of(catalog), "resolved": count, "files": files,
                          **unresolved_json(catalog), "exit_code": code}, indent=2))
        return code
    unresolved = unresolved_in(catalog)
    print(f"# {catalog.definition} ({catalog.name} catalog: {source_of(catalog)}): {count} "
          f"files resolved, {unresolved} unresolved", file=sys.stderr)
    if unresolved:
        print(unresolved_text(catalog, limit=None), file=sys.stderr)
    return code


async def _count(catalog: Catalog, tally: Tally) -> None:
    """Fill ``tally.total_hint`` in from ``catalog.estimate()`` when it answers. Its errors
    are left to the listing, which asks the same server the same thing and stops the run."""
    try:
        tally.total_hint = await catalog.estimate()
    except PrestagedError as e:
        log.debug("no file count for the progress display: %s", e)


async def _warm(catalog: Catalog, ctx: Context, creds: Credentials, *, bar: bool,
                as_json: bool, quiet: bool, store: Optional[Store], force: bool) -> int:
    """One warm run with progress, then its summary (or JSON document); its exit code."""
    from prestaged.runner import run_definition
    from prestaged.warm import Tally

    stop = asyncio.Event()
    install_interrupt(stop)
    tally = Tally()
    # The count is only for the progress display: asked beside the run, never before it.
    counting = asyncio.ensure_future(_count(catalog, tally))
    interval = 0.1 if bar else ctx.cfg.output.progress_interval
    progress = Progress(tally, bar=bar, interval=interval)
    if not as_json and not quiet:
        progress.start()
    try:
        async with ctx.storage(creds) as (toucher, tape):
            report = await run_definition(catalog, ctx.warm_settings(creds), toucher, store=store,
                                          fresh_for=ctx.cfg.state.fresh_for, force=force,
                                          tally=tally, stop=stop, tape=tape)
    finally:
        counting.cancel()
        await asyncio.gather(counting, return_exceptions=True)
        await progress.stop()
    where = dict(definition=catalog.definition, catalog=catalog.name, source=source_of(catalog))
    code = _with_unresolved(catalog, report.exit_code)
    if as_json:
        doc = report_json(report, **where)
        doc.update(unresolved_json(catalog))
        doc["exit_code"] = code
        print(json.dumps(doc, indent=2))
    elif (not quiet or code) and not (report.aborted is not None and report.tally.done == 0):
        # (A run stopped before any file ended, by a bad list line or a refused catalog: its
        # error line below says all; a summary of zeros before it buried it.)
        print(report_text(report, **where))
        if unresolved_in(catalog):
            print(unresolved_text(catalog))
    if report.aborted is not None:
        print(f"prestaged: error: {report.aborted}", file=sys.stderr)
    return code
