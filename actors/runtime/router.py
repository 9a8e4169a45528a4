"""Router: addresses entities by (kind, key) and carries messages in batches.

Any process connected to Ray (driver, shard host, HTTP ingress) makes one ``Router``.
Messages are collected per destination host for ``batch_window_ms`` or until
``batch_max`` and sent as one Ray call; at most ``max_inflight_batches`` calls are
outstanding per host (backpressure beyond that). A batch whose host died is re-sent to
the host's next incarnation (at-least-once); within one host's life, the messages of one
sender arrive in the order they were sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

import ray
import redis.asyncio as aioredis
from pydantic import BaseModel
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from actors.runtime.kinds import EntityKind, host_of_shard, shard_of
from protocols.runtime import Failure

log = logging.getLogger("automat.router")

KINDS_KEY = "automat:kinds"


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


class _Lane:
    """Outgoing batches to one shard host."""

    def __init__(self, router: "Router", name: str) -> None:
        self.router = router
        self.name = name
        self.handle = None
        self.buf: list[tuple[str, BaseModel]] = []
        self.futs: list[asyncio.Future | None] = []
        self.timer: asyncio.TimerHandle | None = None
        self.queue: asyncio.Queue = asyncio.Queue()
        self.sem = asyncio.Semaphore(router.max_inflight)
        self.sender = asyncio.get_running_loop().create_task(self._send_loop())
        self.waiters: set[asyncio.Task] = set()
        self.resend_lock = asyncio.Lock()
        self.outstanding = 0  # batches flushed but not yet answered

    def put(self, key: str, msg: BaseModel, fut) -> None:
        self.buf.append((key, msg))
        self.futs.append(fut)
        if len(self.buf) >= self.router.batch_max:
            self.flush()
        elif self.timer is None:
            # idle lane: go now (low latency); busy lane: wait the window (big batches)
            if self.router.window <= 0 or self.outstanding == 0:
                self.timer = asyncio.get_running_loop().call_soon(self.flush)
            else:
                self.timer = asyncio.get_running_loop().call_later(self.router.window, self.flush)

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
            await self.sem.acquire()
            try:
                handle = await self._handle()
                ref = handle.deliver.remote(batch)
            except Exception as e:
                ref = e
            t = asyncio.get_running_loop().create_task(self._await(ref, batch, futs))
            self.waiters.add(t)
            t.add_done_callback(self.waiters.discard)

    async def _await(self, ref, batch, futs) -> None:
        try:
            if isinstance(ref, Exception):
                raise ref
            results = await ref
        except (ActorDiedError, ActorUnavailableError, RayActorError, HostNotFound) as e:
            self.sem.release()
            results = await self._resend(batch, e)
        except Exception as e:  # serialization and the like: answer every caller
            self.sem.release()
            log.exception("batch to %s failed", self.name)
            results = [Failure(code="unavailable", reason=f"{type(e).__name__}: {e}", kind="?", key=k,
                               message_type=type(m).__name__) for k, m in batch]
        else:
            self.sem.release()
        self.router.sent += len(batch)
        self.outstanding -= 1
        for fut, r in zip(futs, results):
            if fut is not None and not fut.done():
                fut.set_result(r)

    async def _resend(self, batch, first_error) -> list:
        async with self.resend_lock:
            deadline = time.monotonic() + self.router.resend_deadline_s
            delay = 0.05
            err = first_error
            while time.monotonic() < deadline:
                self.handle = None
                log.warning("host %s unreachable (%s: %s); re-sending %d messages", self.name,
                            type(err).__name__, str(err)[:200], len(batch))
                try:
                    handle = await self._handle()
                    return await handle.deliver.remote(batch)
                except (ActorDiedError, ActorUnavailableError, RayActorError, HostNotFound) as e:
                    err = e
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            return [Failure(code="unavailable", reason=f"host {self.name} unreachable: {err}", kind="?", key=k,
                            message_type=type(m).__name__) for k, m in batch]


class Router:
    """Send to entities: ``await tell(kind, key, msg)``, ``await ask(...)``."""

    def __init__(self, cfg, *, resolver: Callable[[str], Awaitable[Any]] | None = None,
                 kinds: list[EntityKind] | None = None) -> None:
        self.cfg = cfg
        rt = cfg.runtime
        self.num_shards = rt.num_shards
        self.window = rt.batch_window_ms / 1000.0
        self.batch_max = rt.batch_max
        self.max_inflight = rt.max_inflight_batches
        self.ask_timeout = rt.ask_timeout_s
        self.resend_deadline_s = 60.0
        self.resolve = resolver or default_resolver(rt.namespace)
        self._kinds: dict[str, EntityKind] = {k.name: k for k in (kinds or [])}
        self._lanes: dict[str, _Lane] = {}
        self._redis = None
        self.sent = 0

    async def kind(self, name: str) -> EntityKind:
        k = self._kinds.get(name)
        if k is None:
            if self._redis is None:
                self._redis = aioredis.from_url(self.cfg.redis.url)
            raw = await self._redis.hget(KINDS_KEY, name)
            if raw is None:
                raise KeyError(f"unknown entity kind {name!r} (not registered)")
            k = self._kinds[name] = EntityKind.model_validate_json(raw)
        return k

    async def _lane(self, kind: str, key: str) -> _Lane:
        k = await self.kind(kind)
        idx = host_of_shard(shard_of(key, self.num_shards), k.host_count(self.cfg))
        name = k.host_name(idx)
        lane = self._lanes.get(name)
        if lane is None:
            lane = self._lanes[name] = _Lane(self, name)
        return lane

    async def tell(self, kind: str, key: str, msg: BaseModel) -> None:
        """One-way: returns once queued; delivered at least once."""
        (await self._lane(kind, key)).put(key, msg, None)

    async def send(self, kind: str, key: str, msg: BaseModel) -> asyncio.Future:
        """Queue a message and get a future of its reply (no timeout)."""
        fut = asyncio.get_running_loop().create_future()
        (await self._lane(kind, key)).put(key, msg, fut)
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

    def flush(self) -> None:
        for lane in self._lanes.values():
            lane.flush()

    async def drain(self) -> None:
        """Wait until everything queued so far was delivered."""
        self.flush()
        for lane in list(self._lanes.values()):
            while lane.outstanding or lane.buf:
                await asyncio.sleep(0.001)
                lane.flush()

    async def close(self) -> None:
        await self.drain()
        for lane in self._lanes.values():
            lane.sender.cancel()
        if self._redis is not None:
            await self._redis.aclose()
