"""``prestaged release``: drop the tape pins prestaged's stage requests hold on a definition's
files, from what the state recorded (see ``prestaged.pins``)."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import TYPE_CHECKING

from prestaged.cli.common import context, recorded_definition
from prestaged.config import Config
from prestaged.runtime import run

if TYPE_CHECKING:
    from prestaged.context import Context
    from prestaged.pins import ReleaseReport
    from prestaged.state.store import Store

__all__ = ["cmd_release"]


def cmd_release(args: argparse.Namespace, cfg: Config) -> int:
    """``prestaged release``: 0 once every recorded pin is released (or none was recorded);
    ``CatalogError`` (exit 4) for a definition the state does not know, a refusal by the storage
    3 or 5 (see ``prestaged.pins``)."""
    ctx = context(args, cfg)
    kind = ctx.catalog_kind(None)  # --catalog overrides catalog.default, as for `warm`
    definition = recorded_definition(cfg, kind, args.definition)
    store = ctx.open_store(must_exist=True)
    try:
        report = run(_release(ctx, store, kind, definition))
    finally:
        store.close()
    if args.json:
        print(json.dumps({"state": store.where, **report.to_dict()}, indent=2))
    else:
        print(report.summary())
    return 0


async def _release(ctx: Context, store: Store, kind: str, definition: str) -> ReleaseReport:
    """The pins recorded on ``kind:definition``, released; the proxy is loaded (and checked)
    only when there is something to release."""
    from prestaged.pins import ReleaseReport, pinned, release_pins

    pins = await asyncio.to_thread(pinned, store, kind, definition)
    if not pins:
        return ReleaseReport(kind, definition)
    creds = ctx.load_credentials()
    async with ctx.make_tape(creds.ssl_context(), token=creds.token) as tape:
        return await release_pins(store, tape, kind, definition, pins)
