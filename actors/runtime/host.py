"""Shard host: one Ray actor hosting many entities of one kind.

Messages arrive in batches (one Ray call carries many). Each entity has a mailbox; a
drain task per active entity handles its messages one at a time, in arrival order. The
state changes of all entities handled at the same moment are committed to Redis in one
round trip (group commit); replies and outgoing messages leave only after that.

Entities are activated from the store on their first message and passivated after an
idle time (their state is already durable). Durable timers of the host's shards are
polled from Redis and delivered like messages; the timer is removed in the same commit
as the state change it caused, so it fires again after a crash until it was handled.

Which shards are the host's: the static layout ``shard % hosts``, or — once hosts were
added or removed — the kind's versioned shard map (``actors.runtime.shardmap``). With a
map, a message for a shard the host does not own is answered ``Failure("moved")`` (the
router re-reads the map and re-sends it), a shard being handed over to this host is
held until the previous owner has drained (``adopt_map``).

Order: Ray does not keep the order of one caller's calls to an *async* actor (a later
call can start first). Routers therefore number their batches per host (``order`` =
sender, sequence number, lowest number still unanswered); a batch that comes early waits
for the ones before it (at most ``runtime.order_wait_s``) before its messages enter the
mailboxes. So one sender's messages to one entity are handled in the order they were sent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from typing import Any

import ray
import redis.asyncio as aioredis
from pydantic import BaseModel, ValidationError

from actors.runtime import gcstats, metrics
from actors.runtime.entity import Effects, Entity, EntityContext
from actors.runtime.nodecpu import CpuMeter, ProcessCpu, node_cpus
from actors.runtime.kinds import EntityKind, host_of_shard, import_path, shard_of, shards_of_host
from actors.runtime.shardmap import ShardMap, cluster_epoch, load_map, version_key
from actors.runtime.store import (
    CommitRecord,
    EntityStore,
    decode_message,
    encode_message,
    event_fields,
    split_timer_member,
    timer_member,
)
from protocols.runtime import Ack, Failure
from supervisors.child import Supervised

log = logging.getLogger("automat.host")

_ACK = Ack()
_ROUND_MAX = 256


class _Slot:
    __slots__ = ("key", "shard", "queue", "running", "entity", "version", "last_used")

    def __init__(self, key: str, shard: int) -> None:
        self.key = key
        self.shard = shard
        self.queue: deque = deque()
        self.running = False
        self.entity: Entity | None = None
        self.version = 0
        self.last_used = time.monotonic()


class _SenderTurn:
    """How far one sender's numbered batches to this host have come (see module doc)."""

    __slots__ = ("due", "early", "seen")

    def __init__(self, due: int) -> None:
        self.due = due  # the next sequence number to enter the mailboxes
        self.early: dict[int, asyncio.Future] = {}  # seq -> waiting batch that came early
        self.seen = time.monotonic()


