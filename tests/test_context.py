"""The one wiring (``prestaged.context``) and the CLI's client of the daemon: what both
callers get from the same config."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from prestaged.cli import main
from prestaged.config import load_config
from prestaged.service import client
from prestaged.service.daemon import Daemon
from prestaged.testing.pki import TestPKI


def _samweb_config(tmp_path: Path, pki: TestPKI, proxy: Path, use: str) -> Path:
    cfg = tmp_path / "prestaged.toml"
    cfg.write_text(f'[credentials]\nproxy = "{proxy}"\nca_dir = "{pki.ca_dir}"\n'
                   '[catalog.samweb]\nexperiment = "dune"\n'
                   'base_url = "https://127.0.0.1:1/sam/dune/api"\n'
                   f"{use}"
                   '[[catalog.samweb.rewrite]]\nlocation = "enstore:"\n'
                   'url = "https://127.0.0.1:2"\n')
    return cfg


@pytest.mark.parametrize(("use", "shown"), [("use_certificate = false\n", False), ("", True)])
def test_daemon_honours_samweb_use_certificate(tmp_path: Path, pki: TestPKI, use: str,
                                               shown: bool) -> None:
    """The daemon opens SAM web through the context: ``use_certificate = false`` asks
    anonymously even though the daemon holds a proxy (it used to present it anyway)."""
    proxy = pki.make_proxy()
    daemon = Daemon(load_config(_samweb_config(tmp_path, pki, proxy, use)), None)
    daemon.credentials = daemon.ctx.load_credentials()
    catalog = daemon.open_catalog("samweb", "some-definition")
    identity = catalog._identity  # type: ignore[attr-defined]
    assert (identity == daemon.credentials.proxy.identity) if shown else identity is None


@pytest.fixture
def mute_listener() -> Iterator[str]:
    """A TCP listener on 127.0.0.1 that accepts connections and never answers (a stuck
    daemon); yields its host:port."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not done.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{srv.getsockname()[1]}"
    finally:
        done.set()
        t.join()
        for c in held:
            c.close()
        srv.close()


