"""``prestaged campaign run/show``: splits, ledger, stage order, at-most-once, gating, end to end."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from campaign_fakes import read_records, write_definition
from cli_runner import CliResult, run_cli
from conftest import Backend

from prestaged.campaign.spec import load_campaign, parse_split, render
from prestaged.errors import ConfigError
from prestaged.testing.pki import TestPKI
from prestaged.testing.storage import Delay, ThreadedStorageServer

TIMEOUT = 60

# Appends one JSON line (argv, start time on CLOCK_MONOTONIC, the slice files' contents) to
# $CAMPAIGN_RECORD, prints a jobsub-like job id; with $FAKE_KILL_PARENT it SIGKILLs prestaged.
FAKE_SUBMIT = """\
import json, os, sys, time
start = time.monotonic()
doc = {"argv": sys.argv[1:], "start": start}
for arg in sys.argv[1:]:
    if arg.endswith((".urls", ".files")) and os.path.isfile(arg):
        doc[arg.rsplit(".", 1)[1]] = open(arg).read().split()
with open(os.environ["CAMPAIGN_RECORD"], "a") as f:
    f.write(json.dumps(doc) + "\\n")
print("JobsubJobId of first job: %s.0@test" % sys.argv[1], flush=True)
if os.environ.get("FAKE_KILL_PARENT"):
    os.kill(os.getppid(), 9)
"""

# Exits 1 on the first poll of a job id, 0 (recording the time) on the next.
FAKE_COMPLETE = """\
import json, os, sys, time
polls = os.path.join(os.environ["COMPLETE_DIR"], sys.argv[1] + ".polls")
n = int(open(polls).read()) + 1 if os.path.exists(polls) else 1
open(polls, "w").write(str(n))
if n < 2:
    sys.exit(1)
with open(os.path.join(os.environ["COMPLETE_DIR"], "done.jsonl"), "a") as f:
    f.write(json.dumps({"job_id": sys.argv[1], "done": time.monotonic()}) + "\\n")
"""


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Commands run in tmp_path, as a user would run them next to their files: relative
    definition names resolve there, and anything an injected shell command made lands there."""
    monkeypatch.chdir(tmp_path)


def _q(*parts: object) -> str:
    return " ".join(shlex.quote(str(p)) for p in parts)


def _write(tmp_path: Path, body: str, name: str = "campaign.toml") -> Path:
    (tmp_path / "fake_submit.py").write_text(FAKE_SUBMIT)
    (tmp_path / "fake_complete.py").write_text(FAKE_COMPLETE)
    path = tmp_path / name
    path.write_text(body)
    return path


def _submit(tmp_path: Path, args: str) -> str:
    """A TOML string: the fake submit command followed by ``args`` (a template)."""
    return json.dumps(_q(sys.executable, tmp_path / "fake_submit.py") + " " + args)


