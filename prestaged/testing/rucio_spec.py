"""What a test Rucio holds: scopes, RSEs, files with replicas, datasets and identities.

One spec, loaded by both the real Rucio server run on loopback
(``prestaged.testing.rucio_server``) and the Rucio emulator (``prestaged.testing.rucio``), so a
differential test can hold the emulator to the server. It is plain JSON::

    {"scopes": ["dune"],
     "rses": [{"name": "DISK_RSE", "type": "DISK",
               "protocols": [{"scheme": "https", "hostname": "127.0.0.1", "port": 2880,
                              "prefix": "/pnfs/dune"}]},
              {"name": "TAPE_RSE", "type": "TAPE", "protocols": [{"scheme": "davs", ...}]}],
     "files": [{"scope": "dune", "name": "f1.root", "bytes": 123, "adler32": "0cc737eb",
                "replicas": {"DISK_RSE": "https://127.0.0.1:2880/pnfs/dune/f1.root"}}],
     "datasets": [{"scope": "dune", "name": "ds1", "files": ["dune:f1.root"]}],
     "users": [{"account": "root", "username": "u", "password": "p"}],
     "x509": [{"account": "alice", "dn": "CN=Alice,O=Test,DC=prestaged-test,DC=org"}]}

Meaning, as the real server gives it:

- ``rses[].type`` is ``DISK`` or ``TAPE``; ``deterministic`` (default true) says whether the
  RSE maps a file name to a path itself (Rucio's default ``hash`` lfn2pfn) or needs a PFN per
  replica. ``protocols`` are in priority order: the first gets read/write priority 1 in both
  the ``wan`` and ``lan`` domains, the next 2, and so on.
- ``files[].replicas`` maps an RSE name to the replica's PFN, or to null (deterministic RSEs
  only: Rucio derives the path). ``{}`` is a file registered with no replica. An explicit PFN
  must lie under one of its RSE's protocols (``scheme://hostname:port`` + ``prefix``); the part
  after the prefix is the replica's stored path, which every protocol of the RSE then serves
  (an https PFN also yields ``davs://<davs host:port><davs prefix><same path>``).
- ``files[].md5`` is optional. ``datasets[].files`` name files as ``scope:name``, each declared
  in ``files``; every scope used must be in ``scopes``.
- ``users`` are extra userpass identities and ``x509`` extra certificate identities (DNs in RFC
  2253 order, leaf first: ``CN=...,O=...,DC=org``, as Apache's ``SSL_CLIENT_S_DN``); an
  account that is not ``root`` is created as a USER account on first mention.

``load_spec(path)`` reads a JSON file, ``RucioSpec.from_dict`` a parsed document; both raise
``SpecError`` naming the offending key. ``to_dict`` gives the JSON form back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = [
    "DatasetSpec",
    "FileSpec",
    "ProtocolSpec",
    "RseSpec",
    "RucioSpec",
    "SpecError",
    "UserSpec",
    "X509Spec",
    "load_spec",
]

RSE_TYPES = ("DISK", "TAPE")
_ADLER32 = re.compile(r"[0-9a-f]{8}")
_MD5 = re.compile(r"[0-9a-f]{32}")
# Rucio's generic naming convention for scopes and RSE names (rucio.common.schema.generic).
_SCOPE = re.compile(r"[a-zA-Z_\-.0-9]{1,25}")
_RSE = re.compile(r"[A-Z0-9_\-]{1,255}")
_ACCOUNT = re.compile(r"[a-z0-9\-_]{1,25}")


class SpecError(ValueError):
    """A spec that neither Rucio nor the emulator could hold; the message names the key."""


def _get(doc: Mapping[str, Any], key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    """``doc[key]`` checked to be a ``kind``; SpecError naming ``where.key`` otherwise."""
    if key not in doc:
        raise SpecError(f"{where}.{key}: missing")
    value = doc[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SpecError(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, "
                        f"got {value!r}")
    return value


def _list(doc: Mapping[str, Any], key: str, where: str) -> list[Any]:
    """``doc[key]`` as a list (missing: empty)."""
    if key not in doc:
        return []
    return list(_get(doc, key, where, list))


def _match(pattern: re.Pattern[str], value: str, where: str) -> str:
    if not pattern.fullmatch(value):
        raise SpecError(f"{where}: {value!r} does not match {pattern.pattern}")
    return value


@dataclass(frozen=True)
class ProtocolSpec:
    """One access protocol of an RSE: ``scheme://hostname:port`` + ``prefix`` + path."""

    scheme: str
    hostname: str
    port: int
    prefix: str

    @property
    def base(self) -> str:
        """``scheme://hostname:port`` + the prefix with a ``/`` added at either end where it
        lacks one, as Rucio's ``lfns2pfns`` joins them (``//eos/`` stays ``//eos/``)."""
        prefix = self.prefix if self.prefix.startswith("/") else "/" + self.prefix
        prefix = prefix if prefix.endswith("/") else prefix + "/"
        return f"{self.scheme}://{self.hostname}:{self.port}{prefix}"

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str) -> ProtocolSpec:
        """Parse one ``rses[].protocols[]`` entry."""
        port = _get(doc, "port", where, int)
        if not 0 < port < 65536:
            raise SpecError(f"{where}.port: {port} is not a TCP port")
        return cls(scheme=_get(doc, "scheme", where, str),
                   hostname=_get(doc, "hostname", where, str), port=port,
                   prefix=_get(doc, "prefix", where, str))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"scheme": self.scheme, "hostname": self.hostname, "port": self.port,
                "prefix": self.prefix}


