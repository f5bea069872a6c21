"""What the Rucio emulator knows and how it lists replicas, as Rucio 41.5.1's server does.

``RucioCatalog`` holds RSEs, files with replicas and datasets (from a ``RucioSpec``, plus an
optional ``SyntheticFiles`` range generated on demand), and ``list_replicas`` answers a
``POST /replicas/list`` body the way ``rucio.core.replica.list_replicas`` and the REST layer
(``rucio.web.rest.flaskapi.v1.replicas.ListReplicas.post``) do:

- a file DID asked for comes back even without a replica (empty ``pfns``/``rses``/``states``);
  a dataset DID expands to its files that have a replica passing the filters; an unknown DID is
  left out; the records come ordered by scope, then name (the SQL ``ORDER BY scope, name``),
  each file once;
- ``states`` names every RSE whose replica passed the filters (even when no protocol of the
  asked schemes gave it a PFN); ``rses`` maps an RSE to its PFNs, ``pfns`` a PFN to its
  ``rse_id, rse, type, volatile, domain, priority, client_extract``;
- an RSE's protocols are in priority order (the spec's order, 1 first, in ``wan`` and ``lan``);
  without ``schemes`` each RSE gives the PFN of its first protocol, with ``schemes`` one PFN
  per asked scheme it has; a PFN is the protocol's ``scheme://hostname:port`` + prefix + the
  replica's stored path (the part of its spec PFN after the prefix, or Rucio's ``hash`` path;
  on a non-deterministic RSE Rucio stores it with a leading ``/``, which ``root://`` PFNs
  keep: ``root://host:1094/data//f.root``, as the real server answers);
- priorities: the core orders a file's PFNs by (domain, protocol priority, PFN text) and
  numbers them from 1; the REST layer puts ``lan`` ones first and keeps the rest in that order
  (the GeoIP sort finds no database offline and keeps it), then numbers them again;
- ``rse_expression`` follows ``rucio.core.rse_expression_parser``: names, ``*``, ``key=value``
  (``rse_type``, ``rse``, ``deterministic``, ``volatile``, ``id``... of the RSE table; any other
  key is an RSE attribute, of which the emulator knows only each RSE's own name), ``key<n>``,
  ``key>n``, ``|`` union, ``&`` intersection, ``\\`` complement, parentheses, left to right.

Errors are ``RucioError`` (HTTP status, Rucio exception class, message) with the real texts.
Replica states other than AVAILABLE, blocked RSEs, archives, client sites and signed URLs do
not exist here: every replica is available on an available RSE.
"""

from __future__ import annotations

import datetime
import hashlib
import random
import re
import uuid
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Any, NamedTuple, Optional

from prestaged.testing.rucio_spec import ProtocolSpec, RseSpec, RucioSpec

__all__ = [
    "CatalogFile",
    "ListRequest",
    "Rse",
    "RucioCatalog",
    "RucioError",
    "SyntheticFiles",
    "rse_expression",
]

SORTING_ALGORITHMS = ("geoip", "custom_table", "random")
"""rucio.common.constants.SORTING_ALGORITHMS."""
MAX_DIDS = 1000
"""maxItems of the ``r_dids`` schema (rucio.common.schema.generic.R_DIDS)."""
_R_DID_KEYS = frozenset({"scope", "name", "type", "meta", "rules", "bytes", "adler32", "md5",
                         "state", "pfn"})
_WORD = re.compile(r"\w")
_UUID_NS = uuid.UUID("6f1d6a3c-8d0e-4a51-9a57-1e7d5c0b2a11")

