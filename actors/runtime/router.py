"""Router: addresses entities by (kind, key) and carries messages in batches.

Any process connected to Ray (driver, shard host, HTTP ingress) makes one ``Router``.
Messages are collected per destination host and sent as one Ray call; at most
``max_inflight_batches`` calls are outstanding per host (backpressure beyond that). A
message to an idle lane (nothing outstanding) goes at once; on a busy lane it waits the
*batch window* for company, or until ``batch_max``. The window follows the lane's
traffic (``BatchWindow``): a lane that carried ``batch_full_rate`` messages or more in
the last second waits the whole ``batch_window_ms``, a quieter one proportionally less -
under load a Ray call costs CPU on both sides whatever it carries, so big batches buy
throughput; at low load the CPU is free and the window would be only latency.

A batch whose host died is re-sent to the host's next incarnation (at-least-once);
within one host's life, the messages of one sender arrive in the order they were sent:
each lane numbers its batches, and the host lets a batch that Ray started early wait for
its predecessors (``ShardHost.deliver``).

Which host: the kind's shard map (``actors.runtime.shardmap``; the static layout
``shard % hosts`` when none is stored). A host that no longer owns a shard answers
``Failure("moved")``; the router then re-reads the map and re-sends the message to the new
owner (also when the old host is gone for good), so a rebalance loses nothing.

Order across a move: when the router learns a new map, messages not yet sent to a
shard's old host are taken back and sent to the new one in order, and while batches to
the old host are still out, newer messages for the moved shards wait (a *fence*) — the
old host's answers come first (what it bounced is re-sent first), then the waiting ones.
So one sender's messages to one entity stay in order through a rebalance too.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from typing import Any, Awaitable, Callable

import ray
import redis.asyncio as aioredis
from pydantic import BaseModel
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from actors.runtime.kinds import EntityKind, shard_of
from actors.runtime.shardmap import ShardMap, cluster_epoch, load_map
from protocols.runtime import Failure

log = logging.getLogger("automat.router")

KINDS_KEY = "automat:kinds"
_REROUTED = object()  # a message handed to another lane (its future is answered there)


class _Fence:
    """A moved shard's messages wait here until the old host answered every batch
    that was out to it (``waiting`` batch ids); then: what it bounced, then ``pending``."""

    __slots__ = ("waiting", "bounced", "pending", "tries", "since")

    def __init__(self) -> None:
        self.waiting: set[int] = set()
        self.bounced: dict[int, list] = {}
        self.pending: list = []
        self.tries = 0
        self.since = time.monotonic()


class HostNotFound(Exception):
    """No live incarnation of a shard host under that name (yet)."""


class EntityError(Exception):
    """An ask was answered with a Failure."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(f"{failure.code}: {failure.reason} ({failure.kind}/{failure.message_type})")
        self.failure = failure


async def register_kinds(redis, kinds: list[EntityKind]) -> None:
    """Publish the kinds so every router in the cluster can address them."""
    if kinds:
        await redis.hset(KINDS_KEY, mapping={k.name: k.model_dump_json() for k in kinds})


def default_resolver(namespace: str) -> Callable[[str], Awaitable[Any]]:
    """Plain named host first (unsupervised), else the supervised incarnation."""

    async def resolve(name: str):
        try:
            return ray.get_actor(name, namespace=namespace)
        except ValueError:
            pass
        from supervisors.resolve import resolve_async

        try:
            return await resolve_async(name, namespace=namespace, timeout_s=2.0)
        except LookupError as e:
            raise HostNotFound(str(e)) from None

    return resolve


class BatchWindow:
    """How long a message on a busy lane waits for company: ``max_s`` scaled by the
    lane's traffic of the last full second against ``full_rate`` messages/s.

    Measured (6,000 KIM mails, throughput mode, 2 cores; docs/loadtest/README.md): a
    fixed 2 ms window gave batches of ~3.6 messages; 2 ms -> scaled 50 ms, runs
    alternated: 51 -> 69 mails/s, shard hosts' CPU 181 -> 132 s. At the rate-mode peak
    (7 mails/s, lanes at ~10 messages/s) a fixed 50 ms put the p99 from 248 up to 302
    ms; scaled, such a lane waits ~1/5 of it (p99 203-238 ms)."""

    __slots__ = ("max_s", "full_rate", "_second", "_count", "rate")

    def __init__(self, max_s: float, full_rate: float) -> None:
        self.max_s = max(0.0, max_s)
        self.full_rate = max(1e-9, full_rate)
        self._second = -1  # the current whole second (monotonic clock)
        self._count = 0  # messages put in it
        self.rate = 0.0  # messages in the last full second

    def note(self, now: float) -> None:
        """One message put on the lane at ``now`` (monotonic seconds)."""
        sec = int(now)
        if sec != self._second:
            self.rate = float(self._count) if sec == self._second + 1 else 0.0
            self._second, self._count = sec, 0
        self._count += 1

    def current(self) -> float:
        """The window in seconds for a message put now."""
        return self.max_s * min(1.0, self.rate / self.full_rate)