@dataclass(frozen=True)
class RseSpec:
    """An RSE: name, ``DISK``/``TAPE``, protocols in priority order, deterministic or not."""

    name: str
    type: str
    protocols: tuple[ProtocolSpec, ...]
    deterministic: bool = True

    def path_of(self, pfn: str) -> str:
        """The stored path of ``pfn`` (after the protocol prefix, no leading ``/``).

        Raises SpecError when ``pfn`` lies under none of the RSE's protocols.
        """
        for proto in self.protocols:
            if pfn.startswith(proto.base) and len(pfn) > len(proto.base):
                return pfn[len(proto.base):]
        raise SpecError(f"replica {pfn!r} lies under no protocol of RSE {self.name} "
                        f"({', '.join(p.base for p in self.protocols) or 'none'})")

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str) -> RseSpec:
        """Parse one ``rses[]`` entry."""
        name = _match(_RSE, _get(doc, "name", where, str), f"{where}.name")
        rse_type = _get(doc, "type", where, str)
        if rse_type not in RSE_TYPES:
            raise SpecError(f"{where}.type: {rse_type!r} is not one of {RSE_TYPES}")
        protocols = tuple(ProtocolSpec.from_dict(p, f"{where}.protocols[{i}]")
                          for i, p in enumerate(_list(doc, "protocols", where)))
        deterministic = _get(doc, "deterministic", where, bool) if "deterministic" in doc \
            else True
        return cls(name=name, type=rse_type, protocols=protocols, deterministic=deterministic)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"name": self.name, "type": self.type, "deterministic": self.deterministic,
                "protocols": [p.to_dict() for p in self.protocols]}


