"""``automat bench ...``: benchmarks that print numbers (speed targets live here, not in tests)."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
import uuid
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

bench_app = typer.Typer(help="Benchmarks that print numbers.", no_args_is_help=True)
console = Console()


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100.0 * len(xs)))] if xs else float("nan")


async def _bench_runtime(cfg, messages: int, entities: int, hosts: int, asks: int, senders: int) -> dict:
    import ray
    import redis.asyncio as aioredis

    from actors.runtime.kinds import EntityKind
    from actors.runtime.router import Router, register_kinds
    from actors.runtime.system import start_hosts
    from protocols.bench import Add, Get

    kind = EntityKind(name=f"bench{uuid.uuid4().hex[:8]}.counter", entity="protocols.bench:BenchCounter", hosts=hosts)
    r = aioredis.from_url(cfg.redis.url)
    await register_kinds(r, [kind])
    handles = await asyncio.to_thread(start_hosts, cfg, kind)
    routers = [Router(cfg) for _ in range(senders)]
    keys = [f"e{i}" for i in range(entities)]
    # warm-up: activate every entity once
    for i, k in enumerate(keys):
        await routers[0].tell(kind.name, k, Add(n=0))
    await routers[0].drain()
    per = messages // senders
    t0 = time.perf_counter()

    async def pump(router: Router, offset: int) -> None:
        nk = len(keys)
        for i in range(per):
            await router.tell(kind.name, keys[(offset + i) % nk], Add(n=1))
        await router.drain()

    await asyncio.gather(*[pump(rt, j * 7919) for j, rt in enumerate(routers)])
    dt = time.perf_counter() - t0
    sent = per * senders
    lat = []
    for i in range(asks):
        t = time.perf_counter()
        await routers[0].ask(kind.name, keys[i % len(keys)], Get())
        lat.append((time.perf_counter() - t) * 1000)
    # correctness: every message counted exactly once
    total = 0
    futs = [await routers[0].send(kind.name, k, Get()) for k in keys]
    routers[0].flush()
    for f in futs:
        total += (await f).total
    stats = await asyncio.gather(*[h.stats.remote() for h in handles])
    for rt in routers:
        await rt.close()
    for h in handles:
        ray.kill(h)
    # clean up the bench keys
    async for k in r.scan_iter(match=f"automat:e:{kind.name}:*", count=1000):
        await r.delete(k)
    await r.hdel("automat:kinds", kind.name)
    await r.aclose()
    return {
        "messages": sent,
        "entities": entities,
        "hosts": hosts,
        "senders": senders,
        "seconds": round(dt, 3),
        "messages_per_s": round(sent / dt),
        "ask_p50_ms": round(_pct(lat, 50), 3),
        "ask_p99_ms": round(_pct(lat, 99), 3),
        "ask_mean_ms": round(statistics.fmean(lat), 3) if lat else None,
        "counted": total,
        "lost_or_duplicated": total - sent,
        "commit_batches": sum(s["commit_batches"] for s in stats),
        "early_batches": sum(s.get("early_batches", 0) for s in stats),  # Ray started them before a predecessor
        "order_gaps": sum(s.get("order_gaps", 0) for s in stats),  # a predecessor never came in order_wait_s
        "commits": sum(s["commits"] for s in stats),
    }


@bench_app.command("runtime")
def bench_runtime(
    ctx: typer.Context,
    messages: int = typer.Option(200_000, help="one-way messages to send"),
    entities: int = typer.Option(10_000, help="distinct entities they go to"),
    hosts: int = typer.Option(2, help="shard hosts"),
    asks: int = typer.Option(1000, help="sequential asks for the latency figures"),
    senders: int = typer.Option(1, help="concurrent routers sending"),
    out: Path = typer.Option(None, help="write the result as JSON here"),
) -> None:
    """Entity messages/s through shard hosts (batched; trivial durable handler) and ask latency."""
    from deploy.app import start_ray
    from deploy.cli import get_config

    cfg = get_config(ctx)
    import ray

    from deploy.stack import bench_lease

    with bench_lease(cfg, "automat bench runtime"):  # the stack stays up only if it was up before
        start_ray(cfg, dashboard=False)
        try:
            res = asyncio.run(_bench_runtime(cfg, messages, entities, hosts, asks, senders))
        finally:
            ray.shutdown()
    t = Table(title="automat bench runtime", show_header=True)
    t.add_column("measure")
    t.add_column("value", justify="right")
    for k, v in res.items():
        t.add_row(k, str(v))
    console.print(t)
    console.print(f"machine: {os.cpu_count()} cores; every message is a durable state change (Redis, group commit)")
    if out:
        out.write_text(json.dumps(res, indent=2))
    if res["lost_or_duplicated"] != 0:
        raise typer.Exit(1)


from actors.moped.bench import bench_moped  # noqa: E402

bench_app.command("moped")(bench_moped)
