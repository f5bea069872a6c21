"""``prestaged demo``: the whole warm path on this machine, with no grid access.

Makes a fresh test PKI (CA, host cert, user cert, RFC 3820 proxy) in a temporary directory,
starts the test HTTPS storage (``prestaged.testing.storage``) on 127.0.0.1 in its own process,
writes a definition of generated file URLs, runs ``prestaged warm`` on it through the real CLI,
then shows what the storage saw and cleans up.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

from prestaged.errors import PrestagedError

__all__ = ["run_demo", "write_definition"]


class DemoError(PrestagedError):
    """The demo's own machinery (test storage) failed to start."""


def write_definition(path: Path, base_url: str, files: int) -> Path:
    """Write a local-catalog definition of ``files`` generated URLs under ``base_url``."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("# prestaged demo definition: generated raw-data file URLs\n")
        for n in range(files):
            fh.write(f"{base_url}/pnfs/demo/raw/run{n // 100:05d}/demo_{n:06d}.root\n")
    return path


def _start_storage(pki_dir: Path, stats: Path, redirect: bool) -> tuple[subprocess.Popen[str], int]:
    cmd = [sys.executable, "-m", "prestaged.testing.storage", "--pki-dir", str(pki_dir),
           "--stats-file", str(stats)]
    if redirect:
        cmd.append("--redirect")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        return proc, int(json.loads(line)["door_port"])
    except (ValueError, KeyError, TypeError):
        proc.kill()
        raise DemoError(f"demo: the test storage did not start (said {line.strip()!r})") from None


def run_demo(*, files: int, redirect: bool, keep: bool,
             main: Callable[[Optional[list[str]]], int]) -> int:
    """Run the demo; returns ``prestaged warm``'s exit code. ``main`` is the CLI entry point."""
    from prestaged.testing.pki import create_pki

    tmp = Path(tempfile.mkdtemp(prefix="prestaged-demo-"))
    proc: Optional[subprocess.Popen[str]] = None
    try:
        pki = create_pki(tmp / "pki")
        proxy = pki.make_proxy(tmp / "x509up_demo")
        stats = tmp / "storage-stats.json"
        proc, port = _start_storage(tmp / "pki", stats, redirect)
        definition = write_definition(tmp / "demo-dataset.txt", f"https://127.0.0.1:{port}", files)
        kind = "door -> pool redirects, " if redirect else ""
        print(f"demo: test storage on https://127.0.0.1:{port} ({kind}client certificate required)")
        print(f"demo: proxy {proxy} for {pki.user_dn}")
        print(f"demo: definition {definition} with {files} files\n")
        code = main(["warm", str(definition), "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir)])
        proc.terminate()
        proc.wait(timeout=30)
        if stats.is_file():
            seen = json.loads(stats.read_text())
            print(f"\ndemo: the storage saw {seen.get('requests_total')} requests and sent "
                  f"{seen.get('bytes_total')} bytes of file data")
        if keep:
            print(f"demo: kept {tmp}")
        return code
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
