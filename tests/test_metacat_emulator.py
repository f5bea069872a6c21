"""The MetaCat emulator (prestaged.testing.metacat) held to the REAL client: metacat-client's
``MetaCatClient`` (PyPI), synchronous, against the emulator in a thread on 127.0.0.1. Tests that
send a MetaCat token do it over https (``secure``), as prestaged does: tokens go over https
only, in tests too."""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from conftest import peer_missing

from prestaged.testing.metacat import (
    DATASET,
    DATASET_FILES,
    QUERY,
    ThreadedMetaCatServer,
)
from prestaged.testing.pki import TestPKI

N_FILES = 3000
TIERS = ("raw", "reco", "pandora")


def _files(n: int = N_FILES, namespace: str = "dune") -> list[dict[str, Any]]:
    return [{"namespace": namespace, "name": f"np04_raw_{i:05d}.root", "size": 1000 + i,
             "metadata": {"core.runs": 5000 + i % 7, "core.data_tier": TIERS[i % 3],
                          "dune.quality": i % 2 == 0, "core.file_size": 1000 + i}}
            for i in range(n)]


@pytest.fixture(scope="module")
def webapi() -> Any:
    """The real client's ``metacat.webapi.webapi`` module (``metacat.webapi`` re-exports only
    MetaCatClient and the base errors, not NotFoundError or BadRequestError); a skip without
    CI, a failure with CI set."""
    if importlib.util.find_spec("metacat") is None:
        peer_missing("metacat-client not importable: pip install metacat-client", "client")
    import metacat.webapi.webapi

    return metacat.webapi.webapi


@pytest.fixture
def emulator() -> Iterator[ThreadedMetaCatServer]:
    """An open emulator with ``dune:np04_raw`` (N_FILES files) and ``dune:empty``."""
    with ThreadedMetaCatServer(datasets={"dune:np04_raw": _files(), "dune:empty": []}) as s:
        yield s


@pytest.fixture
def client(webapi: Any, tmp_path: Path) -> Callable[..., Any]:
    """Make a real ``MetaCatClient`` for a server URL; its token library stays in tmp_path."""

    def make(url: str, token: Optional[str] = None) -> Any:
        return webapi.MetaCatClient(url, token=token,
                                    token_library=str(tmp_path / "token_library"))

    return make


