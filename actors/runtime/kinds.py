"""Entity kinds: which entity class, how many shard hosts, which ports it gets."""

from __future__ import annotations

import importlib
import zlib
from typing import Any

from pydantic import BaseModel, Field


def import_path(path: str) -> Any:
    """``"package.module:Name"`` -> object."""
    module, _, name = path.partition(":")
    if not name:
        raise ValueError(f"import path {path!r} must look like 'package.module:Name'")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


class EntityKind(BaseModel):
    """One kind of entity and how it is hosted."""

    name: str = Field(pattern=r"^[a-z0-9_.\-]+$")
    entity: str  # "actors.kim.slip:RoutingSlipEntity"
    hosts: int | None = Field(None, ge=1, le=256)  # None -> cfg.runtime.hosts_per_kind
    ports: str | None = None  # "module:factory" called as factory(cfg) once per host
    max_concurrency: int = Field(10_000, ge=1)
    num_cpus: float = Field(0.0, ge=0)
    #: no stored state (e.g. a pool of step workers keyed by mail id): nothing is loaded
    #: or written but the effects (events, timers, dead letters); tells go after those
    stateless: bool = False
    #: timers fired at once when a host starts: e.g. a watchdog for work whose message may
    #: have died with the previous incarnation (sent after the commit, not yet flushed)
    restart_timers: list[str] = Field(default_factory=list)

    def host_count(self, cfg) -> int:
        return self.hosts or cfg.runtime.hosts_per_kind

    def host_name(self, index: int) -> str:
        return f"{self.name}.host.{index}"


def shard_of(key: str, num_shards: int) -> int:
    """Stable key -> shard (crc32; the same in every process and across restarts)."""
    return zlib.crc32(key.encode()) % num_shards


def host_of_shard(shard: int, hosts: int) -> int:
    return shard % hosts


def shards_of_host(index: int, hosts: int, num_shards: int) -> list[int]:
    return [s for s in range(num_shards) if s % hosts == index]
