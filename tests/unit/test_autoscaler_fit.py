"""How many hosts the autoscaler may add on the CPU there is (``Autoscaler._fit``).

Regression (the 240k load test, twice): ``kim.worker`` grew 2 -> 8 hosts on a 2-core node -
first on backlog alone, then, with a plain "hold while the node is >= 90 % busy" rule,
the moment the node read 89 % for a tick. Growth is now sized by the CPU left."""

from __future__ import annotations

import asyncio

from actors.runtime.autoscaler import Autoscaler, _Pool
from actors.runtime.config import PoolPolicy, load_config


async def _one_node() -> list[str]:
    return ["n1"]  # the cluster is the one node the pool runs on


def _fit(busy: float, cpus: float, host_cpu: float | None, limit: float = 0.9) -> int | None:
    scaler = Autoscaler.__new__(Autoscaler)  # no loop task: only the sizing is asked
    scaler.cfg = load_config()
    scaler._alive_nodes = _one_node  # not whatever Ray session this process may have
    p = _Pool(PoolPolicy(kind="kim.worker", supervisor="kim", grow_max_node_busy=limit))
    p.node_busy, p.node_cpus, p.host_cpu = {"n1": busy}, {"n1": cpus}, host_cpu
    return asyncio.run(scaler._fit(p))


def test_a_node_at_89_percent_takes_no_more_hosts():
    assert _fit(0.89, 2.0, 0.4) == 0


def test_free_cpu_takes_as_many_hosts_as_it_can_feed():
    assert _fit(0.5, 2.0, 0.4) == 2  # 0.8 core left below 90 %, 0.4 core per host
    assert _fit(0.1, 8.0, 0.5) == 12
    assert _fit(0.5, 2.0, 0.0) == 8  # idle hosts count as 0.1 core each, not as free


def test_the_guard_switched_off_or_without_readings_does_not_limit():
    assert _fit(0.99, 2.0, 0.4, limit=1.0) is None
    scaler = Autoscaler.__new__(Autoscaler)
    scaler.cfg = load_config()
    assert asyncio.run(scaler._fit(_Pool(PoolPolicy(kind="x", supervisor="s")))) is None


def test_a_live_node_without_a_host_of_the_pool_may_have_room():
    async def two_nodes() -> list[str]:
        return ["n1", "n2"]

    scaler = Autoscaler.__new__(Autoscaler)
    scaler.cfg = load_config()
    scaler._alive_nodes = two_nodes
    p = _Pool(PoolPolicy(kind="kim.worker", supervisor="kim"))
    p.node_busy, p.node_cpus, p.host_cpu = {"n1": 1.0}, {"n1": 2.0}, 0.5
    assert asyncio.run(scaler._fit(p)) is None
