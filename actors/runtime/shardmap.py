"""Versioned shard maps: which shard host of a kind owns which shard, and moving shards.

Without a stored map a kind uses the static layout ``shard % hosts`` (version 0) — what
every kind had before maps existed, and what a kind that is never rescaled keeps. When
hosts are added or removed (``actors.runtime.autoscaler``), the coordinator
(:func:`rebalance`) writes a versioned map to Redis and moves shards with a handover:

1. **map v+1** with the new owners and ``moving = {shard: old owner}``; every host of the
   kind adopts it (``ShardHost.adopt_map``): the old owner stops accepting the moved
   shards — a message for one is answered ``Failure(code="moved")``, and the router
   re-reads the map and re-sends it — lets what it already accepted finish (commits
   included) and passivates those entities; the new owner *holds* messages for the
   shards (kept in order, not handled yet). ``adopt_map`` returns only when the old
   owner has drained.
2. **map v+2** with ``moving`` empty; the new owner activates the shards and handles the
   held messages first. An entity is therefore never active on two hosts, and no
   message is lost: every message is handled by the old owner, or bounced and re-sent,
   or held by the new one. (Behind this, the store's version check still refuses a
   write from a stale owner: a lost update stays impossible even if a host were wrong.)

If the coordinator dies between the steps, the map in Redis says where it stopped
(``moving`` non-empty) and the next :func:`rebalance` finishes it first. Hosts also poll
the map's version every ``runtime.shardmap_poll_s`` and adopt newer maps themselves.

A map belongs to one Ray cluster (``epoch`` = the Ray session name): a map left in Redis
by an earlier cluster (or another test session sharing the Redis) is ignored — the kind
runs on its static layout there until its own coordinator writes a map.

Layout: ``automat:shardmap:{kind}`` = the map as JSON, ``automat:shardmap:{kind}:v`` = its
version (cheap polling). No personal data: kinds, shard numbers, host indexes.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import BaseModel, Field

log = logging.getLogger("automat.shardmap")

SHARDMAP_PREFIX = "automat:shardmap:"

# compare-and-set: write the map only if the stored version is the expected one
_CAS_LUA = """
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
local stored = redis.call('GET', KEYS[1])
if stored then
  local ok, doc = pcall(cjson.decode, stored)
  if ok and doc['epoch'] ~= ARGV[3] then cur = 0 end
