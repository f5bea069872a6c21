"""Bad campaign input is one line naming what is wrong and where, with its own exit code (or
HTTP status), no traceback, and the recorded state untouched: templates that ``str.format``
would evaluate beyond a plain name (``{campaign[x]}``, ``{campaign.__class__}``, format
specs), campaign and stage names no campaign file can have, and stages a known campaign lacks;
through the CLI on a state database and through the daemon's API."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cli_runner import entry_point, run_cli, subprocess_env
from conftest import Backend
from daemon_harness import DEADLINE, free_port, in_process, until, write_config

from prestaged.campaign.actions import apply_action
from prestaged.campaign.repository import CampaignRepository, SubmissionState
from prestaged.campaign.runner import run_campaign
from prestaged.campaign.spec import parse_campaign
from prestaged.catalog import Catalog
from prestaged.catalog.local import LocalCatalog
from prestaged.errors import ConfigError
from prestaged.gate import GateResult
from prestaged.testing.pki import TestPKI

S = SubmissionState

TOKEN = "bad-input-t0ken"

EXPECTED_INPUT = ("expected a definition name whose placeholders are among {campaign} {stage} "
                  "(write {{ for a literal {)")
ACCESS = "a placeholder is a plain name: no attribute or index access"
SPEC = "a placeholder takes no format spec"

# (field, template, the error after "campaign <path>: stage[0].<field>: expected ...").
BAD_TEMPLATES = [
    ("input", "{campaign[x]}", f'got "{{campaign[x]}}" ({{campaign[x]}}: {ACCESS})'),
    ("input", "ds-{campaign.__class__}",
     f'got "ds-{{campaign.__class__}}" ({{campaign.__class__}}: {ACCESS})'),
    ("input", "{stage[0]}", f'got "{{stage[0]}}" ({{stage[0]}}: {ACCESS})'),
    ("input", "{stage:>1000000000}", f'got "{{stage:>1000000000}}" ({{stage:>1000000000}}: '
                                     f"{SPEC})"),
    ("input", "{campaign!}", 'got "{campaign!}" (unmatched \'{\' in format spec)'),
    ("input", "{campaign[}", 'got "{campaign[}" (expected \'}\' before end of string)'),
    ("submit", "true {campaign.__init__.__globals__}",
     f"got {{campaign.__init__.__globals__}} ({ACCESS})"),
    ("submit", "true {definition[0]}", f"got {{definition[0]}} ({ACCESS})"),
    ("submit", "true {n_files:>1000000000}", f"got {{n_files:>1000000000}} ({SPEC})"),
    ("submit", "true {job_id}", "got {job_id}"),
    ("complete", "true {job_id.real}", f"got {{job_id.real}} ({ACCESS})"),
    ("complete", "true {urls_file:{stage}}", f"got {{urls_file:{{stage}}}} ({SPEC})"),
]

NEED_A_PLAIN_NAME = "expected a plain name (letters, digits, _.-; at most 100 characters), got "


def _campaign(tmp_path: Path, field: str, template: str) -> Path:
    """Campaign ``c`` with one stage ``s1`` whose ``field`` is ``template``."""
    stage = {"name": "s1", "input": "d", "submit": "true", field: template}
    path = tmp_path / "c.toml"
    path.write_text('name = "c"\n[[stage]]\n'
                    + "".join(f"{k} = {json.dumps(v)}\n" for k, v in stage.items()))
    return path


def _recorded(backend: Backend) -> list[list[tuple[Any, ...]]]:
    """Every campaign row of ``backend``'s state, as another process reads it."""
    return [backend.query("SELECT campaign, stage, held, cancelled, updated, reason FROM "
                          "campaign_controls ORDER BY campaign, stage"),
            backend.query("SELECT id, campaign, stage, item, state, updated FROM "
                          "campaign_submissions ORDER BY id"),
            backend.query("SELECT name, body, updated FROM campaigns ORDER BY name")]