@pytest.fixture
def secure(pki: TestPKI, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """The emulator's server TLS context; the real client (requests) trusts the test CA
    through REQUESTS_CA_BUNDLE from here on."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.ca_cert))
    return pki.server_ssl_context(require_client_cert=False)


def _jwt(subject: str) -> str:
    import jwt  # a dependency of metacat-client, which reads the token's exp itself

    return jwt.encode({"sub": subject, "exp": int(time.time()) + 3600}, "k" * 32, algorithm="HS256")


def test_get_dataset_answers_file_count(emulator: ThreadedMetaCatServer,
                                        client: Callable[..., Any]) -> None:
    """get_dataset('ns:name') gets the dataset object with its namespace, name and file_count."""
    ds = client(emulator.base_url).get_dataset("dune:np04_raw")
    assert (ds["namespace"], ds["name"], ds["file_count"]) == ("dune", "np04_raw", N_FILES)
    assert emulator.stats.requests[DATASET] == 1


def test_get_dataset_unknown_is_none(emulator: ThreadedMetaCatServer,
                                     client: Callable[..., Any]) -> None:
    """An unknown dataset is the real server's 404, which the real client turns into None."""
    assert client(emulator.base_url).get_dataset("dune:no_such") is None
    assert emulator.stats.requests[DATASET] == 1


def test_get_dataset_files_streams_every_file_once(emulator: ThreadedMetaCatServer,
                                                   client: Callable[..., Any]) -> None:
    """get_dataset_files reads the json-seq stream (exact content type) with every file once,
    metadata only when asked for."""
    c = client(emulator.base_url)
    bare = list(c.get_dataset_files("dune:np04_raw"))
    full = list(c.get_dataset_files("dune:np04_raw", with_metadata=True))
    names = {f["name"] for f in _files()}
    assert len(bare) == N_FILES and {f["name"] for f in bare} == names
    assert len({f["fid"] for f in bare}) == N_FILES
    assert "metadata" not in bare[0]
    assert {f["name"]: f["metadata"] for f in full} == {f["name"]: f["metadata"]
                                                        for f in _files()}
    assert emulator.stats.requests[DATASET_FILES] == 2


def test_get_dataset_files_unknown_raises_not_found(webapi: Any,
                                                    emulator: ThreadedMetaCatServer,
                                                    client: Callable[..., Any]) -> None:
    """An unknown dataset's listing raises the client's NotFoundError when iterated (the
    client's generator never returns the None its docstring promises)."""
    files = client(emulator.base_url).get_dataset_files("dune:no_such")
    with pytest.raises(webapi.NotFoundError, match="Dataset not found"):
        list(files)


def test_query_without_batch_size_is_one_request(emulator: ThreadedMetaCatServer,
                                                 client: Callable[..., Any]) -> None:
    """query() without batch_size posts the MQL once and gets all files, none twice."""
    got = list(client(emulator.base_url).query("files from dune:np04_raw"))
    assert len(got) == N_FILES and len({f["fid"] for f in got}) == N_FILES
    assert emulator.stats.requests[QUERY] == 1
    assert emulator.stats.queries == ["files from dune:np04_raw"]


@pytest.mark.parametrize("batch", [700, 500])
def test_query_batches_in_creation_order(emulator: ThreadedMetaCatServer,
                                         client: Callable[..., Any], batch: int) -> None:
    """query(batch_size=N) pages '(q) ordered skip K limit N' until a short page: all files,
    in creation order, none twice (an exact multiple costs one empty page more)."""
    got = list(client(emulator.base_url).query("files from dune:np04_raw", batch_size=batch))
    assert [f["name"] for f in got] == [f["name"] for f in _files()]
    pages = N_FILES // batch + 1
    assert emulator.stats.requests[QUERY] == pages
    assert emulator.stats.queries == [
        f"(files from dune:np04_raw) ordered skip {k * batch} limit {batch}"
        for k in range(pages)]


def test_ordered_is_creation_time_and_unordered_is_neither(client: Callable[..., Any]) -> None:
    """'ordered' sorts by created_timestamp, not insertion; a listing without it promises no
    order and comes neither in creation nor in insertion order."""
    files = [dict(f, created_timestamp=1_700_000_000 + N_FILES - i)
             for i, f in enumerate(_files(200))]
    with ThreadedMetaCatServer(datasets={"dune:late_first": files}) as s:
        c = client(s.base_url)
        paged = [f["name"] for f in c.query("files from dune:late_first", batch_size=64)]
        listed = [f["name"] for f in c.get_dataset_files("dune:late_first")]
    inserted = [f["name"] for f in files]
    assert paged == inserted[::-1]
    assert sorted(listed) == sorted(inserted)
    assert listed not in (inserted, inserted[::-1])


WHERE_CASES: list[tuple[str, Callable[[dict[str, Any]], bool]]] = [
    ("core.data_tier = 'raw'", lambda m: m["core.data_tier"] == "raw"),
    ('core.data_tier != "raw"', lambda m: m["core.data_tier"] != "raw"),
    ("core.runs < 5002", lambda m: m["core.runs"] < 5002),
    ("core.runs > 5004", lambda m: m["core.runs"] > 5004),
    ("core.runs in (5001, 5003)", lambda m: m["core.runs"] in (5001, 5003)),
    ("core.data_tier in ('reco', 'pandora') and core.runs = 5006 and dune.quality = true",
     lambda m: m["core.data_tier"] in ("reco", "pandora") and m["core.runs"] == 5006
     and m["dune.quality"]),
    ("core.file_size > 3500", lambda m: m["core.file_size"] > 3500),
    ("no.such_key = 1", lambda m: False),
]


@pytest.mark.parametrize("where,expect", WHERE_CASES, ids=[w for w, _ in WHERE_CASES])
def test_where_filters_on_metadata(emulator: ThreadedMetaCatServer, client: Callable[..., Any],
                                   where: str, expect: Callable[[dict[str, Any]], bool]) -> None:
    """'where' on metadata keys (=, !=, <, >, in, and; a missing key matches nothing) selects
    exactly the matching files, paged or not."""
    c = client(emulator.base_url)
    q = f"files from dune:np04_raw where {where}"
    wanted = [f["name"] for f in _files() if expect(f["metadata"])]
    assert sorted(f["name"] for f in c.query(q)) == sorted(wanted)
    assert [f["name"] for f in c.query(q, batch_size=300, with_metadata=True)] == wanted


def test_query_default_namespace_and_unknown_dataset(emulator: ThreadedMetaCatServer,
                                                     client: Callable[..., Any]) -> None:
    """query(namespace=) completes a bare dataset name; an unknown dataset inside a query is
    an empty answer, not an error (unlike get_dataset_files)."""
    c = client(emulator.base_url)
    assert len(list(c.query("files from np04_raw limit 10", namespace="dune"))) == 10
    assert list(c.query("files from dune:no_such")) == []
    assert list(c.query("files from dune:empty", batch_size=100)) == []


def test_bad_mql_raises_bad_request(webapi: Any, emulator: ThreadedMetaCatServer,
                                    client: Callable[..., Any]) -> None:
    """MQL outside the subset is the real server's 400 'MQLSyntaxError: ...', raised by the
    client as BadRequestError while iterating."""
    for bad in ("files frm dune:np04_raw", "files from dune:np04_raw where core.runs ~ 3",
                "files from dune:np04_raw skip -1"):
        with pytest.raises(webapi.BadRequestError, match="MQLSyntaxError"):
            list(client(emulator.base_url).query(bad))


def test_bad_dataset_spec_is_refused(webapi: Any, emulator: ThreadedMetaCatServer,
                                     client: Callable[..., Any]) -> None:
    """A dataset name outside the server's safe characters is a 400 BadRequestError."""
    with pytest.raises(webapi.BadRequestError, match="Invalid value"):
        client(emulator.base_url).get_dataset("dune:bad'name")


def _raw(server: ThreadedMetaCatServer, method: str, path: str, body: Optional[str] = None,
         headers: Optional[dict[str, str]] = None) -> tuple[int, str, str, str]:
    """(status, reason, Content-Type, body) of one plain request to the emulator."""
    port = int(server.base_url.rsplit(":", 1)[1].split("/", 1)[0])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, server.server.prefix + path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return (resp.status, resp.reason, resp.getheader("Content-Type", ""),
                resp.read().decode())
    finally:
        conn.close()


def test_sanitized_refusals_are_json_and_handler_errors_webpie_text(
        emulator: ThreadedMetaCatServer) -> None:
    """@sanitized's 400 is JSON {message, code, title}; a handler's own error (404, bad MQL)
    is text of webpie's default type, as common_handler.py and webpie answer."""
    status, _, ctype, body = _raw(emulator, "GET", "/data/dataset?dataset=dune:bad$name")
    assert (status, ctype) == (400, "application/json")
    assert json.loads(body) == {"message": "Invalid value: bad$name",
                                "code": "400 Bad Request", "title": "Bad Request"}
    status, _, ctype, body = _raw(emulator, "POST", "/data/query?namespace=du%20ne", "files")
    assert (status, ctype) == (400, "application/json")
    assert json.loads(body)["message"] == "Invalid value for namespace: du ne"
    assert _raw(emulator, "GET", "/data/dataset_files?dataset=dune:nope")[:4] == (
        404, "Not Found", "text/html; charset=UTF-8", "Dataset not found")
    status, _, ctype, body = _raw(emulator, "POST", "/data/query", "files frm dune:x")
    assert (status, ctype) == (400, "text/html; charset=UTF-8")
    assert body.startswith("MQLSyntaxError: ")
    assert _raw(emulator, "GET", "/data/dataset?dataset=dune:np04_raw")[2] == "application/json"


def test_query_checks_namespace_before_an_empty_text_and_parses_blank_text(
        emulator: ThreadedMetaCatServer) -> None:
    """query() sanitizes namespace= before answering '[]' to an empty text, and only an empty
    text is '[]': a blank one goes to the parser (data_handler.py's order and test)."""
    status, _, ctype, body = _raw(emulator, "POST", "/data/query?namespace=du%20ne", "")
    assert (status, ctype) == (400, "application/json")
    assert _raw(emulator, "POST", "/data/query", "")[::3] == (200, "[]")
    status, _, _, body = _raw(emulator, "POST", "/data/query", "  \n ")
    assert status == 400 and body.startswith("MQLSyntaxError: ")


def test_uncaught_handler_exceptions_are_webpies_500(webapi: Any,
                                                     emulator: ThreadedMetaCatServer,
                                                     client: Callable[..., Any]) -> None:
    """A dataset spec without ':' and a string constant holding a quote (the parser's
    ValueError has no Message) are webpie's '500 Application Error' page, not a 400."""
    status, reason, ctype, body = _raw(emulator, "GET", "/data/dataset_files?dataset=np04_raw")
    assert (status, reason, ctype) == (500, "Application Error", "text/html; charset=UTF-8")
    assert "<h2>Application error</h2>" in body and "not enough values to unpack" in body
    for mql in ("files from dune:np04_raw where core.data_tier = \"it's\"",
                "files from dune:np04_raw where core.data_tier = 'it\\'s'"):
        with pytest.raises(webapi.WebAPIError) as info:
            list(client(emulator.base_url).query(mql))
        assert info.value.StatusCode == 500
        assert not isinstance(info.value, webapi.BadRequestError)


def test_mql_comments_are_cut_to_the_end_of_the_line(webapi: Any, client: Callable[..., Any],
                                                     emulator: ThreadedMetaCatServer) -> None:
    """'#' starts a comment to the end of its line (MQLQuery.parse), inside a string too."""
    c = client(emulator.base_url)
    assert len(list(c.query("files from dune:np04_raw # all of them\n limit 7"))) == 7
    with pytest.raises(webapi.BadRequestError, match="MQLSyntaxError"):
        list(c.query("files from dune:np04_raw where core.data_tier = 'raw#1'"))


def test_token_carriers_are_looked_for_as_the_real_server_does(
        client: Callable[..., Any], secure: ssl.SSLContext) -> None:
    """The auth_token cookie, X-Authentication-Token, then Authorization of scheme bearer in
    any case: each carries the token; another scheme carries none."""
    good = _jwt("alice")
    with ThreadedMetaCatServer(datasets={"dune:a": _files(3)}, token=good,
                               ssl_context=secure) as s:
        port = int(s.base_url.rsplit(":", 1)[1].split("/", 1)[0])
        statuses = []
        for headers in ({"Cookie": f"auth_token={good}"},
                        {"Cookie": f"auth_token={good}", "X-Authentication-Token": "wrong"},
                        {"X-Authentication-Token": "", "Authorization": f"bearer {good}"},
                        {"Authorization": f"BEARER  {good}"},
                        {"Authorization": f"Token {good}"}):
            conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10,
                                               context=ssl.create_default_context(
                                                   cafile=os.environ["REQUESTS_CA_BUNDLE"]))
            conn.request("GET", f"{s.server.prefix}/data/dataset?dataset=dune:a",
                         headers=headers)
            statuses.append(conn.getresponse().status)
            conn.close()
    assert statuses == [200, 200, 200, 200, 401]