class _Lane:
    """Outgoing batches to one shard host."""

    def __init__(self, router: "Router", name: str, kind: str) -> None:
        self.router = router
        self.name = name
        self.kind = kind
        self.handle = None
        self.buf: list[tuple[str, BaseModel]] = []
        self.futs: list[asyncio.Future | None] = []
        self.window = BatchWindow(router.window, router.full_rate)
        self.timer: asyncio.TimerHandle | None = None
        self.queue: asyncio.Queue = asyncio.Queue()
        self.sem = asyncio.Semaphore(router.max_inflight)
        self.sender = asyncio.get_running_loop().create_task(self._send_loop())
        self.waiters: set[asyncio.Task] = set()
        self.resend_lock = asyncio.Lock()
        self.outstanding = 0  # batches flushed but not yet answered
        self.inflight: dict[int, list] = {}  # batch id -> batch, taken from the queue, not answered
        self.seq = 0  # the next batch's sequence number on this lane
        self.open: set[int] = set()  # sequence numbers sent to the host and not answered

    def put(self, key: str, msg: BaseModel, fut) -> None:
        self.buf.append((key, msg))
        self.futs.append(fut)
        loop = asyncio.get_running_loop()
        self.window.note(loop.time())
        if len(self.buf) >= self.router.batch_max:
            self.flush()
        elif self.timer is None:
            # idle lane: go now (low latency); busy lane: wait the window (big batches).
            # (Flushing early when the lane goes idle was measured and is worse: in
            # throughput mode lanes go idle often, and the batches shrank back to ~3.)
            wait = self.window.current()
            if wait <= 0 or self.outstanding == 0:
                self.timer = loop.call_soon(self.flush)
            else:
                self.timer = loop.call_later(wait, self.flush)

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.buf:
            self.outstanding += 1
            self.queue.put_nowait((self.buf, self.futs))
            self.buf, self.futs = [], []

    async def _handle(self):
        if self.handle is None:
            try:
                self.handle = await self.router.resolve(self.name)
            except ValueError as e:  # ray.get_actor: no such name
                raise HostNotFound(str(e)) from None
        return self.handle

    async def _send_loop(self) -> None:
        while True:
            batch, futs = await self.queue.get()
            if not batch:  # every message was taken back by a map change
                self.outstanding -= 1
                continue
            bid = next(self.router._bids)
            self.inflight[bid] = batch  # from here on, a map change fences instead of taking back
            await self.sem.acquire()
            seq = None
            try:
                handle = await self._handle()
                seq, self.seq = self.seq, self.seq + 1
                self.open.add(seq)
                ref = handle.deliver.remote(batch, (self.router.sender_id, seq, min(self.open)))
            except Exception as e:
                ref = e
            t = asyncio.get_running_loop().create_task(self._await(ref, batch, futs, bid, seq))
            self.waiters.add(t)
            t.add_done_callback(self.waiters.discard)

    async def _await(self, ref, batch, futs, bid: int, seq: int | None) -> None:
        try:
            if isinstance(ref, Exception):
                raise ref
            results = await ref
        except (ActorDiedError, ActorUnavailableError, RayActorError, HostNotFound) as e:
            self.sem.release()
            self.open.discard(seq)  # re-sent unnumbered: later batches must not wait for it
            results = await self._resend(batch, futs, e)
        except Exception as e:  # serialization and the like: answer every caller
            self.open.discard(seq)
            self.sem.release()
            log.exception("batch to %s failed", self.name)
            results = [Failure(code="unavailable", reason=f"{type(e).__name__}: {e}", kind="?", key=k,
                               message_type=type(m).__name__) for k, m in batch]
        else:
            self.open.discard(seq)
            self.sem.release()
        self.router.sent += len(batch)
        bounced = []
        for (key, msg), fut, r in zip(batch, futs, results):
            if r is _REROUTED:
                continue
            if isinstance(r, Failure) and r.code == "moved":  # handed over: re-read the map, re-send
                bounced.append((key, msg, fut))
                continue
            if fut is not None and not fut.done():
                fut.set_result(r)
        try:
            if bounced:  # learn the new map first: this batch is still out, so it is fenced
                await self.router.refresh_map(self.kind)
        except Exception as e:
            log.warning("map refresh for %s failed: %s", self.kind, e)
        finally:
            self.inflight.pop(bid, None)
            self.router._batch_done(self.kind, self.name, bid, bounced)
            self.outstanding -= 1

    async def _resend(self, batch, futs, first_error) -> list:
        async with self.resend_lock:
            deadline = time.monotonic() + self.router.resend_deadline_s
            delay = 0.05
            err = first_error
            results: list = [_REROUTED] * len(batch)
            mine = list(range(len(batch)))
            while time.monotonic() < deadline:
                self.handle = None
                # the host may be gone for good (removed by a rebalance): follow the map
                try:
                    await self.router.refresh_map(self.kind)
                    keep, move = [], []
                    for i in mine:
                        (keep if await self.router._lane_name(self.kind, batch[i][0]) == self.name else move).append(i)
                    if move:
                        for i in move:
                            key, msg = batch[i]
                            await self.router._put(self.kind, key, msg, futs[i])
                        mine = keep
                        if not mine:
                            return results
                except Exception as e:  # no map now: keep trying this host
                    log.debug("map refresh for %s failed: %s", self.kind, e)
                log.warning("host %s unreachable (%s: %s); re-sending %d messages", self.name,
                            type(err).__name__, str(err)[:200], len(mine))
                try:
                    handle = await self._handle()
                    sub = [batch[i] for i in mine]
                    for i, r in zip(mine, await handle.deliver.remote(sub)):
                        results[i] = r
                    return results
                except (ActorDiedError, ActorUnavailableError, RayActorError, HostNotFound) as e:
                    err = e
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            for i in mine:
                k, m = batch[i]
                results[i] = Failure(code="unavailable", reason=f"host {self.name} unreachable: {err}", kind="?",
                                     key=k, message_type=type(m).__name__)
            return results


