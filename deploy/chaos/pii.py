"""Scanner for personal data in plain form: Redis, Kafka events, log files, blob files.

The needles are the insured persons of the generated mails: their KVNRs (``A123456789``),
their full names and their family names (synthetic compound names, e.g. "Sonnenreiter",
that appear nowhere else). Instead of searching every value for every needle (20,000
mails give ~60,000 needles), the scanner cuts each text into tokens — KVNR-shaped words
and name-shaped words (after undoing JSON ``\\uXXXX`` escapes) — and looks each token up
in a set: linear in the data, independent of the number of needles.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Iterable

_KVNR = re.compile(rb"[A-Z][0-9]{9}")
_WORD = re.compile(r"[A-Za-zÄÖÜäöüß][A-Za-zÄÖÜäöüß\-]{3,}")
_UESC = re.compile(r"\\u([0-9a-fA-F]{4})")


class Needles:
    def __init__(self) -> None:
        self.kvnrs: set[bytes] = set()
        self.names: set[str] = set()  # family names (and full names)
        self.secrets: list[bytes] = []  # key material and passwords: must never appear either

    def add_secret(self, value: bytes | str) -> None:
        v = value.encode() if isinstance(value, str) else value
        if len(v) >= 8:
            self.secrets.append(v)

    def add(self, name: str | None, kvnr: str | None) -> None:
        if kvnr:
            self.kvnrs.add(kvnr.encode())
        if name:
            parts = name.split()
            if parts:
                self.names.add(parts[-1])
            self.names.add(name)

    def __len__(self) -> int:
        return len(self.kvnrs) + len(self.names) + len(self.secrets)

    def find(self, blob: bytes) -> list[str]:
        """Needles found in ``blob`` (as strings; KVNRs and names)."""
        hits = [m.decode() for m in _KVNR.findall(blob) if m in self.kvnrs]
        hits += ["<secret>" for sec in self.secrets if sec in blob]
        text = blob.decode("utf-8", errors="replace")
        if "\\u" in text:
            text = _UESC.sub(lambda m: chr(int(m.group(1), 16)), text)
        words = _WORD.findall(text)
        hits += [w for w in words if w in self.names]
        # full names ("Given Family") as adjacent words
        hits += [f"{a} {b}" for a, b in zip(words, words[1:]) if f"{a} {b}" in self.names]
        return hits


async def scan_redis(redis, needles: Needles) -> Counter:
    """Every key and value (strings, hashes, lists, sets, zsets, streams). -> Counter of key prefixes with hits."""
    hits: Counter = Counter()

    def check(key: bytes, blob: bytes) -> None:
        if needles.find(blob):
            hits[key.decode(errors="replace").rsplit(":", 1)[0]] += 1

    async for key in redis.scan_iter(count=2000):
        check(key, key)
        t = (await redis.type(key)).decode()
        if t == "string":
            check(key, await redis.get(key) or b"")
        elif t == "hash":
            for f, v in (await redis.hgetall(key)).items():
                check(key, f + b"\x00" + v)
        elif t == "list":
            check(key, b"\x00".join(await redis.lrange(key, 0, -1)))
        elif t == "set":
            check(key, b"\x00".join(await redis.smembers(key)))
        elif t == "zset":
            check(key, b"\x00".join(await redis.zrange(key, 0, -1)))
        elif t == "stream":
            last = b"-"
            while True:
                entries = await redis.xrange(key, min=last, count=5000)
                if last != b"-":
                    entries = entries[1:]
                if not entries:
                    break
                for _id, fields in entries:
                    check(key, b"\x00".join(k + b"=" + v for k, v in fields.items()))
                last = entries[-1][0]
    return hits


def scan_files(paths: Iterable[Path], needles: Needles, *, max_bytes: int = 256 * 1024 * 1024) -> tuple[int, Counter]:
    """Scan files (logs, blobs) chunk-wise; returns (files scanned, Counter of file -> hits)."""
    n = 0
    hits: Counter = Counter()
    for p in paths:
        try:
            if not p.is_file() or p.stat().st_size > max_bytes:
                continue
            with open(p, "rb") as fh:
                n += 1
                tail = b""
                while chunk := fh.read(4 * 1024 * 1024):
                    found = needles.find(tail + chunk)
                    if found:
                        hits[str(p)] += len(found)
                    tail = chunk[-64:]
        except OSError:
            continue
    return n, hits
