"""Durable entity state in Redis: versioned writes, committed with their effects.

Layout (no personal data in keys: callers pass pseudonymous entity keys):

- ``automat:e:{kind}:{key}``       hash ``v`` (version), ``s`` (state bytes, encrypted
                                   for personal-data kinds)
- ``automat:t:{kind}:{shard}``     zset of durable timers, score = due time
- ``automat:tp:{kind}:{shard}``    hash member -> timer message
- ``automat:outbox``               stream of boundary events (relayed to Kafka)
- ``automat:deadletters``          stream of messages that could not be handled
- ``automat:q:{kind}:{key}``       quarantined state that could not be read

One Lua script commits a whole batch of entity rounds in a single round trip (group
commit). Per record it checks the expected version first (compare-and-set: a lost update
is impossible), then writes the state, appends the events to the outbox, applies timer
changes and dead letters — all or nothing for that record.
"""

from __future__ import annotations

import importlib

import msgpack
import json
import time
from dataclasses import dataclass, field

from pydantic import BaseModel

OUTBOX_STREAM = "automat:outbox"
DEADLETTER_STREAM = "automat:deadletters"


def state_key(kind: str, key: str) -> str:
    return f"automat:e:{kind}:{key}"


def timer_zset(kind: str, shard: int) -> str:
    return f"automat:t:{kind}:{shard}"


def timer_payloads(kind: str, shard: int) -> str:
    return f"automat:tp:{kind}:{shard}"


def quarantine_key(kind: str, key: str) -> str:
    return f"automat:q:{kind}:{key}"


def timer_member(key: str, name: str) -> str:
    return f"{key}\x1f{name}"


def split_timer_member(member: str) -> tuple[str, str]:
    key, _, name = member.partition("\x1f")
    return key, name


def encode_message(msg: BaseModel) -> bytes:
    cls = type(msg)
    return f"{cls.__module__}:{cls.__qualname__}\n".encode() + msg.model_dump_json().encode()


def decode_message(raw: bytes) -> BaseModel:
    head, _, body = raw.partition(b"\n")
    module, _, qual = head.decode().partition(":")
    obj = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj.model_validate_json(body)  # type: ignore[union-attr]


@dataclass
class CommitRecord:
    """Everything one entity round wants made durable, atomically."""

    kind: str
    key: str
    shard: int
    expected_version: int
    op: str  # "S" set state, "K" keep state (version check only), "D" delete
    state: bytes = b""
    events: list[tuple[str, str, str, str, bytes]] = field(default_factory=list)  # id, topic, type, key, payload
    timers_set: list[tuple[str, float, bytes]] = field(default_factory=list)  # member, due, payload
    timers_del: list[str] = field(default_factory=list)
    dead_letters: list[tuple[str, str, str]] = field(default_factory=list)  # type, reason, encoded msg


