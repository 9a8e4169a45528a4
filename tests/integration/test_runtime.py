"""Entities on shard hosts, against real Redis and real Ray actors.

Each test uses its own entity kind name (and so its own Redis keys), so runs and tests
never see each other's state.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

import pytest
import ray

from actors.runtime.kinds import EntityKind
from actors.runtime.router import EntityError, Router, register_kinds
from actors.runtime.store import DEADLETTER_STREAM, OUTBOX_STREAM, quarantine_key, state_key
from actors.runtime.system import host_child_specs, start_hosts
from protocols.events import Event
from supervisors.resolve import resolve_async
from supervisors.spec import SupervisorSpec
from supervisors.supervisor import Supervisor
from tests.integration.demo_entities import Add, Boom, Get, Remind, Unhandled

pytestmark = pytest.mark.integration

COUNTER = "tests.integration.demo_entities:Counter"
SECRET = "tests.integration.demo_entities:Secret"


def new_kind(entity: str = COUNTER, hosts: int = 2) -> EntityKind:
    return EntityKind(name=f"t{uuid.uuid4().hex[:10]}.counter", entity=entity, hosts=hosts)


@pytest.fixture
async def hosted(cfg, stack, ray_session, redis_client):
    """Start plain (unsupervised) hosts for a fresh kind; returns (kind, router)."""
    made = []

    async def make(entity: str = COUNTER, hosts: int = 2):
        kind = new_kind(entity, hosts)
        await register_kinds(redis_client, [kind])
        handles = await asyncio.to_thread(start_hosts, cfg, kind)
        router = Router(cfg)
        made.append((handles, router))
        return kind, router, handles

    yield make
    for handles, router in made:
        await router.close()
        for h in handles:
            ray.kill(h)


async def test_ask_and_tell_reach_the_entity_and_state_is_durable(hosted, redis_client):
    kind, router, _ = await hosted()
    assert (await router.ask(kind.name, "a", Add(n=5))).total == 5
    for _ in range(10):
        await router.tell(kind.name, "a", Add(n=1))
    await router.drain()
    assert (await router.ask(kind.name, "a", Get())).total == 15
    # the stored state is what the entity says; queued messages share one write (group
    # commit), so there are between 2 and 11 versions
    v, s = await redis_client.hmget(state_key(kind.name, "a"), ["v", "s"])
    assert 2 <= int(v) <= 11 and b'"total":15' in s


async def test_in_order_per_entity_under_concurrent_senders(hosted):
    """Each sender's messages to each entity are handled in the order sent (4 senders,
    many batches in flight: before batches were numbered, Ray started some of one
    sender's calls early and ~300 of 120,000 messages were handled out of order)."""
    kind, _, _ = await hosted()
    from actors.runtime.config import load_config

    cfg = load_config()
    senders = [Router(cfg) for _ in range(4)]
    n, keys = 15_000, 50

    async def send(i: int, r: Router):
        for seq in range(n):
            await r.tell(kind.name, f"k{seq % keys}", Add(n=1, seq=seq // keys, sender=f"s{i}-{seq % keys}"))
        await r.drain()

    await asyncio.gather(*[send(i, r) for i, r in enumerate(senders)])
    router = senders[0]
    total = 0
    for k in range(keys):
        st = await router.ask(kind.name, f"k{k}", Get())
        total += st.total
        # every sender's sequence arrived gap-free and in order
        assert st.out_of_order == 0, (k, st.out_of_order)
        assert len(st.seen) == 4 and all(s.endswith(f"-{k}") for s in st.seen)
    assert total == 4 * n
    for r in senders:
        await r.close()


async def test_a_batch_that_arrives_early_waits_for_its_predecessor(hosted):
    """Ray may start a sender's second call before its first: the host holds it back."""
    kind, router, handles = await hosted(hosts=1)
    h = handles[0]
    later = h.deliver.remote([("e", Add(n=1, seq=1, sender="s"))], ("sender-a", 1, 0))
    await asyncio.sleep(0.3)  # the second batch is in, the first not yet
    first = h.deliver.remote([("e", Add(n=1, seq=0, sender="s"))], ("sender-a", 0, 0))
    r_first, r_later = await first, await later
    assert r_first[0].total == 1 and r_later[0].total == 2  # handled in sequence order
    st = await router.ask(kind.name, "e", Get())
    assert st.out_of_order == 0 and st.seen == {"s": 1}
    # a predecessor that never comes holds a batch back for order_wait_s only (then counted)
    t0 = time.monotonic()
    r = await h.deliver.remote([("e", Add(n=1, seq=2, sender="s"))], ("sender-a", 3, 2))
    assert r[0].total == 3 and 1.0 < time.monotonic() - t0 < 10
    stats = await h.stats.remote()
    assert stats["early_batches"] == 2 and stats["order_gaps"] == 1


async def test_a_host_reports_its_garbage_collector(hosted):
    """Operators see the collector's pauses per host (a full collection over a big heap
    stalls every entity of the host; py-spy files it under whatever allocated)."""
    kind, router, handles = await hosted(hosts=1)
    for i in range(200):
        await router.ask(kind.name, f"gc-{i}", Add(n=1))
    gc = (await handles[0].stats.remote())["gc"]
    assert gc["collections"][0] > 0 and len(gc["seconds"]) == 3
    assert gc["total_s"] >= 0 and gc["max_pause_ms"] >= 0 and len(gc["threshold"]) == 3


async def test_state_survives_sigkill_of_its_supervised_host(cfg, stack, ray_session, redis_client):
    kind = new_kind(hosts=1)
    await register_kinds(redis_client, [kind])
    spec = SupervisorSpec.model_validate(
        {"name": f"{kind.name}.sup", "strategy": "one_for_one", "children": host_child_specs(cfg, kind)}
    )
    sup_name = f"test.{kind.name}.sup"
    sup = Supervisor.options(name=sup_name, namespace="automat").remote(spec, "automat", sup_name)
    await sup.start.remote()
    router = Router(cfg)
    try:
        for i in range(50):
            await router.tell(kind.name, f"e{i}", Add(n=i))
        await router.drain()
        before = [(await router.ask(kind.name, f"e{i}", Get())).total for i in range(50)]
        host = await resolve_async(kind.host_name(0))
        pid = await host.pid.remote()
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        # the router re-sends to the next incarnation; the state comes back from Redis
        after0 = await router.ask(kind.name, "e0", Get(), timeout_s=60)
        print(f"\nshard host SIGKILL -> serving again: {time.monotonic() - t0:.2f} s")
        after = [after0.total] + [(await router.ask(kind.name, f"e{i}", Get())).total for i in range(1, 50)]
        assert after == before
        new_pid = await (await resolve_async(kind.host_name(0))).pid.remote()
        assert new_pid != pid
        # and it keeps working
        assert (await router.ask(kind.name, "e1", Add(n=100))).total == 101
    finally:
        await router.close()
        await sup.stop.remote("test over")
        ray.kill(sup)


async def test_handler_that_raises_is_rolled_back_dead_lettered_and_entity_stays_usable(hosted, redis_client):
    kind, router, _ = await hosted()
    await router.ask(kind.name, "b", Add(n=3))
    with pytest.raises(EntityError) as ei:
        await router.ask(kind.name, "b", Boom())
    assert ei.value.failure.code == "handler_failed" and "boom" in ei.value.failure.reason
    # the mutation made before the raise is gone, later messages work
    assert (await router.ask(kind.name, "b", Add(n=1))).total == 4
    rows = await redis_client.xrevrange(DEADLETTER_STREAM, count=200)
    mine = [f for _, f in rows if f[b"kind"] == kind.name.encode() and f[b"key"] == b"b"]
    assert mine and mine[0][b"type"] == b"Boom" and b"RuntimeError: boom" in mine[0][b"reason"]


async def test_unknown_message_type_is_a_clear_error_and_recorded(hosted, redis_client):
    kind, router, _ = await hosted()
    with pytest.raises(EntityError) as ei:
        await router.ask(kind.name, "c", Unhandled())
    assert ei.value.failure.code == "unknown_message"
    assert "no handler for tests.integration.demo_entities.Unhandled" in ei.value.failure.reason
    assert (await router.ask(kind.name, "c", Add(n=2))).total == 2
    rows = await redis_client.xrevrange(DEADLETTER_STREAM, count=200)
    assert any(f[b"kind"] == kind.name.encode() and f[b"type"] == b"Unhandled" for _, f in rows)


async def test_corrupt_stored_state_is_quarantined_and_entity_stays_usable(hosted, redis_client):
    kind, router, handles = await hosted(hosts=1)
    await router.ask(kind.name, "d", Add(n=7))
    await handles[0].passivate_idle.remote(0.0)
    await redis_client.hset(state_key(kind.name, "d"), "s", b"{not json")
    # the next message activates it: the bad bytes are kept for inspection, the entity works
    assert (await router.ask(kind.name, "d", Add(n=1))).total == 1
    q = await redis_client.hgetall(quarantine_key(kind.name, "d"))
    assert q[b"state"] == b"{not json" and b"unreadable" in q[b"reason"]
    rows = await redis_client.xrevrange(DEADLETTER_STREAM, count=200)
    assert any(f[b"kind"] == kind.name.encode() and f[b"type"] == b"<state>" for _, f in rows)


async def test_passivated_entity_reactivates_with_same_state(hosted):
    kind, router, handles = await hosted(hosts=1)
    await router.ask(kind.name, "p", Add(n=9))
    assert await handles[0].is_active.remote("p")
    assert await handles[0].passivate_idle.remote(0.0) >= 1
    assert not await handles[0].is_active.remote("p")
    assert (await router.ask(kind.name, "p", Get())).total == 9


async def test_a_stateless_pool_keeps_no_entity_once_it_is_idle(cfg, stack, ray_session, redis_client):
    """Regression (load test RSS): the KIM step pool (stateless, keyed by mail id) kept a
    slot per mail until ``passivate_after_s`` (300 s) - thousands of idle entities in a
    throughput run. A stateless entity now goes as soon as it has nothing queued."""
    kind = EntityKind(name=f"t{uuid.uuid4().hex[:10]}.pool", entity=COUNTER, hosts=1, stateless=True)
    await register_kinds(redis_client, [kind])
    handles = await asyncio.to_thread(start_hosts, cfg, kind)
    router = Router(cfg)
    try:
        answers = await asyncio.gather(*(router.ask(kind.name, f"m{i}", Add(n=i)) for i in range(300)))
        assert [a.total for a in answers] == list(range(300))  # each handled (no state kept between)
        again = await asyncio.gather(*(router.ask(kind.name, f"m{i}", Add(n=1)) for i in range(50)))
        assert {a.total for a in again} == {1}
        st = await handles[0].stats.remote()
        assert st["messages"] >= 350
        assert st["active_entities"] == 0, st
    finally:
        await router.close()
        for h in handles:
            ray.kill(h)


async def test_an_entity_at_rest_leaves_memory_once_stored_and_comes_back_from_the_store(cfg, stack, ray_session,
                                                                                        redis_client):
    """Regression (load test RSS): finished routing slips stayed in the slip hosts for
    ``passivate_after_s`` (300 s): ~15,000 of them, half a GiB, in a throughput run. An
    entity whose state says its work is over (``at_rest``) now goes as soon as it is stored
    and idle; the next message finds its state in the store. Entities still at work stay."""
    kind = EntityKind(name=f"t{uuid.uuid4().hex[:10]}.tally", entity="tests.integration.demo_entities:Tally",
                      hosts=1)
    await register_kinds(redis_client, [kind])
    handles = await asyncio.to_thread(start_hosts, cfg, kind)
    router = Router(cfg)
    try:
        # 200 entities reach 100 (at rest: finished), 100 stay at 5 (still at work)
        await asyncio.gather(*(router.ask(kind.name, f"done{i}", Add(n=60)) for i in range(200)))
        await asyncio.gather(*(router.ask(kind.name, f"done{i}", Add(n=40)) for i in range(200)))
        await asyncio.gather(*(router.ask(kind.name, f"busy{i}", Add(n=5)) for i in range(100)))
        st = await handles[0].stats.remote()
        assert st["active_entities"] == 100, st
        assert all([await handles[0].is_active.remote(f"busy{i}") for i in range(0, 100, 10)])
        assert not any([await handles[0].is_active.remote(f"done{i}") for i in range(0, 200, 10)])
        # the finished ones come back from the store with their state
        again = await asyncio.gather(*(router.ask(kind.name, f"done{i}", Add(n=1)) for i in range(200)))
        assert {a.total for a in again} == {101} and {a.count for a in again} == {3}
        assert (await handles[0].stats.remote())["active_entities"] == 100
    finally:
        await router.close()
        for h in handles:
            ray.kill(h)


async def test_durable_timer_fires_after_host_is_killed(cfg, hosted):
    kind, router, handles = await hosted(hosts=1)
    await router.ask(kind.name, "t", Remind(delay_s=1.5, n=40))
    pid = await handles[0].pid.remote()
    os.kill(pid, signal.SIGKILL)
    await asyncio.sleep(0.5)
    # a new host for the same shards (what the supervisor does) picks the timer up
    ray.kill(handles[0])
    del handles[0]
    from actors.runtime import system

    system._KEEP.pop(kind.host_name(0), None)
    await asyncio.sleep(0.5)
    new = await asyncio.to_thread(start_hosts, cfg, kind)
    router2 = Router(cfg)
    deadline = time.monotonic() + 20
    total = 0
    while time.monotonic() < deadline:
        total = (await router2.ask(kind.name, "t", Get())).total
        if total == 40:
            break
        await asyncio.sleep(0.3)
    assert total == 40
    await router2.close()
    for h in new:
        ray.kill(h)


async def test_personal_data_state_is_encrypted_at_rest(hosted, redis_client):
    kind, router, _ = await hosted(entity=SECRET, hosts=1)
    await router.ask(kind.name, "s", Add(n=424242))
    raw = await redis_client.hget(state_key(kind.name, "s"), "s")
    assert raw.startswith(b"AMG1") and b"424242" not in raw
    assert (await router.ask(kind.name, "s", Add(n=1))).total == 424243


async def test_events_are_written_with_the_state_change(hosted, redis_client):
    kind, router, _ = await hosted()
    await router.ask(kind.name, "ev", Add(n=1000))
    rows = await redis_client.xrevrange(OUTBOX_STREAM, count=2000)
    evs = [Event.from_payload(f[b"payload"]) for _, f in rows if f[b"key"] == b"ev" and f[b"topic"] == b"test.counter"]
    assert any(e.type == "counter.big" and e.data == {"n": 1000} for e in evs)


async def test_lost_update_is_impossible_when_store_moves_underneath(hosted, redis_client):
    kind, router, _ = await hosted(hosts=1)
    await router.ask(kind.name, "v", Add(n=1))
    # another writer (e.g. a zombie host) bumps the stored version with a different state
    await redis_client.hset(state_key(kind.name, "v"), mapping={"v": 5, "s": b'{"total":100,"count":1}'})
    # our write is refused (version check), the entity reloads and applies on top
    assert (await router.ask(kind.name, "v", Add(n=1))).total == 101
    assert int(await redis_client.hget(state_key(kind.name, "v"), "v")) == 6



async def test_starting_hosts_again_keeps_the_running_ones_alive(cfg, stack, ray_session, redis_client):
    """Regression (CI, stop 12): a second ``start_hosts`` for a kind whose hosts run
    (test_moped after test_hl7) got the hosts back by name and dropped the first handles:
    Ray garbage-collected the named actors and every MOPED request answered 503."""
    from actors.runtime import system

    kind = new_kind(hosts=2)
    await register_kinds(redis_client, [kind])
    await asyncio.to_thread(start_hosts, cfg, kind)  # handles kept by the runtime only
    router = Router(cfg)
    try:
        assert (await router.ask(kind.name, "k", Add(n=3))).total == 3
        await asyncio.to_thread(start_hosts, cfg, kind)  # the second start: same hosts, by name
        await asyncio.sleep(2.0)  # the GC of an unowned actor is asynchronous
        names = {e["name"] for e in ray.util.list_named_actors(all_namespaces=True)}
        assert {kind.host_name(0), kind.host_name(1)} <= names
        assert (await router.ask(kind.name, "k", Add(n=4))).total == 7
    finally:
        await router.close()
        for i in range(2):
            for h in system._KEEP.pop(kind.host_name(i), []):
                ray.kill(h)


async def test_a_timer_removed_while_polls_run_is_never_reported_without_its_payload(cfg, stack, redis_client):
    """Regression (``automat bench tss``: 351 false dead letters "timer payload missing"):
    the poll read the due members, then a commit fired or cancelled a timer, then the poll
    read the payloads - the removed timer came back without its payload. The poll is now
    one script (membership and payload in one atomic read, one round trip for all shards):
    polls racing with commits that remove timers see each timer whole or not at all."""
    from actors.runtime.store import EntityStore, timer_member, timer_payloads, timer_zset

    kind = f"t{uuid.uuid4().hex[:10]}.timers"
    shards = [0, 1, 2, 3]
    members = {s: [timer_member(f"k{s}-{i}", "retry") for i in range(150)] for s in shards}
    for s in shards:
        await redis_client.zadd(timer_zset(kind, s), {m: 1.0 for m in members[s]})
        await redis_client.zadd(timer_zset(kind, s), {timer_member(f"later{s}", "retry"): 99.0})
        await redis_client.hset(timer_payloads(kind, s),
                                mapping={**{m: m.encode() for m in members[s]},
                                         timer_member(f"later{s}", "retry"): b"later"})
    store = EntityStore(redis_client)
    first = await store.due_timers(kind, shards, now=2.0)
    assert sorted((sh, m) for sh, m, _ in first) == sorted((s, m) for s in shards for m in members[s])
    assert all(p == m.encode() for _, m, p in first)  # each with its own payload; "later" not due

    async def commits():  # fire-and-commit: a timer leaves zset and payloads together
        for s in shards:
            for m in members[s]:
                pipe = redis_client.pipeline(transaction=True)
                pipe.zrem(timer_zset(kind, s), m).hdel(timer_payloads(kind, s), m)
                await pipe.execute()

    async def polls():
        seen = []
        for _ in range(60):
            seen += await store.due_timers(kind, shards, now=2.0)
            await asyncio.sleep(0)
        return seen

    _, seen = await asyncio.gather(commits(), polls())
    assert seen and all(p == m.encode() for _, m, p in seen)
    assert await store.due_timers(kind, shards, now=2.0) == []
    assert len(await store.due_timers(kind, shards, now=100.0)) == len(shards)


async def test_dropping_an_unreadable_timer_keeps_one_rearmed_under_its_name(redis_client, stack):
    """An unreadable timer is dropped only if it is still the one that was read: a timer
    the entity set again under the same name meanwhile stays (before, the bench's
    practices lost their re-armed "poll" timer this way and never polled again)."""
    from actors.runtime.store import EntityStore, timer_member, timer_payloads, timer_zset

    kind = f"t{uuid.uuid4().hex[:10]}.timers"
    m = timer_member("a", "poll")
    store = EntityStore(redis_client)
    await redis_client.zadd(timer_zset(kind, 0), {m: 5.0})
    await redis_client.hset(timer_payloads(kind, 0), m, b"new")
    assert not await store.drop_timer(kind, 0, m, b"old")  # re-armed: kept
    assert not await store.drop_timer(kind, 0, m, None)  # has a payload now: kept
    assert await redis_client.zscore(timer_zset(kind, 0), m) == 5.0
    assert await store.drop_timer(kind, 0, m, b"new")
    assert await redis_client.zscore(timer_zset(kind, 0), m) is None
    assert await redis_client.hget(timer_payloads(kind, 0), m) is None


async def test_a_new_host_fires_its_restart_timers_at_once(cfg, stack, ray_session, redis_client):
    """Kinds name timers that guard work a dead incarnation may have lost (KIM: a step
    order sent after the slip's commit but not yet flushed when its host died - the chaos
    run's intake stood still until the watchdogs fired minutes later). A new host makes
    them due at once."""
    from actors.runtime import system
    from actors.runtime.store import timer_member, timer_zset

    kind = EntityKind(name=f"t{uuid.uuid4().hex[:10]}.counter", entity=COUNTER, hosts=1,
                      restart_timers=["remind"])
    await register_kinds(redis_client, [kind])
    (h,) = await asyncio.to_thread(start_hosts, cfg, kind)
    router = Router(cfg)
    try:
        await router.ask(kind.name, "w", Remind(delay_s=600.0, n=5))
        ray.kill(h)
        del h
        system._KEEP.pop(kind.host_name(0), None)
        await asyncio.sleep(0.5)
        (h2,) = await asyncio.to_thread(start_hosts, cfg, kind)
        t0 = time.monotonic()
        total = 0
        while time.monotonic() - t0 < 30:
            total = (await router.ask(kind.name, "w", Get())).total
            if total == 5:
                break
            await asyncio.sleep(0.3)
        assert total == 5  # fired after seconds, not 600 s
        from actors.runtime.kinds import shard_of

        shard = shard_of("w", cfg.runtime.num_shards)
        assert await redis_client.zscore(timer_zset(kind.name, shard), timer_member("w", "remind")) is None
    finally:
        await router.close()
        for hh in system._KEEP.pop(kind.host_name(0), []):
            ray.kill(hh)


async def test_a_warmed_router_reaches_every_host_without_looking_it_up_again(cfg, hosted, redis_client):
    """``Router.warm`` (the hosts' warm-up at start): every host of the kind looked up and
    called once before the first message, so the first mails do not pay for it (rate
    mode: the first mails took 0.4-0.8 s, 110-370 ms of it the first slip -> worker call).
    Hosts that are not there are left to the first message, without an error."""
    from actors.runtime.router import default_resolver

    kind, _, _ = await hosted(hosts=2)
    lookups: list[str] = []
    real = default_resolver(cfg.runtime.namespace)

    async def counting(name: str):
        lookups.append(name)
        return await real(name)

    router = Router(cfg, resolver=counting)
    try:
        assert await router.warm(kind.name) == 2
        assert sorted(lookups) == [kind.host_name(0), kind.host_name(1)]
        for k in range(20):  # keys on both hosts
            await router.ask(kind.name, f"w{k}", Add(n=1))
        assert len(lookups) == 2  # the warmed lanes are the ones the messages take

        absent = new_kind(hosts=2)  # registered, never started
        await register_kinds(redis_client, [absent])
        assert await router.warm(absent.name) == 0
    finally:
        await router.close()
