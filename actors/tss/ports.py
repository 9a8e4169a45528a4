"""Side-effect ports of the practice sync entity: the Terminservice client and the clock.

``clock`` is the wall clock plus an offset read from ``<run_dir>/tss/clock.json``
(``{"offset": seconds}``) when that file exists — a controllable clock for tests and
demos (``automat tss clock --advance 300``); without the file it is the wall clock.
The shard host uses the same clock for the durable timers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import httpx

from actors.tss.client import TssClient


def clock_file(cfg) -> Path:
    return Path(cfg.run_dir) / "tss" / "clock.json"


def file_clock(path: Path | str) -> Callable[[], float]:
    """Wall clock plus the offset in ``path``, re-read at most every 20 ms."""
    p = Path(path)
    cache = {"at": -1.0, "off": 0.0}

    def now() -> float:
        m = time.monotonic()
        if m - cache["at"] > 0.02:
            try:
                cache["off"] = float(json.loads(p.read_text()).get("offset", 0.0))
            except (OSError, ValueError, AttributeError):
                cache["off"] = 0.0
            cache["at"] = m
        return time.time() + cache["off"]

    return now


def set_clock_offset(cfg, offset_s: float) -> None:
    p = clock_file(cfg)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps({"offset": offset_s}))
    tmp.replace(p)


def clock_offset(cfg) -> float:
    try:
        return float(json.loads(clock_file(cfg).read_text()).get("offset", 0.0))
    except (OSError, ValueError):
        return 0.0


class TssPorts:
    def __init__(self, client: TssClient, clock: Callable[[], float]) -> None:
        self.client = client
        self.clock = clock

    async def aclose(self) -> None:
        await self.client.aclose()


def make_ports(cfg) -> TssPorts:
    http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=5.0),
                             limits=httpx.Limits(max_connections=64, max_keepalive_connections=32))
    return TssPorts(TssClient(http), file_clock(clock_file(cfg)))