end
if cur ~= tonumber(ARGV[1]) then return -1 - cur end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[4])
return tonumber(ARGV[4])
"""


def map_key(kind: str) -> str:
    return f"{SHARDMAP_PREFIX}{kind}"


def version_key(kind: str) -> str:
    return f"{SHARDMAP_PREFIX}{kind}:v"


def cluster_epoch() -> str:
    """The Ray session this process belongs to ("" outside Ray)."""
    try:
        from ray._private import worker

        node = getattr(worker.global_worker, "node", None)
        return str(node.session_name) if node is not None else ""
    except Exception:  # pragma: no cover - no Ray, or an API change: epochs not checked
        return ""


class ShardMap(BaseModel):
    """Shard -> host index of one kind, at one version."""

    kind: str
    version: int = 0
    epoch: str = ""
    num_shards: int = Field(ge=1)
    hosts: list[int]  # the host indexes of the map (those that may own shards)
    owner: list[int]  # len == num_shards
    moving: dict[int, int] = Field(default_factory=dict)  # shard -> previous owner (handover running)

    # -- construction --------------------------------------------------------------------
    @classmethod
    def static(cls, kind: str, n_hosts: int, num_shards: int) -> "ShardMap":
        return cls(kind=kind, version=0, num_shards=num_shards, hosts=list(range(n_hosts)),
                   owner=[s % n_hosts for s in range(num_shards)])

    @property
    def is_static(self) -> bool:
        return self.version == 0

    # -- queries ----------------------------------------------------------------------------
    def host_of(self, shard: int) -> int:
        return self.owner[shard]

    def shards_of(self, host: int) -> list[int]:
        return [s for s, h in enumerate(self.owner) if h == host]

    def active_of(self, host: int) -> set[int]:
        """Shards ``host`` handles now (owned, not being handed over to it)."""
        return {s for s, h in enumerate(self.owner) if h == host and s not in self.moving}

    def held_of(self, host: int) -> set[int]:
        """Shards handed over to ``host`` whose previous owner may still be draining."""
        return {s for s, h in enumerate(self.owner) if h == host and s in self.moving}

    def counts(self) -> dict[int, int]:
        out = {h: 0 for h in self.hosts}
        for h in self.owner:
            out[h] = out.get(h, 0) + 1
        return out

    # -- planning -----------------------------------------------------------------------------
    def plan(self, new_hosts: list[int]) -> dict[int, tuple[int, int]]:
        """Fewest moves to a balanced layout over ``new_hosts``: ``{shard: (from, to)}``.

        Each host ends with ``num_shards // n`` or one more shard; shards of hosts that
        leave go first, then hosts above their share give their highest shards away.
        """
        hosts = sorted(set(new_hosts))
        if not hosts:
            raise ValueError("a shard map needs at least one host")
        if len(hosts) > self.num_shards:
            raise ValueError(f"{len(hosts)} hosts but only {self.num_shards} shards")
        base, extra = divmod(self.num_shards, len(hosts))
        have: dict[int, list[int]] = {h: [] for h in hosts}
        free: list[int] = []
        for s, h in enumerate(self.owner):
            (have[h] if h in have else free).append(s)
        # hosts holding the most keep the "+1" quota: fewer moves
        order = sorted(hosts, key=lambda h: (-len(have[h]), h))
        target = {h: base + (1 if i < extra else 0) for i, h in enumerate(order)}
        for h in hosts:
            while len(have[h]) > target[h]:
                free.append(have[h].pop())  # the highest shard leaves
        moves: dict[int, tuple[int, int]] = {}
        free.sort()
        for h in sorted(hosts, key=lambda h: len(have[h]) - target[h]):
            while len(have[h]) < target[h]:
                s = free.pop(0)
                have[h].append(s)
                moves[s] = (self.owner[s], h)
        assert not free, free
        return moves

    def moved(self, moves: dict[int, tuple[int, int]], new_hosts: list[int]) -> "ShardMap":
        """The next map: new owners, ``moving`` set for the handover (version + 1)."""
        owner = list(self.owner)
        for s, (_f, t) in moves.items():
            owner[s] = t
        return self.model_copy(update={
            "version": self.version + 1, "hosts": sorted(set(new_hosts)), "owner": owner,
            "moving": {s: f for s, (f, _t) in moves.items()},
        })

    def settled(self) -> "ShardMap":
        """The handover is over: same owners, ``moving`` cleared (version + 1)."""
        return self.model_copy(update={"version": self.version + 1, "moving": {}})


# ---- Redis ---------------------------------------------------------------------------------
def _parse(kind: str, raw: Any, n_hosts: int, num_shards: int, epoch: str) -> ShardMap:
    static = ShardMap.static(kind, n_hosts, num_shards)
    if raw is None:
        return static
    try:
        m = ShardMap.model_validate_json(raw)
    except Exception as e:
        log.error("shard map of %s unreadable (%s); using the static layout", kind, e)
        return static
    if epoch and m.epoch and m.epoch != epoch:
        return static  # written by another Ray cluster: not ours
    if m.num_shards != num_shards or len(m.owner) != num_shards:
        log.error("shard map of %s has %d shards, configuration says %d; using the static layout",
                  kind, m.num_shards, num_shards)
        return static
    return m


async def load_map(redis, kind: str, n_hosts: int, num_shards: int, epoch: str | None = None) -> ShardMap:
    """The current map of ``kind`` (the static layout if none is stored for this cluster)."""
    raw = await redis.get(map_key(kind))
    return _parse(kind, raw, n_hosts, num_shards, cluster_epoch() if epoch is None else epoch)


async def stored_version(redis, kind: str) -> int:
    v = await redis.get(version_key(kind))
    return int(v) if v else 0


async def write_map(redis, new: ShardMap, expected_version: int) -> bool:
    """Store ``new`` if the stored map (of this epoch) is still at ``expected_version``."""
    res = await redis.eval(_CAS_LUA, 2, map_key(new.kind), version_key(new.kind), expected_version,
                           new.model_dump_json(), new.epoch, new.version)
    return int(res) >= 0


async def clear_map(redis, kind: str) -> None:
    """Forget the map: the kind is back on its static layout (only when no host runs)."""
    await redis.delete(map_key(kind), version_key(kind))


def describe(m: ShardMap) -> dict:
    return {"kind": m.kind, "version": m.version, "hosts": m.hosts, "shards_per_host": m.counts(),
            "moving": len(m.moving)}


def dumps(m: ShardMap) -> str:
    return json.dumps(describe(m))
