"""``prestaged serve``: the daemon's lifecycle.

``run()`` (STYLE.md 3) starts the store, credentials, the shared touch path, the runs, the
watches, the campaigns and the HTTP API, tells systemd READY=1, then waits for a stop request;
shutdown happens in ``finally``. Signal handlers only set events: SIGHUP re-reads the config
and the proxy, the first SIGTERM/SIGINT drains (running warms get ``daemon.drain_timeout`` to
finish, then are stopped and recorded), a second one stops at once.

What the daemon does lives next to it: ``runs`` (warm runs and their bookkeeping), ``watches``
(the ``[[watch]]`` schedule, dataset gauges, ready warnings), ``campaigns`` (the campaign
queue), ``toucher`` (one touch budget and a pool that survives proxy renewal), ``api`` (the
HTTP API, which sees the daemon only through its ``ApiPorts``). When the proxy file changes on
disk the daemon re-reads it and new connections use it; an expired proxy pauses touching until
a valid one appears.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import socket
import ssl
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from prestaged._version import __version__
from prestaged.catalog import Catalog
from prestaged.config import Config, load_config
from prestaged.context import Context
from prestaged.credentials import (
    Credentials,
    check_lifetime,
    inspect_proxy,
    resolve_ca_dir,
    resolve_proxy_path,
    warn_if_exposed,
)
from prestaged.errors import ConfigError, CredentialError, PrestagedError, StateError
from prestaged.files import file_stamp
from prestaged.locality import STAGE_ANSWER_GRACE, TapeAccess
from prestaged.metrics import Metrics
from prestaged.model import hide_secret
from prestaged.pacing import Rates
from prestaged.runtime import probe_lag
from prestaged.service.api import Handler, JsonObject, build_app, serve
from prestaged.service.campaigns import DaemonCampaigns
from prestaged.service.cluster import ChunkWorker, ClusterMember
from prestaged.service.coalesce import Coalesced
from prestaged.service.naming import open_requested
from prestaged.service.runs import RunInfo, Runs
from prestaged.service.sdnotify import Notifier
from prestaged.service.tls import ServerTLS, is_loopback, server_tls
from prestaged.service.toucher import SharedToucher
from prestaged.service.watches import Watches
from prestaged.state.cluster import members as cluster_members
from prestaged.state.store import Store
from prestaged.storage.http import HttpToucher
from prestaged.warm import WarmSettings

if TYPE_CHECKING:
    from aiohttp import web

__all__ = ["Daemon"]

log = logging.getLogger(__name__)

LOOP_PROBE = 0.25
"""Seconds between two probes of the event loop's lag (``prestaged_event_loop_lag_seconds``)."""
TIDY_FIRST = 600.0
"""Seconds after start of the daemon's first state tidy (``state.tidy_every`` if shorter)."""


def _read_token(path: Optional[Path], listen: str) -> Optional[str]:
    """The bearer token, required (from a 0600 file) when the listener is not loopback-only."""
    if path is None:
        if is_loopback(listen):
            return None
        raise ConfigError(f"daemon.listen {listen} is not loopback: set daemon.token_file to a "
                          "0600 file holding the bearer token for mutating API calls")
    try:
        mode = path.stat().st_mode
        token = path.read_text().strip()
    except OSError as e:
        raise ConfigError(f"daemon.token_file {path}: cannot read: {e.strerror}") from None
    if mode & 0o077:
        raise ConfigError(f"daemon.token_file {path}: readable by others (mode "
                          f"{mode & 0o777:o}); chmod 600 it")
    if not token:
        raise ConfigError(f"daemon.token_file {path}: empty")
    hide_secret(token)  # a library quoting a request's header in its log: never shown
    return token


