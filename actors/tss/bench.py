"""``automat bench tss``: N practices synced against the Terminservice simulator.

The full-size run of the issue's "1,000 practices" (the CI test runs fewer): a simulator
with N practices (uvicorn in a thread of this process), a run-unique practice kind on its
own shard hosts, then

1. the initial sync of every practice (paged searches of every resource type),
2. ``rounds`` continuous-sync rounds: ``changes_per_practice`` x N random changes at the
   simulator, the run's own controllable clock moved on by the poll interval (300 s), every
   practice polls once (Provenance after its cursor, paged),
3. after each phase the local store of every practice is compared with the simulator's
   state (resources equal, no Provenance applied twice, no poll-rule violation).

Prints the times and rates; exit code 1 if any store differs.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console()


async def compare(router, kind: str, sim, keys: list[str]) -> dict:
    """{"differ": [...], "twice": [...]}: practices whose store is not the simulator's state."""
    from protocols.tss.messages import GetStore
    from protocols.tss.xml import from_xml, to_xml

    differ, twice = [], []
    for i in range(0, len(keys), 200):
        chunk = keys[i:i + 200]
        futs = [await router.send(kind, k, GetStore()) for k in chunk]
        for k, st in zip(chunk, await asyncio.gather(*futs)):
            want = {rk: from_xml(to_xml(v)) for rk, v in sim.snapshot(k).items()}
            if getattr(st, "resources", None) != want:
                differ.append(k)
            ids = getattr(st, "applied_ids", [])
            if len(ids) != len(set(ids)):
                twice.append(k)
    return {"differ": differ, "twice": twice}


async def run_bench(cfg, practices: int, rounds: int, changes_per_practice: int, hosts: int, page_size: int,
                    timeout_s: float) -> dict:
    import ray
    import redis.asyncio as aioredis

    from actors.runtime import system
    from actors.runtime.router import Router, register_kinds
    from actors.runtime.system import start_hosts
    from actors.tss.app import configure_practices, practice_kind, wait_synced
    from actors.tss.ports import clock_file, clock_offset, file_clock, set_clock_offset
    from deploy.sim_tss import SimServer, TerminService

    run = uuid.uuid4().hex[:6]
    clock = file_clock(clock_file(cfg, run))  # its own controllable clock: `automat run` is not moved
    sim = TerminService(clock=clock)
    for i in range(practices):
        sim.add_practice(f"b{run}-{i:05d}")
    server = SimServer(sim).start()
    kind = practice_kind(cfg, hosts=hosts, clock=run).model_copy(update={"name": f"b{run}.tss.practice"})
    r = aioredis.from_url(cfg.redis.url)
    await register_kinds(r, [kind])
    handles = await asyncio.to_thread(start_hosts, cfg, kind)
    router = Router(cfg)
    keys = list(sim.practices)
    creds = {pid: {"client_id": p.client_id, "secret": p.secret} for pid, p in sim.practices.items()}
    out: dict = {"practices": practices, "hosts": hosts, "page_size": page_size, "rounds": []}
    try:
        t0 = time.monotonic()
        await configure_practices(router, server.base_url, creds, page_size=page_size, kind=kind.name)
        sts = await wait_synced(router, keys, timeout_s, kind=kind.name)
        dt = time.monotonic() - t0
        resources = sum(len(p.current) for p in sim.practices.values())
        cmp = await compare(router, kind.name, sim, keys)
        out["initial"] = {"seconds": round(dt, 1), "practices_per_s": round(practices / dt, 1),
                          "resources": resources, "resources_per_s": round(resources / dt, 1),
                          "not_done": sum(1 for s in sts.values() if not getattr(s, "initial_done", False)),
                          "stores_differ": len(cmp["differ"]), "applied_twice": len(cmp["twice"])}
        for i in range(rounds):
            req0 = sim.requests
            changes = sim.mutate(changes_per_practice * practices)
            mark = clock()
            set_clock_offset(cfg, clock_offset(cfg, run) + 300.0, run)
            t1 = time.monotonic()
            sts = await wait_synced(router, keys, timeout_s, after=mark, kind=kind.name)
            dt = time.monotonic() - t1
            cmp = await compare(router, kind.name, sim, keys)
            lags = [getattr(s, "lag_s", None) for s in sts.values()]
            out["rounds"].append({
                "round": i + 1, "changes": changes, "seconds": round(dt, 1),
                "practices_per_s": round(practices / dt, 1), "changes_per_s": round(changes / dt, 1),
                "requests": sim.requests - req0,
                "not_polled": sum(1 for s in sts.values() if (getattr(s, "last_sync_at", None) or 0) <= mark),
                "stores_differ": len(cmp["differ"]), "applied_twice": len(cmp["twice"]),
                "max_lag_s": round(max((x for x in lags if x is not None), default=0.0), 1),
            })
        out["poll_rule_violations"] = len(sim.violations)
        out["requests"] = sim.requests
        out["ok"] = (out["initial"]["stores_differ"] == 0 and out["initial"]["not_done"] == 0
                     and all(r_["stores_differ"] == 0 and r_["applied_twice"] == 0 and r_["not_polled"] == 0
                             for r_ in out["rounds"]) and not sim.violations)
    finally:
        clock_file(cfg, run).unlink(missing_ok=True)
        await router.close()
        for h in handles:
            ray.kill(h)
        for i in range(len(handles)):
            system._KEEP.pop(kind.host_name(i), None)
        server.stop()
        for pattern in (f"automat:e:{kind.name}:*", f"automat:t:{kind.name}:*", f"automat:tp:{kind.name}:*"):
            ks = [k async for k in r.scan_iter(match=pattern, count=1000)]
            for j in range(0, len(ks), 500):
                await r.delete(*ks[j:j + 500])
        await r.aclose()
    return out