def _one_line(stderr: str) -> str:
    """The single line of ``stderr`` (no traceback), without the ``prestaged: error:`` prefix."""
    assert "Traceback" not in stderr, stderr
    [line] = stderr.splitlines()
    assert line.startswith("prestaged: error: "), line
    return line[len("prestaged: error: "):]


@pytest.fixture
def recorded(backend: Backend) -> Backend:
    """``backend`` holding campaign ``c`` as a foreground run leaves it: a submission of its
    only stage ``s1`` (never registered with a daemon), and campaign ``other`` held."""
    with backend.store() as store:
        repo = CampaignRepository(store)
        repo.create("c", "s1", "all", "d")
        repo.hold("other")
    return backend


@pytest.mark.parametrize("command", ["run", "show", "add"])
@pytest.mark.parametrize(("field", "template", "rest"), BAD_TEMPLATES,
                         ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD_TEMPLATES)])
def test_bad_template_is_exit_2_naming_file_stage_and_field(
        tmp_path: Path, recorded: Backend, command: str, field: str, template: str,
        rest: str) -> None:
    """A placeholder beyond a plain name, in any templated field: exit 2, one line naming
    the file, ``stage[0]`` and the field; nothing recorded changes."""
    path = _campaign(tmp_path, field, template)
    before = _recorded(recorded)
    state = recorded.cli()[:2] if command == "add" else recorded.cli()  # add: no --state
    res = run_cli("campaign", command, str(path), *state)
    assert res.returncode == 2, res.stderr
    expected = EXPECTED_INPUT if field == "input" else "expected a command whose placeholders"
    line = _one_line(res.stderr)
    assert line.startswith(f"campaign {path}: stage[0].{field}: {expected}"), line
    assert line.endswith(rest), line
    assert _recorded(recorded) == before


def test_reported_template_through_the_real_entry_point(tmp_path: Path) -> None:
    """The reported file, ``campaign run`` as a process: exit 2 and one line, not a
    ``TypeError`` traceback with exit 1; no state database is made."""
    path = _campaign(tmp_path, "input", "{campaign[x]}")
    state = tmp_path / "state.db"
    res = subprocess.run(entry_point("campaign", "run", str(path), "--state", str(state)),
                         capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path,
                         timeout=DEADLINE, check=False)
    assert res.returncode == 2, res.stderr
    assert _one_line(res.stderr) == (f"campaign {path}: stage[0].input: {EXPECTED_INPUT}, "
                                     f'got "{{campaign[x]}}" ({{campaign[x]}}: {ACCESS})')
    assert not state.exists()


@pytest.mark.parametrize("command", [["campaign", "run", "--state"], ["campaign", "add"]])
def test_a_campaign_file_that_is_a_device_a_pipe_or_not_utf8_is_one_line_exit_2(
        tmp_path: Path, command: list[str]) -> None:
    """``campaign run /dev/zero`` read until memory ran out and a named pipe waited forever for
    a writer: now /dev/zero is "larger than 128 KiB" (a campaign must fit the daemon's API), a
    pipe without a writer reads as empty (then "name" is missing), bytes that are not UTF-8
    name the byte; each exit 2 before any daemon or state is contacted."""
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'name = "caf\xe9"\n')
    state = tmp_path / "state.db"
    expected = {
        "/dev/zero": "campaign /dev/zero: larger than 128 KiB, not a prestaged campaign",
        str(fifo): f"campaign {fifo}: name:",
        str(latin): f"campaign {latin}: not UTF-8 text (byte 0xe9 at offset 11)",
    }
    for path, line in expected.items():
        argv = [*command[:2], path] + (["--state", str(state)] if "--state" in command else [])
        res = subprocess.run(entry_point(*argv),
                             capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path,
                             timeout=DEADLINE, check=False)
        assert res.returncode == 2, res.stderr
        assert _one_line(res.stderr).startswith(line), res.stderr
    assert not state.exists()


