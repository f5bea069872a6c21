"""Tape: time to warm a dataset that is mostly on tape, ``--stage auto`` against ``--stage never``.

The dataset (default 2,000 files; issue 13 names 10,000, see ``--files``) is 70 % tape-only,
the rest cached disk copies; file i is on tape i mod 20, so listing order visits the tapes
round-robin. An emulated dCache (``python -m prestaged.testing.dcache``, its own process on
127.0.0.1, a FRESH cold one for every measured run) has 2 drives. Real times are scaled by 1/60
so that a run takes minutes: a mount 2 s (real ~2 min), a file 0.05 s once mounted (real ~3 s),
the door timeout 3 s (real 180 s: ``webdav.mover.timeout``).

* ``--stage never`` is the seed's way: a ranged GET of every file. On a tape-only file the door
  starts a recall and holds the GET up to the door timeout, then answers 500 while the recall
  goes on; prestaged retries, gives up on the file, and the user runs ``prestaged warm`` again,
  and again, until everything is warm (a state database per run, so files warmed by an earlier
  pass are skipped as fresh, as for a user).
* ``--stage auto`` asks the Tape REST API for locality, stages the tape-only files in batches
  and touches each file once it is on disk.
* ``seed`` (only when asked for: ``--modes auto,seed``) is the seed's recipe itself, not
  prestaged: ``samweb run-project ... 'curl -L --cert ... -H "Range: bytes=0-3" %fileurl'``
  runs one curl at a time, in listing order, with no timeout of its own (so each GET of a
  tape-only file waits for its recall or the door's timeout). A shell loop over the list plays
  ``samweb run-project``; the recipe is run again over the whole list until a pass reads every
  file (206).

The time measured is from the start of the first ``prestaged warm`` to the exit of the pass
after which every file is warm; each run is checked against the emulator's own statistics
(every file on disk and read by a client at least once). Runs alternate auto, never, auto,
never, ... so drift of the machine hits both. Figures are medians over the rounds.

    .venv/bin/python bench/tape.py [--files 2000] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from common import (
    Credentials,
    make_credentials,
    median,
    prestaged_command,
    run_measured,
    stop_server,
    warm_command,
)

from prestaged.testing.dcache.dataset import synthetic

AUTO, NEVER, SEED = "auto", "never", "seed"
SCALE = 60.0
"""Real seconds per emulated second: the model and the client's timings are divided by it."""
READY_TIMEOUT = 120.0
STOP_TIMEOUT = 120.0
READY_POLL = 0.05
TARGET_RATIO = 10.0
TARGET_MAX_PATHS = 500


@dataclass(frozen=True)
class Model:
    """The emulated dCache and dataset; times in emulated seconds (real / ``SCALE``)."""

    files: int
    tape_fraction: float = 0.7
    tapes: int = 20
    drives: int = 2
    mount_seconds: float = 2.0
    file_seconds: float = 0.05
    door_timeout: float = 3.0

    def drives_floor(self, tape_only: int) -> float:
        """Seconds the library needs at the least, whatever the client: each tape mounted
        once, each tape-only file read once, the drives busy throughout. Tape-aware staging
        cannot beat it, so ``never`` / ``auto`` is at most ``never`` / this floor."""
        return (self.tapes * self.mount_seconds + tape_only * self.file_seconds) / self.drives

    def emulator_args(self) -> list[str]:
        """The options of ``python -m prestaged.testing.dcache`` for this model."""
        return ["--files", str(self.files), "--tape-fraction", str(self.tape_fraction),
                "--tapes", str(self.tapes), "--drives", str(self.drives),
                "--mount-seconds", str(self.mount_seconds),
                "--file-seconds", str(self.file_seconds),
                "--door-timeout", str(self.door_timeout), "--size", "1048576"]


@dataclass(frozen=True)
class Setup:
    """Everything a measured run needs; built once, shared by every run."""

    model: Model
    creds: Credentials
    workdir: Path
    modes: tuple[str, ...]
    stage_flag: bool
    attempt_timeout: float
    max_passes: int
    timeout: float


@dataclass(frozen=True)
class Pass:
    """One ``prestaged warm`` process of a run: wall and CPU seconds, exit code, its counts and
    retries by reason."""

    wall_seconds: float
    cpu_seconds: float
    returncode: int
    counts: dict[str, int]
    retries: dict[str, int]


