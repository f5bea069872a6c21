"""``python -m prestaged.testing.dcache``: the dCache emulator as a process (for benchmarks), and
the datasets it serves."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from prestaged.testing.dcache import Locality
from prestaged.testing.dcache.auth import bearer_document
from prestaged.testing.dcache.dataset import load_manifest, synthetic
from prestaged.testing.pki import TestPKI
from prestaged.testing.tokens import BearerCheck, TokenIssuer

READY_TIMEOUT = 60.0  # interpreter start, imports and 100 files; generous for a loaded CI
POLL = 0.05


def _wait_ready(path: Path, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    """The ready file's JSON once it exists; fails if the process exits or the deadline passes."""
    deadline = time.monotonic() + READY_TIMEOUT
    while not path.exists():
        assert proc.poll() is None, f"emulator exited {proc.returncode} before it was ready"
        assert time.monotonic() < deadline, f"no ready file after {READY_TIMEOUT} s"
        time.sleep(POLL)
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


async def test_process_serves_on_loopback_and_reports_stats_on_sigterm(
        pki: TestPKI, proxy: Path, tmp_path: Path) -> None:
    """The module listens on 127.0.0.1, writes its ready file, serves the synthetic dataset
    (a GET of a cached file through door and pool; archiveinfo of a tape-only one) and on
    SIGTERM exits 0 with statistics counting exactly those requests and the one touched file."""
    ready, stats = tmp_path / "ready.json", tmp_path / "stats.json"
    files = synthetic(10, tape_fraction=0.5, tapes=3, size=100)
    cached = next(f for f in files if f.locality is Locality.DISK_AND_TAPE)
    tape = next(f for f in files if f.locality is Locality.TAPE)
    proc = await asyncio.to_thread(subprocess.Popen, [
        sys.executable, "-m", "prestaged.testing.dcache", "--pki-dir", str(pki.root),
        "--ready-file", str(ready), "--stats-file", str(stats), "--files", "10",
        "--tape-fraction", "0.5", "--tapes", "3", "--size", "100", "--drives", "2"])
    try:
        info = await asyncio.to_thread(_wait_ready, ready, proc)
        assert info["pid"] == proc.pid
        assert info["door_url"].startswith("https://127.0.0.1:")
        assert info["tape_api_url"].startswith("https://127.0.0.1:")
        connector = aiohttp.TCPConnector(ssl=pki.client_ssl_context(proxy))
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.get(info["door_url"] + cached.path,
                                headers={"Range": "bytes=0-3", "Connection": "close"}) as r:
                assert r.status == 206 and len(await r.read()) == 4
            async with http.post(info["tape_api_url"] + "/archiveinfo",
                                 json={"paths": [tape.path]}) as r:
                assert await r.json() == [{"path": tape.path, "locality": "TAPE"}]
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)
    assert proc.returncode == 0
    doc = json.loads(await asyncio.to_thread(stats.read_text))
    assert doc["stats"]["requests"] == {"door:get": 1, "pool:get": 1, "frontend:archiveinfo": 1}
    assert doc["requests_total"] == 3 and doc["stats"]["door_tape_gets"] == 0
    assert doc["files"] == {"total": 10, "tape_only_at_start": 5, "on_disk": 5, "touched": 1,
                            "on_disk_and_touched": 1}


async def test_process_takes_a_bearer_config(pki: TestPKI, tmp_path: Path) -> None:
    """With --bearer-config the process accepts the issuer's tokens from a client without a
    certificate (public key only in the file), refuses an expired one with 401, and counts
    both in its stats file."""
    issuer = TokenIssuer()
    config, ready, stats = tmp_path / "bearer.json", tmp_path / "ready.json", tmp_path / "s.json"
    config.write_text(json.dumps(bearer_document(BearerCheck(issuer, ["https://127.0.0.1"]))))
    proc = await asyncio.to_thread(subprocess.Popen, [
        sys.executable, "-m", "prestaged.testing.dcache", "--pki-dir", str(pki.root),
        "--ready-file", str(ready), "--stats-file", str(stats), "--files", "1",
        "--bearer-config", str(config)])
    try:
        info = await asyncio.to_thread(_wait_ready, ready, proc)
        ctx = ssl.create_default_context(capath=str(pki.ca_dir))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http:
            statuses = []
            for token in (issuer.mint("storage.read:/pnfs"), issuer.mint(lifetime=-5)):
                async with http.post(info["tape_api_url"] + "/archiveinfo",
                                     json={"paths": ["/pnfs/bench/f0000000.root"]},
                                     headers={"Authorization": f"Bearer {token}"}) as r:
                    statuses.append(r.status)
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)
    assert statuses == [200, 401]
    doc = json.loads(await asyncio.to_thread(stats.read_text))
    assert doc["stats"]["token_requests"] == {"frontend": 2}
    assert doc["stats"]["auth_refusals"] == {"frontend:401": 1}


def test_synthetic_puts_file_i_on_tape_i_mod_tapes_and_draws_the_tape_only_share() -> None:
    """Listing order visits the tapes round-robin; exactly round(files * fraction) files are
    tape-only, on every tape (a random draw, not a period that lines up with the tapes)."""
    files = synthetic(1000, tape_fraction=0.7, tapes=20)
    assert [f.tape for f in files[:21]] == [f"T{i:03d}" for i in range(20)] + ["T000"]
    tape_only = [f for f in files if f.locality is Locality.TAPE]
    assert len(tape_only) == 700
    assert set(Counter(f.tape for f in tape_only)) == {f"T{i:03d}" for i in range(20)}
    assert files == synthetic(1000, tape_fraction=0.7, tapes=20)  # same seed, same dataset


def test_manifest_names_the_bad_entry(tmp_path: Path) -> None:
    """A manifest is read entry by entry; a malformed one is reported by its index."""
    path = tmp_path / "files.json"
    path.write_text(json.dumps([{"path": "/pnfs/a", "size": 1, "locality": "tape", "tape": "T9"},
                                {"path": "/pnfs/b", "size": 1, "locality": "nearline"}]))
    with pytest.raises(ValueError, match="file 1"):
        load_manifest(path)
    path.write_text(json.dumps([{"path": "/pnfs/a", "size": 1, "locality": "tape", "tape": "T9"}]))
    assert [(f.path, f.locality, f.tape) for f in load_manifest(path)] == [
        ("/pnfs/a", Locality.TAPE, "T9")]
