"""Wiring of entity kinds to shard hosts: child specs for supervisors, or direct start."""

from __future__ import annotations

import ray

from actors.runtime.host import ShardHostActor
from actors.runtime.kinds import EntityKind

HOST_ACTOR = "actors.runtime.host:ShardHostActor"


def host_actor_options(kind: EntityKind, cfg=None) -> dict:
    """Ray options of a kind's host actors. On a cluster, ``runtime.host_num_cpus`` gives
    every host a CPU share (so hosts fill nodes and Ray's autoscaler sees demand) and
    ``runtime.host_scheduling: SPREAD`` spreads them over the nodes."""
    rt = getattr(cfg, "runtime", None)
    cpus = kind.num_cpus if rt is None or rt.host_num_cpus is None else max(kind.num_cpus, rt.host_num_cpus)
    opts = {"num_cpus": cpus, "max_concurrency": kind.max_concurrency,
            "enable_task_events": bool(getattr(rt, "host_task_events", False))}
    if rt is not None and rt.host_scheduling != "DEFAULT":
        opts["scheduling_strategy"] = rt.host_scheduling
    return opts


def host_child_spec(cfg, kind: EntityKind, index: int) -> dict:
    """Child spec (a dict for ``supervisors.spec.ChildSpec``) of host ``index`` of a kind."""
    return {
        "name": kind.host_name(index),
        "actor": HOST_ACTOR,
        "args": [cfg, kind.model_dump(), index],
        "restart": "permanent",
        "options": host_actor_options(kind, cfg),
    }


def host_child_specs(cfg, kind: EntityKind) -> list[dict]:
    """Child specs (as dicts for ``supervisors.spec.ChildSpec``) of a kind's hosts."""
    return [host_child_spec(cfg, kind, i) for i in range(kind.host_count(cfg))]


# A named, non-detached actor dies with its last *owning* handle. A handle got back by
# name (``get_if_exists``) does not keep it alive, so every handle is kept: replacing the
# first one dropped the actor (CI: test_moped after test_hl7 found its hosts dead).
_KEEP: dict[str, list] = {}


def start_hosts(cfg, kind: EntityKind, *, namespace: str | None = None) -> list:
    """Start a kind's hosts as plain named actors (tests, tools; no supervision)."""
    cls = ShardHostActor
    ns = namespace or cfg.runtime.namespace
    handles = []
    for i in range(kind.host_count(cfg)):
        handles.append(
            cls.options(name=kind.host_name(i), namespace=ns, get_if_exists=True, **host_actor_options(kind, cfg))
            .remote(cfg, kind.model_dump(), i)
        )
    ray.get([h.ping.remote() for h in handles])
    for i, h in enumerate(handles):
        _KEEP.setdefault(kind.host_name(i), []).append(h)
    return handles