@dataclass(frozen=True)
class FileSpec:
    """A file DID: size in bytes, adler32 (8 lower-case hex digits), optional md5, and its
    replicas as RSE name -> PFN (None: the deterministic path)."""

    scope: str
    name: str
    bytes: int
    adler32: str
    replicas: Mapping[str, Optional[str]] = field(default_factory=dict)
    md5: Optional[str] = None

    @property
    def did(self) -> str:
        """``scope:name``."""
        return f"{self.scope}:{self.name}"

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str) -> FileSpec:
        """Parse one ``files[]`` entry."""
        size = _get(doc, "bytes", where, int)
        if size < 0:
            raise SpecError(f"{where}.bytes: {size} is negative")
        replicas = dict(_get(doc, "replicas", where, dict)) if "replicas" in doc else {}
        for rse, pfn in replicas.items():
            if pfn is not None and not isinstance(pfn, str):
                raise SpecError(f"{where}.replicas.{rse}: expected a PFN or null, got {pfn!r}")
        md5 = doc.get("md5")
        if md5 is not None:
            md5 = _match(_MD5, _get(doc, "md5", where, str), f"{where}.md5")
        return cls(scope=_get(doc, "scope", where, str), name=_get(doc, "name", where, str),
                   bytes=size, replicas=replicas, md5=md5,
                   adler32=_match(_ADLER32, _get(doc, "adler32", where, str), f"{where}.adler32"))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``md5`` only when set)."""
        doc: dict[str, Any] = {"scope": self.scope, "name": self.name, "bytes": self.bytes,
                               "adler32": self.adler32, "replicas": dict(self.replicas)}
        if self.md5 is not None:
            doc["md5"] = self.md5
        return doc


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset DID and its files as ``scope:name`` strings, in attachment order."""

    scope: str
    name: str
    files: tuple[str, ...]

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str) -> DatasetSpec:
        """Parse one ``datasets[]`` entry."""
        files = tuple(_list(doc, "files", where))
        for i, did in enumerate(files):
            if not isinstance(did, str) or did.count(":") != 1:
                raise SpecError(f"{where}.files[{i}]: expected 'scope:name', got {did!r}")
        return cls(scope=_get(doc, "scope", where, str), name=_get(doc, "name", where, str),
                   files=files)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"scope": self.scope, "name": self.name, "files": list(self.files)}


@dataclass(frozen=True)
class UserSpec:
    """A userpass identity (``username``/``password``) of ``account``."""

    account: str
    username: str
    password: str

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str) -> UserSpec:
        """Parse one ``users[]`` entry."""
        return cls(account=_match(_ACCOUNT, _get(doc, "account", where, str), f"{where}.account"),
                   username=_get(doc, "username", where, str),
                   password=_get(doc, "password", where, str))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"account": self.account, "username": self.username, "password": self.password}


@dataclass(frozen=True)
class X509Spec:
    """A certificate identity of ``account``: ``dn`` in RFC 2253 order (``CN=...,DC=org``)."""

    account: str
    dn: str

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str) -> X509Spec:
        """Parse one ``x509[]`` entry."""
        dn = _get(doc, "dn", where, str)
        if dn.startswith("/"):
            raise SpecError(f"{where}.dn: {dn!r} is slash form; give RFC 2253 (CN=...,DC=org)")
        return cls(account=_match(_ACCOUNT, _get(doc, "account", where, str), f"{where}.account"),
                   dn=dn)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"account": self.account, "dn": self.dn}


