"""``python -m prestaged.testing.dcache``: the emulated dCache as a process of its own.

For benchmarks whose client is another process (``prestaged warm``): the emulator gets its own
interpreter, GIL and event loop. It listens on 127.0.0.1 only (door, pool, Tape REST frontend),
writes ``--ready-file`` (JSON: ``door_url``, ``frontend_url``, ``tape_api_url``, ``pid``) once
listening, and on SIGTERM or SIGINT stops and writes ``--stats-file`` (JSON: ``stats`` as
``DCacheStats.to_dict()``, ``requests_total`` and a ``files`` summary: ``total``,
``tape_only_at_start``, ``on_disk``, ``touched`` = read by a client at least once,
``on_disk_and_touched``). Both files are written whole (temporary file, then rename), so a
reader never sees half of one. ``--bearer-config FILE`` (a ``bearer_document`` as JSON: issuer
URL, its public JWKS, audiences, base path) makes door and frontend accept that issuer's WLCG
tokens, certificates becoming optional.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from prestaged.testing.dcache.auth import load_bearer
from prestaged.testing.dcache.core import DCacheCore
from prestaged.testing.dcache.dataset import FileSpec, load_manifest, synthetic
from prestaged.testing.dcache.model import (
    DCACHE_RATE,
    MAX_REQUESTS,
    MAX_TARGETS,
    DCacheConfig,
    Locality,
)
from prestaged.testing.dcache.server import DCacheServer
from prestaged.testing.pki import load_or_create_pki
from prestaged.testing.tokens import BearerCheck


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m prestaged.testing.dcache",
        description="Run the dCache emulator (door, pool, Tape REST frontend, tape library) on "
                    "127.0.0.1 until SIGTERM/SIGINT.")
    p.add_argument("--pki-dir", type=Path, required=True,
                   help="test PKI directory; created with create_pki() if DIR/ca does not exist")
    p.add_argument("--ready-file", type=Path, required=True,
                   help="written (JSON: door_url, frontend_url, tape_api_url, pid) once listening")
    p.add_argument("--stats-file", type=Path, help="statistics written here (JSON) on exit")
    p.add_argument("--bearer-config", type=Path,
                   help="accept WLCG tokens of the issuer in this JSON file (issuer, jwks, "
                        "audiences, base_path: prestaged.testing.dcache.auth.bearer_document); "
                        "client certificates become optional")
    m = p.add_argument_group("model (times in seconds)")
    m.add_argument("--drives", type=int, default=1, help="tape drives (default 1)")
    m.add_argument("--mount-seconds", type=float, default=0.0, help="to mount a tape (default 0)")
    m.add_argument("--file-seconds", type=float, default=0.0,
                   help="to read one file from a mounted tape (default 0)")
    m.add_argument("--door-timeout", type=float, default=180.0,
                   help="webdav.mover.timeout: how long a door GET of a tape-only file waits "
                        "for its recall before answering 500 (default 180)")
    m.add_argument("--max-targets", type=int, default=MAX_TARGETS,
                   help=f"paths per stage request before 413 (default {MAX_TARGETS})")
    m.add_argument("--max-requests", type=int, default=MAX_REQUESTS,
                   help=f"unfinished stage requests per user before 429 (default {MAX_REQUESTS})")
    m.add_argument("--rate-overall", type=float, default=None,
                   help="requests a second to door, and to frontend, from all clients, a quarter "
                        f"of it per client (dCache 11.2+: {DCACHE_RATE:g}; default: no limit)")
    d = p.add_argument_group("dataset (synthetic unless --manifest)")
    d.add_argument("--files", type=int, default=0, help="synthetic files (default 0)")
    d.add_argument("--tape-fraction", type=float, default=0.7,
                   help="share of the files that are tape-only; the rest are cached copies "
                        "(default 0.7)")
    d.add_argument("--tapes", type=int, default=20,
                   help="tapes; file i is on tape i mod TAPES (default 20)")
    d.add_argument("--size", type=int, default=1 << 20, help="bytes per file (default 1 MiB)")
    d.add_argument("--prefix", default="/pnfs/bench", help="directory of the files")
    d.add_argument("--seed", type=int, default=0, help="which files are tape-only (default 0)")
    d.add_argument("--manifest", type=Path,
                   help="JSON list of {path, size, locality, tape} instead of synthetic files")
    return p


def _dataset(args: argparse.Namespace) -> list[FileSpec]:
    if args.manifest is not None:
        return load_manifest(args.manifest)
    return synthetic(args.files, tape_fraction=args.tape_fraction, tapes=args.tapes,
                     size=args.size, prefix=args.prefix, seed=args.seed)


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` whole: a reader sees the old file, no file, or all of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc) + "\n", encoding="utf-8")
    tmp.replace(path)


def summary(core: DCacheCore, tape_only_at_start: int) -> dict[str, Any]:
    """The stats-file document of ``core``; see the module docstring."""
    files = core.files.values()
    return {
        "stats": core.stats.to_dict(),
        "requests_total": sum(core.stats.requests.values()),
        "files": {
            "total": len(core.files),
            "tape_only_at_start": tape_only_at_start,
            "on_disk": sum(1 for r in files if r.on_disk),
            "touched": sum(1 for r in files if r.reads),
            "on_disk_and_touched": sum(1 for r in files if r.on_disk and r.reads),
        },
    }


async def _serve(args: argparse.Namespace, config: DCacheConfig, files: list[FileSpec],
                 bearer: Optional[BearerCheck]) -> None:
    pki = load_or_create_pki(args.pki_dir)
    server = DCacheServer(pki.server_ssl_context(require_client_cert=bearer is None),
                          pki.pool_ssl_context(), config,
                          bearer=bearer)
    for f in files:
        server.core.add_file(f.path, f.size, f.locality, tape=f.tape)
    tape_only = sum(1 for f in files if f.locality is Locality.TAPE)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        _write_json(args.ready_file, {"door_url": server.door_url(""),
                                      "frontend_url": server.frontend_url,
                                      "tape_api_url": server.tape_api_url, "pid": os.getpid()})
        await stop.wait()
    if args.stats_file is not None:
        _write_json(args.stats_file, summary(server.core, tape_only))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m prestaged.testing.dcache``; returns the exit code (2: bad
    options or manifest)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        files = _dataset(args)
        config = DCacheConfig(drives=args.drives, mount_seconds=args.mount_seconds,
                              file_seconds=args.file_seconds, door_timeout=args.door_timeout,
                              max_targets=args.max_targets, max_requests=args.max_requests,
                              rate_overall=args.rate_overall)
        bearer = load_bearer(args.bearer_config) if args.bearer_config else None
    except (OSError, ValueError) as e:
        parser.error(str(e))
    asyncio.run(_serve(args, config, files, bearer))
    return 0


if __name__ == "__main__":
    from prestaged.testing.process import exit_quietly

    exit_quietly(main)