def _env(tmp_path: Path, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """What the fake commands read: where to record submissions and complete polls."""
    return {"CAMPAIGN_RECORD": str(tmp_path / "record.jsonl"), "COMPLETE_DIR": str(tmp_path),
            **(extra_env or {})}


@pytest.fixture(autouse=True)
def _state_backend(backend: Backend, tmp_path: Path) -> Iterator[None]:
    """Every test on each backend: what selects its state is kept in tmp_path, where the
    helpers (which get tmp_path) find it. On PostgreSQL no command fell back to a file."""
    from prestaged.state.store import default_state_path

    (tmp_path / "backend.json").write_text(json.dumps({"cli": backend.cli(),
                                                       "url": backend.url}))
    yield
    if backend.url is not None:
        assert not default_state_path().exists() and not backend.path.exists()


def _state(tmp_path: Path) -> dict[str, Any]:
    """The test's backend: ``cli`` (arguments selecting it) and ``url`` (None for SQLite);
    for tests of other modules using these helpers, the SQLite file in tmp_path."""
    chosen = tmp_path / "backend.json"
    if not chosen.exists():
        return {"cli": ["--state", str(tmp_path / "state.db")], "url": None}
    doc: dict[str, Any] = json.loads(chosen.read_text())
    return doc


def _store(tmp_path: Path) -> Any:
    """A ``Store`` of the test's state, not opened."""
    from prestaged.state.store import Store

    return Store(tmp_path / "state.db", url=_state(tmp_path)["url"])


def _args(pki: TestPKI, proxy: Path, tmp_path: Path, args: tuple[str, ...]) -> list[str]:
    """``args`` with the test's state (and the test proxy for ``campaign run``)."""
    ours = list(_state(tmp_path)["cli"])
    if args[:2] == ("campaign", "run"):
        ours += ["--proxy", str(proxy), "--ca-dir", str(pki.ca_dir)]
    return [*args, *ours]


def _prestaged(pki: TestPKI, proxy: Path, tmp_path: Path, *args: str,
               extra_env: dict[str, str] | None = None) -> CliResult:
    """``prestaged ARGS`` in-process (``run_cli``), with the test proxy and a state file in
    tmp_path: what a command prints and returns, not the process boundary."""
    return run_cli(*_args(pki, proxy, tmp_path, args), env=_env(tmp_path, extra_env))


def _spawn(pki: TestPKI, proxy: Path, tmp_path: Path, *args: str,
           extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``python -m prestaged ARGS`` as a real process, for tests of signals and kills."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("X509_", "PRESTAGED_"))}
    env.update(_env(tmp_path, extra_env))
    return subprocess.Popen([sys.executable, "-m", "prestaged",
                             *_args(pki, proxy, tmp_path, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)


def _reco_campaign(tmp_path: Path, name: str, ds: Path, submit: str,
                   split: str = "all") -> Path:
    """Campaign ``name``: one stage ``reco`` over the list ``ds``, split by ``split``,
    submitting with ``submit`` (a TOML string)."""
    return _write(tmp_path, f"""
name = "{name}"
[[stage]]
name = "reco"
input = {json.dumps(str(ds))}
split = "{split}"
submit = {submit}
""")


def _one_file_campaign(tmp_path: Path, storage: ThreadedStorageServer, name: str,
                       submit: str) -> Path:
    """``_reco_campaign`` over a one-file list on ``storage``."""
    return _reco_campaign(tmp_path, name, write_definition(tmp_path, storage, ["/pnfs/camp/a"]),
                          submit)


# A submit command (a TOML string) that touches ./started, waits for ./go (at most 60 s),
# then prints a job id.
WAITING_SUBMIT = json.dumps(_q(
    "sh", "-c", 'touch started; i=0; while [ ! -e go ] && [ $i -lt 1200 ]; do sleep 0.05; '
    'i=$((i+1)); done; echo "JobsubJobId of first job: 9.0@t"'))


@contextlib.contextmanager
def _killed_at_the_end(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """``proc``, killed (and reaped) when the block ends if it still runs (a failed assert)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _until_submitting(proc: subprocess.Popen[str], tmp_path: Path) -> None:
    """Wait (with a deadline) until ``proc``'s ``WAITING_SUBMIT`` has started."""
    deadline = time.monotonic() + TIMEOUT
    while not (tmp_path / "started").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never submitted"
        time.sleep(0.02)  # polling another process's file, with a deadline


def _show(pki: TestPKI, proxy: Path, tmp_path: Path, name: str) -> list[dict[str, Any]]:
    res = _prestaged(pki, proxy, tmp_path, "campaign", "show", name, "--json")
    assert res.returncode == 0, res.stderr
    subs: list[dict[str, Any]] = json.loads(res.stdout)["submissions"]
    return subs


def test_drainingn_slices_are_disjoint_warm_first_and_never_resubmitted(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path
) -> None:
    """drainingn(2) over 5 files: 3 submissions, disjoint, all warm before submit; rerun adds none."""
    paths = [f"/pnfs/camp/f{i}" for i in range(5)]
    delays = {paths[1]: 0.6, paths[4]: 0.4}
    for p, seconds in delays.items():
        storage.inject(p, [Delay(seconds)])
    ds = write_definition(tmp_path, storage, paths)
    campaign = _reco_campaign(
        tmp_path, "drain", ds,
        _submit(tmp_path, "{submission} {definition} {files_file} {urls_file} {n_files}"),
        split="drainingn(2)")
    res = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(campaign))
    assert res.returncode == 0, res.stderr
    records = read_records(tmp_path)
    assert [len(r["urls"]) for r in records] == [2, 2, 1]
    assert [r["argv"][-1] for r in records] == ["2", "2", "1"]
    assert [len(r["files"]) for r in records] == [2, 2, 1]
    urls = [u for r in records for u in r["urls"]]
    assert sorted(urls) == sorted(storage.url(p) for p in paths)  # disjoint and complete
    for r in records:  # every file of the slice was warm (response sent) before submit started
        warm = [storage.stats.path(p).times[0] + delays.get(p, 0.0) for p in paths
                if storage.url(p) in r["urls"]]
        assert r["start"] >= max(warm)
    assert all(len(storage.stats.path(p).times) == 1 for p in paths)
    subs = _show(pki, proxy, tmp_path, str(campaign))
    assert [(s["item"], s["state"], s["job_id"]) for s in subs] == [
        (f"slice-{k}", "completed", f"{k}.0@test") for k in (1, 2, 3)]
    assert [e["to"] for e in subs[0]["events"]] == [
        "queued", "prestaging", "ready", "submitting", "submitted", "completed"]
    res = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(campaign))
    assert res.returncode == 0, res.stderr
    assert len(read_records(tmp_path)) == 3
    assert len(_show(pki, proxy, tmp_path, "drain")) == 3


def test_drainingn_refuses_urls_with_secrets_and_stores_none(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path
) -> None:
    """A drainingn slice is kept in the state's ledger: a URL of its input with a token in it
    stops the run (exit 4, one line naming the URL redacted and the input) before any
    submission, and the token is nowhere in the state; it used to be stored verbatim."""
    ds = tmp_path / "ds.txt"
    ds.write_text(storage.url("/pnfs/camp/a") + "\n" + storage.url("/pnfs/camp/b")
                  + "?authz=C4naryT0k\n")
    campaign = _reco_campaign(tmp_path, "leaky", ds, _submit(tmp_path, "{submission}"),
                              split="drainingn(5)")
    res = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(campaign))
    assert res.returncode == 4, res.stderr
    assert "C4naryT0k" not in res.stdout + res.stderr and "Traceback" not in res.stderr
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("prestaged: error:")]
    assert "campaign leaky, stage reco" in line and "authz=***" in line and str(ds) in line
    assert read_records(tmp_path) == []
    shown = _prestaged(pki, proxy, tmp_path, "campaign", "show", "leaky")
    assert shown.returncode == 4 and "has no submissions" in shown.stderr
    if _state(tmp_path)["url"] is None:
        for f in tmp_path.glob("state.db*"):
            assert b"C4naryT0k" not in f.read_bytes(), f.name


def test_a_missing_stage_input_is_an_error_line_and_retry_gets_past_it(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path
) -> None:
    """A stage whose input list does not exist fails its submission with a WARNING line that
    names the input and the way out, shown under -q too (it was only in the state); once the
    list exists, ``campaign retry`` and a run submit it."""
    later = tmp_path / "later.txt"
    campaign = _reco_campaign(tmp_path, "fix", later, _submit(tmp_path, "{submission}"))
    res = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(campaign), "-q")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    (line,) = [ln for ln in res.stderr.splitlines() if "WARNING" in ln and "#1" in ln]
    assert f"fix/reco #1 all: prestaging -> failed: input: definition '{later}': no such " \
        "file" in line
    assert "prestaged campaign retry --submission 1" in line
    write_definition(tmp_path, storage, ["/pnfs/camp/x"]).rename(later)
    res = _prestaged(pki, proxy, tmp_path, "campaign", "retry", "fix", "--submission", "1")
    assert res.returncode == 0, res.stderr
    res = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(campaign))
    assert res.returncode == 0, res.stderr
    assert len(read_records(tmp_path)) == 1


