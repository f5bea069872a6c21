"""The daemon's HTTP API in-process, against a fake ``ApiPorts``: authorisation, every 4xx, and
the JSON shape of every endpoint. No daemon, no subprocess: ``build_app(ports)`` behind
aiohttp's test server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from prestaged.errors import (
    CatalogError,
    ConfigError,
    ConflictError,
    NotFoundError,
    PrestagedError,
)
from prestaged.metrics import Metrics
from prestaged.service.api import Handler, JsonObject, build_app

TOKEN = "api-t0ken"


@dataclass
class FakeRun:
    """A run as the API sees it."""

    id: int
    state: str = "queued"

    def to_dict(self) -> dict[str, object]:
        """A run document of the daemon's shape (trimmed)."""
        return {"id": self.id, "state": self.state, "counts": {"warm": 3}}


@dataclass
class FakePorts:
    """Records what the API asks; ``fail[method]`` makes that method raise."""

    token: Optional[str] = None
    problems: list[str] = field(default_factory=list)
    runs: dict[int, FakeRun] = field(default_factory=dict)
    rows: list[dict[str, object]] = field(default_factory=list)
    campaigns: dict[str, dict[str, object]] = field(default_factory=dict)
    fail: dict[str, PrestagedError] = field(default_factory=dict)
    calls: list[tuple[str, tuple[object, ...]]] = field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)

    def _call(self, name: str, *args: object) -> None:
        self.calls.append((name, args))
        if name in self.fail:
            raise self.fail[name]

    def readiness(self) -> list[str]:
        """The configured problems."""
        return self.problems

    def submit(self, definition: str, catalog: Optional[str]) -> tuple[FakeRun, bool]:
        """A new queued run (never joined)."""
        self._call("submit", definition, catalog)
        run = FakeRun(len(self.runs) + 1)
        self.runs[run.id] = run
        return run, False

    def run(self, run_id: int) -> Optional[FakeRun]:
        """A run by id."""
        self._call("run", run_id)
        return self.runs.get(run_id)

    async def datasets(self, name: Optional[str], catalog: Optional[str], *,
                       reasons: bool) -> list[JsonObject]:
        """Rows whose definition (and catalog) match."""
        self._call("datasets", name, catalog, reasons)
        return [r for r in self.rows if name in (None, r["definition"])
                and catalog in (None, r["catalog"])]

    async def members(self) -> list[JsonObject]:
        """One member row."""
        self._call("members")
        return [{"id": "h:1:a", "alive": True}]

    async def add_campaign(self, text: str, source: str, *, held: bool) -> tuple[str, bool]:
        """Stores the campaign under its first line."""
        self._call("add_campaign", text, source, held)
        name = text.split("\n", 1)[0]
        new = name not in self.campaigns
        self.campaigns[name] = {"campaign": name, "control": "held" if held else None}
        return name, new

    async def campaign_action(self, name: str, action: str, *, stage: Optional[str],
                              submission: Optional[int], job_id: Optional[str]) -> str:
        """One line naming the action."""
        self._call("campaign_action", name, action, stage, submission, job_id)
        return f"{name}: {action} done"

    async def describe_campaign(self, name: str, *, output: bool) -> JsonObject:
        """The stored document, or NotFoundError."""
        self._call("describe_campaign", name, output)
        if name not in self.campaigns:
            raise NotFoundError(f"no campaign '{name}'")
        return {**self.campaigns[name], "submissions": []}

    async def forget_campaign(self, name: str) -> dict[str, int]:
        """Drops the stored campaign, or NotFoundError."""
        self._call("forget_campaign", name)
        if self.campaigns.pop(name, None) is None:
            raise NotFoundError(f"no campaign '{name}'")
        return {"submissions": 2}

    async def campaign_summaries(self) -> list[JsonObject]:
        """Every stored campaign."""
        self._call("campaign_summaries")
        return list(self.campaigns.values())

    def metrics_handler(self) -> Handler:
        """The real exposition of a private registry."""
        return self.metrics.aiohttp_handler()