# rucio.core.rse_expression_parser, verbatim.
_DEFAULT_RSE_ATTRIBUTE = r'([A-Za-z0-9]+([_-][A-Za-z0-9]+)*)'
_RSE_ATTRIBUTE = r'([A-Za-z0-9\._-]+[=<>][A-Za-z0-9_-]+)'
_PRIMITIVE = rf'(\(*({_RSE_ATTRIBUTE}|{_DEFAULT_RSE_ATTRIBUTE}|\*)\)*)'
_PATTERN = rf'^{_PRIMITIVE}((\|{_PRIMITIVE})|(\&{_PRIMITIVE})|(\\{_PRIMITIVE}))*'
_BOOL_COLUMNS = ("deterministic", "volatile", "staging_area", "availability_read",
                 "availability_write", "availability_delete")


class RucioError(Exception):
    """An error answer of the real server: HTTP ``status``, Rucio exception class name
    ``exception_class`` and ``message`` (the ``ExceptionMessage``). ``text`` (not None) is a
    plain-text body instead: what Flask answers for an uncaught non-Rucio exception."""

    def __init__(self, status: int, exception_class: str, message: str,
                 text: Optional[str] = None) -> None:
        super().__init__(f"{status} {exception_class}: {message}")
        self.status = status
        self.exception_class = exception_class
        self.message = message
        self.text = text


@dataclass(frozen=True)
class Rse:
    """An RSE as the emulator serves it: ``id`` is 32 lower-case hex digits, fixed by name."""

    name: str
    id: str
    type: str
    protocols: tuple[ProtocolSpec, ...]
    deterministic: bool = True

    @classmethod
    def from_spec(cls, spec: RseSpec) -> Rse:
        """From a spec RSE; the id is derived from the name, so it is stable across runs."""
        return cls(spec.name, uuid.uuid5(_UUID_NS, spec.name).hex, spec.type, spec.protocols,
                   spec.deterministic)

    def column(self, key: str) -> Optional[str]:
        """The RSE table column ``key`` as text for an expression term (None: the column is
        empty for every emulated RSE); KeyError when ``key`` is not a column."""
        values = {"rse": self.name, "id": self.id, "rse_type": self.type, "vo": "def",
                  "deterministic": str(self.deterministic), "volatile": "False",
                  "staging_area": "False", "availability_read": "True",
                  "availability_write": "True", "availability_delete": "True"}
        if key in values:
            return values[key]
        if key in ("city", "region_code", "country_name", "continent", "time_zone", "ISP",
                   "ASN", "longitude", "latitude", "qos_class", "created_at", "updated_at",
                   "deleted_at", "deleted", "availability"):
            return None
        raise KeyError(key)


class CatalogFile(NamedTuple):
    """A file DID: size in bytes, checksums, and its replicas as (RSE name, path) pairs, the
    path relative to the protocol prefix. (A named tuple: 10^5 are made per benchmark run.)"""

    scope: str
    name: str
    bytes: int
    adler32: Optional[str]
    md5: Optional[str]
    replicas: tuple[tuple[str, str], ...]


def hash_path(scope: str, name: str) -> str:
    """Rucio's default ``hash`` lfn2pfn (rucio.rse.translation): ``scope/ab/cd/name`` with
    ``ab``/``cd`` from the MD5 of ``scope:name`` (dots of user/group scopes become ``/``)."""
    digest = hashlib.md5(f"{scope}:{name}".encode()).hexdigest()
    if scope.startswith(("user", "group")):
        scope = scope.replace(".", "/")
    return f"{scope}/{digest[0:2]}/{digest[2:4]}/{name}"


def _stored_path(rse: RseSpec, scope: str, name: str, pfn: Optional[str]) -> str:
    """The replica's path as Rucio stores it: on a non-deterministic RSE what ``parse_pfns``
    gives (``/`` + the part after the prefix), else the part after the prefix (the test kit
    stores it for an explicit PFN), else the ``hash`` path."""
    if pfn is None:
        return hash_path(scope, name)
    return rse.path_of(pfn) if rse.deterministic else "/" + rse.path_of(pfn)


