"""Pacing (issue 13): fewer attempts in flight at an endpoint that answers 503, fewer request
starts a second at one that answers 429 (both AIMD).

The ``Pacer`` on its own first (the rate on a fake clock, against dCache's own limiter), then
the engine and ``prestaged warm --json`` against the test storage at capacity
(``StorageServer(max_in_flight=K)``, 503 above K at once) and against the dCache emulator at
dCache 11.2's default request rates (``tests/test_tape_warm.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from prestaged.cli import main
from prestaged.cli.render import report_json, report_text
from prestaged.credentials import load_credentials
from prestaged.model import FileRef, Result
from prestaged.pacing import Pace, Pacer, Rates
from prestaged.retry import RetryPolicy
from prestaged.storage.http import HttpToucher
from prestaged.testing.authz import SmoothBursty
from prestaged.testing.pki import TestPKI
from prestaged.testing.storage import (
    Delay,
    RequestRecord,
    ServerStats,
    Status,
    StorageServer,
    ThreadedStorageServer,
)
from prestaged.warm import RunReport, Tally, WarmSettings, warm

EP = "https://door.example:2880"
K = 4
"""Requests the emulated door serves at once; one more is answered 503."""
SERVICE = Delay(0.01)
"""Every admitted request takes 10 ms, so that requests overlap and the limit matters."""
ZERO_BACKOFF = RetryPolicy(attempts=20, initial=0.0, max=0.0, jitter=0.0, total=30.0)
"""Retries at once: the harshest case for the door (no backoff spreads the burst)."""


async def _answer(pacer: Pacer, status: int | None, endpoint: str = EP) -> None:
    """One attempt answered ``status`` while the rest of the limit is in use (the limit binds)."""
    async with AsyncExitStack() as others:
        for _ in range(pacer.pace(endpoint).limit - 1):
            await others.enter_async_context(pacer.slot(endpoint))
        async with pacer.slot(endpoint) as slot:
            slot.answered(status)


async def _settle() -> None:
    """Let every task that can run, run (a few loop turns; nothing here waits on time)."""
    for _ in range(5):
        await asyncio.sleep(0)


# --- the limiter -------------------------------------------------------------------------------


async def test_503_halves_the_limit_down_to_one() -> None:
    """Each 503 in a new window halves the limit (32, 16, ... 1); at 1 it stays 1."""
    pacer = Pacer(32)
    limits = []
    for _ in range(7):
        await _answer(pacer, 503)
        limits.append(pacer.pace(EP).limit)
    assert limits == [16, 8, 4, 2, 1, 1, 1]
    assert pacer.pace(EP) == Pace(limit=1, lowest=1, cuts=5)
    assert pacer.paced == {EP: Pace(1, 1, 5)}


async def test_on_change_hears_first_use_and_every_change_of_the_limit() -> None:
    """The metrics hook hears the maximum at an endpoint's first attempt, then each cut and
    each increase (the daemon's prestaged_endpoint_concurrency gauge)."""
    heard: list[tuple[str, int]] = []
    pacer = Pacer(4, on_change=lambda ep, n: heard.append((ep, n)))
    await _answer(pacer, 503)
    await _answer(pacer, 503)
    assert heard == [(EP, 4), (EP, 2), (EP, 1)]
    await _answer(pacer, 206)  # one success at limit 1, in use: grows to 2
    assert heard[-1] == (EP, 2)


async def test_a_burst_of_503_cuts_once_and_later_answers_of_it_count_for_nothing() -> None:
    """Eight attempts in flight all answered 503 cut 8 -> 4 once; their successes do not grow
    the limit either; the next attempt (a new window) answered 503 cuts again."""
    pacer = Pacer(8)
    async with AsyncExitStack() as stack:
        slots = [await stack.enter_async_context(pacer.slot(EP)) for _ in range(8)]
        for slot in slots[:6]:
            slot.answered(503)
        for slot in slots[6:] * 10:
            slot.answered(206)
        assert pacer.pace(EP) == Pace(limit=4, lowest=4, cuts=1)
    await _answer(pacer, 503)
    assert pacer.pace(EP) == Pace(limit=2, lowest=2, cuts=2)


async def test_limit_grows_by_one_per_limit_successes_up_to_the_maximum() -> None:
    """After a cut to 2 (maximum 4): 2 successes make 3, 3 more make 4, and it stays at 4."""
    pacer = Pacer(4)
    await _answer(pacer, 503)
    seen = []
    for _ in range(12):
        await _answer(pacer, 206)
        seen.append(pacer.pace(EP).limit)
    assert seen == [2, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4]
    assert pacer.pace(EP) == Pace(limit=4, lowest=2, cuts=1)
    assert pacer.paced[EP] == Pace(4, 2, 1)


async def test_successes_below_the_limit_do_not_grow_it() -> None:
    """Attempts that leave slots unused (a run's tail, a slow catalog) never raise the limit,
    so the reported concurrency is one that was in use; no answer at all changes nothing."""
    pacer = Pacer(8)
    await _answer(pacer, 503)
    for _ in range(20):
        async with pacer.slot(EP) as slot:  # 1 in flight of 4
            slot.answered(206)
    await _answer(pacer, None)
    assert pacer.pace(EP) == Pace(limit=4, lowest=4, cuts=1)


async def test_endpoints_are_paced_apart_and_the_cut_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 503 from one endpoint cuts only that endpoint, with one INFO line naming it."""
    pacer = Pacer(32)
    other = "https://pool.example:443"
    with caplog.at_level(logging.INFO, logger="prestaged.pacing"):
        await _answer(pacer, 503)
        await _answer(pacer, 206, other)
    assert pacer.pace(other) == Pace(32, 32, 0) and other not in pacer.paced
    assert [r.getMessage() for r in caplog.records] == [
        "https://door.example:2880 answered 503: concurrency 32 -> 16"]


async def test_waiters_enter_in_order_only_below_a_cut_limit() -> None:
    """With 4 slots taken and the limit cut to 2, a waiter enters only once two have left;
    waiters enter in arrival order."""
    pacer = Pacer(4)
    entered: list[int] = []
    release = asyncio.Event()

    async def attempt(n: int) -> None:
        async with pacer.slot(EP):
            entered.append(n)
            await release.wait()

    async with AsyncExitStack() as stack:
        held = [await stack.enter_async_context(pacer.slot(EP)) for _ in range(4)]
        held[0].answered(503)
        tasks = [asyncio.ensure_future(attempt(n)) for n in range(3)]
        await _settle()
        assert entered == [] and pacer.in_flight(EP) == 4
        await stack.aclose()  # all four leave: room for two (limit 2)
        await _settle()
        assert entered == [0, 1] and pacer.in_flight(EP) == 2
        release.set()
        await asyncio.gather(*tasks)
    assert entered == [0, 1, 2] and pacer.in_flight(EP) == 0


@pytest.mark.parametrize(("status", "refused", "admitted"), [
    (403, False, 1), (401, False, 1), (None, True, 1),  # refusals: still one at a time
    (206, False, 4), (404, False, 4), (None, False, 4),  # accepted (or a timeout): the limit
    (503, False, 2),  # accepted, and the 503 halves the limit
])
async def test_first_contact_gate_admits_one_until_the_endpoint_accepts_us(
    status: int | None, refused: bool, admitted: int
) -> None:
    """gate=True: one attempt at a time until an outcome other than 401/403 or a refused
    connection; then the waiters enter at once, up to the limit. A Pacer without the gate
    (the default) admits the limit from the start."""
    pacer = Pacer(4, gate=True)
    entered: list[int] = []

    async def attempt(n: int) -> None:
        async with pacer.slot(EP):
            entered.append(n)
            await asyncio.Event().wait()

    async with pacer.slot(EP) as first:
        assert first.gated
        tasks = [asyncio.ensure_future(attempt(n)) for n in range(5)]
        await _settle()
        assert entered == [] and pacer.in_flight(EP) == 1
        first.answered(status)
        first.contact(status, refused)
    await _settle()
    assert entered == list(range(admitted))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    async with Pacer(4).slot(EP) as ungated:
        assert not ungated.gated


async def test_cancelled_attempts_give_their_slot_back() -> None:
    """Cancelled inside the slot, while waiting, or granted a slot but cancelled before
    resuming: each time the slot is free again and the next waiter gets it."""
    pacer = Pacer(1)
    inside = asyncio.Event()

    async def hold() -> None:
        async with pacer.slot(EP):
            inside.set()
            await asyncio.Event().wait()

    holder = asyncio.ensure_future(hold())
    await inside.wait()
    waiting = asyncio.ensure_future(pacer.slot(EP).__aenter__())
    await _settle()
    waiting.cancel()  # cancelled while waiting
    holder.cancel()  # cancelled inside
    await asyncio.gather(holder, waiting, return_exceptions=True)
    assert pacer.in_flight(EP) == 0

    first = pacer.slot(EP)
    await first.__aenter__()
    granted = asyncio.ensure_future(pacer.slot(EP).__aenter__())
    await _settle()
    await first.__aexit__(None, None, None)  # hands the slot to `granted`...
    granted.cancel()  # ...which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await granted
    assert pacer.in_flight(EP) == 0
    async with pacer.slot(EP):
        assert pacer.in_flight(EP) == 1


# --- the rate (429), on a fake clock ------------------------------------------------------------


class _Clock:
    """A fake clock. ``sleep`` moves it on by the wait, records the wait, and (with ``hold``
    set) parks until ``hold`` is released; then lets other tasks run."""

    def __init__(self) -> None:
        self.now = 100.0
        self.waits: list[float] = []
        self.hold: asyncio.Event | None = None

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds
        if self.hold is not None:
            await self.hold.wait()
        await asyncio.sleep(0)


def _on(clock: _Clock, maximum: int = 32) -> Pacer:
    return Pacer(maximum, clock=clock, sleep=clock.sleep)


async def _go(pacer: Pacer, status: int | None, endpoint: str = EP) -> None:
    async with pacer.slot(endpoint) as slot:
        slot.answered(status)


async def _burst_then_429(pacer: Pacer) -> None:
    """Seven starts and an eighth answered 429, at one instant: 8 in the shortest span (0.1
    s) is 80/s, so the ceiling is 64/s, soft (a first burst's)."""
    for _ in range(7):
        await _go(pacer, 206)
    await _go(pacer, 429)


async def _rates_after_successes(pacer: Pacer, n: int) -> list[float]:
    """The ceiling after each of ``n`` successes in a row."""
    rates = []
    for _ in range(n):
        await _go(pacer, 206)
        rate = pacer.pace(EP).rate
        assert rate is not None
        rates.append(rate)
    return rates


def _steps(rates: list[float], above: float) -> list[float]:
    """How much the ceiling moved at each step that began above ``above``."""
    return [b - a for a, b in zip(rates, rates[1:]) if a > above]


async def test_starts_are_not_spaced_until_a_429_which_sets_a_rate_and_not_the_concurrency(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """100 attempts at one instant, no 429: nothing waits, nothing is listed. A 429 then sets
    the ceiling to 80 % of the starts measured (101 over the shortest span, 0.1 s: 808/s),
    leaves the concurrency at 32, and says so in one INFO line."""
    clock = _Clock()
    pacer = _on(clock)
    for _ in range(100):
        await _go(pacer, 206)
    assert clock.waits == [] and pacer.paced == {}
    with caplog.at_level(logging.INFO, logger="prestaged.pacing"):
        await _go(pacer, 429)
    assert pacer.pace(EP) == Pace(limit=32, lowest=32, cuts=0, rate=808.0, rate_cuts=1)
    assert pacer.paced == {EP: pacer.pace(EP)}
    assert [r.getMessage() for r in caplog.records] == [
        f"{EP} answered 429: at most 808.0 requests/s (101 sent in 0.10 s)"]


async def test_a_429_after_a_handful_of_starts_sets_no_ceiling() -> None:
    """A fresh dCache client limiter refuses the second of two requests close together,
    whatever its rate (two runs' first requests can meet so): a 429 among fewer than 8
    starts measures nothing, and nothing is spaced; the 8th start's 429 sets a ceiling."""
    clock = _Clock()
    pacer = _on(clock)
    await _go(pacer, 206)
    await _go(pacer, 429)
    assert pacer.pace(EP).rate is None and pacer.paced == {}
    for _ in range(5):
        await _go(pacer, 206)
    await _go(pacer, 429)
    assert pacer.pace(EP).rate == pytest.approx(64.0) and clock.waits == []


async def test_starts_are_spaced_from_when_the_last_one_really_went() -> None:
    """Ceiling 64/s: the next start waits 1/64 s after the 429's own start and, delayed, raises
    the ceiling (by 0.5: a first burst's estimate grows fast). The loop then wakes 0.3 s late:
    that start goes at once (no credit for the idle time, no growth), and the next one waits
    a whole interval after it, not less."""
    clock = _Clock()
    pacer = _on(clock)
    await _burst_then_429(pacer)
    await _go(pacer, 206)
    await _go(pacer, 206)
    assert clock.waits == [pytest.approx(1 / 64), pytest.approx(1 / 64.5)]
    assert pacer.pace(EP).rate == pytest.approx(65.0)
    clock.now += 0.3
    await _go(pacer, 206)
    await _go(pacer, 206)
    assert clock.waits[2:] == [pytest.approx(1 / 65)]
    assert pacer.pace(EP).rate == pytest.approx(65.5)


async def test_a_429_of_a_start_spaced_at_the_old_ceiling_cuts_nothing() -> None:
    """Two starts spaced at 64/s; the first one's 429 cuts (51.2/s), the second's (the same
    burst) does not. A start already waiting for its turn at 64/s when the cut came is of
    that burst too, though it goes after the cut; a start spaced at 51.2/s cuts again."""
    clock = _Clock()
    pacer = _on(clock)
    await _burst_then_429(pacer)
    async with pacer.slot(EP) as one, pacer.slot(EP) as two:
        clock.hold = asyncio.Event()
        late = asyncio.ensure_future(pacer.slot(EP).__aenter__())
        await _settle()  # `late` waits for its turn, at 64/s
        one.answered(429)
        assert pacer.pace(EP).rate_cuts == 2 and pacer.pace(EP).rate == pytest.approx(51.2)
        two.answered(429)
        clock.hold.set()
        clock.hold = None
        third = await late
        third.answered(429)
        assert pacer.pace(EP).rate_cuts == 2
        await third.__aexit__(None, None, None)
    await _go(pacer, 429)
    assert pacer.pace(EP).rate_cuts == 3 and pacer.pace(EP).rate == pytest.approx(51.2 * 0.8)


async def test_after_a_first_burst_the_ceiling_grows_fast_whatever_the_rate_measured() -> None:
    """A first burst says little of the limit (the rate measured, 80/s, is the burst's): each
    delayed success adds 0.5 (+50 % a second), past 80/s too, until a 429 says more."""
    clock = _Clock()
    pacer = _on(clock)
    await _burst_then_429(pacer)
    rates = await _rates_after_successes(pacer, 60)
    assert rates[0] == pytest.approx(64.5) and rates[-1] > 90
    assert all(step == pytest.approx(0.5) for step in _steps(rates, 0))
    assert pacer.paced[EP].rate == rates[-1]


async def _a_429_after_two_seconds_at_20_a_second(clock: _Clock) -> Pacer:
    pacer = _on(clock)
    for _ in range(40):
        await _go(pacer, 206)
        clock.now += 0.05
    await _go(pacer, 429)
    return pacer


async def test_after_a_second_of_starts_the_ceiling_grows_slowly_past_the_rate_that_drew_it(
) -> None:
    """20 starts a second for 2 s, then a 429: about 16/s (80 % of the 20-21 starts of the
    last whole second). Growth is fast (0.1 a success, +10 % a second) to 90 % of that rate,
    then slow (0.01) for good, past it too: measured over a second, it is where the limit was."""
    clock = _Clock()
    pacer = await _a_429_after_two_seconds_at_20_a_second(clock)
    rate = pacer.pace(EP).rate
    assert rate is not None and 16.0 - 1e-9 <= rate <= 16.8 + 1e-9, rate
    rates = await _rates_after_successes(pacer, 600)
    assert rates[0] - rate == pytest.approx(0.1)
    past = _steps(rates, 20.5)
    assert past and all(step == pytest.approx(0.01) for step in past)


async def test_a_429_at_a_ceiling_that_held_a_tenth_of_a_second_is_where_the_limit_was() -> None:
    """After a first burst's ceiling (64/s), a 429 at once (under 0.1 s later) is soft too:
    growth stays fast past it. One after the ceiling held 0.1 s, within the first second,
    measures that ceiling: growth slows near it and stays slow past it."""
    clock = _Clock()
    pacer = _on(clock)
    await _burst_then_429(pacer)
    await _go(pacer, 429)  # 1/64 s after the cut
    assert pacer.pace(EP).rate == pytest.approx(51.2)
    rates = await _rates_after_successes(pacer, 40)
    assert all(step == pytest.approx(0.5) for step in _steps(rates, 0))
    # The ceiling (about 71/s now) held 0.6 s: a 429 now is firm.
    await _go(pacer, 429)
    drew = rates[-1]
    assert pacer.pace(EP).rate == pytest.approx(0.8 * drew)
    rates = await _rates_after_successes(pacer, 1000)
    past = _steps(rates, drew + 0.2)
    assert past and all(step == pytest.approx(0.01) for step in past)


async def test_a_minute_after_the_last_429_growth_is_fast_again() -> None:
    """After a 429 measured over a whole second growth near that rate is slow; 60 s later
    without another 429, that rate is forgotten (a limit lowered for a while, as when other
    clients share dCache's overall rate) and growth is fast again."""
    clock = _Clock()
    pacer = await _a_429_after_two_seconds_at_20_a_second(clock)
    rates = await _rates_after_successes(pacer, 40)
    assert rates[-1] - rates[-2] == pytest.approx(0.01)  # slow by now
    clock.now += 60.0
    rates = await _rates_after_successes(pacer, 3)
    assert rates[-1] - rates[-2] == pytest.approx(0.1)


async def test_pacers_sharing_rates_share_the_ceiling() -> None:
    """Two runs of one daemon (two Pacers, one ``Rates``): a 429 to one run sets the door's
    ceiling for both, so the other's starts are spaced too, and that run lists the door as
    paced once it was (its concurrency untouched). A Pacer of its own shares nothing."""
    clock = _Clock()
    rates = Rates()
    one = Pacer(32, clock=clock, sleep=clock.sleep, rates=rates)
    other = Pacer(32, clock=clock, sleep=clock.sleep, rates=rates)
    alone = _on(clock)
    await _burst_then_429(one)
    assert other.paced == {}
    await _go(other, 206)
    assert clock.waits == [pytest.approx(1 / 64)]
    assert other.paced[EP].rate == pytest.approx(64.5) and other.paced[EP].limit == 32
    assert one.pace(EP).rate == pytest.approx(64.5)  # raised by the other's delayed success
    await _go(alone, 206)
    await _go(alone, 206)
    assert len(clock.waits) == 1 and alone.pace(EP).rate is None


async def test_429s_in_a_row_bring_the_ceiling_down_to_one_a_second_not_below() -> None:
    clock = _Clock()
    pacer = _on(clock)
    await _burst_then_429(pacer)
    for _ in range(40):
        await _go(pacer, 429)
    assert pacer.pace(EP).rate == 1.0 and pacer.pace(EP).rate_cuts == 41
    await _go(pacer, 429)
    assert clock.waits[-1] == pytest.approx(1.0) and pacer.pace(EP).rate == 1.0


async def test_an_attempt_cancelled_while_waiting_for_its_turn_gives_its_slot_back() -> None:
    """Cancelled while spaced (after its slot was granted, inside ``async with``'s enter):
    the slot is free, and the next start is not blocked behind it."""
    clock = _Clock()
    pacer = _on(clock, maximum=1)
    await _burst_then_429(pacer)
    clock.hold = asyncio.Event()
    waiting = asyncio.ensure_future(_go(pacer, 206))
    await _settle()
    assert pacer.in_flight(EP) == 1 and len(clock.waits) == 1
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert pacer.in_flight(EP) == 0
    clock.hold = None
    await asyncio.wait_for(_go(pacer, 206), 5)


async def test_the_rate_settles_just_below_dcaches_limit_with_few_429s() -> None:
    """32 workers, each attempt costing the client 0.5 ms (2,000/s unpaced), against dCache's
    own per-client limiter (Guava's SmoothBursty at 250/s, none stored at first, as
    ``testing.authz`` keeps it): after the first second, the door admits at least 85 % of
    that (212.5/s) and refuses fewer than 1 % of the tries. Unpaced it would admit 250/s too,
    and refuse seven tries in eight."""
    clock = _Clock()
    pacer = _on(clock)
    limiter = SmoothBursty(250.0, clock.now)
    start = clock.now
    tries: list[tuple[float, bool]] = []

    async def worker() -> None:
        while len(tries) < 4000:
            async with pacer.slot(EP) as slot:
                await asyncio.sleep(0)  # in flight: the other workers start meanwhile
                clock.now += 0.0005
                admitted = limiter.try_acquire(clock.now)
                tries.append((clock.now, admitted))
                slot.answered(206 if admitted else 429)
            await asyncio.sleep(0)

    await asyncio.gather(*(worker() for _ in range(32)))
    later = [ok for t, ok in tries if t >= start + 1.0]
    seconds = tries[-1][0] - (start + 1.0)
    assert sum(later) / seconds >= 212.5, (sum(later) / seconds, pacer.pace(EP))
    assert later.count(False) < len(later) // 100, (later.count(False), pacer.pace(EP))
    assert pacer.pace(EP).limit == 32


def test_maximum_must_be_positive() -> None:
    """A maximum below 1 could never admit an attempt: refused."""
    with pytest.raises(ValueError, match="maximum must be >= 1"):
        Pacer(0)


def test_summary_shows_paced_endpoints_only() -> None:
    """--json lists the endpoints that were cut (concurrency, lowest, backoffs; the rate and
    the 429s that set it); the table gets a row for each cut control; a run without cuts lists
    none."""
    tally = Tally()
    report = RunReport(tally=tally, elapsed=1.0)
    where = {"definition": "d", "catalog": "local", "source": "d"}
    assert report_json(report, **where)["endpoints"] == {}
    assert "paced" not in report_text(report, **where)
    tally.paced[EP] = Pace(limit=5, lowest=2, cuts=7)
    assert report_json(report, **where)["endpoints"] == {
        EP: {"concurrency": 5, "lowest": 2, "backoffs": 7, "rate": None, "rate_cuts": 0}}
    rows = [ln.split(None, 1) for ln in report_text(report, **where).splitlines()]
    assert ["paced", f"{EP}: 5 at once (lowest 2, cut 7x on 503)"] in rows
    assert not any("requests/s" in r[-1] for r in rows)
    tally.paced[EP] = Pace(limit=32, lowest=32, cuts=0, rate=212.345, rate_cuts=3)
    assert report_json(report, **where)["endpoints"] == {
        EP: {"concurrency": 32, "lowest": 32, "backoffs": 0, "rate": 212.3, "rate_cuts": 3}}
    rows = [ln.split(None, 1) for ln in report_text(report, **where).splitlines()]
    assert [r for r in rows if r[0] == "paced"] == [
        ["paced", f"{EP}: at most 212 requests/s (set 3x on 429)"]]


# --- the engine against a door with a request limiter ------------------------------------------


def _client(pki: TestPKI, proxy: Path) -> ssl.SSLContext:
    creds = load_credentials(proxy=proxy, proxy_configured=None, ca_dir=pki.ca_dir,
                             ca_dir_configured=None, min_lifetime=3600)
    return creds.ssl_context()


async def _refs(urls: list[str]) -> AsyncIterator[FileRef]:
    for u in urls:
        yield FileRef(name=u.rsplit("/", 1)[-1], url=u)


def _door_records(stats: ServerStats) -> list[RequestRecord]:
    return sorted((r for p in stats.paths.values() for r in p.records), key=lambda r: r.time)


def _endpoint(srv: StorageServer | ThreadedStorageServer) -> str:
    return f"https://127.0.0.1:{srv.door_port}"


@pytest.fixture
async def limited(pki: TestPKI) -> AsyncIterator[StorageServer]:
    """The test storage serving K requests at once (10 ms each), answering 503 above that."""
    async with StorageServer(pki.server_ssl_context(), max_in_flight=K) as srv:
        srv.inject_all([SERVICE], repeat=True)
        yield srv


async def test_engine_comes_down_to_what_the_door_serves_and_warms_everything(
    pki: TestPKI, proxy: Path, limited: StorageServer
) -> None:
    """32 workers at a door serving 4 at once: the first burst meets 503s, the engine halves
    down to about 4 in flight (the door never again sees more than 5), every file ends warm,
    and the tally reports the endpoint's reduced concurrency."""
    urls = [limited.url(f"/pnfs/ds/f{i:03d}") for i in range(160)]
    settings = WarmSettings(concurrency=32, retry=ZERO_BACKOFF)
    async with HttpToucher(_client(pki, proxy), limit=32, limit_per_host=32, timeout=20) as t:
        report = await warm(_refs(urls), settings, t)
    assert report.tally.results[Result.WARM.value] == 160 and report.exit_code == 0

    records = _door_records(limited.stats)
    rejected = [r for r in records if r.status == 503]
    assert rejected and max(r.in_flight for r in records) > K  # the burst was refused
    later = records[len(records) // 2:]
    assert max(r.in_flight for r in later) <= K + 1, [r.in_flight for r in later]
    assert len(rejected) < len(urls) // 2  # without pacing, most tries would be refused

    pace = report.tally.paced[_endpoint(limited)]
    assert pace.lowest <= K and pace.limit <= K + 1 and pace.cuts >= 2
    assert list(report.tally.paced) == [_endpoint(limited)]


def test_warm_json_reports_the_concurrency_used(
    pki: TestPKI, proxy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``prestaged warm --json`` at a door refusing more than 4 at once: all files warm, and
    ``endpoints`` gives that door's concurrency at the end, the lowest and the backoffs."""
    with ThreadedStorageServer(pki.server_ssl_context(), max_in_flight=K) as srv:
        srv.inject_all([SERVICE], repeat=True)
        definition = tmp_path / "dataset.txt"
        definition.write_text("".join(srv.url(f"/pnfs/ds/f{i:03d}") + "\n" for i in range(120)))
        config = tmp_path / "prestaged.toml"
        # stage = "never": a plain touch run, no Tape REST discovery asking the busy door too.
        config.write_text('[storage]\nconcurrency = 16\nstage = "never"\n'
                          "[retry]\nattempts = 20\ninitial = 0\nmax = 0\njitter = 0\n"
                          f'[credentials]\nproxy = "{proxy}"\nca_dir = "{pki.ca_dir}"\n')
        code = main(["warm", str(definition), "--config", str(config), "--json"])
        endpoint = _endpoint(srv)
    doc = json.loads(capsys.readouterr().out)
    seen = {k: doc[k] for k in ("counts", "retries", "endpoints", "aborted")}
    assert code == 0 and doc["counts"]["warm"] == 120, seen
    assert list(doc["endpoints"]) == [endpoint], seen
    used = doc["endpoints"][endpoint]
    # The server runs in its own thread here, so how far the limit climbs back before the next
    # 503 varies with scheduling; what holds is that it came down from 16 and went to K or less.
    assert used["lowest"] <= K and used["concurrency"] < 16 and used["backoffs"] >= 1, seen
    assert doc["retries"].get("503", 0) >= 1, seen


async def test_a_run_sharing_rates_starts_at_the_ceiling_an_earlier_run_learned(
    pki: TestPKI, proxy: Path
) -> None:
    """As the daemon runs them: a first run meets a 429 at its 12th file and learns a ceiling
    for the door; a second run given the same ``Rates`` spaces its starts from the first one
    (listed as paced at that ceiling, having met no 429 itself); a run with rates of its own
    does not."""
    async with StorageServer(pki.server_ssl_context()) as srv:
        srv.inject("/pnfs/ds/f011", [Status(429)])
        urls = [srv.url(f"/pnfs/ds/f{i:03d}") for i in range(23)]
        rates = Rates()
        settings = WarmSettings(concurrency=8, retry=ZERO_BACKOFF)
        async with HttpToucher(_client(pki, proxy), limit=8, limit_per_host=8,
                               timeout=20) as t:
            first = await warm(_refs(urls[:12]), settings, t, rates=rates)
            learned = first.tally.paced[_endpoint(srv)].rate
            assert learned is not None and first.tally.retries["429"] == 1
            second = await warm(_refs(urls[12:]), settings, t, rates=rates)
            alone = await warm(_refs(urls[12:]), settings, t)
        paced = second.tally.paced[_endpoint(srv)]
    assert paced.rate is not None and paced.rate >= learned and paced.rate_cuts == 1
    assert not second.tally.retries and second.tally.results[Result.WARM.value] == 11
    assert alone.tally.paced == {}
