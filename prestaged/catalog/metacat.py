"""The MetaCat catalog: a MetaCat dataset (``namespace:name``) or MQL query -> its files ->
their replicas in Rucio -> a stream of storage URLs. DUNE resolves its input this way.

MetaCat is spoken as its real client (``metacat.webapi.MetaCatClient``, PyPI
``metacat-client`` 4.x) speaks it, under ``[catalog.metacat] url`` (application prefix
included):

- a dataset: ``GET {url}/data/dataset_files?dataset=ns:name&with_metadata=no&
  include_retired_files=no``, streamed as ``application/json-seq`` (RFC 7464: 0x1E, a JSON file
  record, ``\\n``); a listing cut off midway is asked again and the files already handed out
  are skipped by name, not by count (MetaCat promises no order: ``catalog.http.Handed``);
- a query (``--mql``): ``POST {url}/data/query?with_meta=no&with_provenance=no&trimquery=...``
  with the MQL as the body, paged as the client pages, ``(QUERY) ordered skip K limit N``
  (``[catalog.metacat] page``), until a page comes back short; the ``)`` goes on a line of its
  own, out of reach of a ``#`` comment ending the query (MetaCat cuts those off);
- the count for progress: ``GET {url}/data/dataset?dataset=ns:name`` (``file_count``).

Authentication (``[catalog.metacat] auth``): the MetaCat token in ``X-Authentication-Token``
(``token_file``, or the client's token library entry for ``url``), the WLCG bearer token in
``Authorization`` (``auth = "token"`` only), or none (MetaCat reads are open; ``auto`` sends the
MetaCat token when there is one). Tokens go over https only: settings that would send one to
an ``http://`` URL are a ``ConfigError`` (``MetaCatConfig.refuse_in_clear``), and ``auto``
leaves a token library entry unsent there, with a WARNING, and reads anonymously.

The listed files are cut into chunks of ``[catalog.rucio] chunk`` DIDs, each resolved by one
Rucio ``/replicas/list`` request (``prestaged.catalog.rucio``), ``[catalog.rucio] parallel`` at
once, and yielded in listing order as soon as their chunk is resolved: the engine warms the
first files while later chunks are still being listed and asked. Memory stays bounded by
``parallel`` chunks.

A file Rucio does not know, knows no available replica of, or has no https/davs replica of is
unresolved and reported as SAM's unresolved files are (``unresolved``, ``unresolved_count``);
so is one whose name Rucio's DID schema refuses (no ``\\w``): it is not asked, since Rucio
answers 400 for the whole request holding it.

Errors: an unknown dataset -> ``CatalogError`` naming it (exit 4), as is MQL MetaCat rejects;
401/403 from either server -> ``CredentialError`` (exit 3) with the server's message;
5xx/408/429, timeouts and dropped connections are retried for ``retry_for``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import msgspec

from prestaged.catalog.http import (
    Call,
    Handed,
    HttpApi,
    Transient,
    UnresolvedLog,
    line_blocks,
    one_line,
    ordered,
    retry_settings,
)
from prestaged.catalog.rucio import Answer, RucioApi, pick, rucio_login_mode
from prestaged.config import (
    HTTP_URL,
    CatalogConfig,
    MetaCatConfig,
    RucioConfig,
    env_value,
    plain_http,
)
from prestaged.errors import CatalogError, ConfigError, CredentialError
from prestaged.model import FileRef, hide_secret
from prestaged.net import bearer_error
from prestaged.tokens import check_token, inspect_token, read_token_file

if TYPE_CHECKING:
    from prestaged.tokens import TokenSource

__all__ = ["MetaCatCatalog", "check_config", "metacat_token", "metacat_url"]

log = logging.getLogger(__name__)

_DATASET = re.compile(r"[^:\s]+:[^:\s]+")
# Rucio's r_dids schema: a scope and a name must each hold a \w (rucio.common.schema R_NAME).
_rucio_name = re.compile(r"\w").search
_TRIM = 255  # characters of MQL the client repeats in trimquery= (for the server's logs)


def metacat_url(cfg: MetaCatConfig, env: Optional[Mapping[str, str]] = None) -> str:
    """``cfg.url``, else ``$METACAT_SERVER_URL`` (the metacat client's variable); no trailing
    slash. ``ConfigError`` when neither is set."""
    environ = os.environ if env is None else env
    url = cfg.url or env_value(environ, "METACAT_SERVER_URL", HTTP_URL)
    if url is None:
        raise ConfigError("MetaCat: no server; set [catalog.metacat] url (e.g. "
                          "https://metacat.fnal.gov:9443/dune_meta_prod/app) or "
                          "$METACAT_SERVER_URL")
    return url.rstrip("/")


def check_config(cfg: CatalogConfig, env: Optional[Mapping[str, str]] = None) -> str:
    """Raise ``ConfigError`` unless MetaCat and Rucio are named (userpass with its keys, no
    token to an http:// MetaCat: ``MetaCatConfig.refuse_in_clear``, which covers
    ``$METACAT_SERVER_URL`` here); else return the MetaCat URL. No I/O: the CLI calls it
    before the credential checks."""
    url = metacat_url(cfg.metacat, env)
    cfg.metacat.refuse_in_clear(url, _url_key(cfg.metacat))
    if cfg.rucio.url is None:
        raise ConfigError("catalog.rucio.url: not set; the MetaCat catalog resolves its "
                          "files' replicas through Rucio (e.g. https://dune-rucio.fnal.gov)")
    if cfg.rucio.auth == "userpass":
        rucio_login_mode(cfg.rucio, have_token=False)
    return url


def _url_key(cfg: MetaCatConfig) -> str:
    """Where the MetaCat URL came from, for messages."""
    return "catalog.metacat.url" if cfg.url else "$METACAT_SERVER_URL"


def _library_paths(cfg: MetaCatConfig, env: Mapping[str, str]) -> list[Path]:
    if cfg.token_library is not None:
        return [cfg.token_library]
    return [Path(d) / ".token_library" for d in (env.get("HOME"), str(Path.cwd()), "/tmp") if d]


def metacat_token(cfg: MetaCatConfig, url: str,
                  env: Optional[Mapping[str, str]] = None) -> Optional[tuple[str, str]]:
    """``(token, where)``: the MetaCat token of ``token_file``, else the first token library's
    entry for ``url`` (the metacat client's search: ``$HOME``, the working directory,
    ``/tmp``), as long as it has not expired; None when there is none. ``CredentialError``
    for a ``token_file`` that cannot be read, is not a token, or has expired."""
    environ = os.environ if env is None else env
    if cfg.token_file is not None:
        text = read_token_file(cfg.token_file, f"catalog.metacat.token_file {cfg.token_file}")
        check_token(inspect_token(text, source="catalog.metacat.token_file",
                                  path=cfg.token_file), 0.0)
        hide_secret(text)
        return text, f"MetaCat token {cfg.token_file}"
    for path in _library_paths(cfg, environ):
        try:
            entries = path.read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        for line in entries:
            parts = line.split(None, 1)
            if len(parts) != 2 or parts[0].rstrip("/") != url:
                continue
            text = parts[1].strip()
            try:
                check_token(inspect_token(text, source="the MetaCat token library",
                                          path=path), 0.0)
            except CredentialError as e:
                log.warning("MetaCat: %s; not using it (run `metacat auth login`)", e)
                return None
            hide_secret(text)
            return text, f"MetaCat token from the library {path}"
        return None  # the client reads only the first library found
    return None


@dataclass(frozen=True)
class _Call(Call):
    """A MetaCat request: what it is for, and the dataset it names."""

    dataset: Optional[str] = None
    mql: bool = False


class _MetaCatApi(HttpApi):
    """One session to MetaCat; errors worded for it (see the module docstring)."""

    service = "MetaCat"

    def __init__(self, url: str, cfg: MetaCatConfig, ssl_context: Optional[ssl.SSLContext],
                 *, metacat_token: Optional[tuple[str, str]], token: Optional[TokenSource],
                 sleep: Callable[[float], Awaitable[None]],
                 withheld: Optional[str] = None) -> None:
        super().__init__(url, retry_settings(cfg, "catalog.metacat"), ssl_context, limit=2,
                         sleep=sleep)
        self._metacat_token = metacat_token
        self._token = token
        self._withheld = withheld

    async def headers_for(self, call: Call) -> Optional[Mapping[str, str]]:
        if self._metacat_token is not None:
            return {"X-Authentication-Token": self._metacat_token[0]}
        if self._token is not None:  # CredentialError when it expired: nothing is sent
            return {"Authorization": self._token.authorization()}
        return None

    def tls_hint(self) -> str:
        return "check the CA directory and catalog.metacat.url"

    def detail(self, status: int, reason: str, body: str) -> str:
        return super().detail(status, reason, _error_message(body))

    def status_error(self, call: Call, status: int, reason: str, body: str,
                     headers: Mapping[str, str]) -> Exception:
        assert isinstance(call, _Call)
        detail = self.detail(status, reason, body)
        if status == 404 and call.dataset is not None:
            return CatalogError(f"MetaCat dataset '{call.dataset}' not found at "
                                f"{self.base_url} ({detail})")
        if status == 400 and call.mql:
            return CatalogError(f"MetaCat {self.base_url} rejected the MQL query: "
                                f"{one_line(_error_message(body)) or detail}")
        if status in (401, 403):
            said = bearer_error(headers.get("WWW-Authenticate"))
            detail += f"; the server says: {said}" if said else ""
            if self._metacat_token is not None:
                who, fix = (f"with the {self._metacat_token[1]}",
                            "renew it with `metacat auth login`")
            elif self._token is not None:
                who, fix = (f"with {self._token.info.describe()}",
                            "check the token's audience for MetaCat, or set "
                            "catalog.metacat.auth")
            elif self._withheld is not None:
                who, fix = (f"anonymously (the {self._withheld} is not sent to an http:// "
                            "URL)", "give MetaCat's https:// URL")
            else:
                who, fix = ("anonymously", "log in with `metacat auth login` or set "
                            "catalog.metacat.auth")
            return CredentialError(f"MetaCat {self.base_url} refused {call.what} {who} "
                                   f"({detail}); {fix}")
        return CatalogError(f"MetaCat {self.base_url} failed {call.what}: {detail}")


def _error_message(body: str) -> str:
    """The ``message`` of MetaCat's JSON error body (``{"message", "code", "title"}``, what
    ``@sanitized`` answers for a name or namespace it refuses), else ``body`` as it is."""
    if not body.lstrip().startswith("{"):
        return body
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return body
    message = doc.get("message") if isinstance(doc, dict) else None
    return message if isinstance(message, str) and message else body


_Entry = tuple[str, str, Optional[int]]  # namespace, name, size


class _Record(msgspec.Struct):
    """The fields of a MetaCat file record prestaged uses (others are not decoded)."""

    namespace: str
    name: str
    size: Optional[int] = None


_RECORD: msgspec.json.Decoder[_Record] = msgspec.json.Decoder(_Record)


def _records(block: list[bytes]) -> list[_Entry]:
    """``(namespace, name, size)`` of each json-seq record line of ``block`` (0x1E and blank
    lines skipped). ``CatalogError`` for a record that is not a MetaCat file."""
    out: list[_Entry] = []
    for raw in block:
        text = raw.lstrip(b"\x1e").strip()
        if not text:
            continue
        try:
            record = _RECORD.decode(text)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise CatalogError(f"MetaCat answered a listing with a record that is not a file "
                               f"({one_line(str(e), 120)}): "
                               f"{one_line(text.decode('utf-8', 'replace'), 80)}") from None
        out.append((record.namespace, record.name, record.size))
    return out


class MetaCatCatalog(UnresolvedLog):
    """Files of a MetaCat dataset (or of ``mql``) as ``FileRef``s named ``namespace:name``;
    see the module docstring.

    ``ssl_context`` is the client TLS context for both servers (presenting the proxy for
    Rucio's x509 login); ``identity`` the proxy's DN (messages); ``token`` the WLCG bearer
    token (sent where ``[catalog.metacat] auth`` / ``[catalog.rucio] auth`` say). ``env``
    replaces ``os.environ`` and ``sleep`` the backoff sleep (tests). Raises ``ConfigError``
    for a dataset name without ``namespace:`` or missing servers, ``CredentialError`` for a
    credential the configuration demands but that is not there.
    """

    name = "metacat"

    def __init__(
        self,
        definition: str,
        cfg: CatalogConfig,
        ssl_context: Optional[ssl.SSLContext] = None,
        *,
        mql: bool = False,
        identity: Optional[str] = None,
        token: Optional[TokenSource] = None,
        env: Optional[Mapping[str, str]] = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__()
        self.url = check_config(cfg, env)
        if not mql and not _DATASET.fullmatch(definition):
            raise ConfigError(f"MetaCat dataset {definition!r}: expected namespace:name "
                              "(or --mql for a query)")
        self.definition = definition
        self.mql = mql
        self.cfg = cfg.metacat
        self.rucio_cfg: RucioConfig = cfg.rucio
        self._ssl = ssl_context
        self._identity = identity
        self._sleep = sleep
        self._withheld: Optional[str] = None
        """Where the MetaCat token ``auto`` found but did not send (an http:// URL) came from."""
        self._metacat_token = self._metacat_auth(token, env)
        # The WLCG token goes to MetaCat only when asked for: its reads are open, and a
        # token is not sent where it is not needed.
        self._token = token if self.cfg.auth == "token" else None
        self._rucio_mode = rucio_login_mode(cfg.rucio, have_token=token is not None)
        self._rucio_token = token if self._rucio_mode == "token" else None
        if self._rucio_mode == "x509" and identity is None:
            raise CredentialError("catalog.rucio.auth: x509 login needs a proxy, and none was "
                                  "found (see `prestaged credentials`)")
        self._password = self._read_password() if self._rucio_mode == "userpass" else None
        environ = os.environ if env is None else env
        self._rucio_account = cfg.rucio.account or environ.get("RUCIO_ACCOUNT") or None
        self.source = f"{self.url} + Rucio {cfg.rucio.url}"
        """Where the files come from, for summaries."""
        self.listed = 0
        """Files MetaCat listed so far in the current ``files()`` pass."""
        self.rucio_requests = 0
        """``/replicas/list`` requests sent in the current pass."""
        self.on_request: Optional[Callable[[str], None]] = None
        """Told ``ok`` or ``error`` after every request to MetaCat (metrics)."""
        self.on_rucio_request: Optional[Callable[[str], None]] = None
        """The same for every request to Rucio."""

    def _metacat_auth(self, token: Optional[TokenSource],
                      env: Optional[Mapping[str, str]]) -> Optional[tuple[str, str]]:
        auth = self.cfg.auth
        if auth == "token" and token is None:
            raise CredentialError("catalog.metacat.auth is token but no bearer token was "
                                  "found (see `prestaged credentials`)")
        if auth not in ("auto", "metacat"):
            return None
        found = metacat_token(self.cfg, self.url, env)
        if found is None and auth == "metacat":
            raise CredentialError(f"catalog.metacat.auth is metacat but no MetaCat token for "
                                  f"{self.url} was found; run `metacat auth login` or set "
                                  "catalog.metacat.token_file")
        if found is not None and plain_http(self.url):
            # Only "auto" gets here (refuse_in_clear refused the rest): MetaCat reads are open,
            # so the run goes on anonymously rather than fail for a token nobody named.
            self._withheld = found[1]
            log.warning('MetaCat %s: not sending the %s to an http:// URL (in clear); reading '
                        'anonymously (give an https:// %s, or set catalog.metacat.auth = '
                        '"none")', self.url, found[1], _url_key(self.cfg))
            return None
        return found

    def _read_password(self) -> str:
        path = self.rucio_cfg.password_file
        assert path is not None
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise CredentialError(f"catalog.rucio.password_file {path}: cannot read it "
                                  f"({type(e).__name__})") from None
        if not text:
            raise CredentialError(f"catalog.rucio.password_file {path}: empty")
        return text

    def _metacat(self) -> _MetaCatApi:
        api = _MetaCatApi(self.url, self.cfg, self._ssl, metacat_token=self._metacat_token,
                          token=self._token, sleep=self._sleep, withheld=self._withheld)
        api.on_request = self.on_request
        return api

    def _rucio(self) -> RucioApi:
        api = RucioApi(self.rucio_cfg, self._rucio_mode, self._ssl, identity=self._identity,
                       token=self._rucio_token, password=self._password,
                       account=self._rucio_account, sleep=self._sleep)
        api.on_request = self.on_rucio_request
        return api

    async def estimate(self) -> Optional[int]:
        """The dataset's file count from MetaCat (one try), or None (a query, or MetaCat
        cannot say now). Raises the usual errors for answers that will not change."""
        if self.mql:
            return None
        call = _Call(f"reading dataset '{self.definition}'", dataset=self.definition)
        try:
            async with self._metacat() as api:
                doc = await api.fetch(call, api.url("data", "dataset"),
                                      params={"dataset": self.definition}, retry=False)
        except Transient as e:
            log.debug("MetaCat: no file count (%s)", e.reason)
            return None
        count = doc.get("file_count") if isinstance(doc, dict) else None
        return count if isinstance(count, int) and count >= 0 else None

    async def files(self) -> AsyncIterator[FileRef]:
        """Yield the resolved files in listing order, streaming (see the module docstring)."""
        self.listed = self.rucio_requests = 0
        self._forget_unresolved()
        started = time.monotonic()
        async with self._metacat() as metacat, self._rucio() as rucio:
            listing = self._query(metacat) if self.mql else self._dataset(metacat)
            pipeline = ordered(self._chunks(listing),
                               lambda chunk: self._resolve(rucio, chunk), self.rucio_cfg.parallel)
            try:
                async for refs in pipeline:
                    for ref in refs:
                        yield ref
            finally:
                # The pipeline first: its feeder may still be inside the listing, which then
                # cannot be closed ("asynchronous generator is already running").
                await pipeline.aclose()
                await listing.aclose()
        log.info("MetaCat: %d files listed, %d resolved through Rucio (%d replica listing%s), "
                 "%d unresolved in %.1f s", self.listed, self.listed - self.unresolved_count,
                 self.rucio_requests, "" if self.rucio_requests == 1 else "s",
                 self.unresolved_count, time.monotonic() - started)
        if self.unresolved_count:
            log.warning("%d files got no URL and are reported as unresolved",
                        self.unresolved_count)

    async def _dataset(self, api: _MetaCatApi) -> AsyncGenerator[list[_Entry], None]:
        """Stream the dataset's files (a list per block read); a cut-off listing is asked
        again, and the files already handed out are skipped by name (``Handed``), whatever
        order it comes in."""
        call = _Call(f"listing the files of dataset '{self.definition}'",
                     dataset=self.definition)
        params = {"dataset": self.definition, "with_metadata": "no",
                  "include_retired_files": "no"}
        url = api.url("data", "dataset_files")
        backoff = api.backoff(call)
        handed = Handed()
        while True:
            count = 0
            handed.again()
            try:
                async with api.exchange(call, url, params=params) as resp:
                    async for block in line_blocks(resp):
                        entries = _records(block)
                        count += len(entries)
                        fresh = [e for e in entries if handed.fresh((e[0], e[1]))]
                        if fresh:
                            self.listed = len(handed)
                            backoff.reset()
                            yield fresh
                return
            except Transient as e:
                if count:
                    log.info("MetaCat: listing cut off after %d files; listing again", count)
                await backoff.wait(e)

    async def _query(self, api: _MetaCatApi) -> AsyncGenerator[list[_Entry], None]:
        """Stream the query's files a page at a time (``ordered skip K limit N``)."""
        page = self.cfg.page
        url = api.url("data", "query")
        params = {"with_meta": "no", "with_provenance": "no",
                  "trimquery": self.definition[:_TRIM]}
        call = _Call("running the MQL query", mql=True)
        backoff = api.backoff(call)
        skip = 0
        # Names (in-process hashes) of the page before and of this one: a full page of
        # nothing new is a server ignoring skip, which would be paged for ever.
        before: set[int] = set()
        this: set[int] = set()
        while True:
            # The ")" on a line of its own: MetaCat cuts "#" comments to the end of the line,
            # and a comment on the query's last line would swallow it and the paging.
            body = f"({self.definition}\n) ordered skip {skip} limit {page}"
            count = 0
            try:
                async with api.exchange(call, url, params=params, data=body) as resp:
                    async for block in line_blocks(resp):
                        entries = _records(block)
                        if entries:
                            count += len(entries)
                            this.update(hash((ns, name)) for ns, name, _ in entries)
                            self.listed = skip + count
                            backoff.reset()
                            yield entries
            except Transient as e:
                # The page is ordered: ask again from the first file not yet handed out.
                skip += count
                await backoff.wait(e)
                continue
            skip += count
            if count < page:  # a short page is the last, as the client sees it
                return
            if this <= before:
                raise CatalogError(
                    f"MetaCat {api.base_url} answered the MQL query at skip {skip - count} "
                    f"with the same {count} files as the page before: it does not honour "
                    "'skip'; stopped instead of paging for ever")
            before, this = this, set()

    async def _chunks(self, listing: AsyncIterator[list[_Entry]]
                      ) -> AsyncGenerator[list[_Entry], None]:
        """The listing cut into chunks of at most ``[catalog.rucio] chunk`` files; a full chunk
        goes out at once."""
        size = self.rucio_cfg.chunk
        chunk: list[_Entry] = []
        async for entries in listing:
            chunk.extend(entries)
            while len(chunk) >= size:
                yield chunk[:size]
                chunk = chunk[size:]
        if chunk:
            yield chunk

    async def _resolve(self, rucio: RucioApi, chunk: list[_Entry]) -> list[FileRef]:
        """One ``/replicas/list`` request for ``chunk``; its files' URLs, in listing order.

        A DID Rucio's schema refuses (scope or name without a letter, digit or ``_``) is not
        asked: it is unresolved, where in the request it got the whole chunk a 400."""
        asked = [(ns, name) for ns, name, _ in chunk if _rucio_name(ns) and _rucio_name(name)]
        found: dict[str, Answer] = {}
        if asked:
            self.rucio_requests += 1
            found = await rucio.list_replicas(asked)
        refs = []
        preference = self.rucio_cfg.rse_preference
        for ns, name, size in chunk:
            did = f"{ns}:{name}"
            if not (_rucio_name(ns) and _rucio_name(name)):
                self._unresolved(did, (), "Rucio refuses the name (its DIDs need a letter, "
                                          "digit or underscore)")
                continue
            answer = found.get(did)
            if answer is None:
                self._unresolved(did, (), "Rucio does not know the file")
                continue
            chosen = pick(answer.pfns, preference)
            if chosen is not None:
                refs.append(FileRef(name=did, url=chosen.url, size=size))
                continue
            where = tuple(sorted({*answer.states, *(p.rse for p in answer.pfns.values())}))
            if where:
                self._unresolved(did, where, "Rucio has no https or davs replica of it")
            else:
                self._unresolved(did, (), "Rucio lists no available https or davs replica")
        return refs

