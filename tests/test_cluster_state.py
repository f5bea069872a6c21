"""Members, leases and watch rounds in the state database (``state.cluster``, issue 16), on
both backends: what several daemons rely on to share work without a consensus of their own."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Backend

from prestaged.campaign.repository import CampaignRepository, SubmissionState
from prestaged.campaign.spec import parse_campaign
from prestaged.errors import LeaseLost
from prestaged.model import FileRef
from prestaged.state import cluster as shared
from prestaged.state.store import Store

S = SubmissionState

CAMPAIGN = """
name = "c"
[[stage]]
name = "s"
input = "d"
split = "drainingn(2)"
submit = "true"
"""


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    """A fresh open state of each backend."""
    with backend.store() as s:
        yield s


def _sql(store: Store, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Run ``sql`` in a transaction of the store; the rows it returns, if any."""
    with store.transaction() as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if sql.lstrip().upper().startswith("SELECT") else []


def _expire(store: Store, table: str) -> None:
    """Every lease of ``table`` expired a second ago (by the database's clock)."""
    with store.transaction() as conn:
        conn.execute(f"UPDATE {table} SET lease_until = {shared.now_sql(conn)} - 1 "
                     "WHERE lease_owner IS NOT NULL")


def _refs(n: int) -> list[FileRef]:
    return [FileRef(f"f{i:03d}", f"https://127.0.0.1:1/d/f{i:03d}", i) for i in range(n)]


def _one_file_chunks(store: Store, n: int, *, planner: str = "a", next_in: float = 1.0) -> None:
    """A round of ``n`` chunks of one file each of the watch ``/d.txt``, planned by ``planner``
    (which claimed its schedule)."""
    shared.ensure_schedule(store, "local", "/d.txt", 0.0)
    shared.claim_schedule(store, "local", "/d.txt", planner, 60)
    shared.plan_round(store, "local", "/d.txt", planner, refs=_refs(n), chunk=1, fresh_for=1.0,
                      next_in=next_in)


def _register_campaign(store: Store) -> CampaignRepository:
    campaign = parse_campaign(CAMPAIGN, Path("c.toml"))
    repo = CampaignRepository(store)
    repo.register(campaign, CAMPAIGN)
    return repo


def test_members_heartbeat_age_and_death(store: Store) -> None:
    """A member is alive while its heartbeat is younger than the lease, dead after; a member
    silent past forget_after is dropped, and its own next heartbeat says so (False)."""
    shared.register_member(store, "a", listen="127.0.0.1:1", version="t")
    shared.register_member(store, "b", listen=None, version="t")
    assert shared.heartbeat(store, "a", forget_after=3600)
    _sql(store, "UPDATE cluster_members SET heartbeat = heartbeat - 120 WHERE id = 'b'")
    rows = {m.id: m for m in shared.members(store)}
    assert rows["a"].alive(60) and rows["a"].age < 5 and rows["a"].pid == os.getpid()
    assert not rows["b"].alive(60) and 119 < rows["b"].age < 130
    assert rows["b"].to_dict(60)["alive"] is False
    assert shared.heartbeat(store, "a", forget_after=100)  # b is 120 s silent: forgotten
    assert [m.id for m in shared.members(store)] == ["a"]
    assert not shared.heartbeat(store, "b", forget_after=100)


def test_campaign_lease_is_exclusive_until_it_expires(store: Store) -> None:
    """One member holds a campaign; another is refused and told who holds it, until the lease
    expires; then it takes it over (naming the dead holder) and the old holder's renewal
    fails."""
    _register_campaign(store)
    assert shared.claim_campaign(store, "c", "a", 60) == (True, None)
    assert shared.claim_campaign(store, "c", "a", 60) == (True, None)  # renewing by claiming
    assert shared.claim_campaign(store, "c", "b", 60) == (False, "a")
    assert shared.renew(store, "campaign", ("c",), "a", 60)
    _expire(store, "campaigns")
    assert shared.claim_campaign(store, "c", "b", 60) == (True, "a")
    assert not shared.renew(store, "campaign", ("c",), "a", 60)
    assert shared.leases_held(store, "b") == {"campaign": 1, "watch": 0, "chunk": 0}
    assert shared.claim_campaign(store, "nope", "a", 60) == (False, None)


