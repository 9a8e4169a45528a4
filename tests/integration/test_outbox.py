"""Outbox relay against real Redis + real Kafka protocol (Tansu) + Ray, with SIGKILLs.

10,000 events are written into ``automat:outbox`` in waves while the relay actor is
killed with SIGKILL over and over (and re-created, alternating two consumer names so
that both "re-read my own pending entries" and "XAUTOCLAIM a dead consumer's entries"
happen); a "ghost" consumer holds 300 entries it will never publish (a relay that died
for good), which only XAUTOCLAIM can free. Afterwards every written event id is on
Kafka, nothing else is, and the stream and the group's pending list are empty.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from actors.runtime.outbox import (
    OUTBOX_DEAD_STREAM,
    OUTBOX_GROUP,
    OUTBOX_STREAM,
    OutboxRelay,
    outbox_fields,
    read_events,
)
from protocols.events import Event

pytestmark = pytest.mark.integration

N_EVENTS = 10_000
WAVES = 8
MIN_KILLS = 6
TOPICS = ("outboxtest.mail", "outboxtest.case")
REDIS_DB = 7  # keep this test's outbox stream apart from other tests on a shared Redis


# ---- fixtures: the shared local stack (tests/conftest.py) ---------------------------
def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout}s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def relay_cfg(cfg, stack, tmp_path_factory):
    """The stack's services, but a Redis DB and topic prefix of this module's own."""
    base_url = cfg.redis.url.rsplit("/", 1)[0]
    return cfg.model_copy(
        update={
            "run_dir": tmp_path_factory.mktemp("outbox-run"),
            "redis": cfg.redis.model_copy(update={"url": f"{base_url}/{REDIS_DB}"}),
            "kafka": cfg.kafka.model_copy(update={"topic_prefix": f"t{uuid.uuid4().hex[:8]}."}),
        }
    )


# ---- helpers -------------------------------------------------------------------------
def _redis(cfg):
    import redis

    return redis.Redis.from_url(cfg.redis.url)


def _write_wave(r, events: list[Event]) -> None:
    with r.pipeline(transaction=False) as pipe:
        for i, ev in enumerate(events):
            pipe.xadd(OUTBOX_STREAM, outbox_fields(ev))
            if i % 500 == 499:
                pipe.execute()
        pipe.execute()


def _new_relay(cfg, consumer: str):
    import ray

    actor = ray.remote(OutboxRelay).options(num_cpus=0, max_restarts=0).remote(
        cfg, consumer, claim_idle_ms=1000, block_ms=200
    )
    st = ray.get(actor.stats.remote(), timeout=60)  # constructor done, loop running
    return actor, st["pid"]


def _stats(actor) -> dict:
    import ray

    return ray.get(actor.stats.remote(), timeout=30)


# ---- the test ------------------------------------------------------------------------
def test_relay_loses_nothing_under_repeated_sigkill(relay_cfg, ray_session):
    import ray

    cfg = relay_cfg
    r = _redis(cfg)
    r.flushdb()
    rnd = random.Random(7)
    events = [
        Event(topic=TOPICS[i % 2], type="test.happened", key=f"k{i % 97}", data={"n": i})
        for i in range(N_EVENTS)
    ]
    written = {ev.id: ev for ev in events}
    waves = [events[i::WAVES] for i in range(WAVES)]

    # a relay that died long ago: it read entries and never published them; only
    # XAUTOCLAIM by a live relay gets them out
    r.xgroup_create(OUTBOX_STREAM, OUTBOX_GROUP, id="0", mkstream=True)
    _write_wave(r, waves.pop())
    ghost = r.xreadgroup(OUTBOX_GROUP, "ghost", {OUTBOX_STREAM: ">"}, count=300)[0][1]
    assert len(ghost) == 300

    kills = 0
    incarnation = 0
    published_seen = 0
    t_start = time.monotonic()
    while waves or kills < MIN_KILLS:
        if waves:
            _write_wave(r, waves.pop())
        consumer = f"relay-{incarnation % 2}"
        incarnation += 1
        actor, pid = _new_relay(cfg, consumer)
        # kill at varied points: right after start (while re-reading pending entries),
        # mid-batch (as soon as it has published something) or after a random pause
        mode = incarnation % 3
        if mode == 0:
            time.sleep(rnd.uniform(0.0, 0.05))
        elif mode == 1:
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and _stats(actor)["published"] == 0:
                time.sleep(0.01)
        else:
            time.sleep(rnd.uniform(0.1, 0.5))
        published_seen += _stats(actor)["published"]
        os.kill(pid, signal.SIGKILL)
        kills += 1
        del actor  # plain re-creation; the supervisor does the real thing

    # a last relay drains what is left (incl. the other consumer name's pending entries)
    actor, _pid = _new_relay(cfg, "relay-final")
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        st = _stats(actor)
        if st["pending"] == 0 and st["group_pending"] == 0:
            break
        time.sleep(0.1)
    relay_s = time.monotonic() - t_start
    st = _stats(actor)
    assert st["pending"] == 0, st
    assert st["group_pending"] == 0, st
    assert r.xlen(OUTBOX_STREAM) == 0
    assert r.xlen(OUTBOX_DEAD_STREAM) == 0
    ray.get(actor.stop.remote(), timeout=30)
    del actor

    got = asyncio.run(read_events(cfg, TOPICS, until_count=N_EVENTS, timeout_s=30))
    ids = [ev.id for ev in got]
    distinct = set(ids)
    invented = distinct - set(written)
    missing = set(written) - distinct
    duplicates = len(ids) - len(distinct)
    print(
        f"\noutbox relay: {N_EVENTS} events, {kills} SIGKILLs over {incarnation} incarnations, "
        f"{relay_s:.1f}s until drained; records on Kafka {len(ids)}, duplicates {duplicates}; "
        f"final relay published {st['published']}, reclaimed {st['reclaimed']}"
    )
    assert kills >= MIN_KILLS
    assert not invented, f"{len(invented)} ids on Kafka were never written"
    assert not missing, f"{len(missing)} written events never reached Kafka"
    assert distinct == set(written)
    for ev in got:  # each arrived on its own topic, with its own key and data
        w = written[ev.id]
        assert (ev.topic, ev.key, ev.type, ev.data) == (w.topic, w.key, w.type, w.data)
    ghost_ids = {f[b"id"].decode() for _, f in ghost}
    assert ghost_ids <= distinct
    groups = {g["name"].decode(): g for g in r.xinfo_groups(OUTBOX_STREAM)}
    assert groups[OUTBOX_GROUP]["pending"] == 0


# ---- Kafka outages and unpublishable entries (relay in this process, own broker) -------
def _start_tansu(port: int, log: Path) -> subprocess.Popen:
    from deploy.stack import tansu_binary

    p = subprocess.Popen(
        [str(tansu_binary()), "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{port}", "--storage-engine", "memory://tansu/"],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT,
    )
    _wait_port(port, p, "tansu")
    return p


async def _until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = await pred()
        if v:
            return v
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def test_relay_waits_out_kafka_outages_and_parks_poison_entries(relay_cfg, tmp_path):
    import redis

    kport = _free_port()
    cfg = relay_cfg.model_copy(
        update={
            "redis": relay_cfg.redis.model_copy(update={"url": relay_cfg.redis.url.rsplit("/", 1)[0] + "/8"}),
            "kafka": relay_cfg.kafka.model_copy(
                update={"bootstrap_servers": f"127.0.0.1:{kport}", "topic_prefix": f"o{uuid.uuid4().hex[:8]}."}
            ),
        }
    )
    r = redis.Redis.from_url(cfg.redis.url)
    r.flushdb()
    first = [Event(topic="outage.a", type="t", key=f"k{i}") for i in range(200)]
    _write_wave(r, first)
    # unpublishable entries: missing payload, illegal topic name
    r.xadd(OUTBOX_STREAM, {"id": "poison-1", "topic": "outage.a", "type": "t", "key": "k"})
    r.xadd(OUTBOX_STREAM, {"id": "poison-2", "topic": "bad topic/!", "type": "t", "key": "k", "payload": b"{}"})

    relay = OutboxRelay(cfg, "relay-outage", block_ms=200, request_timeout_ms=3000)
    broker = None
    try:
        # 1. Kafka is not there: nothing is published, nothing is dropped, the error is visible
        await _until(lambda: _err_seen(relay), 15, "the relay to report the Kafka error")
        await asyncio.sleep(1.0)
        st = await relay.stats()
        assert st["published"] == 0 and st["pending"] == 202, st
        # 2. Kafka comes up: everything arrives, the poison entries are parked
        broker = _start_tansu(kport, tmp_path / "tansu.log")
        await _until(lambda: _drained(relay), 30, "the backlog to drain after Kafka came up")
        got = await read_events(cfg, ["outage.a"], until_count=200, timeout_s=20, quiet_s=0.5)
        assert {e.id for e in got} == {e.id for e in first}
        dead = r.xrange(OUTBOX_DEAD_STREAM)
        assert sorted(f[b"id"] for _, f in dead) == [b"poison-1", b"poison-2"]
        assert all(f[b"reason"] for _, f in dead)
        # 3. Kafka dies while the relay runs, events keep coming, Kafka returns
        broker.kill()
        broker.wait()
        second = [Event(topic="outage.b", type="t", key=f"k{i}") for i in range(300)]
        _write_wave(r, second)
        await asyncio.sleep(2.0)
        assert (await relay.stats())["pending"] > 0  # held, not dropped
        broker = _start_tansu(kport, tmp_path / "tansu.log")  # memory broker: starts empty
        await _until(lambda: _drained(relay), 45, "the backlog to drain after Kafka returned")
        got = await read_events(cfg, ["outage.b"], until_count=300, timeout_s=20, quiet_s=0.5)
        assert {e.id for e in got} == {e.id for e in second}
        st = await relay.stats()
        assert st["errors"] > 0 and st["dead"] == 2 and st["published"] >= 500, st
    finally:
        await relay.stop()
        if broker is not None:
            broker.kill()
            broker.wait()


async def _err_seen(relay) -> bool:
    return (await relay.stats())["last_error"] is not None


async def _drained(relay) -> bool:
    st = await relay.stats()
    return st["pending"] == 0 and st["group_pending"] == 0
