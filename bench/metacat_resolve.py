"""MetaCat resolution at scale: a 100,000-file dataset resolved through Rucio, and warmed, on
loopback (issue 15).

The MetaCat emulator (``python -m prestaged.testing.metacat``), the Rucio emulator
(``python -m prestaged.testing.rucio``) and, for the warm, the test storage each run in their
own process on 127.0.0.1, fresh for every measured run (so each run's server statistics and
CPU are its own). MetaCat lists ``dune:synthetic`` (``--files`` files
``synthetic_<i:07d>.root``) and ``dune:bench-small`` (the first ``--baseline`` of them); Rucio
knows the same files with a DISK and a TAPE replica on the storage's port, and maps the bench
proxy's DN to an account (x509 login; ``--rucio-auth userpass`` logs in as root/secret with a
``password_file`` instead). Measured, each a fresh client process (peak RSS by GNU time, see
``common``):

* ``resolve``: the library alone (``MetaCatCatalog.files()`` drained, this script in
  ``--child`` mode): time to the first ``FileRef`` (after the catalog was made, and after the
  process started), time to the last, files/s, peak RSS; for the big dataset and for the
  small one, so that the difference of the peaks shows whether memory grows with the dataset;
* ``files``: ``prestaged files dune:synthetic`` (the CLI, every URL printed);
* ``warm``: ``prestaged warm dune:synthetic --json``: wall time, time from process start to
  the storage's first touch, peak RSS, the warm rate, and proof from the storage's statistics
  that every file was touched exactly once.

Every run is checked: exactly the dataset's files, each once, each at its DISK URL; the
emulators' statistics give the requests sent to MetaCat and to Rucio (logins and
``/replicas/list``, with the DIDs per request). ``--rounds R`` repeats everything, small and
big alternating which goes first.

    .venv/bin/python bench/metacat_resolve.py [--files 100000] [--baseline 1000] [--json]

Exits 1 if any run resolved or warmed the wrong set of files, 2 when peak RSS cannot be
measured (no GNU time).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from common import (
    Credentials,
    EmulatorProcess,
    emulator,
    free_port,
    gnu_time,
    make_credentials,
    median,
    prestaged_command,
    run_measured,
    server_problems,
)
from common import storage as storage_process

BIG = "dune:synthetic"
SMALL = "dune:bench-small"
NAME = "synthetic_{:07d}.root"  # the names both emulators give their synthetic files
STORE_PATH = "/pnfs/dune"
ACCOUNT = "bench"
PASSWORD = "secret"  # the Rucio emulator's default userpass identity: root/root/secret
TARGET_FIRST_URL = 1.0
TARGET_RATE = 20_000
TARGET_RSS_GROWTH = 10.0


# --- the emulators ------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """What the emulators of every run are started from (files in ``workdir``)."""

    workdir: Path
    creds: Credentials
    storage_port: int
    files: int
    datasets: Path
    rucio_spec: Path
    password_file: Path

    @property
    def door(self) -> str:
        """The storage URL Rucio's RSEs point at."""
        return f"https://127.0.0.1:{self.storage_port}{STORE_PATH}"


def make_world(workdir: Path, files: int, baseline: int) -> World:
    """Credentials, the small dataset for MetaCat and the Rucio spec (x509 DN mapped)."""
    from cryptography import x509

    from prestaged.testing.rucio import default_spec

    creds = make_credentials(workdir)
    small = [{"namespace": "dune", "name": NAME.format(i), "size": 1 << 20}
             for i in range(baseline)]
    datasets = workdir / "datasets.json"
    datasets.write_text(json.dumps({"datasets": {SMALL: small}}), encoding="utf-8")
    port = free_port()
    spec = default_spec(f"https://127.0.0.1:{port}{STORE_PATH}").to_dict()
    # Rucio maps the DN in RFC 2253 order (leaf first), as Apache's SSL_CLIENT_S_DN.
    cert = x509.load_pem_x509_certificate(creds.pki.user_cert.read_bytes())
    spec["x509"] = [{"account": ACCOUNT, "dn": cert.subject.rfc4514_string()}]
    rucio_spec = workdir / "rucio-spec.json"
    rucio_spec.write_text(json.dumps(spec), encoding="utf-8")
    password = workdir / "rucio-password"
    password.write_text(PASSWORD + "\n", encoding="utf-8")
    password.chmod(0o600)
    return World(workdir, creds, port, files, datasets, rucio_spec, password)