def test_after_orders_stages_on_complete(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path
) -> None:
    """A stage with after starts only once the upstream complete command exited 0 (polled twice)."""
    ds = write_definition(tmp_path, storage, ["/pnfs/camp/a", "/pnfs/camp/b"])
    complete = json.dumps(_q(sys.executable, tmp_path / "fake_complete.py") + " {job_id}")
    campaign = _write(tmp_path, f"""
name = "chain"
[defaults]
complete_poll = "0.05s"
[[stage]]
name = "second"
after = ["first"]
input = {json.dumps(str(ds))}
submit = {_submit(tmp_path, "{stage}")}
[[stage]]
name = "first"
input = {json.dumps(str(ds))}
submit = {_submit(tmp_path, "{stage}")}
complete = {complete}
""")
    res = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(campaign))
    assert res.returncode == 0, res.stderr
    records = read_records(tmp_path)
    assert [r["argv"] for r in records] == [["first"], ["second"]]
    [done] = [json.loads(ln) for ln in (tmp_path / "done.jsonl").read_text().splitlines()]
    assert done["job_id"] == "first.0@test"
    assert (tmp_path / "first.0@test.polls").read_text() == "2"
    assert records[1]["start"] > done["done"]
    subs = _show(pki, proxy, tmp_path, "chain")
    assert [(s["stage"], s["state"]) for s in subs] == [("first", "completed"),
                                                        ("second", "completed")]
    assert "after 2 poll(s)" in subs[0]["reason"]


def test_killed_while_submitting_becomes_launch_unknown_and_is_not_rerun(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path
) -> None:
    """prestaged SIGKILLed during the submit command: next run marks launch_unknown, exit 1, no rerun."""
    campaign = _one_file_campaign(tmp_path, storage, "crash", _submit(tmp_path, "{stage}"))
    proc = _spawn(pki, proxy, tmp_path, "campaign", "run", str(campaign),
                  extra_env={"FAKE_KILL_PARENT": "1"})
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == -9, err
    [sub] = _show(pki, proxy, tmp_path, "crash")
    assert sub["state"] == "submitting"
    res = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(campaign))
    assert res.returncode == 1
    assert "crash/reco: incomplete" in res.stdout
    assert len(read_records(tmp_path)) == 1
    [sub] = _show(pki, proxy, tmp_path, "crash")
    assert sub["state"] == "launch_unknown" and "not run again" in sub["reason"]
    text = _prestaged(pki, proxy, tmp_path, "campaign", "show", "crash").stdout
    assert "launch_unknown" in text and "crash/reco:" in text


