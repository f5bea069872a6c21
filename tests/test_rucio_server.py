"""The test kit's REAL Rucio server (``prestaged.testing.rucio_server``): it starts from a spec,
logs clients in by proxy and by password, and answers ``/replicas/list`` the way Rucio 41.5.1
does, including the edges our Rucio client must handle (files without replicas, unknown DIDs,
datasets, the 1,000-DID limit). What is pinned here is what the real server was seen to do."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import aiohttp
import pytest

from prestaged.testing.pki import TestPKI
from prestaged.testing.rucio_server import RucioServer, RucioServerError, rfc2253_dn
from prestaged.testing.threaded import ThreadedServer
from prestaged.testing.tokens import IssuerServer, TokenIssuer

DISK = {"name": "DISK_RSE", "type": "DISK", "protocols": [
    {"scheme": "https", "hostname": "127.0.0.1", "port": 2880, "prefix": "/pnfs/dune"},
    {"scheme": "davs", "hostname": "127.0.0.1", "port": 2881, "prefix": "/pnfs/dune"}]}
TAPE = {"name": "TAPE_RSE", "type": "TAPE", "protocols": [
    {"scheme": "davs", "hostname": "127.0.0.1", "port": 2882, "prefix": "/tape"}]}
NONDET = {"name": "ND_RSE", "type": "DISK", "deterministic": False, "protocols": [
    {"scheme": "root", "hostname": "127.0.0.1", "port": 1094, "prefix": "/data"},
    {"scheme": "https", "hostname": "127.0.0.1", "port": 1095, "prefix": "/data"}]}
F1_HTTPS = "https://127.0.0.1:2880/pnfs/dune/raw/f1.root"
F2_TAPE = "davs://127.0.0.1:2882/tape/x/f2.root"


def _file(name: str, replicas: dict[str, Any], size: int = 100) -> dict[str, Any]:
    return {"scope": "dune", "name": name, "bytes": size, "adler32": "0cc737eb",
            "replicas": replicas}


def _spec(second_user_dn: str) -> dict[str, Any]:
    return {
        "scopes": ["dune"],
        "rses": [DISK, TAPE, NONDET],
        "files": [
            _file("f1.root", {"DISK_RSE": F1_HTTPS, "TAPE_RSE": None}),
            _file("f2.root", {"TAPE_RSE": F2_TAPE}),
            _file("f3.root", {"ND_RSE": "root://127.0.0.1:1094/data/nd/f3.root"}),
            _file("bare.root", {}),
            *(_file(f"d{i}.root", {"DISK_RSE": None}) for i in range(3)),
        ],
        "datasets": [{"scope": "dune", "name": "ds1",
                      "files": ["dune:d0.root", "dune:d1.root", "dune:d2.root", "dune:bare.root"]}],
        "users": [{"account": "alice", "username": "alice", "password": "alice-pw"}],
        "x509": [{"account": "bob", "dn": second_user_dn}],
    }


TOKEN_SUBJECT = "prestaged-test-user"
# Rucio's defaults for [oidc] expected_scope and expected_audience.
TOKEN_SCOPE = "openid profile storage.read:/"
TOKEN_AUDIENCE = "rucio"


@pytest.fixture(scope="module")
def issuer(pki: TestPKI) -> Iterator[TokenIssuer]:
    """A WLCG token issuer serving its discovery document and JWKS over HTTPS (test CA)."""
    issuer = TokenIssuer()
    server = ThreadedServer(
        lambda: IssuerServer(issuer, pki.server_ssl_context(require_client_cert=False)),
        "rucio-token-issuer")
    server.start()
    yield issuer
    server.stop()


@pytest.fixture(scope="module")
def rucio(pki: TestPKI, issuer: TokenIssuer, make_rucio_server: Callable[..., RucioServer],
          ) -> Iterator[RucioServer]:
    """One real Rucio server for the module, loaded with ``_spec``; tokens of ``issuer`` for
    ``TOKEN_SUBJECT`` are account ``carol``'s."""
    pki.make_proxy_for("Second User")  # makes the second user's certificate
    second = rfc2253_dn(pki.root / "users" / "Second_User" / "usercert.pem")
    server = make_rucio_server(_spec(second), oidc=[
        {"issuer": issuer.url, "sub": TOKEN_SUBJECT, "account": "carol"}])
    yield server
    server.stop()