@contextlib.contextmanager
def catalogs(world: World) -> Iterator[tuple[EmulatorProcess, EmulatorProcess]]:
    """Fresh MetaCat and Rucio emulators for one run: ``(metacat, rucio)``."""
    pki = str(world.creds.pki.root)
    with emulator("prestaged.testing.metacat",
                  ["--pki-dir", pki, "--datasets", str(world.datasets),
                   "--synthetic", f"{BIG}={world.files}"],
                  world.workdir / "metacat-stats.json", "the MetaCat emulator") as metacat, \
            emulator("prestaged.testing.rucio",
                     ["--pki-dir", pki, "--spec", str(world.rucio_spec),
                      "--synthetic", str(world.files)],
                     world.workdir / "rucio-stats.json", "the Rucio emulator") as rucio:
        yield metacat, rucio


def write_config(path: Path, world: World, metacat_url: str, rucio_url: str,
                 args: argparse.Namespace) -> Path:
    """A prestaged config: MetaCat anonymous, Rucio by ``--rucio-auth``, the proxy only (a
    token lying around on the machine must not change what is measured)."""
    auth = (f'auth = "userpass"\nusername = "root"\npassword_file = "{world.password_file}"\n'
            if args.rucio_auth == "userpass" else 'auth = "x509"\n')
    path.write_text(
        f'[credentials]\nmethod = "proxy"\n[catalog]\ndefault = "metacat"\n'
        f'[catalog.metacat]\nurl = "{metacat_url}"\nauth = "none"\n'
        f'[catalog.rucio]\nurl = "{rucio_url}"\n{auth}chunk = {args.chunk}\n'
        f"parallel = {args.parallel}\n", encoding="utf-8")
    return path


def catalog_requests(metacat: dict[str, Any], rucio: dict[str, Any]) -> dict[str, Any]:
    """What the emulators served in one run."""
    dids = rucio.get("dids_per_request", [])
    return {"metacat_requests": metacat.get("total"),
            "rucio_requests": rucio.get("total"),
            "rucio_logins": sum(rucio.get("tokens_issued", {}).values()),
            "rucio_replica_lists": rucio.get("requests", {}).get("replicas/list", 0),
            "rucio_max_dids": max(dids, default=0),
            "rucio_refusals": rucio.get("auth_refusals"),
            "metacat_cpu_seconds": round(metacat["cpu_seconds"], 2),
            "rucio_cpu_seconds": round(rucio["cpu_seconds"], 2)}


# --- checking what came back --------------------------------------------------------------------