Client = Callable[[FakePorts], Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    """Factory: an in-process test client of ``build_app(ports)``, closed after the test."""
    made: list[TestClient[web.Request, web.Application]] = []

    async def make(ports: FakePorts) -> TestClient[web.Request, web.Application]:
        c = TestClient(TestServer(build_app(ports), host="127.0.0.1"))
        await c.start_server()
        made.append(c)
        return c

    yield make
    for c in made:
        await c.close()


JSON = {"Content-Type": "application/json"}


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _answer(resp: Any) -> tuple[int, Any]:
    return resp.status, await resp.json()


# --- health, readiness, metrics ---------------------------------------------------------------

async def test_health_readiness_and_metrics(client: Client) -> None:
    """/healthz is ok; /readyz 200 when ready, 503 with the problems; /metrics serves the
    ports' registry in the Prometheus text format."""
    ports = FakePorts()
    c = await client(ports)
    assert await _answer(await c.get("/healthz")) == (200, {"status": "ok"})
    assert await _answer(await c.get("/readyz")) == (200, {"status": "ready"})
    ports.problems = ["stopping"]
    assert await _answer(await c.get("/readyz")) == (
        503, {"status": "not ready", "problems": ["stopping"]})
    resp = await c.get("/metrics")
    assert resp.status == 200 and resp.content_type == "text/plain"
    assert "prestaged_build_info" in await resp.text()


# --- warm requests and runs -------------------------------------------------------------------

async def test_warm_request_and_run_shapes(client: Client) -> None:
    """POST /api/v1/warm -> 202 {id, state, href}; the href serves the run's document."""
    ports = FakePorts()
    c = await client(ports)
    status, body = await _answer(await c.post("/api/v1/warm", json={
        "definition": "mc-2026", "catalog": "samweb"}))
    assert (status, body) == (202, {"id": 1, "state": "queued", "merged": False, "href": "/api/v1/runs/1"})
    assert ("submit", ("mc-2026", "samweb")) in ports.calls
    assert await _answer(await c.get(body["href"])) == (
        200, {"id": 1, "state": "queued", "counts": {"warm": 3}})
    await c.post("/api/v1/warm", json={"definition": "other"})
    assert ("submit", ("other", None)) in ports.calls


@pytest.mark.parametrize(("body", "message"), [
    (b"{not json", "body is not JSON"),
    (b"\xff\xfe", "body is not JSON"),
    (b"[1, 2]", "body must be a JSON object"),
    (b'{"nodefinition": 1}', "unknown key 'nodefinition' in the body: expected definition, "
                             "catalog"),
    (b'{"definition": "a", "force": true}', "unknown key 'force'"),
    (b'{"definition": "a", "catalog": ""}', "catalog: expected one of local, samweb, metacat"),
    (b'{"definition": "a", "catalog": "oracle"}', "expected one of local, samweb, metacat"),
    # The review's 500s: an integer Python will not read, a lone surrogate, a huge name.
    (b'{"definition": ' + b"1" * 5000 + b"}", "body is not JSON"),
    (b'{"definition": "\\ud800"}', "definition: expected a name of at most 1024 characters"),
    (b'{"definition": "' + b"a" * 1025 + b'"}', "at most 1024 characters"),
    (b'{"definition": "  "}', "expected {\"definition\""),
    (b'{"definition": 5}', "expected {\"definition\""),
    (b'{"definition": "a", "catalog": 5}', "catalog: expected a string, got int"),
    (b"[" * 100_000 + b"]" * 100_000, ""),
])
async def test_bad_warm_requests_are_400(client: Client, body: bytes, message: str) -> None:
    """Every malformed warm request is a 400 with a JSON error, never a 500, and never
    reaches the daemon."""
    ports = FakePorts()
    c = await client(ports)
    status, doc = await _answer(await c.post("/api/v1/warm", data=body, headers=JSON))
    assert status == 400 and message in doc["error"]
    assert not [name for name, _ in ports.calls if name == "submit"]


@pytest.mark.parametrize(("error", "status", "extra"), [
    (NotFoundError("definition 'x' not found in the local catalog"), 404, {}),
    (ConfigError("catalog 'nope' is not known"), 400, {}),
    (PrestagedError("the daemon is stopping"), 503, {"exit_code": 1}),
    (CatalogError("SAM web unreachable"), 502, {"exit_code": 4}),
])
async def test_warm_refusals_answer_with_the_errors_status(
        client: Client, error: PrestagedError, status: int, extra: dict[str, int]) -> None:
    """A refused warm answers with the error's own http_status and its one-line message; a
    failure (5xx) also with its exit code, which the CLI exits with (``error_for_exit``)."""
    c = await client(FakePorts(fail={"submit": error}))
    assert await _answer(await c.post("/api/v1/warm", json={"definition": "x"})) == (
        status, {"error": str(error), **extra})


async def test_unknown_or_malformed_run_ids(client: Client) -> None:
    """GET /api/v1/runs/<id>: 404 for an unknown run, 400 for an id that is not an integer."""
    c = await client(FakePorts())
    assert await _answer(await c.get("/api/v1/runs/999")) == (404, {"error": "no run 999"})
    ports_calls(c).clear()
    for given in ("abc", "%201%20", "%D9%A1", "1_0", "-1", "1" * 19):
        # int() read " 1 " and an Arabic-Indic one as run 1, "1_0" as run 10.
        status, body = await _answer(await c.get(f"/api/v1/runs/{given}"))
        assert status == 400 and "run id must be a whole number" in body["error"], given
    assert not [args for name, args in ports_calls(c) if name == "run"]


def ports_calls(c: Any) -> list[tuple[str, tuple[object, ...]]]:
    """What the API asked of the ports of test client ``c``."""
    from prestaged.service.api import PORTS

    calls: list[tuple[str, tuple[object, ...]]] = c.server.app[PORTS].calls
    return calls


async def test_authorization_header_forms(client: Client) -> None:
    """The scheme in any case (RFC 7235) is accepted; two Authorization headers are a 400
    (which one counts was the first one's guess); a header that is not UTF-8 is a 401 on
    every route that looks at it, not a 500 (it raised in the compare, before any check)."""
    ports = FakePorts(token=TOKEN)
    c = await client(ports)
    for scheme in ("bearer", "BEARER", "Bearer"):
        resp = await c.post("/api/v1/warm", json={"definition": "a"},
                            headers={"Authorization": f"{scheme} {TOKEN}"})
        assert resp.status == 202, scheme
    from multidict import CIMultiDict

    two = CIMultiDict([("Authorization", f"Bearer {TOKEN}"), ("Authorization", "Bearer x")])
    assert (await c.post("/api/v1/warm", json={"definition": "a"}, headers=two)).status == 400
    assert len(ports.runs) == 3
    reader, writer = await asyncio.open_connection("127.0.0.1", c.port)
    writer.write(b"GET /api/v1/runs/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe"
                 b"\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401"), answer[:80]


@pytest.mark.parametrize(("headers", "body", "message"), [
    ({"Content-Type": "application/json; charset=nope-9"}, b'{"definition": "a"}',
     "body is not JSON"),
    ({"Content-Encoding": "gzip"}, b"abcd", "body cannot be read"),
])
async def test_bodies_that_do_not_decode_are_400(client: Client, headers: dict[str, str],
                                                 body: bytes, message: str) -> None:
    """An unknown charset (LookupError) or a gzip body that is not gzip answered 500 with a
    traceback in the log."""
    ports = FakePorts()
    c = await client(ports)
    status, doc = await _answer(await c.post("/api/v1/warm", data=body,
                                             headers={**JSON, **headers}))
    assert status == 400 and message in doc["error"], doc
    assert not ports.runs


async def test_a_token_guards_warm_requests(client: Client) -> None:
    """With a token, a warm request without it or with a wrong one is 401 and not queued;
    with it, 202."""
    ports = FakePorts(token=TOKEN)
    c = await client(ports)
    for headers in ({}, _auth("wrong"), {"Authorization": TOKEN}):
        status, body = await _answer(await c.post("/api/v1/warm", json={"definition": "a"},
                                                  headers=headers))
        assert status == 401 and "bearer token" in body["error"]
    assert ports.runs == {}
    resp = await c.post("/api/v1/warm", json={"definition": "a"}, headers=_auth())
    assert resp.status == 202


# --- datasets ---------------------------------------------------------------------------------

async def test_dataset_shapes(client: Client) -> None:
    """GET /api/v1/datasets -> {definitions: [...]}; one definition -> its row; one name in
    two catalogs -> {definitions: [...]}; ?catalog= narrows; unknown -> 404."""
    a = {"catalog": "local", "definition": "/data/a.txt", "files": 3, "fresh": 2}
    b_local = {"catalog": "local", "definition": "b", "files": 1, "fresh": 0}
    b_sam = {"catalog": "samweb", "definition": "b", "files": 9, "fresh": 9}
    c = await client(FakePorts(rows=[a, b_local, b_sam]))
    assert await _answer(await c.get("/api/v1/datasets")) == (
        200, {"definitions": [a, b_local, b_sam]})
    assert await _answer(await c.get("/api/v1/datasets//data/a.txt")) == (200, a)
    assert await _answer(await c.get("/api/v1/datasets/b")) == (
        200, {"definitions": [b_local, b_sam]})
    assert await _answer(await c.get("/api/v1/datasets/b?catalog=samweb")) == (200, b_sam)
    assert await _answer(await c.get("/api/v1/datasets?catalog=samweb")) == (
        200, {"definitions": [b_sam]})
    assert await _answer(await c.get("/api/v1/datasets/nope")) == (
        404, {"error": "definition 'nope' has no record"})
    # An unknown catalog answered 200 and nothing (404 for one name); twice took the first.
    for query in ("?catalog=zzz", "?catalog=", "?catalog=local&catalog=samweb"):
        for path in ("/api/v1/datasets", "/api/v1/datasets/b"):
            status, doc = await _answer(await c.get(path + query))
            assert status == 400 and "catalog" in doc["error"], (path, query, doc)


async def test_open_dataset_answers_leave_run_errors_to_the_token(client: Client) -> None:
    """A run's error may name the token file, the token's subject, the proxy's DN, what a
    storage answered: ``GET /api/v1/runs`` keeps it to the token, and the open dataset routes
    gave it to anyone. They now ask the ports for reasons only with the token."""
    ports = FakePorts(token=TOKEN, rows=[{"catalog": "local", "definition": "b"}])
    c = await client(ports)
    for headers, reasons in (({}, False), (_auth("wrong"), False), (_auth(), True),
                             ({"Authorization": f"bearer {TOKEN}"}, True)):
        for path in ("/api/v1/datasets", "/api/v1/datasets/b"):
            ports.calls.clear()
            assert (await c.get(path, headers=headers)).status == 200
            assert [args[2] for name, args in ports.calls if name == "datasets"] == [reasons]


async def test_members_are_open_to_read_with_a_token_configured(client: Client) -> None:
    """GET /api/v1/members answers the ports' list under "members", without the token even
    when one is configured (like dataset warmth)."""
    ports = FakePorts(token=TOKEN)
    c = await client(ports)
    assert await _answer(await c.get("/api/v1/members")) == (
        200, {"members": [{"id": "h:1:a", "alive": True}]})
    assert ports.calls == [("members", ())]


# --- campaigns --------------------------------------------------------------------------------

async def test_campaign_shapes(client: Client) -> None:
    """Add -> 201 {campaign, added, held, href}; again -> 200 (replaced); list -> {campaigns};
    show -> the document; an action -> {result}."""
    ports = FakePorts(token=TOKEN)
    c = await client(ports)
    body = {"toml": "drain\n[[stage]]", "source": "/etc/c.toml", "held": True}
    assert await _answer(await c.post("/api/v1/campaigns", json=body, headers=_auth())) == (
        201, {"campaign": "drain", "added": True, "held": True,
              "href": "/api/v1/campaigns/drain"})
    assert ("add_campaign", ("drain\n[[stage]]", "/etc/c.toml", True)) in ports.calls
    status, doc = await _answer(await c.post("/api/v1/campaigns", json={"toml": "drain\n"},
                                             headers=_auth()))
    assert (status, doc["added"], doc["held"]) == (200, False, False)
    assert ("add_campaign", ("drain\n", "<api>", False)) in ports.calls
    assert await _answer(await c.get("/api/v1/campaigns")) == (
        200, {"campaigns": [{"campaign": "drain", "control": None}]})
    assert await _answer(await c.get("/api/v1/campaigns/drain")) == (
        200, {"campaign": "drain", "control": None, "submissions": []})
    action = {"stage": "reco", "submission": 4, "job_id": "77.0@jobsub01"}
    assert await _answer(await c.post("/api/v1/campaigns/drain/mark-submitted", json=action,
                                      headers=_auth())) == (
        200, {"result": "drain: mark-submitted done"})
    assert ("campaign_action", ("drain", "mark-submitted", "reco", 4, "77.0@jobsub01")) \
        in ports.calls
    resp = await c.post("/api/v1/campaigns/drain/release", headers=_auth())  # no body: {}
    assert resp.status == 200
    assert ("campaign_action", ("drain", "release", None, None, None)) in ports.calls


async def test_campaign_changes_need_a_token_file_and_the_token(client: Client) -> None:
    """Without a token configured every campaign change is 403; with one, a missing or wrong
    token is 401; reads stay open; nothing refused reaches the daemon."""
    open_ports = FakePorts()
    c = await client(open_ports)
    for path in ("/api/v1/campaigns", "/api/v1/campaigns/x/hold"):
        status, body = await _answer(await c.post(path, json={"toml": "x"}))
        assert status == 403 and "daemon.token_file" in body["error"]
    assert (await c.get("/api/v1/campaigns")).status == 200
    guarded = FakePorts(token=TOKEN)
    c = await client(guarded)
    for headers in ({}, _auth("wrong")):
        for path in ("/api/v1/campaigns", "/api/v1/campaigns/x/hold"):
            status, body = await _answer(await c.post(path, json={"toml": "x"},
                                                      headers=headers))
            assert status == 401 and "bearer token" in body["error"]
    changes = {"add_campaign", "campaign_action", "forget_campaign"}
    for headers in ({}, _auth("wrong")):
        status, body = await _answer(await c.delete("/api/v1/campaigns/x", headers=headers))
        assert status == 401 and "bearer token" in body["error"]
    c = await client(open_ports)
    status, body = await _answer(await c.delete("/api/v1/campaigns/x"))
    assert status == 403 and "daemon.token_file" in body["error"]
    assert not [n for n, _ in open_ports.calls + guarded.calls if n in changes]


async def test_delete_forgets_a_campaign(client: Client) -> None:
    """DELETE /api/v1/campaigns/NAME -> 200 {campaign, dropped}; 404 unknown; 409 (the
    daemon's ConflictError) names what is left."""
    ports = FakePorts(token=TOKEN, campaigns={"done": {"campaign": "done"}})
    c = await client(ports)
    assert await _answer(await c.delete("/api/v1/campaigns/done", headers=_auth())) == (
        200, {"campaign": "done", "dropped": {"submissions": 2}})
    assert await _answer(await c.delete("/api/v1/campaigns/done", headers=_auth())) == (
        404, {"error": "no campaign 'done'"})
    ports.fail["forget_campaign"] = ConflictError("campaign x is not finished: #3 reco "
                                                  "launch_unknown is not final")
    status, body = await _answer(await c.delete("/api/v1/campaigns/x", headers=_auth()))
    assert status == 409 and "launch_unknown is not final" in body["error"]


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/api/v1/campaigns", {}, 'expected {"toml"'),
    ("/api/v1/campaigns", {"toml": ""}, 'expected {"toml"'),
    ("/api/v1/campaigns", {"toml": 3}, "toml: expected a string, got int"),
    ("/api/v1/campaigns", {"toml": "x", "source": 1}, "source: expected a string"),
    ("/api/v1/campaigns", {"toml": "x", "held": "yes"}, "held: expected bool, got str"),
    ("/api/v1/campaigns/x/retry", {"submission": "4"}, "submission: expected int, got str"),
    ("/api/v1/campaigns/x/retry", {"submission": True}, "submission: expected int, got bool"),
    ("/api/v1/campaigns/x/hold", {"stage": ["a"]}, "stage: expected a string, got list"),
    ("/api/v1/campaigns/x/hold", [1], "body must be a JSON object"),
    ("/api/v1/campaigns", {"toml": "x", "helds": True}, "unknown key 'helds' in the body"),
    ("/api/v1/campaigns/x/retry", {"submision": 4}, "unknown key 'submision' in the body"),
    # `source` is logged and listed: a line break forged a log line, 200,000 characters were
    # repeated in every listing.
    ("/api/v1/campaigns", {"toml": "x", "source": "a\r\nprestaged: ERROR: fake"},
     "source: expected the campaign file's path (at most 4096 characters, no control "
     "characters), got 'a\\x0d\\x0aprestaged: ERROR: fake'"),
    ("/api/v1/campaigns", {"toml": "x", "source": "s" * 4097}, "at most 4096 characters"),
])
async def test_bad_campaign_requests_are_400(client: Client, path: str, body: object,
                                             message: str) -> None:
    """Malformed campaign requests are 400 with a message naming the key and what came."""
    ports = FakePorts(token=TOKEN)
    c = await client(ports)
    status, doc = await _answer(await c.post(path, data=json.dumps(body),
                                             headers={**JSON, **_auth()}))
    assert status == 400 and message in doc["error"], doc
    assert not [n for n, _ in ports.calls if n in ("add_campaign", "campaign_action")]


