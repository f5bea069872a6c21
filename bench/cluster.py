"""Cluster: one large watched definition warmed by 1 or 3 ``prestaged serve`` daemons sharing a
PostgreSQL state, and by one daemon on a SQLite state (issue 16).

Every daemon is started with one ``[[watch]]`` of a local definition (a file of N URLs, default
200,000, on the test storage at 127.0.0.1, ``every = "1h"``). On PostgreSQL the member that
claims the watch's schedule lists the definition and stores the round as chunks of ``--chunk``
files; every member's chunk worker claims chunks and warms them. On SQLite the daemon runs the
watch itself (one run, no chunks). Each measured run gets a fresh storage process, a fresh
database (or state file) and fresh daemons (killed with SIGTERM at its end); runs of the three
configurations are interleaved (the order rotates each round), medians are reported.

Timed (from the state's own timestamps, so polling does not blur them): **wall** from the
daemons' launch until the last chunk is recorded done (SQLite: the run's end), start-up,
listing and planning included; **warm** from the round being stored (``watch_rounds.created``;
SQLite: the run's start) to the same end. CPU (user + system, from ``/proc``, children such as
the state writer included) of the daemons, of the PostgreSQL server (all its processes: the
postmaster and its backends) and of the storage process, read when the work is done;
transactions from ``pg_stat_database.xact_commit``. Each run is checked: every file of the
definition must be warm in the state at the end, and the storage must have answered 206 at
least once per file (exit 1 otherwise).

    .venv/bin/python bench/cluster.py [--files 200000] [--rounds 2] [--chunk 10000]
        [--configs pg-1,pg-3,sqlite-1] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from common import (
    Credentials,
    StorageProcess,
    free_port,
    make_credentials,
    median,
    prestaged_command,
    status_counts,
    storage,
    write_url_list,
)

HEARTBEAT = 1.0
LEASE = 3 * HEARTBEAT
POLL = 0.5
"""Seconds between looks at the state while a run goes on."""
DAEMON_START_TIMEOUT = 60.0
DAEMON_STOP_TIMEOUT = 60.0
NEAR_ONE_CORE = 0.85
"""A process whose CPU time is at least this fraction of the wall time is called CPU-bound."""

CONFIGS = {"pg-1": ("postgresql", 1), "pg-3": ("postgresql", 3), "sqlite-1": ("sqlite", 1)}
"""Configuration name: (state engine, daemons)."""


@dataclass(frozen=True)
class Setup:
    """Everything a measured run needs; built once, shared by every run."""

    creds: Credentials
    workdir: Path
    files: int
    chunk: int
    port: int
    definition: Path
    timeout: float
    postgres: Any = None
    """A running ``PostgresCluster`` (None when no configuration needs one)."""


@dataclass
class Run:
    """One measured run of one configuration; ``problems`` is empty when it was correct."""

    config: str
    round: int
    files: int
    daemons: int
    wall_seconds: float
    warm_seconds: float
    files_per_second: float
    warm_files_per_second: float
    daemon_cpu_seconds: float
    daemon_cpu_us_per_file: float
    postgres_cpu_seconds: Optional[float]
    storage_cpu_seconds: float
    xact_commits: Optional[int]
    xact_per_second: Optional[float]
    storage_requests: int
    status_seconds: float
    """One ``Store.status`` of the definition at the end (every chunk's run ends with one)."""
    chunks_per_member: list[int] = field(default_factory=list)
    """Chunks each member recorded done (PostgreSQL), most first."""
    busy_per_member: list[float] = field(default_factory=list)
    """Fraction of the warm phase each member held a chunk it then finished, most first."""
    chunk_seconds: Optional[float] = None
    """A chunk's claim to done, median over the round's chunks (PostgreSQL)."""
    first_claim_seconds: list[float] = field(default_factory=list)
    """Seconds from the round being stored to each member's first claim, soonest first."""
    takeovers: int = 0
    loop_lag: list[dict[str, Any]] = field(default_factory=list)
    """Each daemon's event loop lag over the run (``LoopLag``)."""
    problems: list[str] = field(default_factory=list)


# --- CPU from /proc ------------------------------------------------------------------------------


def _stat_fields(pid: int) -> Optional[list[str]]:
    """Fields 3.. of ``/proc/<pid>/stat`` (after "pid (comm) "), or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def _children(pid: int) -> list[int]:
    """Live children of ``pid`` (every thread's ``children`` file)."""
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of ``pid``, its reaped children (cutime, cstime) and,
    recursively, its live children: the whole process tree so far."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    ticks = sum(int(f) for f in fields[11:15])  # fields 14-17: utime stime cutime cstime
    own = ticks / os.sysconf("SC_CLK_TCK")
    return own + sum(tree_cpu_seconds(k) for k in _children(pid))


# --- daemons -------------------------------------------------------------------------------------


class Notify:
    """A fake systemd notify socket: READY=1 from one daemon."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def wait_ready(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        """Block until the daemon says READY=1; RuntimeError if it exits or takes too long."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                raise RuntimeError(f"daemon {proc.pid} not ready (exit {proc.poll()})")
            self.sock.settimeout(min(left, 1.0))
            try:
                if "READY=1" in self.sock.recv(4096).decode().splitlines():
                    return
            except socket.timeout:
                continue

    def close(self) -> None:
        self.sock.close()


def daemon_config(home: Path, setup: Setup, state: str, listen: str) -> Path:
    """Write daemon ``home``'s config: state ``state`` (a TOML line), the API on ``listen``,
    the bench proxy and a watch of the definition every hour."""
    cluster = (f'[cluster]\nlease = "{LEASE:g}s"\nheartbeat = "{HEARTBEAT:g}s"\n'
               f"chunk = {setup.chunk}\n" if state.startswith("url") else "")
    path = home / "prestaged.toml"
    path.write_text(f"""\
[credentials]
proxy = {json.dumps(str(setup.creds.proxy))}
ca_dir = {json.dumps(str(setup.creds.pki.ca_dir))}
[state]
{state}
[daemon]
listen = "{listen}"
drain_timeout = "5s"
jitter = 0
campaign_check = "1h"
{cluster}[catalog.local]
dir = {json.dumps(str(setup.definition.parent))}

[[watch]]
definition = {json.dumps(str(setup.definition))}
every = "1h"
""", encoding="utf-8")
    return path


@dataclass(frozen=True)
class Daemon:
    """A launched daemon: its pid and the ``host:port`` of its API."""

    pid: int
    listen: str


@contextlib.contextmanager
def daemons(setup: Setup, count: int, state: str, name: str) -> Iterator[list[Daemon]]:
    """Launch ``count`` daemons at once on ``state`` and wait until each is ready; yields
    them. On the way out: SIGTERM to all, then wait (killed after a timeout)."""
    procs: list[subprocess.Popen[bytes]] = []
    notes: list[Notify] = []
    listens: list[str] = []
    try:
        for n in range(count):
            home = setup.workdir / f"{name}-d{n}"
            home.mkdir()
            listens.append(f"127.0.0.1:{free_port()}")
            config = daemon_config(home, setup, state, listens[-1])
            note = Notify(home / "notify")
            notes.append(note)
            env = {**os.environ, "HOME": str(home), "XDG_STATE_HOME": str(home / "state"),
                   "NOTIFY_SOCKET": str(note.path)}
            with open(home / "daemon.log", "wb") as log:
                procs.append(subprocess.Popen(prestaged_command("serve", "--config", str(config)),
                                              env=env, stdout=log, stderr=log))
        for proc, note in zip(procs, notes):
            note.wait_ready(proc, DAEMON_START_TIMEOUT)
        yield [Daemon(p.pid, listen) for p, listen in zip(procs, listens)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=DAEMON_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for note in notes:
            note.close()


# --- following the state -------------------------------------------------------------------------


@dataclass(frozen=True)
class Finished:
    """What the state says once the work is done: when it started and ended (Unix s), and per
    member (PostgreSQL) the chunks it finished and the seconds it held them."""

    started: float
    ended: float
    chunks: dict[str, int]
    busy: dict[str, float]
    takeovers: int
    chunk_seconds: list[float] = field(default_factory=list)
    """Claim to done, per chunk."""
    first_claims: list[float] = field(default_factory=list)
    """Seconds from the round being stored to each member's first claim."""


def _wait(what: str, look: Callable[[], Optional[Finished]], timeout: float,
          alive: Callable[[], bool]) -> Finished:
    """Poll ``look`` every ``POLL`` s until it answers; RuntimeError after ``timeout`` s or
    when a daemon died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = look()
        if got is not None:
            return got
        if not alive():
            raise RuntimeError(f"{what}: a daemon exited before the end")
        time.sleep(POLL)
    raise RuntimeError(f"{what}: not done within {timeout:.0f} s")


def pg_finished(conn: Any) -> Optional[Finished]:
    """The round's times once every chunk is done (None before)."""
    rows = conn.execute(
        "SELECT r.created, c.done, c.done_by, c.lease_since, c.takeovers FROM watch_rounds r "
        "JOIN round_chunks c ON c.round_id = r.id").fetchall()
    if not rows or any(r[1] is None for r in rows):
        return None
    created = float(rows[0][0])
    chunks: Counter[str] = Counter(r[2] for r in rows)
    busy: Counter[str] = Counter()
    first: dict[str, float] = {}
    for r in rows:
        busy[r[2]] += float(r[1]) - float(r[3])
        first[r[2]] = min(first.get(r[2], float(r[3])), float(r[3]))
    return Finished(created, max(float(r[1]) for r in rows), dict(chunks), dict(busy),
                    sum(int(r[4]) for r in rows),
                    chunk_seconds=[float(r[1]) - float(r[3]) for r in rows],
                    first_claims=sorted(round(t - created, 2) for t in first.values()))


def sqlite_finished(path: Path) -> Optional[Finished]:
    """The watch run's times once it has ended (None before, or while the file is busy)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                                timeout=1.0)) as conn:
            row = conn.execute("SELECT started, ended FROM runs ORDER BY id LIMIT 1").fetchone()
    except sqlite3.Error:
        return None
    if row is None or row[1] is None:
        return None
    return Finished(float(row[0]), float(row[1]), {}, {}, 0)


WARM_FILES = ("SELECT COUNT(*) FROM members m JOIN definitions d ON d.id = m.definition_id "
              "JOIN files f ON f.id = m.file_id WHERE d.name = {p} AND f.status = 'warm'")


def warm_in_state(setup: Setup, engine: str, where: str) -> int:
    """Files of the definition recorded warm in the state (read after the daemons stopped)."""
    if engine == "sqlite":
        with contextlib.closing(sqlite3.connect(where)) as conn:
            return int(conn.execute(WARM_FILES.format(p="?"),
                                    (str(setup.definition),)).fetchone()[0])
    import psycopg

    with psycopg.connect(where, autocommit=True) as conn:
        row = conn.execute(WARM_FILES.format(p="%s"), (str(setup.definition),)).fetchone()
        return int(row[0]) if row else 0


def status_seconds(setup: Setup, engine: str, where: str) -> float:
    """Seconds of one ``Store.status`` of the definition on the finished state: the scan that
    ends every run of a watched definition (``Watches.after_run``), i.e. every chunk."""
    from prestaged.state.store import Store

    path = Path(where) if engine == "sqlite" else setup.workdir / "status.db"
    store = Store(path, url=where if engine == "postgresql" else None).open()
    try:
        started = time.perf_counter()
        store.status(3600.0, str(setup.definition))
        return time.perf_counter() - started
    finally:
        store.close()


def xact_commits(setup: Setup, db: str) -> int:
    """``pg_stat_database.xact_commit`` of database ``db`` (read as the superuser)."""
    rows = setup.postgres.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = %s",
                                  (db,))
    return int(rows[0][0]) if rows else 0


# --- one run -------------------------------------------------------------------------------------


@dataclass
class Readings:
    """What a run collected while its daemons were up."""

    launched: float = 0.0
    finished: Optional[Finished] = None
    daemon_cpu: float = 0.0
    storage_cpu: float = 0.0
    pg_cpu: Optional[float] = None
    status_seconds: float = 0.0
    own_xacts: int = 0
    """Transactions of the benchmark itself (its polls) on the run's database."""
    loop_lag: list[LoopLag] = field(default_factory=list)
    """Each daemon's event loop lag over the run (its /metrics when the work is done)."""


@dataclass(frozen=True)
class LoopLag:
    """A daemon's ``prestaged_event_loop_lag_seconds``: probes, their mean lateness, how many
    were over 0.1 s, and the upper bound of the bucket of the largest one (None: over 30 s)."""

    probes: int
    mean_seconds: float
    over_100ms: int
    max_at_most: Optional[float]


def loop_lag(listen: str) -> LoopLag:
    """Read the loop lag histogram from the daemon's /metrics at ``listen``."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(f"http://{listen}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    [family] = [f for f in text_string_to_metric_families(text)
                if f.name == "prestaged_event_loop_lag_seconds"]
    buckets = {float(s.labels["le"]): s.value for s in family.samples
               if s.name.endswith("_bucket")}
    total = buckets[float("inf")]
    mean = next(s.value for s in family.samples if s.name.endswith("_sum")) / max(total, 1)
    bound = min((le for le, n in buckets.items() if n >= total), default=float("inf"))
    return LoopLag(probes=int(total), mean_seconds=round(mean, 4),
                   over_100ms=int(total - buckets[0.1]),
                   max_at_most=None if bound == float("inf") else bound)


def _run_daemons(setup: Setup, config: str, round_no: int, server: StorageProcess,
                 where: str) -> Readings:
    """Start the configuration's daemons, wait until the state says the work is done, read
    the CPU of everything; the daemons are stopped on the way out."""
    engine, count = CONFIGS[config]
    state = f"url = {json.dumps(where)}" if engine == "postgresql" else \
        f"path = {json.dumps(where)}"
    pg_pid = setup.postgres.server_pid() if engine == "postgresql" else None
    pg_before = tree_cpu_seconds(pg_pid) if pg_pid is not None else 0.0
    got = Readings(launched=time.time())
    with daemons(setup, count, state, f"{config}-{round_no}") as members:
        pids = [d.pid for d in members]

        def alive() -> bool:
            return all((_stat_fields(p) or ["Z"])[0] != "Z" for p in pids)

        left = setup.timeout - (time.time() - got.launched)
        if engine == "postgresql":
            import psycopg

            def look() -> Optional[Finished]:
                got.own_xacts += 1  # each poll is a transaction of the run's database
                return pg_finished(conn)

            with psycopg.connect(where, autocommit=True) as conn:
                got.finished = _wait(config, look, left, alive)
        else:
            got.finished = _wait(config, lambda: sqlite_finished(Path(where)), left, alive)
        got.daemon_cpu = sum(tree_cpu_seconds(p) for p in pids)
        got.loop_lag = [loop_lag(d.listen) for d in members]
        got.storage_cpu = tree_cpu_seconds(server.proc.pid)
        if pg_pid is not None:
            got.pg_cpu = tree_cpu_seconds(pg_pid) - pg_before
    return got


def measure(setup: Setup, config: str, round_no: int) -> Run:
    """One run of ``config`` on a fresh storage, a fresh database or state file and fresh
    daemons; checked against the state and the storage's statistics."""
    engine, count = CONFIGS[config]
    db = f"bench_{config.replace('-', '_')}_{round_no}"
    where = (setup.postgres.create_database(db) if engine == "postgresql"
             else str(setup.workdir / f"{db}.db"))
    xact_before = xact_commits(setup, db) if engine == "postgresql" else 0
    stats_file = setup.workdir / f"stats-{db}.json"
    with storage(setup.creds.pki.root, stats_file, port=setup.port) as server:
        got = _run_daemons(setup, config, round_no, server, where)
        stats = server.stop()
    stats_file.unlink()
    assert got.finished is not None
    xacts = xact_commits(setup, db) - xact_before - got.own_xacts if engine == "postgresql" \
        else None
    problems = _problems(setup, engine, where, stats)
    got.status_seconds = status_seconds(setup, engine, where)
    if engine == "postgresql":
        setup.postgres.drop_database(db)
    return _run_record(setup, config, round_no, count, got, got.finished, xacts, stats,
                       problems)


def _problems(setup: Setup, engine: str, where: str, stats: dict[str, Any]) -> list[str]:
    """What is wrong with the finished run: files not warm in the state, files the storage
    did not answer 206 for."""
    problems = []
    warm = warm_in_state(setup, engine, where)
    if warm != setup.files:
        problems.append(f"{warm} files warm in the state, expected {setup.files}")
    ok = status_counts(stats, "door").get(206, 0)
    if ok < setup.files:
        problems.append(f"storage answered 206 {ok} times, expected at least {setup.files}")
    return problems


def _run_record(setup: Setup, config: str, round_no: int, count: int, got: Readings,
                done: Finished, xacts: Optional[int], stats: dict[str, Any],
                problems: list[str]) -> Run:
    wall = done.ended - got.launched
    warm = done.ended - done.started
    return Run(
        config=config, round=round_no, files=setup.files, daemons=count,
        wall_seconds=round(wall, 2), warm_seconds=round(warm, 2),
        files_per_second=round(setup.files / wall, 1),
        warm_files_per_second=round(setup.files / warm, 1),
        daemon_cpu_seconds=round(got.daemon_cpu, 2),
        daemon_cpu_us_per_file=round(1e6 * got.daemon_cpu / setup.files, 1),
        postgres_cpu_seconds=None if got.pg_cpu is None else round(got.pg_cpu, 2),
        storage_cpu_seconds=round(got.storage_cpu, 2),
        xact_commits=xacts, xact_per_second=None if xacts is None else round(xacts / wall, 1),
        storage_requests=int(stats.get("requests_total", 0)),
        status_seconds=round(got.status_seconds, 3),
        chunks_per_member=sorted(done.chunks.values(), reverse=True),
        busy_per_member=sorted((round(b / warm, 3) for b in done.busy.values()), reverse=True),
        chunk_seconds=round(median(done.chunk_seconds), 2) if done.chunk_seconds else None,
        first_claim_seconds=done.first_claims, takeovers=done.takeovers,
        loop_lag=[asdict(lag) for lag in got.loop_lag], problems=problems,
    )


# --- reporting -----------------------------------------------------------------------------------


def _med(runs: Sequence[Run], key: str) -> Optional[float]:
    values = [getattr(r, key) for r in runs if getattr(r, key) is not None]
    return round(median(values), 2) if values else None


MEDIANS = ("files_per_second", "warm_files_per_second", "wall_seconds", "warm_seconds",
           "daemon_cpu_seconds", "daemon_cpu_us_per_file", "postgres_cpu_seconds",
           "storage_cpu_seconds", "xact_per_second", "chunk_seconds",
           "status_seconds")


def summarize(runs: list[Run], setup: Setup, configs: Sequence[str]) -> dict[str, Any]:
    """The JSON document: every run, per-configuration medians, the ratios and notes."""
    per = {c: {f"median_{k}": _med([r for r in runs if r.config == c], k) for k in MEDIANS}
           for c in configs}
    ratios = {}
    for name, (a, b) in {"pg3_over_pg1": ("pg-3", "pg-1"),
                         "pg1_over_sqlite1": ("pg-1", "sqlite-1")}.items():
        if a in per and b in per:
            ratios[name] = {k: round((per[a][f"median_{k}"] or 0.0)
                                     / (per[b][f"median_{k}"] or 1.0), 3)
                            for k in ("files_per_second", "warm_files_per_second")}
    return {
        "files": setup.files, "chunk": setup.chunk, "rounds": len(runs) // len(configs),
        "heartbeat_seconds": HEARTBEAT, "lease_seconds": LEASE, "cpus": os.cpu_count(),
        "configs": per, "ratios": ratios, "notes": _notes(runs),
        "all_correct": all(not r.problems for r in runs),
        "runs": [asdict(r) for r in runs],
    }


def _notes(runs: list[Run]) -> list[str]:
    """What limited the runs, in words."""
    notes = []
    for r in runs:
        share = r.storage_cpu_seconds / r.wall_seconds
        if share >= NEAR_ONE_CORE:
            notes.append(f"{r.config} round {r.round}: the storage emulator used "
                         f"{100 * share:.0f}% of a core over the run (single-threaded "
                         "Python): it is the limit")
        idle = [b for b in r.busy_per_member if b < 0.8]
        if len(r.busy_per_member) > 1 and idle:
            notes.append(f"{r.config} round {r.round}: a member held chunks for only "
                         f"{100 * min(r.busy_per_member):.0f}% of the warm phase")
        if r.daemons > 1 and len(r.chunks_per_member) < r.daemons:
            notes.append(f"{r.config} round {r.round}: only {len(r.chunks_per_member)} of "
                         f"{r.daemons} members finished a chunk")
        held = [lag for lag in r.loop_lag if lag["max_at_most"] is None
                or lag["max_at_most"] > 0.1]
        if held:
            worst = max(held, key=lambda lag: lag["max_at_most"] or float("inf"))
            notes.append(f"{r.config} round {r.round}: a daemon's event loop was held up to "
                         f"{worst['max_at_most'] or '> 30'} s ({worst['over_100ms']} of "
                         f"{worst['probes']} probes over 0.1 s)")
        if r.storage_requests > r.files:
            notes.append(f"{r.config} round {r.round}: {r.storage_requests - r.files} "
                         f"requests beyond one per file ({r.takeovers} takeovers)")
    return notes


def _f(value: Optional[float], fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def print_table(doc: dict[str, Any]) -> None:
    """The human summary: one row per configuration, the ratios, notes and problems."""
    print(f"cluster: {doc['files']} files x {doc['rounds']} rounds, chunk {doc['chunk']}, "
          f"heartbeat {doc['heartbeat_seconds']:g} s, lease {doc['lease_seconds']:g} s, "
          f"{doc['cpus']} CPUs")
    print(f"{'config':<9} {'files/s':>8} {'runs files/s':>16} {'warm f/s':>8} {'wall s':>7} "
          f"{'CPU s':>6} {'us/file':>7} {'PG CPU s':>8} {'stor CPU s':>10} {'xact/s':>7} "
          f"{'chunk s':>7} {'status s':>8} chunks/member")
    for config, row in doc["configs"].items():
        mine = [r for r in doc["runs"] if r["config"] == config]
        each = ", ".join(f"{r['files_per_second']:.0f}" for r in mine)
        spread = " | ".join("/".join(str(c) for c in r["chunks_per_member"]) or "-"
                            for r in mine)
        print(f"{config:<9} {_f(row['median_files_per_second'], '.0f'):>8} {each:>16} "
              f"{_f(row['median_warm_files_per_second'], '.0f'):>8} "
              f"{_f(row['median_wall_seconds']):>7} {_f(row['median_daemon_cpu_seconds']):>6} "
              f"{_f(row['median_daemon_cpu_us_per_file'], '.0f'):>7} "
              f"{_f(row['median_postgres_cpu_seconds']):>8} "
              f"{_f(row['median_storage_cpu_seconds']):>10} "
              f"{_f(row['median_xact_per_second'], '.0f'):>7} "
              f"{_f(row['median_chunk_seconds']):>7} {_f(row['median_status_seconds']):>8} "
              f"{spread}")
    for name, ratio in doc["ratios"].items():
        print(f"ratio {name} (median files/s): {ratio['files_per_second']:.2f} "
              f"(warm phase: {ratio['warm_files_per_second']:.2f})")
    for note in doc["notes"]:
        print(f"note: {note}")
    for r in doc["runs"]:
        for problem in r["problems"]:
            print(f"INCORRECT {r['config']} round {r['round']}: {problem}")


def _progress(run: Run) -> None:
    verdict = "ok" if not run.problems else "INCORRECT: " + "; ".join(run.problems)
    pg = "" if run.postgres_cpu_seconds is None else (
        f", PostgreSQL CPU {run.postgres_cpu_seconds:.1f} s, {run.xact_per_second:.0f} xact/s")
    print(f"round {run.round} {run.config:<8}: {run.files} files in {run.wall_seconds:.1f} s = "
          f"{run.files_per_second:.0f} files/s (warm {run.warm_seconds:.1f} s; daemons CPU "
          f"{run.daemon_cpu_seconds:.1f} s, storage CPU {run.storage_cpu_seconds:.1f} s{pg}; "
          f"chunks {run.chunks_per_member}, busy {run.busy_per_member}, chunk "
          f"{run.chunk_seconds} s, first claims {run.first_claim_seconds} s; status "
          f"{run.status_seconds:.2f} s; loop lag at most "
          f"{[lag['max_at_most'] for lag in run.loop_lag]} s) {verdict}",
          file=sys.stderr, flush=True)


# --- main ----------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=200_000,
                   help="files in the watched definition (default 200000)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each configuration (default 2)")
    p.add_argument("--chunk", type=int, default=10_000,
                   help="[cluster] chunk: files per chunk of a round (default 10000)")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated, of {', '.join(CONFIGS)} (default: all)")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds before a run is abandoned as failed (default 900)")
    p.add_argument("--keep", action="store_true",
                   help="keep the working directory (daemon logs, configs) and print its path")
    p.add_argument("--json", action="store_true", help="print one JSON document, no table")
    return p


def main() -> int:
    """Run the benchmark; exit 0 if every run was correct, 1 if not, 2 on bad usage."""
    args = _parser().parse_args()
    configs = [c for c in args.configs.split(",") if c]
    if args.files < 1 or args.rounds < 1 or args.chunk < 1:
        print("cluster: --files, --rounds and --chunk must be >= 1", file=sys.stderr)
        return 2
    if not configs or any(c not in CONFIGS for c in configs):
        print(f"cluster: --configs: choose among {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    runs = []
    with contextlib.ExitStack() as stack:
        if args.keep:
            workdir = Path(tempfile.mkdtemp(prefix="prestaged-bench-"))
            print(f"cluster: working directory {workdir} (kept)", file=sys.stderr)
        else:
            workdir = Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="prestaged-bench-")))
        port = free_port()
        setup = Setup(creds=make_credentials(workdir), workdir=workdir, files=args.files,
                      chunk=args.chunk, port=port, timeout=args.timeout,
                      definition=write_url_list(workdir / "definition.txt",
                                                f"https://127.0.0.1:{port}", args.files))
        if any(CONFIGS[c][0] == "postgresql" for c in configs):
            from prestaged.testing.postgres import PostgresCluster

            setup = Setup(**{**setup.__dict__,
                             "postgres": stack.enter_context(PostgresCluster())})
        for round_no in range(1, args.rounds + 1):
            shift = (round_no - 1) % len(configs)
            for config in configs[shift:] + configs[:shift]:
                try:
                    runs.append(measure(setup, config, round_no))
                except RuntimeError as e:
                    print(f"cluster: {config} round {round_no} failed: {e}", file=sys.stderr)
                    return 1
                _progress(runs[-1])
    doc = summarize(runs, setup, configs)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_table(doc)
    return 0 if doc["all_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
