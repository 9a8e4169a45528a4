"""The HL7 capability: entity kinds, the supervision subtree, the demo.

Subtree ``hl7``: the shard hosts of ``hl7.patient``, ``hl7.case``, ``hl7.pending``,
``hl7.bridge`` (MOPED bridge, HTTP) and ``hl7.export`` (DFT^P03 to the KIS), then one
listener actor per configured interface (``hl7.listener.<name>``).
"""

from __future__ import annotations

from actors.hl7.keys import BRIDGE, CASE, EXPORT, PATIENT, PENDING
from actors.hl7.listener import listener_name
from actors.hl7.settings import Hl7Settings, load_hl7_settings
from actors.runtime.kinds import EntityKind
from actors.runtime.system import host_child_specs
from supervisors.spec import ChildSpec, SupervisorSpec

LISTENER_ACTOR = "actors.hl7.listener:Hl7Listener"


def kinds(cfg, settings: Hl7Settings | None = None) -> list[EntityKind]:
    s = settings or load_hl7_settings(cfg)
    n = s.hosts
    return [
        EntityKind(name=PATIENT, entity="actors.hl7.entities:PatientEntity", hosts=n),
        EntityKind(name=CASE, entity="actors.hl7.entities:CaseEntity", hosts=n),
        EntityKind(name=PENDING, entity="actors.hl7.entities:PendingEntity", hosts=1),
        EntityKind(name=BRIDGE, entity="actors.hl7.bridge:BridgeEntity", hosts=1,
                   ports="actors.hl7.ports:make_ports"),
        EntityKind(name=EXPORT, entity="actors.hl7.export:ExportEntity", hosts=1, stateless=True),
    ]


def listener_spec(cfg, iface, moped_url: str | None) -> ChildSpec:
    return ChildSpec(name=listener_name(iface.name), actor=LISTENER_ACTOR,
                     args=[cfg, iface.model_dump(mode="json"), moped_url],
                     options={"num_cpus": 0, "max_concurrency": 1000})


def supervisor_spec(cfg, settings: Hl7Settings | None = None) -> SupervisorSpec:
    s = settings or load_hl7_settings(cfg)
    hosts = SupervisorSpec(
        name="hl7.hosts", strategy="one_for_one", parallel_start=True,
        children=[ChildSpec(**c) for k in kinds(cfg, s) for c in host_child_specs(cfg, k)],
    )
    listeners = [listener_spec(cfg, i, s.moped_url) for i in s.interfaces]
    return SupervisorSpec(name="hl7", strategy="rest_for_one", children=[hosts, *listeners])


async def demo(cfg, router, console) -> None:
    """A stay over MLLP to the default interface: admission (with an admission diagnosis),
    transfer, discharge (with the discharge diagnosis), the services (DFT^P03 with FT1);
    with ``moped_url`` set (the local default) the case ends as a billed MOPED case."""
    import asyncio
    import time

    from actors.hl7.client import send_messages
    from actors.hl7.keys import case_key, pseudonymizer_for
    from actors.hl7.messages import GetBridge
    from actors.hl7.samples import adt

    s = load_hl7_settings(cfg)
    tcp = [i for i in s.interfaces if i.config.transport == "tcp"]
    if not tcp:
        return
    port = tcp[0].config.tcp.port
    unit = tcp[0].config.mapping.rows[0].billing_unit
    run = time.strftime("%H%M%S")
    case = f"9{run}"
    msgs = [adt("A01", f"DEMO{run}1", "4711", case, ward="NOTF", dg1=[("R10.3", "A")], event_ts="20260301080000"),
            adt("A02", f"DEMO{run}2", "4711", case, ward="CHIR3", event_ts="20260301120000"),
            adt("A03", f"DEMO{run}3", "4711", case, ward="CHIR3", dg1=[("K35.8", "F")], event_ts="20260305100000",
                discharge_ts="20260305100000"),
            adt("P03", f"DEMO{run}4", "4711", case, message_type="DFT", ward="CHIR3", event_ts="20260305110000",
                ft1=[("T1", "01100", "1"), ("T2", "02300", "2")])]
    for _ in range(20):
        try:
            acks = await send_messages("127.0.0.1", port, msgs)
            break
        except OSError:
            await asyncio.sleep(0.5)
    else:
        console.print("[red]hl7 demo: listener not reachable[/]")
        return
    console.print(f"[bold]hl7[/] sent A01/A02/A03 + DFT^P03 (case {case}) over MLLP to port {port}: ACKs "
                  + ", ".join(a.split("|")[1] if a else "-" for a in (_msa(x) for x in acks))
                  + f"; `automat hl7 search {case}` shows the case")
    if not s.moped_url:
        return
    key = case_key(pseudonymizer_for(cfg), f"{unit}/{case}")
    v = None
    for _ in range(60):
        v = await router.ask(BRIDGE, key, GetBridge())
        if len(v.done) + len(v.refused) >= 4:
            break
        await asyncio.sleep(0.5)
    if v is not None:
        console.print(f"[bold]hl7[/] MOPED bridge ({s.moped_url}): Composition/{v.composition_id} "
                      f"operations {' '.join(v.done) or '-'}"
                      + (f"; refused: {'; '.join(v.refused)}" if v.refused else "")
                      + (f"; waiting: {v.waiting}" if v.waiting else ""))


def _msa(ack: bytes) -> str:
    for seg in ack.decode("latin-1").split("\r"):
        if seg.startswith("MSA"):
            return seg
    return ""