@dataclass(frozen=True)
class RucioSpec:
    """Everything a test Rucio starts with (module docstring: the JSON shape and meaning)."""

    scopes: tuple[str, ...] = ()
    rses: tuple[RseSpec, ...] = ()
    files: tuple[FileSpec, ...] = ()
    datasets: tuple[DatasetSpec, ...] = ()
    users: tuple[UserSpec, ...] = ()
    x509: tuple[X509Spec, ...] = ()

    def __post_init__(self) -> None:
        scopes = set(self.scopes)
        for scope in self.scopes:
            _match(_SCOPE, scope, "scopes[]")
        rses = {r.name: r for r in self.rses}
        if len(rses) != len(self.rses):
            raise SpecError("rses: an RSE name appears twice")
        dids: set[str] = set()
        for i, f in enumerate(self.files):
            self._check_file(f, f"files[{i}]", scopes, rses)
            if f.did in dids:
                raise SpecError(f"files[{i}]: {f.did} appears twice")
            dids.add(f.did)
        for i, ds in enumerate(self.datasets):
            if ds.scope not in scopes:
                raise SpecError(f"datasets[{i}].scope: {ds.scope!r} is not in scopes")
            if f"{ds.scope}:{ds.name}" in dids:
                raise SpecError(f"datasets[{i}]: {ds.scope}:{ds.name} is already a DID")
            unknown = [d for d in ds.files if d not in dids]
            if unknown:
                raise SpecError(f"datasets[{i}].files: not in files: {', '.join(unknown[:5])}")

    @staticmethod
    def _check_file(f: FileSpec, where: str, scopes: set[str],
                    rses: Mapping[str, RseSpec]) -> None:
        if f.scope not in scopes:
            raise SpecError(f"{where}.scope: {f.scope!r} is not in scopes")
        for rse_name, pfn in f.replicas.items():
            rse = rses.get(rse_name)
            if rse is None:
                raise SpecError(f"{where}.replicas: unknown RSE {rse_name!r}")
            if pfn is None and not rse.deterministic:
                raise SpecError(f"{where}.replicas.{rse_name}: a non-deterministic RSE needs "
                                "a PFN")
            if pfn is not None:
                try:
                    rse.path_of(pfn)
                except SpecError as e:
                    raise SpecError(f"{where}.replicas.{rse_name}: {e}") from None

    @property
    def accounts(self) -> tuple[str, ...]:
        """The accounts named by ``users`` and ``x509`` other than ``root``, first mention
        first."""
        named = [u.account for u in self.users] + [x.account for x in self.x509]
        return tuple(dict.fromkeys(a for a in named if a != "root"))

    def rse(self, name: str) -> RseSpec:
        """The RSE called ``name`` (KeyError if none)."""
        for r in self.rses:
            if r.name == name:
                return r
        raise KeyError(name)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> RucioSpec:
        """Parse and check a spec document (module docstring); SpecError names the key."""
        if not isinstance(doc, Mapping):
            raise SpecError(f"spec: expected a JSON object, got {type(doc).__name__}")
        unknown = set(doc) - {"scopes", "rses", "files", "datasets", "users", "x509"}
        if unknown:
            raise SpecError(f"spec: unknown keys {sorted(unknown)}")

        def each(key: str, parse: Callable[[Mapping[str, Any], str], Any]) -> tuple[Any, ...]:
            return tuple(parse(item, f"{key}[{i}]") if isinstance(item, Mapping) else
                         _not_object(f"{key}[{i}]", item)
                         for i, item in enumerate(_list(doc, key, "spec")))

        scopes = _list(doc, "scopes", "spec")
        if not all(isinstance(s, str) for s in scopes):
            raise SpecError(f"spec.scopes: expected strings, got {scopes!r}")
        return cls(scopes=tuple(scopes), rses=each("rses", RseSpec.from_dict),
                   files=each("files", FileSpec.from_dict),
                   datasets=each("datasets", DatasetSpec.from_dict),
                   users=each("users", UserSpec.from_dict), x509=each("x509", X509Spec.from_dict))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``from_dict(spec.to_dict()) == spec``)."""
        return {"scopes": list(self.scopes), "rses": [r.to_dict() for r in self.rses],
                "files": [f.to_dict() for f in self.files],
                "datasets": [d.to_dict() for d in self.datasets],
                "users": [u.to_dict() for u in self.users],
                "x509": [x.to_dict() for x in self.x509]}


def _not_object(where: str, item: object) -> Any:
    raise SpecError(f"{where}: expected an object, got {item!r}")


def load_spec(source: Path | str | Mapping[str, Any] | RucioSpec) -> RucioSpec:
    """A ``RucioSpec`` from a JSON file path, a parsed document, or a spec (returned as is)."""
    if isinstance(source, RucioSpec):
        return source
    if isinstance(source, Mapping):
        return RucioSpec.from_dict(source)
    path = Path(source)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SpecError(f"{path}: {e}") from e
    return RucioSpec.from_dict(doc)