@dataclass(frozen=True)
class SyntheticFiles:
    """``count`` generated files ``<scope>:<dataset>_<i:07d>.root`` (i from 0), 1 MiB each,
    with a replica on every RSE of ``rses`` at path ``<dataset>/<name>``, all in dataset
    ``<scope>:<dataset>``. Records are made when asked for, so 10^6 files cost nothing
    up front."""

    count: int
    scope: str = "dune"
    dataset: str = "synthetic"
    rses: tuple[str, ...] = ()
    size: int = 1 << 20

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"synthetic count {self.count} is negative")

    def index(self, scope: str, name: str) -> Optional[int]:
        """The number of file ``scope:name``, None when it is not one of these."""
        head = len(self.dataset) + 1
        digits = name[head:-5]
        if (scope != self.scope or len(name) != head + 12 or not name.endswith(".root")
                or not name.startswith(self.dataset) or name[head - 1] != "_"
                or not digits.isdigit()):
            return None
        i = int(digits)
        return i if i < self.count else None

    def file(self, i: int) -> CatalogFile:
        """File ``i``'s record (adler32: of the name, so each file has its own)."""
        name = f"{self.dataset}_{i:07d}.root"
        path = f"{self.dataset}/{name}"
        return CatalogFile(self.scope, name, self.size, f"{zlib.adler32(name.encode()):08x}",
                           None, tuple((rse, path) for rse in self.rses))


@dataclass(frozen=True)
class ListRequest:
    """The parameters of one ``POST /replicas/list`` the emulator acts on (see
    ``from_body``)."""

    dids: tuple[tuple[str, str], ...]
    schemes: Optional[tuple[str, ...]] = None
    rse_expression: Optional[str] = None
    domain: Optional[str] = None
    sort: Optional[str] = None
    limit: Optional[str] = None
    nrandom: Optional[int] = None
    resolve_parents: bool = False
    updated_after: Optional[datetime.datetime] = None

    @classmethod
    def from_body(cls, body: Mapping[str, Any], query: Mapping[str, str]) -> ListRequest:
        """Read a decoded JSON body and the query string as ListReplicas.post does, in its
        order: ``client_location``, the booleans, ``updated_after``, then (in the generator) the
        ``r_dids`` schema; raise the real ``RucioError`` for what it refuses."""
        if "client_location" in body:
            _client_location(body["client_location"])
        for key in ("unavailable", "ignore_availability", "all_states", "resolve_archives"):
            if key in body:
                _boolean(body[key], key)
        resolve_parents = _boolean(body.get("resolve_parents", False), "resolve_parents")
        updated_after = _updated_after(body.get("updated_after"))
        nrandom = body.get("nrandom")
        dids = body.get("dids", [])
        _validate_dids(dids)
        schemes = body.get("schemes")
        return cls(
            dids=tuple((str(d["scope"]), str(d["name"])) for d in dids or ()),
            schemes=tuple(schemes) if schemes else None,
            rse_expression=body.get("rse_expression") or None,
            domain=body.get("domain"),
            sort=query.get("sort", query.get("select", body.get("sort"))),
            limit=query.get("limit"), nrandom=int(nrandom) if nrandom else None,
            resolve_parents=resolve_parents, updated_after=updated_after)


def _client_location(value: Any) -> None:
    """The view's ``client_location.update(param_get(parameters, 'client_location'))``: what
    ``dict.update`` refuses (a string, a number, null) is uncaught, Flask's 500 with the text
    (``ErrorHandlingMethodView``)."""
    try:
        {}.update(value)
    except (TypeError, ValueError) as e:
        raise RucioError(500, type(e).__name__, str(e), text=str(e)) from e