@pytest.mark.parametrize(("error", "status"), [
    (NotFoundError("no campaign 'x'"), 404),
    (NotFoundError("campaign 'x' has no submission 9"), 404),
    (NotFoundError("campaign 'x' has no stage 'nope'; its stages are reco"), 404),
    (ConflictError("submission 4 is submitted, not launch_unknown"), 409),
    (ConfigError("unknown action 'explode': expected one of hold, release"), 400),
    (PrestagedError("the daemon is stopping"), 503),
])
async def test_campaign_refusals_answer_with_the_errors_status(
        client: Client, error: PrestagedError, status: int) -> None:
    """An action or an add the daemon refuses answers with the error's http_status (and a
    failure, 5xx, with its exit code)."""
    expected = {"error": str(error), **({"exit_code": error.exit_code} if status >= 500 else {})}
    c = await client(FakePorts(token=TOKEN, fail={"campaign_action": error,
                                                  "add_campaign": error}))
    assert await _answer(await c.post("/api/v1/campaigns/x/retry", json={"submission": 9},
                                      headers=_auth())) == (status, expected)
    assert await _answer(await c.post("/api/v1/campaigns", json={"toml": "x"},
                                      headers=_auth())) == (status, expected)


async def test_unknown_campaign_is_404(client: Client) -> None:
    """GET /api/v1/campaigns/<unknown> is 404 with the daemon's message."""
    c = await client(FakePorts())
    assert await _answer(await c.get("/api/v1/campaigns/nosuch")) == (
        404, {"error": "no campaign 'nosuch'"})


