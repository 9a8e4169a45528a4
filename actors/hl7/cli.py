"""``automat hl7 ...``: the pending list, take-over, search, the message log, file fetch, bench.

```
automat hl7 pending [--unit PRAX1]      patients received but not taken over
automat hl7 take ID                     take a pending patient over (ID or a unique prefix)
automat hl7 search NUMBER               patients / cases with this KIS patient or case number
automat hl7 messages [--errors]         the message log (every message with its outcome)
automat hl7 show REF                    one kept message, decrypted, with its ACK
automat hl7 fetch [INTERFACE]           read the drop directory now (DURIA "externe Datenübernahme")
automat hl7 bench                       messages/s over 1 and 10 MLLP connections, p99 ACK time
```
(``automat bench hl7`` is the same bench, registered on ``deploy.bench``'s app.)
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from actors.runtime.textui import data_row

hl7_app = typer.Typer(help="HL7 v2 import (DURIA-style): pending patients, take-over, search, messages, bench.",
                      no_args_is_help=True)
console = Console()


def _cfg(ctx: typer.Context):
    from deploy.cli import get_config

    return get_config(ctx)


def _connect(cfg) -> None:
    from supervisors.status import _connect as connect

    problem = connect(cfg.runtime.namespace)
    if problem:
        console.print(f"[red]automat is not running:[/red] {problem}")
        raise typer.Exit(1)


def _run(cfg, fn):
    from actors.runtime.router import Router

    async def main():
        router = Router(cfg)
        try:
            return await fn(router)
        finally:
            await router.close()

    return asyncio.run(main())


def _units(cfg, unit: str | None) -> list[str]:
    from actors.hl7.settings import load_hl7_settings

    return [unit] if unit else load_hl7_settings(cfg).billing_units()


@hl7_app.command("pending")
def pending_cmd(ctx: typer.Context, unit: Optional[str] = typer.Option(None, help="only this billing unit")) -> None:
    """Patients received over HL7 and not yet taken over ("LKIS / 1.Einlesen")."""
    from actors.hl7 import ops

    cfg = _cfg(ctx)
    _connect(cfg)
    rows = _run(cfg, lambda r: ops.pending(r, _units(cfg, unit)))
    t = Table(title=f"pending patients ({len(rows)})")
    for c in ("id", "unit", "patient no.", "name", "born", "cases", "received", "discharged"):
        t.add_column(c)
    for bu, e in rows:
        data_row(t, e.patient_key[:13], bu, e.patient_number, ", ".join(x for x in (e.family, e.given) if x),
                 str(e.birth_date or ""), " ".join(e.case_numbers),
                 time.strftime("%Y-%m-%d %H:%M", time.localtime(e.received_at)), str(e.discharged_at or ""))
    console.print(t)


@hl7_app.command("take")
def take_cmd(ctx: typer.Context, ident: str = typer.Argument(..., metavar="ID")) -> None:
    """Take a pending patient over (its cases are created, as the interface is configured)."""
    from actors.hl7 import ops

    cfg = _cfg(ctx)
    _connect(cfg)
    res = _run(cfg, lambda r: ops.take(r, _units(cfg, None), ident))
    if not res.ok:
        console.print(f"[red]not taken:[/red] {escape(str(res.reason))}")
        raise typer.Exit(1)
    console.print(f"taken over; cases created: {res.cases_created}")


@hl7_app.command("search")
def search_cmd(ctx: typer.Context, number: str = typer.Argument(..., metavar="NUMBER")) -> None:
    """Find patients by KIS patient number and cases by case/order number ("2.Anzeige Patientenliste")."""
    from actors.hl7 import ops
    from actors.hl7.keys import pseudonymizer_for
    from actors.hl7.settings import load_hl7_settings

    cfg = _cfg(ctx)
    _connect(cfg)
    found = _run(cfg, lambda r: ops.search(r, pseudonymizer_for(cfg), load_hl7_settings(cfg), number))
    if not found["patients"] and not found["cases"]:
        console.print(f"nothing found for {number!r}")
        raise typer.Exit(1)
    for p in found["patients"]:
        console.print(f"patient {p.key[:13]}  unit {p.billing_unit}  no. {p.patient_number}  "
                      f"{p.person.family or ''}, {p.person.given or ''}  taken={p.taken}  cases={len(p.case_keys)}")
    for c in found["cases"]:
        console.print(f"case {c.key[:13]}  unit {c.billing_unit}  no. {c.case_number}  status {c.status}  "
                      f"events {' '.join(c.events)}  diagnoses {len(c.diagnoses)}  services {len(c.services)}"
                      + (f"  removed from {', '.join(c.billing_units_removed)}" if c.billing_units_removed else ""))


@hl7_app.command("messages")
def messages_cmd(ctx: typer.Context, limit: int = typer.Option(30), errors: bool = typer.Option(False, "--errors")) -> None:
    """The message log: every received message with its ACK and error code (newest first)."""
    import redis.asyncio as aioredis

    from actors.hl7 import ops

    cfg = _cfg(ctx)

    async def main():
        r = aioredis.from_url(cfg.redis.url)
        try:
            return await ops.messages(r, limit, errors)
        finally:
            await r.aclose()

    rows = asyncio.run(main())
    t = Table(title="hl7 messages")
    for c in ("at", "interface", "type", "control id", "ack", "error", "ref"):
        t.add_column(c, overflow="fold")
    for d in rows:
        data_row(t, time.strftime("%H:%M:%S", time.localtime(float(d["at"]))), d["iface"], d["type"], d["cid"],
                 d["ack"] or "-", d["error"], d["ref"])
    console.print(t)


@hl7_app.command("show")
def show_cmd(ctx: typer.Context, ref: str) -> None:
    """One kept message (decrypted) with the outcome and ACK of each message in it."""
    from actors.hl7 import ops
    from actors.runtime.blobs import BlobStore
    from actors.runtime.crypto import KeyRing

    cfg = _cfg(ctx)
    rec = ops.show(BlobStore(cfg.blob.dir, KeyRing.from_file(cfg.crypto.keys_file)), ref)
    console.print(f"interface {rec['interface']}  source {rec['source']}")
    print(rec["raw"].replace("\r", "\n"))
    for o in rec["outcomes"]:
        console.print(escape(f"-> {o['type']} {o['control_id']}: {o['ack'] or 'no ACK'} {o['error']} {o['reason']}"))


@hl7_app.command("fetch")
def fetch_cmd(ctx: typer.Context, interface: Optional[str] = typer.Argument(None)) -> None:
    """Read the drop directory of file interfaces now ("3.externe Datenübernahme")."""
    import ray

    from actors.hl7.listener import listener_name
    from actors.hl7.settings import load_hl7_settings
    from supervisors.resolve import resolve

    cfg = _cfg(ctx)
    _connect(cfg)
    s = load_hl7_settings(cfg)
    names = [interface] if interface else [i.name for i in s.interfaces if i.config.transport == "file"]
    for n in names:
        h = resolve(listener_name(n), namespace=cfg.runtime.namespace)
        console.print(f"{n}: {ray.get(h.scan.remote())}")


# --------------------------------------------------------------------------- bench


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100.0 * len(xs)))] if xs else float("nan")


async def _bench(cfg, messages: int, validate: bool) -> list[dict]:
    import ray
    import redis.asyncio as aioredis

    from actors.hl7.app import kinds
    from actors.hl7.client import Hl7Client, free_port, msa
    from actors.hl7.listener import Hl7Listener
    from actors.hl7.samples import adt
    from actors.hl7.settings import Hl7Settings, InterfaceSettings
    from actors.runtime.router import register_kinds
    from actors.runtime.system import start_hosts

    r = aioredis.from_url(cfg.redis.url)
    ks = kinds(cfg, Hl7Settings())
    await register_kinds(r, ks)
    await r.aclose()
    for k in ks:
        await asyncio.to_thread(start_hosts, cfg, k)
    run = uuid.uuid4().hex[:6]
    iface = InterfaceSettings.model_validate({
        "config": {"name": f"bench{run}", "transport": "tcp", "tcp": {"port": free_port()}, "case_creation": "background",
                   "mapping": {"rows": [{"billing_unit": f"BENCH{run}"}]}},
        "validate_hl7apy": validate,
    })
    listener = ray.remote(Hl7Listener).options(num_cpus=0, max_concurrency=1000).remote(
        cfg, iface.model_dump(mode="json"), None)
    port = (await listener.ready.remote())["port"]
    results = []
    try:
        for conns in (1, 10):
            per = max(1, messages // conns)
            lat: list[float] = []
            bad = 0

            async def one(c: int) -> None:
                nonlocal bad
                async with Hl7Client("127.0.0.1", port) as cl:
                    for i in range(per):
                        trig = ("A01", "A08", "A03")[i % 3]
                        m = adt(trig, f"B{run}{conns}{c}x{i}", f"{conns}{c}{i // 3}", f"9{conns}{c}{i // 3}")
                        t = time.perf_counter()
                        ack = await cl.request(m)
                        lat.append((time.perf_counter() - t) * 1000)
                        if msa(ack)[1:2] != ["AA"]:
                            bad += 1

            t0 = time.perf_counter()
            await asyncio.gather(*[one(c) for c in range(conns)])
            dt = time.perf_counter() - t0
            n = per * conns
            results.append({"connections": conns, "hl7apy_validation": validate, "messages": n,
                            "seconds": round(dt, 2), "messages_per_s": round(n / dt, 1),
                            "ack_p50_ms": round(_pct(lat, 50), 1), "ack_p99_ms": round(_pct(lat, 99), 1),
                            "ack_mean_ms": round(statistics.fmean(lat), 1), "not_AA": bad})
    finally:
        ray.kill(listener)
    return results


def bench_hl7(
    ctx: typer.Context,
    messages: int = typer.Option(300, help="messages per run (ADT A01/A08/A03, each a durable patient + case)"),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="hl7apy structural pass (20-240 ms/msg)"),
    out: Path = typer.Option(None, help="write the result as JSON here"),
) -> None:
    """Messages/s over one MLLP connection and over 10, with p50/p99 ACK time."""
    from deploy.app import start_ray

    cfg = _cfg(ctx)
    import ray

    from deploy.stack import bench_lease

    with bench_lease(cfg, "automat bench hl7"):  # a test session that ends meanwhile does not stop the stack under us
        start_ray(cfg, dashboard=False)
        try:
            res = asyncio.run(_bench(cfg, messages, validate))
        finally:
            ray.shutdown()
    t = Table(title="automat bench hl7 (MLLP, one ACK per message after the import is durable)")
    for c in res[0]:
        t.add_column(c, justify="right")
    for row in res:
        t.add_row(*[str(v) for v in row.values()])
    console.print(t)
    console.print(f"machine: {os.cpu_count()} cores")
    if out:
        out.write_text(json.dumps(res, indent=2))
    if any(r["not_AA"] for r in res):
        raise typer.Exit(1)


hl7_app.command("bench")(bench_hl7)
try:  # `automat bench hl7` as well, when deploy.bench's app is mounted
    from deploy.bench import bench_app

    bench_app.command("hl7")(bench_hl7)
except ImportError:  # pragma: no cover
    pass