def test_error_of_a_multiline_placeholder_stays_one_line(tmp_path: Path) -> None:
    """A placeholder holding a newline (TOML allows one) is quoted escaped: still one line."""
    with pytest.raises(ConfigError) as err:
        parse_campaign('name = "c"\n[[stage]]\nname = "s1"\ninput = "d"\n'
                       'submit = "true \'{stage\\n.x}\'"\n', tmp_path / "c.toml")
    assert "\n" not in str(err.value)
    assert str(err.value).endswith(f"got {{stage\\n.x}} ({ACCESS})")


def test_a_long_chain_or_many_diamonds_of_stages_load_at_once(tmp_path: Path) -> None:
    """The dependency check is linear and not recursive: a chain of 3000 stages (deeper than
    Python's stack) and 30 layers of diamonds (2**30 paths) load, in order, at once."""
    chain = ['name = "c"', *(f'[[stage]]\nname = "s{i}"\ninput = "d"\nsubmit = "x"\n'
                              + (f'after = ["s{i - 1}"]\n' if i else "")
                              for i in reversed(range(3000)))]  # the last stage first
    cfg = parse_campaign("\n".join(chain), tmp_path / "c.toml")
    assert [s.name for s in cfg.ordered()] == [f"s{i}" for i in range(3000)]
    cycle = [*chain, '[[stage]]\nname = "loop"\ninput = "d"\nsubmit = "x"\nafter = ["loop"]\n']
    with pytest.raises(ConfigError, match=r"stage\[3000\]\.after: .* loop runs after loop$"):
        parse_campaign("\n".join(cycle), tmp_path / "c.toml")
    diamonds = ['name = "c"']
    for i in range(30):
        for j in (0, 1):
            after = f'after = ["s{i - 1}_0", "s{i - 1}_1"]\n' if i else ""
            diamonds.append(f'[[stage]]\nname = "s{i}_{j}"\ninput = "d"\nsubmit = "x"\n{after}')
    cfg = parse_campaign("\n".join(diamonds), tmp_path / "c.toml")
    assert [s.name for s in cfg.ordered()][-2:] == ["s29_0", "s29_1"]


# --- campaign and stage names of operator actions ---------------------------------------------

ACTION_ARGS = {"hold": [], "release": [], "cancel": [], "retry": ["--submission", "1"],
               "mark-submitted": ["--submission", "1", "--job-id", "1.0@j"]}


# Every refused name with hold (the report's), every other action with one of them.
BAD_NAMES = [*(("hold", n) for n in ("a b", "../x", "x/y", "", ".x", "c\nd")),
             ("release", "a b"), ("cancel", "x/y"), ("retry", "../x"), ("mark-submitted", "")]


@pytest.mark.parametrize(("action", "name"), BAD_NAMES,
                         ids=[f"{a}-{i}" for i, (a, _) in enumerate(BAD_NAMES)])
def test_action_on_a_name_no_campaign_can_have_is_exit_2(
        recorded: Backend, action: str, name: str) -> None:
    """Every action on a name a campaign file refuses: exit 2, one line quoting it; nothing
    is stored, so ``campaign list`` shows only what was there."""
    before = _recorded(recorded)
    res = run_cli("campaign", action, name, *ACTION_ARGS[action], *recorded.cli())
    assert res.returncode == 2, res.stderr
    assert _one_line(res.stderr) == f"campaign name: {NEED_A_PLAIN_NAME}{json.dumps(name)}"
    assert _recorded(recorded) == before
    listing = run_cli("campaign", "list", "--json", *recorded.cli())
    assert [r["campaign"] for r in json.loads(listing.stdout)["campaigns"]] == ["c", "other"]


