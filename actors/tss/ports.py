"""Side-effect ports of the practice sync entity: the Terminservice client and the clock.

``clock`` is the wall clock plus an offset read from ``<run_dir>/tss/clock.json``
(``{"offset": seconds}``) when that file exists — a controllable clock for tests and
demos (``automat tss clock --advance 300``); without the file it is the wall clock.
The shard host uses the same clock for the durable timers. A kind made with
``practice_kind(cfg, clock="NAME")`` uses ``clock-NAME.json`` instead (tests, bench).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import httpx

from actors.tss.client import TssClient


def clock_file(cfg, name: str | None = None) -> Path:
    """The shared clock file, or a named one (a test or bench with its own clock)."""
    return Path(cfg.run_dir) / "tss" / (f"clock-{name}.json" if name else "clock.json")


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


def set_clock_offset(cfg, offset_s: float, name: str | None = None) -> None:
    p = clock_file(cfg, name)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps({"offset": offset_s}))
    tmp.replace(p)


def clock_offset(cfg, name: str | None = None) -> float:
    try:
        return float(json.loads(clock_file(cfg, name).read_text()).get("offset", 0.0))
    except (OSError, ValueError):
        return 0.0


class TssPorts:
    def __init__(self, client: TssClient, clock: Callable[[], float]) -> None:
        self.client = client
        self.clock = clock

    async def aclose(self) -> None:
        await self.client.aclose()


def make_ports(cfg, clock_name: str | None = None) -> TssPorts:
    http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=5.0),
                             limits=httpx.Limits(max_connections=64, max_keepalive_connections=32))
    return TssPorts(TssClient(http), file_clock(clock_file(cfg, clock_name)))


class _NamedClockPorts:
    """``ports="actors.tss.ports:named_clock.<name>"``: the same ports, but the clock file
    ``<run_dir>/tss/clock-<name>.json`` - a test or bench moves its own clock without
    moving the one of `automat run` (or of another test session in the same run dir)."""

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda cfg: make_ports(cfg, clock_name=name)


named_clock = _NamedClockPorts()
