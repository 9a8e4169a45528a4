"""``automat moped ...``: operator commands for MOPED cases.

``automat moped show ID`` prints a case's version history with its Provenance, read from
the durable entity state in Redis (decrypted with the configured keys; no Ray needed).
Patient data is not printed.
"""

from __future__ import annotations

import asyncio
import json

import typer
from rich.console import Console
from rich.table import Table

from actors.runtime.textui import data_row

moped_app = typer.Typer(help="MOPED FHIR billing cases.", no_args_is_help=True)
console = Console()


async def load_case(cfg, case_id: str):
    """The case's durable state (``CaseState``) or None."""
    import redis.asyncio as aioredis

    from actors.moped.composition import KIND
    from actors.runtime.crypto import KeyRing
    from actors.runtime.store import state_key
    from protocols.moped.messages import CaseState

    r = aioredis.from_url(cfg.redis.url)
    try:
        raw = await r.hget(state_key(KIND, case_id), "s")
    finally:
        await r.aclose()
    if raw is None:
        return None
    plain = KeyRing.from_file(cfg.crypto.keys_file).decrypt(raw, f"{KIND}:{case_id}".encode())
    return CaseState.model_validate_json(plain)


def history_rows(state) -> list[dict]:
    from actors.moped.config import MopedConfig
    from protocols.moped.case import build_composition

    custodian = MopedConfig().custodian
    rows = []
    for v in state.versions:
        p, c = v.provenance, build_composition(state, v.vid, custodian)
        agent = (p.get("agent") or [{}])[0]
        rows.append({
            "vid": v.vid,
            "activity": f"${v.activity}",
            "recorded": v.recorded,
            "workflow": c["useContext"][0]["valueCodeableConcept"]["coding"][0]["code"],
            "status": c.get("status"),
            "who": (agent.get("who") or {}).get("reference"),
            "on_behalf_of": (agent.get("onBehalfOf") or {}).get("reference"),
            "provenance": f"Provenance/{p['id']}",
            "target": p["target"][0]["reference"],
            "previous": ((p.get("entity") or [{}])[0].get("what") or {}).get("reference"),
            "sections": {s["code"]["coding"][0]["code"]: len(s.get("entry", [])) for s in c.get("section", [])},
        })
    return rows


@moped_app.command("show")
def show(
    ctx: typer.Context,
    case_id: str = typer.Argument(..., help="the case (Composition) id"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """A case's version history with the Provenance of every version."""
    from deploy.cli import get_config

    cfg = get_config(ctx)
    try:
        state = asyncio.run(load_case(cfg, case_id))
    except Exception as e:
        print(f"error: cannot read case {case_id}: {type(e).__name__}: {e}")
        raise typer.Exit(1) from None
    if state is None:
        print(f"no case Composition/{case_id}")
        raise typer.Exit(1)
    rows = history_rows(state)
    if as_json:
        print(json.dumps({"case": case_id, "current_version": state.vid, "workflow": state.workflow,
                          "sealed": state.sealed, "versions": rows}, indent=2))
        return
    t = Table(title=f"Composition/{case_id}: version {state.vid}, {state.workflow}"
                    f"{' (sealed)' if state.sealed else ''}")
    for col in ("vid", "operation", "recorded", "workflow", "status", "agent.who", "agent.onBehalfOf",
                "Provenance", "entity (previous)"):
        t.add_column(col, overflow="fold")
    for r in rows:
        data_row(t, str(r["vid"]), r["activity"], r["recorded"], r["workflow"], r["status"], r["who"],
                 r["on_behalf_of"], r["provenance"], r["previous"] or "-")
    console.print(t)
    last = rows[-1]["sections"]
    console.print("sections: " + ", ".join(f"{k} {n}" for k, n in last.items()))
