"""``prestaged demo``: the whole warm path on this machine, with no grid access.

Makes a fresh test PKI (CA, host cert, user cert, RFC 3820 proxy) in a temporary directory,
starts the test HTTPS storage (``prestaged.testing.storage``) on 127.0.0.1 in its own process,
writes a definition of generated file URLs, runs ``prestaged warm`` on it through the real CLI,
then shows what the storage saw and cleans up.

With ``catalog="samweb"`` the definition lives in a SAM web emulator
(``prestaged.testing.samweb``, its own process too) instead: half the files on tape
(``enstore:`` locations with a tape suffix), half on disk (``dcache:``), and a config file whose
``[[catalog.samweb.rewrite]]`` rules map both onto the test storage, as the Fermilab rules map
them onto dCache.

``run_tape_demo`` starts the dCache emulator (``prestaged.testing.dcache``, its own process)
instead, with a cold dataset on tape: 70 % tape-only files over 4 tapes, the rest with a disk
copy, and one lost file; ``prestaged warm`` stages the tape-only files through the Tape REST
API and touches each as it lands.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from prestaged.errors import PrestagedError

__all__ = ["DEMO_DEFINITION", "run_demo", "run_tape_demo", "write_definition",
           "write_sam_definition"]

DEMO_DEFINITION = "demo-dataset"
"""Name of the demo's SAM definition."""


class DemoError(PrestagedError):
    """The demo's own machinery (test storage) failed to start."""


def write_definition(path: Path, base_url: str, files: int) -> Path:
    """Write a local-catalog definition of ``files`` generated URLs under ``base_url``."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("# prestaged demo definition: generated raw-data file URLs\n")
        for n in range(files):
            fh.write(f"{base_url}/pnfs/demo/raw/run{n // 100:05d}/demo_{n:06d}.root\n")
    return path


def write_sam_definition(path: Path, files: int) -> Path:
    """Write a SAM web emulator definitions file: ``DEMO_DEFINITION`` with ``files`` files.

    Even-numbered files are on disk (``dcache:/pnfs/demo/raw/...``), odd ones on tape
    (``enstore:/pnfs/demo/raw/...(<seq>@<tape>)``); both resolve to the demo storage's paths.
    """
    entries = []
    for n in range(files):
        directory = f"/pnfs/demo/raw/run{n // 100:05d}"
        location = (f"dcache:{directory}" if n % 2 == 0
                    else f"enstore:{directory}({n}@vr{n // 1000:04d}m8)")
        entries.append({"name": f"demo_{n:06d}.root", "size": 1 << 20, "events": 100,
                        "locations": [location]})
    path.write_text(json.dumps({"experiment": "demo",
                                "definitions": {DEMO_DEFINITION: entries}}) + "\n")
    return path


def _start(cmd: list[str], what: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """Start a test server process and read the JSON line it prints once listening."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        info = json.loads(line)
        if not isinstance(info, dict):
            raise TypeError(line)
        return proc, info
    except (ValueError, TypeError):
        proc.kill()
        proc.wait()
        raise DemoError(f"demo: the {what} did not start (said {line.strip()!r})") from None


def _stop(proc: subprocess.Popen[str], stats: Path) -> dict[str, Any]:
    proc.terminate()
    proc.wait(timeout=30)
    seen: dict[str, Any] = json.loads(stats.read_text()) if stats.is_file() else {}
    return seen


def _samweb_setup(tmp: Path, files: int, base: str) -> tuple[subprocess.Popen[str], list[str]]:
    """Start the SAM web emulator; return it and the ``warm`` arguments that use it."""
    defs = write_sam_definition(tmp / "sam-definitions.json", files)
    proc, info = _start([sys.executable, "-m", "prestaged.testing.samweb", "--pki-dir",
                         str(tmp / "pki"), "--definitions", str(defs),
                         "--stats-file", str(tmp / "samweb-stats.json")], "SAM web emulator")
    try:
        base_url = str(info["base_url"])
    except KeyError:
        proc.kill()
        raise DemoError("demo: the SAM web emulator did not say its URL") from None
    config = tmp / "prestaged.toml"
    config.write_text(
        "# prestaged demo: resolve definitions with the SAM web emulator\n"
        '[catalog]\ndefault = "samweb"\n'
        f'[catalog.samweb]\nbase_url = "{base_url}"\n'
        f'[[catalog.samweb.rewrite]]\nlocation = "enstore:/pnfs/demo/"\nurl = "{base}/pnfs/demo/"\n'
        f'[[catalog.samweb.rewrite]]\nlocation = "dcache:/pnfs/demo/"\nurl = "{base}/pnfs/demo/"\n'
    )
    print(f"demo: SAM web emulator at {base_url}")
    print(f"demo: SAM definition {DEMO_DEFINITION!r} with {files} files "
          "(half enstore: tape, half dcache: disk locations)")
    print(f"demo: config {config} maps both location prefixes onto the test storage\n")
    return proc, [DEMO_DEFINITION, "--config", str(config)]


