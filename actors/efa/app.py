"""EFA capability: entity kinds, supervision subtree, HTTP ingress, demo."""

from __future__ import annotations

from actors.efa.settings import EfaSettings
from actors.runtime.kinds import EntityKind
from actors.runtime.system import host_child_specs
from supervisors.spec import ChildSpec, SupervisorSpec

RECORD = "efa.record"
PATIENT = "efa.patient"
JANITOR = "efa.janitor"


def kinds(cfg, *, ports: str = "actors.efa.ports:make_ports") -> list[EntityKind]:
    s = EfaSettings()
    return [
        EntityKind(name=RECORD, entity="actors.efa.record:CaseRecord", hosts=s.record_hosts, ports=ports),
        EntityKind(name=PATIENT, entity="actors.efa.index:PatientIndex", hosts=1),
        EntityKind(name=JANITOR, entity="actors.efa.index:Janitor", hosts=1, stateless=True,
                   ports="actors.efa.ports:make_janitor_ports"),
    ]


def supervisor_spec(cfg, *, name: str = "efa") -> SupervisorSpec:
    hosts = [ChildSpec(**d) for k in kinds(cfg) for d in host_child_specs(cfg, k)]
    return SupervisorSpec(name=name, strategy="one_for_one", max_restarts=20, max_seconds=60,
                          parallel_start=True, children=hosts)


def start_http(cfg, *, route_prefix: str = "/efa", port: int = 8000):
    """Deploy the HTTP ingress on Ray Serve (``http://127.0.0.1:<port><route_prefix>``)."""
    from ray import serve

    from actors.efa.http import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg, EfaSettings().ingress_replicas), name="efa", route_prefix=route_prefix)
    return f"http://127.0.0.1:{port}{route_prefix}"


async def demo(cfg, router, console, *, base_url: str | None = None) -> None:
    """Open two contexts, create a record, merge, provide, list, retrieve — over HTTP."""
    import asyncio
    import time
    import uuid

    from actors.efa.client import EfaClient, enrol_credential
    from protocols.efa.api import Consent

    base = base_url or await asyncio.to_thread(start_http, cfg)
    console.print(f"[bold]efa[/] HTTP API on {base} (OpenAPI: {base}/openapi.json)")
    a = EfaClient(base)
    b = EfaClient(base)
    await a.open_context(enrol_credential(cfg, "arzt-a", "praxis-a"))
    await b.open_context(enrol_credential(cfg, "arzt-b", "klinik-b"))
    patient, purpose = f"demo-{uuid.uuid4().hex[:6]}", "I21.0"
    c1 = Consent(participants=["arzt-a", "klinik-b"], valid_until=time.time() + 86400, may_extend=True, may_merge=True)
    r1 = await a.create_ecr(patient, purpose, c1, title="Hausarzt")
    console.print(f"  createECR (arzt-a): {r1.outcome} ecr={r1.ecr_ref[:8]}… partition={r1.partition_id[-3:]}")
    p = await a.provide(r1.partition_id, [a.document("brief", b"Arztbrief ...", title="Arztbrief", mime_type="text/plain")])
    console.print(f"  provideData: {list(p.document_ids.values())}")
    parts = await b.list_partitions(patient)
    console.print(f"  listPartitions (klinik-b): {len(parts)} partition(s)")
    docs = await b.retrieve(list(p.document_ids.values()))
    console.print(f"  retrieveData (klinik-b): {[d.title for d in docs]}")
    await a.aclose()
    await b.aclose()