def test_a_member_that_lost_its_lease_changes_nothing(store: Store) -> None:
    """At-most-once across daemons: the runner's repository of a member whose lease was taken
    over can neither create a submission (with its ledger) nor move one to submitting nor
    record how a launch ended; the new holder's can. An expired lease nobody took yet still
    lets the holder record a launch's end, but never start a new one."""
    repo = _register_campaign(store)
    a = CampaignRepository(store, owner="a")
    b = CampaignRepository(store, owner="b")
    assert shared.claim_campaign(store, "c", "a", 60)[0]
    sub = a.create("c", "s", "slice-1", "/x.urls", _refs(2))
    for to in (S.PRESTAGING, S.READY, S.SUBMITTING):
        sub = a.move(sub, to, "test")
    _expire(store, "campaigns")
    with pytest.raises(LeaseLost):
        a.create("c", "s", "slice-2", "/y.urls", _refs(1))
    other = repo.create("c", "s", "slice-3", "/z.urls", [])  # an operator's repository
    other = repo.move(other, S.PRESTAGING, "test")
    other = repo.move(other, S.READY, "test")
    with pytest.raises(LeaseLost):
        a.move(other, S.SUBMITTING, "expired: no new launch")
    assert shared.claim_campaign(store, "c", "b", 60) == (True, "a")
    with pytest.raises(LeaseLost):
        a.move(sub, S.SUBMITTED, "taken over: not ours to record")
    assert repo.get(sub.id).state is S.SUBMITTING
    assert b.move(sub, S.LAUNCH_UNKNOWN, "found in submitting").state is S.LAUNCH_UNKNOWN
    assert [s.item for s in repo.submissions("c")] == ["slice-1", "slice-3"]
    assert repo.taken("c", "s") == {"f000", "f001"}


def test_expired_lease_not_taken_still_records_the_launch(store: Store) -> None:
    """A holder whose lease lapsed (a slow database) but was not taken over records how its
    running launch ended: the submission is not needlessly launch_unknown."""
    _register_campaign(store)
    a = CampaignRepository(store, owner="a")
    shared.claim_campaign(store, "c", "a", 60)
    sub = a.create("c", "s", "slice-1", "/x.urls", _refs(1))
    for to in (S.PRESTAGING, S.READY, S.SUBMITTING):
        sub = a.move(sub, to, "test")
    _expire(store, "campaigns")
    assert a.move(sub, S.SUBMITTED, "exited 0").state is S.SUBMITTED


def test_rounds_are_cut_into_chunks_claimed_once_each(store: Store) -> None:
    """A planned round of 25 files in chunks of 10 gives 3 chunks, each claimed by one member
    in round order with its files; done chunks drop their file list; finishing twice is
    refused; a chunk whose lease expired is taken over, counted, and only its new holder
    records it done."""
    shared.ensure_schedule(store, "local", "/d.txt", 0.0)
    assert shared.claim_schedule(store, "local", "/d.txt", "a", 60)
    planned = shared.plan_round(store, "local", "/d.txt", "a", refs=_refs(25), chunk=10,
                                fresh_for=100.0, next_in=3600.0)
    assert planned is not None and (planned.files, planned.chunks) == (25, 3)
    c0 = shared.claim_chunk(store, "a", 60)
    c1 = shared.claim_chunk(store, "b", 60)
    assert c0 is not None and c1 is not None
    assert (c0.idx, c1.idx) == (0, 1) and c0.refs == _refs(25)[:10]
    assert c0.definition == "/d.txt" and c0.fresh_for == 100.0 and c0.taken_from is None
    assert shared.finish_chunk(store, c0, "a", 0) == (True, False)
    assert shared.finish_chunk(store, c0, "b", 0) == (False, False)
    _expire(store, "round_chunks")
    c1b = shared.claim_chunk(store, "c", 60)
    assert c1b is not None and c1b.key == c1.key and c1b.taken_from == "b"
    assert shared.finish_chunk(store, c1, "b", 0) == (False, False)  # no longer b's to record
    c2 = shared.claim_chunk(store, "a", 60)
    assert c2 is not None and len(c2.refs) == 5
    assert shared.claim_chunk(store, "a", 60) is None
    assert _sql(store, "SELECT COUNT(*) FROM round_chunks WHERE done IS NULL") == [(2,)]
    assert _sql(store, "SELECT idx, files, done_by, takeovers FROM round_chunks "
                       "ORDER BY idx")[0] == (0, "[]", "a", 0)
    assert _sql(store, "SELECT takeovers FROM round_chunks WHERE idx = 1") == [(1,)]