# --- operator data (issue 12, section 1) -------------------------------------------------------

async def test_runs_need_the_token_when_one_is_configured(client: Client) -> None:
    """GET /api/v1/runs/<id> is operator data: 401 without the token when one is configured
    (the run is not even looked up), 200 with it; open when there is no token."""
    ports = FakePorts(token=TOKEN, runs={1: FakeRun(1, "done")})
    c = await client(ports)
    for headers in ({}, _auth("wrong")):
        status, body = await _answer(await c.get("/api/v1/runs/1", headers=headers))
        assert status == 401 and "bearer token" in body["error"]
    status, body = await _answer(await c.get("/api/v1/runs/2", headers={}))
    assert status == 401  # no telling which runs exist either
    assert not [n for n, _ in ports.calls if n == "run"]
    assert (await c.get("/api/v1/runs/1", headers=_auth())).status == 200
    c = await client(FakePorts(runs={1: FakeRun(1, "done")}))
    assert (await c.get("/api/v1/runs/1")).status == 200


async def test_campaign_output_needs_the_token_when_one_is_configured(client: Client) -> None:
    """GET /api/v1/campaigns/<name> asks for the submit commands' output only with the token
    (when one is configured); without a token configured it is always asked for."""
    ports = FakePorts(token=TOKEN, campaigns={"c": {"campaign": "c"}})
    c = await client(ports)
    assert (await c.get("/api/v1/campaigns/c")).status == 200
    assert (await c.get("/api/v1/campaigns/c", headers=_auth("wrong"))).status == 200
    assert (await c.get("/api/v1/campaigns/c", headers=_auth())).status == 200
    assert [args for name, args in ports.calls if name == "describe_campaign"] == [
        ("c", False), ("c", False), ("c", True)]
    open_ports = FakePorts(campaigns={"c": {"campaign": "c"}})
    c = await client(open_ports)
    await c.get("/api/v1/campaigns/c")
    assert ("describe_campaign", ("c", True)) in open_ports.calls


