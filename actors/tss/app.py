"""The 116117 appointment sync capability: entity kind, supervision subtree, demo.

Subtree ``tss``: the shard hosts of ``tss.practice`` (one entity per practice / TVS).
"""

from __future__ import annotations

import asyncio
import time

from actors.runtime.kinds import EntityKind
from actors.runtime.system import host_child_specs
from actors.tss.entity import KIND
from supervisors.spec import ChildSpec, SupervisorSpec


def practice_kind(cfg, hosts: int | None = None, clock: str | None = None) -> EntityKind:
    """``clock``: a named controllable clock (``<run_dir>/tss/clock-<clock>.json``)."""
    ports = f"actors.tss.ports:named_clock.{clock}" if clock else "actors.tss.ports:make_ports"
    return EntityKind(name=KIND, entity="actors.tss.entity:PracticeSync", hosts=hosts, ports=ports)


def kinds(cfg) -> list[EntityKind]:
    return [practice_kind(cfg)]


def supervisor_spec(cfg) -> SupervisorSpec:
    return SupervisorSpec(
        name="tss", strategy="one_for_one", parallel_start=True,
        children=[ChildSpec(**c) for k in kinds(cfg) for c in host_child_specs(cfg, k)],
    )


async def configure_practices(router, base_url: str, practices: dict[str, dict], *, page_size: int = 50,
                              poll_interval_s: float = 300.0, kind: str = KIND) -> None:
    """Send ``Configure`` to every practice (keys = practice ids of the Terminservice)."""
    from protocols.tss.messages import Configure

    futs = [await router.send(kind, pid, Configure(base_url=base_url, client_id=p["client_id"],
                                                   client_secret=p["secret"], page_size=page_size,
                                                   poll_interval_s=poll_interval_s))
            for pid, p in practices.items()]
    await asyncio.gather(*futs)


async def wait_synced(router, keys: list[str], timeout_s: float = 60.0, *, after: float = 0.0,
                      kind: str = KIND) -> dict:
    """Wait until every practice is idle with ``last_sync_at`` > ``after``; returns statuses."""
    from protocols.tss.messages import GetStatus

    deadline = time.monotonic() + timeout_s
    while True:
        futs = [await router.send(kind, k, GetStatus()) for k in keys]
        sts = dict(zip(keys, await asyncio.gather(*futs)))
        pending = [k for k, s in sts.items()
                   if getattr(s, "phase", None) != "idle" or (getattr(s, "last_sync_at", None) or 0) <= after]
        if not pending or time.monotonic() > deadline:
            return sts
        await asyncio.sleep(0.25)


#: the demo's simulator keeps running (a daemon thread of the `automat run` process) so the
#: practices' continuous sync has a Terminservice to poll until the process stops
_DEMO_SIM: list = []


async def demo(cfg, router, console) -> None:
    """A simulated Terminservice with 10 practices (`make run`): initial sync, a manual poll
    refused by the 5-minute rule, a direct read, a published slot. The simulator stays up
    and makes a change every 10 s; the practices poll it every 5 minutes (move the shared
    clock with `automat tss clock --advance 300` to see a poll now)."""
    from rich.markup import escape

    from actors.tss.ports import clock_file, file_clock
    from deploy.sim_tss import SimServer, TerminService  # wiring: the simulator lives in deploy/
    from protocols.tss.messages import PollNow, PublishSlot, ReadResource

    sim = TerminService(clock=file_clock(clock_file(cfg)))
    for i in range(10):
        sim.add_practice(f"demo-{i:03d}")
    server = await asyncio.to_thread(SimServer(sim, change_every_s=10.0).start)
    _DEMO_SIM.append(server)
    practices = {pid: {"client_id": p.client_id, "secret": p.secret} for pid, p in sim.practices.items()}
    # a new simulator each run (another port): Configure with another base URL starts over
    await configure_practices(router, server.base_url, practices)
    sts = await wait_synced(router, list(practices), 60)
    done = sum(1 for s in sts.values() if getattr(s, "initial_done", False))
    console.print(f"[bold]tss[/] initial sync of {done}/{len(practices)} practices against the "
                  f"Terminservice simulator at {server.base_url} (one change every 10 s)")
    key = next(iter(practices))
    for _ in range(2):  # the first Provenance search may run now, a second one is refused
        r = await router.ask(KIND, key, PollNow())
        console.print(f"[bold]tss[/] manual poll of {key}: {type(r).__name__} {escape(str(getattr(r, 'reason', '')))}")
    sched = next(k for k in sim.practices[key].current if k.startswith("Schedule/")).split("/")[1]
    pub = await router.ask(KIND, key, PublishSlot(schedule_id=sched, start="2031-01-01T09:00:00Z",
                                                  end="2031-01-01T09:15:00Z"))
    console.print(f"[bold]tss[/] published free slot: {pub.ok} {pub.resource and pub.resource['id']}")
    rd = await router.ask(KIND, key, ReadResource(resource_type="Slot", resource_id=pub.resource["id"]))
    console.print(f"[bold]tss[/] direct read (allowed any time): {rd.ok}; `automat tss status` shows cursors, "
                  "`automat tss clock --advance 300` lets the next poll run now")
