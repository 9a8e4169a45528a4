"""``automat efa ...`` operator commands and ``automat bench efa``.

```
automat efa status ECR_REF | --patient P --purpose Z   record status (no personal data shown)
automat efa access-log ECR_REF [--limit N]              who did what, when (audit)
automat efa enrol SUBJECT ORGANISATION [--role R]       a credential secret for openContext
automat bench efa [--records 10000] [--ops 2000]        provideData / retrieveData per s, p99, memory
```
Operator commands talk to the running cluster (``automat run``) through the router.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from actors.runtime.textui import data_row

efa_app = typer.Typer(help="EFA case records: status, access log, enrolment.", no_args_is_help=True)
console = Console()


def _cfg(ctx: typer.Context):
    from deploy.cli import get_config

    return get_config(ctx)


def _ts(t: float | None) -> str:
    if not t:
        return "-"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _resolve_ref(cfg, ecr_ref: str | None, patient: str | None, purpose: str | None) -> str:
    if ecr_ref:
        return ecr_ref
    if not (patient and purpose):
        console.print("[red]give ECR_REF or both --patient and --purpose[/]")
        raise typer.Exit(2)
    from actors.efa.service import record_key
    from actors.runtime.crypto import Pseudonymizer

    return record_key(Pseudonymizer.from_file(cfg.crypto.pseudonym_key_file), patient, purpose)


def _ask(cfg, ecr_ref: str, msg):
    from deploy.app import use_running_cluster

    use_running_cluster(cfg)
    import ray

    from actors.runtime.router import Router

    try:
        ray.init(address="auto", namespace=cfg.runtime.namespace, log_to_driver=False, logging_level="ERROR")
    except Exception as e:
        console.print(f"[red]cannot reach the running cluster ({type(e).__name__}: {escape(str(e))}); "
                      "is `automat run` up?[/]")
        raise typer.Exit(1) from None

    async def go():
        r = Router(cfg)
        try:
            return await r.ask("efa.record", ecr_ref, msg, timeout_s=15)
        finally:
            await r.close()

    try:
        return asyncio.run(go())
    finally:
        ray.shutdown()


@efa_app.command("status")
def status(
    ctx: typer.Context,
    ecr_ref: Optional[str] = typer.Argument(None, help="the record reference (pseudonymous)"),
    patient: Optional[str] = typer.Option(None, help="compute the reference from patient id + purpose"),
    purpose: Optional[str] = typer.Option(None),
) -> None:
    """Lifecycle status, consent, partition / document / participant counts of one record."""
    from protocols.efa.messages import RecordStatusQuery

    cfg = _cfg(ctx)
    ref = _resolve_ref(cfg, ecr_ref, patient, purpose)
    r = _ask(cfg, ref, RecordStatusQuery())
    if not r.ok:
        console.print(f"[red]{r.code}[/]: {escape(str(r.message))}")
        raise typer.Exit(1)
    d = r.data
    t = Table(title=f"EFA record {ref}")
    t.add_column("field")
    t.add_column("value")
    c = d.get("consent") or {}
    for k, v in [("status", d["status"]), ("since", _ts(d["status_since"])), ("created", _ts(d["created_at"])),
                 ("close reason", d["close_reason"] or "-"), ("partitions", d["partitions"]),
                 ("documents", d["documents"]), ("participants", d["participants"]),
                 ("consent valid until", _ts(c.get("valid_until"))), ("may extend", c.get("may_extend")),
                 ("may merge", c.get("may_merge")), ("revoked", c.get("revoked")),
                 ("access log entries", d["access_log_entries"]), ("generation", d["generation"])]:
        t.add_row(k, str(v))
    console.print(t)


@efa_app.command("access-log")
def access_log(
    ctx: typer.Context,
    ecr_ref: Optional[str] = typer.Argument(None),
    patient: Optional[str] = typer.Option(None),
    purpose: Optional[str] = typer.Option(None),
    limit: int = typer.Option(50, help="newest entries to show"),
) -> None:
    """The record's access log: every access and refusal, newest last."""
    from protocols.efa.messages import AccessLogQuery

    cfg = _cfg(ctx)
    ref = _resolve_ref(cfg, ecr_ref, patient, purpose)
    r = _ask(cfg, ref, AccessLogQuery(limit=limit))
    if not r.ok:
        console.print(f"[red]{r.code}[/]: {escape(str(r.message))}")
        raise typer.Exit(1)
    t = Table(title=f"access log of {ref}" + (f" ({r.data['dropped']} older entries dropped)" if r.data["dropped"] else ""))
    for col in ("at", "subject", "organisation", "operation", "outcome", "detail"):
        t.add_column(col)
    for e in r.data["entries"]:
        style = "" if e["outcome"] == "ok" else "red"
        data_row(t, _ts(e["at"]), e["sub"], e["org"], e["op"], e["outcome"], e["detail"], style=style)
    console.print(t)


@efa_app.command("enrol")
def enrol(ctx: typer.Context, subject: str, organisation: str, role: str = typer.Option("arzt")) -> None:
    """Print the credential (JSON) a consumer system hands to openContext for this participant."""
    from actors.efa.client import enrol_credential

    cred = enrol_credential(_cfg(ctx), subject, organisation, role)
    print(cred.model_dump_json())


