"""A MetaCat server emulator for tests, benchmarks and ``prestaged demo --catalog metacat``.

``MetaCatServer`` serves the read-only part of MetaCat's data API on 127.0.0.1, with the paths,
parameters and formats the real server (``fermitools/metacat`` 4.x, ``webserver/data_handler.py``)
gives the real client (``metacat.webapi.MetaCatClient`` of the PyPI package ``metacat-client``),
under ``http://127.0.0.1:<port><prefix>`` (``prefix`` like DUNE's ``/dune_meta_prod/app``):

=====================================================  ==========================================
``GET /data/dataset?dataset=ns:name``                  JSON object of the dataset, ``file_count``
``GET /data/dataset_files?dataset=ns:name``            ``application/json-seq``: one file record
  ``&with_metadata=yes|no``                            each, in no promised order
``POST /data/query?with_meta=yes|no`` (MQL as body)    ``application/json-seq`` file records
  ``&summary=count|keys``                              JSON ``{"count", "total_size"}`` | keys
``GET /data/version``                                  text: the server version
=====================================================  ==========================================

A ``application/json-seq`` stream (RFC 7464) is chunked; each record is the byte 0x1E, the JSON
object and ``\\n``; the content type carries no charset (the 4.x client insists on the exact
type). A file record has ``fid``, ``namespace``, ``name``, ``size``, ``checksums``,
``created_timestamp``, ``creator``, ``retired``, and ``metadata`` when asked for.

MQL understood (anything else is the real server's 400 ``MQLSyntaxError: ...``)::

    files from ns:name [where COND [and COND ...]]
    (QUERY) [ordered] [skip N] [limit M]     also without the parentheses
    COND: key = v | key == v | key != v | key < v | key > v | key <= v | key >= v
          | key in (v, ...) | key not in (v, ...)       v: 'text', "text", number, true, false
    # to the end of the line is a comment (``MQLQuery.parse`` cuts it, even in a string)

A key missing from a file's metadata matches no condition (SQL's NULL). ``ordered`` sorts by
creation time, then fid; unordered results come in a fixed order that is deliberately neither
the creation nor the insertion order, so a client relying on an order it did not ask for fails.
With ``reorder`` a dataset's files come in another order on every ``dataset_files`` request (a
retried listing included): the real handler streams them with no ``ORDER BY``, and PostgreSQL
may answer the same scan in another order (``synchronize_seqscans``).
The real client pages ``query(q, batch_size=N)`` as ``(q) ordered skip K limit N``.

Errors as the real server (``webserver/data_handler.py``, ``common_handler.py``, served by
webpie) gives them: an unknown dataset is 404 ``Dataset not found`` for
``dataset``/``dataset_files`` and an empty 200 stream inside a query; bad MQL is 400
``MQLSyntaxError: ...``; these handler errors are text of webpie's default type
(``text/html; charset=UTF-8``). A dataset spec or ``namespace`` outside ``[a-z0-9_./-]`` is
``@sanitized``'s 400 with a JSON body ``{"message": "Invalid value: ...", "code": "400 Bad
Request", "title": "Bad Request"}`` (``application/json``). An exception no handler catches is
webpie's ``500 Application Error`` HTML page: a dataset spec without ``:`` (the unpacking of
``split(":", 1)``), and a string constant holding a quote (the parser's ``ValueError``, whose
missing ``Message`` the query handler trips over).

The real server needs no token to read (its data handlers never look at one); given ``token``,
the emulator plays a deployment that does: a request whose token (the ``auth_token`` cookie,
else ``X-Authentication-Token``, else ``Authorization: Bearer``, the scheme in any case, as
``AuthenticationCore.token_from_request`` looks) is not ``token`` is answered 401 before it is
served.

Every request is counted per endpoint (``stats.requests``), every MQL text kept
(``stats.queries``). ``ThreadedMetaCatServer`` runs it in a thread for synchronous clients;
``python -m prestaged.testing.metacat --datasets FILE`` (or ``--synthetic ns:name=COUNT``) runs it
as a process. Datasets files are JSON or TOML: ``{"datasets": {"ns:name": [{"namespace": "ns",
"name": "a.root", "size": 1, "metadata": {"core.runs": 5}}, ...]}}``. Not for production:
everything is kept in memory.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import re
import ssl
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from aiohttp import web

from prestaged.testing.appserver import AppServer, ThreadedAppServer
from prestaged.testing.pki import load_or_create_pki

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib

__all__ = [
    "DATASET",
    "DATASET_FILES",
    "ENDPOINTS",
    "QUERY",
    "VERSION",
    "MQLSyntaxError",
    "MetaCatFile",
    "MetaCatServer",
    "MetaCatStats",
    "ThreadedMetaCatServer",
    "load_datasets",
    "main",
    "parse_mql",
    "synthetic_files",
]

DATASET = "dataset"
DATASET_FILES = "dataset_files"
QUERY = "query"
VERSION = "version"
ENDPOINTS = (DATASET, DATASET_FILES, QUERY, VERSION)
"""Endpoint names of ``stats.requests``."""

SERVER_VERSION = "4.1.4"
JSON_SEQ = "application/json-seq"
_RS = b"\x1e"
_RECORDS_PER_WRITE = 1000
_BASE_TIME = 1_700_000_000.0
_SAFE_NAME = re.compile(r"[a-z0-9_./-]+", re.IGNORECASE)
_CACHED_RESULTS = 8

_Handler = Callable[[web.Request], Coroutine[Any, Any, web.StreamResponse]]
Value = Union[str, int, float, bool]


@dataclass(frozen=True)
class MetaCatFile:
    """One file MetaCat knows: ``namespace:name``, ``fid`` (hex text; "" = assigned when
    added), ``size`` (bytes), ``metadata`` (MetaCat's flat ``category.key`` dict),
    ``created_timestamp`` (Unix seconds; 0 = assigned in the order files are added)."""

    namespace: str
    name: str
    fid: str = ""
    size: int = 0
    metadata: Mapping[str, Any] = field(default_factory=dict)
    checksums: Mapping[str, str] = field(default_factory=dict)
    created_timestamp: float = 0.0

    @classmethod
    def from_obj(cls, obj: Union[Mapping[str, Any], MetaCatFile]) -> MetaCatFile:
        """From a ``MetaCatFile`` or a dict with the same keys (``namespace`` and ``name``
        required; a ``did`` ``"ns:name"`` may stand for both)."""
        if isinstance(obj, MetaCatFile):
            return obj
        namespace, name = obj.get("namespace"), obj.get("name")
        if "did" in obj:
            namespace, name = str(obj["did"]).split(":", 1)
        return cls(
            namespace=str(namespace), name=str(name), fid=str(obj.get("fid", "")),
            size=int(obj.get("size", 0)), metadata=dict(obj.get("metadata", {})),
            checksums=dict(obj.get("checksums", {})),
            created_timestamp=float(obj.get("created_timestamp", 0.0)),
        )

    def record(self, with_metadata: bool) -> dict[str, Any]:
        """The file as the real server's ``to_jsonable`` writes it."""
        out: dict[str, Any] = {
            "fid": self.fid, "namespace": self.namespace, "name": self.name,
            "size": self.size, "checksums": dict(self.checksums),
            "created_timestamp": self.created_timestamp, "creator": "emulator",
            "updated_timestamp": None, "updated_by": None,
            "retired": False, "retired_timestamp": None, "retired_by": None,
        }
        if with_metadata:
            out["metadata"] = dict(self.metadata)
        return out


@dataclass
class MetaCatStats:
    """Requests per endpoint (``ENDPOINTS``), the MQL texts queried in order, the requests
    that carried a token, and the 401s for want of the configured token."""

    requests: Counter[str] = field(default_factory=Counter)
    queries: list[str] = field(default_factory=list)
    token_requests: int = 0
    auth_refusals: int = 0

    @property
    def total(self) -> int:
        """Requests of every endpoint."""
        return sum(self.requests.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready snapshot."""
        return {"requests": dict(self.requests), "total": self.total, "queries": self.queries,
                "token_requests": self.token_requests, "auth_refusals": self.auth_refusals}


# --- MQL ---------------------------------------------------------------------------------------


class MQLSyntaxError(ValueError):
    """MQL the emulator does not understand; the server answers 400 ``MQLSyntaxError: ...``."""


class UnsafeString(ValueError):
    """A string constant holding a quote: the real parser's ``ValueError`` ("Unsafe string
    constant"), whose missing ``Message`` the query handler trips over: a 500."""


@dataclass(frozen=True)
class Cond:
    """``key op value`` (op ``in``/``not in``: ``value`` is a tuple)."""

    key: str
    op: str
    value: Union[Value, tuple[Value, ...]]

    def matches(self, metadata: Mapping[str, Any]) -> bool:
        """Whether ``metadata`` satisfies this condition (a missing key never does)."""
        if self.key not in metadata:
            return False
        have = metadata[self.key]
        if isinstance(self.value, tuple):
            found = any(_equal(have, v) for v in self.value)
            return found if self.op == "in" else not found
        if self.op in ("=", "=="):
            return _equal(have, self.value)
        if self.op == "!=":
            return not _equal(have, self.value)
        if not _comparable(have, self.value):
            return False
        return bool({"<": have < self.value, ">": have > self.value,
                     "<=": have <= self.value, ">=": have >= self.value}[self.op])


@dataclass(frozen=True)
class FilesFrom:
    """``files from did [where conds]``."""

    did: str
    where: tuple[Cond, ...] = ()


@dataclass(frozen=True)
class Page:
    """``(inner) [ordered] [skip N] [limit M]``."""

    inner: Union[FilesFrom, Page]
    ordered: bool = False
    skip: int = 0
    limit: Optional[int] = None


Query = Union[FilesFrom, Page]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _equal(have: Any, want: Value) -> bool:
    if _is_number(have) and _is_number(want):
        return bool(have == want)
    return type(have) is type(want) and bool(have == want)


def _comparable(have: Any, want: Value) -> bool:
    return (_is_number(have) and _is_number(want)) or (
        isinstance(have, str) and isinstance(want, str))


_TOKEN = re.compile(r"""\s*(?:
    (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<num>[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w:./-]))
  | (?P<op>==|!=|<=|>=|=|<|>|\(|\)|,)
  | (?P<word>[A-Za-z0-9_][A-Za-z0-9_.:/-]*)
)""", re.VERBOSE)
_KEYWORDS = frozenset({"files", "from", "where", "and", "in", "not", "ordered", "skip", "limit"})


class _Parser:
    def __init__(self, text: str, namespace: Optional[str]) -> None:
        self.tokens: list[tuple[str, str]] = []
        self.namespace = namespace
        pos, text = 0, text.rstrip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None or m.lastgroup is None:
                raise MQLSyntaxError(f"unexpected text at {pos}: {text[pos:pos + 20]!r}")
            kind, tok = m.lastgroup, m.group(m.lastgroup)
            if kind == "word" and tok.lower() in _KEYWORDS:
                kind, tok = "kw", tok.lower()
            self.tokens.append((kind, tok))
            pos = m.end()
        self.i = 0

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.i] if self.i < len(self.tokens) else ("end", "")

    def take(self, kind: str, text: Optional[str] = None) -> str:
        k, t = self.peek()
        if k != kind or (text is not None and t != text):
            raise MQLSyntaxError(f"expected {text or kind}, found {t or 'end of query'!r}")
        self.i += 1
        return t

    def accept(self, kind: str, text: str) -> bool:
        if self.peek() == (kind, text):
            self.i += 1
            return True
        return False

    def query(self) -> Query:
        q: Query
        if self.accept("op", "("):
            q = self.query()
            self.take("op", ")")
        else:
            self.take("kw", "files")
            self.take("kw", "from")
            q = FilesFrom(self.did(), self.where())
        while self.peek()[1] in ("ordered", "skip", "limit") and self.peek()[0] == "kw":
            ordered = self.accept("kw", "ordered")
            skip = self.count() if self.accept("kw", "skip") else 0
            limit = self.count() if self.accept("kw", "limit") else None
            q = Page(q, ordered, skip, limit)
        return q

    def did(self) -> str:
        did = self.take("word")
        if ":" not in did:
            if not self.namespace:
                raise MQLSyntaxError(f"dataset {did!r} without a namespace")
            did = f"{self.namespace}:{did}"
        return did

    def count(self) -> int:
        text = self.take("num")
        if not text.isdigit():
            raise MQLSyntaxError(f"expected a count, found {text!r}")
        return int(text)

    def where(self) -> tuple[Cond, ...]:
        if not self.accept("kw", "where"):
            return ()
        conds = [self.cond()]
        while self.accept("kw", "and"):
            conds.append(self.cond())
        return tuple(conds)

    def cond(self) -> Cond:
        key = self.take("word")
        negate = self.accept("kw", "not")
        if negate or self.peek() == ("kw", "in"):
            self.take("kw", "in")
            self.take("op", "(")
            values = [self.value()]
            while self.accept("op", ","):
                values.append(self.value())
            self.take("op", ")")
            return Cond(key, "not in" if negate else "in", tuple(values))
        op = self.take("op")
        if op not in ("=", "==", "!=", "<", ">", "<=", ">="):
            raise MQLSyntaxError(f"expected a comparison after {key!r}, found {op!r}")
        return Cond(key, op, self.value())

    def value(self) -> Value:
        kind, tok = self.peek()
        self.i += 1
        if kind == "str":
            if "'" in tok[1:-1] or '"' in tok[1:-1]:
                raise UnsafeString(f"Unsafe string constant containing double or single "
                                   f"quote: {tok[1:-1]!r}")
            return re.sub(r"\\(.)", r"\1", tok[1:-1])
        if kind == "num":
            return float(tok) if any(c in tok for c in ".eE") else int(tok)
        if kind == "word" and tok.lower() in ("true", "false"):
            return tok.lower() == "true"
        raise MQLSyntaxError(f"expected a value, found {tok or 'end of query'!r}")


def parse_mql(text: str, namespace: Optional[str] = None) -> Query:
    """Parse the MQL subset of the module docstring (``#`` comments included); ``namespace``
    completes a dataset name given without one. Raises ``MQLSyntaxError``, or
    ``UnsafeString`` for a string constant holding a quote."""
    # MQLQuery.parse: "#" to the end of a line is a comment (inside a string constant too).
    text = "\n".join(line.split("#", 1)[0] for line in text.split("\n"))
    parser = _Parser(text, namespace)
    q = parser.query()
    if parser.peek()[0] != "end":
        raise MQLSyntaxError(f"unexpected {parser.peek()[1]!r} after the query")
    return q


# --- the server --------------------------------------------------------------------------------


def _text(status: int, text: str) -> web.Response:
    """A handler's ``return status, text``: webpie's response of the default type."""
    return web.Response(status=status, text=text, content_type="text/html", charset="UTF-8")


def _json(doc: Any, status: int = 200) -> web.Response:
    """A handler's ``return json.dumps(doc), "application/json"``: no charset (webob adds one
    to text/* and XML types only)."""
    return web.Response(status=status, body=json.dumps(doc).encode(),
                        content_type="application/json")


def _invalid(message: str) -> web.Response:
    """``@sanitized``'s answer to a ``SanitizeException`` (``common_handler._error_response``):
    400 with a JSON body, unlike the handlers' own text errors."""
    return _json({"message": message, "code": "400 Bad Request", "title": "Bad Request"}, 400)


def _application_error(headline: str) -> web.Response:
    """webpie's ``applicationErrorResponse`` for an exception no handler caught (the real
    page carries the traceback too)."""
    return web.Response(
        status=500, reason="Application Error", content_type="text/html", charset="UTF-8",
        text=f"<html><body><h2>Application error</h2>\n            <h3>{headline}</h3>\n"
             "            <pre>\nTraceback (most recent call last): ...</pre>\n"
             "            </body>\n            </html>")


class MetaCatServer(AppServer):
    """The emulator (see the module docstring). Use ``async with`` or ``start()``/``stop()``.

    ``datasets``: ``"ns:name"`` -> files (``MetaCatFile`` or dicts, see ``from_obj``).
    ``token`` (None: reads are open, as on the real server): the exact token text a request
    must carry. ``prefix``: the application prefix before ``/data``. ``ssl_context`` (None:
    plain HTTP) serves HTTPS instead. ``reorder``: every dataset listing in another order
    (see the module docstring).
    """

    def __init__(
        self,
        *,
        datasets: Optional[Mapping[str, Iterable[Any]]] = None,
        token: Optional[str] = None,
        prefix: str = "/dune_meta_prod/app",
        ssl_context: Optional[ssl.SSLContext] = None,
        host: str = "127.0.0.1",
        port: int = 0,
        reorder: bool = False,
    ) -> None:
        self.token = token
        self.reorder = reorder
        self._listings = 0
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        super().__init__(ssl_context, host, port)
        self.stats = MetaCatStats()
        self._datasets: dict[str, list[MetaCatFile]] = {}
        self._created: dict[str, float] = {}
        self._files: dict[tuple[str, str], MetaCatFile] = {}
        self.cut_next: Optional[int] = None
        """Cut the next listing (or query page) off after this many records."""
        self._results: OrderedDict[Query, list[MetaCatFile]] = OrderedDict()
        for did, files in (datasets or {}).items():
            self.add_dataset(did, files)

    # --- content (call on the server's loop, or through the threaded wrapper)

    def add_dataset(self, did: str, files: Iterable[Any]) -> None:
        """Create (or replace) dataset ``did`` (``"ns:name"``) holding ``files``. A file without
        a fid or creation time keeps those it got in another dataset, else gets the next ones."""
        if ":" not in did:
            raise ValueError(f"dataset {did!r}: expected namespace:name")
        members = []
        for obj in files:
            f = MetaCatFile.from_obj(obj)
            known = self._files.get((f.namespace, f.name))
            if not f.fid or not f.created_timestamp:
                # A file already declared (in another dataset) keeps its fid and age, as one
                # MetaCat file belongs to many datasets.
                number = len(self._files) + 1
                f = MetaCatFile(
                    f.namespace, f.name, f.fid or (known.fid if known else f"{number:016x}"),
                    f.size, f.metadata, f.checksums, f.created_timestamp or (
                        known.created_timestamp if known else _BASE_TIME + number))
            self._files[(f.namespace, f.name)] = f
            members.append(f)
        self._datasets[did] = members
        self._created[did] = time.time()
        self._results.clear()

    def reset_stats(self) -> None:
        """Forget every request seen so far."""
        self.stats = MetaCatStats()

    # --- lifecycle

    def _app(self) -> web.Application:
        app = web.Application()
        data = self.prefix + "/data"
        app.add_routes([
            web.get(data + "/dataset", self._wrap(DATASET, self._dataset)),
            web.get(data + "/dataset_files", self._wrap(DATASET_FILES, self._dataset_files)),
            web.post(data + "/query", self._wrap(QUERY, self._query)),
            web.get(data + "/version", self._wrap(VERSION, self._version)),
        ])
        return app

    @property
    def base_url(self) -> str:
        """The client's ``server_url``: ``http(s)://127.0.0.1:<port><prefix>``."""
        scheme = "https" if self._ssl is not None else "http"
        return f"{scheme}://{self.host}:{self.port}{self.prefix}"

    # --- request handling

    def _wrap(self, endpoint: str, handler: _Handler) -> _Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.stats.requests[endpoint] += 1
            refused = self._authorize(request)
            return refused if refused is not None else await handler(request)

        return handle

    def _authorize(self, request: web.Request) -> Optional[web.Response]:
        """None when ``request`` may be served, else the 401."""
        # AuthenticationCore.token_from_request's order: the auth_token cookie, then
        # X-Authentication-Token, then an Authorization header of scheme bearer (any case).
        sent = request.cookies.get("auth_token") or request.headers.get("X-Authentication-Token")
        if not sent:
            scheme, _, rest = request.headers.get("Authorization", "").strip().partition(" ")
            sent = rest.strip() if scheme.lower() == "bearer" else None
        self.stats.token_requests += int(bool(sent))
        if self.token is None or sent == self.token:
            return None
        self.stats.auth_refusals += 1
        return _text(401, "Token verification failed" if sent else "Authentication required")

    def _lookup(self, request: web.Request) -> Union[str, web.Response]:
        """The ``dataset`` parameter as a known did, or the real server's error answer."""
        spec = request.query.get("dataset", "")
        if ":" not in spec:
            # The real handler's unpacking of split(":", 1) raises, uncaught: a 500.
            return _application_error("not enough values to unpack (expected 2, got 1)")
        for word in spec.split(":", 1):
            if word and not _SAFE_NAME.fullmatch(word):
                return _invalid(f"Invalid value: {word}")
        if spec not in self._datasets:
            return _text(404, "Dataset not found")
        return spec

    async def _version(self, request: web.Request) -> web.StreamResponse:
        return _text(200, SERVER_VERSION)

    async def _dataset(self, request: web.Request) -> web.StreamResponse:
        did = self._lookup(request)
        if isinstance(did, web.Response):
            return did
        namespace, name = did.split(":", 1)
        return _json({
            "namespace": namespace, "name": name, "frozen": False, "monotonic": False,
            "creator": "emulator", "created_timestamp": self._created[did], "description": "",
            "metadata": {}, "file_meta_requirements": {}, "updated_by": None,
            "updated_timestamp": None, "file_count": len(self._datasets[did]),
        })

    async def _dataset_files(self, request: web.Request) -> web.StreamResponse:
        did = self._lookup(request)
        if isinstance(did, web.Response):
            return did
        with_metadata = request.query.get("with_metadata", "no") == "yes"
        files = self._unordered(did)
        self._listings += 1
        if self.reorder:  # another order on every request, reproducibly across test runs
            files = random.Random(self._listings).sample(files, len(files))
        return await self._stream(request, files, with_metadata)

    async def _query(self, request: web.Request) -> web.StreamResponse:
        # The real server takes the MQL from a ``query`` parameter first, else the body.
        text = request.query.get("query")
        if text is None:
            text = (await request.read()).decode("utf-8", "replace")
        self.stats.queries.append(text)
        if request.query.get("summary") not in ("count", "keys", None):
            return _text(400, f"Unsupported summary type: {request.query['summary']}")
        namespace = request.query.get("namespace") or None
        if namespace is not None and not _SAFE_NAME.fullmatch(namespace):
            return _invalid(f"Invalid value for namespace: {namespace}")
        if not text:
            return web.Response(body=b"[]", content_type="application/json")
        try:
            q = parse_mql(text, namespace)
        except UnsafeString:
            return _application_error("'ValueError' object has no attribute 'Message'")
        except MQLSyntaxError as e:
            return _text(400, f"MQLSyntaxError: {e}")
        files = self._evaluate(q)
        summary = request.query.get("summary")
        if summary == "count":
            return _json({"count": len(files), "total_size": sum(f.size for f in files)})
        if summary == "keys":
            return _json(sorted({k for f in files for k in f.metadata}))
        with_meta = request.query.get("with_meta", "no") == "yes"
        return await self._stream(request, files, with_meta)

    def _unordered(self, did: str) -> list[MetaCatFile]:
        """A dataset's files in a fixed order that is neither creation nor insertion order."""
        return self._evaluate(FilesFrom(did))

    def _evaluate(self, q: Query) -> list[MetaCatFile]:
        if isinstance(q, FilesFrom):
            if not q.where:
                return self._cached(q, lambda: sorted(
                    self._datasets.get(q.did, ()),
                    key=lambda f: hashlib.sha1(f.fid.encode()).digest()))
            return self._cached(q, lambda: [f for f in self._unordered(q.did)
                                            if all(c.matches(f.metadata) for c in q.where)])
        if q.skip or q.limit is not None:
            files = self._evaluate(Page(q.inner, q.ordered))
            return files[q.skip:None if q.limit is None else q.skip + q.limit]
        if not q.ordered:
            return self._evaluate(q.inner)
        return self._cached(q, lambda: sorted(self._evaluate(q.inner),
                                              key=lambda f: (f.created_timestamp, f.fid)))

    def _cached(self, q: Query, compute: Callable[[], list[MetaCatFile]]) -> list[MetaCatFile]:
        # Pages of one query share its filtered and sorted result: the real client re-runs the
        # query for every page, and 100,000 files would otherwise be sorted once per page.
        files = self._results.get(q)
        if files is None:
            files = self._results[q] = compute()
            while len(self._results) > _CACHED_RESULTS:
                self._results.popitem(last=False)
        else:
            self._results.move_to_end(q)
        return files

    async def _stream(self, request: web.Request, files: Sequence[MetaCatFile],
                      with_metadata: bool) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_type = JSON_SEQ  # exactly: the 4.x client rejects any parameter
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        cut, self.cut_next = self.cut_next, None
        end = len(files) if cut is None else min(cut, len(files))
        for start in range(0, end, _RECORDS_PER_WRITE):
            chunk = files[start:min(start + _RECORDS_PER_WRITE, end)]
            await resp.write(b"".join(
                _RS + json.dumps(f.record(with_metadata)).encode() + b"\n" for f in chunk))
        if cut is not None and request.transport is not None:
            request.transport.close()  # a listing cut off midway: no last chunk
            return resp
        await resp.write_eof()
        return resp


# --- in a thread -------------------------------------------------------------------------------


class ThreadedMetaCatServer(ThreadedAppServer[MetaCatServer]):
    """A ``MetaCatServer`` on its own event loop in a daemon thread, for synchronous clients
    such as the real ``MetaCatClient``. Takes the same arguments; mutators run on the server's
    loop and return once applied; ``stats`` is the live object (read it once requests are
    over)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(lambda: MetaCatServer(**kwargs), "MetaCat emulator")

    @property
    def stats(self) -> MetaCatStats:
        """The live ``MetaCatStats``."""
        return self.server.stats

    def add_dataset(self, did: str, files: Iterable[Any]) -> None:
        """See ``MetaCatServer.add_dataset``."""
        items = list(files)
        self._call(lambda: self.server.add_dataset(did, items))

    def reset_stats(self) -> None:
        """See ``MetaCatServer.reset_stats``."""
        self._call(self.server.reset_stats)


# --- command line ------------------------------------------------------------------------------


def load_datasets(path: Path) -> dict[str, list[Any]]:
    """Read a datasets file (JSON, or TOML by suffix): ``{"datasets": {"ns:name": [files]}}``."""
    raw = path.read_bytes()
    doc = tomllib.loads(raw.decode()) if path.suffix == ".toml" else json.loads(raw)
    if not isinstance(doc, dict) or not isinstance(doc.get("datasets"), dict):
        raise ValueError(f"{path}: expected an object with a 'datasets' object")
    return {str(k): list(v) for k, v in doc["datasets"].items()}


def synthetic_files(did: str, count: int) -> list[MetaCatFile]:
    """``count`` files for dataset ``did``: ``<name>_<i>.root`` in its namespace, 1 MiB each,
    metadata ``core.runs`` (one run per 100 files), ``core.data_tier`` ``raw`` and
    ``core.file_format`` ``artroot``."""
    namespace, name = did.split(":", 1)
    return [MetaCatFile(namespace, f"{name}_{i:07d}.root", size=1 << 20, metadata={
        "core.runs": 1000 + i // 100, "core.data_tier": "raw", "core.file_format": "artroot"})
        for i in range(count)]


def _synthetic_arg(text: str) -> tuple[str, int]:
    did, sep, count = text.rpartition("=")
    if not sep or ":" not in did or not count.isdigit():
        raise argparse.ArgumentTypeError(f"expected ns:name=COUNT, got {text!r}")
    return did, int(count)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m prestaged.testing.metacat",
        description="Run the MetaCat emulator on 127.0.0.1 until SIGTERM/SIGINT. Prints one "
                    "JSON line {port, base_url, pid} once listening.",
    )
    p.add_argument("--datasets", type=Path, help="JSON or TOML datasets file (see the module "
                   "docstring)")
    p.add_argument("--synthetic", type=_synthetic_arg, action="append", default=[],
                   metavar="NS:NAME=COUNT", help="add a generated dataset (repeatable)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    p.add_argument("--prefix", default="/dune_meta_prod/app",
                   help="application prefix before /data (default: DUNE's)")
    p.add_argument("--token-file", type=Path,
                   help="require the token in this file (default: reads are open)")
    p.add_argument("--pki-dir", type=Path,
                   help="serve HTTPS with this test PKI (created if DIR/ca does not exist); "
                        "default: plain HTTP")
    p.add_argument("--stats-file", type=Path, help="write the request statistics here on exit")
    return p


async def _serve_cli(args: argparse.Namespace) -> None:
    datasets: dict[str, list[Any]] = load_datasets(args.datasets) if args.datasets else {}
    for did, count in args.synthetic:
        datasets[did] = synthetic_files(did, count)
    token = args.token_file.read_text().strip() if args.token_file else None
    ctx = (load_or_create_pki(args.pki_dir).server_ssl_context(require_client_cert=False)
           if args.pki_dir else None)
    server = MetaCatServer(datasets=datasets, token=token, prefix=args.prefix,
                           ssl_context=ctx, port=args.port)
    await server.serve_until_signalled()
    if args.stats_file is not None:
        args.stats_file.write_text(json.dumps(server.stats.to_dict()) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m prestaged.testing.metacat``; returns the exit code."""
    args = _parser().parse_args(argv)
    asyncio.run(_serve_cli(args))
    return 0


if __name__ == "__main__":
    from prestaged.testing.process import exit_quietly

    exit_quietly(main)
