"""One ``hold`` per episode of a saturated node (``Autoscaler._tick``).

Regression (a clean-clone ``make test``, test_scale's saturated-node test): under CPU
burners the test driver refilled its asks late, the pool's backlog read ~0 for one tick,
that tick ended the hold episode, and the next tick held again and asked Ray for a node a
second time. An episode now ends only when the backlog stayed low for ``down_after_s``."""

from __future__ import annotations

import asyncio

from actors.runtime.autoscaler import Autoscaler, _Pool
from actors.runtime.config import PoolPolicy, load_config


class _Kind:
    name = "kim.worker"

    @staticmethod
    def host_name(i: int) -> str:
        return f"kim.worker.host.{i}"


class _Children:
    async def remote(self):
        return [{"name": "kim.worker.host.0"}]


class _Sup:
    which_children = _Children()


def _scaler(down_after_s: float):
    s = Autoscaler.__new__(Autoscaler)  # no loop task, no Ray: the decisions only
    s.cfg, s.events, s._t0 = load_config(), [], 0.0
    s.load: dict = {}
    s.requests, s.resizes = [], []

    async def nothing(p):
        return None

    async def sup(p):
        return _Sup()

    async def load(name):
        return dict(s.load)

    async def one_node():
        return ["n1"]

    async def capacity(p, adding, force=False):
        s.requests.append(adding)

    async def resize(p, target, reason):
        s.resizes.append(target)

    s._refresh, s._supervisor, s._load, s._alive_nodes = nothing, sup, load, one_node
    s._capacity, s._resize = capacity, resize
    p = _Pool(PoolPolicy(kind="kim.worker", supervisor="kim", min_hosts=1, max_hosts=3, up_backlog=20,
                         down_backlog=5, up_after_s=0.0, down_after_s=down_after_s, cooldown_s=0.0,
                         grow_max_node_busy=0.9))
    p.kind, p.hosts = _Kind(), [0]
    return s, p


def _tick(s, p, backlog: int, node_busy: float) -> None:
    s.load = {"inflight": backlog, "held": 0, "lat_p95_ms": 10.0, "loop_lag_ms": 1.0, "node": "n1",
              "node_cpus": 2.0, "node_cpu_busy": node_busy, "cpu": 0.9}

    async def go():
        await s._tick(p)
        if p.action is not None:
            await p.action

    asyncio.run(go())


def test_a_one_tick_dip_of_the_backlog_does_not_start_a_second_hold():
    s, p = _scaler(down_after_s=60.0)
    _tick(s, p, 200, 1.0)  # saturated, backlog: hold, ask Ray for a node
    for _ in range(3):
        _tick(s, p, 200, 1.0)
    _tick(s, p, 1, 1.0)  # the driver was late to ask again
    _tick(s, p, 200, 1.0)
    assert [e["action"] for e in s.events] == ["hold"] and len(s.requests) == 1
    assert s.resizes == []


def test_an_episode_ends_when_the_pressure_stayed_low_and_a_new_one_holds_again():
    s, p = _scaler(down_after_s=0.0)  # "low for a while" is one tick here
    _tick(s, p, 200, 1.0)
    _tick(s, p, 0, 1.0)  # the burst is over
    _tick(s, p, 200, 1.0)  # the next burst on a node still saturated
    assert [e["action"] for e in s.events] == ["hold", "hold"] and len(s.requests) == 2


def test_the_pool_grows_once_the_node_has_cpu_again():
    s, p = _scaler(down_after_s=60.0)
    _tick(s, p, 200, 1.0)
    for _ in range(4):  # the node's reading is smoothed (half old, half new)
        _tick(s, p, 200, 0.2)
    assert s.resizes and s.resizes[0] > 1
    assert not p.holding