def test_a_second_runner_of_a_campaign_is_refused_while_the_first_submits(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path
) -> None:
    """``campaign run`` started again (or beside the daemon) while the first was in its submit
    command took that submission for a crash's and made it launch_unknown, and the first one's
    result could then be lost. The second is refused (exit 2, naming the first's pid); the
    first submits once and completes."""
    pid, said = _second_run_during_the_firsts_submit(pki, proxy, storage, tmp_path, "twice")
    assert f"campaign twice is being run by prestaged pid {pid} on " in said, said


def _second_run_during_the_firsts_submit(
        pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path, name: str,
        elsewhere: dict[str, str] | None = None) -> tuple[int, str]:
    """Campaign ``name`` run, and run again (with ``elsewhere`` in its environment) while the
    first's submit command runs: checked that the second is refused (exit 2) and the first
    completes with its job id; (the first's pid, what the second said)."""
    campaign = _one_file_campaign(tmp_path, storage, name, WAITING_SUBMIT)
    with _killed_at_the_end(_spawn(pki, proxy, tmp_path, "campaign", "run",
                                   str(campaign))) as first:
        _until_submitting(first, tmp_path)
        second = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(campaign),
                            extra_env=elsewhere)
        assert second.returncode == 2, second.stderr
        (tmp_path / "go").touch()
        _, err = first.communicate(timeout=TIMEOUT)
    assert first.returncode == 0, err
    [sub] = _show(pki, proxy, tmp_path, name)
    assert (sub["state"], sub["job_id"]) == ("completed", "9.0@t")
    return first.pid, second.stderr


def test_campaign_run_takes_the_lease_daemon_members_take(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path, backend: Backend
) -> None:
    """On a shared PostgreSQL state the daemons keep each campaign to one member by its lease,
    and a foreground ``campaign run`` took no part in it. It now refuses a campaign whose lease
    a live member holds (exit 2, naming it); otherwise it takes the lease itself for the run
    (a member's claim then fails, naming the run) and gives it up at the end."""
    if backend.url is None:
        pytest.skip("SQLite: the runner lock file keeps every runner apart (tested above)")
    from prestaged.campaign.repository import CampaignRepository
    from prestaged.campaign.spec import load_campaign
    from prestaged.state import cluster as shared

    path = _one_file_campaign(tmp_path, storage, "leased", WAITING_SUBMIT)
    with backend.store() as store:
        CampaignRepository(store).register(load_campaign(path), path.read_text())
        assert shared.claim_campaign(store, "leased", "host:1:m1", 600.0)[0]
    res = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(path))
    assert res.returncode == 2, res.stderr
    assert "campaign leased is being run by the daemon member host:1:m1" in res.stderr
    assert not (tmp_path / "started").exists()
    with backend.store() as store:
        shared.release_campaign(store, "leased", "host:1:m1")
    with _killed_at_the_end(_spawn(pki, proxy, tmp_path, "campaign", "run", str(path))) as run:
        _until_submitting(run, tmp_path)
        with backend.store() as store:
            ours, holder = shared.claim_campaign(store, "leased", "host:1:m1", 600.0)
        assert (ours, holder) == (False, f"campaign-run:{socket.gethostname()}:{run.pid}")
        (tmp_path / "go").touch()
        _, err = run.communicate(timeout=TIMEOUT)
    assert run.returncode == 0, err
    with backend.store() as store:
        assert shared.pokes(store)["leased"][2] is None  # given up at the end
    [sub] = _show(pki, proxy, tmp_path, "leased")
    assert (sub["state"], sub["job_id"]) == ("completed", "9.0@t")


def test_two_runs_of_an_unregistered_campaign_on_two_hosts_are_one_runner(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path, backend: Backend
) -> None:
    """A campaign no daemon registered has no lease to take, and the runner's lock file is
    one host's: on a shared PostgreSQL state a second ``campaign run`` from another host took
    the first's live launch for a crash's and told the operator to retry it. The second is
    now refused (exit 2) by a lock the database holds for the first, which submits once."""
    if backend.url is None:
        pytest.skip("SQLite: the runner lock file keeps every runner apart (tested above)")
    elsewhere = {"XDG_STATE_HOME": str(tmp_path / "other-host")}  # its own lock files
    pid, said = _second_run_during_the_firsts_submit(pki, proxy, storage, tmp_path, "tworuns",
                                                     elsewhere)
    assert (f"campaign tworuns is being run by prestaged pid {pid} on {socket.gethostname()} "
            "(`prestaged campaign run`, holding its lock on this state" in said), said
    moves = [r[0] for r in backend.query("SELECT to_state FROM submission_events ORDER BY id")]
    assert "launch_unknown" not in moves and moves.count("submitting") == 1, moves