@dataclass(frozen=True)
class Run:
    """One mode's run against a fresh emulator. ``seconds`` from the first pass's start to the
    last pass's exit; request and tape figures are the emulator's; ``problems`` is empty when
    every file ended on disk and touched."""

    mode: str
    round: int
    seconds: float
    passes: list[Pass]
    door_requests: int
    frontend_requests: int
    requests: dict[str, int]
    door_tape_gets: int
    door_blocked_seconds: float
    mounts: int
    max_paths: int
    emulator_cpu_seconds: float
    files: dict[str, int]
    problems: list[str] = field(default_factory=list)


# --- the emulator process ----------------------------------------------------------------------


@dataclass
class Emulator:
    """A running ``prestaged.testing.dcache`` process and what its ready file said."""

    proc: subprocess.Popen[bytes]
    door_url: str
    stats_file: Path

    def stop(self) -> dict[str, Any]:
        """SIGTERM it, reap it (killed after ``STOP_TIMEOUT`` s), return its stats plus its CPU
        seconds (user + system) as ``cpu_seconds``; RuntimeError if it failed."""
        return stop_server(self.proc, self.stats_file, STOP_TIMEOUT, "the dCache emulator")


def _wait_ready(proc: subprocess.Popen[bytes], ready: Path) -> dict[str, Any]:
    """The ready file's JSON; RuntimeError if the process exits or ``READY_TIMEOUT`` passes."""
    deadline = time.monotonic() + READY_TIMEOUT
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the dCache emulator exited {proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the dCache emulator was not ready after {READY_TIMEOUT} s")
        time.sleep(READY_POLL)
    doc: dict[str, Any] = json.loads(ready.read_text())
    return doc


@contextlib.contextmanager
def emulator(setup: Setup, rundir: Path) -> Iterator[Emulator]:
    """A fresh, cold emulator for the ``with`` block (stats: call ``stop()`` inside it)."""
    ready, stats = rundir / "ready.json", rundir / "stats.json"
    cmd = [sys.executable, "-m", "prestaged.testing.dcache", "--pki-dir",
           str(setup.creds.pki.root), "--ready-file", str(ready), "--stats-file", str(stats),
           *setup.model.emulator_args()]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        info = _wait_ready(proc, ready)
        yield Emulator(proc=proc, door_url=info["door_url"], stats_file=stats)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- the client --------------------------------------------------------------------------------


def write_config(path: Path, *, staging: bool, attempt_timeout: float) -> Path:
    """prestaged's defaults with their real times divided by ``SCALE``, like the emulator's.

    ``attempt_timeout`` is ``storage.timeout``: by default 1 s (prestaged's 60 s), below the
    door timeout (180 s -> 3 s) as it is for prestaged's defaults against a real dCache, so a
    GET of a tape-only file is given up after 1 s and the recall it started goes on. Retries:
    backoff from 0.5 s / 60 doubling to 30 s / 60, 600 s / 60 per file. Polls: 0.2 s to 5 s
    (real 12 s to 5 min; prestaged's default first poll, 2 s, would be 0.03 s here).
    """
    lines = ["# bench/tape.py: prestaged's defaults, real times divided by 60",
             "[storage]", f"timeout = {attempt_timeout}"]
    if staging:
        lines += ["poll_min = 0.2", f"poll_max = {300 / SCALE}",
                  f"stage_timeout = {24 * 3600 / SCALE}"]
    lines += ["[retry]", f"initial = {0.5 / SCALE:.4f}", f"max = {30 / SCALE}",
              f"total = {600 / SCALE}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def stage_supported() -> bool:
    """True when ``prestaged warm`` has ``--stage`` (the staging wiring of issue 13)."""
    out = subprocess.run(prestaged_command("warm", "--help"), capture_output=True, text=True,
                         timeout=60, check=False)
    return "--stage" in out.stdout


def _pass(cmd: list[str], timeout: float) -> Pass:
    got = run_measured(cmd, timeout=timeout)
    try:
        doc = json.loads(got.stdout)
    except ValueError:
        doc = {}
    if got.returncode not in (0, 1):
        tail = got.stderr.strip()[-300:]
        print(f"  prestaged exited {got.returncode}: {tail!r}", file=sys.stderr, flush=True)
    return Pass(wall_seconds=round(got.elapsed, 3), cpu_seconds=round(got.cpu_seconds, 2),
                returncode=got.returncode, counts=doc.get("counts", {}),
                retries=doc.get("retries", {}))


def _all_warm(p: Pass, files: int) -> bool:
    return p.returncode == 0 and p.counts.get("warm", 0) + p.counts.get("skipped_fresh", 0) == files


SEED_RECIPE = """\
# The seed's recipe (../shared/reference/seed-submit-with-poms.md), one curl per file in
# listing order, as samweb run-project runs it: $1 the URL list, $2 the proxy, $3 the CA dir.
while read -r url; do
  curl -sS -L --cert "$2" --key "$2" --cacert "$2" --capath "$3" -H "Range: bytes=0-3" \\
    -o /dev/null -w '%{http_code}\\n' "$url"
done < "$1"
"""


def _seed_pass(script: Path, urls: Path, setup: Setup, timeout: float) -> Pass:
    """One pass of the seed's recipe over ``urls``: counts of 206 answers (``warm``) and of the
    others (``failed``)."""
    cmd = ["bash", str(script), str(urls), str(setup.creds.proxy), str(setup.creds.pki.ca_dir)]
    got = run_measured(cmd, timeout=timeout)
    codes = got.stdout.split()
    warm = codes.count("206")
    failed = setup.model.files - warm
    return Pass(wall_seconds=round(got.elapsed, 3), cpu_seconds=round(got.cpu_seconds, 2),
                returncode=0 if failed == 0 else 1,
                counts={"warm": warm, **({"failed": failed} if failed else {})}, retries={})


def warm_until_done(setup: Setup, mode: str, rundir: Path, door_url: str) -> list[Pass]:
    """``prestaged warm`` (or the seed's recipe) again and again, as a user re-runs it, until
    a pass ends with every file warm or fresh; at most ``max_passes`` passes and ``timeout`` s
    in all."""
    urls = rundir / "urls.txt"
    urls.write_text("".join(door_url + f.path + "\n" for f in _dataset(setup.model)))
    if mode == SEED:
        script = rundir / "seed.sh"
        script.write_text(SEED_RECIPE)
        passes: list[Pass] = []
        deadline = time.monotonic() + setup.timeout
        while len(passes) < setup.max_passes and time.monotonic() < deadline:
            passes.append(_seed_pass(script, urls, setup, deadline - time.monotonic()))
            print(f"  seed pass {len(passes)}: {passes[-1].wall_seconds:.1f} s, "
                  f"{passes[-1].counts}", file=sys.stderr, flush=True)
            if _all_warm(passes[-1], setup.model.files):
                break
        return passes
    config = write_config(rundir / "prestaged.toml", staging=setup.stage_flag,
                          attempt_timeout=setup.attempt_timeout)
    extra = ["--state", str(rundir / "state.db")]
    if setup.stage_flag:
        extra += ["--stage", mode]
    cmd = warm_command(urls, setup.creds, config, *extra)
    passes = []
    deadline = time.monotonic() + setup.timeout
    while len(passes) < setup.max_passes and time.monotonic() < deadline:
        passes.append(_pass(cmd, deadline - time.monotonic()))
        p = passes[-1]
        print(f"  {mode} pass {len(passes)}: {p.wall_seconds:.1f} s, {p.counts}",
              file=sys.stderr, flush=True)
        if _all_warm(p, setup.model.files):
            break
    return passes


def _dataset(model: Model) -> list[Any]:
    return synthetic(model.files, tape_fraction=model.tape_fraction, tapes=model.tapes)


# --- one measured run --------------------------------------------------------------------------


def _site_total(requests: dict[str, int], site: str) -> int:
    return sum(n for kind, n in requests.items() if kind.startswith(site + ":"))


def _problems(setup: Setup, passes: list[Pass], files: dict[str, int]) -> list[str]:
    n = setup.model.files
    problems = []
    if not passes or not _all_warm(passes[-1], n):
        problems.append(f"no pass warmed every file in {len(passes)} passes")
    if files.get("on_disk_and_touched") != n:
        problems.append(f"emulator: {files.get('on_disk')} of {n} files on disk, "
                        f"{files.get('on_disk_and_touched')} on disk and touched")
    return problems


def measure(setup: Setup, mode: str, round_no: int) -> Run:
    """One run of ``mode`` against a fresh emulator, checked against its statistics."""
    rundir = setup.workdir / f"{mode}-{round_no}"
    rundir.mkdir()
    with emulator(setup, rundir) as emu:
        start = time.perf_counter()
        passes = warm_until_done(setup, mode, rundir, emu.door_url)
        seconds = time.perf_counter() - start
        doc = emu.stop()
    stats, requests = doc["stats"], doc["stats"]["requests"]
    return Run(
        mode=mode, round=round_no, seconds=round(seconds, 2), passes=passes,
        door_requests=_site_total(requests, "door"),
        frontend_requests=_site_total(requests, "frontend"), requests=requests,
        door_tape_gets=stats["door_tape_gets"],
        door_blocked_seconds=round(stats["door_blocked_seconds"], 1), mounts=stats["mounts"],
        max_paths=stats["max_paths"], emulator_cpu_seconds=round(doc["cpu_seconds"], 1),
        files=doc["files"], problems=_problems(setup, passes, doc["files"]),
    )


# --- reporting ---------------------------------------------------------------------------------


def _per_mode(runs: list[Run], mode: str) -> dict[str, Any]:
    mine = [r for r in runs if r.mode == mode]
    return {key: round(median([getattr(r, key) for r in mine]), 2)
            for key in ("seconds", "door_requests", "frontend_requests", "door_tape_gets",
                        "door_blocked_seconds", "mounts")} | {
        "passes": median([len(r.passes) for r in mine]),
        "max_paths": max(r.max_paths for r in mine)}


def summarize(runs: list[Run], setup: Setup) -> dict[str, Any]:
    """The JSON document: the model, every run, medians per mode, the ratio and the targets."""
    modes = {m: _per_mode(runs, m) for m in setup.modes}
    doc: dict[str, Any] = {
        "model": asdict(setup.model), "scale": SCALE,
        "tape_only_files": round(setup.model.files * setup.model.tape_fraction),
        "rounds": len(runs) // len(setup.modes), "stage_flag": setup.stage_flag,
        "attempt_timeout": setup.attempt_timeout,
        "modes": modes, "all_correct": all(not r.problems for r in runs),
    }
    floor = setup.model.drives_floor(doc["tape_only_files"])
    doc["drives_floor_seconds"] = round(floor, 2)
    for row in modes.values():
        row["over_floor"] = round(row["seconds"] / floor, 2)
    if AUTO in modes and SEED in modes:
        doc["ratio_seed_over_auto"] = round(modes[SEED]["seconds"] / modes[AUTO]["seconds"], 2)
        seed = [r for r in runs if r.mode == SEED]
        doc["seed_seconds_per_tape_only_file"] = round(median(
            [r.seconds / max(1, doc["tape_only_files"]) for r in seed]), 3)
    if AUTO in modes and NEVER in modes:
        ratio = modes[NEVER]["seconds"] / modes[AUTO]["seconds"]
        doc["ratio_never_over_auto"] = round(ratio, 2)
        doc["targets"] = {
            "ratio_at_least_10": ratio >= TARGET_RATIO,
            "no_door_gets_of_tape_only_files_with_staging":
                all(r.door_tape_gets == 0 for r in runs if r.mode == AUTO),
            "no_request_above_500_paths": all(r.max_paths <= TARGET_MAX_PATHS for r in runs),
        }
    doc["runs"] = [asdict(r) for r in runs]
    return doc


def print_table(doc: dict[str, Any]) -> None:
    """The human summary: the model, one row per mode, the ratio, targets and problems."""
    m = doc["model"]
    print(f"tape: {m['files']} files ({doc['tape_only_files']} tape-only) on {m['tapes']} "
          f"tapes in round-robin order, {m['drives']} drives; mount {m['mount_seconds']} s, "
          f"file {m['file_seconds']} s, door timeout {m['door_timeout']} s (real x{SCALE:.0f}); "
          f"prestaged attempt timeout {doc['attempt_timeout']:g} s; {doc['rounds']} rounds, "
          "a fresh cold emulator per run")
    print(f"{'mode':<6} {'median s':>9} {'(real h)':>8} {'runs s':>16} {'passes':>6} "
          f"{'door req':>8} {'tape GETs':>9} {'blocked s':>9} {'frontend':>8} {'mounts':>6} "
          f"{'max paths':>9}")
    for mode, row in doc["modes"].items():
        each = ", ".join(f"{r['seconds']:.0f}" for r in doc["runs"] if r["mode"] == mode)
        print(f"{mode:<6} {row['seconds']:>9.1f} {row['seconds'] * SCALE / 3600:>8.1f} "
              f"{each:>16} {row['passes']:>6.0f} {row['door_requests']:>8.0f} "
              f"{row['door_tape_gets']:>9.0f} {row['door_blocked_seconds']:>9.0f} "
              f"{row['frontend_requests']:>8.0f} {row['mounts']:>6.0f} {row['max_paths']:>9}")
    shares = ", ".join(f"{mode} {row['over_floor']:.2f}x of it"
                       for mode, row in doc["modes"].items())
    print(f"the drives' floor (each tape mounted once, each file read once, every drive busy): "
          f"{doc['drives_floor_seconds']:.1f} s; {shares}")
    if "ratio_never_over_auto" in doc:
        print(f"ratio never/auto (median time): {doc['ratio_never_over_auto']:.1f} "
              f"(target >= {TARGET_RATIO:.0f})")
        print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}"
                                      for k, v in doc["targets"].items()))
    if "ratio_seed_over_auto" in doc:
        print(f"ratio seed/auto (median time): {doc['ratio_seed_over_auto']:.1f} (the seed's "
              f"recipe itself; {doc['seed_seconds_per_tape_only_file']:.2f} s per tape-only "
              "file, all passes)")
    for r in doc["runs"]:
        for problem in r["problems"]:
            print(f"INCORRECT {r['mode']} round {r['round']}: {problem}")


