"""The MOPED capability: Composition entity kind, its shard hosts, the HTTP ingress."""

from __future__ import annotations

from actors.moped.composition import KIND
from actors.moped.config import MopedConfig
from actors.runtime.kinds import EntityKind
from actors.runtime.system import host_child_specs
from supervisors.spec import ChildSpec, SupervisorSpec


def composition_kind(cfg, mcfg: MopedConfig | None = None) -> EntityKind:
    m = mcfg or MopedConfig()
    return EntityKind(name=KIND, entity="actors.moped.composition:CompositionEntity", hosts=m.hosts,
                      ports="actors.moped.config:make_ports")


def kinds(cfg) -> list[EntityKind]:
    return [composition_kind(cfg)]


def supervisor_spec(cfg) -> SupervisorSpec:
    children = [ChildSpec(**spec) for k in kinds(cfg) for spec in host_child_specs(cfg, k)]
    return SupervisorSpec(name="moped", strategy="one_for_one", children=children)


def serve_app(cfg, mcfg: MopedConfig | None = None):
    """Deploy the FHIR endpoint on Ray Serve under ``/moped`` (Serve must be started)."""
    from ray import serve

    from actors.moped.http import deployment

    return serve.run(deployment(cfg, mcfg), name="moped", route_prefix="/moped")


async def demo(cfg, router, console) -> None:
    """Start the FHIR endpoint and run one stay through it (admission to decision)."""
    import asyncio

    from rich.markup import escape

    import httpx
    from ray import serve

    from actors.moped.stay import run_stay

    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        await asyncio.to_thread(serve_app, cfg)
    except Exception as e:  # Serve already running elsewhere, port taken, ...
        console.print(f"[yellow]moped[/] FHIR endpoint not started: {escape(str(e))}")
        return
    base = "http://127.0.0.1:8000/moped"
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        case_id, vids = await run_stay(client)
    console.print(f"[bold]moped[/] FHIR endpoint {base}; demo stay Composition/{case_id}: "
                  f"versions {vids[0]}..{vids[-1]} (`automat moped show {case_id}`)")