def _boolean(value: Any, name: str) -> bool:
    """rucio.web.rest.flaskapi.v1.common.param_get_bool."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        value = f"{value}"
    if isinstance(value, str) and value.lower() in ("true", "1"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "0"):
        return False
    raise RucioError(400, "TypeError", f"'{name}' must be a boolean type.")


def _updated_after(value: Any) -> Optional[datetime.datetime]:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return datetime.datetime.fromtimestamp(value, datetime.timezone.utc).replace(
            tzinfo=None)
    try:
        return datetime.datetime.strptime(str(value), "%Y-%m-%dT%H:%M:%S")
    except ValueError as e:  # uncaught by the real view: Flask's 500 with the text
        raise RucioError(500, "ValueError", str(e), text=str(e)) from e


def _validate_dids(dids: Any) -> None:
    """The ``r_dids`` JSON schema, as rucio.common.schema.validate_schema applies it: an empty
    list is not checked (``if obj``); the message is the first line of jsonschema's."""
    if not dids:
        return
    problem = _dids_problem(dids)
    if problem is not None:
        raise RucioError(400, "InvalidObject", f"Problem validating r_dids: {problem}")


def _dids_problem(dids: Any) -> Optional[str]:
    if not isinstance(dids, list):
        return f"{dids!r} is not of type 'array'"
    if len(dids) > MAX_DIDS:
        return f"{dids!r} is too long"
    for did in dids:
        if not isinstance(did, dict):
            return f"{did!r} is not of type 'object'"
        if not did.keys() <= _R_DID_KEYS:
            extra = [k for k in did if k not in _R_DID_KEYS]
            listed = ", ".join(repr(k) for k in extra)
            return (f"Additional properties are not allowed ({listed} "
                    f"{'was' if len(extra) == 1 else 'were'} unexpected)")
        for key in ("scope", "name"):
            if key not in did:
                return f"{key!r} is a required property"
            if not isinstance(did[key], str):
                return f"{did[key]!r} is not of type 'string'"
            if not _WORD.search(did[key]):
                return f"{did[key]!r} does not match '\\\\w'"
    return None


# --- RSE expressions ---------------------------------------------------------------------------


def rse_expression(expression: str, rses: Mapping[str, Rse]) -> list[Rse]:
    """The RSEs ``expression`` selects (rucio.core.rse_expression_parser.parse_expression),
    or ``RucioError``: InvalidRSEExpression (500: the list view does not catch it) for bad
    syntax or an empty result, InvalidObject (400) for a bad ``rse_type``/boolean value."""
    opened = closed = 0
    for char in expression:
        opened += char == "("
        closed += char == ")"
        if closed > opened:
            raise _invalid_expression("Problem with parentheses.")
    if opened != closed:
        raise _invalid_expression("Problem with parentheses.")
    match = re.match(_PATTERN, expression)
    if match is None or match.group() != expression:
        raise _invalid_expression("Expression does not comply to RSE Expression syntax")
    names = _term(expression, rses)[0]
    if not names:
        raise _invalid_expression("RSE Expression resulted in an empty set.")
    return [rses[n] for n in sorted(names)]


def _invalid_expression(message: str) -> RucioError:
    return RucioError(500, "InvalidRSEExpression", message)


def _term(expression: str, rses: Mapping[str, Rse]) -> tuple[set[str], str]:
    """Evaluate left to right without precedence, as ``__resolve_term_expression`` does."""
    left: Optional[set[str]] = None
    operator = ""
    rest = expression
    while rest:
        if rest[0] in "\\&|":
            operator, rest = rest[0], rest[1:]
            continue
        if rest[0] == "(":
            inner = _extract_term(rest)
            right = _term(inner, rses)[0]
            rest = rest[len(inner) + 2:]
        else:
            found = re.match(_PRIMITIVE, rest)
            primitive = found.group() if found else ""
            right = _primitive(primitive, rses)
            rest = rest[len(primitive):]
        if left is None:
            left = right
        elif operator == "|":
            left = left | right
        elif operator == "&":
            left = left & right
        else:
            left = left - right
    return left or set(), expression


def _extract_term(expression: str) -> str:
    depth = 0
    for i, char in enumerate(expression):
        depth += (char == "(") - (char == ")")
        if depth == 0:
            return expression[1:i]
    raise _invalid_expression("Problem with parentheses.")


