"""Synthetic HL7 v2.5 ADT/DFT messages (German conventions) for tests, bench and demo.

Names and numbers are invented. PID-3 ``nnn^^^KLINIK^PI``, PV1-19 ``nnn^^^KLINIK^VN``.
"""

from __future__ import annotations


def adt(trigger: str, control_id: str, patient: str, case: str, *, patient_class: str = "I",
        contract: str = "K", ward: str = "STAT1", dept: str = "CHIR", family: str = "Mustermann",
        given: str = "Erika", birth: str = "19700101", version: str = "2.5", dg1: list[tuple[str, str]] | None = None,
        ft1: list[tuple[str, str, str]] | None = None, message_type: str = "ADT", ack_mode: str = "",
        zbe: str | None = None, event_ts: str = "20260301101500", discharge_ts: str = "",
        pid2: str = "", pid18: str = "", orc: list[str] | None = None) -> str:
    structure = {"A01": "ADT_A01", "A04": "ADT_A01", "A08": "ADT_A01", "A13": "ADT_A01", "A02": "ADT_A02",
                 "A03": "ADT_A03", "A11": "ADT_A09", "A12": "ADT_A12", "P03": "DFT_P03"}.get(trigger, "")
    msh = (f"MSH|^~\\&|KIS|KLINIK|AUTOMAT|PRAXIS|{event_ts}||{message_type}^{trigger}^{structure}|{control_id}|P|{version}"
           + (f"|||{ack_mode}|{ack_mode}" if ack_mode else ""))
    pv1 = ["PV1", "1", patient_class, f"{ward}^^^{dept}", "R", "", "", "", "", "", "", "", "", "", "", "", "", "", "",
           f"{case}^^^KLINIK^VN"] + [""] * 4 + [contract]
    pv1 += [""] * (44 - len(pv1)) + [event_ts if trigger == "A01" else "", discharge_ts]
    segs = [msh, f"EVN|{trigger}|{event_ts}", f"PID|1|{pid2}|{patient}^^^KLINIK^PI||{family}^{given}||{birth}|F" + ("|" * 10 + pid18 if pid18 else ""),
            "|".join(pv1).rstrip("|")]
    for i, (code, typ) in enumerate(dg1 or [], start=1):
        segs.append(f"DG1|{i}||{code}^Diagnose {code}^I10-2024||{event_ts}|{typ}")
    for i, (tid, code, qty) in enumerate(ft1 or [], start=1):
        segs.append(f"FT1|{i}|{tid}||{event_ts}|{event_ts}|CG|{code}^Leistung {code}^EBM|||{qty}")
    for i, o in enumerate(orc or [], start=1):
        segs.append(f"ORC|NW|{o}")
        segs.append(f"OBR|{i}|{o}||LAB^Labor")
    if zbe:
        segs.append(zbe)
    return "\r".join(segs) + "\r"
