"""The one place that turns a ``Config`` (plus command-line overrides) into live objects.

The CLI, the daemon and the campaign runner build nothing from the config themselves: they ask
a ``Context`` for the credentials, the catalog of a definition (with the TLS identity SAM web
gets, honouring ``catalog.samweb.use_certificate``), the state store, the toucher and engine
settings, and the gate, keep-warm and release functions a campaign runs. So the two callers
cannot drift apart (they did: the daemon used to present its proxy to SAM even with
``use_certificate = false``).

Building a ``Context`` does no I/O; each method does only the I/O its name says.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from prestaged.catalog import Catalog, open_catalog
from prestaged.config import Config
from prestaged.credentials import (
    Credentials,
    load_credentials,
    resolve_ca_dir,
    resolve_proxy_path,
)
from prestaged.errors import ConfigError, CredentialError, StateError, StorageError
from prestaged.gate import GateFn, GateResult, RewarmFn, wait_until_ready
from prestaged.locality import TapeAccess, TapeSettings
from prestaged.pacing import Rates
from prestaged.pins import ReleaseFn, ReleaseReport, pinned, release_pins
from prestaged.retry import RetryPolicy
from prestaged.runner import run_definition
from prestaged.state.store import Store, default_state_path, state_file_exists
from prestaged.storage.http import HttpToucher
from prestaged.tokens import TokenSource
from prestaged.warm import Probe, RunReport, Toucher, WarmSettings

__all__ = ["Context"]

log = logging.getLogger(__name__)

CatalogProbe = Callable[[str, str], None]
"""Hears every request a networked catalog makes: ``(catalog kind, result)`` (metrics)."""


@dataclass(frozen=True)
class Context:
    """What ``cfg`` and the command line's ``proxy``/``ca_dir``/``token_file`` (None: not given)
    make.

    Frozen: the daemon makes a new one when SIGHUP brings a new config.
    """

    cfg: Config
    proxy: Optional[Path] = None
    ca_dir: Optional[Path] = None
    token_file: Optional[Path] = None

    # --- credentials ----------------------------------------------------------------------

    def load_credentials(self) -> Credentials:
        """The token and/or proxy (``credentials.method``) and the CA directory, found and
        checked; ``CredentialError`` (exit 3)."""
        c = self.cfg.credentials
        return load_credentials(proxy=self.proxy, proxy_configured=c.proxy, ca_dir=self.ca_dir,
                                ca_dir_configured=c.ca_dir, min_lifetime=c.min_lifetime,
                                method=c.method, token_file=self.token_file,
                                token_configured=c.token_file,
                                token_min_lifetime=c.token_min_lifetime)

    def warm_settings(self, creds: Optional[Credentials]) -> WarmSettings:
        """Engine settings, with ``creds`` named in breaker messages (and, when they include
        a token, its tighter denials breaker)."""
        return WarmSettings.from_config(self.cfg, credential_hint=creds.hint() if creds else "",
                                        token=creds.token if creds is not None else None)

    # --- state ----------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        """``state.path``, or the default under ``$XDG_STATE_HOME``."""
        return self.cfg.state.path or default_state_path()

    def open_store(self, *, must_exist: bool = False) -> Store:
        """The state store (``state.url``'s PostgreSQL database, else the SQLite file), open;
        ``must_exist`` refuses to create a file (read-only commands)."""
        st = self.cfg.state
        path = self.state_path
        if st.url is not None:
            # PostgreSQL (issue 16): path only anchors local files (campaign slice lists).
            return Store(path, url=st.url, batch=st.batch, flush_interval=st.flush_interval,
                         keep_runs=st.keep_runs, keep_campaigns=st.keep_campaigns).open()
        if must_exist and not state_file_exists(path):
            raise StateError(f"state {path}: no such file (nothing warmed yet with this "
                             "state; --state names another)")
        if st.path is not None and not _is_dir_or_unknown(path.parent):
            # A typo in --state (or state.path) made the whole directory tree and a new,
            # empty state, silently: every file warmed again and recorded where nobody looks.
            raise StateError(f"state {path}: no directory {path.parent} (a new state is made "
                             "only in an existing directory: check the path, or create it)")
        return Store(path, batch=st.batch, flush_interval=st.flush_interval,
                     journal=st.journal, keep_runs=st.keep_runs,
                     keep_campaigns=st.keep_campaigns).open()

    # --- storage --------------------------------------------------------------------------

    def make_toucher(self, ssl_context: Optional[ssl.SSLContext],
                     token: Optional[TokenSource] = None) -> HttpToucher:
        """A toucher (connection pool) per ``storage``, sending ``token`` (if any) to each
        file's URL, not started: ``async with`` it."""
        st = self.cfg.storage
        return HttpToucher(ssl_context, nbytes=st.bytes, limit=st.concurrency,
                           limit_per_host=st.per_host, timeout=st.timeout,
                           connect_timeout=st.connect_timeout, max_redirects=st.max_redirects,
                           fast_path=st.fast_path, token=token)

    def tape_settings(self) -> TapeSettings:
        """The tape path's settings (``storage.stage`` and its keys)."""
        return TapeSettings.from_config(self.cfg.storage)

    def make_tape(self, ssl_context: Optional[ssl.SSLContext], *,
                  token: Optional[TokenSource] = None,
                  on_stage: Optional[Callable[[str], None]] = None) -> TapeAccess:
        """The Tape REST access (not open: ``async with`` it), sending ``token`` (if any) to
        the doors and their hosts' frontends; runs use it unless ``storage.stage = never``.
        Back-pressure from the frontend is waited out as ``[retry]`` says, with at least 8 tries
        and 10 minutes (a busy frontend is no reason to give up a dataset)."""
        r = self.cfg.retry
        policy = RetryPolicy(max(8, r.attempts), r.initial, r.max, r.jitter,
                             max(600.0, r.total), r.max_retry_after)
        return TapeAccess(ssl_context, self.tape_settings(), policy=policy, on_stage=on_stage,
                          token=token)

    @contextlib.asynccontextmanager
    async def storage(self, creds: Credentials
                      ) -> AsyncIterator[tuple[Toucher, Optional[TapeAccess]]]:
        """(toucher, tape access or None), both open and presenting ``creds``, for one
        command's runs; with a proxy, the proxy file as it is when each touch starts (a
        renewal is taken up: ``ProxyFollower``)."""
        from prestaged.service.toucher import ProxyFollower, SharedToucher

        tls = creds.ssl_context()
        async with contextlib.AsyncExitStack() as stack:
            tape = None
            if self.cfg.storage.stage != "never":
                tape = await stack.enter_async_context(self.make_tape(tls, token=creds.token))
            if creds.proxy is None:  # a token alone: its TokenSource follows its file
                yield await stack.enter_async_context(self.make_toucher(tls, creds.token)), tape
                return
            shared = SharedToucher(lambda ctx: self.make_toucher(ctx, creds.token),
                                   self.cfg.storage.concurrency)
            stack.push_async_callback(shared.close)
            shared.valid.set()
            await shared.install(tls)
            follower = ProxyFollower(creds, shared, tape)
            if tape is not None:
                tape.check_credentials_with(follower.check)
            following = asyncio.ensure_future(follower.follow())
            stack.callback(following.cancel)
            yield follower, tape

    # --- catalogs -------------------------------------------------------------------------

    def catalog_kind(self, kind: Optional[str] = None, *, dims: Optional[str] = None,
                     mql: Optional[str] = None) -> str:
        """``kind``, else samweb for a dimensions query, metacat for an MQL query, else
        ``catalog.default``."""
        if kind is not None:
            return kind
        if dims is not None:
            return "samweb"
        return "metacat" if mql is not None else self.cfg.catalog.default

    def catalog_credentials(self, creds: Optional[Credentials]) -> Optional[Credentials]:
        """The credentials a networked catalog is shown: ``creds`` or, when None, the proxy if
        there is a usable one; None for anonymous. ``catalog.samweb.use_certificate``: true
        demands the proxy (its error propagates), false never presents one, unset presents it
        when it can."""
        use = self.cfg.catalog.samweb.use_certificate
        if use is False:
            return None
        if creds is not None:
            return creds
        path, source = resolve_proxy_path(self.proxy, self.cfg.credentials.proxy)
        if not use and source.startswith("default") and not path.exists():
            return None
        try:
            return self.load_credentials()
        except CredentialError as e:
            if use:
                raise
            log.warning("asking SAM web without a certificate: %s", e)
            return None

    def open_catalog(self, kind: Optional[str], definition: str, *, dims: Optional[str] = None,
                     mql: Optional[str] = None, creds: Optional[Credentials] = None,
                     probe: Optional[CatalogProbe] = None) -> Catalog:
        """The catalog ``kind`` (see ``catalog_kind``) for ``definition`` (or ``dims``, or
        ``mql``: then ``definition`` is that query).

        SAM web is shown ``catalog_credentials(creds)`` and, with ``catalog.samweb.use_token``,
        sent the bearer token; MetaCat and Rucio get ``creds`` (loaded when None) as their
        sections say; ``probe`` hears each request of a networked catalog. No I/O for the
        local catalog beyond finding the file.
        """
        kind = self.catalog_kind(kind, dims=dims, mql=mql)
        if kind == "metacat":
            catalog = self._open_metacat(definition, mql is not None, creds)
        elif kind != "samweb":
            return open_catalog(kind, definition, self.cfg.catalog, dims=dims,
                                mql=mql is not None)
        else:
            catalog = self._open_samweb(definition, dims, creds)
        if probe is not None and hasattr(catalog, "on_request"):
            catalog.on_request = lambda result: probe(kind, result)
        if probe is not None and hasattr(catalog, "on_rucio_request"):  # MetaCat's resolver
            catalog.on_rucio_request = lambda result: probe("rucio", result)
        return catalog

    def _catalog_tls(self, shown: Optional[Credentials]
                     ) -> tuple[ssl.SSLContext, Optional[str]]:
        """(client TLS context, DN presented): the proxy of ``shown`` when it has one, else
        anonymous (trusting the CA directory too)."""
        from prestaged.catalog.http import catalog_ssl_context

        if shown is not None and shown.proxy is not None:
            return catalog_ssl_context(shown), shown.proxy.identity
        ca_dir, _ = resolve_ca_dir(self.ca_dir, self.cfg.credentials.ca_dir)
        return catalog_ssl_context(None, ca_dir), None

    def _open_samweb(self, definition: str, dims: Optional[str],
                     creds: Optional[Credentials]) -> Catalog:
        shown = self.catalog_credentials(creds)
        tls, identity = self._catalog_tls(shown)
        token = None
        if self.cfg.catalog.samweb.use_token:
            token = (shown or creds or self.load_credentials()).token
        return open_catalog("samweb", definition, self.cfg.catalog, ssl_context=tls, dims=dims,
                            identity=identity, token=token)

    def _open_metacat(self, definition: str, mql: bool,
                      creds: Optional[Credentials]) -> Catalog:
        """MetaCat with Rucio, shown ``creds`` (found now when None): the proxy for Rucio's
        x509 login, the token where ``[catalog.metacat]``/``[catalog.rucio] auth`` say. A run
        that needs neither (userpass for Rucio, MetaCat anonymous or with its own token) goes
        on without them."""
        from prestaged.catalog.metacat import check_config

        check_config(self.cfg.catalog)
        if creds is None:
            try:
                creds = self.load_credentials()
            except CredentialError:
                if self.cfg.catalog.rucio.auth != "userpass" \
                        or self.cfg.catalog.metacat.auth == "token":
                    raise
        tls, identity = self._catalog_tls(creds)
        return open_catalog("metacat", definition, self.cfg.catalog, ssl_context=tls, mql=mql,
                            identity=identity, token=creds.token if creds else None)

    def open_for_warm(self, kind: Optional[str], definition: Optional[str],
                      dims: Optional[str] = None,
                      mql: Optional[str] = None) -> tuple[Catalog, Credentials]:
        """(catalog, credentials) for a warm run, checked in the order users see errors in:
        a catalog's configuration before the credentials, a local definition file before
        them."""
        name = self.definition_name(definition, dims, mql)
        chosen = self.catalog_kind(kind, dims=dims, mql=mql)
        if chosen == "samweb":
            from prestaged.catalog.samweb import check_config

            check_config(self.cfg.catalog.samweb)
        elif chosen == "metacat":
            from prestaged.catalog.metacat import check_config as check_metacat

            check_metacat(self.cfg.catalog)
        else:
            catalog = self.open_catalog(kind, name, dims=dims, mql=mql)
            return catalog, self.load_credentials()
        creds = self.load_credentials()
        return self.open_catalog(kind, name, dims=dims, mql=mql, creds=creds), creds

    @staticmethod
    def definition_name(definition: Optional[str], dims: Optional[str],
                        mql: Optional[str] = None) -> str:
        """The definition (or dimensions or MQL query) a command names; ``ConfigError`` for
        none or more than one."""
        given = [(flag, text) for flag, text in (("--dims", dims), ("--mql", mql))
                 if text is not None]
        if len(given) > 1:
            raise ConfigError("give --dims or --mql, not both")
        if given:
            flag, text = given[0]
            if definition is not None:
                raise ConfigError(f"give a DEFINITION or {flag}, not both")
            if not text.strip():
                what = "a SAM dimensions query" if flag == "--dims" else "an MQL query"
                raise ConfigError(f"{flag}: expected {what}, got nothing")
            return text
        if definition is None:
            raise ConfigError("give a DEFINITION (or --dims with the samweb catalog, --mql "
                              "with the metacat catalog)")
        return definition

    # --- gate, keep-warm and release -----------------------------------------------------

    def gate(self, store: Store, toucher: Toucher, settings: WarmSettings, *,
             stop: asyncio.Event, probe: Optional[Probe] = None,
             tape: Optional[TapeAccess] = None, rates: Optional[Rates] = None) -> GateFn:
        """``GateFn`` for campaigns: ``wait_until_ready`` with this context's freshness (and
        ``rates``, the request rates learned from 429s, shared by the caller's runs)."""
        fresh_for = self.cfg.state.fresh_for

        async def gate(catalog: Catalog, ready: float, timeout: float,
                       retry: float) -> GateResult:
            return await wait_until_ready(catalog, settings, toucher, store, fresh_for=fresh_for,
                                          ready=ready, timeout=timeout, retry_initial=retry,
                                          stop=stop, probe=probe, tape=tape, rates=rates)
        return gate

    def rewarm(self, store: Store, toucher: Toucher, settings: WarmSettings, *,
               stop: asyncio.Event, probe: Optional[Probe] = None,
               tape: Optional[TapeAccess] = None, rates: Optional[Rates] = None) -> RewarmFn:
        """``RewarmFn`` for campaigns' keep-warm: a warm run skipping files fresh within the
        given window."""
        async def rewarm(catalog: Catalog, fresh_for: float) -> RunReport:
            return await run_definition(catalog, settings, toucher, store=store,
                                        fresh_for=fresh_for, stop=stop, probe=probe,
                                        tape=tape, rates=rates)
        return rewarm

    def release(self, store: Store, tape: Optional[TapeAccess], *,
                stop: asyncio.Event) -> ReleaseFn:
        """``ReleaseFn`` for campaigns (``release_after_complete``): the pins recorded on a
        slice released through ``tape``, the run's open Tape REST access; without one
        (``storage.stage = never``) a slice with pins is a ``StorageError``."""
        async def release(catalog: Catalog) -> ReleaseReport:
            pins = await asyncio.to_thread(pinned, store, catalog.name, catalog.definition)
            if not pins:
                return ReleaseReport(catalog.name, catalog.definition)
            if tape is None:
                raise StorageError(f"{len(pins)} pins of {catalog.definition} are held, but "
                                   "storage.stage = never: no Tape REST access to release "
                                   "them with (the pins expire on their own)")
            return await release_pins(store, tape, catalog.name, catalog.definition, pins,
                                      stop=stop)
        return release


def _is_dir_or_unknown(path: Path) -> bool:
    """Whether ``path`` is a directory, or cannot be looked at (a name too long, a directory
    that may not be entered: opening the state says so in its words)."""
    try:
        return path.is_dir() or path.exists()
    except OSError:
        return True
