"""The Rucio emulator (prestaged.testing.rucio) held to the REAL client: rucio 41.5.1's
``ReplicaClient`` (PyPI), synchronous, against the emulator in a thread on 127.0.0.1, over
https with the test CA (passwords and tokens go over https only, in tests too)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import requests
from conftest import peer_missing

from prestaged.testing.pki import TestPKI
from prestaged.testing.rucio import LIST_REPLICAS, RucioEmulator, ThreadedRucioEmulator, main
from prestaged.testing.rucio_catalog import ListRequest, RucioCatalog, SyntheticFiles
from prestaged.testing.rucio_spec import RucioSpec
from prestaged.testing.threaded import ThreadedServer
from prestaged.testing.tokens import BearerCheck, IssuerServer, TokenIssuer

USER_DN = "CN=Test User,O=Test,DC=prestaged-test,DC=org"
DISK = "https://127.0.0.1:2880/pnfs/dune"
SPEC: dict[str, Any] = {
    "scopes": ["dune"],
    "rses": [
        {"name": "DISK_RSE", "type": "DISK", "protocols": [
            {"scheme": "https", "hostname": "127.0.0.1", "port": 2880, "prefix": "/pnfs/dune"},
            {"scheme": "root", "hostname": "127.0.0.1", "port": 1094, "prefix": "/pnfs/dune"}]},
        {"name": "TAPE_RSE", "type": "TAPE", "deterministic": False, "protocols": [
            {"scheme": "https", "hostname": "127.0.0.1", "port": 2881, "prefix": "/tape"}]},
    ],
    "files": [
        {"scope": "dune", "name": "f1.root", "bytes": 123, "adler32": "0cc737eb",
         "replicas": {"DISK_RSE": f"{DISK}/raw/f1.root",
                      "TAPE_RSE": "https://127.0.0.1:2881/tape/raw/f1.root"}},
        {"scope": "dune", "name": "f2.root", "bytes": 456, "adler32": "0cc737ec",
         "md5": "0" * 32, "replicas": {"TAPE_RSE": "https://127.0.0.1:2881/tape/raw/f2.root"}},
        {"scope": "dune", "name": "f0.root", "bytes": 7, "adler32": "0cc737ed", "replicas": {}},
    ],
    "datasets": [{"scope": "dune", "name": "ds1",
                  "files": ["dune:f1.root", "dune:f2.root", "dune:f0.root"]}],
    "users": [{"account": "root", "username": "u", "password": "p4ss-w0rd"}],
    "x509": [{"account": "alice", "dn": USER_DN}],
}


@pytest.fixture(scope="module")
def rucio_client() -> Any:
    """The real ``rucio.client.replicaclient`` module; a skip without CI, a failure with it."""
    if importlib.util.find_spec("rucio") is None:
        peer_missing("rucio not importable: pip install rucio==41.5.1", "client")
    import rucio.client.replicaclient

    return rucio.client.replicaclient


@pytest.fixture
def rucio_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rucio_client: Any
                 ) -> Iterator[Path]:
    """A rucio.cfg in tmp_path (RUCIO_CONFIG) keeping the client's token file there too; the
    client's cached configuration is dropped before and after."""
    from rucio.common.config import clean_cached_config

    cfg = tmp_path / "rucio.cfg"
    cfg.write_text(f"[client]\nauth_token_file_path = {tmp_path / 'token' / 'auth_token'}\n")
    monkeypatch.setenv("RUCIO_CONFIG", str(cfg))
    for name in ("RUCIO_ACCOUNT", "RUCIO_AUTH_TYPE", "X509_CERT_DIR", "X509_USER_PROXY",
                 "BEARER_TOKEN", "BEARER_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    clean_cached_config()
    yield cfg
    clean_cached_config()


def _forget_token(cfg: Path) -> None:
    """Remove the client's token file (one per rucio.cfg), so the next client logs in."""
    (cfg.parent / "token" / "auth_token").unlink()


class Clock:
    """A settable clock for token expiry (seconds since the epoch)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    """A clock the test moves by hand."""
    return Clock()


@pytest.fixture
def emulator(pki: TestPKI, clock: Clock) -> Iterator[ThreadedRucioEmulator]:
    """The emulator over HTTPS (client certificate asked for, proxies allowed) with SPEC and
    ``clock``; ``requests`` calls to it verify against ``pki.ca_dir``."""
    with ThreadedRucioEmulator(SPEC, clock=clock,
                               ssl_context=pki.server_ssl_context(require_client_cert=False)
                               ) as s:
        yield s


MakeClient = Callable[..., Any]


@pytest.fixture
def client(rucio_client: Any, rucio_config: Path, pki: TestPKI) -> MakeClient:
    """Make a real ReplicaClient for an emulator (trusting the test CA); userpass
    u/p4ss-w0rd as root by default."""

    def make(server: ThreadedRucioEmulator, **kwargs: Any) -> Any:
        args: dict[str, Any] = {"rucio_host": server.base_url, "auth_host": server.base_url,
                                "account": "root", "auth_type": "userpass",
                                "creds": {"username": "u", "password": "p4ss-w0rd"},
                                "ca_cert": str(pki.ca_dir)}
        args.update(kwargs)
        return rucio_client.ReplicaClient(**args)

    return make


def _dids(*names: str) -> list[dict[str, str]]:
    return [{"scope": "dune", "name": n} for n in names]


def _by_name(records: Any) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in records}


def test_files_unknown_dids_and_no_replica_files(emulator: ThreadedRucioEmulator,
                                                 client: MakeClient) -> None:
    """Files come back with the real record fields in scope:name order; an unknown DID is
    left out; a file without replicas has empty pfns, rses and states."""
    records = list(client(emulator).list_replicas(_dids("f2.root", "nope", "f1.root",
                                                        "f0.root")))
    assert [r["name"] for r in records] == ["f0.root", "f1.root", "f2.root"]
    f0, f1, f2 = records
    assert f0 == {"scope": "dune", "name": "f0.root", "bytes": 7, "md5": None,
                  "adler32": "0cc737ed", "pfns": {}, "rses": {}, "states": {}}
    assert list(f1) == ["scope", "name", "bytes", "md5", "adler32", "pfns", "rses", "states"]
    disk, tape = f"{DISK}/raw/f1.root", "https://127.0.0.1:2881/tape/raw/f1.root"
    assert f1["pfns"][disk]["rse"] == "DISK_RSE" and f1["pfns"][disk]["type"] == "DISK"
    assert f1["pfns"][tape]["type"] == "TAPE"
    assert {k for k in f1["pfns"][disk]} == {"rse_id", "rse", "type", "volatile", "domain",
                                             "priority", "client_extract"}
    assert {v["domain"] for v in f1["pfns"].values()} == {"wan"}
    # Priority is by (domain, protocol priority, PFN text): both are https, first of their RSE.
    assert [v["priority"] for v in f1["pfns"].values()] == [1, 2]
    assert list(f1["pfns"]) == sorted([disk, tape])
    assert f1["rses"] == {"DISK_RSE": [disk], "TAPE_RSE": [tape]}
    assert f1["states"] == {"DISK_RSE": "AVAILABLE", "TAPE_RSE": "AVAILABLE"}
    assert f2["md5"] == "0" * 32 and f2["bytes"] == 456


def test_dataset_expands_to_its_files_with_replicas(emulator: ThreadedRucioEmulator,
                                                   client: MakeClient) -> None:
    """A dataset DID lists its files that have a replica; one without any is left out."""
    names = [r["name"] for r in client(emulator).list_replicas(_dids("ds1"))]
    assert names == ["f1.root", "f2.root"]


def test_schemes_choose_the_protocols(emulator: ThreadedRucioEmulator,
                                      client: MakeClient) -> None:
    """Without schemes an RSE gives its first protocol; with schemes one PFN per scheme it
    has; a scheme no RSE has leaves pfns empty but keeps states."""
    c = client(emulator)
    both = _by_name(c.list_replicas(_dids("f1.root"), schemes=["root", "https"]))["f1.root"]
    # In protocol priority order (https is DISK_RSE's first), whatever order they were asked in.
    assert both["rses"]["DISK_RSE"] == [f"{DISK}/raw/f1.root",
                                        "root://127.0.0.1:1094/pnfs/dune/raw/f1.root"]
    root = _by_name(c.list_replicas(_dids("f1.root"), schemes=["root"]))["f1.root"]
    assert list(root["pfns"]) == ["root://127.0.0.1:1094/pnfs/dune/raw/f1.root"]
    assert root["pfns"]["root://127.0.0.1:1094/pnfs/dune/raw/f1.root"]["priority"] == 1
    none = _by_name(c.list_replicas(_dids("f1.root"), schemes=["davs"]))["f1.root"]
    assert none["pfns"] == {} and none["rses"] == {}
    assert none["states"] == {"DISK_RSE": "AVAILABLE", "TAPE_RSE": "AVAILABLE"}


@pytest.mark.parametrize(("expression", "rses"), [
    ("DISK_RSE", {"DISK_RSE"}),
    ("DISK_RSE|TAPE_RSE", {"DISK_RSE", "TAPE_RSE"}),
    ("*", {"DISK_RSE", "TAPE_RSE"}),
    ("rse_type=TAPE", {"TAPE_RSE"}),
    ("*\\rse_type=TAPE", {"DISK_RSE"}),
    ("(DISK_RSE|TAPE_RSE)&deterministic=true", {"DISK_RSE"}),
])
def test_rse_expression_restricts_the_replicas(emulator: ThreadedRucioEmulator,
                                               client: MakeClient, expression: str,
                                               rses: set[str]) -> None:
    """An RSE expression keeps the replicas on the RSEs it selects, as the real grammar
    does (names, *, column terms, union, complement, intersection, parentheses)."""
    f1 = _by_name(client(emulator).list_replicas(_dids("f1.root"),
                                                 rse_expression=expression))["f1.root"]
    assert set(f1["states"]) == rses and set(f1["rses"]) == rses


@pytest.mark.parametrize(("expression", "error"), [
    ("NO_SUCH_RSE", "InvalidRSEExpression"),    # an empty set
    ("type=DISK", "InvalidRSEExpression"),      # 'type' is no RSE column: an absent attribute
    ("DISK_RSE||TAPE_RSE", "InvalidRSEExpression"),
    ("(DISK_RSE", "InvalidRSEExpression"),
    ("rse_type=FOO", "InvalidObject"),
])
def test_bad_rse_expression_raises_the_real_exception(emulator: ThreadedRucioEmulator,
                                                      client: MakeClient, rucio_client: Any,
                                                      expression: str, error: str) -> None:
    """An expression the real parser refuses raises the real client's exception class."""
    from rucio.common import exception

    with pytest.raises(getattr(exception, error)):
        list(client(emulator).list_replicas(_dids("f1.root"), rse_expression=expression))


def test_wrong_password_raises_cannot_authenticate(emulator: ThreadedRucioEmulator,
                                                   client: MakeClient) -> None:
    """A wrong password is the real 401 the client turns into CannotAuthenticate."""
    from rucio.common.exception import CannotAuthenticate

    with pytest.raises(CannotAuthenticate, match="Cannot authenticate to account root"):
        client(emulator, creds={"username": "u", "password": "wrong"})
    assert emulator.stats.tokens_issued["userpass"] == 0
    assert emulator.stats.auth_refusals == 1


def test_expired_token_makes_the_client_authenticate_again(
        emulator: ThreadedRucioEmulator, client: MakeClient, clock: Clock) -> None:
    """Past the token's lifetime the listing gets a 401; the client fetches a new token and
    the listing succeeds."""
    c = client(emulator)
    assert len(list(c.list_replicas(_dids("f1.root")))) == 1
    clock.now += 3601
    assert len(list(c.list_replicas(_dids("f1.root")))) == 1
    stats = emulator.stats
    assert stats.tokens_issued["userpass"] == 2
    assert stats.auth_refusals == 1
    assert stats.requests[LIST_REPLICAS] == 3


def test_token_headers_and_lifetime(emulator: ThreadedRucioEmulator, clock: Clock,
                                    pki: TestPKI) -> None:
    """userpass answers 200 with X-Rucio-Auth-Token and an RFC 1123 UTC expiry one hour on;
    /auth/validate knows the token's account until then."""
    ca = str(pki.ca_dir)
    r = requests.get(f"{emulator.base_url}/auth/userpass", timeout=10, verify=ca, headers={
        "X-Rucio-Account": "root", "X-Rucio-Username": "u", "X-Rucio-Password": "p4ss-w0rd"})
    assert r.status_code == 200 and r.headers["X-Rucio-Auth-Account"] == "root"
    token = r.headers["X-Rucio-Auth-Token"]
    assert token.startswith("root-u-unknown-")
    expected = time.strftime("%a, %d %b %Y %H:%M:%S UTC", time.gmtime(clock.now + 3600))
    assert r.headers["X-Rucio-Auth-Token-Expires"] == expected
    valid = requests.get(f"{emulator.base_url}/auth/validate", timeout=10, verify=ca,
                         headers={"X-Rucio-Auth-Token": token})
    assert valid.status_code == 200 and "'account': 'root'" in valid.text
    clock.now += 3600
    expired = requests.get(f"{emulator.base_url}/auth/validate", timeout=10, verify=ca,
                           headers={"X-Rucio-Auth-Token": token})
    assert expired.status_code == 500
    assert expired.headers["ExceptionClass"] == "CannotAuthenticate"


def test_errors_have_the_real_headers_and_body(emulator: ThreadedRucioEmulator,
                                               pki: TestPKI) -> None:
    """No token: 400 ValueError; a bad token: 401 CannotAuthenticate; both with the
    ExceptionClass/ExceptionMessage headers and the same JSON body."""
    url = f"{emulator.base_url}/replicas/list"
    body = json.dumps({"dids": _dids("f1.root")})
    ca = str(pki.ca_dir)
    none = requests.post(url, data=body, timeout=10, verify=ca)
    assert none.status_code == 400
    assert none.json() == {"ExceptionClass": "ValueError", "ExceptionMessage": "Token must be set."}
    bad = requests.post(url, data=body, timeout=10, verify=ca,
                        headers={"X-Rucio-Auth-Token": "x"})
    assert bad.status_code == 401
    assert bad.headers["ExceptionClass"] == "CannotAuthenticate"
    assert bad.headers["ExceptionMessage"] == "Cannot authenticate with given credentials"
    assert bad.headers["Content-Type"] == "application/octet-stream"


def _token(emulator: ThreadedRucioEmulator, ca: str) -> str:
    """A login token of user u from ``emulator`` (verified against the CA directory ``ca``)."""
    r = requests.get(f"{emulator.base_url}/auth/userpass", timeout=10, verify=ca, headers={
        "X-Rucio-Username": "u", "X-Rucio-Password": "p4ss-w0rd"})
    assert r.status_code == 200
    return str(r.headers["X-Rucio-Auth-Token"])


def test_too_many_dids_is_the_real_schema_error(emulator: ThreadedRucioEmulator,
                                                rucio_config: Path, pki: TestPKI) -> None:
    """Over 1,000 DIDs (the r_dids schema's maxItems: the server's only request limit) and a
    DID with an unknown key are 400 InvalidObject, with the first line of the message the
    real schema check gives; an empty list is an empty 200."""
    from rucio.common.exception import InvalidObject
    from rucio.common.schema import validate_schema

    url = f"{emulator.base_url}/replicas/list"
    ca = str(pki.ca_dir)
    headers = {"X-Rucio-Auth-Token": _token(emulator, ca)}
    for dids in (_dids(*[f"f{i}" for i in range(1001)]),
                 [{"scope": "dune", "name": "f1.root", "did_type": "FILE"}]):
        r = requests.post(url, data=json.dumps({"dids": dids}), headers=headers, timeout=30,
                          verify=ca)
        assert r.status_code == 400 and r.json()["ExceptionClass"] == "InvalidObject"
        with pytest.raises(InvalidObject) as real:
            validate_schema("r_dids", dids)
        assert r.json()["ExceptionMessage"] == real.value.args[0].splitlines()[0]
    ok = requests.post(url, data=json.dumps({"dids": _dids(*[f"f{i}" for i in range(1000)])}),
                       headers=headers, timeout=30, verify=ca)
    assert ok.status_code == 200 and ok.content == b""
    empty = requests.post(url, data=json.dumps({"dids": []}), headers=headers, timeout=10,
                          verify=ca)
    assert empty.status_code == 200
    assert empty.headers["Content-Type"] == "application/x-json-stream"


def test_bad_sort_fails_up_front_or_breaks_the_stream(emulator: ThreadedRucioEmulator,
                                                      pki: TestPKI) -> None:
    """An unknown sort is a 400 when the first file has a PFN to sort, and breaks the stream
    off when only a later one has (the real server fails inside its generator)."""
    url = f"{emulator.base_url}/replicas/list?sort=nearest"
    ca = str(pki.ca_dir)
    headers = {"X-Rucio-Auth-Token": _token(emulator, ca)}
    first = requests.post(url, data=json.dumps({"dids": _dids("f1.root")}), headers=headers,
                          timeout=10, verify=ca)
    assert first.status_code == 400
    assert first.headers["ExceptionClass"] == "SortingAlgorithmNotSupported"
    later = requests.post(url, data=json.dumps({"dids": _dids("f0.root", "f1.root")}),
                          headers=headers, timeout=10, stream=True, verify=ca)
    assert later.status_code == 200
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        list(later.iter_lines())


def test_x509_proxy_and_certificate_log_in(emulator: ThreadedRucioEmulator,
                                           client: MakeClient, pki: TestPKI,
                                           proxy: Path, rucio_config: Path) -> None:
    """x509_proxy (a grid proxy: its CN stripped) and x509 (certificate and key) get a
    token for the DN's account; the listing then works over HTTPS."""
    by_proxy = client(emulator, account=None, auth_type="x509_proxy",
                      creds={"client_proxy": str(proxy)}, ca_cert=str(pki.ca_dir))
    assert [r["name"] for r in by_proxy.list_replicas(_dids("f1.root"))] == ["f1.root"]
    _forget_token(rucio_config)  # else the next client reuses the token file's token
    by_cert = client(emulator, account="alice", auth_type="x509",
                     creds={"client_cert": str(pki.user_cert), "client_key": str(pki.user_key)},
                     ca_cert=str(pki.ca_dir))
    assert len(list(by_cert.list_replicas(_dids("ds1")))) == 2
    assert emulator.stats.tokens_issued["x509"] == 2


def test_x509_unknown_dn_raises_identity_error(emulator: ThreadedRucioEmulator,
                                               client: MakeClient, pki: TestPKI,
                                               tmp_path: Path) -> None:
    """A DN the server does not know is the real 401 IdentityError."""
    from rucio.common.exception import IdentityError

    other = pki.make_proxy_for("Somebody Else", tmp_path / "other")
    with pytest.raises(IdentityError, match="does not exist"):
        client(emulator, account=None, auth_type="x509_proxy",
               creds={"client_proxy": str(other)}, ca_cert=str(pki.ca_dir))


def test_jwt_bearer_token_is_taken_for_its_subject(client: MakeClient, clock: Clock,
                                                   tmp_path: Path, pki: TestPKI,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """With a BearerCheck a WLCG JWT found by the client (auth_type oidc, BEARER_TOKEN_FILE)
    authenticates as its subject's account when it has Rucio's expected audience and scope;
    another subject, audience or scope is refused."""
    from rucio.common.exception import CannotAuthenticate

    issuer = TokenIssuer("https://issuer.example/")
    check = BearerCheck(issuer, audiences=["rucio"])
    token_file = tmp_path / "bt"
    with ThreadedRucioEmulator(SPEC, clock=clock, bearer=check,
                               bearer_accounts={"dune-prod": "root"},
                               ssl_context=pki.server_ssl_context(require_client_cert=False)
                               ) as server:
        monkeypatch.setenv("BEARER_TOKEN_FILE", str(token_file))
        token_file.write_text(issuer.mint("openid profile", subject="dune-prod",
                                          audience="rucio"))
        names = [r["name"] for r in client(server, auth_type="oidc", creds={})
                 .list_replicas(_dids("f2.root"))]
        assert names == ["f2.root"]
        for kwargs in ({"subject": "stranger", "audience": "rucio"},
                       {"subject": "dune-prod", "audience": "https://wlcg.cern.ch/jwt/v1/any"},
                       {"subject": "dune-prod", "audience": "rucio", "scope": "openid"}):
            token_file.write_text(issuer.mint(**{"scope": "openid profile", **kwargs}))
            with pytest.raises(CannotAuthenticate):
                list(client(server, auth_type="oidc", creds={}).list_replicas(_dids("f2.root")))
    assert check.seen >= 4


def test_secrets_stay_out_of_stats_and_logs(emulator: ThreadedRucioEmulator, client: MakeClient,
                                            caplog: pytest.LogCaptureFixture,
                                            rucio_config: Path) -> None:
    """Neither the password nor a token appears in the statistics or the log."""
    caplog.set_level(logging.DEBUG, logger="prestaged.testing.rucio")
    c = client(emulator)
    list(c.list_replicas(_dids("f1.root")))
    _forget_token(rucio_config)
    with pytest.raises(Exception, match="Cannot authenticate"):
        client(emulator, creds={"username": "u", "password": "bad-secret"})
    text = json.dumps(emulator.stats.to_dict()) + caplog.text
    assert "p4ss-w0rd" not in text and "bad-secret" not in text
    assert c.auth_token and c.auth_token not in text
    assert "userpass" in text  # the log and stats do record the event


def test_synthetic_files_resolve_in_chunks_over_https(rucio_config: Path,
                                                       pki: TestPKI) -> None:
    """Generated files resolve in chunks of 500 DIDs through the emulator's HTTP(S) path, each
    exactly once (their speed is measured by bench/metacat_resolve.py, not here)."""
    import asyncio

    import aiohttp

    from prestaged.catalog.http import catalog_ssl_context

    count = 5_000

    async def run() -> list[str]:
        server = RucioEmulator(synthetic=SyntheticFiles(count, rses=("DISK_RSE", "TAPE_RSE")),
                               ssl_context=pki.server_ssl_context(require_client_cert=False))
        names: list[str] = []
        connector = aiohttp.TCPConnector(ssl=catalog_ssl_context(None, pki.ca_dir))
        async with server, aiohttp.ClientSession(connector=connector) as s:
            async with s.get(f"{server.base_url}/auth/userpass", headers={
                    "X-Rucio-Username": "root", "X-Rucio-Password": "secret"}) as r:
                token = r.headers["X-Rucio-Auth-Token"]
            for chunk in range(0, count, 500):
                dids = [{"scope": "dune", "name": f"synthetic_{i:07d}.root"}
                        for i in range(chunk, chunk + 500)]
                async with s.post(f"{server.base_url}/replicas/list", json={"dids": dids},
                                  headers={"X-Rucio-Auth-Token": token}) as r:
                    names += [json.loads(line)["name"]
                              for line in (await r.read()).splitlines() if line]
        return names

    names = asyncio.run(run())
    assert sorted(names) == [f"synthetic_{i:07d}.root" for i in range(count)]


def test_catalog_orders_and_numbers_like_the_server() -> None:
    """Unit: with schemes and domain 'all' every PFN is 'lan' (written last, as the server's
    dict is), numbered 1.. in (priority, PFN) order; nrandom picks that many files; every
    line is exactly what json.dumps writes for its record."""
    catalog = RucioCatalog(RucioSpec.from_dict(SPEC))
    req = ListRequest(dids=(("dune", "f1.root"),), schemes=("https", "root"), domain="all")
    (line,) = catalog.list_replicas(req)
    f1 = json.loads(line)
    assert line == json.dumps(f1) + "\n"
    assert {v["domain"] for v in f1["pfns"].values()} == {"lan"}
    assert [v["priority"] for v in f1["pfns"].values()] == [1, 2, 3]
    picked = list(catalog.list_replicas(ListRequest(dids=(("dune", "ds1"),), nrandom=1)))
    assert len(picked) == 1
    everything = ListRequest(dids=(("dune", "ds1"), ("dune", "f0.root")), resolve_parents=True)
    for line in catalog.list_replicas(everything):
        record = json.loads(line)
        assert line == json.dumps(record) + "\n"
        assert record["parents"] == ["dune:ds1"]


def _start_cli(args: list[str], tmp_path: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "prestaged.testing.rucio", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        pytest.fail(f"the emulator did not start: {proc.stderr.read() if proc.stderr else ''}")
    return proc, json.loads(line)


def test_cli_serves_a_synthetic_world_until_signalled(tmp_path: Path, pki: TestPKI) -> None:
    """``python -m prestaged.testing.rucio --synthetic N --pki-dir D`` prints its https URL,
    serves the files, and writes its statistics on SIGTERM."""
    stats = tmp_path / "stats.json"
    proc, info = _start_cli(["--synthetic", "1000", "--port", "0", "--stats-file", str(stats),
                             "--pki-dir", str(pki.root)], tmp_path)
    try:
        base: Optional[str] = info["base_url"]
        assert base is not None and base.startswith("https://127.0.0.1:")
        ca = str(pki.ca_dir)
        r = requests.get(f"{base}/auth/userpass", timeout=10, verify=ca, headers={
            "X-Rucio-Username": "root", "X-Rucio-Password": "secret"})
        listing = requests.post(f"{base}/replicas/list", timeout=10, verify=ca,
                                headers={"X-Rucio-Auth-Token": r.headers["X-Rucio-Auth-Token"]},
                                data=json.dumps({"dids": _dids("synthetic")}))
        assert len(listing.text.splitlines()) == 1000
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    written = json.loads(stats.read_text())
    assert written["dids_per_request"] == [1] and written["files_listed"] == 1000
    assert written["tokens_issued"] == {"userpass": 1}


def test_cli_refuses_synthetic_files_on_unknown_rses(capsys: pytest.CaptureFixture[str]) -> None:
    """A generated file on an RSE the spec lacks is one line on stderr and exit code 2."""
    assert main(["--synthetic", "5", "--synthetic-rses", "NOPE"]) == 2
    assert "unknown RSEs ['NOPE']" in capsys.readouterr().err


# ---- differential: the emulator against the REAL Rucio server, same spec -------------------

DIFF_SPEC: dict[str, Any] = {
    "scopes": ["dune"],
    "rses": [
        {"name": "DISK_RSE", "type": "DISK", "protocols": [
            {"scheme": "https", "hostname": "127.0.0.1", "port": 2880, "prefix": "/pnfs/dune"},
            {"scheme": "davs", "hostname": "127.0.0.1", "port": 2881, "prefix": "/pnfs/dune"}]},
        {"name": "TAPE_RSE", "type": "TAPE", "protocols": [
            {"scheme": "davs", "hostname": "127.0.0.1", "port": 2882, "prefix": "/tape"}]},
        {"name": "ND_RSE", "type": "DISK", "deterministic": False, "protocols": [
            {"scheme": "root", "hostname": "127.0.0.1", "port": 1094, "prefix": "/data"},
            {"scheme": "https", "hostname": "127.0.0.1", "port": 1095, "prefix": "/data"}]},
    ],
    "files": [
        {"scope": "dune", "name": "f1.root", "bytes": 100, "adler32": "0cc737eb",
         "replicas": {"DISK_RSE": f"{DISK}/raw/f1.root", "TAPE_RSE": None}},
        {"scope": "dune", "name": "f2.root", "bytes": 200, "adler32": "0cc737ec",
         "md5": "1" * 32, "replicas": {"TAPE_RSE": "davs://127.0.0.1:2882/tape/x/f2.root"}},
        {"scope": "dune", "name": "f3.root", "bytes": 300, "adler32": "0cc737ed",
         "replicas": {"ND_RSE": "https://127.0.0.1:1095/data/nd/f3.root"}},
        {"scope": "dune", "name": "bare.root", "bytes": 1, "adler32": "0cc737ee",
         "replicas": {}},
        *({"scope": "dune", "name": f"d{i}.root", "bytes": i, "adler32": "0cc737ef",
           "replicas": {"DISK_RSE": None, "ND_RSE": f"https://127.0.0.1:1095/data/d{i}.root"}}
          for i in range(3)),
    ],
    "datasets": [{"scope": "dune", "name": "ds1",
                  "files": ["dune:d0.root", "dune:d1.root", "dune:d2.root", "dune:bare.root"]}],
    "users": [{"account": "alice", "username": "alice", "password": "alice-pw"}],
}
DIFF_NAMES = ["f1.root", "f2.root", "f3.root", "bare.root", "nope.root", "ds1", "d1.root"]


@pytest.fixture(scope="module")
def jwt_issuer(pki: TestPKI) -> Iterator[TokenIssuer]:
    """A WLCG token issuer serving its discovery document and JWKS over HTTPS (test CA)."""
    issuer = TokenIssuer()
    server = ThreadedServer(
        lambda: IssuerServer(issuer, pki.server_ssl_context(require_client_cert=False)),
        "rucio-emulator-token-issuer")
    server.start()
    yield issuer
    server.stop()


@pytest.fixture(scope="module")
def real_and_emulated(pki: TestPKI, make_rucio_server: Callable[..., Any],
                      jwt_issuer: TokenIssuer) -> Iterator[tuple[str, str]]:
    """The base URLs of the REAL Rucio server and of the emulator, both loaded with
    DIFF_SPEC (HTTPS, test CA), both taking ``jwt_issuer``'s tokens of subject ``carol-sub``
    as account ``carol``."""
    real = make_rucio_server(DIFF_SPEC, oidc=[
        {"issuer": jwt_issuer.url, "sub": "carol-sub", "account": "carol"}])
    # The real kit adds root's identities itself: userpass root and the test user's DN.
    emulated_spec = {**DIFF_SPEC, "x509": [{"account": "root", "dn": USER_DN}]}
    with ThreadedRucioEmulator(
            emulated_spec, ssl_context=pki.server_ssl_context(require_client_cert=False),
            bearer=BearerCheck(jwt_issuer, audiences=["rucio"]),
            bearer_accounts={"carol-sub": "carol"}) as emu:
        yield real.url, emu.base_url
    real.stop()


def _ask(base: str, pki: TestPKI, body: dict[str, Any], query: str = ""
         ) -> tuple[int, Any]:
    """Log in as alice, POST /replicas/list; (status, records with rse_id replaced by the
    RSE name, or the error's class and first message line)."""
    s, ca = requests.Session(), str(pki.ca_dir)  # verify per request: the env beats a session's
    login = s.get(f"{base}/auth/userpass", timeout=30, verify=ca, headers={
        "X-Rucio-Username": "alice", "X-Rucio-Password": "alice-pw"})
    assert login.status_code == 200, login.text
    r = s.post(f"{base}/replicas/list{query}", data=json.dumps(body), timeout=60, verify=ca,
               stream=True,
               headers={"X-Rucio-Auth-Token": login.headers["X-Rucio-Auth-Token"]})
    if r.status_code != 200:
        if "ExceptionClass" not in r.headers:  # an uncaught non-Rucio exception: Flask's text
            return r.status_code, (r.headers["Content-Type"], r.text)
        doc = r.json()
        return r.status_code, (doc["ExceptionClass"], doc["ExceptionMessage"].splitlines()[0],
                               r.headers["ExceptionClass"])
    assert r.headers["Content-Type"] == "application/x-json-stream"
    try:
        text = r.text
    except requests.exceptions.ChunkedEncodingError:
        return 200, "stream broken off"
    records = [json.loads(line) for line in text.splitlines() if line]
    for rec in records:
        for entry in rec["pfns"].values():
            assert len(entry["rse_id"]) == 32
            entry["rse_id"] = entry["rse"]  # ids are random on the real server
    return 200, records


@pytest.mark.parametrize(("body", "query"), [
    ({}, ""),
    ({"schemes": ["davs", "https"], "domain": "wan"}, ""),
    ({"schemes": ["root"]}, ""),
    ({"schemes": ["root", "https", "davs"], "domain": "all"}, ""),
    ({"schemes": "https"}, ""),  # the rucio CLI's string: no PFN at all
    ({"rse_expression": "TAPE_RSE|ND_RSE"}, ""),
    ({"rse_expression": "rse_type=DISK\\ND_RSE"}, ""),
    ({"rse_expression": "(*)&deterministic=false"}, ""),
    ({"resolve_parents": True, "all_states": True}, ""),
    ({"rse_expression": "NO_SUCH_RSE"}, ""),
    ({"rse_expression": "DISK_RSE|"}, ""),
    ({"rse_expression": "rse_type=FOO"}, ""),
    ({}, "?sort=nearest"),  # bare.root sorts first, has no PFN: the error hits a later file
    ({"dids": [{"scope": "dune", "name": "f1.root"}]}, "?sort=nearest"),
    ({"dids": [{"scope": "dune", "name": "f2.root"}]}, "?sort=random"),  # one PFN: no dice
    ({"dids": [{"scope": "dune", "name": "f1.root", "did_type": "FILE"}]}, ""),
    ({"dids": []}, ""),
    ({"dids": [{"scope": "dune", "name": f"x{i}"} for i in range(1001)]}, ""),
    ({"dids": [{"scope": "dune", "name": "f1.root"}, "dune:f2.root"]}, ""),
    ({"dids": [{"scope": "dune"}]}, ""),
    ({"all_states": "maybe"}, ""),
    ({"client_location": "fnal"}, ""),  # dict.update refuses it: a 500 before anything else
    ({"client_location": None, "all_states": "maybe"}, ""),
    ({"client_location": [["site", "FNAL"]]}, ""),  # pairs are what dict.update takes
])
def test_emulator_answers_as_the_real_server(real_and_emulated: tuple[str, str], pki: TestPKI,
                                             body: dict[str, Any], query: str) -> None:
    """Same spec, same request: the emulator's records (or error class and message) equal the
    real Rucio 41.5.1 server's, PFN priorities and domains included."""
    doc = {"dids": [{"scope": "dune", "name": n} for n in DIFF_NAMES], **body}
    real, emulated = (_ask(base, pki, doc, query) for base in real_and_emulated)
    assert emulated == real


_LOGINS: list[tuple[str, dict[str, str], Optional[str]]] = [
    ("userpass", {"X-Rucio-Account": "alice", "X-Rucio-Username": "alice",
                  "X-Rucio-Password": "wrong"}, None),
    ("userpass", {"X-Rucio-Username": "nobody", "X-Rucio-Password": "x"}, None),
    ("userpass", {"X-Rucio-Username": "alice"}, None),
    ("userpass", {"X-Rucio-Account": "root", "X-Rucio-Username": "alice",
                  "X-Rucio-Password": "alice-pw"}, None),
    ("userpass", {"X-Rucio-Username": "alice", "X-Rucio-Password": "alice-pw"}, None),
    ("userpass", {"X-Rucio-Username": "alice", "X-Rucio-Password": "alice-pw",
                  "Accept": "application/json"}, None),
    ("x509", {}, None),
    ("x509", {}, "proxy"),
    ("x509_proxy", {"X-Rucio-Account": "alice"}, "proxy"),
    ("x509", {}, "stranger"),
]


@pytest.mark.parametrize(("path", "headers", "cert"), _LOGINS)
def test_logins_answer_as_the_real_server(real_and_emulated: tuple[str, str], pki: TestPKI,
                                          proxy: Path, tmp_path: Path, path: str,
                                          headers: dict[str, str], cert: Optional[str]) -> None:
    """Logins (good, wrong password, unknown identity, missing header, wrong account, a
    refused Accept, no certificate, a proxy, an unknown DN) get the real server's status,
    exception class and message, and on success the same account and token shape."""
    certs = {"proxy": str(proxy),
             "stranger": str(pki.make_proxy_for("Somebody Else", tmp_path / "other"))}

    def login(base: str) -> tuple[Any, ...]:
        r = requests.get(f"{base}/auth/{path}", headers=headers, timeout=30,
                         verify=str(pki.ca_dir), cert=certs[cert] if cert else None)
        if r.status_code != 200:
            return r.status_code, r.headers.get("ExceptionClass"), r.json()
        token = r.headers["X-Rucio-Auth-Token"]
        return (200, r.headers["X-Rucio-Auth-Account"], token.rsplit("-", 1)[0],
                len(token.rsplit("-", 1)[1]), r.headers["Content-Type"])

    real, emulated = (login(base) for base in real_and_emulated)
    assert emulated == real


def test_token_checks_answer_as_the_real_server(real_and_emulated: tuple[str, str],
                                                pki: TestPKI) -> None:
    """No token, an unknown token and /auth/validate give what the real server gives."""
    ca = str(pki.ca_dir)

    def check(base: str) -> list[Any]:
        login = requests.get(f"{base}/auth/userpass", timeout=30, verify=ca, headers={
            "X-Rucio-Username": "alice", "X-Rucio-Password": "alice-pw"})
        token = login.headers["X-Rucio-Auth-Token"]
        out: list[Any] = []
        for sent in ({}, {"X-Rucio-Auth-Token": "root-nobody-unknown-0"}):
            r = requests.post(f"{base}/replicas/list", data=json.dumps({"dids": []}),
                              headers=sent, timeout=30, verify=ca)
            out.append((r.status_code, r.json()))
        valid = requests.get(f"{base}/auth/validate", timeout=30, verify=ca,
                             headers={"X-Rucio-Auth-Token": token})
        out.append((valid.status_code, valid.text.split(", 'lifetime'")[0]))
        bad = requests.get(f"{base}/auth/validate", timeout=30, verify=ca,
                           headers={"X-Rucio-Auth-Token": "nonsense"})
        out.append((bad.status_code, bad.headers.get("ExceptionClass")))
        return out

    real, emulated = (check(base) for base in real_and_emulated)
    assert emulated == real


@pytest.mark.parametrize("claims", [
    {"subject": "carol-sub", "audience": "rucio", "scope": "openid profile"},
    {"subject": "carol-sub", "audience": ["rucio", "other"], "scope": "openid profile x"},
    {"subject": "nobody", "audience": "rucio", "scope": "openid profile"},
    {"subject": "carol-sub", "audience": "other", "scope": "openid profile"},
    {"subject": "carol-sub", "audience": "rucio", "scope": "openid"},
    {"subject": "carol-sub", "audience": "rucio", "scope": "openid profile", "lifetime": -60},
])
def test_jwts_are_judged_as_the_real_server_does(real_and_emulated: tuple[str, str],
                                                 pki: TestPKI, jwt_issuer: TokenIssuer,
                                                 claims: dict[str, Any]) -> None:
    """A JWT as X-Rucio-Auth-Token lists replicas on both servers or is refused by both
    (subject mapping, audience, scope, expiry)."""
    token = jwt_issuer.mint(**claims)

    def ask(base: str) -> tuple[int, Any]:
        r = requests.post(f"{base}/replicas/list", timeout=30, verify=str(pki.ca_dir),
                          headers={"X-Rucio-Auth-Token": token},
                          data=json.dumps({"dids": _dids("f2.root")}))
        return r.status_code, ([json.loads(x)["name"] for x in r.text.splitlines()]
                               if r.status_code == 200 else r.json())

    real, emulated = (ask(base) for base in real_and_emulated)
    assert emulated == real
