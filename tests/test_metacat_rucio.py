"""MetaCat datasets resolved through the REAL Rucio server, then warmed on the test storage.

One real Rucio 41.5.1 (``prestaged.testing.rucio_server``: SQLite, TLS, X.509 login) serves the
module, with a DISK RSE (https) and a TAPE RSE (davs) both on the test storage, an RSE reachable
only over root://, and files on disk, on tape only, on both, and without any replica. The MetaCat
emulator (held to the real metacat-client in tests/test_metacat_emulator.py) lists a dataset of
those files plus one Rucio does not know. ``prestaged warm|files --catalog metacat`` run
in-process through ``main``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from cli_runner import run_cli

from prestaged.catalog.metacat import MetaCatCatalog
from prestaged.cli import main
from prestaged.config import CatalogConfig, MetaCatConfig, RucioConfig
from prestaged.errors import CredentialError
from prestaged.testing.metacat import ThreadedMetaCatServer
from prestaged.testing.pki import TestPKI
from prestaged.testing.rucio_server import RucioServer
from prestaged.testing.storage import ThreadedStorageServer
from prestaged.testing.threaded import ThreadedServer
from prestaged.testing.tokens import IssuerServer, TokenIssuer, write_token
from prestaged.tokens import FoundToken, TokenSource

DATASET = "dune:np04-e2e"
DISK_PREFIX = "/pnfs/dune/persistent"
TAPE_PREFIX = "/pnfs/dune/tape_backed"
ON_DISK = [f"disk_{i:03d}.root" for i in range(40)]
ON_TAPE = [f"tape_{i:03d}.root" for i in range(8)]
ON_BOTH = [f"both_{i:03d}.root" for i in range(4)]
BARE = "bare.root"  # registered in Rucio without any replica
ROOT_ONLY = "rootonly.root"  # a replica reachable over root:// only
UNKNOWN = "unknown.root"  # in MetaCat, not in Rucio
TOKEN_SUBJECT = "prestaged-e2e"
TOKEN_SCOPE = "openid profile storage.read:/"  # Rucio's default expected scope, plus ours
TOKEN_AUDIENCE = "rucio"


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("X509_USER_PROXY", "X509_CERT_DIR", "PRESTAGED_CONFIG", "METACAT_SERVER_URL",
                 "RUCIO_ACCOUNT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def module_storage(pki: TestPKI) -> Iterator[ThreadedStorageServer]:
    """The test storage for the module (its port is in Rucio's RSE protocols)."""
    with ThreadedStorageServer(pki.server_ssl_context()) as srv:
        yield srv


@pytest.fixture(scope="module")
def issuer(pki: TestPKI) -> Iterator[TokenIssuer]:
    issuer = TokenIssuer()
    server = ThreadedServer(
        lambda: IssuerServer(issuer, pki.server_ssl_context(require_client_cert=False)),
        "e2e-token-issuer")
    server.start()
    yield issuer
    server.stop()


def _spec(port: int) -> dict[str, Any]:
    def file(name: str, replicas: dict[str, Any]) -> dict[str, Any]:
        return {"scope": "dune", "name": name, "bytes": 1000, "adler32": "0cc737eb",
                "replicas": replicas}

    return {
        "scopes": ["dune"],
        "rses": [
            {"name": "FNAL_DISK", "type": "DISK", "protocols": [
                {"scheme": "https", "hostname": "127.0.0.1", "port": port,
                 "prefix": DISK_PREFIX}]},
            {"name": "FNAL_TAPE", "type": "TAPE", "protocols": [
                {"scheme": "davs", "hostname": "127.0.0.1", "port": port,
                 "prefix": TAPE_PREFIX}]},
            {"name": "CERN_EOS", "type": "DISK", "protocols": [
                {"scheme": "root", "hostname": "127.0.0.1", "port": 1094, "prefix": "/eos"}]},
        ],
        "files": [
            *(file(n, {"FNAL_DISK": None}) for n in ON_DISK),
            *(file(n, {"FNAL_TAPE": None}) for n in ON_TAPE),
            *(file(n, {"FNAL_DISK": None, "FNAL_TAPE": None}) for n in ON_BOTH),
            file(BARE, {}),
            file(ROOT_ONLY, {"CERN_EOS": None}),
        ],
        "datasets": [],
    }


@pytest.fixture(scope="module")
def rucio(module_storage: ThreadedStorageServer, issuer: TokenIssuer,
          make_rucio_server: Callable[..., RucioServer]) -> Iterator[RucioServer]:
    server = make_rucio_server(_spec(module_storage.door_port), oidc=[
        {"issuer": issuer.url, "sub": TOKEN_SUBJECT, "account": "root"}])
    yield server
    server.stop()


MEMBERS = [*ON_DISK, *ON_TAPE, *ON_BOTH, BARE, ROOT_ONLY, UNKNOWN]


@pytest.fixture(scope="module")
def metacat(pki: TestPKI) -> Iterator[ThreadedMetaCatServer]:
    files = [{"namespace": "dune", "name": n, "size": 1000,
              "metadata": {"core.data_tier": "raw" if n.startswith("disk") else "reco"}}
             for n in MEMBERS]
    with ThreadedMetaCatServer(datasets={DATASET: files},
                               ssl_context=pki.server_ssl_context(require_client_cert=False)
                               ) as server:
        yield server


def _config(tmp_path: Path, metacat: ThreadedMetaCatServer, rucio: RucioServer,
            rucio_extra: str = "") -> Path:
    path = tmp_path / "prestaged.toml"
    path.write_text(
        '[catalog]\ndefault = "metacat"\n'
        f'[catalog.metacat]\nurl = "{metacat.base_url}"\nretry_for = 0\n'
        f'[catalog.rucio]\nurl = "{rucio.url}"\nretry_for = 0\nchunk = 16\n{rucio_extra}')
    return path


def _args(config: Path, proxy: Path, pki: TestPKI, *more: str) -> list[str]:
    return [*more, "--config", str(config), "--proxy", str(proxy), "--no-state",
            "--ca-dir", str(pki.ca_dir)]


def _name_of(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def test_warm_resolves_through_the_real_rucio_and_reports_the_unresolved(
        pki: TestPKI, proxy: Path, module_storage: ThreadedStorageServer,
        metacat: ThreadedMetaCatServer, rucio: RucioServer, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Every file with an https/davs replica is touched once, from DISK when it has a disk
    copy and from TAPE otherwise (davs touched as https); the three without one are
    unresolved with their reasons, and make the exit code 1."""
    module_storage.stats.paths.clear()
    config = _config(tmp_path, metacat, rucio)
    code = main(["warm", DATASET, "--json", *_args(config, proxy, pki)])
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert code == 1 and doc["catalog"] == "metacat", captured.err
    assert doc["counts"]["warm"] == len(ON_DISK) + len(ON_TAPE) + len(ON_BOTH)
    touched = {p: s.requests for p, s in module_storage.stats.paths.items()}
    assert all(n == 1 for n in touched.values())
    by_name = {_name_of(p): p for p in touched}
    assert set(by_name) == {*ON_DISK, *ON_TAPE, *ON_BOTH}
    assert all(by_name[n].startswith(DISK_PREFIX + "/") for n in [*ON_DISK, *ON_BOTH])
    assert all(by_name[n].startswith(TAPE_PREFIX + "/") for n in ON_TAPE)
    reasons = {u["name"]: u["reason"] for u in doc["unresolved"]}
    assert doc["unresolved_count"] == 3
    assert reasons == {
        f"dune:{UNKNOWN}": "Rucio does not know the file",
        f"dune:{BARE}": "Rucio lists no available https or davs replica",
        f"dune:{ROOT_ONLY}": "Rucio has no https or davs replica of it",
    }
    where = {u["name"]: u["locations"] for u in doc["unresolved"]}
    assert where[f"dune:{ROOT_ONLY}"] == ["CERN_EOS"]


def test_files_lists_the_urls_of_an_mql_query(
        pki: TestPKI, proxy: Path, metacat: ThreadedMetaCatServer, rucio: RucioServer,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--mql (paged as the client pages it) selects by metadata; only those files are asked
    of Rucio and listed, all resolved: exit 0."""
    config = _config(tmp_path, metacat, rucio)
    config.write_text(config.read_text().replace("retry_for = 0\n[catalog.rucio]",
                                                 "retry_for = 0\npage = 7\n[catalog.rucio]"))
    before = metacat.stats.requests["query"]
    code = main(["files", "--mql", f"files from {DATASET} where core.data_tier = 'raw'",
                 "--config", str(config), "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir)])
    out = capsys.readouterr().out.split()
    assert code == 0
    assert sorted(_name_of(u) for u in out) == sorted(ON_DISK)
    assert all(u.startswith("https://127.0.0.1:") and DISK_PREFIX in u for u in out)
    # 40 files in pages of 7: five full pages, then a short one (5 files) ends the query.
    assert metacat.stats.requests["query"] - before == 6


def test_userpass_login_to_the_real_rucio(
        metacat: ThreadedMetaCatServer, rucio: RucioServer, pki: TestPKI,
        tmp_path: Path) -> None:
    """A userpass identity resolves without any proxy (MetaCat read anonymously)."""
    secret = tmp_path / "rucio-password"
    secret.write_text(rucio.root_password + "\n")
    cfg = CatalogConfig(
        metacat=MetaCatConfig(url=metacat.base_url, auth="none"),
        rucio=RucioConfig(url=rucio.url, auth="userpass", username=rucio.root_username,
                          account="root", password_file=secret, retry_for=0))
    from prestaged.catalog.http import catalog_ssl_context

    catalog = MetaCatCatalog(DATASET, cfg, catalog_ssl_context(None, pki.ca_dir), env={})
    refs = _drain(catalog)
    assert len(refs) == len(ON_DISK) + len(ON_TAPE) + len(ON_BOTH)
    assert catalog.unresolved_count == 3


def test_a_wrong_password_is_exit_3_quoting_rucio_and_never_showing_it(
        metacat: ThreadedMetaCatServer, rucio: RucioServer, pki: TestPKI, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "rucio-password"
    secret.write_text("not-the-password-xyzzy\n")
    config = _config(tmp_path, metacat, rucio,
                     f'auth = "userpass"\nusername = "{rucio.root_username}"\n'
                     f'account = "root"\npassword_file = "{secret}"\n')
    code = main(["files", DATASET, "--config", str(config), "--ca-dir", str(pki.ca_dir),
                 "--proxy", str(tmp_path / "no-proxy")])
    captured = capsys.readouterr()
    assert code == 3, captured.err
    line = [ln for ln in captured.err.splitlines() if ln.startswith("prestaged: error:")]
    assert len(line) == 1 and "Traceback" not in captured.err
    assert "refused logging in (userpass, account root)" in line[0]
    assert "CannotAuthenticate" in line[0] and "user root" in line[0]
    assert "xyzzy" not in captured.err + captured.out


def test_a_proxy_rucio_does_not_know_is_exit_3_naming_the_dn(
        pki: TestPKI, metacat: ThreadedMetaCatServer, rucio: RucioServer, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    stranger = pki.make_proxy_for("Stranger Danger", tmp_path / "x509up_stranger")
    config = _config(tmp_path, metacat, rucio)
    code = main(["files", DATASET, "--config", str(config), "--proxy", str(stranger),
                 "--ca-dir", str(pki.ca_dir)])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "refused logging in (x509)" in err and "Stranger Danger" in err
    # What the real Rucio 41.5.1 answers for a DN it has no identity of.
    assert "HTTP 401 IdentityError" in err and "does not exist" in err


def _drain(catalog: MetaCatCatalog) -> list[Any]:
    import asyncio

    async def go() -> list[Any]:
        return [ref async for ref in catalog.files()]

    return asyncio.run(go())


def test_a_wlcg_token_is_sent_to_the_real_rucio_as_its_auth_token(
        metacat: ThreadedMetaCatServer, rucio: RucioServer, issuer: TokenIssuer,
        pki: TestPKI, tmp_path: Path) -> None:
    """auth = "auto" with a token: no login request; the JWT itself is X-Rucio-Auth-Token,
    and the real Rucio checks it against the issuer's keys."""
    path = write_token(tmp_path / "bt", issuer.mint(TOKEN_SCOPE, audience=TOKEN_AUDIENCE,
                                                     subject=TOKEN_SUBJECT))
    token = TokenSource(FoundToken(path.read_text().strip(), "--token-file", path))
    cfg = CatalogConfig(metacat=MetaCatConfig(url=metacat.base_url, auth="none"),
                        rucio=RucioConfig(url=rucio.url, retry_for=0))
    from prestaged.catalog.http import catalog_ssl_context

    catalog = MetaCatCatalog(DATASET, cfg, catalog_ssl_context(None, pki.ca_dir), token=token,
                             env={})
    refs = _drain(catalog)
    assert len(refs) == len(ON_DISK) + len(ON_TAPE) + len(ON_BOTH)

    wrong = TokenSource(FoundToken(issuer.mint(TOKEN_SCOPE, audience="someone-else",
                                               subject=TOKEN_SUBJECT), "$BEARER_TOKEN", None))
    refused = MetaCatCatalog(DATASET, cfg, catalog_ssl_context(None, pki.ca_dir), token=wrong,
                             env={})
    with pytest.raises(CredentialError, match=r"refused listing the replicas of \d+ files "
                                              r"for its default account with token"):
        _drain(refused)


def test_demo_with_the_metacat_catalog() -> None:
    """`prestaged demo --catalog metacat` resolves through both emulators (X.509 login to
    Rucio with the demo proxy) and warms every file."""
    res = run_cli("demo", "--catalog", "metacat", "--files", "1200",
                  clean=("X509_", "PRESTAGED_", "METACAT_", "RUCIO_", "BEARER_TOKEN"))
    assert res.returncode == 0, res.stderr
    assert "warm           1200" in res.stdout
    assert "(metacat catalog: https://127.0.0.1:" in res.stdout
    # 1,200 files in chunks of 500: three replica listings after one X.509 login.
    assert "Rucio 3 replica listings (up to 500 files each) after 1 X.509 login" in res.stdout
    assert "the storage saw 1200 requests" in res.stdout
