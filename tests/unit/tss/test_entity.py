"""The practice sync entity against the simulator (in-process), with a controllable clock."""

from __future__ import annotations

import pytest

from deploy.sim_tss import TerminService
from protocols.tss.messages import (
    Configure,
    GetStatus,
    PollNow,
    PollAccepted,
    PollRefused,
    PublishSlot,
    ReadResource,
    ReplaceResource,
    SetSlotStatus,
)
from protocols.tss.xml import from_xml, to_xml
from tests.unit.tss.harness import BASE, FakeClock, Harness, make_sim_client

from actors.tss.ports import TssPorts


def setup(pid="prx-1", page_size=3, slots=7, appointments=3, **kw):
    clock = FakeClock()
    sim = TerminService(clock=clock)
    p = sim.add_practice(pid, slots=slots, appointments=appointments)
    h = Harness(pid, TssPorts(make_sim_client(sim), clock))
    cfgmsg = Configure(base_url=BASE, client_id=p.client_id, client_secret=p.secret, page_size=page_size, **kw)
    return clock, sim, p, h, cfgmsg


def same(sim, pid, store: dict) -> None:
    want = {k: from_xml(to_xml(v)) for k, v in sim.snapshot(pid).items()}
    assert store.keys() == want.keys()
    assert store == want


async def poll_cycle(h, clock, interval=300.0):
    clock.advance(interval)
    await h.run_due()


async def test_initial_then_continuous_sync_equals_simulator():
    clock, sim, p, h, cfgmsg = setup()
    st = await h.send(cfgmsg)
    assert st.phase == "initial"
    await h.run_due()
    s = h.state
    assert s.phase == "idle" and s.initial_done
    same(sim, "prx-1", s.store.resources)
    for _ in range(3):
        sim.mutate(6)
        await poll_cycle(h, clock)
        same(sim, "prx-1", h.state.store.resources)
    s = h.state
    assert s.applied == len(set(s.applied_ids)) > 0  # none twice
    assert s.cursor.id == p.provenance[-1]["id"]
    assert not sim.violations
    types = {e.type for e in h.events}
    assert "sync.initial_completed" in types and any(t.endswith(".update") or t.endswith(".create") for t in types)


async def test_five_minute_rule_timer_manual_restart():
    clock, sim, p, h, cfgmsg = setup()
    await h.send(cfgmsg)
    await h.run_due()
    # no Provenance search yet: a manual poll may run now; a second one is refused
    r = await h.send(PollNow())
    assert isinstance(r, PollAccepted)
    await h.run_due()
    r = await h.send(PollNow())
    assert isinstance(r, PollRefused) and r.retry_in_s == pytest.approx(300)
    clock.advance(300)
    r = await h.send(PollNow())
    assert isinstance(r, PollAccepted)
    await h.run_due()
    # immediately again: refused (manual), the timer does not fire early either
    clock.advance(120)
    r = await h.send(PollNow())
    assert isinstance(r, PollRefused) and r.retry_in_s == pytest.approx(180)
    polls = p.polls
    await h.run_due()
    assert p.polls == polls
    # restart of the host: state and timers are durable, the rule still holds
    h.restart()
    r = await h.send(PollNow())
    assert isinstance(r, PollRefused)
    await h.run_due()
    assert p.polls == polls
    clock.advance(180)
    await h.run_due()
    assert p.polls == polls + 1
    assert not sim.violations


async def test_restart_between_claim_and_search_counts_as_poll():
    clock, sim, p, h, cfgmsg = setup()
    await h.send(cfgmsg)
    await h.run_due()
    clock.advance(300)
    assert isinstance(await h.send(PollNow()), PollAccepted)
    h.restart()  # the claim is durable; did the search go out? unknown -> it counts
    await h.run_due()
    s = h.state
    assert s.phase == "idle" and s.error_code == "interrupted"
    assert s.next_poll_at == pytest.approx(s.last_poll_at + 300)
    clock.advance(300)
    await h.run_due()
    assert h.state.error_code == "" and not sim.violations