def test_stream_is_rfc7464_chunked(emulator: ThreadedMetaCatServer) -> None:
    """dataset_files answers chunked application/json-seq: records of 0x1E, JSON, newline."""
    port = int(emulator.base_url.rsplit(":", 1)[1].split("/", 1)[0])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    prefix = emulator.server.prefix
    conn.request("GET", f"{prefix}/data/dataset_files?dataset=dune:np04_raw&with_metadata=no")
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    assert resp.getheader("Content-Type") == "application/json-seq"
    assert resp.getheader("Transfer-Encoding") == "chunked"
    records = body.split(b"\n")
    assert records[-1] == b"" and len(records) == N_FILES + 1
    assert all(r.startswith(b"\x1e{") and r.endswith(b"}") for r in records[:-1])


def test_token_required_refuses_missing_and_wrong(webapi: Any, client: Callable[..., Any],
                                                  secure: ssl.SSLContext) -> None:
    """With a token configured, the client's X-Authentication-Token must be that token: none
    or another is a 401 (a WebAPIError) and nothing is served."""
    good, other = _jwt("alice"), _jwt("mallory")
    with ThreadedMetaCatServer(datasets={"dune:np04_raw": _files(50)}, token=good,
                               ssl_context=secure) as s:
        assert client(s.base_url, token=good).get_dataset("dune:np04_raw")["file_count"] == 50
        assert len(list(client(s.base_url, token=good).query("files from dune:np04_raw"))) == 50
        for token in (None, other):
            with pytest.raises(webapi.WebAPIError) as info:
                client(s.base_url, token=token).get_dataset("dune:np04_raw")
            assert info.value.StatusCode == 401
            assert not isinstance(info.value, webapi.NotFoundError)
            with pytest.raises(webapi.WebAPIError):
                list(client(s.base_url, token=token).get_dataset_files("dune:np04_raw"))
        stats = s.stats
    assert stats.auth_refusals == 4
    assert stats.token_requests == 4  # two good, two wrong; the two without a token send none