def test_shell_metacharacters_in_names_cannot_inject(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path
) -> None:
    """Definition names with shell syntax reach the submit command verbatim, as single arguments."""
    evil = "my ds; touch pwned-a $(touch pwned-b) `touch pwned-c` | touch pwned-d.txt"
    evil2 = "x' && touch pwned-e && echo '.txt"
    write_definition(tmp_path, storage, ["/pnfs/camp/a"], name=evil)
    write_definition(tmp_path, storage, ["/pnfs/camp/b"], name=evil2)
    campaign = _write(tmp_path, f"""
name = "inject"
[[stage]]
name = "one"
input = {json.dumps(evil)}
submit = {_submit(tmp_path, "{definition} --ds={definition}")}
[[stage]]
name = "two"
split = {json.dumps(f"list({evil2})")}
input = "unused"
submit = {_submit(tmp_path, "{definition}")}
""")
    res = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(campaign))
    assert res.returncode == 0, res.stderr
    assert [r["argv"] for r in read_records(tmp_path)] == [[evil, f"--ds={evil}"], [evil2]]
    assert not list(tmp_path.glob("pwned*"))


def test_gate_timeout_fails_the_submission_naming_the_cold_file(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path
) -> None:
    """A slice that never gets warm fails at prestage_timeout naming its cold file; nothing runs."""
    paths = ["/pnfs/camp/a", "/pnfs/camp/gone"]
    storage.remove(paths[1])
    ds = write_definition(tmp_path, storage, paths)
    campaign = _write(tmp_path, f"""
name = "cold"
[defaults]
prestage_timeout = "1s"
prestage_retry = "0.2s"
[[stage]]
name = "reco"
input = {json.dumps(str(ds))}
submit = {_submit(tmp_path, "{stage}")}
""")
    res = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(campaign))
    assert res.returncode == 1
    assert read_records(tmp_path) == []
    [sub] = _show(pki, proxy, tmp_path, "cold")
    assert sub["state"] == "failed" and storage.url(paths[1]) in sub["reason"]
    assert "not ready within 1s" in sub["reason"]


@pytest.mark.parametrize(("body", "expected"), [
    ('name = "c"\nbogus = 1\n[[stage]]\nname = "a"\ninput = "d"\nsubmit = "x"\n',
     "unknown key bogus"),
    ('name = "c"\n[[stage]]\nname = "a"\ninput = "d"\nsubmit = "x"\nsplit = "drainingn(0)"\n',
     "stage[0].split: expected"),
    ('name = "c"\n[[stage]]\nname = "a"\ninput = "d"\nsubmit = "x"\nafter = ["zz"]\n',
     'stage[0].after: expected names of stages of this campaign (a), got "zz"'),
    ('name = "c"\n[[stage]]\nname = "a"\ninput = "d"\nsubmit = "x"\nafter = ["b"]\n'
     '[[stage]]\nname = "b"\ninput = "d"\nsubmit = "x"\nafter = ["a"]\n',
     "dependency cycle"),
    ('name = "c"\n[[stage]]\nname = "a"\ninput = "d"\nsubmit = "x {dataset}"\n',
     "stage[0].submit: expected a command whose placeholders are among {campaign} {stage} {submission} {definition} {files_file} {urls_file} {n_files} (write {{ for a literal {), got {dataset}"),
])
def test_bad_campaign_file_exit_2_one_line(pki: TestPKI, proxy: Path, tmp_path: Path,
                                           body: str, expected: str) -> None:
    """Invalid campaign files: exit 2, one error line naming the file and the key."""
    path = _write(tmp_path, body)
    res = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(path))
    assert res.returncode == 2
    [line] = res.stderr.splitlines()
    assert line.startswith(f"prestaged: error: campaign {path}: ") and expected in line


def test_split_and_render_units(tmp_path: Path) -> None:
    """Split syntax parses as documented; render splits the template before substituting."""
    assert parse_split("drainingn(50)").n == 50
    assert parse_split("list(a, b,c)").items == ("a", "b", "c")
    for bad in ("drainingn(x)", "list()", "list(a,,b)", "nfiles(3)"):
        with pytest.raises(ValueError):
            parse_split(bad)
    assert render("run -d {definition} 'x {stage}'", {"definition": "a b;{c}", "stage": "s"}) \
        == ["run", "-d", "a b;{c}", "x s"]
    with pytest.raises(ConfigError, match="no such file"):
        load_campaign(tmp_path / "missing.toml")