class Router:
    """Send to entities: ``await tell(kind, key, msg)``, ``await ask(...)``."""

    def __init__(self, cfg, *, resolver: Callable[[str], Awaitable[Any]] | None = None,
                 kinds: list[EntityKind] | None = None) -> None:
        self.cfg = cfg
        rt = cfg.runtime
        self.num_shards = rt.num_shards
        self.window = rt.batch_window_ms / 1000.0  # the most a message waits on a busy lane
        self.full_rate = rt.batch_full_rate  # messages/s at which a lane waits all of it
        self.batch_max = rt.batch_max
        self.max_inflight = rt.max_inflight_batches
        self.ask_timeout = rt.ask_timeout_s
        self.resend_deadline_s = 60.0
        self.resolve = resolver or default_resolver(rt.namespace)
        self._kinds: dict[str, EntityKind] = {k.name: k for k in (kinds or [])}
        self._lanes: dict[str, _Lane] = {}
        self._redis = None
        self.sent = 0
        self.rerouted = 0
        self._maps: dict[str, ShardMap] = {}
        self._map_loads: dict[str, asyncio.Future] = {}
        self._epoch = cluster_epoch()
        self._tasks: set[asyncio.Task] = set()
        self._fences: dict[str, dict[int, _Fence]] = {}
        self._bids = itertools.count()
        self.sender_id = uuid.uuid4().hex[:16]  # numbers this router's batches per host

    def _r(self):
        if self._redis is None:
            self._redis = aioredis.from_url(self.cfg.redis.url)
        return self._redis

    async def kind(self, name: str) -> EntityKind:
        k = self._kinds.get(name)
        if k is None:
            raw = await self._r().hget(KINDS_KEY, name)
            if raw is None:
                raise KeyError(f"unknown entity kind {name!r} (not registered)")
            k = self._kinds[name] = EntityKind.model_validate_json(raw)
        return k

    async def shard_map(self, kind: str) -> ShardMap:
        m = self._maps.get(kind)
        if m is None:
            m = await self.refresh_map(kind)
        return m

    async def refresh_map(self, kind: str) -> ShardMap:
        """Re-read the kind's shard map (concurrent callers share one read)."""
        fut = self._map_loads.get(kind)
        if fut is None:
            fut = self._map_loads[kind] = asyncio.get_running_loop().create_future()
            try:
                k = await self.kind(kind)
                try:
                    m = await load_map(self._r(), kind, k.host_count(self.cfg), self.num_shards, self._epoch)
                except Exception as e:  # no Redis now: the static layout (hosts bounce if wrong)
                    log.warning("shard map of %s not readable (%s); static layout", kind, e)
                    m = self._maps.get(kind) or ShardMap.static(kind, k.host_count(self.cfg), self.num_shards)
                old = self._maps.get(kind)
                if old is not None and m.version > old.version:
                    self._install_map(kind, old, m)
                elif old is None or m.version >= old.version or m.is_static:
                    self._maps[kind] = m
                fut.set_result(self._maps[kind])
            except BaseException as e:
                fut.set_exception(e)
                fut.exception()  # retrieved: no "never retrieved" warning when nobody else waits
                raise
            finally:
                del self._map_loads[kind]
        return await asyncio.shield(fut)

    def _install_map(self, kind: str, old: ShardMap, new: ShardMap) -> None:
        """A newer map: take unsent messages of moved shards back (in order), fence moved
        shards that still have batches out to their old host."""
        moved = {s for s in range(self.num_shards) if old.owner[s] != new.owner[s]}
        self._maps[kind] = new
        if not moved:
            return
        fences = self._fences.setdefault(kind, {})
        taken: dict[int, list] = {}
        prefix = f"{kind}.host."
        for lane in self._lanes.values():
            if not lane.name.startswith(prefix):
                continue
            for bid, batch in lane.inflight.items():
                for s in {shard_of(k, self.num_shards) for k, _ in batch} & moved:
                    fences.setdefault(s, _Fence()).waiting.add(bid)
            # unsent: queued batches (oldest first), then the open buffer
            kept_q = []
            for batch, futs in list(lane.queue._queue):
                kb, kf = [], []
                for (k, m), f in zip(batch, futs):
                    sh = shard_of(k, self.num_shards)
                    if sh in moved:
                        taken.setdefault(sh, []).append((k, m, f))
                    else:
                        kb.append((k, m))
                        kf.append(f)
                kept_q.append((kb, kf))
            lane.queue._queue.clear()
            lane.queue._queue.extend(kept_q)
            kb, kf = [], []
            for (k, m), f in zip(lane.buf, lane.futs):
                sh = shard_of(k, self.num_shards)
                if sh in moved:
                    taken.setdefault(sh, []).append((k, m, f))
                else:
                    kb.append((k, m))
                    kf.append(f)
            lane.buf, lane.futs = kb, kf
        for s, items in taken.items():
            fence = fences.get(s)
            if fence is not None:
                fence.pending[:0] = items
            else:
                for k, m, f in items:
                    self._put_now(kind, new, k, m, f)
        for s in [s for s, f in fences.items() if not f.waiting]:
            self._release(kind, s)
        if not fences:
            self._fences.pop(kind, None)

    def _batch_done(self, kind: str, lane: str, bid: int, bounced: list) -> None:
        """A batch was answered: settle its fences; re-send what it bounced."""
        fences = self._fences.get(kind)
        rest = bounced
        if fences:
            rest = []
            by_shard: dict[int, list] = {}
            for it in bounced:
                by_shard.setdefault(shard_of(it[0], self.num_shards), []).append(it)
            for s, its in by_shard.items():
                f = fences.get(s)
                if f is not None and bid in f.waiting:
                    f.bounced[bid] = its
                else:
                    rest.extend(its)
            for s in [s for s, f in fences.items() if bid in f.waiting]:
                fences[s].waiting.discard(bid)
                if not fences[s].waiting:
                    self._release(kind, s)
            if not fences:
                self._fences.pop(kind, None)
        if rest:
            self.rerouted += len(rest)
            m = self._maps[kind]
            by_shard: dict[int, list] = {}
            for it in rest:
                by_shard.setdefault(shard_of(it[0], self.num_shards), []).append(it)
            for s, its in by_shard.items():
                fences = self._fences.setdefault(kind, {})
                f = fences.get(s)
                if f"{kind}.host.{m.owner[s]}" != lane:  # the map knows the new owner
                    if f is not None:
                        f.pending[:0] = its  # older than what waits there
                    else:
                        for k, msg, fut in its:
                            self._put_now(kind, m, k, msg, fut)
                    continue
                # the host is ahead of the map we read (or behind it): ask again after a
                # pause; newer messages for the shard wait behind these (order)
                if f is None:
                    f = fences[s] = _Fence()
                f.bounced.setdefault(bid, []).extend(its)
                tok = next(self._bids)
                f.waiting.add(tok)
                delay = min(0.5, 0.01 * (2 ** min(f.tries, 6)))
                f.tries += 1
                t = asyncio.get_running_loop().create_task(self._retry_fence(kind, s, f, tok, delay))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)
            if not self._fences.get(kind):
                self._fences.pop(kind, None)

    async def _retry_fence(self, kind: str, s: int, f: _Fence, tok: int, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self.refresh_map(kind)
        except Exception as e:
            log.warning("map refresh for %s failed: %s", kind, e)
        if time.monotonic() - f.since > 30 and f.tries % 20 == 0:
            log.error("%s shard %d: hosts keep answering 'moved' for %.0f s; messages wait", kind, s,
                      time.monotonic() - f.since)
        f.waiting.discard(tok)
        fences = self._fences.get(kind)
        if fences is not None and fences.get(s) is f and not f.waiting:
            self._release(kind, s)
            if not fences:
                self._fences.pop(kind, None)

    def _release(self, kind: str, s: int) -> None:
        f = self._fences[kind].pop(s)
        items = [it for bid in sorted(f.bounced) for it in f.bounced[bid]] + f.pending
        self.rerouted += sum(len(v) for v in f.bounced.values())
        m = self._maps[kind]
        for k, msg, fut in items:
            self._put_now(kind, m, k, msg, fut)

    def _put_now(self, kind: str, m: ShardMap, key: str, msg: BaseModel, fut) -> None:
        s = shard_of(key, self.num_shards)
        fences = self._fences.get(kind)
        if fences and s in fences:
            fences[s].pending.append((key, msg, fut))
            return
        name = f"{kind}.host.{m.owner[s]}"
        lane = self._lanes.get(name)
        if lane is None:
            lane = self._lanes[name] = _Lane(self, name, kind)
        lane.put(key, msg, fut)

    async def _put(self, kind: str, key: str, msg: BaseModel, fut) -> None:
        m = self._maps.get(kind) or await self.shard_map(kind)
        self._put_now(kind, m, key, msg, fut)

    async def _lane_name(self, kind: str, key: str) -> str:
        m = self._maps.get(kind) or await self.shard_map(kind)
        return f"{kind}.host.{m.owner[shard_of(key, self.num_shards)]}"

    async def tell(self, kind: str, key: str, msg: BaseModel) -> None:
        """One-way: returns once queued; delivered at least once."""
        await self._put(kind, key, msg, None)

    async def send(self, kind: str, key: str, msg: BaseModel) -> asyncio.Future:
        """Queue a message and get a future of its reply (no timeout)."""
        fut = asyncio.get_running_loop().create_future()
        await self._put(kind, key, msg, fut)
        return fut

    async def ask(self, kind: str, key: str, msg: BaseModel, *, timeout_s: float | None = None,
                  raise_failure: bool = True) -> Any:
        """Request/reply. A ``Failure`` reply raises ``EntityError`` (unless told not to)."""
        fut = await self.send(kind, key, msg)
        try:
            r = await asyncio.wait_for(fut, timeout_s or self.ask_timeout)
        except asyncio.TimeoutError:
            r = Failure(code="timeout", reason=f"no reply in {timeout_s or self.ask_timeout}s", kind=kind,
                        key=key, message_type=type(msg).__name__)
        if raise_failure and isinstance(r, Failure):
            raise EntityError(r)
        return r

    async def warm(self, kind: str, *, timeout_s: float = 10.0) -> int:
        """Open the lanes to every host of ``kind`` before the first message
        (*Aufwärmen*): resolve each owner's handle and call it once. On a fresh cluster
        the first message otherwise pays the name lookup and the connection set-up -
        100-400 ms, the whole p99 budget of a mail. Returns the hosts that answered;
        a host that does not (yet) is resolved again by the first message to it."""
        m = await self.shard_map(kind)
        names = sorted({f"{kind}.host.{o}" for o in m.owner})

        async def one(name: str) -> None:
            lane = self._lanes.get(name)
            if lane is None:
                lane = self._lanes[name] = _Lane(self, name, kind)
            handle = await lane._handle()
            await asyncio.wait_for(handle.pid.remote(), timeout_s)

        done = await asyncio.gather(*(one(n) for n in names), return_exceptions=True)
        for n, r in zip(names, done):
            if isinstance(r, BaseException):
                log.debug("warm-up: %s did not answer (%s)", n, type(r).__name__)
        return sum(1 for r in done if not isinstance(r, BaseException))

    def flush(self) -> None:
        for lane in self._lanes.values():
            lane.flush()

    async def drain(self) -> None:
        """Wait until everything queued so far was delivered (re-routed messages included)."""
        while True:
            self.flush()
            for lane in list(self._lanes.values()):
                while lane.outstanding or lane.buf:
                    await asyncio.sleep(0.001)
                    lane.flush()
            if not self._tasks and not self._fences and \
                    not any(la.outstanding or la.buf for la in self._lanes.values()):
                return
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        await self.drain()
        for lane in self._lanes.values():
            lane.sender.cancel()
        for t in list(self._tasks):
            t.cancel()
        if self._redis is not None:
            await self._redis.aclose()