def bench_tss(
    ctx: typer.Context,
    practices: int = typer.Option(1000, help="practices at the simulator (one entity each)"),
    rounds: int = typer.Option(2, help="continuous-sync rounds (changes, then the clock moves 300 s)"),
    changes_per_practice: int = typer.Option(2, help="random changes per practice and round"),
    hosts: int = typer.Option(2, help="shard hosts of the practice kind"),
    page_size: int = typer.Option(50, help="search page size (_count)"),
    timeout_s: float = typer.Option(900.0, help="per phase"),
    out: Path = typer.Option(None, help="write the result as JSON here"),
) -> None:
    """N practices: initial sync, continuous sync rounds, stores compared with the simulator."""
    from deploy.app import start_ray
    from deploy.cli import get_config

    cfg = get_config(ctx)
    import ray

    from deploy.stack import bench_lease

    with bench_lease(cfg, "automat bench tss"):  # a test session that ends meanwhile does not stop the stack under us
        start_ray(cfg, dashboard=False)
        try:
            res = asyncio.run(run_bench(cfg, practices, rounds, changes_per_practice, hosts, page_size, timeout_s))
        finally:
            ray.shutdown()
    t = Table(title=f"automat bench tss: {practices} practices, {hosts} hosts, page size {page_size}")
    for c in ("phase", "seconds", "practices/s", "resources or changes", "per s", "stores differ",
              "applied twice", "not synced"):
        t.add_column(c, justify="right")
    i = res["initial"]
    t.add_row("initial sync", str(i["seconds"]), str(i["practices_per_s"]), str(i["resources"]),
              str(i["resources_per_s"]), str(i["stores_differ"]), str(i["applied_twice"]), str(i["not_done"]))
    for r_ in res["rounds"]:
        t.add_row(f"poll round {r_['round']}", str(r_["seconds"]), str(r_["practices_per_s"]), str(r_["changes"]),
                  str(r_["changes_per_s"]), str(r_["stores_differ"]), str(r_["applied_twice"]), str(r_["not_polled"]))
    console.print(t)
    console.print(f"simulator requests {res['requests']}, poll-rule violations {res['poll_rule_violations']}; "
                  f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    console.print("stores equal to the simulator: " + ("[green]yes[/]" if res["ok"] else "[red]NO[/]"))
    if out:
        out.write_text(json.dumps(res, indent=2))
    if not res["ok"]:
        raise typer.Exit(1)