def test_interrupted_gate_resumes_on_the_next_run(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path
) -> None:
    """Ctrl-C during the gate: exit 130, still prestaging, nothing run; the next run submits it."""
    storage.inject("/pnfs/camp/slow", [Delay(30)])
    ds = write_definition(tmp_path, storage, ["/pnfs/camp/slow"])
    campaign = _write(tmp_path, f"""
name = "intr"
[[stage]]
name = "reco"
input = {json.dumps(str(ds))}
submit = {_submit(tmp_path, "{stage}")}
""")
    proc = _spawn(pki, proxy, tmp_path, "campaign", "run", str(campaign))
    try:
        storage.wait_until(lambda s: s.active_requests >= 1, timeout=TIMEOUT)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and read_records(tmp_path) == []
    [sub] = _show(pki, proxy, tmp_path, "intr")
    assert sub["state"] == "prestaging"
    storage.clear_faults()
    res = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(campaign))
    assert res.returncode == 0, res.stderr
    assert len(read_records(tmp_path)) == 1
    [sub] = _show(pki, proxy, tmp_path, "intr")
    assert [e["to"] for e in sub["events"]] == [
        "queued", "prestaging", "ready", "submitting", "submitted", "completed"]


# Exits 0 (recording the time) only on its 3rd call, 1 before.
FAKE_COMPLETE_THIRD = """\
import json, os, sys, time
polls = os.path.join(os.environ["COMPLETE_DIR"], "third.polls")
n = int(open(polls).read()) + 1 if os.path.exists(polls) else 1
open(polls, "w").write(str(n))
if n < 3:
    sys.exit(1)
with open(os.path.join(os.environ["COMPLETE_DIR"], "done.jsonl"), "a") as f:
    f.write(json.dumps({"job_id": sys.argv[1], "done": time.monotonic()}) + "\\n")
"""


def _simple(tmp_path: Path, storage: ThreadedStorageServer, name: str,
            paths: tuple[str, ...] = ("/pnfs/camp/a",), extra: str = "",
            split: str = "all") -> Path:
    """A one-stage campaign ``name`` (stage ``reco``, split ``split``) over ``paths``."""
    ds = write_definition(tmp_path, storage, list(paths))
    return _write(tmp_path, f"""
name = "{name}"
[defaults]
{extra}
[[stage]]
name = "reco"
input = {json.dumps(str(ds))}
split = {json.dumps(split)}
submit = {_submit(tmp_path, "{stage}")}
""")


def _launch_unknown(tmp_path: Path, campaign: str, definition: str) -> int:
    """A submission of ``campaign``/reco (item all) left in launch_unknown, made in-process."""
    from prestaged.campaign.repository import CampaignRepository, SubmissionState

    with _store(tmp_path) as store:
        state = CampaignRepository(store)
        sub = state.create(campaign, "reco", "all", definition)
        for to in ("prestaging", "ready", "submitting", "launch_unknown"):
            sub = state.move(sub, SubmissionState(to), "test")
        return sub.id


def test_hold_then_release_launches(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path
) -> None:
    """A held campaign runs nothing (exit 75, says held); release, run: one slice chosen then."""
    campaign = _simple(tmp_path, storage, "held", split="drainingn(5)")
    assert _prestaged(pki, proxy, tmp_path, "campaign", "hold", "held").returncode == 0
    res = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(campaign))
    assert res.returncode == 75, res.stderr
    assert "held/reco: held" in res.stdout and "is held" in res.stderr
    assert read_records(tmp_path) == [] and storage.stats.path("/pnfs/camp/a").times == []
    write_definition(tmp_path, storage, ["/pnfs/camp/a", "/pnfs/camp/b"])  # grows while held
    res = _prestaged(pki, proxy, tmp_path, "campaign", "release", "held")
    assert res.returncode == 0 and "held: released" in res.stdout
    res = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(campaign))
    assert res.returncode == 0, res.stderr
    [record] = read_records(tmp_path)
    assert record["argv"] == ["reco"]
    [sub] = _show(pki, proxy, tmp_path, "held")
    assert (sub["item"], sub["n_files"], sub["state"]) == ("slice-1", 2, "completed")
    assert [storage.stats.path(p).times != [] for p in ("/pnfs/camp/a", "/pnfs/camp/b")] \
        == [True, True]


def test_stage_hold_blocks_downstream_and_cancel_stops_work(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path
) -> None:
    """A held stage blocks its downstream (75); cancelling it cancels its queued work for good."""
    campaign = _simple(tmp_path, storage, "cx")
    text = campaign.read_text() + f"""
[[stage]]
name = "next"
after = ["reco"]
input = "unused"
split = "list(x)"
submit = {_submit(tmp_path, "{stage}")}
"""
    campaign.write_text(text)
    assert _prestaged(pki, proxy, tmp_path, "campaign", "hold", "cx",
                      "--stage", "reco").returncode == 0
    res = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(campaign))
    assert res.returncode == 75 and "cx/reco: held" in res.stdout
    assert "cx/next: blocked" in res.stdout and read_records(tmp_path) == []
    from prestaged.campaign.repository import CampaignRepository

    with _store(tmp_path) as store:  # a queued submission, as a hold may leave one
        CampaignRepository(store).create("cx", "reco", "all", "unused")
    res = _prestaged(pki, proxy, tmp_path, "campaign", "cancel", "cx", "--stage", "reco")
    assert res.returncode == 0 and "#1 all cancelled" in res.stdout
    res = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(campaign))
    assert res.returncode == 1 and "cx/reco: cancelled" in res.stdout
    assert "cx/next: blocked" in res.stdout and read_records(tmp_path) == []
    [sub] = _show(pki, proxy, tmp_path, "cx")
    assert sub["state"] == "cancelled" and sub["reason"] == "cancelled by operator"
    assert _prestaged(pki, proxy, tmp_path, "campaign", "release", "cx").returncode == 0
    res = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(campaign))
    assert res.returncode == 1 and read_records(tmp_path) == []