@pytest.mark.parametrize("action", ["hold", "release", "cancel"])
@pytest.mark.parametrize("stage", ["a b", "", "../s1"])
def test_action_on_a_stage_name_no_campaign_can_have_is_exit_2(
        recorded: Backend, action: str, stage: str) -> None:
    """``--stage`` follows the rule of a stage's name, even for a campaign not known yet
    (``--stage ''`` does not mean the whole campaign)."""
    before = _recorded(recorded)
    for name in ("c", "new"):
        res = run_cli("campaign", action, name, "--stage", stage, *recorded.cli())
        assert res.returncode == 2, res.stderr
        assert _one_line(res.stderr) == f"stage name: {NEED_A_PLAIN_NAME}{json.dumps(stage)}"
    assert _recorded(recorded) == before


@pytest.mark.parametrize("action", ["hold", "release", "cancel"])
def test_stage_a_recorded_campaign_lacks_is_refused_naming_its_stages(
        recorded: Backend, action: str) -> None:
    """``--stage nope`` on campaign ``c`` whose only stage is ``s1``: not ``c/nope: held``
    with exit 0 but exit 4 (not found) naming ``s1``; nothing stored."""
    before = _recorded(recorded)
    res = run_cli("campaign", action, "c", "--stage", "nope", *recorded.cli())
    assert res.returncode == 4, res.stderr
    assert _one_line(res.stderr) == "campaign 'c' has no stage 'nope'; its stages are s1"
    assert _recorded(recorded) == before


def test_hold_ahead_of_a_first_run_is_still_taken(recorded: Backend) -> None:
    """The documented hold before a campaign ever ran (any plain stage name) still works."""
    res = run_cli("campaign", "hold", "later", "--stage", "reco", *recorded.cli())
    assert res.returncode == 0, res.stderr
    assert res.stdout == "later/reco: held (no campaign 'later' is known yet: it will start so)\n"


async def _passing_gate(catalog: Catalog, ready: float, timeout: float,
                        retry: float) -> GateResult:
    """A gate that finds every file warm at once (no storage in these tests)."""
    return GateResult(catalog.name, catalog.definition, ready, 1, 1, 1, 0.0, 0, "ready")


async def test_a_run_records_its_stages_for_actions(tmp_path: Path, backend: Backend) -> None:
    """After a foreground run that stopped at a held first stage, a downstream stage that has
    no submission yet can be held, and a typo is refused naming both stages."""
    cfg = parse_campaign('name = "c"\n[[stage]]\nname = "s1"\ninput = "d"\nsubmit = "true"\n'
                         '[[stage]]\nname = "s2"\nafter = ["s1"]\ninput = "d"\nsubmit = "true"\n',
                         tmp_path / "c.toml")
    with backend.store() as store:
        repo = CampaignRepository(store)
        apply_action(repo, "c", "hold", stage="s1", ahead=True)
        result = await run_campaign(cfg, store, gate=_passing_gate, open_catalog=LocalCatalog,
                                    workdir=tmp_path / "work")
        assert result.stages == {"s1": "held", "s2": "blocked"}
        assert apply_action(repo, "c", "hold", stage="s2", ahead=True) == "c/s2: held"
        assert repo.controls("c") == {"s1": "held", "s2": "held"}
        assert repo.stage_names("c") == ["s1", "s2"]
    res = run_cli("campaign", "cancel", "c", "--stage", "s3", *backend.cli())
    assert res.returncode == 4
    assert _one_line(res.stderr) == "campaign 'c' has no stage 's3'; its stages are s1, s2"


# --- the daemon's API -------------------------------------------------------------------------


