"""Pacing (issue 13): fewer attempts in flight at an endpoint that answers 429/503 (AIMD)."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack

import pytest

from prestaged.pacing import Pace, Pacer

EP = "https://door.example:2880"


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


@pytest.mark.parametrize("status", [429, 503])
async def test_back_pressure_halves_the_limit_down_to_one(status: int) -> None:
    """Each 429/503 in a new window halves the limit (32, 16, ... 1); at 1 it stays 1."""
    pacer = Pacer(32)
    limits = []
    for _ in range(7):
        await _answer(pacer, status)
        limits.append(pacer.pace(EP).limit)
    assert limits == [16, 8, 4, 2, 1, 1, 1]
    assert pacer.pace(EP) == Pace(limit=1, lowest=1, cuts=5)
    assert pacer.paced == {EP: Pace(1, 1, 5)}


async def test_a_burst_of_429_cuts_once_and_later_answers_of_it_count_for_nothing() -> None:
    """Eight attempts in flight all answered 429 cut 8 -> 4 once; their successes do not grow
    the limit either; the next attempt (a new window) answered 429 cuts again."""
    pacer = Pacer(8)
    async with AsyncExitStack() as stack:
        slots = [await stack.enter_async_context(pacer.slot(EP)) for _ in range(8)]
        for slot in slots[:6]:
            slot.answered(429)
        for slot in slots[6:] * 10:
            slot.answered(206)
        assert pacer.pace(EP) == Pace(limit=4, lowest=4, cuts=1)
    await _answer(pacer, 429)
    assert pacer.pace(EP) == Pace(limit=2, lowest=2, cuts=2)


async def test_limit_grows_by_one_per_limit_successes_up_to_the_maximum() -> None:
    """After a cut to 2 (maximum 4): 2 successes make 3, 3 more make 4, and it stays at 4."""
    pacer = Pacer(4)
    await _answer(pacer, 429)
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
    await _answer(pacer, 429)
    for _ in range(20):
        async with pacer.slot(EP) as slot:  # 1 in flight of 4
            slot.answered(206)
    await _answer(pacer, None)
    assert pacer.pace(EP) == Pace(limit=4, lowest=4, cuts=1)


async def test_endpoints_are_paced_apart_and_the_cut_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 429 from one endpoint cuts only that endpoint, with one INFO line naming it."""
    pacer = Pacer(32)
    other = "https://pool.example:443"
    with caplog.at_level(logging.INFO, logger="prestaged.pacing"):
        await _answer(pacer, 429)
        await _answer(pacer, 206, other)
    assert pacer.pace(other) == Pace(32, 32, 0) and other not in pacer.paced
    assert [r.getMessage() for r in caplog.records] == [
        "https://door.example:2880 answered 429: concurrency 32 -> 16"]


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
        held[0].answered(429)
        tasks = [asyncio.ensure_future(attempt(n)) for n in range(3)]
        await _settle()
        assert entered == [] and pacer.in_flight(EP) == 4
        await stack.aclose()  # all four leave: room for two (limit 2)
        await _settle()
        assert entered == [0, 1] and pacer.in_flight(EP) == 2
        release.set()
        await asyncio.gather(*tasks)
    assert entered == [0, 1, 2] and pacer.in_flight(EP) == 0


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


def test_maximum_must_be_positive() -> None:
    """A maximum below 1 could never admit an attempt: refused."""
    with pytest.raises(ValueError, match="maximum must be >= 1"):
        Pacer(0)