def test_release_retries_launch_unknown_once(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path
) -> None:
    """release retries a launch_unknown submission as a new one (reasons stored); submitted once."""
    campaign = _simple(tmp_path, storage, "retry")
    sub_id = _launch_unknown(tmp_path, "retry", str(tmp_path / "ds.txt"))
    res = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(campaign))
    assert res.returncode == 1 and read_records(tmp_path) == []
    res = _prestaged(pki, proxy, tmp_path, "campaign", "release", "retry")
    assert res.returncode == 0 and f"retry of #{sub_id}, released by operator: #" in res.stdout
    for _ in range(2):
        res = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(campaign))
        assert res.returncode == 0, res.stderr
    assert [r["argv"] for r in read_records(tmp_path)] == [["reco"]]
    old, new = _show(pki, proxy, tmp_path, "retry")
    assert (old["id"], old["state"]) == (sub_id, "cancelled")
    assert old["reason"].startswith(f"superseded by #{new['id']}")
    assert new["state"] == "completed" and new["reason"] != ""
    assert new["events"][0]["to"] == "queued"
    assert f"retry of #{sub_id}" in new["events"][0]["reason"]


def test_mark_submitted_records_the_job_id(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path
) -> None:
    """mark-submitted moves launch_unknown to submitted with the job id; other states refused."""
    campaign = _simple(tmp_path, storage, "mark")
    sub_id = _launch_unknown(tmp_path, "mark", str(tmp_path / "ds.txt"))
    res = _prestaged(pki, proxy, tmp_path, "campaign", "mark-submitted", "mark",
                     "--submission", str(sub_id), "--job-id", "42.0@jobsub")
    assert res.returncode == 0, res.stderr
    [sub] = _show(pki, proxy, tmp_path, "mark")
    assert (sub["state"], sub["job_id"]) == ("submitted", "42.0@jobsub")
    assert "marked submitted by operator" in sub["reason"]
    res = _prestaged(pki, proxy, tmp_path, "campaign", "mark-submitted", "mark",
                     "--submission", str(sub_id), "--job-id", "43")
    assert res.returncode == 2 and "not launch_unknown" in res.stderr
    res = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(campaign))
    assert res.returncode == 0 and read_records(tmp_path) == []


def test_keep_warm_retouches_until_complete_then_stops(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path
) -> None:
    """While complete fails the slice is touched again every keep_warm; none after it succeeds."""
    (tmp_path / "fake_complete3.py").write_text(FAKE_COMPLETE_THIRD)
    paths = ("/pnfs/camp/k1", "/pnfs/camp/k2")
    complete = json.dumps(_q(sys.executable, tmp_path / "fake_complete3.py") + " {job_id}")
    campaign = _simple(tmp_path, storage, "warm", paths,
                       'keep_warm = "0.2s"\ncomplete_poll = "0.5s"')
    campaign.write_text(campaign.read_text() + f"complete = {complete}\n")
    res = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(campaign))
    assert res.returncode == 0, res.stderr
    [done] = [json.loads(ln) for ln in (tmp_path / "done.jsonl").read_text().splitlines()]
    [start] = [r["start"] for r in read_records(tmp_path)]
    for p in paths:
        times = storage.stats.path(p).times
        assert times[0] < start  # the gate
        assert len([t for t in times if start < t < done["done"]]) >= 3  # keep-warm
        assert max(times) < done["done"]  # none after complete succeeded
    assert (tmp_path / "third.polls").read_text() == "3"