def run_demo(*, files: int, redirect: bool, keep: bool,
             main: Callable[[Optional[list[str]]], int], catalog: str = "local") -> int:
    """Run the demo; returns ``prestaged warm``'s exit code. ``main`` is the CLI entry point.

    ``catalog`` is ``"local"`` (a text file of URLs) or ``"samweb"`` (the SAM web emulator).
    """
    from prestaged.testing.pki import create_pki

    tmp = Path(tempfile.mkdtemp(prefix="prestaged-demo-"))
    procs: list[subprocess.Popen[str]] = []
    try:
        pki = create_pki(tmp / "pki")
        proxy = pki.make_proxy(tmp / "x509up_demo")
        stats = tmp / "storage-stats.json"
        cmd = [sys.executable, "-m", "prestaged.testing.storage", "--pki-dir", str(tmp / "pki"),
               "--stats-file", str(stats)] + (["--redirect"] if redirect else [])
        storage, info = _start(cmd, "test storage")
        procs.append(storage)
        base = f"https://127.0.0.1:{info['door_port']}"
        kind = "door -> pool redirects, " if redirect else ""
        print(f"demo: test storage on {base} ({kind}client certificate required)")
        print(f"demo: proxy {proxy} for {pki.user_dn}")
        sam: Optional[subprocess.Popen[str]] = None
        if catalog == "samweb":
            sam, source = _samweb_setup(tmp, files, base)
            procs.append(sam)
        else:
            definition = write_definition(tmp / "demo-dataset.txt", base, files)
            print(f"demo: definition {definition} with {files} files\n")
            source = [str(definition)]
        # The demo's state lives (and goes) with its temporary directory.
        code = main(["warm", *source, "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir),
                     "--state", str(tmp / "state.db")])
        seen = _stop(storage, stats)
        if sam is not None:
            asked = _stop(sam, tmp / "samweb-stats.json").get("requests", {})
            print(f"\ndemo: the SAM web emulator answered {sum(asked.values())} requests "
                  f"({asked.get('list', 0)} listing, {asked.get('locations', 0)} bulk location "
                  "lookups)", end="")
        if seen:
            print(f"\ndemo: the storage saw {seen.get('requests_total')} requests and sent "
                  f"{seen.get('bytes_total')} bytes of file data")
        if keep:
            print(f"demo: kept {tmp}")
        return code
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


# The demo's tape library, times scaled down about 1/100 from a real one (a mount takes 1-2 min,
# a file a few seconds): the demo must take seconds.
_TAPE_MODEL = ["--drives", "2", "--mount-seconds", "0.5", "--file-seconds", "0.002",
               "--door-timeout", "3"]
_TAPE_CONFIG = """# prestaged demo: polls scaled down like the emulated tape library
[storage]
poll_min = "200ms"
poll_max = "2s"
"""


def write_tape_manifest(path: Path, files: int) -> list[str]:
    """The tape demo's files as a ``prestaged.testing.dcache`` manifest; their paths, in
    listing order. Files 0, 10, 20... keep a disk copy, file 7 is lost, the rest are tape-only
    (70 %), round-robin over 4 tapes (the order that makes a GET-driven recall thrash)."""
    paths = [f"/pnfs/demo/raw/run{n // 100:05d}/demo_{n:06d}.root" for n in range(files)]
    entries = []
    for n, name in enumerate(paths):
        where = "disk+tape" if n % 10 in (0, 3, 6) else "tape"
        entries.append({"path": name, "size": 1 << 20, "locality": "lost" if n == 7 else where,
                        "tape": f"T{n % 4}"})
    path.write_text(json.dumps(entries) + "\n")
    return paths


def _wait_ready(proc: subprocess.Popen[str], ready: Path, timeout: float = 30.0) -> dict[str, Any]:
    """The emulator's ready file once written (it writes it whole), or ``DemoError``."""
    deadline = time.monotonic() + timeout
    while not ready.is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise DemoError("demo: the dCache emulator did not start")
        time.sleep(0.05)
    info: dict[str, Any] = json.loads(ready.read_text())
    return info


def run_tape_demo(*, files: int, keep: bool, main: Callable[[Optional[list[str]]], int]) -> int:
    """The tape demo; returns ``prestaged warm``'s exit code (1: the lost file)."""
    from prestaged.testing.pki import create_pki

    tmp = Path(tempfile.mkdtemp(prefix="prestaged-demo-"))
    proc: Optional[subprocess.Popen[str]] = None
    try:
        pki = create_pki(tmp / "pki")
        proxy = pki.make_proxy(tmp / "x509up_demo")
        paths = write_tape_manifest(tmp / "manifest.json", files)
        stats = tmp / "dcache-stats.json"
        proc = subprocess.Popen([sys.executable, "-m", "prestaged.testing.dcache", "--pki-dir",
                                 str(tmp / "pki"), "--ready-file", str(tmp / "ready.json"),
                                 "--stats-file", str(stats), "--manifest",
                                 str(tmp / "manifest.json"), *_TAPE_MODEL], text=True)
        info = _wait_ready(proc, tmp / "ready.json")
        door = str(info["door_url"]).rstrip("/")
        definition = tmp / "demo-dataset.txt"
        definition.write_text("".join(door + p + "\n" for p in paths))
        config = tmp / "prestaged.toml"
        config.write_text(_TAPE_CONFIG)
        print(f"demo: emulated dCache: WebDAV door {door}, Tape REST API {info['tape_api_url']}")
        print(f"demo: {files} files, cold: 70% only on tape (4 tapes, 2 drives), 1 lost")
        print(f"demo: definition {definition}\n")
        code = main(["warm", str(definition), "--proxy", str(proxy), "--ca-dir",
                     str(pki.ca_dir), "--state", str(tmp / "state.db"), "--config",
                     str(config)])
        seen = _stop(proc, stats).get("stats", {})
        asked = seen.get("requests", {})
        print(f"\ndemo: the dCache saw {asked.get('frontend:archiveinfo', 0)} locality and "
              f"{asked.get('frontend:stage', 0)} stage requests, {seen.get('mounts', 0)} tape "
              f"mounts, {seen.get('recalled', 0)} recalls, and "
              f"{seen.get('door_tape_gets', 0)} GETs of a tape-only file at its door")
        if keep:
            print(f"demo: kept {tmp}")
        return code
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