def test_a_slow_daemon_is_not_taken_for_no_daemon(
    tmp_path: Path, mute_listener: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    """``campaign hold`` against a daemon that does not answer in time fails naming the daemon
    and --state, and writes nothing to the local state file (it used to fall back to it)."""
    monkeypatch.setattr(client, "TIMEOUT", 0.3)
    state = tmp_path / "state.db"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[daemon]\nlisten = "{mute_listener}"\n[state]\npath = "{state}"\n')
    code = main(["campaign", "hold", "somecampaign", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert code == 69  # EX_UNAVAILABLE: not 1, which says files failed
    assert mute_listener in err and "--state" in err and "did not answer" in err
    assert not state.exists()


def test_nothing_listening_means_the_state_file(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """With nothing listening at daemon.listen (connection refused) the command works on the
    state file."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # bound and closed: nothing listens there
    state = tmp_path / "state.db"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[daemon]\nlisten = "127.0.0.1:{port}"\n[state]\npath = "{state}"\n')
    assert main(["campaign", "list", "--config", str(cfg)]) == 2  # no state file yet
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize(("status", "body", "said", "code", "argv"), [
    (503, b'{"error": "stopping"}', "daemon: stopping", 69, ["campaign", "list"]),
    (503, b'{"error": "stopping", "exit_code": 1}', "daemon: stopping", 69, ["campaign", "list"]),
    (502, b'{"error": "SAM web unreachable", "exit_code": 4}', "daemon: SAM web", 4,
     ["campaign", "list"]),
    (502, b'{"error": "storage refused", "exit_code": 5}', "daemon: storage refused", 5,
     ["campaign", "list"]),
    (200, b"<html>hello</html>", "but not with JSON", 69, ["campaign", "list"]),
    # Another server's refusals (an exporter on 9464): exit 4 "not found", or advice about
    # our token, before.
    (404, b"<html>Not Found</html>", "answered GET /api/v1/campaigns with HTTP 404, not as "
     "prestaged's API", 69, ["campaign", "list"]),
    (401, b"", "with HTTP 401, not as prestaged's API", 69, ["status"]),
    (200, b"[1, 2]", "with list, not a JSON object", 69, ["campaign", "list"]),
    # JSON objects of another shape: a KeyError or TypeError traceback, or silence, before
    (200, b"{}", "not with prestaged's API (no list 'campaigns')", 69, ["campaign", "list"]),
    (200, b"{}", "(no str 'campaign')", 69, ["campaign", "show", "c1"]),
    (200, b"{}", "(no list 'definitions')", 69, ["status"]),
    (200, b'{"definitions": 5}', "(no list 'definitions')", 69, ["status"]),
])
def test_a_daemon_that_fails_or_is_not_ours_is_exit_69(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], status: int, body: bytes, said: str,
    code: int, argv: list[str]
) -> None:
    """Something at daemon.listen that fails the call (503) or does not speak the API: exit 69
    (EX_UNAVAILABLE), one line naming what it said; before, exit 1, which says files failed.
    A failure whose kind the daemon names (``exit_code``: catalog 4, storage 5) keeps it."""
    import http.server

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[daemon]\nlisten = "127.0.0.1:{srv.server_port}"\n')
        exit_code = main([*argv, "--config", str(cfg)])
    finally:
        srv.shutdown()
        srv.server_close()
    err = capsys.readouterr().err
    assert exit_code == code, err
    assert len(err.splitlines()) == 1 and said in err


CAMPAIGN = "name = \"c1\"\n[[stage]]\nname = \"s1\"\ninput = \"d\"\nsubmit = \"true\"\n"


@pytest.mark.parametrize(("status", "body", "headers", "said", "argv"), [
    # JSON null was None, "nothing listens": the hold went to the state file, exit 0.
    (200, b"null", {}, "with NoneType, not a JSON object", ["campaign", "hold", "c1"]),
    (200, b"null", {}, "with NoneType, not a JSON object", ["campaign", "list"]),
    # A redirect was followed to a port where nothing listens: "no daemon", the state file.
    (302, b"", {"Location": "http://127.0.0.1:1/"}, "with HTTP 302, not as prestaged's API",
     ["campaign", "hold", "c1"]),
    (302, b"", {"Location": "http://127.0.0.1:1/"}, "with HTTP 302, not as prestaged's API",
     ["status"]),
    # Objects whose items are of another shape: AttributeError and TypeError tracebacks.
    (200, b'{"definitions": [1]}', {}, "not with prestaged's API", ["status"]),
    (200, b'{"definitions": [{"definition": "d"}]}', {}, "not with prestaged's API",
     ["status"]),
    (200, b'{"campaigns": [1]}', {}, "not with prestaged's API", ["campaign", "list"]),
    (200, b'{"campaigns": [{"daemon": 5}]}', {}, "not with prestaged's API",
     ["campaign", "list"]),
    (200, b'{"campaign": "c1", "stages": [1], "submissions": []}', {},
     "not with prestaged's API", ["campaign", "show", "c1"]),
    # An error answer whose error is no string: "daemon: None".
    (500, b'{"error": null}', {}, "with HTTP 500, not as prestaged's API",
     ["campaign", "list"]),
    # campaign add read doc["added"]: KeyError and TypeError tracebacks.
    (200, b"{}", {}, "(no bool 'added')", ["campaign", "add", "CAMPAIGN"]),
    (200, b'"added"', {}, "with str, not a JSON object", ["campaign", "add", "CAMPAIGN"]),
])
def test_an_answer_not_of_our_daemon_is_exit_69_never_the_state_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], status: int, body: bytes,
    headers: dict[str, str], said: str, argv: list[str]
) -> None:
    """Whatever answers at daemon.listen and is not our API (null, a redirect, items of
    another shape, an error without its text) is exit 69 in one line, and the state file is
    never used instead: a null or a redirect to nowhere was taken for "no daemon", a hold
    went to the state file with exit 0; other shapes were tracebacks."""
    import http.server

    class Answer(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_DELETE = _answer

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    (tmp_path / "c1.toml").write_text(CAMPAIGN)
    state = tmp_path / "state.db"
    argv = [str(tmp_path / "c1.toml") if a == "CAMPAIGN" else a for a in argv]
    try:
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[daemon]\nlisten = "127.0.0.1:{srv.server_port}"\n'
                       f'[state]\npath = "{state}"\n')
        exit_code = main([*argv, "--config", str(cfg)])
    finally:
        srv.shutdown()
        srv.server_close()
    err = capsys.readouterr().err
    assert exit_code == 69, err
    assert len(err.splitlines()) == 1 and said in err, err
    assert not state.exists()
