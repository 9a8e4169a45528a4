"""``automat bench moped``: MOPED operations over HTTP (Ray Serve → router → entity → Redis).

1. admits ``--cases`` cases concurrently, then runs ``--ops`` ``$update`` operations on
   every case, all cases at once (each case sequential: it posts on the version it got);
   prints operations/s and latency percentiles;
2. (``--router``) the same case workload straight through the router, to tell the HTTP /
   Serve / FHIR-parsing cost from the entity path;
3. ``--writers`` clients write to one case at once, each ``--writes`` times, re-reading
   and retrying on 409: prints the conflicts handled and checks that no update was lost.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from actors.moped.stay import KH, vid_of
from protocols.moped import samples as S

console = Console()


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100.0 * len(xs)))] if xs else float("nan")


async def _run(base: str, cases: int, ops: int, writers: int, writes: int, connections: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        admit_lat: list[float] = []
        op_lat: list[float] = []
        errors = 0
        body_admit = S.admission()

        async def admit() -> str | None:
            nonlocal errors
            t = time.perf_counter()
            r = await client.post("/$aufnehmen", json=body_admit, headers=KH)
            admit_lat.append((time.perf_counter() - t) * 1000)
            if r.status_code != 201:
                errors += 1
                return None
            return r.headers["location"].split("/Composition/", 1)[1].split("/", 1)[0]

        t0 = time.perf_counter()
        ids = [c for c in await asyncio.gather(*[admit() for _ in range(cases)]) if c]
        t_admit = time.perf_counter() - t0

        async def work(case_id: str) -> int:
            nonlocal errors
            v = 1
            for i in range(ops):
                body = S.params("update", (S.urn(), S.procedure(f"B{i:03d}")))
                t = time.perf_counter()
                r = await client.post(f"/Composition/{case_id}/_history/{v}/$update", json=body, headers=KH)
                op_lat.append((time.perf_counter() - t) * 1000)
                if r.status_code != 200:
                    errors += 1
                    return v
                v = vid_of(r)
            return v

        t1 = time.perf_counter()
        final = await asyncio.gather(*[work(c) for c in ids])
        t_ops = time.perf_counter() - t1
        lost_case_updates = sum(1 for v in final if v != 1 + ops)

        # many writers on one case
        one = await admit()
        conflicts = 0
        retries_max = 0

        async def writer(n: int) -> None:
            nonlocal conflicts, retries_max
            for k in range(writes):
                tries = 0
                while True:
                    g = await client.get(f"/Composition/{one}", headers=KH)
                    v = vid_of(g)
                    r = await client.post(f"/Composition/{one}/_history/{v}/$update", headers=KH,
                                          json=S.params("update", (S.urn(), S.procedure(f"W{n:02d}{k:03d}"))))
                    if r.status_code == 200:
                        break
                    if r.status_code != 409:
                        raise RuntimeError(f"writer {n}: {r.status_code} {r.text[:300]}")
                    conflicts += 1
                    tries += 1
                retries_max = max(retries_max, tries)

        t2 = time.perf_counter()
        await asyncio.gather(*[writer(n) for n in range(writers)])
        t_writers = time.perf_counter() - t2
        g = await client.get(f"/Composition/{one}/$document", headers=KH)
        procs = [e["resource"] for e in g.json()["entry"] if e["resource"]["resourceType"] == "Procedure"]
        final_vid = vid_of(await client.get(f"/Composition/{one}", headers=KH))
        written = {p["code"]["coding"][0]["code"] for p in procs}
        expected = {f"W{n:02d}{k:03d}" for n in range(writers) for k in range(writes)}
    return {
        "cases": cases,
        "ops_per_case": ops,
        "admit_per_s": round(len(ids) / t_admit, 1),
        "admit_p50_ms": round(_pct(admit_lat, 50), 1),
        "admit_p99_ms": round(_pct(admit_lat, 99), 1),
        "operations": len(op_lat),
        "ops_seconds": round(t_ops, 2),
        "ops_per_s": round(len(op_lat) / t_ops, 1) if t_ops else None,
        "op_p50_ms": round(_pct(op_lat, 50), 1),
        "op_p99_ms": round(_pct(op_lat, 99), 1),
        "op_mean_ms": round(statistics.fmean(op_lat), 1) if op_lat else None,
        "errors": errors,
        "cases_with_wrong_final_version": lost_case_updates,
        "writers": writers,
        "writes_per_writer": writes,
        "writers_seconds": round(t_writers, 2),
        "conflicts_409_handled": conflicts,
        "max_retries_one_write": retries_max,
        "one_case_final_version": final_vid,
        "lost_updates": len(expected - written) + (1 + writers * writes - final_vid),
        "_case_ids": ids + [one],
    }


async def _run_router(cfg, cases: int, ops: int) -> dict:
    """The same case workload straight through the router (no HTTP, no FHIR parsing)."""
    import json as _json
    import uuid
    from datetime import datetime, timezone

    from actors.moped.composition import KIND
    from actors.moped.config import DEV_TOKENS
    from actors.runtime.router import Router
    from protocols.moped.fhirio import parse_operation_body
    from protocols.moped.messages import Operate

    kh = DEV_TOKENS["dev-kh"]
    adm, _ = parse_operation_body(_json.dumps(S.admission()).encode(), "aufnehmen")
    upd, _ = parse_operation_body(_json.dumps(S.params("update", (S.urn(), S.procedure()))).encode(), "update")
    router = Router(cfg)
    lat: list[float] = []
    errors = 0

    def at() -> str:
        return datetime.now(timezone.utc).isoformat()

    ids = [str(uuid.uuid4()) for _ in range(cases)]
    t0 = time.perf_counter()
    await asyncio.gather(*[router.ask(KIND, c, Operate(op="aufnehmen", entries=adm, caller=kh, at=at())) for c in ids])
    t_admit = time.perf_counter() - t0

    async def work(c: str) -> None:
        nonlocal errors
        v = 1
        for _ in range(ops):
            t = time.perf_counter()
            r = await router.ask(KIND, c, Operate(op="update", vid=v, entries=upd, caller=kh, at=at()))
            lat.append((time.perf_counter() - t) * 1000)
            if r.code != "ok":
                errors += 1
                return
            v = r.vid

    t1 = time.perf_counter()
    await asyncio.gather(*[work(c) for c in ids])
    dt = time.perf_counter() - t1
    await router.close()
    return {"router_admit_per_s": round(cases / t_admit, 1), "router_ops_per_s": round(len(lat) / dt, 1),
            "router_op_p50_ms": round(_pct(lat, 50), 1), "router_op_p99_ms": round(_pct(lat, 99), 1),
            "router_errors": errors, "_router_ids": ids}


async def _cleanup(cfg, ids: list[str]) -> None:
    import redis.asyncio as aioredis

    from actors.moped.composition import KIND
    from actors.runtime.store import state_key

    r = aioredis.from_url(cfg.redis.url)
    try:
        for i in range(0, len(ids), 500):
            await r.delete(*[state_key(KIND, c) for c in ids[i:i + 500]])
    finally:
        await r.aclose()


def bench_moped(
    ctx: typer.Context,
    cases: int = typer.Option(1000, help="concurrent cases"),
    ops: int = typer.Option(3, help="$update operations per case (sequential within a case)"),
    writers: int = typer.Option(20, help="concurrent writers on one case"),
    writes: int = typer.Option(5, help="successful writes per writer"),
    connections: int = typer.Option(100, help="HTTP connections of the load client"),
    port: int = typer.Option(18100, help="Serve HTTP port for the bench"),
    keep: bool = typer.Option(False, help="keep the bench cases in Redis"),
    router: bool = typer.Option(True, "--router/--no-router",
                                help="also run the case workload straight through the router (no HTTP)"),
    out: Path = typer.Option(None, help="write the result as JSON here"),
) -> None:
    """MOPED $update operations/s and p99 over HTTP with many concurrent cases; conflicts
    under concurrent writers on one case (no lost update)."""
    from deploy.app import start_ray
    from deploy.cli import get_config

    cfg = get_config(ctx)
    import contextlib

    from deploy.stack import bench_lease

    lease = contextlib.ExitStack()
    lease.enter_context(bench_lease(cfg, "automat bench moped"))  # stopped afterwards if it started it
    import ray
    import redis.asyncio as aioredis
    from ray import serve

    from actors.moped.app import composition_kind, serve_app
    from actors.runtime.router import register_kinds
    from actors.runtime.system import start_hosts

    start_ray(cfg, dashboard=False)
    try:
        kind = composition_kind(cfg)

        async def reg():
            r = aioredis.from_url(cfg.redis.url)
            await register_kinds(r, [kind])
            await r.aclose()

        asyncio.run(reg())
        start_hosts(cfg, kind)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve_app(cfg)
        res = asyncio.run(_run(f"http://127.0.0.1:{port}/moped", cases, ops, writers, writes, connections))
        ids = res.pop("_case_ids")
        if router:
            rres = asyncio.run(_run_router(cfg, cases, ops))
            ids += rres.pop("_router_ids")
            res.update(rres)
        if not keep:
            asyncio.run(_cleanup(cfg, ids))
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            lease.close()
    t = Table(title="automat bench moped", show_header=True)
    t.add_column("measure")
    t.add_column("value", justify="right")
    for k, v in res.items():
        t.add_row(k, str(v))
    console.print(t)
    console.print(f"machine: {os.cpu_count()} cores; load client, Serve proxy + ingress, shard hosts and Redis share "
                  "them; every operation is FHIR-validated and a durable, encrypted new version + Provenance")
    if out:
        out.write_text(json.dumps(res, indent=2))
    if res["lost_updates"] or res["cases_with_wrong_final_version"] or res["errors"] or res.get("router_errors"):
        raise typer.Exit(1)