class ShardHost(Supervised):
    """Hosts the entities of one kind for the shards ``s % hosts == index``."""

    def __init__(self, cfg, kind: EntityKind | dict, index: int) -> None:
        self.cfg = cfg
        self.kind = kind if isinstance(kind, EntityKind) else EntityKind.model_validate(kind)
        self.index = index
        self.entity_cls: type[Entity] = import_path(self.kind.entity)
        self.n_hosts = self.kind.host_count(cfg)
        self.num_shards = cfg.runtime.num_shards
        self.my_shards = shards_of_host(index, self.n_hosts, self.num_shards)
        self.retries = cfg.runtime.handler_retries
        self._slots: dict[str, _Slot] = {}
        self._pending: list[tuple[CommitRecord, asyncio.Future]] = []
        self._flush_task: asyncio.Task | None = None
        self._pending_loads: list[tuple[str, asyncio.Future]] = []
        self._load_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._inflight_timers: set[str] = set()
        # timers whose firing was committed, by the poll round it happened in: a poll that
        # read a timer before that commit must not fire it again
        self._timer_round = 0
        self._fired_in_round: dict[str, int] = {}
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self._warm_task: asyncio.Task | None = None
        self._warmed: dict = {}
        self._router = None
        # kinds whose handlers are all plain functions take the batch fast path
        self._batch_path = all(not h.is_async for h in self.entity_cls._handlers.values())
        self.keyring = None
        self.ports: Any = None
        self._gc = gcstats.gc_clock()  # the collector's pauses in this process (stats()["gc"])
        self._clock = time.time
        self.stats_counters = {
            "messages": 0, "rounds": 0, "commits": 0, "commit_batches": 0, "activations": 0,
            "passivations": 0, "handler_errors": 0, "dead_letters": 0, "unknown": 0,
            "conflicts": 0, "quarantined": 0, "timers_fired": 0, "moved": 0, "held": 0,
            "batches": 0, "batched_messages": 0,
            "early_batches": 0, "order_gaps": 0,
        }
        # shard ownership (static layout until a versioned map is adopted)
        self._epoch = cluster_epoch()
        self._map = ShardMap.static(self.kind.name, self.n_hosts, self.num_shards)
        self._gated = False  # True once a versioned map rules: foreign shards are bounced
        self._active: set[int] = set(self.my_shards)
        self._held: dict[int, list] = {}  # shard -> [(key, msg, fut)] waiting for its handover
        self._map_ready = False
        self._map_lock: asyncio.Lock | None = None
        self._map_redis = None
        self._map_seen = None  # last polled raw version
        self._map_waiters: list[asyncio.Future] = []  # deliver calls that came before the map
        self._gate_open = False
        self._gate_task = False
        if index >= self.n_hosts:  # added beyond the static layout: nothing is ours before a map says so
            self._gated, self._active = True, set()
        # load signals for the autoscaler (see load())
        self._inflight = 0
        self._lat: deque = deque(maxlen=4096)  # (end monotonic, seconds) per delivered batch
        self._lag = 0.0
        self._cpu = CpuMeter()  # the node's CPU: may the autoscaler add a host here?
        self._pcpu = ProcessCpu()  # this host's own CPU: what one more host would need
        self._node_cpus = node_cpus()
        self._node: str | None = None
        self._turns: dict[str, _SenderTurn] = {}
        self._order_wait_s = cfg.runtime.order_wait_s

    # -- lifecycle --------------------------------------------------------------------
    async def _ensure_started(self) -> None:
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            pool = aioredis.BlockingConnectionPool.from_url(
                self.cfg.redis.url, socket_keepalive=True, max_connections=32, timeout=None
            )
            self.redis = aioredis.Redis(connection_pool=pool)
            self.store = EntityStore(self.redis)
            keys_file = self.cfg.crypto.keys_file
            if keys_file and os.path.exists(keys_file):
                from actors.runtime.crypto import KeyRing

                self.keyring = KeyRing.from_file(keys_file)
            elif self.entity_cls.personal_data:
                raise RuntimeError(f"{self.kind.name} holds personal data but no key file at {keys_file}")
            if self.kind.ports:
                made = import_path(self.kind.ports)(self.cfg)
                self.ports = await made if asyncio.iscoroutine(made) else made
            clock = getattr(self.ports, "clock", None)
            if callable(clock):
                self._clock = clock
            self._spawn(self._timer_loop())
            self._spawn(self._passivation_loop())
            self._spawn(self._map_loop())
            self._spawn(self._lag_loop())
            self._warm_task = self._spawn(self._warm())
            self._started = True

    async def _warm(self) -> dict:
        """Warm-up at start (*Aufwärmen*), so the first mails do not pay for a fresh
        process: the lanes to the kinds the entity sends to (``Entity.talks_to``) opened,
        and the ports' own ``warm()`` (imports, caches) run. Best effort: what fails here
        is done again by the first message that needs it."""
        t0 = time.monotonic()
        out: dict = {"hosts": {}}
        for k in self.entity_cls.talks_to:
            try:
                out["hosts"][k] = await self._router_().warm(k)
            except Exception as e:
                out["hosts"][k] = 0
                log.info("%s: warm-up of the lanes to %s failed (%s)", self.kind.host_name(self.index), k,
                         type(e).__name__)
        warm = getattr(self.ports, "warm", None)
        if callable(warm):
            try:
                made = warm()
                if asyncio.iscoroutine(made):
                    await made
                out["ports"] = True
            except Exception as e:
                out["ports"] = False
                log.info("%s: warm-up of the ports failed (%s: %s)", self.kind.host_name(self.index),
                         type(e).__name__, e)
        out["ms"] = round((time.monotonic() - t0) * 1000.0, 1)
        rt = self.cfg.runtime
        gcstats.tune(freeze=rt.gc_freeze, threshold0=rt.gc_threshold0)
        self._warmed = out
        return out

    async def ready(self) -> dict:
        """Started and warmed up: the readiness probe (a load test starts its clock after
        it). Lanes that were not up at start (their hosts came later) are opened now."""
        await self._ensure_started()
        if self._warm_task is not None:
            await asyncio.shield(self._warm_task)
        want: dict[str, int] = {}
        for k in self.entity_cls.talks_to:
            try:
                want[k] = len(set((await self._router_().shard_map(k)).owner))
            except Exception as e:  # the kind is not registered (yet): nothing to open
                log.info("%s: readiness: no shard map of %s (%s)", self.kind.host_name(self.index), k,
                         type(e).__name__)
        if any(self._warmed.get("hosts", {}).get(k, 0) < n for k, n in want.items()):
            self._warm_task = self._spawn(self._warm())
            await asyncio.shield(self._warm_task)
        return {"host": self.kind.host_name(self.index), **self._warmed}

    async def _start_in_background(self) -> None:
        """Start timers etc. without waiting for a first message: a host that was restarted,
        or was handed shards, has durable timers to fire even if nobody writes to it."""
        try:
            await self._ensure_started()
        except Exception as e:
            log.error("%s: could not start (%s: %s); retried with the next message",
                      self.kind.host_name(self.index), type(e).__name__, e)

    async def supervised_info(self) -> dict:
        info = await super().supervised_info()
        if not self._started:
            self._spawn(self._start_in_background())
        return info

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    async def on_stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._map_redis is not None:
            try:
                await self._map_redis.aclose()
            except Exception:
                pass
        close = getattr(self.ports, "aclose", None)
        if close:
            await close()

    # -- the Ray-facing API -------------------------------------------------------------
    async def deliver(self, batch: list[tuple[str, BaseModel]],
                      order: tuple[str, int, int] | None = None) -> list[Any]:
        """Handle a batch of ``(key, message)``; one reply per message, in order.

        ``order`` = (sender, sequence number, lowest number the sender still waits for):
        the batch enters the mailboxes after the sender's earlier ones (module doc)."""
        if not self._gate_open:  # first calls wait for the map, then go on in arrival order
            waiter = asyncio.get_running_loop().create_future()
            self._map_waiters.append(waiter)
            if not self._gate_task:
                self._gate_task = True
                self._spawn(self._init_map_then_release())
            await waiter
        if order is not None:
            await self._await_turn(*order)  # no await between this and the enqueue below
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        self._inflight += len(batch)
        metrics.BATCH_SIZE.observe(len(batch), kind=self.kind.name)
        self.stats_counters["batches"] += 1
        self.stats_counters["batched_messages"] += len(batch)
        metrics.MESSAGES_HANDLED.inc(len(batch), kind=self.kind.name)
        try:
            futs = []
            groups: dict[str, list] = {}
            for key, msg in batch:  # enqueue synchronously: arrival order is mailbox order
                fut = loop.create_future()
                futs.append(fut)
                slot = self._slots.get(key)
                if self._gated:
                    shard = slot.shard if slot is not None else shard_of(key, self.num_shards)
                    if shard not in self._active:  # not (or not yet) ours: hold or bounce
                        held = self._held.get(shard)
                        if held is not None:
                            held.append((key, msg, fut))
                            self.stats_counters["held"] += 1
                        else:
                            fut.set_result(self._moved(key, msg, shard))
                        continue
                if slot is None:
                    slot = self._slots[key] = _Slot(key, shard_of(key, self.num_shards))
                if self._batch_path and (key in groups or not slot.running):
                    slot.running = True  # owned by this batch; later arrivals queue behind it
                    groups.setdefault(key, []).append((msg, fut, None))
                else:
                    self._enqueue(key, msg, fut, None)
            if groups:
                await self._run_batch(groups)
            waiting = [f for f in futs if not f.done()]
            if waiting:
                await asyncio.wait(waiting)
            return [f.result() for f in futs]
        finally:
            self._inflight -= len(batch)
            now = time.monotonic()
            self._lat.append((now, now - t0))
            metrics.DELIVER_SECONDS.observe(now - t0, kind=self.kind.name)

    async def _await_turn(self, sender: str, seq: int, base: int) -> None:
        """Return when batches ``< seq`` of ``sender`` have entered the mailboxes (or were
        answered elsewhere: ``base``), or after ``order_wait_s`` (a lost batch: counted)."""
        t = self._turns.get(sender)
        if t is None:  # a new sender, or this incarnation is new to it
            if len(self._turns) >= 4096:
                self._forget_idle_senders()
            t = self._turns[sender] = _SenderTurn(base)
        t.seen = time.monotonic()
        if base > t.due:  # the sender has its answers for everything before ``base``
            t.due = base
        if seq > t.due:
            self.stats_counters["early_batches"] += 1
            fut = asyncio.get_running_loop().create_future()
            t.early[seq] = fut
            try:
                await asyncio.wait_for(fut, self._order_wait_s)
            except asyncio.TimeoutError:
                self.stats_counters["order_gaps"] += 1
                log.warning("%s host %d: batch %d of sender %s waited %.1f s for batch %d; going on without it",
                            self.kind.name, self.index, seq, sender, self._order_wait_s, t.due)
            finally:
                t.early.pop(seq, None)
        if seq >= t.due:
            t.due = seq + 1
        if t.early:  # wake who is due now, oldest first (they run after this batch has enqueued)
            for s in sorted(k for k in t.early if k <= t.due):
                f = t.early.pop(s)
                if not f.done():
                    f.set_result(None)

    def _forget_idle_senders(self) -> None:
        cutoff = time.monotonic() - 600
        for sender in [s for s, t in self._turns.items() if t.seen < cutoff and not t.early]:
            del self._turns[sender]

    async def _run_batch(self, groups: dict[str, list]) -> None:
        """Fast path for kinds with only plain (sync) handlers: the whole batch in one
        pass, one pipelined load for inactive entities, one commit for all of them."""
        slots = [self._slots[k] for k in groups]
        try:
            await self._ensure_started()
            cold = [s for s in slots if s.entity is None]
            if cold and self.kind.stateless:
                for s in cold:
                    self._install(s, 0, None)
            elif cold:
                rows = await self.store.load_many(self.kind.name, [s.key for s in cold])
                for s, (v, raw) in zip(cold, rows):
                    if raw is not None and not self._try_decode(s.key, raw):
                        await self._activate(s)  # corrupt: quarantine path
                    else:
                        self._install(s, v, None if raw is None else self._decode_state(s.key, raw))
            pending = []
            slow = []
            for s in slots:
                round_ = groups[s.key]
                out = self._apply_sync(s, round_)
                if out is None:
                    slow.append((s, round_))
                    continue
                results, effects, dirty, dead = out
                if self.kind.stateless:
                    dirty = False
                if dirty or effects.events or effects.timers_set or effects.timers_cancelled or effects.delete or dead:
                    pending.append((s, round_, results, effects, self._record(s, s.entity, effects, dirty, dead, [])))
                else:
                    self._finish(s, round_, results, effects, [], dead)
            if pending:
                versions = await self._commit_many([p[4] for p in pending])
                for (s, round_, results, effects, rec), v in zip(pending, versions):
                    if v < 0:
                        self.stats_counters["conflicts"] += 1
                        slow.append((s, round_))
                        continue
                    s.version = v
                    if effects.delete:
                        s.entity = None
                    self._finish(s, round_, results, effects, [], rec.dead_letters)
                    for kind, key, msg in effects.tells:
                        await self._tell(kind, key, msg)
            for s, round_ in slow:  # handler raised or version conflict: careful path
                s.entity = None
                s.queue.extendleft(reversed(round_))
        except Exception as e:
            log.exception("batch on %s failed", self.kind.name)
            for s in slots:
                for msg, fut, _ in groups[s.key]:
                    self._answer(fut, self._failure("unavailable", f"{type(e).__name__}: {e}", s.key, msg))
                s.entity = None
        finally:
            for s in slots:
                s.running = False
                s.last_used = time.monotonic()
                if s.queue:
                    s.running = True
                    self._spawn(self._drain(s))
                else:
                    self._release_idle(s)

    def _apply_sync(self, slot: _Slot, round_: list):
        ent = slot.entity
        effects = Effects()
        ent.ctx._effects = effects
        results: list[Any] = []
        dead: list = []
        dirty = False
        handlers = self.entity_cls._handlers
        for msg, _fut, _tm in round_:
            h = handlers.get(type(msg))
            if h is None:
                reason = f"{self.kind.name} has no handler for {type(msg).__module__}.{type(msg).__qualname__}"
                results.append(self._failure("unknown_message", reason, slot.key, msg))
                dead.append((type(msg).__name__, reason, self._dead_letter_body(slot.key, msg)))
                continue
            try:
                r = getattr(ent, h.name)(msg)
            except Exception:
                return None
            results.append(_ACK if r is None else r)
            dirty = dirty or not h.readonly
        return results, effects, dirty, dead

    def _finish(self, slot, round_, results, effects, fired, dead) -> None:
        c = self.stats_counters
        c["rounds"] += 1
        c["messages"] += len(round_)
        c["dead_letters"] += len(dead)
        if dead:
            metrics.DEAD_LETTERS.inc(len(dead), kind=self.kind.name)
        for (_m, fut, _t), r in zip(round_, results):
            if fut is not None and not fut.done():
                fut.set_result(r)

    async def pid(self) -> int:
        return os.getpid()

    async def stats(self) -> dict:
        return {
            **self.stats_counters,
            "active_entities": len(self._slots),
            "queued": sum(len(s.queue) for s in self._slots.values()),
            "host": self.kind.host_name(self.index),
            "pid": os.getpid(),
            "gc": self._gc.snapshot(),
        }

    async def passivate_idle(self, older_than_s: float = 0.0) -> int:
        """Passivate idle entities now (operators, tests). Returns how many."""
        return self._passivate(older_than_s)

    async def is_active(self, key: str) -> bool:
        return key in self._slots

    # -- shard ownership: the versioned shard map -------------------------------------------
    def _moved(self, key: str, msg: Any, shard: int) -> Failure:
        self.stats_counters["moved"] += 1
        return self._failure("moved", f"shard {shard} is not on {self.kind.host_name(self.index)} "
                                      f"(map v{self._map.version})", key, msg)

    def _owns(self, key: str) -> bool:
        shard = shard_of(key, self.num_shards)
        if self._gated:
            return shard in self._active
        return host_of_shard(shard, self.n_hosts) == self.index

    def _mredis(self):
        if self._map_redis is None:
            self._map_redis = aioredis.from_url(self.cfg.redis.url, socket_keepalive=True)
        return self._map_redis

    async def _init_map(self) -> None:
        """Read the kind's map before the first message (retried while Redis is away)."""
        delay = 0.05
        while not self._map_ready:
            try:
                m = await load_map(self._mredis(), self.kind.name, self.n_hosts, self.num_shards, self._epoch)
                await self._apply_map(m)
            except Exception as e:
                log.warning("%s: shard map not readable yet (%s); retrying", self.kind.host_name(self.index), e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _init_map_then_release(self) -> None:
        try:
            await self._init_map()
        finally:
            while self._map_waiters:  # one at a time, in arrival order: each enqueues its
                w = self._map_waiters.pop(0)  # batch before the next one resumes
                if not w.done():
                    w.set_result(None)
                await asyncio.sleep(0)
            self._gate_open = True

    async def adopt_map(self, raw: str | dict | None = None) -> dict:
        """Follow a shard map (given, or read from Redis): bounce shards no longer ours after
        letting what was accepted for them finish (then passivate those entities), hold
        shards being handed to us, activate handed-over shards (held messages first).
        Returns once drained: ``{version, active, held, passivated, drain_ms, busy}``."""
        if raw is None:
            m = await load_map(self._mredis(), self.kind.name, self.n_hosts, self.num_shards, self._epoch)
        elif isinstance(raw, dict):
            m = ShardMap.model_validate(raw)
        else:
            m = ShardMap.model_validate_json(raw)
        return await self._apply_map(m)

    async def _apply_map(self, m: ShardMap) -> dict:
        if self._map_lock is None:
            self._map_lock = asyncio.Lock()
        async with self._map_lock:
            out = {"host": self.kind.host_name(self.index), "version": self._map.version, "passivated": 0,
                   "drain_ms": 0.0, "busy": 0}
            if m.kind != self.kind.name or m.num_shards != self.num_shards:
                raise ValueError(f"map of {m.kind} with {m.num_shards} shards does not fit {self.kind.name}")
            if m.is_static or (self._gated and m.version <= self._map.version):
                self._map_ready = True  # static layout, or nothing new
                return {**out, "active": len(self._active), "held": len(self._held)}
            active, held = m.active_of(self.index), m.held_of(self.index)
            self._map, self._gated, self._active = m, True, active
            for s in held:
                self._held.setdefault(s, [])
            for s in list(self._held):
                if s in active:  # handover done: the held messages go first, in arrival order
                    for key, msg, fut in self._held.pop(s):
                        self._enqueue(key, msg, fut, None)
                elif s not in held:  # the move was undone or went elsewhere
                    for key, msg, fut in self._held.pop(s):
                        self._answer(fut, self._moved(key, msg, s))
            self._map_ready = True
            if active and not self._started:  # handed shards: their durable timers must fire
                self._spawn(self._start_in_background())
            # shards that left: what was accepted finishes (commits included), then passivate
            t0 = time.monotonic()
            deadline = t0 + self.cfg.runtime.handover_drain_s
            while True:
                busy = [s for s in self._slots.values() if s.shard not in active and (s.running or s.queue)]
                if not busy:
                    break
                if time.monotonic() > deadline:
                    log.error("%s: %d entities of moved shards still busy after %.0f s; the store's "
                              "version check guards them", self.kind.host_name(self.index), len(busy),
                              self.cfg.runtime.handover_drain_s)
                    out["busy"] = len(busy)
                    break
                await asyncio.sleep(0.005)
            gone = [k for k, s in self._slots.items() if s.shard not in active and not s.running and not s.queue]
            for k in gone:
                del self._slots[k]
            self.stats_counters["passivations"] += len(gone)
            return {**out, "version": m.version, "active": len(active), "held": len(self._held),
                    "passivated": len(gone), "drain_ms": round((time.monotonic() - t0) * 1000, 1)}

    async def shard_state(self) -> dict:
        """What this host believes: map version, active and held shards, entities per shard."""
        per: dict[int, int] = {}
        for s in self._slots.values():
            per[s.shard] = per.get(s.shard, 0) + 1
        return {"host": self.kind.host_name(self.index), "index": self.index, "version": self._map.version,
                "gated": self._gated, "active": sorted(self._active), "held": sorted(self._held),
                "entities_by_shard": per}

    @ray.method(concurrency_group="control")
    async def load(self, window_s: float = 10.0) -> dict:
        """Load signals for the autoscaler: messages in flight (delivered, not yet
        answered), queued behind busy entities, held, batch latency over the window,
        event-loop lag (CPU saturation), entities, map version. Runs in the "control"
        concurrency group (its own thread), so a saturated host still answers; it only
        reads counters (C-level copies, atomic under the GIL)."""
        now = time.monotonic()
        lat = sorted(d for t, d in list(self._lat) if now - t <= window_s)
        slots = list(self._slots.values())
        held = list(self._held.values())

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000.0 if lat else 0.0

        return {
            "host": self.kind.host_name(self.index), "pid": os.getpid(), "inflight": self._inflight,
            "queued": sum(len(s.queue) for s in slots),
            "held": sum(len(v) for v in held), "batches": len(lat),
            "lat_p50_ms": round(pct(0.5), 2), "lat_p95_ms": round(pct(0.95), 2),
            "loop_lag_ms": round(self._lag * 1000.0, 2), "active_entities": len(slots),
            "messages": self.stats_counters["messages"], "version": self._map.version,
            "shards": len(self._active), "node": self._node_id(), "node_cpu_busy": self._cpu.busy(),
            "node_cpus": self._node_cpus, "cpu": self._pcpu.share(),
        }

    def _node_id(self) -> str:
        if self._node is None:
            try:
                self._node = ray.get_runtime_context().get_node_id() or ""
            except Exception:
                self._node = ""
        return self._node

    async def _map_loop(self) -> None:
        """Adopt newer maps by ourselves (the coordinator also tells us; this heals gaps)."""
        period = self.cfg.runtime.shardmap_poll_s
        while True:
            await asyncio.sleep(period)
            try:
                v = await self._mredis().get(version_key(self.kind.name))
                if v != self._map_seen:
                    self._map_seen = v
                    if v is not None and int(v) > self._map.version:
                        await self.adopt_map()
            except Exception as e:
                log.warning("%s: shard map poll failed: %s", self.kind.host_name(self.index), e)

    async def _lag_loop(self) -> None:
        """Event-loop lag (a tick's overshoot), smoothed: how saturated this host is."""
        name = self.kind.host_name(self.index)
        n = 0
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(0.1)
            lag = max(0.0, time.monotonic() - t0 - 0.1)
            self._lag = 0.7 * self._lag + 0.3 * lag
            n += 1
            if n % 10 == 0:
                metrics.HOST_INFLIGHT.set(self._inflight, kind=self.kind.name, host=name)
                metrics.HOST_LOOP_LAG.set(self._lag, kind=self.kind.name, host=name)
            if n % 50 == 0:  # every ~5 s: how late is the oldest due durable timer of our shards
                try:
                    metrics.TIMER_LAG.set(await self._timer_lag(), kind=self.kind.name, host=name)
                except Exception as e:
                    log.debug("timer lag: %s", e)

    async def _timer_lag(self) -> float:
        from actors.runtime.store import timer_zset

        shards = sorted(self._active) if self._gated else self.my_shards
        if not shards:
            return 0.0
        pipe = self.redis.pipeline(transaction=False)
        for sh in shards:
            pipe.zrange(timer_zset(self.kind.name, sh), 0, 0, withscores=True)
        oldest = [rows[0][1] for rows in await pipe.execute() if rows]
        return max(0.0, self._clock() - min(oldest)) if oldest else 0.0

    # -- mailbox ----------------------------------------------------------------------
    def _enqueue(self, key: str, msg: BaseModel, fut, tmember: str | None) -> None:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(key, shard_of(key, self.num_shards))
        slot.queue.append((msg, fut, tmember))
        slot.last_used = time.monotonic()
        if not slot.running:
            slot.running = True
            self._spawn(self._drain(slot))

    async def _drain(self, slot: _Slot) -> None:
        try:
            await self._ensure_started()
            while slot.queue:
                if slot.entity is None:
                    await self._activate(slot)
                n = min(len(slot.queue), _ROUND_MAX)
                round_ = [slot.queue.popleft() for _ in range(n)]
                await self._run_round(slot, round_)
        except Exception as e:  # infrastructure failure: answer, never leave a caller hanging
            log.exception("entity %s/%s: drain failed", self.kind.name, slot.key)
            while slot.queue:
                msg, fut, _ = slot.queue.popleft()
                self._answer(fut, self._failure("unavailable", f"{type(e).__name__}: {e}", slot.key, msg))
            slot.entity = None
        finally:
            slot.running = False
            slot.last_used = time.monotonic()
            self._release_idle(slot)

    def _release_idle(self, slot: _Slot) -> None:
        """Let an idle entity go at once when there is nothing to keep: a stateless kind's
        entity (the KIM step pool kept one slot per mail for ``passivate_after_s`` -
        thousands of them in a throughput run, memory and a longer ``load()`` for nothing),
        or one whose stored state says its work is over (:meth:`Entity.at_rest`: 15,000
        finished routing slips - 5 minutes of a throughput run - were half a GiB of a slip
        host's memory)."""
        if slot.running or slot.queue or self._slots.get(slot.key) is not slot:
            return
        if self.kind.stateless:
            del self._slots[slot.key]
            return
        ent = slot.entity
        if ent is None:
            return
        try:
            if not ent.at_rest():
                return
        except Exception:  # noqa: BLE001 - a buggy hook keeps the entity (passivated later)
            log.exception("entity %s/%s: at_rest failed", self.kind.name, slot.key)
            return
        del self._slots[slot.key]
        self.stats_counters["passivations"] += 1

    # -- activation -------------------------------------------------------------------------
    def _aad(self, key: str) -> bytes:
        return f"{self.kind.name}:{key}".encode()

    def _encode_state(self, key: str, state: BaseModel) -> bytes:
        raw = state.model_dump_json().encode()
        if self.entity_cls.personal_data:
            return self.keyring.encrypt(raw, self._aad(key))
        return raw

    def _decode_state(self, key: str, raw: bytes) -> BaseModel:
        if self.entity_cls.personal_data:
            raw = self.keyring.decrypt(raw, self._aad(key))
        return self.entity_cls.State.model_validate_json(raw)

    async def _load(self, key: str) -> tuple[int, bytes | None]:
        """Load through the batch loader: one pipelined round trip for many activations."""
        fut = asyncio.get_running_loop().create_future()
        self._pending_loads.append((key, fut))
        if self._load_task is None:
            self._load_task = self._spawn(self._loader())
        return await fut

    async def _loader(self) -> None:
        try:
            while self._pending_loads:
                await asyncio.sleep(0)
                batch, self._pending_loads = self._pending_loads[:2000], self._pending_loads[2000:]
                try:
                    rows = await self.store.load_many(self.kind.name, [k for k, _ in batch])
                except Exception as e:
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(e)
                    continue
                for (_, f), row in zip(batch, rows):
                    if not f.done():
                        f.set_result(row)
        finally:
            self._load_task = None

    def _try_decode(self, key: str, raw: bytes) -> bool:
        try:
            self._decode_state(key, raw)
            return True
        except Exception:
            return False

    def _install(self, slot: _Slot, version: int, state: BaseModel | None) -> None:
        if state is None:
            state = self.entity_cls.initial_state(slot.key)
        ctx = EntityContext(self.kind.name, slot.key, self.ports, self._clock, self._ask)
        ent = self.entity_cls(slot.key, state, ctx)
        slot.entity = ent
        slot.version = version
        self.stats_counters["activations"] += 1
        ent.on_activate()

    async def _activate(self, slot: _Slot) -> None:
        if self.kind.stateless:
            self._install(slot, 0, None)
            return
        version, raw = await self._load(slot.key)
        state = None
        if raw is not None:
            try:
                state = self._decode_state(slot.key, raw)
            except Exception as e:  # corrupt or undecryptable: keep it, start clean, say so
                reason = f"stored state unreadable ({type(e).__name__}: {str(e)[:200]})"
                log.error("entity %s/%s: %s; quarantined", self.kind.name, slot.key, reason)
                await self.store.quarantine(self.kind.name, slot.key, raw, reason)
                await self.redis.xadd(
                    "automat:deadletters",
                    {"kind": self.kind.name, "key": slot.key, "type": "<state>", "reason": reason,
                     "msg": b"", "at": repr(time.time())},
                )
                self.stats_counters["quarantined"] += 1
        self._install(slot, version, state)

    # -- one round: handle queued messages, commit once, then answer -----------------------
    def _failure(self, code: str, reason: str, key: str, msg: Any) -> Failure:
        return Failure(code=code, reason=reason, kind=self.kind.name, key=key, message_type=type(msg).__name__)

    @staticmethod
    def _answer(fut, value) -> None:
        if fut is not None and not fut.done():
            fut.set_result(value)

    def _dead_letter_body(self, key: str, msg: BaseModel) -> bytes:
        body = encode_message(msg)
        return self.keyring.encrypt(body, self._aad(key)) if self.keyring else body

    async def _run_round(self, slot: _Slot, round_: list) -> None:
        attempts: dict[int, int] = {}
        skipped: dict[int, str] = {}
        for _conflict_try in range(5):
            while True:
                ent = slot.entity
                effects = Effects()
                ent.ctx._effects = effects
                results: list[Any] = [None] * len(round_)
                dead: list[tuple[str, str, str]] = []
                dirty = False
                failed = False
                for i, (msg, _fut, _tm) in enumerate(round_):
                    if i in skipped:
                        results[i] = self._failure("handler_failed", skipped[i], slot.key, msg)
                        dead.append((type(msg).__name__, skipped[i], self._dead_letter_body(slot.key, msg)))
                        continue
                    h = self.entity_cls._handlers.get(type(msg))
                    if h is None:
                        reason = f"{self.kind.name} has no handler for {type(msg).__module__}.{type(msg).__qualname__}"
                        results[i] = self._failure("unknown_message", reason, slot.key, msg)
                        dead.append((type(msg).__name__, reason, self._dead_letter_body(slot.key, msg)))
                        continue
                    try:
                        fn = getattr(ent, h.name)
                        r = (await fn(msg)) if h.is_async else fn(msg)
                    except Exception as e:
                        self.stats_counters["handler_errors"] += 1
                        metrics.HANDLER_ERRORS.inc(kind=self.kind.name)
                        n = attempts[i] = attempts.get(i, 0) + 1
                        reason = f"{type(e).__name__}: {str(e)[:300]}"
                        log.warning("entity %s/%s: handler %s failed (attempt %d): %s",
                                    self.kind.name, slot.key, h.name, n, reason)
                        if n > self.retries:
                            skipped[i] = reason
                        failed = True
                        break
                    results[i] = _ACK if r is None else r
                    dirty = dirty or not h.readonly
                if not failed:
                    break
                await self._activate(slot)  # reset from the last durable state, replay
            fired = [tm for (_m, _f, tm) in round_ if tm]
            if self.kind.stateless:
                dirty = False
            rec = None
            if dirty or effects.events or effects.timers_set or effects.timers_cancelled \
                    or effects.delete or dead or fired:
                rec = self._record(slot, ent, effects, dirty, dead, fired)
                newv = await self._commit(rec)
                if newv < 0:
                    self.stats_counters["conflicts"] += 1
                    log.warning("entity %s/%s: version conflict (expected %d, stored %d); reloading",
                                self.kind.name, slot.key, rec.expected_version, -1 - newv)
                    await self._activate(slot)
                    continue
                slot.version = newv
                if effects.delete:
                    slot.entity = None
            break
        else:
            for msg, fut, _ in round_:
                self._answer(fut, self._failure("conflict", "stored version kept moving", slot.key, msg))
            return
        self.stats_counters["rounds"] += 1
        self.stats_counters["messages"] += len(round_)
        self.stats_counters["dead_letters"] += len(dead)
        if dead:
            metrics.DEAD_LETTERS.inc(len(dead), kind=self.kind.name)
        for tm in fired:
            self._inflight_timers.discard(tm)
            self._fired_in_round[tm] = self._timer_round
        self.stats_counters["timers_fired"] += len(fired)
        for kind, key, msg in effects.tells:
            await self._tell(kind, key, msg)
        for (_m, fut, _t), r in zip(round_, results):
            self._answer(fut, r)

    def _record(self, slot, ent, effects: Effects, dirty, dead, fired) -> CommitRecord:
        op = "D" if effects.delete else ("S" if dirty else "K")
        if self.kind.stateless:
            op = "K"
        rec = CommitRecord(
            kind=self.kind.name, key=slot.key, shard=slot.shard,
            expected_version=-1 if self.kind.stateless else slot.version, op=op,
            state=self._encode_state(slot.key, ent.state) if op == "S" else b"",
        )
        rec.events = [event_fields(e) for e in effects.events]
        rec.timers_del = list(fired) + [timer_member(slot.key, n) for n in effects.timers_cancelled]
        rec.timers_set = [
            (timer_member(slot.key, t.name), t.due, encode_message(t.message)) for t in effects.timers_set.values()
        ]
        rec.dead_letters = dead
        return rec

    # -- group commit ---------------------------------------------------------------------
    async def _commit(self, rec: CommitRecord) -> int:
        delay = 0.05
        deadline = time.monotonic() + 120
        while True:
            fut = asyncio.get_running_loop().create_future()
            self._pending.append((rec, fut))
            if self._flush_task is None:
                self._flush_task = self._spawn(self._flusher())
            try:
                return await fut
            except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as e:
                if time.monotonic() > deadline:
                    raise
                log.warning("commit of %s/%s failed (%s); retrying", rec.kind, rec.key, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                try:  # ambiguous: did the failed call commit? single owner -> version tells
                    v, _ = await self.store.load(rec.kind, rec.key)
                except Exception:
                    continue
                if rec.op == "S" and v == rec.expected_version + 1:
                    return v

    async def _commit_many(self, recs: list[CommitRecord]) -> list[int]:
        """Commit many rounds in one call; on a lost connection, find out what landed."""
        out: list[int] = [0] * len(recs)
        todo = list(range(len(recs)))
        delay, deadline = 0.05, time.monotonic() + 120
        while todo:
            try:
                for i, v in zip(todo, await self.store.commit([recs[i] for i in todo])):
                    out[i] = v
                self.stats_counters["commits"] += len(todo)
                self.stats_counters["commit_batches"] += 1
                return out
            except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as e:
                if time.monotonic() > deadline:
                    raise
                log.warning("commit of %d rounds failed (%s); retrying", len(todo), e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                try:
                    rows = await self.store.load_many(self.kind.name, [recs[i].key for i in todo])
                except Exception:
                    continue
                left = []
                for i, (v, _) in zip(todo, rows):  # single owner: the version tells
                    if recs[i].op == "S" and v == recs[i].expected_version + 1:
                        out[i] = v
                    else:
                        left.append(i)
                todo = left
        return out

    async def _flusher(self) -> None:
        try:
            while self._pending:
                await asyncio.sleep(0)  # let every entity of this tick join the batch
                batch, self._pending = self._pending, []
                try:
                    versions = await self.store.commit([r for r, _ in batch])
                except Exception as e:
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(e)
                    continue
                self.stats_counters["commits"] += len(batch)
                self.stats_counters["commit_batches"] += 1
                for (_, f), v in zip(batch, versions):
                    if not f.done():
                        f.set_result(v)
        finally:
            self._flush_task = None

    # -- messages to other entities -----------------------------------------------------------
    def _router_(self):
        if self._router is None:
            from actors.runtime.router import Router

            self._router = Router(self.cfg)
        return self._router

    async def _tell(self, kind: str, key: str, msg: BaseModel) -> None:
        if kind == self.kind.name and self._owns(key):
            self._enqueue(key, msg, None, None)
        else:
            await self._router_().tell(kind, key, msg)

    async def _ask(self, kind: str, key: str, msg: BaseModel, timeout_s: float | None):
        return await self._router_().ask(kind, key, msg, timeout_s=timeout_s)

    # -- timers and passivation ------------------------------------------------------------------
    async def _timer_loop(self) -> None:
        period = self.cfg.runtime.timer_poll_ms / 1000.0
        await self._init_map()
        if self.kind.restart_timers:  # what the previous incarnation may have lost: now
            shards = sorted(self._active) if self._gated else self.my_shards
            try:
                n = await self.store.advance_timers(self.kind.name, shards, self.kind.restart_timers, self._clock())
                if n:
                    log.warning("%s host %d started: %d %s timer(s) fire now", self.kind.name, self.index, n,
                                "/".join(self.kind.restart_timers))
            except Exception as e:
                log.warning("advancing restart timers failed: %s", e)
        while True:
            await asyncio.sleep(period)
            shards = sorted(self._active) if self._gated else self.my_shards
            self._timer_round += 1
            started = self._timer_round
            if self._fired_in_round:  # what this round may still have read is from the last one
                self._fired_in_round = {m: r for m, r in self._fired_in_round.items() if r >= started - 1}
            try:
                due = await self.store.due_timers(self.kind.name, shards, self._clock())
            except Exception as e:
                log.warning("timer poll failed: %s", e)
                continue
            for shard, member, payload in due:
                if member in self._inflight_timers or self._fired_in_round.get(member, -1) >= started:
                    continue  # in flight, or fired and committed while this poll read it
                key, name = split_timer_member(member)
                try:
                    msg = decode_message(payload) if payload else None
                    if msg is None:
                        raise ValueError("timer payload missing")
                except (ValidationError, ValueError, ImportError, AttributeError) as e:
                    log.error("timer %s of %s/%s unreadable: %s; dead-lettered", name, self.kind.name, key, e)
                    await self.redis.xadd("automat:deadletters", {
                        "kind": self.kind.name, "key": key, "type": f"<timer {name}>",
                        "reason": f"timer payload unreadable: {e}", "msg": payload or b"", "at": repr(time.time())})
                    await self.store.drop_timer(self.kind.name, shard, member, payload)  # unless re-armed meanwhile
                    continue
                self._inflight_timers.add(member)
                self._enqueue(key, msg, None, member)

    def _passivate(self, older_than_s: float) -> int:
        now = time.monotonic()
        idle = [k for k, s in self._slots.items()
                if not s.running and not s.queue and now - s.last_used >= older_than_s]
        for k in idle:
            del self._slots[k]
        self.stats_counters["passivations"] += len(idle)
        return len(idle)

    async def _passivation_loop(self) -> None:
        after = self.cfg.runtime.passivate_after_s
        while True:
            await asyncio.sleep(max(0.5, min(after / 2, 30.0)))
            self._passivate(after)


#: the Ray actor class of shard hosts: ``load()`` answers from the "control" concurrency
#: group (its own thread) while the host's event loop is busy with entities
ShardHostActor = ray.remote(concurrency_groups={"control": 2})(ShardHost)