def _primitive(text: str, rses: Mapping[str, Rse]) -> set[str]:
    for op in "=<>":
        if op in text:
            key, value = text.split(op)[:2]
            if op == "=":
                return {r.name for r in rses.values() if _equals(r, key, value)}
            return set()  # numeric comparisons look at RSE attributes, which none has here
    if "*" in text:
        return set(rses)
    # A bare name is the attribute ``<name>=True`` that every RSE has for its own name.
    return {text} & set(rses)


def _equals(rse: Rse, key: str, value: str) -> bool:
    try:
        have = rse.column(key)
    except KeyError:
        return False  # an RSE attribute: none exists but the name tag, whose value is True
    if key == "rse_type" and value not in ("DISK", "TAPE"):
        raise RucioError(400, "InvalidObject", f"Invalid rse_type: {value}")
    if key in _BOOL_COLUMNS:
        if value == "1" or value.casefold() == "true":
            value = "True"
        elif value == "0" or value.casefold() == "false":
            value = "False"
        else:
            raise RucioError(400, "InvalidObject", f"Invalid boolean value: {value}")
    return have is not None and have == value


# --- the catalog -------------------------------------------------------------------------------


class RucioCatalog:
    """RSEs, files and datasets of a ``RucioSpec`` plus ``synthetic`` files (see the module
    docstring for what ``list_replicas`` answers). ``now`` is when every replica was last
    updated (for ``updated_after``; default: construction time)."""

    def __init__(self, spec: RucioSpec, synthetic: Optional[SyntheticFiles] = None,
                 now: Optional[datetime.datetime] = None) -> None:
        self.rses = {r.name: Rse.from_spec(r) for r in spec.rses}
        self.synthetic = synthetic
        if synthetic is not None:
            unknown = [r for r in synthetic.rses if r not in self.rses]
            if unknown:
                raise ValueError(f"synthetic files on unknown RSEs {unknown}")
        self.updated_at = now or datetime.datetime.now(datetime.timezone.utc).replace(
            tzinfo=None)
        self._files: dict[tuple[str, str], CatalogFile] = {}
        for f in spec.files:
            replicas = tuple((rse, _stored_path(spec.rse(rse), f.scope, f.name, pfn))
                             for rse, pfn in f.replicas.items())
            self._files[(f.scope, f.name)] = CatalogFile(f.scope, f.name, f.bytes, f.adler32,
                                                         f.md5, replicas)
        self._datasets: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
            (d.scope, d.name): tuple((s, n) for s, n in (did.split(":", 1) for did in d.files))
            for d in spec.datasets}
        self._parents: dict[tuple[str, str], list[str]] = {}
        for (scope, name), members in self._datasets.items():
            for member in members:
                self._parents.setdefault(member, []).append(f"{scope}:{name}")

    def file(self, scope: str, name: str) -> Optional[CatalogFile]:
        """The file ``scope:name``, None when no such file exists."""
        found = self._files.get((scope, name))
        if found is None and self.synthetic is not None:
            i = self.synthetic.index(scope, name)
            if i is not None:
                return self.synthetic.file(i)
        return found

    def dataset_files(self, scope: str, name: str) -> Optional[Iterable[CatalogFile]]:
        """The files of dataset ``scope:name`` (None: no such dataset)."""
        members = self._datasets.get((scope, name))
        if members is not None:
            return [f for f in (self.file(s, n) for s, n in members) if f is not None]
        syn = self.synthetic
        if syn is not None and (scope, name) == (syn.scope, syn.dataset):
            return (syn.file(i) for i in range(syn.count))
        return None

    def parents(self, scope: str, name: str) -> list[str]:
        """The datasets holding file ``scope:name``, as ``scope:name`` strings."""
        syn = self.synthetic
        if syn is not None and syn.index(scope, name) is not None:
            return [f"{syn.scope}:{syn.dataset}"]
        return list(self._parents.get((scope, name), ()))

    # --- listing

    def list_replicas(self, req: ListRequest) -> Iterator[str]:
        """The answer lines of ``req`` in order, each a record as the server writes it:
        ``json.dumps(record) + "\\n"`` (see the module docstring for the records). Raises
        ``RucioError`` before the first line for what the real server refuses up front; a
        record that cannot be made raises it while iterating (the real stream breaks
        there)."""
        dids = dict.fromkeys(req.dids)
        if not dids:
            return iter(())
        allowed = (None if req.rse_expression is None else
                   {r.name for r in rse_expression(req.rse_expression, self.rses)})
        fresh = req.updated_after is None or self.updated_at >= req.updated_after
        chosen = self._files_for(dids, allowed, fresh)
        if req.nrandom:
            chosen = _pick_n_random(req.nrandom, chosen)
        return _Renderer(self, req, allowed, fresh).lines(chosen)

    def _files_for(self, dids: Iterable[tuple[str, str]], allowed: Optional[set[str]],
                   fresh: bool) -> list[CatalogFile]:
        picked: dict[tuple[str, str], CatalogFile] = {}
        for scope, name in dids:
            f = self.file(scope, name)
            if f is not None:
                picked[(scope, name)] = f
                continue
            for member in self.dataset_files(scope, name) or ():
                if fresh and any(allowed is None or rse in allowed
                                 for rse, _ in member.replicas):
                    picked.setdefault((member.scope, member.name), member)
        return [picked[k] for k in sorted(picked)]