async def test_interval_configurable_upwards_only():
    with pytest.raises(ValueError):
        Configure(base_url=BASE, client_id="x", client_secret="y", poll_interval_s=299)
    clock, sim, p, h, cfgmsg = setup(poll_interval_s=900)
    await h.send(cfgmsg)
    await h.run_due()
    polls = p.polls
    clock.advance(600)
    await h.run_due()
    assert p.polls == polls
    clock.advance(300)
    await h.run_due()
    assert p.polls == polls + 1


async def test_crash_at_every_round_of_paged_sync(seed=7):
    """Crash after each round in turn (HTTP done, commit lost): nothing twice, nothing skipped."""
    total_rounds = None
    crash_at = 1
    while True:
        clock, sim, p, h, cfgmsg = setup(page_size=2, slots=5, appointments=2)
        sim.rng.seed(seed)
        h.crash_rounds = {crash_at}
        if await h.send(cfgmsg) is None:
            await h.send(cfgmsg)  # the ask failed: the caller sends it again
        await h.run_due()
        for _ in range(2):
            sim.mutate(5)
            await poll_cycle(h, clock)
        await poll_cycle(h, clock)  # one more, catches an interrupted poll up
        s = h.state
        same(sim, "prx-1", s.store.resources)
        assert len(s.applied_ids) == len(set(s.applied_ids))
        after_initial = [pr["id"] for pr in p.provenance if pr["id"] in set(s.applied_ids)]
        assert s.applied_ids == after_initial  # in order, no gaps among those after the start
        assert not sim.violations
        if total_rounds is None:
            total_rounds = h.rounds
        if h.crashes == 0 or crash_at >= total_rounds:
            break
        crash_at += 1
    assert crash_at > 10


async def test_bad_input_keeps_cursor():
    clock, sim, p, h, cfgmsg = setup()
    await h.send(cfgmsg)
    await h.run_due()
    for bad, code in (("malformed", "malformed_xml"), ("json", "json_not_xml"), ("wrong_profile", "wrong_profile")):
        cursor = h.state.cursor
        sim.mutate(3)
        sim.inject(payload=bad, paths="Provenance")
        await poll_cycle(h, clock)
        s = h.state
        assert s.error_code == code, s.last_error
        assert s.cursor == cursor  # nothing applied past an unapplied change
        await poll_cycle(h, clock)
        assert h.state.error_code == ""
        same(sim, "prx-1", h.state.store.resources)
    assert not sim.violations


async def test_401_and_500_storms():
    clock, sim, p, h, cfgmsg = setup()
    sim.inject(status=500, count=4, paths="Organization")  # initial sync: retried with backoff
    await h.send(cfgmsg)
    await h.run_due()
    assert h.state.phase == "initial" and h.state.error_code == "unavailable"
    clock.advance(10)
    await h.run_due()
    assert h.state.initial_done
    sim.revoke_tokens()  # 401 -> re-authenticate
    sim.mutate(3)
    await poll_cycle(h, clock)
    assert h.state.error_code == ""
    same(sim, "prx-1", h.state.store.resources)
    # a 500 storm on polls: no retry before the interval, cursor kept
    sim.mutate(3)
    cursor = h.state.cursor
    sim.inject(status=500, count=50, paths="Provenance")
    await poll_cycle(h, clock)
    polls_during = p.polls
    assert h.state.error_code == "unavailable" and "500" in h.state.last_error and h.state.cursor == cursor
    sim.faults.clear()
    clock.advance(100)
    await h.run_due()
    assert h.state.cursor == cursor  # not before the interval
    clock.advance(200)
    await h.run_due()
    same(sim, "prx-1", h.state.store.resources)
    assert not sim.violations and p.polls >= polls_during
    # 401 storm: authentication cannot help; a clear error, cursor kept
    sim.inject(status=401, count=10, paths="Provenance")
    cursor = h.state.cursor
    sim.mutate(2)
    await poll_cycle(h, clock)
    assert h.state.error_code == "unauthorized" and h.state.cursor == cursor