_DROP_TIMER_LUA = """
local cur = redis.call('HGET', KEYS[2], ARGV[1])
if ARGV[3] == '1' and cur ~= ARGV[2] then return 0 end
if ARGV[3] == '2' and cur then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1]); redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""

_ADVANCE_TIMERS_LUA = """
local n = 0
local now = tonumber(ARGV[1])
for i = 2, #ARGV do
  local suffix = ARGV[i]
  for _, zkey in ipairs(KEYS) do
    local ms = redis.call('ZRANGEBYSCORE', zkey, now, '+inf')
    for _, m in ipairs(ms) do
      if string.sub(m, -#suffix) == suffix then
        redis.call('ZADD', zkey, 'XX', now, m); n = n + 1
      end
    end
  end
end
return n
"""

# due timers of many shards in one round trip: KEYS = zset1, payloads1, zset2, payloads2, ...;
# ARGV = now, limit. Returns a flat list [shard index, member, payload, ...] (the index
# into the shard list). Membership and payload are read together (one script is atomic).
_DUE_TIMERS_LUA = """
local out = {}
for i = 1, #KEYS, 2 do
  local due = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
  for _, m in ipairs(due) do
    local p = redis.call('HGET', KEYS[i + 1], m)
    out[#out + 1] = tostring((i - 1) / 2)
    out[#out + 1] = m
    out[#out + 1] = p or ''
  end
end
return out
"""

_COMMIT_LUA = """
local outbox = ARGV[1]
local dlq = ARGV[2]
local now = ARGV[3]
local recs = cmsgpack.unpack(ARGV[4])
local res = {}
for r = 1, #recs do
  local rec = recs[r]
  local skey, expected, op, st, zkey, pkey, kind, ekey = rec[1], rec[2], rec[3], rec[4], rec[5], rec[6], rec[7], rec[8]
  local cur = tonumber(redis.call('HGET', skey, 'v') or '0')
  if expected >= 0 and cur ~= expected then
    res[r] = -1 - cur
  else
    local newv = cur + 1
    if op == 'S' then
      redis.call('HSET', skey, 'v', newv, 's', st)
    elseif op == 'D' then
      redis.call('DEL', skey)
      newv = 0
    else
      newv = cur
    end
    for _, ev in ipairs(rec[9]) do
      redis.call('XADD', outbox, '*', 'id', ev[1], 'topic', ev[2], 'type', ev[3], 'key', ev[4], 'payload', ev[5])
    end
    for _, m in ipairs(rec[10]) do
      redis.call('ZREM', zkey, m); redis.call('HDEL', pkey, m)
    end
    for _, t in ipairs(rec[11]) do
      redis.call('ZADD', zkey, t[2], t[1]); redis.call('HSET', pkey, t[1], t[3])
    end
    for _, d in ipairs(rec[12]) do
      redis.call('XADD', dlq, '*', 'kind', kind, 'key', ekey, 'type', d[1], 'reason', d[2], 'msg', d[3], 'at', now)
    end
    res[r] = newv
  end
end
return res
"""


class EntityStore:
    """Async access to entity state, timers and the commit script."""

    def __init__(self, redis) -> None:
        self.redis = redis
        self._commit = redis.register_script(_COMMIT_LUA)
        self._due = redis.register_script(_DUE_TIMERS_LUA)

    async def load(self, kind: str, key: str) -> tuple[int, bytes | None]:
        v, s = await self.redis.hmget(state_key(kind, key), ["v", "s"])
        if v is None:
            return 0, None
        return int(v), s

    async def load_many(self, kind: str, keys: list[str]) -> list[tuple[int, bytes | None]]:
        pipe = self.redis.pipeline(transaction=False)
        for k in keys:
            pipe.hmget(state_key(kind, k), ["v", "s"])
        out = []
        for v, s in await pipe.execute():
            out.append((0, None) if v is None else (int(v), s))
        return out

    async def commit(self, records: list[CommitRecord]) -> list[int]:
        """Commit rounds; per record the new version, or ``-1 - current`` on conflict."""
        if not records:
            return []
        recs = [
            (
                state_key(r.kind, r.key), r.expected_version, r.op, r.state,
                timer_zset(r.kind, r.shard), timer_payloads(r.kind, r.shard), r.kind, r.key,
                r.events, r.timers_del, [(m, repr(d), p) for m, d, p in r.timers_set], r.dead_letters,
            )
            for r in records
        ]
        blob = msgpack.packb(recs, use_bin_type=False)
        argv = [OUTBOX_STREAM, DEADLETTER_STREAM, repr(time.time()), blob]
        return [int(x) for x in await self._commit(keys=[], args=argv)]

    async def due_timers(self, kind: str, shards: list[int], now: float, limit: int = 500):
        """Timers due by ``now`` on the given shards: [(shard, member, payload)] - one
        script call for all shards (a host polls every ``runtime.timer_poll_ms``; 32
        ``ZRANGEBYSCORE`` + a ``MULTI`` per poll were 6 % of a KIM slip host's samples).
        Membership and payload are read atomically: a timer handled (and removed) by a
        commit meanwhile is gone, not "payload missing"; a missing payload reads as None."""
        if not shards:
            return []
        keys: list[str] = []
        for s in shards:
            keys += [timer_zset(kind, s), timer_payloads(kind, s)]
        flat = await self._due(keys=keys, args=[repr(now), int(limit)])
        out = []
        for i in range(0, len(flat), 3):
            shard = shards[int(flat[i])]
            m, payload = flat[i + 1], flat[i + 2]
            out.append((shard, m.decode() if isinstance(m, bytes) else m, payload or None))
        return out

    async def drop_timer(self, kind: str, shard: int, member: str, payload: bytes | None | bool = True) -> bool:
        """Remove a timer. ``payload`` bytes: only if it still holds them; None: only if it
        still has none; True: unconditionally. So a timer re-armed under the same name
        meanwhile is kept. True if removed."""
        mode = "0" if payload is True else ("2" if payload is None else "1")
        arg = payload if isinstance(payload, bytes) else b""
        n = await self.redis.eval(_DROP_TIMER_LUA, 2, timer_zset(kind, shard), timer_payloads(kind, shard),
                                  member, arg, mode)
        return bool(n)

    async def advance_timers(self, kind: str, shards: list[int], names: list[str], now: float) -> int:
        """Make the timers called ``names`` on ``shards`` due at ``now`` (those due later);
        returns how many. For work a previous host incarnation may have lost."""
        if not names or not shards:
            return 0
        n = 0
        for i in range(0, len(shards), 16):
            keys = [timer_zset(kind, s) for s in shards[i:i + 16]]
            n += int(await self.redis.eval(_ADVANCE_TIMERS_LUA, len(keys), *keys, repr(now),
                                           *[f"\x1f{nm}" for nm in names]))
        return n

    async def quarantine(self, kind: str, key: str, raw: bytes | None, reason: str) -> None:
        await self.redis.hset(
            quarantine_key(kind, key),
            mapping={"state": raw or b"", "reason": reason, "at": repr(time.time())},
        )

    async def dead_letters(self, count: int = 100) -> list[dict]:
        rows = await self.redis.xrevrange(DEADLETTER_STREAM, count=count)
        out = []
        for sid, fields in rows:
            f = {k.decode(): v for k, v in fields.items()}
            out.append(
                {
                    "stream_id": sid.decode(),
                    "kind": f["kind"].decode(),
                    "key": f["key"].decode(),
                    "message_type": f["type"].decode(),
                    "reason": f["reason"].decode(),
                    "at": float(f["at"]),
                }
            )
        return out


def event_fields(ev) -> tuple[str, str, str, str, bytes]:
    return (ev.id, ev.topic, ev.type, ev.key, ev.payload())


def dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), default=str)
