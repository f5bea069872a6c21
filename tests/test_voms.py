"""VOMS attributes in a proxy, made and read back by the real VOMS tools (Debian voms-clients):
``prestaged credentials`` shows the VO, FQANs, VOMS server and their own lifetime as
``voms-proxy-info -all`` does, and a run refuses a proxy whose attributes expired (or end within
``credentials.min_lifetime``), which a storage that maps by VO role would refuse too."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_runner import run_cli
from conftest import peer_missing

from prestaged.credentials import inspect_proxy
from prestaged.testing.pki import TestPKI
from prestaged.testing.voms import voms_proxy_fake, voms_proxy_info, voms_tools_available

FQANS = ["/dune/Role=Analysis/Capability=NULL", "/dune/Role=NULL/Capability=NULL"]


@pytest.fixture
def make(pki: TestPKI, tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``make(name, **voms_proxy_fake options)``: a VOMS proxy of the test user for VO dune,
    signed by a test host certificate as the VOMS server voms.example.org:15000."""
    if not voms_tools_available():
        peer_missing("voms-proxy-fake not found: install Debian package voms-clients")
    voms_cert, voms_key = pki.make_host_cert("voms.example.org")

    def make(name: str, **options: int) -> Path:
        return voms_proxy_fake(pki.user_cert, pki.user_key, tmp_path / name, ca_dir=pki.ca_dir,
                               voms_cert=voms_cert, voms_key=voms_key, vo="dune", fqans=FQANS,
                               **options)

    yield make


def test_credentials_shows_the_vo_roles_and_their_lifetime_as_voms_proxy_info_does(
        make: Callable[..., Path], pki: TestPKI) -> None:
    """Attributes valid 6 h in a 12 h proxy: the VO, both FQANs in order, the VOMS server's DN
    and URI, each as voms-proxy-info -all reads them; the proxy is usable for 6 h (the
    attributes end first), which is what a run logs and the daemon exports."""
    proxy = make("x509up_voms", hours=12, voms_hours=6)
    theirs = voms_proxy_info(proxy, ca_dir=pki.ca_dir)
    section = theirs[theirs.index(("VO", "dune")):]
    info = inspect_proxy(proxy)
    [voms] = info.voms
    assert (voms.vo, list(voms.fqans), voms.issuer, voms.uri) == (
        "dune", FQANS, "/CN=voms.example.org", "voms.example.org:15000")
    assert [v for k, v in section if k == "attribute"] == list(voms.fqans)
    assert ("issuer", voms.issuer) in section and ("uri", voms.uri) in section
    assert round((voms.not_after - voms.not_before).total_seconds()) == 6 * 3600
    assert info.usable_until == voms.not_after < info.not_after
    res = run_cli("credentials", "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir), "--json")
    assert res.returncode == 0, res.stderr
    [shown] = json.loads(res.stdout)["proxy"]["voms"]
    assert shown["fqans"] == FQANS and shown["vo"] == "dune"
    assert 6 * 3600 - 120 < shown["seconds_left"] <= 6 * 3600
    assert "as /dune/Role=Analysis/Capability=NULL, 5h5" in res.stderr  # the run's log line
    text = run_cli("credentials", "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir)).stdout
    assert "  === VO dune extension information ===\n" in text
    assert f"  attribute : {FQANS[0]}\n  attribute : {FQANS[1]}\n" in text


@pytest.mark.parametrize(("options", "said"), [
    ({"voms_hours": 1, "ac_started_ago": 7200}, "expired at "),
    ({"voms_hours": 1}, "left, less than credentials.min_lifetime (2h00m)"),
])
def test_a_run_refuses_a_proxy_whose_voms_attributes_expired_or_end_too_soon(
        make: Callable[..., Path], pki: TestPKI, tmp_path: Path, options: dict[str, int], said: str) -> None:
    """The proxy itself has 12 h, its attributes ended an hour ago (or end within
    min_lifetime): ``warm`` stops before any request with exit 3, one line naming the proxy,
    the VO and role, and the fix; ``credentials`` says the same."""
    proxy = make("x509up_short", hours=12, **options)
    urls = tmp_path / "ds.txt"
    urls.write_text("https://127.0.0.1:1/pnfs/a\n")
    for argv in (["warm", str(urls), "--no-state"], ["credentials"]):
        res = run_cli(*argv, "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir),
                      "--min-lifetime", "2h")
        assert res.returncode == 3, res.stderr
        [line] = [ln for ln in res.stderr.splitlines() if ln.startswith("prestaged: error:")]
        assert line.startswith(f"prestaged: error: proxy {proxy}: its VOMS attributes (dune, "
                               "/dune/Role=Analysis/Capability=NULL): "), line
        assert said in line and line.endswith("run voms-proxy-init -voms dune)" if "expired" in
                                              said else "; run voms-proxy-init -voms dune")


def test_a_proxy_without_voms_attributes_says_so(pki: TestPKI, proxy: Path) -> None:
    """A plain proxy (grid-proxy-init's kind): no attributes, a line saying a storage that maps
    by VO role sees none, and its own lifetime."""
    res = run_cli("credentials", "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir))
    assert res.returncode == 0, res.stderr
    assert "  VOMS      : none (a storage that maps by VO role sees none" in res.stdout
    assert inspect_proxy(proxy).voms == ()