_esc = encode_basestring_ascii  # what json.dumps does to a str (ensure_ascii)
# (domain, PFN base, protocol priority, rse_id, rse name, the entry's JSON up to "priority": ,
# whether a stored path keeps its leading "/": only the root scheme's protocols (xrootd's and
# gfal's lfns2pfns) keep it; the others drop it)
_Door = tuple[str, str, int, str, str, str, bool]
_ENTRY_END = ', "client_extract": false}'


class _Renderer:
    """Makes the answer lines of one request: the JSON text ``json.dumps`` would give for the
    record, built directly (a test holds the two equal) because this is the hot path of a
    benchmark listing 10^5 files."""

    def __init__(self, catalog: RucioCatalog, req: ListRequest, allowed: Optional[set[str]],
                 fresh: bool) -> None:
        self.catalog = catalog
        self.req = req
        self.allowed = allowed
        self.fresh = fresh
        self.doors: dict[str, list[_Door]] = {}  # per RSE, made on first use as the server does

    def _doors(self, rse_name: str) -> list[_Door]:
        doors = self.doors.get(rse_name)
        if doors is None:
            rse = self.catalog.rses[rse_name]
            doors = self.doors[rse_name] = [
                (domain, base, priority, rse.id, rse.name,
                 f'{{"rse_id": {_esc(rse.id)}, "rse": {_esc(rse.name)}, "type": '
                 f'{_esc(rse.type)}, "volatile": false, "domain": {_esc(domain)}, "priority": ',
                 base.startswith("root:"))
                for domain, base, priority in _protocols(rse, self.req.domain, self.req.schemes)]
        return doors

    def lines(self, files: Iterable[CatalogFile]) -> Iterator[str]:
        """One line per file."""
        for f in files:
            yield self.line(f)

    def line(self, f: CatalogFile) -> str:
        """The record of ``f``."""
        states: dict[str, None] = {}
        pfns: dict[str, _Door] = {}
        allowed = self.allowed
        for rse_name, path in f.replicas if self.fresh else ():
            if allowed is not None and rse_name not in allowed:
                continue
            states[rse_name] = None
            for door in self._doors(rse_name):
                url = door[1] + (path[1:] if path[:1] == "/" and not door[6] else path)
                pfns[url] = door  # the same URL twice: the later entry stays
        # The core numbers PFNs by (domain, protocol priority, URL) and lists them per RSE by
        # (rse_id, that number, URL) ...
        # (The raw URL sorts; the JSON-escaped one is written.)
        core = sorted([(door[0], door[2], url, _esc(url), door) for url, door in pfns.items()])
        rses: dict[str, list[str]] = {}
        for _, _, url, name in sorted([(door[3], i, url, door[4])
                                       for i, (_, _, _, url, door) in enumerate(core)]):
            rses.setdefault(name, []).append(url)
        # ... and the REST layer puts lan first, then the sorted wan ones, numbered again.
        final = [c for c in core if c[0] == "lan"]
        wan = [c for c in core if c[0] != "lan"] if final else core
        if wan:
            self._sort(wan)
        final += wan
        if final and self.req.limit is not None:
            # request.args.get('limit') is text, compared with an int: a TypeError, a 500.
            text = "'<=' not supported between instances of 'int' and 'str'"
            raise RucioError(500, "TypeError", text, text=text)
        parts = [f'{{"scope": {_esc(f.scope)}, "name": {_esc(f.name)}, "bytes": {f.bytes}, '
                 f'"md5": {_nullable(f.md5)}, "adler32": {_nullable(f.adler32)}, "pfns": {{',
                 ", ".join([f"{c[3]}: {c[4][5]}{i}{_ENTRY_END}"
                            for i, c in enumerate(final, start=1)]),
                 '}, "rses": {',
                 ", ".join([f"{_esc(rse)}: [{', '.join(urls)}]" for rse, urls in rses.items()]),
                 '}, "states": {',
                 ", ".join([f'{_esc(rse)}: "AVAILABLE"' for rse in states]), "}"]
        if self.req.resolve_parents:
            parents = self.catalog.parents(f.scope, f.name)
            parts.append(f', "parents": [{", ".join([_esc(p) for p in parents])}]')
        parts.append("}\n")
        return "".join(parts)

    def _sort(self, wan: list[tuple[str, int, str, str, _Door]]) -> None:
        """sort_replicas: geoip (no database offline: the order stays), random, or the real
        error for an unknown algorithm."""
        sort = self.req.sort
        if sort and sort not in SORTING_ALGORITHMS:
            raise RucioError(400, "SortingAlgorithmNotSupported",
                             f"Sorting algorithm: {sort} is not supported. Supported "
                             f"protocols: {list(SORTING_ALGORITHMS)}")
        if sort == "random":
            random.shuffle(wan)