async def test_writes_and_direct_reads():
    clock, sim, p, h, cfgmsg = setup()
    await h.send(cfgmsg)
    await h.run_due()
    sched = next(k for k in p.current if k.startswith("Schedule/")).split("/")[1]
    r = await h.send(PublishSlot(schedule_id=sched, start="2031-01-01T09:00:00Z", end="2031-01-01T09:15:00Z"))
    assert r.ok and r.resource["status"] == "free"
    sid = r.resource["id"]
    r = await h.send(SetSlotStatus(slot_id=sid, status="busy"))
    assert r.ok and r.resource["meta"]["versionId"] == "2"
    # anything but the status: refused by the Terminservice; ReplaceResource deletes + recreates
    new = dict(h.state.store.resources[f"Slot/{sid}"], end="2031-01-01T09:30:00Z")
    r = await h.send(ReplaceResource(resource_type="Slot", resource_id=sid, resource=new))
    assert r.ok and r.resource["id"] != sid
    # direct read at any time, even right after a poll
    r = await h.send(ReadResource(resource_type="Slot", resource_id=r.resource["id"]))
    assert r.ok
    r = await h.send(ReadResource(resource_type="Slot", resource_id="nope"))
    assert not r.ok and r.code == "not_found"
    await poll_cycle(h, clock)  # our own changes come back as Provenance: applied once, no harm
    same(sim, "prx-1", h.state.store.resources)
    st = await h.send(GetStatus())
    assert st.lag_s == 0 and st.phase == "idle"


async def test_configure_with_another_terminservice_starts_over():
    import httpx

    from actors.tss.client import TssClient
    from deploy.sim_tss import make_app

    clock = FakeClock()
    sim_a, sim_b = TerminService(clock=clock), TerminService(clock=clock, seed=4711)
    pa = sim_a.add_practice("prx-1", slots=5, appointments=2)
    sim_b.add_practice("prx-0")  # other ids and versions at the second server
    pb = sim_b.add_practice("prx-1", slots=3, appointments=1)
    pb.secret = pa.secret
    http = httpx.AsyncClient(mounts={"http://sim": httpx.ASGITransport(app=make_app(sim_a)),
                                     "http://sim2": httpx.ASGITransport(app=make_app(sim_b))})

    async def no_sleep(_s: float) -> None:
        return None

    h = Harness("prx-1", TssPorts(TssClient(http, retries=1, sleep=no_sleep), clock))
    await h.send(Configure(base_url=BASE, client_id=pa.client_id, client_secret=pa.secret))
    await h.run_due()
    same(sim_a, "prx-1", h.state.store.resources)
    # the same server again: nothing starts over
    st = await h.send(Configure(base_url=BASE + "/", client_id=pa.client_id, client_secret=pa.secret))
    assert st.phase == "idle" and st.initial_done
    # another Terminservice: the store is rebuilt from it, old resources leave with DELETE events
    st = await h.send(Configure(base_url="http://sim2/fhir", client_id=pb.client_id, client_secret=pb.secret))
    assert st.phase == "initial"
    await h.run_due()
    s = h.state
    assert s.phase == "idle" and s.initial_done
    same(sim_b, "prx-1", s.store.resources)
    gone = {e.data["resource_id"] for e in h.events if e.data.get("source") == "reconfigure"}
    assert gone == {k.split("/", 1)[1] for k in sim_a.snapshot("prx-1")}


class TickingClock(FakeClock):
    """A clock that moves a little on every reading, like the wall clock."""

    def __call__(self) -> float:
        self.t += 0.001
        return self.t


async def test_first_poll_runs_with_a_clock_that_moves_between_readings():
    clock = TickingClock()
    sim = TerminService(clock=clock)
    p = sim.add_practice("prx-1", slots=3, appointments=1)
    h = Harness("prx-1", TssPorts(make_sim_client(sim), clock))
    await h.send(Configure(base_url=BASE, client_id=p.client_id, client_secret=p.secret))
    await h.run_due()
    clock.advance(300)
    sim.mutate(2)
    await h.run_due()  # the poll timer fires once and the poll runs (not refused as "too early")
    s = h.state
    assert p.polls == 1 and s.last_poll_at is not None and s.phase == "idle"
    same(sim, "prx-1", s.store.resources)
    assert isinstance(await h.send(PollNow()), PollRefused)
