"""Moving shards between the hosts of a kind: the handover coordinator.

``await rebalance(cfg, redis, kind, new_hosts)`` brings the kind's shard map to a balanced
layout over ``new_hosts`` (the hosts must be running; a host that leaves may be stopped
afterwards). The protocol and why it loses nothing: ``actors.runtime.shardmap``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from actors.runtime import metrics
from actors.runtime.kinds import EntityKind
from actors.runtime.shardmap import ShardMap, cluster_epoch, load_map, write_map

log = logging.getLogger("automat.rebalance")


class RebalanceError(RuntimeError):
    """The map changed underneath (another coordinator) or a host could not take part."""


def default_host_resolver(namespace: str, timeout_s: float = 10.0) -> Callable[[str], Awaitable[Any]]:
    """Handle of a host (plain named, or the serving incarnation of a supervised one);
    None when none serves within ``timeout_s`` (gone: nothing can be active there)."""
    import ray

    from supervisors.resolve import resolve_async

    async def resolve(name: str):
        try:
            return ray.get_actor(name, namespace=namespace)
        except ValueError:
            pass
        try:
            return await resolve_async(name, namespace=namespace, timeout_s=timeout_s)
        except LookupError:
            return None

    return resolve


async def _adopt(resolve, name: str, m: ShardMap, timeout_s: float) -> dict:
    """Tell one host the map; ``{"gone": True}`` if it does not exist (nothing active there)."""
    raw = m.model_dump_json()
    deadline = time.monotonic() + timeout_s
    while True:
        handle = await resolve(name)
        if handle is None:
            return {"host": name, "gone": True}
        try:
            return await asyncio.wait_for(handle.adopt_map.remote(raw), max(1.0, deadline - time.monotonic()))
        except ActorUnavailableError:  # transient: ask again
            pass
        except (ActorDiedError, RayActorError):
            # died meanwhile: its next incarnation reads the (already written) map at start
            return {"host": name, "gone": True}
        if time.monotonic() > deadline:
            raise RebalanceError(f"{name} did not adopt map v{m.version} in {timeout_s:g} s")
        await asyncio.sleep(0.1)


async def _adopt_all(resolve, kind: EntityKind, m: ShardMap, hosts: set[int], timeout_s: float) -> list[dict]:
    return list(await asyncio.gather(*(_adopt(resolve, kind.host_name(i), m, timeout_s) for i in sorted(hosts))))


async def rebalance(cfg, redis, kind: EntityKind, new_hosts: list[int], *,
                    resolve: Callable[[str], Awaitable[Any]] | None = None) -> dict:
    """Hand shards over so that ``new_hosts`` share them evenly. Returns a report:
    versions, shards moved, per-host drain results, duration."""
    resolve = resolve or default_host_resolver(cfg.runtime.namespace)
    epoch = cluster_epoch()
    t0 = time.monotonic()
    timeout = cfg.runtime.handover_drain_s + 15.0
    m = await load_map(redis, kind.name, kind.host_count(cfg), cfg.runtime.num_shards, epoch)
    report: dict[str, Any] = {"kind": kind.name, "from_version": m.version, "from_hosts": list(m.hosts),
                              "to_hosts": sorted(set(new_hosts)), "moved": 0, "resumed": False}
    if m.moving:  # an earlier handover was interrupted (coordinator died): finish it first
        involved = set(m.hosts) | set(m.moving.values())
        await _adopt_all(resolve, kind, m, involved, timeout)
        done = m.settled()
        if not await write_map(redis, done, m.version):
            raise RebalanceError(f"shard map of {kind.name} changed underneath (v{m.version})")
        await _adopt_all(resolve, kind, done, involved, timeout)
        report["resumed"] = True
        m = done
    moves = m.plan(new_hosts)
    if not moves and sorted(set(new_hosts)) == m.hosts:
        report.update(to_version=m.version, seconds=round(time.monotonic() - t0, 3))
        return report
    nxt = m.moved(moves, new_hosts).model_copy(update={"epoch": epoch})
    if not await write_map(redis, nxt, m.version):
        raise RebalanceError(f"shard map of {kind.name} changed underneath (v{m.version})")
    involved = set(m.hosts) | set(nxt.hosts)
    # 1) old owners stop taking the moved shards and drain them; new owners hold them
    drained = await _adopt_all(resolve, kind, nxt, involved, timeout)
    t1 = time.monotonic()
    # 2) settled: the new owners activate (held messages first)
    fin = nxt.settled()
    if not await write_map(redis, fin, nxt.version):
        raise RebalanceError(f"shard map of {kind.name} changed underneath (v{nxt.version})")
    await _adopt_all(resolve, kind, fin, involved, timeout)
    dt = time.monotonic() - t0
    if moves:
        metrics.SHARD_MOVES.inc(len(moves), kind=kind.name)
    metrics.HANDOVER_SECONDS.observe(dt, kind=kind.name)
    report.update(
        to_version=fin.version, moved=len(moves), seconds=round(dt, 3), drain_s=round(t1 - t0, 3),
        passivated=sum(d.get("passivated", 0) for d in drained),
        busy=sum(d.get("busy", 0) for d in drained),
        gone=[d["host"] for d in drained if d.get("gone")],
    )
    log.warning("rebalanced %s: hosts %s -> %s, %d shards moved in %.2f s (map v%d)", kind.name,
                report["from_hosts"], report["to_hosts"], len(moves), dt, fin.version)
    return report