def _nullable(text: Optional[str]) -> str:
    return "null" if text is None else _esc(text)


def _protocols(rse: Rse, domain: Optional[str], schemes: Optional[Sequence[str]]
               ) -> list[tuple[str, str, int]]:
    """(domain, PFN base, scheme priority) per PFN to make on ``rse``
    (``_get_list_replicas_protocols``)."""
    domains = ["wan", "lan"] if domain == "all" else ["wan" if domain is None else domain]
    if any(d not in ("wan", "lan") for d in domains):
        return []  # RSEProtocolDomainNotSupported, printed and passed over by the server
    # Priorities by scheme, a later protocol of the same scheme overwriting (a dict there).
    priority = {p.scheme: i for i, p in enumerate(rse.protocols, start=1)}
    wanted = list(schemes) if schemes else [rse.protocols[0].scheme] * len(domains) \
        if rse.protocols else []
    out: list[tuple[str, str, int]] = []
    for scheme in wanted:
        proto = next((p for p in rse.protocols if p.scheme == scheme), None)
        if proto is None:
            continue  # RSEProtocolNotSupported
        out.extend((d, proto.base, priority[scheme]) for d in domains)
    return out


def _pick_n_random(n: int, files: Sequence[CatalogFile]) -> list[CatalogFile]:
    """rucio.core.replica._pick_n_random: reservoir sampling, the first ``n`` kept in place
    until replaced."""
    selected = list(files[:n])
    for i, f in enumerate(files[n:], start=n + 1):
        slot = random.randint(0, i)
        if slot < n:
            selected[slot] = f
    return selected