async def test_daemon_answers_400_for_a_bad_template_and_bad_names(
        tmp_path: Path, pki: TestPKI, proxy: Path, backend: Backend) -> None:
    """``POST /api/v1/campaigns`` with a bad template: 400 naming the source, stage and field,
    not a 500, and nothing stored; an action on a bad campaign or stage name is a 400, on a
    stage the campaign lacks a 404 naming its stages; the campaign stays as it was."""
    sections = {} if backend.url is None else {
        "state_url": backend.url, "sections": '[cluster]\nlease = "3s"\nheartbeat = "1s"\n'}
    token = tmp_path / "api-token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    config = write_config(tmp_path, pki, proxy, free_port(), [],
                          extra=f'campaign_check = "1h"\ntoken_file = "{token}"', **sections)
    bad = _campaign(tmp_path, "input", "{campaign[x]}").read_text()
    good = bad.replace("{campaign[x]}", "d")
    async with in_process(config, token=TOKEN) as d:
        status, body = await d.http("POST", "/api/v1/campaigns",
                                    {"toml": bad, "source": "/x/c.toml"})
        assert status == 400, body
        assert body["error"] == (f"campaign /x/c.toml: stage[0].input: {EXPECTED_INPUT}, "
                                 f'got "{{campaign[x]}}" ({{campaign[x]}}: {ACCESS})')
        assert (await d.http("GET", "/api/v1/campaigns"))[1] == {"campaigns": []}

        status, body = await d.http("POST", "/api/v1/campaigns",
                                    {"toml": good, "source": "/x/c.toml", "held": True})
        assert status == 201, body

        async def held_pass() -> bool:
            status, doc = await d.http("GET", "/api/v1/campaigns/c")
            return bool(status == 200 and doc["daemon"]["status"] == "waiting")
        await until("the held pass", held_pass)  # its writes are done
        before = _recorded(backend)
        for path, payload, expected in [
            ("a%20b/hold", {}, (400, f'campaign name: {NEED_A_PLAIN_NAME}"a b"')),
            ("-x/cancel", {}, (400, f'campaign name: {NEED_A_PLAIN_NAME}"-x"')),
            ("c/hold", {"stage": ""}, (400, f'stage name: {NEED_A_PLAIN_NAME}""')),
            ("c/hold", {"stage": "nope"},
             (404, "campaign 'c' has no stage 'nope'; its stages are s1")),
        ]:
            status, body = await d.http("POST", f"/api/v1/campaigns/{path}", payload)
            assert (status, body) == (expected[0], {"error": expected[1]}), path
        assert _recorded(backend) == before


@pytest.mark.parametrize("name", ["a" * 300, "a" * 101, "x/../y"])
def test_show_of_a_name_no_campaign_can_have_is_exit_2(recorded: Backend, name: str) -> None:
    """``campaign show`` with a 300-character name: ``Path.is_file()`` raised ENAMETOOLONG, a
    traceback. It is checked like every action's name: exit 2, one line."""
    res = run_cli("campaign", "show", name, *recorded.cli())
    assert res.returncode == 2, res.stderr
    assert _one_line(res.stderr).startswith(f"campaign name: {NEED_A_PLAIN_NAME}")


@pytest.mark.parametrize("job_id", ["a\nb\x1b[31m", "1\x07.0@x", "j" * 257])
def test_mark_submitted_refuses_a_job_id_with_control_characters(
        recorded: Backend, job_id: str) -> None:
    """A job id is shown in listings and given to ``complete``: one with a line break or an
    escape sequence (or over 256 characters) is exit 2, escaped in the one line, and nothing
    is recorded."""
    with recorded.store() as store:
        repo = CampaignRepository(store)
        sub = repo.get(1)
        for to in (S.PRESTAGING, S.READY, S.SUBMITTING, S.LAUNCH_UNKNOWN):
            sub = repo.move(sub, to, "test")
    before = _recorded(recorded)
    res = run_cli("campaign", "mark-submitted", "c", "--submission", "1", "--job-id", job_id,
                  *recorded.cli())
    assert res.returncode == 2, res.stderr
    line = _one_line(res.stderr)
    assert line.startswith("mark-submitted: expected a job id of at most 256 characters "
                           "without control characters, got '"), line
    assert "\x1b" not in line and "\x07" not in line
    assert _recorded(recorded) == before
