"""Key rotation jobs: which data is under which key, and moving it to the active key.

- :func:`rotate` adds a fresh key to the keys file and makes it the active one. Every
  running process picks it up for new writes within ``crypto.RELOAD_CHECK_S`` seconds
  (``KeyRing`` re-reads its file); old keys stay readable.
- :func:`reencrypt_states` rewrites every encrypted entity state in Redis
  (``automat:e:<kind>:<key>`` field ``s``) that is not under the active key. Each rewrite
  is a compare-and-set (the state and its version unchanged since it was read, else it is
  left for the entity's own next write) and keeps the version: a shard host holding the
  entity in memory is not disturbed.
- :func:`reencrypt_blobs` does the same for the claim-check store
  (``BlobStore.reencrypt_all``).
- :func:`key_usage` counts states, blobs, dead letters and quarantined states by key id:
  a key may be retired (removed from the file) once nothing uses it any more.

Nothing here logs or returns plaintext or key material.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from actors.runtime.crypto import MAGIC, CryptoError, KeyRing

_CAS = """
if redis.call('HGET', KEYS[1], 'v') == ARGV[1] and redis.call('HGET', KEYS[1], 's') == ARGV[2] then
  redis.call('HSET', KEYS[1], 's', ARGV[3])
  return 1
end
return 0
"""


def kid_of(blob: bytes | None) -> str | None:
    """Key id of an encrypted blob, None for plain data."""
    if not blob or not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 1:
        return None
    n = blob[len(MAGIC)]
    return blob[len(MAGIC) + 1:len(MAGIC) + 1 + n].decode("ascii", "replace")


def rotate(keys_file: str | Path) -> str:
    """Add a new active key to ``keys_file``; returns its id."""
    return KeyRing.from_file(keys_file).rotate(keys_file)


async def reencrypt_states(redis, ring: KeyRing, *, match: str = "automat:e:*", batch: int = 500) -> dict[str, int]:
    """Move encrypted entity states to the active key. Returns counters:
    ``scanned``, ``encrypted``, ``rewritten``, ``skipped_changed`` (written meanwhile),
    ``failed`` (could not be decrypted: unknown key or tampered; left as they are)."""
    cas = redis.register_script(_CAS)
    out = Counter()
    keys: list[bytes] = []

    async def flush() -> None:
        pipe = redis.pipeline(transaction=False)
        for k in keys:
            pipe.hmget(k, ["v", "s"])
        rows = await pipe.execute()
        for k, (v, s) in zip(keys, rows):
            kid = kid_of(s)
            if kid is None:
                continue
            out["encrypted"] += 1
            if kid == ring.active:
                continue
            name = k.decode() if isinstance(k, bytes) else k
            kind_key = name[len("automat:e:"):]  # the aad the shard host used: "<kind>:<key>"
            try:
                new = ring.reencrypt(s, kind_key.encode())
            except CryptoError:
                out["failed"] += 1
                continue
            if await cas(keys=[k], args=[v if v is not None else b"", s, new]):
                out["rewritten"] += 1
            else:
                out["skipped_changed"] += 1
        keys.clear()

    async for k in redis.scan_iter(match=match, count=2000):
        out["scanned"] += 1
        keys.append(k)
        if len(keys) >= batch:
            await flush()
    if keys:
        await flush()
    return dict(out)


def reencrypt_blobs(blobs) -> dict[str, Any]:
    """``BlobStore.reencrypt_all`` with its failures counted instead of raised."""
    try:
        checked, rewritten = blobs.reencrypt_all()
        return {"checked": checked, "rewritten": rewritten, "failed": 0}
    except CryptoError as e:
        return {"checked": getattr(e, "checked", 0), "rewritten": getattr(e, "rewritten", 0),
                "failed": len(getattr(e, "failed", []) or [])}


async def key_usage(redis, blob_root: str | Path | None = None) -> dict[str, dict[str, int]]:
    """Key id -> counts of ``states``, ``blobs``, ``deadletters``, ``quarantined``."""
    usage: dict[str, Counter] = {}

    def note(kid: str | None, what: str) -> None:
        if kid is not None:
            usage.setdefault(kid, Counter())[what] += 1

    async for k in redis.scan_iter(match="automat:e:*", count=2000):
        note(kid_of(await redis.hget(k, "s")), "states")
    async for k in redis.scan_iter(match="automat:q:*", count=2000):
        try:
            note(kid_of(await redis.hget(k, "state")), "quarantined")
        except Exception:
            pass
    try:
        last = b"-"
        while True:
            rows = await redis.xrange("automat:deadletters", min=last, count=2000)
            if last != b"-":
                rows = rows[1:]
            if not rows:
                break
            for _id, f in rows:
                note(kid_of(f.get(b"msg")), "deadletters")
            last = rows[-1][0]
    except Exception:
        pass
    if blob_root is not None and Path(blob_root).is_dir():
        for p in Path(blob_root).rglob("*"):
            if p.is_file() and not p.name.startswith("."):
                try:
                    with open(p, "rb") as fh:
                        note(kid_of(fh.read(64)), "blobs")
                except OSError:
                    pass
    return {k: dict(v) for k, v in sorted(usage.items())}
