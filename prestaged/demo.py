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

With ``catalog="metacat"`` the definition is a MetaCat dataset (``dune:demo-dataset``) in the
MetaCat emulator (``prestaged.testing.metacat``), whose files' replicas are in the Rucio emulator
(``prestaged.testing.rucio``), both processes of their own over TLS: three quarters of the files
on a DISK RSE (most with a TAPE copy too), a quarter only on a TAPE RSE reached over davs://,
both RSEs on the test storage. prestaged logs in to Rucio with the demo proxy (``/auth/x509``).

``run_tape_demo`` starts the dCache emulator (``prestaged.testing.dcache``, its own process)
instead, with a cold dataset on tape: 70 % tape-only files over 4 tapes, the rest with a disk
copy, and one lost file; ``prestaged warm`` stages the tape-only files through the Tape REST
API and touches each as it lands.

The temporary directory is made under ``TMPDIR`` (``tempfile``'s rule). Each server process runs
in a session of its own, so that Ctrl-C at the terminal reaches the demo alone: a Ctrl-C during
the warm stops it cleanly while the servers still answer. However the demo ends (an error,
Ctrl-C, SIGTERM, SIGHUP), its server processes are stopped and reaped and the directory, with
the test PKI's private keys, is removed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Optional, Union

from prestaged.config import checked, within
from prestaged.errors import PrestagedError

__all__ = ["DEMO_DATASET", "DEMO_DEFINITION", "run_demo", "run_tape_demo", "write_definition",
           "write_metacat_dataset", "write_sam_definition"]

DEMO_DEFINITION = "demo-dataset"
"""Name of the demo's SAM definition."""
DEMO_DATASET = "dune:demo-dataset"
"""The demo's MetaCat dataset."""
MAX_FILES = 100_000
"""The most files ``--files`` asks for (the demo is meant to take seconds)."""

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_Handler = Union[Callable[[int, Optional[FrameType]], Any], int, None]
_Procs = list[subprocess.Popen[str]]


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


def write_metacat_dataset(tmp: Path, files: int, storage: str, user_dn: str
                          ) -> tuple[Path, Path]:
    """``(datasets file, Rucio spec)`` for the MetaCat and Rucio emulators: ``DEMO_DATASET``
    with ``files`` files. File ``n`` is on the DISK RSE (``n % 4 != 3``, half of those with a
    TAPE copy too) or only on the TAPE RSE; both RSEs serve from ``storage``; ``user_dn`` (RFC
    2253) logs in to Rucio by X.509 as ``root``."""
    namespace = DEMO_DATASET.partition(":")[0]
    names = [f"np04_raw_run{n // 100:05d}_{n:06d}.root" for n in range(files)]
    dataset = [{"namespace": namespace, "name": f, "size": 1 << 20,
                "metadata": {"core.runs": [5000 + n // 100], "core.data_tier": "raw"}}
               for n, f in enumerate(names)]
    datasets = tmp / "metacat-datasets.json"
    datasets.write_text(json.dumps({"datasets": {DEMO_DATASET: dataset}}) + "\n")
    host, port = storage.split("://", 1)[1].split(":")

    def rse(rse_name: str, kind: str, scheme: str, prefix: str) -> dict[str, Any]:
        return {"name": rse_name, "type": kind, "protocols": [
            {"scheme": scheme, "hostname": host, "port": int(port), "prefix": prefix}]}

    def replicas(n: int) -> dict[str, None]:
        if n % 4 == 3:
            return {"DEMO_TAPE": None}
        return {"DEMO_DISK": None, **({"DEMO_TAPE": None} if n % 2 else {})}

    spec = {"scopes": [namespace],
            "rses": [rse("DEMO_DISK", "DISK", "https", "/pnfs/demo/persistent"),
                     rse("DEMO_TAPE", "TAPE", "davs", "/pnfs/demo/tape_backed")],
            "files": [{"scope": namespace, "name": f, "bytes": 1 << 20, "adler32": "00000001",
                       "replicas": replicas(n)} for n, f in enumerate(names)],
            "datasets": [],
            "x509": [{"account": "root", "dn": user_dn}]}
    path = tmp / "rucio-spec.json"
    path.write_text(json.dumps(spec) + "\n")
    return datasets, path


def _interrupt_on_stop_signals() -> dict[int, _Handler]:
    """Make SIGINT, SIGTERM and SIGHUP raise ``KeyboardInterrupt``; the handlers they had.

    Without this a terminated or hung-up demo dies at once, leaving its servers running and the
    private keys on disk (the warm's ``runtime.run`` puts them back when it returns).
    """
    return {sig: signal.signal(sig, signal.default_int_handler) for sig in _STOP_SIGNALS}


def _restore_signals(handlers: dict[int, _Handler]) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def _workspace(keep: bool) -> Iterator[tuple[Path, _Procs]]:
    """A new temporary directory under ``TMPDIR`` and the list of the server processes started
    for it (by ``_spawn``).

    However the block is left (an error, Ctrl-C, SIGTERM or SIGHUP: each raises
    ``KeyboardInterrupt`` meanwhile), the processes still running are killed and all are
    reaped, then the directory is removed unless ``keep``. The three signals are ignored during
    that clean-up, so that pressing Ctrl-C again does not cut it short.
    """
    previous = _interrupt_on_stop_signals()
    procs: _Procs = []
    tmp: Optional[Path] = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix="prestaged-demo-"))
        yield tmp, procs
    finally:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        try:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            if tmp is not None and not keep:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            _restore_signals(previous)


def _spawn(procs: _Procs, cmd: list[str], stdout: Optional[int] = None
           ) -> subprocess.Popen[str]:
    """Start a server process, listed in ``procs`` before anything else can interrupt.

    It runs in a session of its own, out of the terminal's reach: Ctrl-C goes to the demo
    alone, whose warm then stops cleanly while the servers still answer; the demo stops them.
    """
    proc = subprocess.Popen(cmd, stdout=stdout, text=True, start_new_session=True)
    procs.append(proc)
    return proc


def _start(procs: _Procs, cmd: list[str], what: str
           ) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """Start a test server process (``_spawn``) and read the JSON line it prints once
    listening; one that says something else is left to ``_workspace`` to kill."""
    proc = _spawn(procs, cmd, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        info = json.loads(line)
        if not isinstance(info, dict):
            raise TypeError(line)
        return proc, info
    except (ValueError, TypeError):
        raise DemoError(f"demo: the {what} did not start (said {line.strip()!r})") from None


def _stop(proc: subprocess.Popen[str], stats: Path) -> dict[str, Any]:
    proc.terminate()
    proc.wait(timeout=30)
    seen: dict[str, Any] = json.loads(stats.read_text()) if stats.is_file() else {}
    return seen


def _samweb_setup(tmp: Path, procs: _Procs, files: int, base: str
                  ) -> tuple[subprocess.Popen[str], list[str]]:
    """Start the SAM web emulator (into ``procs``); return it and the ``warm`` arguments that
    use it."""
    defs = write_sam_definition(tmp / "sam-definitions.json", files)
    proc, info = _start(procs, [sys.executable, "-m", "prestaged.testing.samweb", "--pki-dir",
                         str(tmp / "pki"), "--definitions", str(defs),
                         "--stats-file", str(tmp / "samweb-stats.json")], "SAM web emulator")
    try:
        base_url = str(info["base_url"])
    except KeyError:
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


def _metacat_setup(tmp: Path, procs: _Procs, files: int, base: str, user_dn: str
                   ) -> tuple[list[subprocess.Popen[str]], list[str]]:
    """Start the MetaCat and Rucio emulators (into ``procs``); return them and the ``warm``
    arguments."""
    datasets, spec = write_metacat_dataset(tmp, files, base, user_dn)
    pki = ["--pki-dir", str(tmp / "pki")]
    metacat, info = _start(procs, [sys.executable, "-m", "prestaged.testing.metacat", *pki,
                                   "--datasets", str(datasets),
                                   "--stats-file", str(tmp / "metacat-stats.json")],
                           "MetaCat emulator")
    rucio, rucio_info = _start(procs, [sys.executable, "-m", "prestaged.testing.rucio", *pki,
                                       "--spec", str(spec),
                                       "--stats-file", str(tmp / "rucio-stats.json")],
                               "Rucio emulator")
    try:
        metacat_url, rucio_url = str(info["base_url"]), str(rucio_info["base_url"])
    except KeyError:
        raise DemoError("demo: the MetaCat or Rucio emulator did not say its URL") from None
    config = tmp / "prestaged.toml"
    config.write_text(
        "# prestaged demo: resolve datasets with the MetaCat and Rucio emulators\n"
        '[catalog]\ndefault = "metacat"\n'
        f'[catalog.metacat]\nurl = "{metacat_url}"\n'
        f'[catalog.rucio]\nurl = "{rucio_url}"\nauth = "x509"\n'
        'rse_preference = ["DEMO_DISK"]\n')
    print(f"demo: MetaCat emulator at {metacat_url}")
    print(f"demo: Rucio emulator at {rucio_url} (X.509 login with the demo proxy)")
    print(f"demo: MetaCat dataset {DEMO_DATASET!r} with {files} files; in Rucio 3/4 on the "
          "DISK RSE, 1/4 only on the TAPE RSE (davs://)")
    print(f"demo: config {config}\n")
    return [metacat, rucio], [DEMO_DATASET, "--config", str(config)]


def _report_catalogs(tmp: Path, sam: Optional[subprocess.Popen[str]],
                     metacat: list[subprocess.Popen[str]]) -> None:
    if sam is not None:
        asked = _stop(sam, tmp / "samweb-stats.json").get("requests", {})
        # Every kind it counted (the count, the listing, the bulk location lookups): the
        # listing and the lookups alone did not add up to the total.
        words = {"count": "file count", "list": "listing", "locations": "bulk location lookups"}
        kinds = ", ".join(f"{n} {words.get(kind, kind)}" for kind, n in sorted(asked.items()))
        print(f"\ndemo: the SAM web emulator answered {sum(asked.values())} requests "
              f"({kinds})", end="")
    if metacat:
        listed = _stop(metacat[0], tmp / "metacat-stats.json").get("requests", {})
        rucio = _stop(metacat[1], tmp / "rucio-stats.json")
        asked = rucio.get("requests", {})
        print(f"\ndemo: MetaCat answered {sum(listed.values())} requests; Rucio "
              f"{asked.get('replicas/list', 0)} replica listings (up to "
              f"{max(rucio.get('dids_per_request') or [0])} files each) after "
              f"{sum((rucio.get('tokens_issued') or {}).values())} X.509 login", end="")


def run_demo(*, files: int, redirect: bool, keep: bool,
             main: Callable[[Optional[list[str]]], int], catalog: str = "local") -> int:
    """Run the demo; returns ``prestaged warm``'s exit code. ``main`` is the CLI entry point.

    ``catalog`` is ``"local"`` (a text file of URLs), ``"samweb"`` (the SAM web emulator) or
    ``"metacat"`` (the MetaCat and Rucio emulators). ``files`` is from 1 to ``MAX_FILES``
    (``ConfigError`` naming ``--files`` otherwise).
    """
    from prestaged.testing.pki import create_pki

    checked("--files", files, within(1, MAX_FILES), "integer")
    with _workspace(keep) as (tmp, procs):
        pki = create_pki(tmp / "pki")
        proxy = pki.make_proxy(tmp / "x509up_demo")
        stats = tmp / "storage-stats.json"
        cmd = [sys.executable, "-m", "prestaged.testing.storage", "--pki-dir", str(tmp / "pki"),
               "--stats-file", str(stats)] + (["--redirect"] if redirect else [])
        storage, info = _start(procs, cmd, "test storage")
        base = f"https://127.0.0.1:{info['door_port']}"
        kind = "door -> pool redirects, " if redirect else ""
        print(f"demo: test storage on {base} ({kind}client certificate required)")
        print(f"demo: proxy {proxy} for {pki.user_dn}")
        sam: Optional[subprocess.Popen[str]] = None
        metacat: list[subprocess.Popen[str]] = []
        if catalog == "samweb":
            sam, source = _samweb_setup(tmp, procs, files, base)
        elif catalog == "metacat":
            from prestaged.testing.rucio_server import rfc2253_dn

            metacat, source = _metacat_setup(tmp, procs, files, base, rfc2253_dn(pki.user_cert))
        else:
            definition = write_definition(tmp / "demo-dataset.txt", base, files)
            print(f"demo: definition {definition} with {files} files\n")
            source = [str(definition)]
        # The demo's state lives (and goes) with its temporary directory.
        code = main(["warm", *source, "--proxy", str(proxy), "--ca-dir",
                     str(pki.ca_dir), "--state", str(tmp / "state.db")])
        seen = _stop(storage, stats)
        _report_catalogs(tmp, sam, metacat)
        if seen:
            print(f"\ndemo: the storage saw {seen.get('requests_total')} requests and sent "
                  f"{seen.get('bytes_total')} bytes of file data")
        if keep:
            print(f"demo: kept {tmp}")
        return code


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
    """The tape demo; returns ``prestaged warm``'s exit code (1: the lost file). ``files`` as
    for ``run_demo``."""
    from prestaged.testing.pki import create_pki

    checked("--files", files, within(1, MAX_FILES), "integer")
    with _workspace(keep) as (tmp, procs):
        pki = create_pki(tmp / "pki")
        proxy = pki.make_proxy(tmp / "x509up_demo")
        paths = write_tape_manifest(tmp / "manifest.json", files)
        stats = tmp / "dcache-stats.json"
        proc = _spawn(procs, [sys.executable, "-m", "prestaged.testing.dcache", "--pki-dir",
                              str(tmp / "pki"), "--ready-file", str(tmp / "ready.json"),
                              "--stats-file", str(stats), "--manifest",
                              str(tmp / "manifest.json"), *_TAPE_MODEL])
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
