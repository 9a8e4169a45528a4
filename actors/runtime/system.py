"""Wiring of entity kinds to shard hosts: child specs for supervisors, or direct start."""

from __future__ import annotations

import ray

from actors.runtime.host import ShardHost
from actors.runtime.kinds import EntityKind

HOST_ACTOR = "actors.runtime.host:ShardHost"


def host_actor_options(kind: EntityKind) -> dict:
    return {"num_cpus": kind.num_cpus, "max_concurrency": kind.max_concurrency}


def host_child_specs(cfg, kind: EntityKind) -> list[dict]:
    """Child specs (as dicts for ``supervisors.spec.ChildSpec``) of a kind's hosts."""
    return [
        {
            "name": kind.host_name(i),
            "actor": HOST_ACTOR,
            "args": [cfg, kind.model_dump(), i],
            "restart": "permanent",
            "options": host_actor_options(kind),
        }
        for i in range(kind.host_count(cfg))
    ]


_KEEP: dict[str, object] = {}  # a named, non-detached actor dies with its last handle


def start_hosts(cfg, kind: EntityKind, *, namespace: str | None = None) -> list:
    """Start a kind's hosts as plain named actors (tests, tools; no supervision)."""
    cls = ray.remote(ShardHost)
    ns = namespace or cfg.runtime.namespace
    handles = []
    for i in range(kind.host_count(cfg)):
        handles.append(
            cls.options(name=kind.host_name(i), namespace=ns, get_if_exists=True, **host_actor_options(kind))
            .remote(cfg, kind.model_dump(), i)
        )
    ray.get([h.ping.remote() for h in handles])
    for i, h in enumerate(handles):
        _KEEP[kind.host_name(i)] = h
    return handles