def test_schedule_is_claimed_once_per_due_round(store: Store) -> None:
    """Of two members only one claims a due schedule; a round is not planned while the last
    one has unfinished chunks, nor before it is due again; a holder that lost the schedule
    lease plans nothing."""
    shared.ensure_schedule(store, "local", "/d.txt", 0.0)
    shared.ensure_schedule(store, "local", "/d.txt", 1e12)  # another member: first one stands
    assert shared.claim_schedule(store, "local", "/d.txt", "a", 60)
    assert not shared.claim_schedule(store, "local", "/d.txt", "b", 60)
    assert shared.plan_round(store, "local", "/d.txt", "a", refs=_refs(3), chunk=10,
                             fresh_for=1.0, next_in=0.0) is not None
    assert not shared.claim_schedule(store, "local", "/d.txt", "b", 60)  # chunk unfinished
    chunk = shared.claim_chunk(store, "b", 60)
    assert chunk is not None and shared.finish_chunk(store, chunk, "b", 0) == (True, True)
    assert shared.claim_schedule(store, "local", "/d.txt", "b", 60)  # due (next_in 0)
    _expire(store, "watch_schedule")
    assert shared.claim_schedule(store, "local", "/d.txt", "c", 60)
    assert shared.plan_round(store, "local", "/d.txt", "b", refs=_refs(3), chunk=10,
                             fresh_for=1.0, next_in=0.0) is None
    shared.release_schedule(store, "local", "/d.txt", "c", 3600.0)
    assert not shared.claim_schedule(store, "local", "/d.txt", "a", 60)  # not due for 1 h


def test_a_url_with_a_password_is_never_stored_in_a_round(store: Store) -> None:
    """Chunks are shared state: a URL carrying user:password is refused, the error shows it
    redacted, and nothing is stored."""
    shared.ensure_schedule(store, "local", "/d.txt", 0.0)
    assert shared.claim_schedule(store, "local", "/d.txt", "a", 60)
    refs = [*_refs(2), FileRef("x", "https://u:hunter2@127.0.0.1:1/x")]
    with pytest.raises(ValueError) as err:
        shared.plan_round(store, "local", "/d.txt", "a", refs=refs, chunk=10, fresh_for=1.0,
                          next_in=1.0)
    assert "hunter2" not in str(err.value) and "***@127.0.0.1" in str(err.value)
    assert _sql(store, "SELECT COUNT(*) FROM round_chunks") == [(0,)]


def test_leaving_gives_every_lease_up(store: Store) -> None:
    """A clean stop frees the member's campaign, schedule and chunk leases at once and removes
    its row; another member's leases stay."""
    _register_campaign(store)
    shared.register_member(store, "a", listen=None, version="t")
    shared.claim_campaign(store, "c", "a", 60)
    _one_file_chunks(store, 2, planner="b")
    shared.claim_chunk(store, "a", 60)
    shared.claim_chunk(store, "b", 60)
    assert shared.leases_held(store, "a") == {"campaign": 1, "watch": 0, "chunk": 1}
    shared.leave(store, "a")
    assert shared.leases_held(store, "a") == {"campaign": 0, "watch": 0, "chunk": 0}
    assert shared.leases_held(store, "b")["chunk"] == 1
    assert shared.members(store) == []
    assert shared.claim_campaign(store, "c", "b", 60) == (True, None)