def _progress(run: Run) -> None:
    verdict = "ok" if not run.problems else "INCORRECT: " + "; ".join(run.problems)
    print(f"round {run.round} {run.mode:<5}: {run.seconds:.1f} s in {len(run.passes)} passes; "
          f"door {run.door_requests} requests ({run.door_tape_gets} GETs of tape-only files, "
          f"blocked {run.door_blocked_seconds:.0f} s), frontend {run.frontend_requests}, "
          f"{run.mounts} mounts, max {run.max_paths} paths/request; emulator CPU "
          f"{run.emulator_cpu_seconds:.0f} s {verdict}",
          file=sys.stderr, flush=True)


# --- main --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=10_000,
                   help="files in the dataset (default 10000, the issue's size: ~25 min; "
                        "--files 2000 --rounds 2 takes ~10)")
    p.add_argument("--rounds", type=int, default=1, help="runs of each mode (default 1)")
    p.add_argument("--modes", default=f"{AUTO},{NEVER}",
                   help="comma-separated, run in this order each round (default auto,never; "
                        "seed: the seed's curl recipe, one file at a time)")
    p.add_argument("--drives", type=int, default=2, help="tape drives (default 2)")
    p.add_argument("--tapes", type=int, default=20, help="tapes (default 20)")
    p.add_argument("--tape-fraction", type=float, default=0.7,
                   help="share of tape-only files (default 0.7)")
    p.add_argument("--attempt-timeout", type=float, default=60 / SCALE,
                   help="prestaged's storage.timeout in emulated seconds (default 1, i.e. its "
                        "60 s; above the door timeout, 3, the door's 500 ends each GET)")
    p.add_argument("--max-passes", type=int, default=30,
                   help="prestaged warm passes per run before giving up (default 30)")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds per run, all passes (default 3600)")
    p.add_argument("--json", action="store_true", help="print one JSON document, no table")
    return p