# --- the CLI's client ------------------------------------------------------------------------

async def test_the_client_sends_the_token_on_reads_when_it_can(tmp_path: Path) -> None:
    """`client.call` sends the token on GETs too (runs and output need it); an unreadable
    token file leaves a GET without it but refuses a change in one line."""
    from prestaged.config import load_config
    from prestaged.service import client as api_client

    seen: list[tuple[str, Optional[str]]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append((request.method, request.headers.get("Authorization")))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/api/v1/x", record)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        token = tmp_path / "token"
        token.write_text(TOKEN + "\n")
        config = tmp_path / "c.toml"
        config.write_text(f'[daemon]\nlisten = "127.0.0.1:{server.port}"\n'
                          f'token_file = "{token}"\n')
        cfg = load_config(config)
        for method in ("GET", "POST"):
            assert await asyncio.to_thread(api_client.call, cfg, method, "/api/v1/x", {}) \
                == {"ok": True}
        assert seen == [("GET", f"Bearer {TOKEN}"), ("POST", f"Bearer {TOKEN}")]
        token.unlink()
        assert await asyncio.to_thread(api_client.call, cfg, "GET", "/api/v1/x") == {"ok": True}
        assert seen[-1] == ("GET", None)
        with pytest.raises(ConfigError, match="cannot read"):
            await asyncio.to_thread(api_client.call, cfg, "POST", "/api/v1/x", {})
    finally:
        await server.close()


# --- browsers: cross-site requests and DNS rebinding ------------------------------------------

@pytest.mark.parametrize("headers", [
    {"Content-Type": "text/plain"},
    {"Content-Type": "application/x-www-form-urlencoded"},
    {"Content-Type": "multipart/form-data; boundary=x"},
    {},
])
async def test_a_body_that_is_not_declared_json_is_415(client: Client,
                                                       headers: dict[str, str]) -> None:
    """A web page may POST text/plain, a form or an untyped blob to a loopback daemon without
    a CORS preflight: a warm without a token was queued from any site the user visited."""
    ports = FakePorts()
    c = await client(ports)
    resp = await c.post("/api/v1/warm", data=b'{"definition": "a"}', headers=headers,
                        skip_auto_headers=["Content-Type"])
    status, doc = await _answer(resp)
    assert status == 415 and "application/json" in doc["error"], doc
    assert not ports.runs


async def test_a_host_not_naming_this_host_is_421_in_clear() -> None:
    """DNS rebinding: a page of evil.example, its name then resolving to 127.0.0.1, read the
    loopback API as its own origin (runs, campaigns, warms without a token). In clear, a Host
    must be an address, localhost or a name of this host; without ``hosts`` none is checked."""
    ports = FakePorts()
    checked = TestClient(TestServer(build_app(ports, listen="127.0.0.1:9464",
                                              hosts={"node7.example.org"}), host="127.0.0.1"))
    unchecked = TestClient(TestServer(build_app(ports), host="127.0.0.1"))
    async with checked, unchecked:
        for host in ("evil.example", "evil.example:9464", "127.0.0.1.evil.example",
                     "localhost.evil.example", "", "node7.example.org.evil"):
            status, doc = await _answer(await checked.get("/api/v1/campaigns",
                                                          headers={"Host": host}))
            assert status == 421 and "127.0.0.1:9464" in doc["error"], (host, doc)
            resp = await checked.post("/api/v1/warm", json={"definition": "a"},
                                      headers={"Host": host})
            assert resp.status == 421
            assert (await unchecked.get("/api/v1/campaigns", headers={"Host": host})).status \
                == 200
        for host in ("127.0.0.1:9464", "localhost", "LOCALHOST:9464", "[::1]:9464",
                     "node7.example.org", "node7.example.org.:9464", "x.localhost"):
            resp = await checked.get("/api/v1/campaigns", headers={"Host": host})
            assert resp.status == 200, host
    assert not ports.runs