def test_open_server_ignores_tokens(client: Callable[..., Any], secure: ssl.SSLContext) -> None:
    """Without a configured token reads are open, as on the real server, token or none."""
    with ThreadedMetaCatServer(datasets={"dune:a": _files(3)}, ssl_context=secure) as s:
        assert client(s.base_url, token=_jwt("anyone")).get_dataset("dune:a")["file_count"] == 3
        assert client(s.base_url).get_dataset("dune:a")["file_count"] == 3
        assert (s.stats.auth_refusals, s.stats.token_requests) == (0, 1)


def test_file_in_two_datasets_keeps_one_fid(client: Callable[..., Any]) -> None:
    """A file declared in two datasets is one MetaCat file: the same fid in both listings."""
    files = _files(20)
    with ThreadedMetaCatServer(datasets={"dune:all": files, "dune:some": files[5:10]}) as s:
        c = client(s.base_url)
        fids = {f["name"]: f["fid"] for f in c.get_dataset_files("dune:all")}
        some = {f["name"]: f["fid"] for f in c.get_dataset_files("dune:some")}
    assert len(set(fids.values())) == 20
    assert some == {name: fids[name] for name in some} and len(some) == 5


def test_bad_default_namespace_is_refused(webapi: Any, emulator: ThreadedMetaCatServer,
                                          client: Callable[..., Any]) -> None:
    """query(namespace=) outside the server's safe characters is a 400 BadRequestError."""
    with pytest.raises(webapi.BadRequestError, match="Invalid value for namespace"):
        list(client(emulator.base_url).query("files from np04_raw", namespace="du ne"))