def _setup(args: argparse.Namespace, workdir: Path) -> Optional[Setup]:
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if args.files < 1 or args.rounds < 1 or not modes or set(modes) - {AUTO, NEVER, SEED}:
        print("tape: need --files >= 1, --rounds >= 1 and --modes of auto, never, seed",
              file=sys.stderr)
        return None
    staging = stage_supported()
    if AUTO in modes and not staging:
        print("tape: this prestaged has no `warm --stage`: --modes never only", file=sys.stderr)
        return None
    model = Model(files=args.files, tape_fraction=args.tape_fraction, tapes=args.tapes,
                  drives=args.drives)
    return Setup(model=model, creds=make_credentials(workdir), workdir=workdir, modes=modes,
                 stage_flag=staging, attempt_timeout=args.attempt_timeout,
                 max_passes=args.max_passes, timeout=args.timeout)


def main() -> int:
    """Run the benchmark; exit 0 if every run ended with every file on disk and touched, 1 if
    not, 2 on bad usage."""
    args = _parser().parse_args()
    with tempfile.TemporaryDirectory(prefix="prestaged-tape-") as tmp:
        setup = _setup(args, Path(tmp))
        if setup is None:
            return 2
        runs = []
        for round_no in range(1, args.rounds + 1):
            for mode in setup.modes:
                runs.append(measure(setup, mode, round_no))
                _progress(runs[-1])
    doc = summarize(runs, setup)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_table(doc)
    return 0 if doc["all_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
