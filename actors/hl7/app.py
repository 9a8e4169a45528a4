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
    """Send an admission, a transfer and a discharge to the default MLLP interface."""
    import asyncio

    from actors.hl7.client import send_messages
    from actors.hl7.samples import adt

    s = load_hl7_settings(cfg)
    tcp = [i for i in s.interfaces if i.config.transport == "tcp"]
    if not tcp:
        return
    port = tcp[0].config.tcp.port
    msgs = [adt("A01", "DEMO1", "4711", "900001"), adt("A02", "DEMO2", "4711", "900001", ward="STAT2"),
            adt("A03", "DEMO3", "4711", "900001")]
    for _ in range(20):
        try:
            acks = await send_messages("127.0.0.1", port, msgs)
            break
        except OSError:
            await asyncio.sleep(0.5)
    else:
        console.print("[red]hl7 demo: listener not reachable[/]")
        return
    console.print(f"[bold]hl7[/] sent A01/A02/A03 over MLLP to port {port}: ACKs "
                  + ", ".join(a.split("|")[1] if a else "-" for a in (_msa(x) for x in acks)))


def _msa(ack: bytes) -> str:
    for seg in ack.decode("latin-1").split("\r"):
        if seg.startswith("MSA"):
            return seg
    return ""
