"""Tests for bearer tokens: discovery order, inspection, refusal before any request, renewal
of the token file, the credentials method, and `prestaged credentials`."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cli_runner import run_cli

from prestaged.credentials import CredentialError, load_credentials
from prestaged.testing.pki import TestPKI
from prestaged.testing.tokens import TokenIssuer, write_token
from prestaged.tokens import (
    FoundToken,
    ScopeWarner,
    TokenSource,
    check_token,
    find_token,
    inspect_token,
    scope_covers,
    token_locations,
)

UID = 987_654  # a uid nobody has: /tmp/bt_u987654 is the test's own


@pytest.fixture(scope="module")
def issuer() -> TokenIssuer:
    """One issuer (one ES256 key) for the module."""
    return TokenIssuer("https://localhost:8443/issuer")


@pytest.fixture
def tmp_default() -> Iterator[Path]:
    """``/tmp/bt_u<UID>``, removed afterwards."""
    path = Path(f"/tmp/bt_u{UID}")
    path.unlink(missing_ok=True)
    yield path
    path.unlink(missing_ok=True)


def _no_text(token: str, *texts: str) -> None:
    """Neither the token nor its signature appears in any of ``texts``."""
    signature = token.rsplit(".", 1)[1]
    for text in texts:
        assert token not in text and signature not in text


# --- discovery -------------------------------------------------------------------------------


def test_discovery_order_follows_the_wlcg_spec(issuer: TokenIssuer, tmp_path: Path,
                                               tmp_default: Path) -> None:
    """--token-file, token_file, $BEARER_TOKEN, $BEARER_TOKEN_FILE, $XDG_RUNTIME_DIR/bt_u<uid>,
    /tmp/bt_u<uid>: each wins over those after it."""
    runtime = tmp_path / "run"
    runtime.mkdir()
    files = {name: write_token(tmp_path / name, issuer.mint(subject=name))
             for name in ("cli", "conf", "envfile")}
    write_token(runtime / f"bt_u{UID}", issuer.mint(subject="runtime"))
    write_token(tmp_default, issuer.mint(subject="tmp"))
    env = {"BEARER_TOKEN": issuer.mint(subject="env"), "BEARER_TOKEN_FILE": str(files["envfile"]),
           "XDG_RUNTIME_DIR": str(runtime)}
    order = [("cli", files["cli"], files["conf"], env), ("conf", None, files["conf"], env),
             ("env", None, None, env)]
    for subject, cli, conf, environ in order:
        found = find_token(cli, conf, environ, UID)
        assert found is not None and found.inspect().subject == subject
    del env["BEARER_TOKEN"]
    assert (found := find_token(None, None, env, UID)) and found.source == "$BEARER_TOKEN_FILE"
    del env["BEARER_TOKEN_FILE"]
    assert (found := find_token(None, None, env, UID)) and found.inspect().subject == "runtime"
    del env["XDG_RUNTIME_DIR"]
    assert (found := find_token(None, None, env, UID)) and found.inspect().subject == "tmp"
    tmp_default.unlink()
    assert find_token(None, None, env, UID) is None
    assert [source for source, _, _ in token_locations(None, None, {}, UID)] == [
        "$BEARER_TOKEN", "default /tmp/bt_u<uid>"]


def test_whitespace_is_stripped_and_empty_values_skipped(issuer: TokenIssuer,
                                                         tmp_path: Path) -> None:
    """An empty $BEARER_TOKEN and an empty file are skipped; surrounding whitespace goes."""
    token = issuer.mint()
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    padded = tmp_path / "padded"
    padded.write_text(f"\n  {token} \n\n")
    found = find_token(None, None, {"BEARER_TOKEN": "   ", "BEARER_TOKEN_FILE": str(empty),
                                    "XDG_RUNTIME_DIR": str(tmp_path)}, UID)
    assert found is None
    found = find_token(None, None, {"BEARER_TOKEN_FILE": str(padded)}, UID)
    assert found is not None and found.text == token


def test_an_empty_file_named_to_prestaged_is_an_error_not_a_way_to_another_token(
        issuer: TokenIssuer, tmp_path: Path) -> None:
    """An empty --token-file or credentials.token_file was skipped with a DEBUG line, and a
    token found further on ($BEARER_TOKEN: perhaps another identity's) was sent instead. It
    is now one error naming the file; an empty $BEARER_TOKEN_FILE is still skipped, as the
    discovery spec says."""
    empty = tmp_path / "empty"
    empty.write_text("\n")
    other = {"BEARER_TOKEN": issuer.mint(subject="someone-else")}
    for cli, conf, source in [(empty, None, "--token-file"),
                              (None, empty, "credentials.token_file")]:
        with pytest.raises(CredentialError, match=re.escape(
                f"token {empty} (from {source}) holds no token (it is empty)")):
            find_token(cli, conf, other, UID)
    found = find_token(None, None, {**other, "BEARER_TOKEN_FILE": str(empty)}, UID)
    assert found is not None and found.source == "$BEARER_TOKEN"


def test_a_named_file_that_is_missing_is_an_error(tmp_path: Path) -> None:
    """--token-file, token_file and $BEARER_TOKEN_FILE naming no file: one line naming it."""
    gone = tmp_path / "gone"
    for cli, conf, env, source in [(gone, None, {}, "--token-file"),
                                   (None, gone, {}, "credentials.token_file"),
                                   (None, None, {"BEARER_TOKEN_FILE": str(gone)},
                                    "$BEARER_TOKEN_FILE")]:
        with pytest.raises(CredentialError, match=re.escape(f"token {gone} (from {source}): "
                                                            "no such file")):
            find_token(cli, conf, env, UID)


# --- inspection ------------------------------------------------------------------------------


def test_inspection_shows_the_claims(issuer: TokenIssuer) -> None:
    """Issuer, subject, audience (string or list), scopes, groups and times are decoded."""
    token = issuer.mint("storage.read:/dune storage.stage:/dune", audience=["a", "b"],
                        subject="alice", groups=["/dune", "/dune/production"], lifetime=1800)
    info = inspect_token(token, source="$BEARER_TOKEN")
    assert (info.issuer, info.subject, info.audience) == (issuer.url, "alice", ("a", "b"))
    assert info.scopes == ("storage.read:/dune", "storage.stage:/dune")
    assert info.groups == ("/dune", "/dune/production") and info.wlcg_ver == "1.0"
    assert 1790 < info.time_left().total_seconds() <= 1800
    assert info.issued_at is not None and info.issued_at < datetime.now(timezone.utc)
    assert "alice" in info.describe() and "storage.stage:/dune" in info.describe()
    _no_text(token, info.describe(), repr(info))


@pytest.mark.parametrize("mangle", ["two-parts", "not-base64", "not-json", "array", "no-exp",
                                    "exp-text", "empty-signature"])
def test_malformed_tokens_are_refused_without_quoting_them(issuer: TokenIssuer,
                                                           mangle: str) -> None:
    """Anything that is not a JWT with an exp: 'malformed token', naming the source only."""
    good = issuer.mint()
    head, body, sig = good.split(".")
    import base64

    def part(value: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    token = {"two-parts": f"{head}.{body}", "not-base64": f"{head}.{body}!.{sig}",
             "not-json": f"{head}.{part('x')[:-2]}ab.{sig}", "array": f"{head}.{part([1])}.{sig}",
             "no-exp": f"{head}.{part({'iss': 'x'})}.{sig}",
             "exp-text": f"{head}.{part({'exp': 'soon'})}.{sig}",
             "empty-signature": f"{head}.{body}."}[mangle]
    with pytest.raises(CredentialError, match=r"^token from \$BEARER_TOKEN: malformed token") as e:
        inspect_token(token, source="$BEARER_TOKEN")
    _no_text(good, str(e.value))
    assert body not in str(e.value)


def test_expired_early_and_short_lived_tokens_are_refused(issuer: TokenIssuer) -> None:
    """Expired, not yet valid, and less than the minimum lifetime left: each its own line."""
    def check(token: str, minimum: float = 60.0) -> str:
        with pytest.raises(CredentialError) as e:
            check_token(inspect_token(token, source="--token-file"), minimum)
        return str(e.value)

    assert "expired at" in check(issuer.mint(lifetime=-10))
    assert "not valid before" in check(issuer.mint(not_before=600))
    assert "less than credentials.token_min_lifetime" in check(issuer.mint(lifetime=30))
    check_token(inspect_token(issuer.mint(lifetime=90), source="x"), 60.0)  # enough left


def test_scope_coverage_allows_for_an_unknown_base_path() -> None:
    """A scope path may sit under the storage's base path: /dune covers /pnfs/.../dune/x."""
    path = "/pnfs/fnal.gov/usr/dune/tape_backed/f.root"
    assert scope_covers(("storage.read:/",), "storage.read", path)
    assert scope_covers(("storage.read:/dune",), "storage.read", path)
    assert scope_covers(("storage.read:/dune/tape_backed",), "storage.read", path)
    assert not scope_covers(("storage.read:/icarus",), "storage.read", path)
    assert not scope_covers(("storage.create:/",), "storage.read", path)
    assert not scope_covers(("storage.read:/",), "storage.stage", path)
    assert not scope_covers(("storage.read:/dun",), "storage.read", path)


# --- the live token --------------------------------------------------------------------------


def test_a_rewritten_token_file_is_used_by_later_requests(issuer: TokenIssuer,
                                                          tmp_path: Path) -> None:
    """After a rewrite, the next header past the recheck interval once the file has stopped
    changing carries the new token; a rewrite with garbage keeps the previous one."""
    now = [0.0]
    path = write_token(tmp_path / "bt", issuer.mint(subject="first"))
    found = find_token(path, None, {}, UID)
    assert found is not None
    source = TokenSource(found, recheck=1.0, settle=0.5, clock=lambda: now[0])
    first = source.authorization()
    second_token = issuer.mint(subject="second")
    write_token(path, second_token)
    assert source.authorization() == first  # within the recheck interval
    now[0] = 1.5
    assert source.authorization() == first  # changed since the last look: may be half-written
    now[0] = 2.0
    assert source.authorization() == "Bearer " + second_token
    assert source.info.subject == "second" and source.version == 1
    path.write_text("garbage\n")
    now[0] = 3.0
    assert source.authorization() == "Bearer " + second_token
    now[0] = 3.5
    assert source.authorization() == "Bearer " + second_token


def test_a_token_file_rewritten_in_place_is_taken_once_it_stops_changing(
        issuer: TokenIssuer, tmp_path: Path) -> None:
    """A file rewritten in place was read half-written (a JWT cut inside its signature still
    decodes) and replaced the valid token. A change is now taken only when the file is the
    same at two looks settle seconds apart, the next look coming settle seconds after the
    first; the token read at start is taken at once."""
    now = [0.0]
    old = issuer.mint(subject="old")
    path = write_token(tmp_path / "bt", old)
    found = find_token(path, None, {}, UID)
    assert found is not None and found.text == old  # at start: no waiting
    source = TokenSource(found, recheck=1.0, settle=0.5, clock=lambda: now[0])
    new = issuer.mint(subject="new")
    with path.open("r+") as f:  # in place: same inode, truncated, written in two parts
        f.truncate(0)
        f.write(new[:-30])
        f.flush()
        now[0] = 1.0
        assert source.authorization() == "Bearer " + old
        f.write(new[-30:] + "\n")
    now[0] = 1.5  # the first look asked for another one settle seconds later
    assert source.authorization() == "Bearer " + old  # it changed again: not stable yet
    now[0] = 2.0
    assert source.authorization() == "Bearer " + new and source.version == 1


def test_a_token_cut_inside_its_signature_is_malformed(issuer: TokenIssuer) -> None:
    """Three base64url parts with a JSON header and payload passed for a token even with the
    signature cut short (a file read half-written); its length is now checked against alg."""
    token = issuer.mint()
    for cut in (token[:-30], token[:-1], token + "A"):
        with pytest.raises(CredentialError, match=re.escape(
                "token from $BEARER_TOKEN: malformed token (its ES256 signature has the wrong "
                "length: cut short?)")):
            inspect_token(cut, source="$BEARER_TOKEN")
    assert inspect_token(token, source="$BEARER_TOKEN").subject == "prestaged-test-user"


def test_a_renewed_token_is_hidden_where_a_server_quotes_it(issuer: TokenIssuer,
                                                            tmp_path: Path) -> None:
    """Only the token found at start was registered as a secret: a server quoting back the
    signature of a token renewed on disk had it printed in errors, --json and the state."""
    from prestaged.model import scrub

    path = write_token(tmp_path / "bt", issuer.mint(subject="first"))
    found = find_token(path, None, {}, UID)
    assert found is not None
    source = TokenSource(found, recheck=0.0, settle=0.0)
    renewed = issuer.mint(subject="renewed")
    write_token(path, renewed)
    assert source.authorization() == "Bearer " + renewed
    signature = renewed.rpartition(".")[2]
    said = scrub(f"HTTP 403 denied {signature}; token was {renewed}")
    assert signature not in said and renewed not in said


def test_an_expired_token_is_never_handed_out(issuer: TokenIssuer, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The header of an expired token raises instead; a renewed file ends that."""
    path = write_token(tmp_path / "bt", issuer.mint(lifetime=60))
    found = find_token(path, None, {}, UID)
    assert found is not None
    source = TokenSource(found, recheck=0.0, settle=0.0)
    later = datetime.now(timezone.utc) + timedelta(seconds=120)
    monkeypatch.setattr("prestaged.tokens._utcnow", lambda: later)
    assert source.expired()
    with pytest.raises(CredentialError, match="expired at"):
        source.authorization()
    write_token(path, fresh := issuer.mint(subject="fresh", now=later.timestamp()))
    assert not source.expired() and source.authorization() == "Bearer " + fresh


def test_a_renewal_that_cannot_be_sent_now_keeps_the_valid_token(
        issuer: TokenIssuer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """An expired renewal, or one whose nbf is ahead (the issuer's clock runs fast), replaced
    the valid token in use and the run stopped with exit 3. Now it is a WARNING naming the file
    and the previous token is kept; the early one is taken once its nbf has passed."""
    caplog.set_level(logging.INFO, logger="prestaged.tokens")
    first = issuer.mint(subject="first")
    path = write_token(tmp_path / "bt", first)
    found = find_token(path, None, {}, UID)
    assert found is not None
    source = TokenSource(found, recheck=0.0, settle=0.0)
    write_token(path, stale := issuer.mint(subject="stale", lifetime=-10))
    assert source.authorization() == "Bearer " + first and source.usable()
    write_token(path, early := issuer.mint(subject="early", not_before=30, lifetime=7200))
    assert source.authorization() == "Bearer " + first and source.version == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert all(str(path) in w and "keeping the previous token" in w for w in warnings)
    assert "expired at" in warnings[0] and "not valid before" in warnings[1]
    later = datetime.now(timezone.utc) + timedelta(seconds=40)
    monkeypatch.setattr("prestaged.tokens._utcnow", lambda: later)
    assert source.authorization() == "Bearer " + early and source.info.subject == "early"
    _no_text(first, caplog.text)
    _no_text(stale, caplog.text)
    _no_text(early, caplog.text)


def test_a_token_not_valid_yet_is_not_usable(issuer: TokenIssuer) -> None:
    """usable() (what pauses the daemon's touches) looks at nbf too, not only at exp."""
    early = TokenSource(FoundToken(issuer.mint(not_before=30), "$BEARER_TOKEN", None))
    assert not early.expired() and not early.usable()
    with pytest.raises(CredentialError, match="not valid before"):
        early.authorization()
    assert TokenSource(FoundToken(issuer.mint(), "$BEARER_TOKEN", None)).usable()


# --- the method ------------------------------------------------------------------------------


def _load(pki: TestPKI, method: str, *, token: Path | None = None, proxy: Path | None = None,
          env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return load_credentials(proxy=proxy, proxy_configured=None, ca_dir=pki.ca_dir,
                            ca_dir_configured=None, min_lifetime=3600, method=method,
                            token_file=token, token_configured=None, token_min_lifetime=60,
                            env=env or {}, uid=UID)


def test_auto_uses_what_is_found(pki: TestPKI, issuer: TokenIssuer, tmp_path: Path) -> None:
    """auto: the token alone, the proxy alone, or both, as found; token/proxy pick one."""
    token = write_token(tmp_path / "bt", issuer.mint(subject="bob"))
    proxy = pki.make_proxy(tmp_path / "x509")
    both = _load(pki, "auto", token=token, proxy=proxy)
    assert both.token is not None and both.proxy is not None
    assert "subject bob" in both.hint() and pki.user_dn in both.hint()
    alone = _load(pki, "auto", token=token)
    assert alone.proxy is None and alone.token is not None
    assert _load(pki, "auto", proxy=proxy).token is None
    assert _load(pki, "proxy", token=token, proxy=proxy).token is None
    assert _load(pki, "token", token=token, proxy=proxy).proxy is None


def test_nothing_found_lists_every_place_looked_at(pki: TestPKI, tmp_path: Path,
                                                   tmp_default: Path) -> None:
    """Neither credential: one line naming every token location and the proxy's."""
    with pytest.raises(CredentialError) as e:
        _load(pki, "auto", env={"XDG_RUNTIME_DIR": str(tmp_path)})
    message = str(e.value)
    for place in ("$BEARER_TOKEN", str(tmp_path / f"bt_u{UID}"), str(tmp_default),
                  f"/tmp/x509up_u{UID}"):
        assert place in message
    with pytest.raises(CredentialError, match=r"no bearer token \(credentials.method = token\)"):
        _load(pki, "token")
    with pytest.raises(CredentialError, match=f"/tmp/x509up_u{UID}.*does not exist"):
        _load(pki, "proxy")


def test_an_empty_discovered_token_file_is_said_and_never_silently_replaced(
        pki: TestPKI, issuer: TokenIssuer, tmp_path: Path, tmp_default: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """An empty $XDG_RUNTIME_DIR/bt_u<uid> (a renewal between truncate and write) was skipped
    with a DEBUG line: auto went on with the proxy alone or /tmp/bt_u<uid>, and --auth token
    did not say the file was there but empty. Now a WARNING names it and what is used
    instead, and the error says it is empty."""
    caplog.set_level(logging.DEBUG)
    empty = tmp_path / f"bt_u{UID}"
    empty.write_text("")
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    proxy = pki.make_proxy(tmp_path / "x509")
    assert _load(pki, "auto", proxy=proxy, env=env).token is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"token {empty} is empty: skipped, and no other bearer token found; "
                        "using the proxy alone"]
    caplog.clear()
    write_token(tmp_default, issuer.mint(subject="other"))
    found = find_token(None, None, env, UID)
    assert found is not None and found.path == tmp_default
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"token {empty} (from default $XDG_RUNTIME_DIR/bt_u<uid>) is empty: "
                        f"skipped; using token {tmp_default} (from default /tmp/bt_u<uid>) "
                        "instead"]
    tmp_default.unlink()
    with pytest.raises(CredentialError, match=re.escape(
            f"no bearer token (credentials.method = token): {empty} is empty; looked at ")):
        _load(pki, "token", env=env)
    with pytest.raises(CredentialError, match=re.escape(
            f"no credentials: no bearer token ({empty} is empty; looked at ")):
        _load(pki, "auto", env=env)


def test_a_token_file_others_can_read_is_warned_about(
        pki: TestPKI, issuer: TokenIssuer, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A 0644 token file was used without a word (a 0644 proxy gets a WARNING): whoever reads
    a bearer token can use it. Now the same WARNING (path, mode, chmod), at load and when a
    renewal is taken; never the token."""
    caplog.set_level(logging.WARNING)
    path = write_token(tmp_path / "bt", first := issuer.mint())
    creds = _load(pki, "token", token=path)
    assert caplog.records == []
    path.chmod(0o644)
    _load(pki, "token", token=path)
    said = f"token {path} is accessible to group/others (mode 0644); run: chmod 600 {path}"
    assert [r.getMessage() for r in caplog.records] == [said]
    caplog.clear()
    assert creds.token is not None
    source = TokenSource(FoundToken(first, "--token-file", path), recheck=0.0, settle=0.0)
    renewed = issuer.mint(subject="renewed")
    (tmp_path / "new").write_text(renewed + "\n")
    (tmp_path / "new").chmod(0o640)
    (tmp_path / "new").replace(path)
    assert source.refresh() and source.info.subject == "renewed"
    assert [r.getMessage() for r in caplog.records] == [said.replace("0644", "0640")]
    _no_text(first, caplog.text)
    _no_text(renewed, caplog.text)


def test_a_stale_default_proxy_gives_way_to_a_token_but_a_named_one_does_not(
        pki: TestPKI, issuer: TokenIssuer, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """auto with a good token: an expired proxy at the default place is warned about and not
    presented; an expired proxy named by --proxy stops the run."""
    token = write_token(tmp_path / "bt", issuer.mint())
    stale = pki.make_proxy(Path(f"/tmp/x509up_u{UID}"), expired=True)
    try:
        with caplog.at_level(logging.WARNING, logger="prestaged.credentials"):
            creds = _load(pki, "auto", token=token)
        assert creds.proxy is None and creds.token is not None
        assert "not presenting the proxy" in caplog.text and "expired" in caplog.text
        with pytest.raises(CredentialError, match="expired"):
            _load(pki, "auto", token=token, proxy=stale)
    finally:
        stale.unlink()


def test_an_expired_token_stops_before_anything_is_sent(pki: TestPKI, issuer: TokenIssuer,
                                                       tmp_path: Path) -> None:
    """A warm with an expired token: exit 3 naming the token file; no request is made (the
    URL's port is closed: a request would fail differently)."""
    definition = tmp_path / "d.txt"
    definition.write_text("https://127.0.0.1:9/f\n")
    token = issuer.mint(lifetime=-60)
    path = write_token(tmp_path / "bt", token)
    res = run_cli("warm", str(definition), "--token-file", str(path), "--ca-dir",
                  str(pki.ca_dir), "-v")
    assert res.returncode == 3
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("prestaged: error:")]
    assert errors == [errors[0]] and f"token {path} (from --token-file): expired at" in errors[0]
    assert "Traceback" not in res.stderr
    _no_text(token, res.stdout, res.stderr)


# --- prestaged credentials ---------------------------------------------------------------------


def test_credentials_command_describes_both_and_never_prints_the_token(
        pki: TestPKI, issuer: TokenIssuer, tmp_path: Path) -> None:
    """Text and --json show the proxy and the token's claims, at -v too, never the token."""
    token = issuer.mint("storage.read:/ storage.stage:/", subject="carol", audience="https://x")
    path = write_token(tmp_path / "bt", token)
    proxy = pki.make_proxy(tmp_path / "x509")
    args = ["--token-file", str(path), "--proxy", str(proxy), "--ca-dir", str(pki.ca_dir)]
    text = run_cli("credentials", *args, "-v")
    assert text.returncode == 0, text.stderr
    for want in ("carol", "storage.stage:/", "https://x", pki.user_dn, "a run sends : token and proxy"):
        assert want in text.stdout
    doc = json.loads(run_cli("credentials", *args, "--json").stdout)
    assert doc["method"] == "auto" and doc["token"]["subject"] == "carol"
    assert doc["token"]["source"] == "--token-file" and doc["proxy"]["identity"] == pki.user_dn
    assert 3500 < doc["token"]["seconds_left"] <= 3600
    only = json.loads(run_cli("credentials", *args, "--auth", "token", "--json").stdout)
    assert only["proxy"] is None
    # A proxy is there, only not used: "none found" said it was missing.
    said = run_cli("credentials", *args, "--auth", "token").stdout
    assert "proxy       : not used (--auth token)" in said and "none found" not in said
    _no_text(token, text.stdout, text.stderr, json.dumps(doc))


def test_credentials_command_exits_3_when_a_run_would_fail(pki: TestPKI, issuer: TokenIssuer,
                                                          tmp_path: Path) -> None:
    """An expired token is shown (time left negative) and the command exits 3 with the run's
    message; `prestaged proxy` keeps its proxy-only shape."""
    token = issuer.mint(lifetime=-120)
    path = write_token(tmp_path / "bt", token)
    res = run_cli("credentials", "--token-file", str(path), "--ca-dir", str(pki.ca_dir))
    assert res.returncode == 3 and "expired" in res.stdout and "expired at" in res.stderr
    _no_text(token, res.stdout, res.stderr)
    proxy = pki.make_proxy(tmp_path / "x509")
    doc = json.loads(run_cli("proxy", "--proxy", str(proxy), "--json").stdout)
    assert doc["identity"] == pki.user_dn and "token" not in doc


def test_expiry_arithmetic_is_utc(issuer: TokenIssuer) -> None:
    """Times are decoded as UTC whatever the local zone."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    info = inspect_token(issuer.mint(lifetime=100, now=now.timestamp()), source="x")
    assert info.expires == now + timedelta(seconds=100)


def test_scope_warning_once_per_endpoint_and_token(issuer: TokenIssuer, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A read outside every storage.read scope warns once per endpoint (again after a renewal);
    covered paths never warn; the warning names the scopes, never the token."""
    token = issuer.mint("storage.read:/dune")
    path = write_token(tmp_path / "bt", token)
    found = find_token(path, None, {}, UID)
    assert found is not None
    source = TokenSource(found, recheck=0.0, settle=0.0)
    warner = ScopeWarner(source, "storage.read")
    with caplog.at_level(logging.WARNING, logger="prestaged.tokens"):
        warner.see("https://a:2880", "/pnfs/fnal.gov/usr/dune/x/f1")
        assert not caplog.records
        for i in range(5):
            warner.see("https://a:2880", f"/pnfs/fnal.gov/usr/icarus/f{i}")
            warner.see("https://b:2880", f"/icarus/f{i}")
        assert len(caplog.records) == 2
        assert "no storage.read scope covers /pnfs/fnal.gov/usr/icarus/f0" in caplog.text
        write_token(path, issuer.mint("storage.read:/dune", subject="renewed"))
        source.refresh()
        warner.see("https://a:2880", "/pnfs/fnal.gov/usr/icarus/f9")
        assert len(caplog.records) == 3 and "renewed" in caplog.records[-1].getMessage()
    _no_text(token, caplog.text)
