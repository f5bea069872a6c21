"""The Rucio spec (``prestaged.testing.rucio_spec``) that both the real Rucio server kit and the
Rucio emulator load: its JSON form round-trips, and a spec neither could hold is refused with
the offending key named, before any server starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from prestaged.testing.rucio_spec import RucioSpec, SpecError, load_spec


def _doc() -> dict[str, Any]:
    return {
        "scopes": ["dune"],
        "rses": [{"name": "DISK_RSE", "type": "DISK", "protocols": [
                     {"scheme": "https", "hostname": "127.0.0.1", "port": 2880,
                      "prefix": "/pnfs/dune"}]},
                 {"name": "ND_RSE", "type": "TAPE", "deterministic": False, "protocols": [
                     {"scheme": "root", "hostname": "h", "port": 1094, "prefix": "//eos"}]}],
        "files": [{"scope": "dune", "name": "f1.root", "bytes": 123, "adler32": "0cc737eb",
                   "replicas": {"DISK_RSE": "https://127.0.0.1:2880/pnfs/dune/f1.root"}},
                  {"scope": "dune", "name": "f2.root", "bytes": 0, "adler32": "00000001",
                   "md5": "0" * 32, "replicas": {"DISK_RSE": None,
                                                 "ND_RSE": "root://h:1094//eos/a/f2.root"}},
                  {"scope": "dune", "name": "bare.root", "bytes": 1, "adler32": "00000002",
                   "replicas": {}}],
        "datasets": [{"scope": "dune", "name": "ds1", "files": ["dune:f1.root", "dune:f2.root"]}],
        "users": [{"account": "root", "username": "u", "password": "p"},
                  {"account": "alice", "username": "a", "password": "q"}],
        "x509": [{"account": "bob", "dn": "CN=Bob,O=Test,DC=org"}],
    }


def test_the_json_form_round_trips(tmp_path: Path) -> None:
    """from_dict(to_dict()) is the same spec, and load_spec reads the same from a file; the
    stored path of a PFN is what follows its protocol's prefix."""
    spec = RucioSpec.from_dict(_doc())
    assert RucioSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(_doc()))
    assert load_spec(path) == spec
    assert load_spec(spec) is spec
    assert spec.accounts == ("alice", "bob")
    assert spec.rse("DISK_RSE").path_of("https://127.0.0.1:2880/pnfs/dune/a/f1.root") == "a/f1.root"
    assert spec.rse("ND_RSE").protocols[0].base == "root://h:1094//eos/"
    assert [f.did for f in spec.files] == ["dune:f1.root", "dune:f2.root", "dune:bare.root"]


def _broken(path: str, value: Any) -> dict[str, Any]:
    """``_doc()`` with the item at dotted ``path`` (list indexes as numbers) set to ``value``;
    ``...`` deletes it."""
    doc = _doc()
    *parents, last = path.split(".")
    node: Any = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    key: Any = int(last) if isinstance(node, list) else last
    if value is ...:
        del node[key]
    else:
        node[key] = value
    return doc


@pytest.mark.parametrize(("path", "value", "message"), [
    ("files.0.scope", "mc", r"files\[0\]\.scope: 'mc' is not in scopes"),
    ("files.0.adler32", "0CC737EB", r"files\[0\]\.adler32"),
    ("files.0.bytes", -1, r"files\[0\]\.bytes: -1 is negative"),
    ("files.0.bytes", True, r"files\[0\]\.bytes: expected int"),
    ("files.0.replicas", {"NOPE": None}, r"files\[0\]\.replicas: unknown RSE 'NOPE'"),
    ("files.0.replicas", {"DISK_RSE": "https://other:2880/pnfs/dune/f1.root"},
     r"files\[0\]\.replicas\.DISK_RSE: .*lies under no protocol"),
    ("files.1.replicas", {"ND_RSE": None}, r"non-deterministic RSE needs a PFN"),
    ("files.2.name", "f1.root", r"files\[2\]: dune:f1.root appears twice"),
    ("rses.0.type", "DISC", r"rses\[0\]\.type: 'DISC'"),
    ("rses.0.name", "disk_rse", r"rses\[0\]\.name"),
    ("rses.0.protocols.0.port", 0, r"rses\[0\]\.protocols\[0\]\.port: 0 is not a TCP port"),
    ("datasets.0.files", ["dune:nope"], r"datasets\[0\]\.files: not in files: dune:nope"),
    ("datasets.0.files", ["nope"], r"datasets\[0\]\.files\[0\]: expected 'scope:name'"),
    ("datasets.0.name", "f1.root", r"datasets\[0\]: dune:f1.root is already a DID"),
    ("x509.0.dn", "/DC=org/O=Test/CN=Bob", r"x509\[0\]\.dn: .*slash form"),
    ("users.0.account", "Root", r"users\[0\]\.account"),
    ("users.0.password", ..., r"users\[0\]\.password: missing"),
    ("colour", "blue", r"spec: unknown keys \['colour'\]"),
    ("files.0", "f1.root", r"files\[0\]: expected an object"),
])
def test_a_spec_no_rucio_could_hold_is_refused(path: str, value: Any, message: str) -> None:
    """Each broken spec raises SpecError (a ValueError) naming the key that is wrong."""
    with pytest.raises(SpecError, match=message):
        RucioSpec.from_dict(_broken(path, value))


def test_an_unreadable_spec_file_is_a_spec_error(tmp_path: Path) -> None:
    """A missing or non-JSON file is a SpecError naming the file."""
    with pytest.raises(SpecError, match=r"missing\.json"):
        load_spec(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SpecError, match=r"bad\.json"):
        load_spec(bad)