def test_over_https_with_the_test_ca(pki: TestPKI, client: Callable[..., Any],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Given an SSL context the emulator serves HTTPS (as DUNE's MetaCat does), and the real
    client verifies it against the CA named by REQUESTS_CA_BUNDLE."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.ca_cert))
    ctx = pki.server_ssl_context(require_client_cert=False)
    with ThreadedMetaCatServer(datasets={"dune:a": _files(30)}, ssl_context=ctx) as s:
        assert s.base_url.startswith("https://127.0.0.1:")
        got = list(client(s.base_url).query("files from dune:a", batch_size=7))
    assert [f["name"] for f in got] == [f["name"] for f in _files(30)]


def test_process_serves_datasets_and_writes_stats_on_sigterm(
        client: Callable[..., Any], pki: TestPKI, secure: ssl.SSLContext,
        tmp_path: Path) -> None:
    """``python -m prestaged.testing.metacat --pki-dir D`` prints its https base URL once
    listening, serves a datasets file and generated datasets to the real client behind the
    token in its token file, and on SIGTERM exits 0 writing statistics that count exactly those
    requests."""
    token = _jwt("bench")
    (tmp_path / "token").write_text(token + "\n")
    (tmp_path / "datasets.json").write_text(json.dumps({"datasets": {"dune:small": _files(5)}}))
    stats = tmp_path / "stats.json"
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "prestaged.testing.metacat", "--datasets",
         str(tmp_path / "datasets.json"), "--synthetic", "dune:gen=250", "--token-file",
         str(tmp_path / "token"), "--stats-file", str(stats), "--pki-dir", str(pki.root)],
        stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())  # blocks until listening
        assert info["pid"] == proc.pid and info["base_url"].startswith("https://127.0.0.1:")
        c = client(info["base_url"], token=token)
        assert c.get_dataset("dune:small")["file_count"] == 5
        gen = list(c.query("files from dune:gen where core.runs = 1001", batch_size=40))
        assert [f["name"] for f in gen] == [f"gen_{i:07d}.root" for i in range(100, 200)]
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0
    doc = json.loads(stats.read_text())
    assert doc["requests"] == {DATASET: 1, QUERY: 3} and doc["auth_refusals"] == 0


def test_query_summaries(emulator: ThreadedMetaCatServer, client: Callable[..., Any]) -> None:
    """query(summary='count') answers the count and total size of the selection in one
    object; summary='keys' the metadata keys present."""
    c = client(emulator.base_url)
    wanted = [f for f in _files() if f["metadata"]["core.data_tier"] == "raw"]
    (count,) = c.query("files from dune:np04_raw where core.data_tier = 'raw'", summary="count")
    assert count == {"count": len(wanted), "total_size": sum(f["size"] for f in wanted)}
    (keys,) = c.query("files from dune:np04_raw limit 1", summary="keys")
    assert keys == sorted(_files()[0]["metadata"])