class FileCheck:
    """Exactly files ``0 .. count-1``, each once, each at its DISK URL (a bitmap: ~count/8
    bytes), naming what is wrong; for the CLI runs, checked here from their output."""

    def __init__(self, count: int, door: str) -> None:
        self.count = count
        self.prefix = f"{door}/synthetic/"
        self.seen = bytearray((count + 7) // 8)
        self.distinct = 0
        self.problems: list[str] = []

    def add(self, name: str, url: str) -> None:
        """One resolved file: ``dune:<name>`` at ``url``."""
        i = _index(name.partition(":")[2])
        if i is None or i >= self.count:
            return self._problem(f"unexpected file {name}")
        if url != self.prefix + NAME.format(i):
            return self._problem(f"{name} at {url}, not its DISK URL")
        byte, bit = divmod(i, 8)
        if self.seen[byte] & (1 << bit):
            return self._problem(f"{name} came twice")
        self.seen[byte] |= 1 << bit
        self.distinct += 1

    def _problem(self, text: str) -> None:
        if len(self.problems) < 5:
            self.problems.append(text)

    def result(self) -> list[str]:
        """What was wrong; empty when exactly the expected files came."""
        missing = self.count - self.distinct
        return self.problems + ([f"{missing} files missing"] if missing else [])


def _index(name: str) -> Optional[int]:
    """``i`` of a name ``NAME.format(i)``, else None."""
    digits = name[len("synthetic_"):-len(".root")]
    if not digits.isdigit() or name != NAME.format(int(digits)):
        return None
    return int(digits)


# --- child mode: the library alone --------------------------------------------------------------


async def _resolve(args: argparse.Namespace) -> dict[str, Any]:
    from prestaged.catalog.http import catalog_ssl_context
    from prestaged.catalog.metacat import MetaCatCatalog
    from prestaged.config import load_config
    from prestaged.credentials import load_credentials

    cfg = load_config(args.config).catalog
    creds = load_credentials(proxy=args.proxy, proxy_configured=None, ca_dir=args.ca_dir,
                             ca_dir_configured=None, min_lifetime=0.0)
    assert creds.proxy is not None
    start = time.perf_counter()
    catalog = MetaCatCatalog(args.dataset, cfg, catalog_ssl_context(creds),
                             identity=creds.proxy.identity)
    first: Optional[float] = None
    first_mono: Optional[float] = None
    count = digest = 0
    async for ref in catalog.files():
        if first is None:
            first, first_mono = time.perf_counter() - start, time.monotonic()
        # ~1 us a file, where FileCheck costs ~4.5 us (~5 % of the client's CPU per file);
        # the sum of the pairs' hashes is compared once the clock has stopped.
        count += 1
        digest += hash((ref.name, ref.url))
    elapsed = time.perf_counter() - start
    prefix = f"{args.door}/synthetic/"
    want = sum(hash((f"dune:{NAME.format(i)}", prefix + NAME.format(i)))
               for i in range(args.expect))
    problems = [] if (count, digest) == (args.expect, want) else [
        f"{count} files resolved, not exactly files 0..{args.expect - 1} each once at its "
        "DISK URL (prestaged files shows which)"]
    return {"files": count, "unresolved": catalog.unresolved_count,
            "rucio_requests": catalog.rucio_requests, "first_ref_seconds": first,
            "first_ref_monotonic": first_mono, "resolve_seconds": elapsed,
            "problems": problems}


def child(args: argparse.Namespace) -> int:
    """``--child``: resolve one dataset with the library, print one JSON line (with
    ``--profile FILE``, under cProfile, its statistics written to FILE)."""
    if args.profile is None:
        doc = asyncio.run(_resolve(args))
    else:
        import cProfile

        with cProfile.Profile() as prof:
            doc = asyncio.run(_resolve(args))
        prof.dump_stats(args.profile)
    print(json.dumps(doc))
    return 0


# --- the measurements ---------------------------------------------------------------------------


def _rss(value: Optional[float]) -> Optional[float]:
    return round(value, 1) if value is not None else None


def _round(value: Optional[float]) -> Optional[float]:
    return round(value, 3) if value is not None else None


def _env(world: World, run: str) -> dict[str, str]:
    """The client's environment: a state database of its own (no run skips files another
    warmed), nothing of the user's state touched, and no ``$RUCIO_ACCOUNT`` of the user (the
    emulator maps the bench DN to its own account)."""
    env = {k: v for k, v in os.environ.items() if k != "RUCIO_ACCOUNT"}
    return {**env, "XDG_STATE_HOME": str(world.workdir / "state" / run)}


def measure_resolve(world: World, args: argparse.Namespace, dataset: str, files: int,
                    run: str) -> dict[str, Any]:
    """The library resolving ``dataset`` in a child process, against fresh emulators."""
    with catalogs(world) as (metacat, rucio):
        config = write_config(world.workdir / f"{run}.toml", world, metacat.base_url,
                              rucio.base_url, args)
        cmd = [sys.executable, __file__, "--child", "--config", str(config), "--dataset",
               dataset, "--expect", str(files), "--door", world.door, "--proxy",
               str(world.creds.proxy), "--ca-dir", str(world.creds.pki.ca_dir)]
        if args.profile is not None:
            cmd += ["--profile", str(args.profile / f"{run}.pstats")]
        started = time.monotonic()
        m = run_measured(cmd, timeout=args.timeout, env=_env(world, run))
        served = catalog_requests(metacat.stop(), rucio.stop())
    problems = [] if m.returncode == 0 else [f"exit {m.returncode}: {m.stderr[-500:]}"]
    doc: dict[str, Any] = json.loads(m.stdout) if m.returncode == 0 else {}
    problems += doc.get("problems", [])
    if doc and doc["unresolved"]:
        problems.append(f"{doc['unresolved']} unresolved")
    first_mono = doc.get("first_ref_monotonic")
    return {"run": run, "dataset": dataset, "files": files,
            "first_ref_seconds": _round(doc.get("first_ref_seconds")),
            "first_ref_after_start_seconds": _round(first_mono - started if first_mono
                                                    else None),
            "resolve_seconds": _round(doc.get("resolve_seconds")),
            "files_per_second": round(files / doc["resolve_seconds"]) if doc else None,
            "process_seconds": round(m.elapsed, 3), "cpu_seconds": round(m.cpu_seconds, 2),
            "peak_rss_mib": _rss(m.peak_rss_mib), "client_rucio_requests":
                doc.get("rucio_requests"), **served, "problems": problems}


def measure_files_cli(world: World, args: argparse.Namespace, run: str) -> dict[str, Any]:
    """``prestaged files BIG``: every URL printed by the real CLI."""
    with catalogs(world) as (metacat, rucio):
        config = write_config(world.workdir / f"{run}.toml", world, metacat.base_url,
                              rucio.base_url, args)
        cmd = prestaged_command("files", BIG, "--config", str(config), "--ca-dir",
                                str(world.creds.pki.ca_dir), "--proxy", str(world.creds.proxy))
        m = run_measured(cmd, timeout=args.timeout, env=_env(world, run))
        served = catalog_requests(metacat.stop(), rucio.stop())
    check = FileCheck(world.files, world.door)
    for url in m.stdout.splitlines():
        check.add("dune:" + url.rpartition("/")[2], url)
    problems = [] if m.returncode == 0 else [f"exit {m.returncode}: {m.stderr[-300:]}"]
    problems += check.result()
    return {"run": run, "files": world.files, "wall_seconds": round(m.elapsed, 3),
            "files_per_second": round(world.files / m.elapsed),
            "cpu_seconds": round(m.cpu_seconds, 2), "peak_rss_mib": _rss(m.peak_rss_mib),
            **served, "problems": problems}


def measure_warm(world: World, args: argparse.Namespace, run: str) -> dict[str, Any]:
    """``prestaged warm BIG --json`` against fresh emulators and a fresh storage process."""
    with catalogs(world) as (metacat, rucio), \
            storage_process(world.creds.pki.root, world.workdir / "storage-stats.json",
                            port=world.storage_port) as srv:
        config = write_config(world.workdir / f"{run}.toml", world, metacat.base_url,
                              rucio.base_url, args)
        cmd = prestaged_command("warm", BIG, "--config", str(config), "--proxy",
                                str(world.creds.proxy), "--ca-dir", str(world.creds.pki.ca_dir),
                                "--json", "--no-progress")
        started = time.monotonic()
        m = run_measured(cmd, timeout=args.timeout, env=_env(world, run))
        stats = srv.stop()
        served = catalog_requests(metacat.stop(), rucio.stop())
    first_touch = min((r["time"] for p in stats["paths"].values() for r in p["records"]),
                      default=None)
    problems = server_problems(stats, world.files, redirect=False)
    check = FileCheck(world.files, world.door)
    for path in stats["paths"]:
        check.add("dune:" + path.rpartition("/")[2], world.door.partition(STORE_PATH)[0] + path)
    problems += check.result()
    report: dict[str, Any] = {}
    try:
        report = json.loads(m.stdout)
    except ValueError:
        problems.append(f"exit {m.returncode}, no JSON: {m.stderr[-300:]}")
    if report.get("counts", {}).get("warm") != world.files:
        problems.append(f"warm {report.get('counts', {}).get('warm')}, expected {world.files}")
    return {"run": run, "files": world.files, "wall_seconds": round(m.elapsed, 3),
            "first_touch_seconds": _round(first_touch - started if first_touch else None),
            "reported_files_per_second": report.get("files_per_second"),
            "cpu_seconds": round(m.cpu_seconds, 2), "peak_rss_mib": _rss(m.peak_rss_mib),
            "storage_cpu_seconds": round(stats["cpu_seconds"], 2), **served,
            "problems": problems}


def one_round(world: World, args: argparse.Namespace, r: int) -> dict[str, Any]:
    """Small and big resolve (alternating order), ``files`` and ``warm``."""
    out: dict[str, Any] = {}
    order = [("small", SMALL, args.baseline), ("big", BIG, args.files)]
    for kind, dataset, files in order if r % 2 == 0 else order[::-1]:
        print(f"round {r + 1}: resolve {dataset} ({files} files)", file=sys.stderr)
        out[f"resolve_{kind}"] = measure_resolve(world, args, dataset, files,
                                                 f"resolve-{kind}-{r + 1}")
    if not args.no_cli:
        print(f"round {r + 1}: prestaged files {BIG}", file=sys.stderr)
        out["files_cli"] = measure_files_cli(world, args, f"files-{r + 1}")
        print(f"round {r + 1}: prestaged warm {BIG}", file=sys.stderr)
        out["warm"] = measure_warm(world, args, f"warm-{r + 1}")
    return out


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds and the targets of issue 15."""
    def med(kind: str, key: str) -> Optional[float]:
        values = [r[kind][key] for r in rounds if kind in r and r[kind][key] is not None]
        return round(median(values), 3) if values else None

    growth = [r["resolve_big"]["peak_rss_mib"] - r["resolve_small"]["peak_rss_mib"]
              for r in rounds if r["resolve_big"]["peak_rss_mib"]
              and r["resolve_small"]["peak_rss_mib"]]
    first, rate = med("resolve_big", "first_ref_seconds"), med("resolve_big", "files_per_second")
    rate = round(rate) if rate is not None else None
    requests = med("resolve_big", "rucio_requests")
    rss_growth = round(max(growth), 1) if growth else None
    return {
        "first_ref_seconds": first, "files_per_second": rate,
        "rss_small_mib": med("resolve_small", "peak_rss_mib"),
        "rss_big_mib": med("resolve_big", "peak_rss_mib"), "rss_growth_mib": rss_growth,
        "rucio_requests": round(requests) if requests is not None else None,
        "targets": {
            "first_url_under_1_s": first is not None and first < TARGET_FIRST_URL,
            "at_least_20000_files_per_s": rate is not None and rate >= TARGET_RATE,
            "rss_within_10_mib_of_baseline": rss_growth is not None
                and rss_growth <= TARGET_RSS_GROWTH,
        },
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement; returns the JSON document."""
    with tempfile.TemporaryDirectory(prefix="bench-metacat-") as tmp:
        world = make_world(Path(tmp), args.files, args.baseline)
        rounds = [one_round(world, args, r) for r in range(args.rounds)]
    return {"files": args.files, "baseline": args.baseline, "chunk": args.chunk,
            "parallel": args.parallel, "rucio_auth": args.rucio_auth, "rounds": rounds,
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "summary": summarize(rounds)}


# --- output -------------------------------------------------------------------------------------


_COLUMNS = (("files", "files", 7), ("first s", "first_ref_seconds", 8),
            ("first s*", "first_ref_after_start_seconds", 9), ("all s", "resolve_seconds", 7),
            ("wall s", "process_seconds", 7), ("files/s", "files_per_second", 8),
            ("CPU s", "cpu_seconds", 6), ("RSS MiB", "peak_rss_mib", 8),
            ("Rucio req", "rucio_requests", 10), ("lists", "rucio_replica_lists", 6),
            ("max DIDs", "rucio_max_dids", 9), ("MetaCat req", "metacat_requests", 12),
            ("MC/Rucio CPU s", "server_cpu", 15))


def _row(label: str, run: dict[str, Any]) -> str:
    run = {**run, "server_cpu": f"{run['metacat_cpu_seconds']}/{run['rucio_cpu_seconds']}"}
    if "wall_seconds" in run:
        run["process_seconds"] = run["wall_seconds"]
    if "first_touch_seconds" in run:
        run["first_ref_after_start_seconds"] = run["first_touch_seconds"]
        run["files_per_second"] = run["reported_files_per_second"]
    cells = [f"{'-' if run.get(key) is None else run[key]:>{width}}"
             for _, key, width in _COLUMNS]
    return f"{label:<18}" + "".join(cells)


def print_table(doc: dict[str, Any]) -> None:
    """The human summary."""
    print(f"MetaCat + Rucio resolution, {doc['files']} files (baseline {doc['baseline']}; "
          f"chunk {doc['chunk']}, {doc['parallel']} in flight, Rucio {doc['rucio_auth']} "
          f"login), emulators and storage on 127.0.0.1, {len(doc['rounds'])} round(s); "
          f"load average at the end {doc['load_average']}")
    print(f"{'run':<18}" + "".join(f"{title:>{width}}" for title, _, width in _COLUMNS))
    for r in doc["rounds"]:
        for kind, label in (("resolve_small", "library, small"), ("resolve_big",
                            "library, big"), ("files_cli", "prestaged files"),
                            ("warm", "prestaged warm")):
            if kind in r:
                print(_row(f"{label} {r[kind]['run'].rsplit('-', 1)[1]}", r[kind]))
    s = doc["summary"]
    print("first s: first FileRef after the catalog was made; first s*: after the process "
          "started (warm: the storage's first touch); files/s of warm: its warm phase")
    met = {True: "met", False: "MISSED"}
    t = s["targets"]
    print(f"targets (medians of the library runs): first URL {s['first_ref_seconds']} s "
          f"(< {TARGET_FIRST_URL:g} s: {met[t['first_url_under_1_s']]}); "
          f"{s['files_per_second']} files/s (>= {TARGET_RATE}: "
          f"{met[t['at_least_20000_files_per_s']]}); peak RSS {s['rss_big_mib']} MiB vs "
          f"{s['rss_small_mib']} MiB, largest growth {s['rss_growth_mib']} MiB (<= "
          f"{TARGET_RSS_GROWTH:g}: {met[t['rss_within_10_mib_of_baseline']]}); "
          f"{s['rucio_requests']} requests to Rucio")
    for r in doc["rounds"]:
        for run_doc in r.values():
            for problem in run_doc["problems"]:
                print(f"  PROBLEM ({run_doc['run']}): {problem}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=100_000, help="big dataset (default 100000)")
    p.add_argument("--baseline", type=int, default=1_000, help="small dataset (default 1000)")
    p.add_argument("--rounds", type=int, default=1, help="repeat everything (default 1)")
    p.add_argument("--chunk", type=int, default=500, help="catalog.rucio.chunk (default 500)")
    p.add_argument("--parallel", type=int, default=4,
                   help="catalog.rucio.parallel (default 4)")
    p.add_argument("--rucio-auth", choices=("x509", "userpass"), default="x509",
                   help="how the client logs in to Rucio (default x509, the bench proxy)")
    p.add_argument("--no-cli", action="store_true",
                   help="the library runs only (no prestaged files / warm)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="run the library children under cProfile, statistics to DIR/RUN.pstats")
    p.add_argument("--timeout", type=float, default=600.0, help="per run, seconds")
    p.add_argument("--json", action="store_true", help="print one JSON document, no table")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--dataset", help=argparse.SUPPRESS)
    p.add_argument("--expect", type=int, help=argparse.SUPPRESS)
    p.add_argument("--door", help=argparse.SUPPRESS)
    p.add_argument("--proxy", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--ca-dir", type=Path, help=argparse.SUPPRESS)
    return p


def main() -> int:
    """Run the benchmark; see the module docstring for exit codes."""
    args = _parser().parse_args()
    if args.child:
        return child(args)
    if gnu_time() is None:
        print("peak RSS needs GNU time (/usr/bin/time)", file=sys.stderr)
        return 2
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    doc = run(args)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_table(doc)
    failed = any(run_doc["problems"] for r in doc["rounds"] for run_doc in r.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