async def _token(http: aiohttp.ClientSession, server: RucioServer) -> str:
    """A userpass token of account root."""
    headers = {"X-Rucio-Account": "root", "X-Rucio-Username": server.root_username,
               "X-Rucio-Password": server.root_password}
    async with http.get(f"{server.url}/auth/userpass", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers["X-Rucio-Auth-Token"]


async def _list(http: aiohttp.ClientSession, server: RucioServer, names: list[str],
                **body: Any) -> list[dict[str, Any]]:
    """POST /replicas/list for ``dune:<name>`` DIDs; the parsed x-json-stream lines."""
    doc = {"dids": [{"scope": "dune", "name": n} for n in names],
           "schemes": ["davs", "https"], "domain": "wan", **body}
    headers = {"X-Rucio-Auth-Token": await _token(http, server)}
    async with http.post(f"{server.url}/replicas/list", json=doc, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"] == "application/x-json-stream"
        return [json.loads(line) for line in (await resp.text()).splitlines() if line]


# ---- logins ---------------------------------------------------------------------------------


async def test_x509_login_with_a_proxy_gives_a_root_token(rucio: RucioServer,
                                                          certified: aiohttp.ClientSession,
                                                          pki: TestPKI) -> None:
    """GET /auth/x509 with the test user's RFC 3820 proxy logs in as root: the server set
    SSL_CLIENT_S_DN from the proxy and Rucio stripped the proxy CN to the user's DN."""
    async with certified.get(f"{rucio.url}/auth/x509") as resp:
        assert resp.status == 200, await resp.text()
        token = resp.headers["X-Rucio-Auth-Token"]
        assert resp.headers["X-Rucio-Auth-Account"] == "root"
    assert rucio.root_dn == "CN=Test User,O=Test,DC=prestaged-test,DC=org"
    assert rucio.root_dn in token  # Rucio names the identity in x509 tokens
    async with certified.get(f"{rucio.url}/accounts/whoami",
                             headers={"X-Rucio-Auth-Token": token}) as resp:
        assert resp.status == 200, await resp.text()  # after the 303 to /accounts/root
        assert (await resp.json(content_type=None))["account"] == "root"


async def test_x509_login_maps_a_spec_dn_to_its_account(rucio: RucioServer, pki: TestPKI,
                                                        tmp_path: Path) -> None:
    """A second user's proxy logs in as ``bob``, the account the spec's ``x509`` gave its DN."""
    proxy = pki.make_proxy_for("Second User", tmp_path / "x509up_second")
    connector = aiohttp.TCPConnector(ssl=pki.client_ssl_context(proxy))
    async with aiohttp.ClientSession(connector=connector) as http, \
            http.get(f"{rucio.url}/auth/x509") as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["X-Rucio-Auth-Account"] == "bob"


async def test_x509_login_without_a_certificate_is_401(rucio: RucioServer,
                                                       anonymous: aiohttp.ClientSession) -> None:
    """Client certificates are optional at the TLS level; without one /auth/x509 is Rucio's
    own 401 CannotAuthenticate ("Cannot get DN")."""
    async with anonymous.get(f"{rucio.url}/auth/x509") as resp:
        assert resp.status == 401
        assert resp.headers["ExceptionClass"] == "CannotAuthenticate"
        assert "Cannot get DN" in (await resp.json(content_type=None))["ExceptionMessage"]


async def test_a_proxy_of_an_untrusted_ca_is_refused_in_the_handshake(
        rucio: RucioServer, pki: TestPKI, tmp_path: Path) -> None:
    """A certificate that is sent is verified: a proxy from another CA never gets a response."""
    proxy = pki.make_foreign_proxy(tmp_path / "x509up_foreign")
    connector = aiohttp.TCPConnector(ssl=pki.client_ssl_context(proxy))
    async with aiohttp.ClientSession(connector=connector) as http:
        with pytest.raises(aiohttp.ClientError):
            async with http.get(f"{rucio.url}/auth/x509") as resp:
                await resp.read()


async def test_userpass_login_for_root_and_a_spec_user(rucio: RucioServer,
                                                       anonymous: aiohttp.ClientSession) -> None:
    """Userpass needs no certificate: root with ``root_password``, ``alice`` from the spec."""
    assert await _token(anonymous, rucio)
    headers = {"X-Rucio-Account": "alice", "X-Rucio-Username": "alice",
               "X-Rucio-Password": "alice-pw"}
    async with anonymous.get(f"{rucio.url}/auth/userpass", headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["X-Rucio-Auth-Account"] == "alice"
        assert resp.headers["X-Rucio-Auth-Token"].startswith("alice-alice-")


async def test_a_wrong_password_is_401_with_rucio_exception_class(
        rucio: RucioServer, anonymous: aiohttp.ClientSession) -> None:
    """A wrong password: 401, header ExceptionClass CannotAuthenticate and the same in a JSON
    body; no token."""
    headers = {"X-Rucio-Account": "root", "X-Rucio-Username": rucio.root_username,
               "X-Rucio-Password": "not-" + rucio.root_password}
    async with anonymous.get(f"{rucio.url}/auth/userpass", headers=headers) as resp:
        assert resp.status == 401
        assert resp.headers["ExceptionClass"] == "CannotAuthenticate"
        assert "X-Rucio-Auth-Token" not in resp.headers
        body = await resp.json(content_type=None)
        assert body["ExceptionClass"] == "CannotAuthenticate"


async def test_replicas_list_without_a_token_is_401(rucio: RucioServer,
                                                    anonymous: aiohttp.ClientSession) -> None:
    """Listing needs a token: an invalid one is 401 CannotAuthenticate."""
    doc = {"dids": [{"scope": "dune", "name": "f1.root"}]}
    async with anonymous.post(f"{rucio.url}/replicas/list", json=doc,
                              headers={"X-Rucio-Auth-Token": "root-root-bogus"}) as resp:
        assert resp.status == 401
        assert resp.headers["ExceptionClass"] == "CannotAuthenticate"


async def test_a_wlcg_jwt_of_a_listed_issuer_is_a_rucio_token(
        rucio: RucioServer, issuer: TokenIssuer, anonymous: aiohttp.ClientSession) -> None:
    """A JWT from an issuer in idpsecrets, with Rucio's expected scope and audience, works as
    X-Rucio-Auth-Token (signature checked against the issuer's JWKS) for the account its
    "SUB=..., ISS=..." identity maps to."""
    token = issuer.mint(TOKEN_SCOPE, audience=TOKEN_AUDIENCE, subject=TOKEN_SUBJECT)
    async with anonymous.get(f"{rucio.url}/accounts/whoami",
                             headers={"X-Rucio-Auth-Token": token}) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json(content_type=None))["account"] == "carol"
    doc = {"dids": [{"scope": "dune", "name": "f2.root"}], "schemes": ["davs"]}
    async with anonymous.post(f"{rucio.url}/replicas/list", json=doc,
                              headers={"X-Rucio-Auth-Token": token}) as resp:
        assert resp.status == 200
        assert F2_TAPE in (await resp.text())


@pytest.mark.parametrize("change", [
    {"audience": "https://wlcg.cern.ch/jwt/v1/any"},
    {"scope": "storage.read:/"},
    {"foreign_key": True},
    {"lifetime": -60.0},
    {"subject": "someone-else"},
])
async def test_a_jwt_rucio_cannot_accept_is_401(rucio: RucioServer, issuer: TokenIssuer,
                                                anonymous: aiohttp.ClientSession,
                                                change: dict[str, Any]) -> None:
    """Another audience, a scope without Rucio's expected one, a key not in the JWKS, an
    expired token or a subject with no identity: each is 401 CannotAuthenticate."""
    kwargs: dict[str, Any] = {"scope": TOKEN_SCOPE, "audience": TOKEN_AUDIENCE,
                              "subject": TOKEN_SUBJECT, **change}
    token = issuer.mint(kwargs.pop("scope"), **kwargs)
    async with anonymous.get(f"{rucio.url}/accounts/whoami",
                             headers={"X-Rucio-Auth-Token": token}) as resp:
        assert resp.status == 401
        assert resp.headers["ExceptionClass"] == "CannotAuthenticate"


# ---- /replicas/list ---------------------------------------------------------------------------


async def test_replicas_list_gives_pfns_with_rse_type_and_priority(
        rucio: RucioServer, anonymous: aiohttp.ClientSession) -> None:
    """f1 on DISK (explicit https PFN; its davs PFN has the same path) and TAPE (Rucio's hash
    path): every PFN names its RSE, DISK/TAPE, the wan domain and a distinct priority 1..n;
    https ranks before davs on DISK_RSE (protocol order)."""
    [f1] = await _list(anonymous, rucio, ["f1.root"])
    assert (f1["scope"], f1["name"], f1["bytes"], f1["adler32"]) == ("dune", "f1.root", 100,
                                                                     "0cc737eb")
    pfns = f1["pfns"]
    disk_davs = "davs://127.0.0.1:2881/pnfs/dune/raw/f1.root"
    assert {url: (p["rse"], p["type"], p["domain"]) for url, p in pfns.items()
            if p["rse"] == "DISK_RSE"} == {F1_HTTPS: ("DISK_RSE", "DISK", "wan"),
                                           disk_davs: ("DISK_RSE", "DISK", "wan")}
    [tape_url] = [url for url, p in pfns.items() if p["type"] == "TAPE"]
    assert tape_url.startswith("davs://127.0.0.1:2882/tape/dune/")  # /tape/dune/xx/yy/f1.root
    assert tape_url.endswith("/f1.root") and pfns[tape_url]["rse"] == "TAPE_RSE"
    assert sorted(p["priority"] for p in pfns.values()) == [1, 2, 3]
    assert pfns[F1_HTTPS]["priority"] < pfns[disk_davs]["priority"]
    assert f1["rses"] == {"DISK_RSE": [F1_HTTPS, disk_davs], "TAPE_RSE": [tape_url]}
    assert f1["states"] == {"DISK_RSE": "AVAILABLE", "TAPE_RSE": "AVAILABLE"}
    # Sorting did not try to fetch a GeoIP database (it prints that to the log when it does).
    assert "GeoLite" not in rucio.log_path.read_text()


async def test_schemes_filter_pfns_but_not_states(rucio: RucioServer,
                                                  anonymous: aiohttp.ClientSession) -> None:
    """Asking for https only drops the davs PFNs (the TAPE one included), yet ``states`` still
    names every RSE holding the file."""
    [f1] = await _list(anonymous, rucio, ["f1.root"], schemes=["https"])
    assert list(f1["pfns"]) == [F1_HTTPS]
    assert set(f1["states"]) == {"DISK_RSE", "TAPE_RSE"}


async def test_unknown_dids_are_left_out(rucio: RucioServer,
                                         anonymous: aiohttp.ClientSession) -> None:
    """An unknown DID is silently left out of the stream, not answered empty nor refused."""
    answer = await _list(anonymous, rucio, ["nope.root", "f2.root", "also-nope"])
    assert [(r["name"], list(r["pfns"])) for r in answer] == [("f2.root", [F2_TAPE])]
    assert answer[0]["pfns"][F2_TAPE]["type"] == "TAPE"


@pytest.mark.parametrize("all_states", [False, True])
async def test_a_file_without_replicas_comes_with_empty_pfns(
        rucio: RucioServer, anonymous: aiohttp.ClientSession, all_states: bool) -> None:
    """A file registered with no replica is answered (not left out) with empty pfns, rses and
    states, whether or not all_states is set."""
    answer = await _list(anonymous, rucio, ["bare.root"], all_states=all_states)
    assert answer == [{"scope": "dune", "name": "bare.root", "bytes": 100, "md5": None,
                       "adler32": "0cc737eb", "pfns": {}, "rses": {}, "states": {}}]


@pytest.mark.parametrize("all_states", [False, True])
async def test_a_dataset_expands_to_its_files_with_replicas(
        rucio: RucioServer, anonymous: aiohttp.ClientSession, all_states: bool) -> None:
    """A dataset DID is answered with one line per attached file that has a replica; its file
    without any replica is left out (unlike the same file asked for by name), and a file asked
    for both directly and through the dataset comes once."""
    answer = await _list(anonymous, rucio, ["ds1"], all_states=all_states)
    assert sorted(r["name"] for r in answer) == ["d0.root", "d1.root", "d2.root"]
    assert all(next(iter(r["pfns"].values()))["rse"] == "DISK_RSE" for r in answer)
    both = await _list(anonymous, rucio, ["d1.root", "ds1"])
    assert sorted(r["name"] for r in both) == ["d0.root", "d1.root", "d2.root"]


async def test_a_non_deterministic_rse_serves_the_registered_path(
        rucio: RucioServer, anonymous: aiohttp.ClientSession) -> None:
    """On a non-deterministic RSE Rucio parses the registered PFN itself: https gives it back
    as registered, while root:// comes back with a doubled slash after the prefix (Rucio's
    xrootd join keeps the parsed path's leading '/')."""
    [f3] = await _list(anonymous, rucio, ["f3.root"], schemes=["root", "https"])
    assert set(f3["pfns"]) == {"https://127.0.0.1:1095/data/nd/f3.root",
                               "root://127.0.0.1:1094/data//nd/f3.root"}


async def test_more_than_1000_dids_is_400_invalid_object(
        rucio: RucioServer, anonymous: aiohttp.ClientSession) -> None:
    """The request schema caps ``dids`` at 1,000: 1,001 is 400 InvalidObject before any
    lookup, so a client must chunk."""
    doc = {"dids": [{"scope": "dune", "name": f"n{i}"} for i in range(1001)]}
    headers = {"X-Rucio-Auth-Token": await _token(anonymous, rucio)}
    async with anonymous.post(f"{rucio.url}/replicas/list", json=doc, headers=headers) as resp:
        assert resp.status == 400
        assert resp.headers["ExceptionClass"] == "InvalidObject"


def test_the_real_rucio_client_lists_replicas(rucio: RucioServer, tmp_path: Path,
                                              proxy: Path, monkeypatch: pytest.MonkeyPatch,
                                              ) -> None:
    """rucio.client.ReplicaClient (the REAL client, in this process) logs in with the test
    proxy and gets f1's DISK and TAPE PFNs and nothing for an unknown DID."""
    from rucio.client.replicaclient import ReplicaClient
    from rucio.common import config as rucio_config

    cfg = tmp_path / "rucio.cfg"
    cfg.write_text(f"[client]\nrucio_host = {rucio.url}\nauth_host = {rucio.url}\n"
                   f"auth_type = x509_proxy\naccount = root\nca_cert = {rucio.ca_file}\n"
                   f"client_x509_proxy = {proxy}\n"
                   f"auth_token_file_path = {tmp_path / 'tokens' / 'token'}\n")
    monkeypatch.setenv("RUCIO_CONFIG", str(cfg))
    rucio_config.clean_cached_config()  # the config is read once per process
    try:
        client = ReplicaClient()
        answer = list(client.list_replicas([{"scope": "dune", "name": "f1.root"},
                                            {"scope": "dune", "name": "nope"}],
                                           schemes=["davs", "https"]))
    finally:
        rucio_config.clean_cached_config()
    assert [r["name"] for r in answer] == ["f1.root"]
    assert {p["type"] for p in answer[0]["pfns"].values()} == {"DISK", "TAPE"}
    assert F1_HTTPS in answer[0]["pfns"]


# ---- lifecycle --------------------------------------------------------------------------------


def _refused(port: int) -> bool:
    """True once nothing listens on the port. A reset is a listener closing with our connection
    still in its backlog: it is going away but has not gone, so that is not yet refused."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False
    return False


@pytest.mark.slow
async def test_a_thousand_files_bootstrap_list_and_stop(
        make_rucio_server: Callable[..., RucioServer], anonymous: aiohttp.ClientSession) -> None:
    """1,000 files on two RSEs load at start-up (timings reported), one request lists all of
    them with both replicas, and after stop() the port refuses connections."""
    names = [f"g{i:04d}.root" for i in range(1000)]
    spec = {"scopes": ["dune"], "rses": [DISK, TAPE],
            "files": [_file(n, {"DISK_RSE": None, "TAPE_RSE": None}) for n in names]}
    started = time.monotonic()
    server = make_rucio_server(spec)
    print(f"start {time.monotonic() - started:.2f} s, subprocess timings {server.timings}")
    assert set(server.timings) == {"imports", "bootstrap", "total"}
    port = server.port
    started = time.monotonic()
    answer = await _list(anonymous, server, names)
    print(f"list of 1,000 DIDs {time.monotonic() - started:.2f} s")
    assert sorted(r["name"] for r in answer) == names
    assert all({p["type"] for p in r["pfns"].values()} == {"DISK", "TAPE"} for r in answer)
    server.stop()
    assert _refused(port)


_ORPHAN_PARENT = """
import sys
from pathlib import Path
from prestaged.testing.pki import load_pki
from prestaged.testing.rucio_server import RucioServer
server = RucioServer(load_pki(Path(sys.argv[1])), {"scopes": ["dune"]}, Path(sys.argv[2]))
server.start()
print(server.port, flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
def test_the_server_exits_when_its_parent_is_killed(pki: TestPKI, tmp_path: Path) -> None:
    """A test run killed with SIGKILL leaves no Rucio server behind: the server notices its
    parent's end (stdin EOF) and stops listening."""
    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN_PARENT, str(pki.root),
                               str(tmp_path / "rucio")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(parent.stdout.readline()) if parent.stdout else 0
        assert port and not _refused(port)
    finally:
        parent.kill()
        parent.wait(timeout=30)
    deadline = time.monotonic() + 30
    while not _refused(port):
        assert time.monotonic() < deadline, "the orphaned Rucio server still listens"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_server_that_fails_to_start_says_why(
        make_rucio_server: Callable[..., RucioServer]) -> None:
    """A spec Rucio itself refuses (two identical protocols on one RSE) ends start() with a
    RucioServerError carrying the log tail, as soon as the subprocess dies."""
    proto = {"scheme": "https", "hostname": "127.0.0.1", "port": 2880, "prefix": "/x"}
    spec = {"rses": [{"name": "DUP_RSE", "type": "DISK", "protocols": [proto, proto]}]}
    with pytest.raises(RucioServerError, match=r"exited \(1\) before it was ready(.|\n)*"
                                               r"Duplicate"):
        make_rucio_server(spec, startup_timeout=120)
