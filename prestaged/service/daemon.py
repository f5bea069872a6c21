"""``prestaged serve``: keep watched definitions warm, take warm requests over HTTP, report.

Lifecycle (STYLE.md 3): ``run()`` starts the store, credentials, the shared connection pool and
the HTTP API, tells systemd READY=1, then waits for a stop request; shutdown happens in
``finally``. Signal handlers only set events: SIGHUP re-reads the config and the proxy, the
first SIGTERM/SIGINT drains (running warms get ``daemon.drain_timeout`` to finish, then are
stopped and recorded), a second one stops at once.

All runs share one touch budget (``storage.concurrency`` files in flight in total) and never
two runs of one definition overlap. Scheduled re-warms of a ``[[watch]]`` entry skip files
touched within its ``every``; so after a restart the state store lets work resume instead of
starting over. When the proxy file changes on disk the daemon re-reads it and new connections
use it; an expired proxy pauses touching until a valid one appears.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import signal
import ssl
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from prestaged._version import __version__
from prestaged.catalog import Catalog
from prestaged.config import Config, WatchConfig, load_config
from prestaged.context import Context
from prestaged.credentials import (
    Credentials,
    ProxyInfo,
    inspect_proxy,
    resolve_ca_dir,
    resolve_proxy_path,
)
from prestaged.errors import ConfigError, CredentialError, PrestagedError
from prestaged.metrics import Metrics, run_result
from prestaged.model import Attempt
from prestaged.runner import run_definition
from prestaged.service.campaigns import DaemonCampaigns
from prestaged.service.sdnotify import Notifier
from prestaged.state.store import Store
from prestaged.storage.http import HttpToucher
from prestaged.warm import Tally

__all__ = ["Daemon", "RunInfo"]

log = logging.getLogger(__name__)

_KEPT_RUNS = 1000
"""Finished runs remembered for ``GET /api/v1/runs/<id>`` (the store keeps all)."""


@dataclass
class RunInfo:
    """A warm run the daemon queued, is running or ran."""

    id: int
    catalog: str
    definition: str
    origin: str
    """``watch`` or ``api``."""
    state: str = "queued"
    """queued, running, done (finished with an exit code) or error (did not run)."""
    submitted: float = field(default_factory=time.time)
    started: Optional[float] = None
    ended: Optional[float] = None
    exit_code: Optional[int] = None
    error: str = ""
    warm_fraction: Optional[float] = None
    """Share of the definition's files fresh after the run (from the store)."""
    tally: Tally = field(default_factory=Tally)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with live counts while running."""
        t = self.tally
        return {
            "id": self.id, "catalog": self.catalog, "definition": self.definition,
            "origin": self.origin, "state": self.state, "submitted": self.submitted,
            "started": self.started, "ended": self.ended, "exit_code": self.exit_code,
            "error": self.error or None, "files": t.done, "total": t.total,
            "warm_fraction": self.warm_fraction,
            "counts": dict(t.results), "retries": dict(t.retries),
        }


class _SharedToucher:
    """The daemon's touch path: one budget for all runs, pause while the proxy is expired,
    and a pool that can be swapped for one with renewed credentials without dropping work."""

    def __init__(self, make: Callable[[ssl.SSLContext], HttpToucher], budget: int) -> None:
        self._make = make
        self._budget = asyncio.Semaphore(budget)
        self.valid = asyncio.Event()
        self._current: Optional[HttpToucher] = None
        self._users: dict[int, int] = {}
        self._retired: list[HttpToucher] = []

    async def install(self, ssl_context: ssl.SSLContext) -> None:
        """Use a new pool built on ``ssl_context`` for new touches; retire the old one."""
        fresh = self._make(ssl_context)
        await fresh.start()
        old, self._current = self._current, fresh
        self._users[id(fresh)] = 0
        if old is not None:
            self._retired.append(old)
            await self._close_idle()

    async def _close_idle(self) -> None:
        for t in [t for t in self._retired if self._users.get(id(t), 0) == 0]:
            self._retired.remove(t)
            self._users.pop(id(t), None)
            await t.close()

    async def touch(self, url: str) -> Attempt:
        """One attempt, within the shared budget, once the credentials are valid."""
        await self.valid.wait()
        async with self._budget:
            t = self._current
            assert t is not None
            self._users[id(t)] += 1
            try:
                return await t.touch(url)
            finally:
                self._users[id(t)] -= 1
                if self._retired:
                    await self._close_idle()

    async def close(self) -> None:
        """Close every pool."""
        for t in [*self._retired, *([self._current] if self._current else [])]:
            await t.close()
        self._retired.clear()
        self._current = None


def _is_loopback(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_token(path: Optional[Path], listen: str) -> Optional[str]:
    """The bearer token, required (from a 0600 file) when the listener is not loopback-only."""
    if path is None:
        if _is_loopback(listen):
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
    return token


class Daemon:
    """The long-lived service; see the module docstring. ``cfg`` is the loaded config and
    ``config_path`` where SIGHUP re-reads it from (None: built-in defaults)."""

    def __init__(self, cfg: Config, config_path: Optional[Path]) -> None:
        self.cfg = cfg
        self.ctx = Context(cfg)
        self.config_path = config_path
        self.metrics = Metrics()
        self.notifier = Notifier.from_environment()
        self.store: Optional[Store] = None
        self.credentials: Optional[Credentials] = None
        self.token: Optional[str] = None
        self.runs: dict[int, RunInfo] = {}
        self._next_id = 1
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watches: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._run_stop = asyncio.Event()
        self.draining = False
        self._proxy_stamp: Optional[tuple[int, int, int]] = None
        self._touch: Optional[_SharedToucher] = None
        self._runner: Any = None
        self.campaigns = DaemonCampaigns(self)

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> int:
        """Start up, serve until stopped, drain, shut down; returns the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        try:
            await self._start()
            self.notifier.ready()
            self._status()
            log.info("prestaged %s serving on http://%s, %d watched definitions", __version__,
                     self.cfg.daemon.listen, len(self.cfg.watch))
            await self._serve()
            return 0
        finally:
            await asyncio.shield(self._shutdown())

    def request_stop(self) -> None:
        """First call: drain. Second call: stop running warms at once."""
        if self._stop.is_set():
            self._run_stop.set()
            return
        log.info("stopping: draining running warms (up to %.0f s)", self.cfg.daemon.drain_timeout)
        self._stop.set()

    async def _start(self) -> None:
        cfg = self.cfg
        self.token = _read_token(cfg.daemon.token_file, cfg.daemon.listen)
        self.store = await asyncio.to_thread(self.ctx.open_store)
        self.credentials = self.ctx.load_credentials()
        self._proxy_stamp = _stamp(self.credentials.proxy.path)
        # The pool is built by the context in force when credentials change (a reload may
        # have changed storage settings too); the budget is fixed at start.
        self._touch = _SharedToucher(lambda tls: self.ctx.make_toucher(tls),  # noqa: PLW0108
                                     cfg.storage.concurrency)
        await self._touch.install(self.credentials.ssl_context())
        self._credentials_changed(self.credentials.proxy)
        await self._start_api()
        self._apply_watches()
        self.campaigns.start()

    @property
    def toucher(self) -> _SharedToucher:
        """The shared touch path (pool, budget, pause while the proxy is expired)."""
        assert self._touch is not None
        return self._touch

    def store_or_fail(self) -> Store:
        """The open state store."""
        assert self.store is not None
        return self.store

    async def _start_api(self) -> None:
        from aiohttp import web

        from prestaged.service.api import build_app

        host, _, port = self.cfg.daemon.listen.rpartition(":")
        self._runner = web.AppRunner(build_app(self), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host.strip("[]"), int(port))
        try:
            await site.start()
        except OSError as e:
            raise ConfigError(f"daemon.listen {self.cfg.daemon.listen}: {e.strerror}") from None

    async def _serve(self) -> None:
        background = [self.spawn(self._watch_credentials()), self.spawn(self._watchdog())]
        while not self._stop.is_set():
            reload_wait = asyncio.ensure_future(self._reload.wait())
            stop_wait = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({reload_wait, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            reload_wait.cancel()
            stop_wait.cancel()
            if self._reload.is_set() and not self._stop.is_set():
                self._reload.clear()
                await self._do_reload()
        for task in background:
            task.cancel()
        await self._drain()

    async def _drain(self) -> None:
        self.draining = True
        self.notifier.stopping()
        for task in self._watches.values():
            task.cancel()
        self.campaigns.stop()
        running = [t for t in self._tasks if not t.done()]
        if running:
            _, pending = await asyncio.wait(running, timeout=self.cfg.daemon.drain_timeout)
            if pending:
                log.info("drain timeout: stopping %d running warms", len(pending))
                self._run_stop.set()
                await asyncio.wait(pending, timeout=30)

    async def _shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._touch is not None:
            await self._touch.close()
        if self.store is not None:
            await asyncio.to_thread(self.store.close)

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as a task the daemon waits for (drain) and cancels (shutdown)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

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
            self._apply_watches()
            log.info("reloaded %s: %d watched definitions", self.config_path or "defaults",
                     len(cfg.watch))
        await self._check_credentials(force=True)
        self.notifier.ready()
        self._status()

    def _apply_watches(self) -> None:
        """Start loops for new ``[[watch]]`` entries, stop those no longer listed."""
        wanted = {(w.catalog or self.cfg.catalog.default, w.definition): w for w in self.cfg.watch}
        for key in [k for k in self._watches if k not in wanted]:
            self._watches.pop(key).cancel()
        for key, w in wanted.items():
            if key in self._watches:
                self._watches[key].cancel()
            self._watches[key] = self.spawn(self._watch_loop(key[0], w))

    # --- credentials --------------------------------------------------------------------------

    async def _watch_credentials(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.daemon.credential_check)
            await self._check_credentials()

    async def _check_credentials(self, force: bool = False) -> None:
        """Re-read the proxy when its file changed, or the config names another proxy or CA
        directory (or ``force``); pause on expiry."""
        assert self.credentials is not None and self._touch is not None
        path, _ = resolve_proxy_path(None, self.cfg.credentials.proxy)
        ca_dir, _ = resolve_ca_dir(None, self.cfg.credentials.ca_dir)
        stamp = _stamp(path)
        moved = (path, ca_dir) != (self.credentials.proxy.path, self.credentials.ca_dir)
        if force or moved or stamp != self._proxy_stamp:
            self._proxy_stamp = stamp
            try:
                info = inspect_proxy(path)
                creds = Credentials(proxy=info, ca_dir=ca_dir)
                await self._touch.install(creds.ssl_context())
            except CredentialError as e:
                log.error("proxy changed but cannot be used: %s; keeping the previous one", e)
            else:
                self.credentials = creds
                log.info("proxy %s re-read: %s, %.1f h left", path, info.identity,
                         info.time_left().total_seconds() / 3600)
        self._credentials_changed(self.credentials.proxy)

    def _credentials_changed(self, info: ProxyInfo) -> None:
        assert self._touch is not None
        self.metrics.set_credential_expiry("proxy", info.not_after.timestamp())
        left = info.time_left().total_seconds()
        if left <= 0:
            if self._touch.valid.is_set():
                log.error("proxy %s expired: touching paused until it is renewed", info.path)
            self._touch.valid.clear()
            return
        if left < self.cfg.credentials.min_lifetime:
            log.warning("proxy %s has %.1f h left, less than credentials.min_lifetime: renew it",
                        info.path, left / 3600)
        self._touch.valid.set()

    def readiness(self) -> list[str]:
        """Problems that make the daemon not ready (empty: ready)."""
        problems = []
        if self.store is None:
            problems.append("state store not open")
        if self.credentials is None:
            problems.append("no credentials")
        else:
            left = self.credentials.proxy.time_left().total_seconds()
            if left < self.cfg.credentials.min_lifetime:
                problems.append(f"proxy {self.credentials.proxy.path} has {max(0.0, left):.0f} s "
                                "left, less than credentials.min_lifetime")
        if self.draining:
            problems.append("stopping")
        return problems

    # --- runs ---------------------------------------------------------------------------------

    def submit(self, definition: str, catalog: Optional[str] = None, *, origin: str = "api",
               fresh_for: Optional[float] = None) -> RunInfo:
        """Queue a warm of ``definition``; raises ``PrestagedError`` for an unknown one."""
        if self.draining:
            raise PrestagedError("the daemon is stopping")
        cat = self.open_catalog(catalog or self.cfg.catalog.default, definition)
        info = RunInfo(id=self._next_id, catalog=cat.name, definition=cat.definition,
                       origin=origin)
        self._next_id += 1
        self.runs[info.id] = info
        for old in sorted(self.runs)[:-_KEPT_RUNS]:
            del self.runs[old]
        self.spawn(self._execute(info, cat, fresh_for))
        return info

    def open_catalog(self, kind: str, definition: str) -> Catalog:
        """The catalog of ``definition``, shown the daemon's proxy as the context decides
        (``catalog.samweb.use_certificate``); every SAM request is counted in the metrics."""
        return self.ctx.open_catalog(kind, definition, creds=self.credentials,
                                     probe=self.metrics.catalog_request)

    async def _execute(self, info: RunInfo, catalog: Any, fresh_for: Optional[float]) -> None:
        key = (info.catalog, info.definition)
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                if self.draining:
                    info.state, info.error = "error", "not started: the daemon was stopping"
                    return
                info.state, info.started = "running", time.time()
                self._status()
                report = await run_definition(
                    catalog, self.ctx.warm_settings(self.credentials), self.toucher,
                    store=self.store_or_fail(), tally=info.tally, stop=self._run_stop,
                    probe=self.metrics,
                    fresh_for=self.cfg.state.fresh_for if fresh_for is None else fresh_for)
                info.exit_code = report.exit_code
                info.error = str(report.aborted) if report.aborted else ""
                info.state = "done"
                self.metrics.run_finished(run_result(report))
                info.warm_fraction = await self._update_dataset(info.catalog, info.definition)
                self._check_ready(info)
        except PrestagedError as e:
            info.state, info.error = "error", str(e)
            self.metrics.run_finished("aborted")
            log.error("warm of %s failed: %s", info.definition, e)
        finally:
            info.ended = time.time()
            info.finished.set()
            self._status()

    async def _update_dataset(self, catalog: str, definition: str) -> Optional[float]:
        """Refresh the dataset gauges; return the fresh fraction of its files."""
        assert self.store is not None
        fresh_for = self._fresh_for(catalog, definition)
        rows = await asyncio.to_thread(self.store.status, fresh_for, definition, catalog)
        fraction = None
        for r in rows:
            last = r.last_run.ended if r.last_run else None
            self.metrics.set_dataset(r.definition, warm=r.fresh, stale=r.stale,
                                     failed=sum(r.failed.values()), unknown=r.never,
                                     last_warm=last)
            fraction = r.fresh / r.files if r.files else None
        return fraction

    def _check_ready(self, info: RunInfo) -> None:
        """Warn when a watched definition stays below its ``ready`` fraction after a run."""
        for w in self.cfg.watch:
            key = (w.catalog or self.cfg.catalog.default, w.definition)
            if key == (info.catalog, info.definition) and info.warm_fraction is not None \
                    and info.warm_fraction < w.ready:
                log.warning("watch %s: only %.1f%% warm after the run, below ready %.1f%%",
                            w.definition, 100 * info.warm_fraction, 100 * w.ready)

    def _fresh_for(self, catalog: str, definition: str) -> float:
        for w in self.cfg.watch:
            if (w.catalog or self.cfg.catalog.default, w.definition) == (catalog, definition):
                return _watch_fresh_for(w)
        return self.cfg.state.fresh_for

    async def _watch_loop(self, kind: str, w: WatchConfig) -> None:
        """Warm ``w`` now (or when its last run is ``every`` old), then every ``every``."""
        delay = await self._first_delay(kind, w)
        while True:
            await asyncio.sleep(delay)
            try:
                info = self.submit(w.definition, kind, origin="watch",
                                   fresh_for=_watch_fresh_for(w))
            except PrestagedError as e:
                log.error("watch %s: %s", w.definition, e)
            else:
                await info.finished.wait()
            jitter = self.cfg.daemon.jitter
            delay = w.every * (1.0 + random.uniform(-jitter, jitter))

    async def _first_delay(self, kind: str, w: WatchConfig) -> float:
        assert self.store is not None
        try:
            cat = self.open_catalog(kind, w.definition)
        except PrestagedError:
            return 0.0  # submit() will report the problem
        rows = await asyncio.to_thread(self.store.status, w.every, cat.definition, cat.name)
        if rows and rows[0].last_run and rows[0].last_run.ended and rows[0].last_run.exit_code == 0:
            return max(0.0, rows[0].last_run.ended + w.every - time.time())
        return 0.0

    # --- systemd ------------------------------------------------------------------------------

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        if not interval:
            return
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval / 2)

    def _status(self) -> None:
        running = [r for r in self.runs.values() if r.state == "running"]
        text = f"{len(self._watches)} watched, {len(running)} running"
        campaigns = self.campaigns.entries.values()
        if campaigns:
            text += f", {sum(e.status == 'running' for e in campaigns)}/{len(campaigns)} " \
                    "campaigns running"
        if running:
            r = running[0]
            text += f": {r.definition} {r.tally.done}/{r.tally.total or '?'}"
        self.notifier.status(text)


def _watch_fresh_for(w: WatchConfig) -> float:
    # A little less than `every`, so that files touched by the previous scheduled run (which
    # started up to `every` ago, jitter included) are touched again.
    return 0.8 * w.every


def _stamp(path: Path) -> Optional[tuple[int, int, int]]:
    with contextlib.suppress(OSError):
        st = path.stat()
        return (st.st_mtime_ns, st.st_size, st.st_ino)
    return None