@dataclass
class _Events:
    """The daemon's events. Made inside its event loop: on Python 3.9 an ``asyncio.Event``
    belongs to the loop that is current when it is made, and ``Daemon`` is built before
    ``runtime.run`` makes the loop."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    """Drain and stop (first SIGTERM/SIGINT)."""
    reload: asyncio.Event = field(default_factory=asyncio.Event)
    """SIGHUP: re-read the config and the proxy."""
    stop_runs: asyncio.Event = field(default_factory=asyncio.Event)
    """Stop running warms now (second signal, or the drain timeout)."""
    started: asyncio.Event = field(default_factory=asyncio.Event)
    """Start-up is complete: the API answers (tests wait on it)."""


@dataclass
class _Live:
    """What start-up builds, once the store and the credentials are there."""

    store: Store
    toucher: SharedToucher
    runs: Runs
    watches: Watches
    campaigns: DaemonCampaigns
    member: ClusterMember
    chunks: Optional[ChunkWorker]
    """Warms chunks of watch rounds (a shared state only)."""


class Daemon:
    """The long-lived service; see the module docstring. ``cfg`` is the loaded config and
    ``config_path`` where SIGHUP re-reads it from (None: built-in defaults)."""

    def __init__(self, cfg: Config, config_path: Optional[Path]) -> None:
        self.cfg = cfg
        self.ctx = Context(cfg)
        self.config_path = config_path
        self.metrics = Metrics()
        self.notifier = Notifier.from_environment()
        self.credentials: Optional[Credentials] = None
        self.token: Optional[str] = None
        self._listen = cfg.daemon.listen  # bound at start; a reload does not rebind it
        self._started_with = cfg  # what the keys a reload cannot change keep meaning
        self.draining = False
        self._events: Optional[_Events] = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._store: Optional[Store] = None
        self._touch: Optional[SharedToucher] = None
        self._tape: Optional[TapeAccess] = None
        self._live: Optional[_Live] = None
        self._member: Optional[ClusterMember] = None
        self._chunk_task: Optional[asyncio.Task[None]] = None
        self._runner: Optional[web.AppRunner] = None
        self._listener: Optional[asyncio.AbstractServer] = None
        self._tls: Optional[ServerTLS] = None
        self._proxy_stamp: Optional[tuple[int, int, int]] = None
        self._paused = False

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = True) -> int:
        """Start up, serve until stopped, drain, shut down; returns the exit code.
        ``handle_signals`` false leaves the process's signals alone (in-process tests stop
        the daemon with ``request_stop``)."""
        ev = self._events_now()
        if handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        try:
            await self._start()
            self.notifier.ready()
            self._status()
            ev.started.set()
            log.info("prestaged %s serving on %s://%s, %d watched definitions", __version__,
                     "http" if self._tls is None else "https", self.cfg.daemon.listen,
                     len(self.cfg.watch))
            await self._serve(ev)
            return 0
        finally:
            await asyncio.shield(self._shutdown())

    async def wait_started(self) -> None:
        """Return once start-up is complete (for in-process callers of ``run``)."""
        await self._events_now().started.wait()

    def _events_now(self) -> _Events:
        """The daemon's events, made on first use (inside the running loop)."""
        if self._events is None:
            self._events = _Events()
        return self._events

    def request_stop(self) -> None:
        """First call: drain. Second call: stop running warms at once."""
        ev = self._events
        if ev is None:
            return
        if ev.stop.is_set():
            ev.stop_runs.set()
            return
        log.info("stopping: draining running warms (up to %.0f s)", self.cfg.daemon.drain_timeout)
        # At once: a warm or a campaign change asked between the signal and _drain (the loop
        # may be busy) was accepted and then run, or stored for the next start.
        self.draining = True
        ev.stop.set()

    def request_reload(self) -> None:
        """Re-read the config and the proxy (SIGHUP)."""
        if self._events is not None:
            self._events.reload.set()

    async def _start(self) -> None:
        cfg, ev = self.cfg, self._events
        assert ev is not None
        # First: a listener beyond loopback without TLS is refused before anything is opened.
        self._tls = server_tls(cfg.daemon)
        if self._tls is not None:
            self.metrics.set_api_certificate_expiry(self._listen, self._tls.expires)
        self.token = _read_token(cfg.daemon.token_file, cfg.daemon.listen)
        store = self._store = await asyncio.to_thread(self.ctx.open_store)
        await asyncio.to_thread(store.check)  # a service writes for months: not into damage
        self.metrics.state_queued_bytes.set_function(lambda: store.queued_bytes)
        self.metrics.state_writer_up.set_function(lambda: 0.0 if store.writer_stopped else 1.0)
        store.on_writer_replaced = self.metrics.state_writer_replacements.inc
        member = self._member = ClusterMember(store, self.metrics, config=lambda: self.cfg.cluster,
                                              listen=cfg.daemon.listen, version=__version__)
        await member.start()
        self.credentials = self.ctx.load_credentials()
        if self.credentials.proxy is not None:
            self._proxy_stamp = file_stamp(self.credentials.proxy.path)
        # The pool is built by the context in force when credentials change (a reload may
        # have changed storage settings too); the budget is fixed at start.
        toucher = self._touch = SharedToucher(self._make_toucher, cfg.storage.concurrency,
                                              expired=self._token_unusable)
        await toucher.install(self.credentials.ssl_context())
        # One Tape REST access for the daemon's life: its discovery answers are kept
        # storage.discovery_ttl across runs; renewed credentials are installed in it too.
        tape = self.ctx.make_tape(self.credentials.ssl_context(), token=self.credentials.token,
                                  on_stage=self.metrics.stage_request)
        tape.ready = toucher.usable  # an expired token pauses staging too
        self._tape = await tape.__aenter__()
        self._credentials_changed()
        # One client at the storage: dCache limits its request rate, not each run's.
        rates = Rates()
        runs = Runs(store, toucher, self.metrics, settings=self._settings, tape=self._tape_now,
                    fresh_for=lambda: self.cfg.state.fresh_for, draining=self._draining,
                    stop=ev.stop_runs, spawn=self.spawn, after=self._after_run,
                    changed=self._status, max_runs=lambda: self.cfg.daemon.max_runs,
                    rates=rates)
        # On a shared (PostgreSQL) state watch rounds are planned in the database and warmed
        # chunk by chunk by every member; on a SQLite file the daemon schedules its own.
        chunks = None
        if store.url is not None:
            chunks = ChunkWorker(store, member, self.metrics, run=self._run_chunk,
                                 draining=self._draining, round_done=self._round_done)
        watches = Watches(store, self.metrics, open_catalog=self.open_catalog,
                          submit=lambda cat, fresh: runs.submit(cat, origin="watch",
                                                                fresh_for=fresh)[0],
                          spawn=self.spawn, config=lambda: self.cfg,
                          member=member if chunks is not None else None,
                          planned=chunks.wake.set if chunks is not None else lambda: None)
        campaigns = DaemonCampaigns(store, toucher, self.metrics, context=lambda: self.ctx,
                                    tape=self._tape_now,
                                    settings=self._settings, open_catalog=self.open_catalog,
                                    spawn=self.spawn, draining=self._draining, member=member,
                                    rates=rates)
        self._live = _Live(store, toucher, runs, watches, campaigns, member, chunks)
        await self._start_api(_Ports(self, self._live))
        watches.apply(cfg)
        await campaigns.start()
        if chunks is not None:
            self._chunk_task = asyncio.ensure_future(chunks.loop())

    async def _round_done(self, catalog: str, definition: str, round_id: int) -> None:
        assert self._live is not None
        await self._live.watches.round_done(catalog, definition, round_id)

    async def _run_chunk(self, catalog: Catalog, fresh_for: float, stop: asyncio.Event) -> int:
        """Warm one chunk of a watch round as a run of its definition (beside any other run
        of it, never joined to one; ``stop`` interrupts it); its exit code."""
        assert self._live is not None
        info, _ = self._live.runs.submit(catalog, origin="chunk", fresh_for=fresh_for,
                                         join=False, stop=stop)
        await info.finished.wait()
        if info.state == "error":
            raise PrestagedError(info.error)
        return info.exit_code or 0

    async def _start_api(self, ports: _Ports) -> None:
        host, _, port = self.cfg.daemon.listen.rpartition(":")
        # shutdown_timeout: a client that never finishes its request body held the exit for
        # aiohttp's default 60 s, past systemd's TimeoutStopSec after the drain.
        # In clear (loopback) a request must name this host (DNS rebinding: build_app).
        hosts = None if self._tls is not None else await asyncio.to_thread(_own_names, host)
        app = build_app(ports, listen=self.cfg.daemon.listen, hosts=hosts)
        try:
            self._runner, self._listener = await serve(
                app, host.strip("[]"), int(port), shutdown_timeout=SHUTDOWN_GRACE,
                tls=self._tls.context if self._tls is not None else None)
        except OSError as e:
            raise ConfigError(f"daemon.listen {self.cfg.daemon.listen}: {e.strerror}") from None

    async def _serve(self, ev: _Events) -> None:
        background = [self.spawn(self._watch_credentials()), self.spawn(self._watchdog()),
                      self.spawn(self._tidy()),
                      self.spawn(probe_lag(self.metrics.loop_lag.observe, LOOP_PROBE))]
        while not ev.stop.is_set():
            reload_wait = asyncio.ensure_future(ev.reload.wait())
            stop_wait = asyncio.ensure_future(ev.stop.wait())
            await asyncio.wait({reload_wait, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            reload_wait.cancel()
            stop_wait.cancel()
            if ev.reload.is_set() and not ev.stop.is_set():
                ev.reload.clear()
                await self._do_reload()
        for task in background:
            task.cancel()
        await self._drain(ev)

    async def _drain(self, ev: _Events) -> None:
        self.draining = True
        # A stop may take longer than systemd's TimeoutStopSec (120 s in the shipped unit;
        # stop_takes is 135 s with the default 30 s drain), which would SIGKILL it mid-drain,
        # the state writer's last batch with it: ask for what it takes.
        self.notifier.stopping(within=stop_takes(self.cfg.daemon.drain_timeout))
        if self._live is not None:
            self._live.watches.stop()
            self._live.campaigns.stop()
        if self._chunk_task is not None:
            self._chunk_task.cancel()
        running = [t for t in self._tasks if not t.done()]
        if running:
            _, pending = await asyncio.wait(running, timeout=self.cfg.daemon.drain_timeout)
            if pending:
                log.info("drain timeout: stopping %d running tasks (warms, campaign steps)",
                         len(pending))
                ev.stop_runs.set()
                await asyncio.wait(pending, timeout=STOP_RUNS_GRACE)

    async def _shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()  # no new connections; the runner closes the open ones
        if self._runner is not None:
            await self._runner.cleanup()
        if self._touch is not None:
            await self._touch.close()
        if self._tape is not None:
            await self._tape.__aexit__(None, None, None)
        if self._chunk_task is not None:
            self._chunk_task.cancel()
        if self._member is not None:
            await self._member.leave()
        if self._store is not None:
            await asyncio.to_thread(self._store.close)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as a task the daemon waits for (drain) and cancels (shutdown)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _draining(self) -> bool:
        return self.draining

    async def _tidy(self) -> None:
        """Drop what the state no longer needs (``Store.tidy``) every ``state.tidy_every``
        (read at each turn: a reload may change it; 0: never), the first time at most
        ``TIDY_FIRST`` after start (a daemon restarted daily would otherwise never tidy). A
        failure is logged and tried again at the next turn: the state is whole without it."""
        store = self._store
        assert store is not None
        delay = min(self.cfg.state.tidy_every or TIDY_FIRST, TIDY_FIRST)
        while True:
            await asyncio.sleep(delay)
            delay = self.cfg.state.tidy_every or TIDY_FIRST
            if not self.cfg.state.tidy_every:
                continue
            campaigns = self._live.campaigns if self._live is not None else None
            try:
                done = await asyncio.to_thread(
                    store.tidy, campaigns.running() if campaigns is not None else ())
            except StateError as e:
                log.warning("state tidy failed (tried again in %.0f s): %s", delay, e)
                continue
            for what, n in {**done.to_dict(), "campaigns": done.campaigns}.items():
                self.metrics.state_tidied.labels(what).inc(n)
            if campaigns is not None:
                campaigns.forgotten(done.forgotten)
            if done:
                log.info("state tidied: dropped %d runs beyond state.keep_runs = %d per "
                         "definition, %d files no definition lists, %d finished watch rounds, "
                         "%d campaigns finished more than state.keep_campaigns = %g s ago%s",
                         done.runs, store.keep_runs, done.files, done.rounds, done.campaigns,
                         store.keep_campaigns,
                         f" ({', '.join(done.forgotten)})" if done.forgotten else "")

    # --- reload -------------------------------------------------------------------------------

    async def _do_reload(self) -> None:
        self.notifier.reloading()
        try:
            cfg = load_config(self.config_path)
        except ConfigError as e:
            log.error("reload: %s; keeping the running configuration", e)
        else:
            self.cfg = cfg
            self.ctx = Context(cfg)
            if self._tape is not None:
                self._tape.settings = self.ctx.tape_settings()
                self._tape.slots.limit = cfg.storage.stage_requests
            if self._store is not None:
                self._store.keep_runs = cfg.state.keep_runs
                self._store.keep_campaigns = cfg.state.keep_campaigns
            if self._live is not None:
                self._live.watches.apply(cfg)
            self._reload_tls()
            self._reload_token()
            started = self._started_with
            fixed = [key for key in RESTART_KEYS if _value(cfg, key) != _value(started, key)]
            if fixed:
                log.warning("reload: %s changed: %s at a restart (the daemon goes on with the "
                            "values it started with)", ", ".join(fixed),
                            "it takes effect" if len(fixed) == 1 else "they take effect")
            if cfg.storage.concurrency > started.storage.concurrency:
                log.warning("reload: storage.concurrency is now %d, but the daemon's runs "
                            "share the budget of %d files in flight it started with until a "
                            "restart", cfg.storage.concurrency, started.storage.concurrency)
            log.info("reloaded %s: %d watched definitions", self.config_path or "defaults",
                     len(cfg.watch))
        await self._check_credentials(force=True)
        self.notifier.ready()
        self._status()

    def _reload_tls(self) -> None:
        """New API connections get the certificate and key ``daemon.tls_cert``/``tls_key``
        name now; one that cannot be used keeps the one in use. Switching between http and
        https takes a restart: the listener is not rebound (nor is ``listen`` changed)."""
        tls, daemon = self._tls, self.cfg.daemon
        if (tls is None) != (daemon.tls_cert is None):
            log.warning("reload: setting or unsetting daemon.tls_cert takes a restart; the "
                        "API is still served over %s", "http" if tls is None else "https")
        elif tls is not None:
            try:
                tls.reload(daemon)
            except ConfigError as e:
                log.error("reload: %s; keeping the API's certificate in use", e)
            self.metrics.set_api_certificate_expiry(self._listen, tls.expires)

    def _reload_token(self) -> None:
        """Mutating API calls need the token ``daemon.token_file`` holds now (a rotated token
        takes effect without a restart); a file that cannot be used keeps the token in use.
        ``listen`` is the one bound at start."""
        try:
            token = _read_token(self.cfg.daemon.token_file, self._listen)
        except ConfigError as e:
            log.error("reload: %s; keeping the API's bearer token in use", e)
            return
        if token != self.token:
            log.info("reload: the API's bearer token %s", "changed" if token and self.token
                     else "is now required" if token else "is no longer required")
            self.token = token

    # --- credentials --------------------------------------------------------------------------

    async def _watch_credentials(self) -> None:
        while True:
            await asyncio.sleep(self._next_check())
            await self._check_credentials()

    def _next_check(self) -> float:
        """Seconds until the credentials are looked at again: ``daemon.credential_check``,
        sooner when the token expires before that (touching pauses at once), and every second
        while paused on an expired token (a renewal resumes touching at once)."""
        wait: float = self.cfg.daemon.credential_check
        token = self.credentials.token if self.credentials is not None else None
        if token is not None:
            left = token.info.time_left().total_seconds()
            wait = min(wait, left + 0.05) if token.info.valid_at() else min(wait, 1.0)
        return max(wait, 0.05)

    async def _check_credentials(self, force: bool = False) -> None:
        """Re-read the proxy when its file changed or moved, and the token file when it changed;
        with ``force`` (a reload) find and check every credential again as at start. A
        credential that changed but cannot be used is logged and the previous one kept. Pause
        touching while one in use is expired."""
        assert self.credentials is not None
        if force:
            await self._reload_credentials()
        else:
            await self._reread_proxy()
            if self.credentials.token is not None:
                self.credentials.token.refresh()
        self._credentials_changed()

    async def _reload_credentials(self) -> None:
        assert self.credentials is not None
        try:
            creds = self.ctx.load_credentials()
        except CredentialError as e:
            log.error("credentials cannot be used: %s; keeping the previous ones", e)
            return
        token = self.credentials.token
        if creds.token is None and token is not None and self.cfg.credentials.method != "proxy":
            # Its file empty (a renewal caught between truncate and write) or gone: the proxy
            # alone was installed and the token file never followed again.
            log.warning("no bearer token found on reload: keeping %s and following its file "
                        "(credentials.method = \"proxy\" drops it)", token.info.where)
            creds = dataclasses.replace(creds, token=token)
        await self._install(creds)

    async def _reread_proxy(self) -> None:
        assert self.credentials is not None
        current = self.credentials.proxy
        if current is None:
            return
        path, _ = resolve_proxy_path(None, self.cfg.credentials.proxy)
        ca_dir, _ = resolve_ca_dir(None, self.cfg.credentials.ca_dir)
        stamp = file_stamp(path)
        if (path, ca_dir, stamp) == (current.path, self.credentials.ca_dir, self._proxy_stamp):
            return
        self._proxy_stamp = stamp
        try:
            info = inspect_proxy(path)
            # An expired replacement was installed over the valid proxy in use, and touching
            # paused: "changed but cannot be used" keeps the previous one, as for a bad key.
            check_lifetime(info, 0)
            warn_if_exposed(path)
            await self._install(dataclasses.replace(self.credentials, proxy=info, ca_dir=ca_dir))
        except CredentialError as e:
            log.error("proxy changed but cannot be used: %s; keeping the previous one", e)
            return
        log.info("proxy %s re-read: %s, %.1f h left", path, info.identity,
                 info.time_left().total_seconds() / 3600)

    async def _install(self, creds: Credentials) -> None:
        """Use ``creds`` for new requests (touches, Tape REST); ``CredentialError`` when OpenSSL
        refuses them (nothing changed then)."""
        assert self._touch is not None
        tls = creds.ssl_context()
        self.credentials = creds
        if creds.proxy is not None:
            self._proxy_stamp = file_stamp(creds.proxy.path)
        await self._touch.install(tls)
        if self._tape is not None:
            self._tape.install(tls, creds.token)

    def _make_toucher(self, tls: ssl.SSLContext) -> HttpToucher:
        """A pool of the context in force (a reload may have changed storage settings) sending
        the token of the credentials in force."""
        token = self.credentials.token if self.credentials is not None else None
        return self.ctx.make_toucher(tls, token)

    def _token_unusable(self) -> bool:
        """Whether the token cannot be sent now, expired or not valid yet (the shared toucher
        asks before each touch); the first touch to find out pauses touching as the credential
        watch would."""
        token = self.credentials.token if self.credentials is not None else None
        if token is None or token.usable():
            return False
        if not self._paused:
            self._credentials_changed()
        return True

    def _credential_problems(self, *, margin: bool) -> list[str]:
        """What is wrong with the credentials in use: expired ones, a token not valid yet, or
        (``margin``) ones with less than their ``*min_lifetime`` left."""
        creds, c = self.credentials, self.cfg.credentials
        if creds is None:
            return ["no credentials"]
        problems = []
        if creds.proxy is not None:
            left = creds.proxy.time_left().total_seconds()
            if left < (c.min_lifetime if margin else 0.0) or left <= 0:
                voms = (" (its VOMS attributes end first)"
                        if creds.proxy.usable_until < creds.proxy.not_after else "")
                problems.append(f"proxy {creds.proxy.path} has {max(0.0, left):.0f} s left{voms}"
                                + (", less than credentials.min_lifetime" if margin else ""))
        if creds.token is not None:
            info = creds.token.info
            left = info.time_left().total_seconds()
            if left > 0 and not info.valid_at():
                problems.append(f"{info.where} is not valid before "
                                f"{info.not_before:%Y-%m-%d %H:%M:%S} UTC (is the clock of this "
                                "host right?)")
            elif left < (c.token_min_lifetime if margin else 0.0) or left <= 0:
                problems.append(f"{info.where} has {max(0.0, left):.0f} s left"
                                + (", less than credentials.token_min_lifetime" if margin
                                   else ""))
        return problems

    def _credentials_changed(self) -> None:
        assert self._touch is not None and self.credentials is not None
        creds = self.credentials
        # A credential no longer in use (a reload dropped it) loses its series: its expiry
        # would otherwise stay exported, and the expiry alerts fire for it.
        self.metrics.set_credential_expiry(
            "proxy", None if creds.proxy is None else creds.proxy.usable_until.timestamp())
        self.metrics.set_credential_expiry(
            "token", None if creds.token is None else creds.token.info.expires.timestamp())
        expired = self._credential_problems(margin=False)
        if expired:
            # The shared toucher may have paused already (it looks at the token before each
            # touch): log the pause once, here.
            if not self._paused:
                log.error("%s: touching paused until renewed", "; ".join(expired))
            self._paused = True
            self._touch.valid.clear()
            return
        for problem in self._credential_problems(margin=True):
            log.warning("%s: renew it", problem)
        if self._paused:
            log.info("credentials valid again: touching resumed")
        self._paused = False
        self._touch.valid.set()

    def readiness(self) -> list[str]:
        """Problems that make the daemon not ready (empty: ready)."""
        problems = []
        if self._live is None:
            problems.append("state store not open")
        elif not self._live.member.connected.is_set():
            problems.append("state database does not answer")
        elif self._live.store.writer_stopped:
            problems.append("state writer stopped: a new one starts once the database answers")
        elif (gone := self._live.store.file_problem()) is not None:
            problems.append(gone)
        problems += self._credential_problems(margin=True)
        if self.draining:
            problems.append("stopping")
        return problems

    # --- what runs, watches and campaigns are given -------------------------------------------

    def open_catalog(self, kind: str, definition: str) -> Catalog:
        """The catalog of ``definition``, shown the daemon's proxy as the context decides
        (``catalog.samweb.use_certificate``); every SAM, MetaCat and Rucio request is counted
        in the metrics."""
        return self.ctx.open_catalog(kind, definition, creds=self.credentials,
                                     probe=self.metrics.catalog_request)

    def _tape_now(self) -> Optional[TapeAccess]:
        """The Tape REST access runs use now: none with ``storage.stage = never``."""
        return None if self.cfg.storage.stage == "never" else self._tape

    def _settings(self) -> WarmSettings:
        return self.ctx.warm_settings(self.credentials)

    async def _after_run(self, info: RunInfo) -> None:
        assert self._live is not None
        await self._live.watches.after_run(info)

    # --- systemd ------------------------------------------------------------------------------

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        if not interval:
            return
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval / 2)

    def _status(self) -> None:
        live = self._live
        if live is None:
            return
        running = live.runs.running()
        text = f"{len(live.watches)} watched, {len(running)} running"
        campaigns = live.campaigns.entries.values()
        if campaigns:
            text += f", {sum(e.status == 'running' for e in campaigns)}/{len(campaigns)} " \
                    "campaigns running"
        if running:
            r = running[0]
            text += f": {r.definition} {r.tally.done}/{r.tally.total or '?'}"
        self.notifier.status(text)


SHUTDOWN_GRACE = 5.0
"""Seconds the API's open connections get to finish when the daemon stops."""
RESTART_KEYS = ("daemon.listen", "state.path", "state.url", "state.journal", "state.batch",
                "state.flush_interval")
"""Keys read once at start (the listener, the store): a reload that finds them changed says
they wait for a restart. (``daemon.tls_cert`` on or off has its own word; a run takes a new
``storage.concurrency`` at once, within the shared budget of the value at start.)"""


def _value(cfg: Config, key: str) -> object:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


STOP_RUNS_GRACE = 30.0
"""Seconds the tasks still running after ``daemon.drain_timeout`` get to stop and record
where they got (a submit command is killed then)."""
CLOSE_GRACE = 60.0
"""Seconds allowed, when the daemon stops, for leaving the cluster and closing the state (the
writer's last batch, a database busy up to its 30 s timeout)."""


def _own_names(listen_host: str) -> set[str]:
    """The names a client of the API may give in ``Host`` besides addresses and
    ``localhost``: ``daemon.listen``'s host and this host's names (a proxy on this host that
    passes the name it was asked by)."""
    return {listen_host.strip("[]"), socket.gethostname(), socket.getfqdn()}


def stop_takes(drain_timeout: float) -> float:
    """Seconds a stop may take at most: the drain, the runs' stop, a run cancelled then still
    waiting for its stage answers (``STAGE_ANSWER_GRACE``), the API's connections and the
    state's close (what the daemon asks systemd for with ``EXTEND_TIMEOUT_USEC``)."""
    return (drain_timeout + STOP_RUNS_GRACE + STAGE_ANSWER_GRACE + SHUTDOWN_GRACE
            + CLOSE_GRACE)

WITH_THE_TOKEN = "(shown with the token)"
"""What an open API answer says instead of a run's error."""


def _without_reason(row: JsonObject) -> JsonObject:
    """``row`` (a dataset's status) with its last run's error, if any, left to the token."""
    last = row.get("last_run")
    if not isinstance(last, dict) or not last.get("reason"):
        return row
    return {**row, "last_run": {**last, "reason": WITH_THE_TOKEN}}


class _Ports:
    """The daemon as its HTTP API sees it: an ``api.ApiPorts``."""

    def __init__(self, daemon: Daemon, live: _Live) -> None:
        self._daemon, self._live = daemon, live
        self._datasets: Coalesced[tuple[Optional[str], Optional[str], float],
                                  list[JsonObject]] = Coalesced()

    @property
    def token(self) -> Optional[str]:
        """The bearer token (None: none configured)."""
        return self._daemon.token

    def readiness(self) -> list[str]:
        """See ``Daemon.readiness``."""
        return self._daemon.readiness()

    def submit(self, definition: str, catalog: Optional[str]) -> tuple[RunInfo, bool]:
        """Queue a warm of ``definition`` (catalog kind ``catalog`` or ``catalog.default``),
        named as an API caller may name one (``naming.open_requested``)."""
        d = self._daemon
        cat = open_requested(catalog or d.cfg.catalog.default, definition,
                             d.cfg.catalog.local.dir, d.open_catalog)
        return self._live.runs.submit(cat, origin="api")

    def run(self, run_id: int) -> Optional[RunInfo]:
        """Run ``run_id``, if remembered."""
        return self._live.runs.get(run_id)

    async def datasets(self, name: Optional[str], catalog: Optional[str], *,
                       reasons: bool) -> list[JsonObject]:
        """Warmth of every recorded definition, or of ``name`` (in ``catalog``); concurrent
        asks share one read of the store, whose answer serves for 2 s (``Coalesced``).
        Without ``reasons`` each last run's ``reason`` is ``"(shown with the token)"`` when it
        has one: it may name credential files, a token's subject, what a storage answered."""
        fresh_for = self._daemon.cfg.state.fresh_for

        async def read() -> list[JsonObject]:
            rows = await asyncio.to_thread(self._live.store.status, fresh_for, name, catalog)
            return [r.to_dict() for r in rows]

        rows = await self._datasets.get((name, catalog, fresh_for), read)
        return rows if reasons else [_without_reason(row) for row in rows]

    async def members(self) -> list[JsonObject]:
        """The state's members, alive by this daemon's ``[cluster] lease`` (read in a worker
        thread: the store blocks)."""
        rows = await asyncio.to_thread(cluster_members, self._live.store)
        return [m.to_dict(self._live.member.lease) for m in rows]

    async def add_campaign(self, text: str, source: str, *, held: bool) -> tuple[str, bool]:
        """See ``DaemonCampaigns.add``: (campaign name, whether it is new)."""
        campaign, new = await self._live.campaigns.add(text, source, held=held)
        return campaign.name, new

    async def campaign_action(self, name: str, action: str, *, stage: Optional[str],
                              submission: Optional[int], job_id: Optional[str]) -> str:
        """See ``DaemonCampaigns.act``."""
        return await self._live.campaigns.act(name, action, stage=stage, submission=submission,
                                              job_id=job_id)

    async def describe_campaign(self, name: str, *, output: bool) -> JsonObject:
        """See ``DaemonCampaigns.describe``."""
        return await self._live.campaigns.describe(name, output=output)

    async def forget_campaign(self, name: str) -> dict[str, int]:
        """See ``DaemonCampaigns.forget``."""
        return await self._live.campaigns.forget(name)

    async def campaign_summaries(self) -> list[JsonObject]:
        """See ``DaemonCampaigns.summaries``."""
        return list(await self._live.campaigns.summaries())

    def metrics_handler(self) -> Handler:
        """``GET /metrics``."""
        return self._daemon.metrics.aiohttp_handler()