def test_members_of_this_host_whose_process_is_gone_are_forgotten(store: Store) -> None:
    """A daemon restarted on the same host frees the leases of its killed predecessor at once
    (its pid runs no more) instead of waiting for them to expire; live ones are kept."""
    _register_campaign(store)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    shared.register_member(store, "live", listen=None, version="t")
    shared.register_member(store, "dead", listen=None, version="t")
    _sql(store, "UPDATE cluster_members SET pid = ? WHERE id = 'dead'",
         (int(dead.stdout),))
    shared.claim_campaign(store, "c", "dead", 60)
    assert shared.forget_dead_local(store) == ["dead"]
    assert [m.id for m in shared.members(store)] == ["live"]
    assert shared.claim_campaign(store, "c", "live", 60) == (True, None)


def test_members_claim_different_chunks_without_waiting(make_pg_url: Any) -> None:
    """PostgreSQL: a chunk row locked by one member's claim in progress is skipped by
    another's (SKIP LOCKED), which gets the next chunk at once instead of waiting."""
    from prestaged.state.postgres import connect

    url = make_pg_url()
    with Store(Path("/nonexistent/state.db"), url=url) as store:
        _one_file_chunks(store, 3)
        with connect(url) as other, other.transaction():
            other.execute("SET LOCAL lock_timeout = '5s'")
            other.execute("SELECT idx FROM round_chunks WHERE idx = 0 FOR UPDATE")
            got: list[Any] = []
            worker = threading.Thread(target=lambda: got.append(
                shared.claim_chunk(store, "b", 60)))
            worker.start()
            worker.join(timeout=10)
            assert not worker.is_alive(), "the claim waited for the locked chunk"
        assert got and got[0] is not None and got[0].idx == 1


def test_a_busy_member_claims_only_orphans(store: Store) -> None:
    """A member already warming a chunk takes only chunks whose holder's lease expired (a dead
    member's), never a free one another idle member would take."""
    _one_file_chunks(store, 3)
    held = shared.claim_chunk(store, "dead", 60)
    assert held is not None and held.idx == 0
    assert shared.claim_chunk(store, "a", 60, orphans_only=True) is None  # 1, 2 are free
    _expire(store, "round_chunks")
    orphan = shared.claim_chunk(store, "a", 60, orphans_only=True)
    assert orphan is not None and orphan.idx == 0 and orphan.taken_from == "dead"
    assert shared.claim_chunk(store, "a", 60, orphans_only=True) is None


def test_a_busy_member_never_takes_its_own_late_chunk_over(store: Store) -> None:
    """A member whose renewal of the chunk it is warming is late (lease expired, nobody took
    it) does not claim that chunk again as an orphan: it would warm it twice at once; another
    member may take it."""
    _one_file_chunks(store, 2)
    held = shared.claim_chunk(store, "a", 60)
    assert held is not None and held.idx == 0
    _expire(store, "round_chunks")
    assert shared.claim_chunk(store, "a", 60, orphans_only=True) is None
    assert shared.renew(store, "chunk", held.key, "a", 60)  # still ours to renew
    _expire(store, "round_chunks")
    orphan = shared.claim_chunk(store, "b", 60, orphans_only=True)
    assert orphan is not None and orphan.idx == 0 and orphan.taken_from == "a"


def test_the_next_round_is_due_every_after_the_last_one_ended(store: Store) -> None:
    """As a daemon alone waits ``every`` after a run ends, a shared round sets its schedule
    due ``next_in`` after its last chunk is done, not after it was planned: the files a long
    round touched last are not still fresh when the next one comes."""
    _one_file_chunks(store, 2, next_in=100.0)
    [(planned_due,)] = _sql(store, "SELECT next_due FROM watch_schedule")
    first = shared.claim_chunk(store, "a", 60)
    assert first is not None and shared.finish_chunk(store, first, "a", 0) == (True, False)
    _sql(store, "UPDATE watch_rounds SET created = created - 50")  # the round took 50 s
    _sql(store, "UPDATE watch_schedule SET next_due = next_due - 50")
    last = shared.claim_chunk(store, "b", 60)
    assert last is not None and shared.finish_chunk(store, last, "b", 0) == (True, True)
    [(due, finished)] = _sql(store, "SELECT s.next_due, r.finished FROM watch_schedule s, "
                                    "watch_rounds r")
    assert due == pytest.approx(finished + 100.0) and due > planned_due - 1