# --------------------------------------------------------------------------- bench

def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100.0 * len(xs)))] if xs else float("nan")


def _rss(pid: int) -> int:
    """Resident set size of a local process (Linux /proc; the hosts run on this machine)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def _bench(cfg, records: int, ops: int, concurrency: int, port: int, doc_bytes: int, keep: bool) -> dict:
    import httpx
    import ray
    import redis.asyncio as aioredis
    from ray import serve

    from actors.efa.app import kinds
    from actors.efa.client import EfaClient, enrol_credential
    from actors.efa.http import build_app
    from actors.efa.service import record_key
    from actors.runtime.blobs import BlobStore
    from actors.runtime.crypto import KeyRing, Pseudonymizer
    from actors.runtime.kinds import shard_of
    from actors.runtime.router import Router, register_kinds
    from actors.runtime.store import state_key, timer_payloads, timer_zset, timer_member
    from actors.runtime.system import start_hosts
    from protocols.efa.messages import CreateECR
    from protocols.efa.model import Caller, Consent

    r = aioredis.from_url(cfg.redis.url)
    ks = kinds(cfg)
    await register_kinds(r, ks)
    handles = {}
    for k in ks:
        handles[k.name] = await asyncio.to_thread(start_hosts, cfg, k)
    rec_hosts = handles["efa.record"]
    pids = await asyncio.gather(*[h.pid.remote() for h in rec_hosts])
    rss0 = sum(_rss(p) for p in pids)

    router = Router(cfg, kinds=ks)
    ps = Pseudonymizer.from_file(cfg.crypto.pseudonym_key_file)
    run = uuid.uuid4().hex[:8]
    sub, org = f"bench-arzt-{run}", f"bench-org-{run}"
    caller = Caller(sub=sub, org=org, role="arzt")
    valid = time.time() + 30 * 86400
    keys, parts = [], []
    t0 = time.perf_counter()
    for start in range(0, records, 1000):
        batch = []
        for i in range(start, min(records, start + 1000)):
            patient = f"bench-{run}-{i}"
            key = record_key(ps, patient, "Z00.0")
            keys.append(key)
            batch.append(router.ask("efa.record", key, CreateECR(
                caller=caller, patient=patient, purpose="Z00.0", title="bench",
                consent=Consent(participants=[org], valid_until=valid, may_extend=True, may_merge=True))))
        for rep in await asyncio.gather(*batch):
            parts.append(rep.data["partition_id"])
    create_s = time.perf_counter() - t0
    await asyncio.sleep(0.5)
    rss1 = sum(_rss(p) for p in pids)

    # entity level (router -> record hosts; no HTTP, no blob I/O): the record's own capacity
    from protocols.efa.messages import ProvideData, RetrieveDocs
    from protocols.efa.model import DocumentIn

    ent_ids: list[str] = []

    async def run_direct(fn, n: int, conc: int) -> tuple[float, list[float]]:
        lat: list[float] = []
        it = iter(range(n))

        async def worker():
            for i in it:
                t = time.perf_counter()
                await fn(i)
                lat.append((time.perf_counter() - t) * 1000)

        t = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(conc)])
        return time.perf_counter() - t, lat

    async def e_provide(i: int):
        pid = parts[(i * 7919) % len(parts)]
        d = DocumentIn(local_id="d", title="bench", size=doc_bytes, sha256="0" * 64,
                       blob_ref=f"efa/00/{uuid.uuid4().hex[:30]}")
        rep = await router.ask("efa.record", pid.rsplit(".", 1)[0], ProvideData(caller=caller, partition_id=pid,
                                                                               documents=[d]))
        ent_ids.append(rep.data["document_ids"]["d"])

    async def e_retrieve(i: int):
        did = ent_ids[(i * 104729) % len(ent_ids)]
        rep = await router.ask("efa.record", did.rsplit(".", 1)[0], RetrieveDocs(caller=caller, document_ids=[did]))
        assert rep.ok

    e_ops = max(ops, 5000)
    ep_s, ep_lat = await run_direct(e_provide, e_ops, 256)
    er_s, er_lat = await run_direct(e_retrieve, e_ops, 256)

    await asyncio.to_thread(serve.start, http_options={"host": "127.0.0.1", "port": port})
    await asyncio.to_thread(serve.run, build_app(cfg, access_log=False), name="efa", route_prefix="/efa")
    base = f"http://127.0.0.1:{port}/efa"
    http = httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency,
                                                           max_keepalive_connections=concurrency))
    client = EfaClient(base, client=http)
    await client.open_context(enrol_credential(cfg, sub, org))
    payload = os.urandom(doc_bytes)
    doc_ids: list[str] = []

    async def run_ops(fn) -> tuple[float, list[float]]:
        lat: list[float] = []
        it = iter(range(ops))

        async def worker():
            for i in it:
                t = time.perf_counter()
                await fn(i)
                lat.append((time.perf_counter() - t) * 1000)

        # warm-up
        await fn(-1)
        t = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        return time.perf_counter() - t, lat

    async def provide(i: int):
        pid = parts[(i * 7919) % len(parts)]
        out = await client.provide(pid, [EfaClient.document("d", payload, title="bench")])
        doc_ids.append(out.document_ids["d"])

    async def retrieve(i: int):
        docs = await client.retrieve([doc_ids[(i * 104729) % len(doc_ids)]])
        assert len(EfaClient.content(docs[0])) == doc_bytes

    prov_s, prov_lat = await run_ops(provide)
    retr_s, retr_lat = await run_ops(retrieve)
    await http.aclose()

    await asyncio.to_thread(serve.delete, "efa")
    stats = await asyncio.gather(*[h.stats.remote() for h in rec_hosts])
    if not keep:  # remove what the bench wrote: records, timers, blobs
        blobs = BlobStore(cfg.blob.dir, KeyRing.from_file(cfg.crypto.keys_file))
        from protocols.efa.model import RecordState

        for chunk in range(0, len(keys), 500):
            ks_ = keys[chunk:chunk + 500]
            pipe = r.pipeline(transaction=False)
            for k in ks_:
                pipe.hget(state_key("efa.record", k), "s")
            raws = await pipe.execute()
            for k, raw in zip(ks_, raws):
                if raw:
                    st = RecordState.model_validate_json(blobs.keyring.decrypt(raw, f"efa.record:{k}".encode()))
                    for d in st.documents.values():
                        if d.blob_ref:
                            blobs.delete(d.blob_ref)
            pipe = r.pipeline(transaction=False)
            for k in ks_:
                sh = shard_of(k, cfg.runtime.num_shards)
                pipe.delete(state_key("efa.record", k))
                pipe.zrem(timer_zset("efa.record", sh), timer_member(k, "lapse"))
                pipe.hdel(timer_payloads("efa.record", sh), timer_member(k, "lapse"))
            await pipe.execute()
    await router.close()
    for hs in handles.values():
        for h in hs:
            ray.kill(h)
    await r.aclose()
    return {
        "records": records,
        "create_records_per_s (router)": round(records / create_s),
        "provideData_ops": ops,
        "provideData_per_s": round(ops / prov_s, 1),
        "provideData_p50_ms": round(_pct(prov_lat, 50), 2),
        "provideData_p99_ms": round(_pct(prov_lat, 99), 2),
        "retrieveData_ops": ops,
        "retrieveData_per_s": round(ops / retr_s, 1),
        "retrieveData_p50_ms": round(_pct(retr_lat, 50), 2),
        "retrieveData_p99_ms": round(_pct(retr_lat, 99), 2),
        "http_concurrency": concurrency,
        "entity_provideData_per_s (router, 256 in flight)": round(e_ops / ep_s),
        "entity_provideData_p99_ms": round(_pct(ep_lat, 99), 2),
        "entity_retrieveData_per_s (router, 256 in flight)": round(e_ops / er_s),
        "entity_retrieveData_p99_ms": round(_pct(er_lat, 99), 2),
        "document_bytes": doc_bytes,
        "record_host_rss_before_mb": round(rss0 / 2**20, 1),
        "record_host_rss_after_mb": round(rss1 / 2**20, 1),
        "memory_per_hosted_record_bytes": round((rss1 - rss0) / max(1, records)),
        "active_records": sum(s["active_entities"] for s in stats),
        "commit_batches": sum(s["commit_batches"] for s in stats),
    }


def bench_efa(
    ctx: typer.Context,
    records: int = typer.Option(10_000, help="case records to create (and host) first"),
    ops: int = typer.Option(2000, help="provideData calls, then as many retrieveData calls"),
    concurrency: int = typer.Option(32, help="concurrent HTTP clients"),
    port: int = typer.Option(18100, help="Serve HTTP port for the bench"),
    doc_bytes: int = typer.Option(2048, help="document size"),
    keep: bool = typer.Option(False, help="keep the bench records in Redis"),
    out: Path = typer.Option(None, help="write the result as JSON here"),
) -> None:
    """EFA: provideData / retrieveData per second and p99 over the HTTP API with N hosted
    records, and memory per hosted record (RSS growth of the record hosts / records)."""
    from deploy.app import start_ray

    cfg = _cfg(ctx)
    import contextlib

    import ray

    from deploy.stack import bench_lease

    lease = contextlib.ExitStack()
    lease.enter_context(bench_lease(cfg, "automat bench efa"))  # stopped afterwards if it started it
    os.environ.pop("RAY_ADDRESS", None)
    start_ray(cfg, dashboard=False)
    try:
        res = asyncio.run(_bench(cfg, records, ops, concurrency, port, doc_bytes, keep))
    finally:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
        lease.close()
    t = Table(title="automat bench efa")
    t.add_column("measure")
    t.add_column("value", justify="right")
    for k, v in res.items():
        t.add_row(k, str(v))
    console.print(t)
    console.print(f"machine: {os.cpu_count()} cores; every provide/retrieve is verified (Ed25519), audited "
                  "(durable record write) and goes through the encrypted blob store")
    if out:
        out.write_text(json.dumps(res, indent=2))