def test_a_keep_warm_stopped_by_an_expired_proxy_stops_the_run_with_exit_3(
    pki: TestPKI, storage: ThreadedStorageServer, tmp_path: Path
) -> None:
    """Keep-warm runs that an expired proxy stopped were dropped in silence: nothing touched
    the slice while its job ran, and the campaign went on to exit 0 (or 1 at complete_timeout).
    Such a run now stops ``campaign run`` with exit 3 naming the proxy."""
    short = pki.make_proxy(tmp_path / "x509up_short", lifetime=timedelta(seconds=5))
    never = tmp_path / "never_complete.py"
    never.write_text("import sys\nsys.exit(1)\n")
    campaign = _simple(tmp_path, storage, "expiring", ("/pnfs/camp/e1",),
                       'keep_warm = "0.2s"\ncomplete_poll = "0.5s"\ncomplete_timeout = "40s"')
    complete = json.dumps(_q(sys.executable, never) + " {job_id}")
    campaign.write_text(campaign.read_text() + f"complete = {complete}\n")
    res = _prestaged(pki, short, tmp_path, "campaign", "run", str(campaign),
                     "--min-lifetime", "0")
    assert res.returncode == 3, res.stderr
    assert f"proxy {short}: expired at" in res.stderr, res.stderr
    assert len(storage.stats.path("/pnfs/camp/e1").times) >= 2  # the gate, then keep-warm


def test_retry_recovers_a_failed_drainingn_slice(
    pki: TestPKI, proxy: Path, storage: ThreadedStorageServer, tmp_path: Path
) -> None:
    """A drainingn slice whose gate timed out keeps its files; `campaign retry` gives exactly
    those files to a new submission, which is submitted once they are warm."""
    paths = ["/pnfs/rec/f0", "/pnfs/rec/f1", "/pnfs/rec/f2"]
    storage.remove(paths[0])  # not on disk yet: slice 1's gate times out
    ds = write_definition(tmp_path, storage, paths)
    campaign = _write(tmp_path, f"""
name = "recover"
[defaults]
prestage_timeout = "1s"
prestage_retry = "0.2s"
[[stage]]
name = "reco"
input = {json.dumps(str(ds))}
split = "drainingn(2)"
submit = {_submit(tmp_path, "{submission} {urls_file}")}
""")
    res = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(campaign))
    assert res.returncode == 1 and "recover/reco: incomplete" in res.stdout
    assert [r["urls"] for r in read_records(tmp_path)] == [[storage.url(paths[2])]]
    failed, _ = _show(pki, proxy, tmp_path, "recover")
    assert failed["state"] == "failed" and storage.url(paths[0]) in failed["reason"]
    wrong = _prestaged(pki, proxy, tmp_path, "campaign", "retry", "recover", "--submission", "2")
    assert wrong.returncode == 2 and "is completed" in wrong.stderr

    storage.set_size(paths[0], 1000)
    res = _prestaged(pki, proxy, tmp_path, "campaign", "retry", "recover", "--submission",
                     str(failed["id"]))
    assert res.returncode == 0 and f"retry of #{failed['id']}, retried by operator" in res.stdout
    res = _prestaged(pki, proxy, tmp_path, "campaign", "run", str(campaign))
    assert res.returncode == 0, res.stderr
    records = read_records(tmp_path)
    assert [sorted(r["urls"]) for r in records] == [
        [storage.url(paths[2])], sorted(storage.url(p) for p in paths[:2])]
    old, _, new = _show(pki, proxy, tmp_path, "recover")
    assert (old["state"], old["superseded_by"]) == ("failed", new["id"])
    assert (new["item"], new["state"]) == ("slice-1 (retry 1)", "completed")
    again = _prestaged(pki, proxy, tmp_path, "campaign", "retry", "recover", "--submission",
                       str(failed["id"]))
    assert again.returncode == 2 and "already retried" in again.stderr


def test_a_campaign_runs_lock_lost_with_its_connection_is_taken_again_or_the_run_stops(
        make_pg_url: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The advisory lock of a `campaign run` lives on one connection, which a PostgreSQL
    restart or failover drops, and the run never noticed: a second `campaign run` started
    beside it. The run's check now takes the lock again on a new connection, or, when another
    run has it meanwhile, says so and stops."""
    from prestaged.cli.campaign import _RunLock
    from prestaged.state.postgres import connect
    from prestaged.state.store import Store

    def drop_the_locks_connection(admin: Any) -> None:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE application_name LIKE 'prestaged-campaign-run/%'")

    url = make_pg_url()
    key = "prestaged campaign run c"
    with Store(tmp_path / "anchor", url=url) as store, connect(url) as admin:
        lock = _RunLock(store, "c")
        try:
            drop_the_locks_connection(admin)
            assert lock.still_ours()  # taken again, on a new connection
            assert "went with its connection to the state; taken again" in caplog.text
            held = admin.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                 "AND granted").fetchone()
            assert held == (1,)
            drop_the_locks_connection(admin)
            deadline = time.monotonic() + 30
            while not admin.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                                    (key,)).fetchone()[0]:  # another run takes it first
                assert time.monotonic() < deadline
                time.sleep(0.02)  # until the server has ended the dropped connection
            assert not lock.still_ours()
            assert "being run by another prestaged" in caplog.text and "this run stops" in \
                caplog.text
        finally:
            lock.close()
