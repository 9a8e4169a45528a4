"""The pure MOPED case logic: body parsing, server-side references, rules, versions."""

from __future__ import annotations

import json

import pytest

from protocols.moped import codes
from protocols.moped import samples as S
from protocols.moped.case import apply_operation, build_composition
from protocols.moped.fhirio import MopedError, http_status, parse_operation_body, validate_resource
from protocols.moped.messages import CaseState, Caller, Operate

KH = Caller(device="Device/XDokV5", organization="Organization/KHK999", role="KH")
SV = Caller(device="Device/SV", organization="Organization/SV11", role="SV")
LGF = Caller(device="Device/LGF", organization="Organization/LGF9", role="LGF")
CASE = "0b7a6f3e-1111-4222-8333-444455556666"
AT = "2026-01-10T09:00:00+01:00"


def run(state: CaseState, op: str, body: dict, caller: Caller = KH, vid: int | None = None):
    entries, aviso = parse_operation_body(json.dumps(body).encode(), op)
    msg = Operate(op=op, vid=state.vid if vid is None and op != "aufnehmen" else vid, entries=entries,
                  caller=caller, at=AT, aviso=aviso)
    return apply_operation(state, msg, CASE, "Organization/moped-server")


def ok(state: CaseState, op: str, body: dict, caller: Caller = KH) -> CaseState:
    new, res = run(state, op, body, caller)
    assert res.code == "ok", res.issues
    return new


def refused(state: CaseState, op: str, body: dict, caller: Caller = KH, code: str = "unprocessable"):
    new, res = run(state, op, body, caller)
    assert new is None and res.code == code, res
    return {i.rule: i for i in res.issues}


def of(state: CaseState, rtype: str) -> list[tuple[str, dict]]:
    return [(k, v) for k, v in state.resources.items() if k.startswith(rtype + "/")]


@pytest.fixture
def admitted() -> CaseState:
    return ok(CaseState(), "aufnehmen", S.admission())


def discharged(state: CaseState) -> CaseState:
    state = ok(state, "update", S.params("update", (S.urn(), S.condition("I21.0", main=True)),
                                          (S.urn(), S.procedure("AA010"))))
    stay = dict(state.resources[state.encounter])
    stay["actualPeriod"] = {"start": "2026-01-10T08:00:00+01:00", "end": "2026-01-15T10:00:00+01:00"}
    return ok(state, "entlassen", S.params("entlassen", (None, stay)))


def test_admission_makes_version_1_with_provenance(admitted):
    assert admitted.vid == 1 and admitted.workflow == codes.WF_ADMITTED
    rec = admitted.versions[0]
    comp = build_composition(admitted, 1, "Organization/moped-server")
    assert validate_resource(comp, "Composition") == []
    assert validate_resource(rec.provenance, "Provenance") == []
    assert rec.provenance["target"] == [{"reference": f"Composition/{CASE}/_history/1"}]
    assert rec.provenance["agent"][0]["who"] == {"reference": "Device/XDokV5"}
    assert comp["subject"] == [{"reference": admitted.patient}]
    assert comp["author"] == [{"reference": "Organization/KHK999"}]
    # client urn:uuid references became server ids; the transfer is part of the stay
    (_, tr), = [(k, e) for k, e in of(admitted, "Encounter") if "type" in e]
    assert tr["partOf"] == {"reference": admitted.encounter}
    assert tr["serviceProvider"]["identifier"]["value"] == "KAK999ABT1"  # client-side, kept


def test_deterministic(admitted):
    again = ok(CaseState(), "aufnehmen", S.admission())
    assert sorted(k.split("/")[0] for k in again.resources) == sorted(k.split("/")[0] for k in admitted.resources)
    body = S.params("update", (S.urn(), S.procedure()))
    a, _ = run(admitted, "update", body)
    b, _ = run(admitted, "update", body)
    assert a == b


def test_stale_missing_version_and_unknown_case(admitted):
    new, res = run(admitted, "update", S.params("update", (None, S.procedure())), vid=0)
    assert new is None and res.code == "conflict" and res.vid == 1
    new, res = apply_operation(admitted, Operate(op="update", vid=None, caller=KH, at=AT), CASE, "x")
    assert new is None and res.code == "invalid" and res.issues[0].rule == "version"
    new, res = apply_operation(CaseState(), Operate(op="update", vid=1, caller=KH, at=AT), CASE, "x")
    assert res.code == "not-found"
    new, res = run(admitted, "aufnehmen", S.admission())
    assert res.code == "exists"
    assert http_status("conflict", 409) == 409 and http_status("conflict", 412) == 412


def test_server_side_references_overwrite_client_values(admitted):
    proc = dict(S.procedure(), subject={"reference": "Patient/evil"}, encounter={"reference": "Encounter/evil"})
    new, res = run(admitted, "update", S.params("update", (S.urn(), proc)))
    assert res.code == "ok"
    assert {i.expression for i in res.issues if i.rule == "reference.server-side"} == {"Procedure.subject",
                                                                                       "Procedure.encounter"}
    (_, p), = of(new, "Procedure")
    assert p["subject"] == {"reference": admitted.patient} and p["encounter"] == {"reference": admitted.encounter}
    assert "evil" not in json.dumps(new.model_dump())


def test_aufnahme_rules():
    rules = refused(CaseState(), "aufnehmen", S.params("aufnehmen", (S.urn(), S.patient()), (S.urn(), S.stay())))
    assert set(rules) == {"MopedAufnahmeComposition.diagnosis", "MopedAufnahmeComposition.transfer"}
    assert rules["MopedAufnahmeComposition.transfer"].expression == "Bundle.entry:Verlegungen"


def test_anfrage_needs_insurer(admitted):
    rules = refused(admitted, "anfragen", S.params("anfragen", (S.urn(), S.claim())))
    assert set(rules) == {"MopedAnfrageComposition.insurer"}
    assert rules["MopedAnfrageComposition.insurer"].expression == "Coverage.insurer"


def test_antwort_needs_inquiry_and_request(admitted):
    rules = refused(admitted, "antworten", S.params("antworten", (None, S.claim_response("Claim/x"))), SV)
    assert {"MopedAntwortComposition.anfrage", "reference.client-side"} <= set(rules)
    st = ok(admitted, "anfragen", S.params("anfragen", (S.urn(), S.coverage()), (S.urn(), S.claim())))
    (cref, _), = of(st, "Claim")
    st = ok(st, "antworten", S.params("antworten", (None, S.claim_response(cref))), SV)
    assert st.workflow == codes.WF_SV_DONE and st.insurer == "Organization/SV11"


def test_discharge_rules(admitted):
    rules = refused(admitted, "entlassen", S.params("entlassen", (None, S.condition("I10"))))
    assert set(rules) == {"MopedEntlassungVollstaendigComposition.discharge-date",
                          "MopedEntlassungVollstaendigComposition.main-diagnosis"}
    stay = dict(admitted.resources[admitted.encounter])
    stay["actualPeriod"] = {"start": "2026-01-10T08:00:00+01:00", "end": "2026-01-15"}
    rules = refused(admitted, "entlassen", S.params("entlassen", (None, stay)))
    assert set(rules) == {"MopedEntlassungVollstaendigComposition.main-diagnosis"}
    # the discharge notice (aviso) needs the date only
    st = ok(admitted, "entlassen", S.params("entlassen", (None, stay), aviso=True))
    assert st.workflow == codes.WF_DISCHARGE_AVISO
    rules = refused(admitted, "entlassen", S.params("entlassen", (None, S.condition("I10")), aviso=True))
    assert set(rules) == {"MopedEntlassungsAvisoComposition.discharge-date"}


def test_abrechnung_rules(admitted):
    rules = refused(admitted, "abrechnen", S.params("abrechnen", (S.urn(), S.claim("claim"))))
    assert {"MopedAbrechnungComposition.discharged", "MopedAbrechnungComposition.procedures"} <= set(rules)
    st = discharged(admitted)
    # two departments at once
    st = ok(st, "update", S.params("update", (S.urn(), S.transfer("ABT2", "2026-01-11T00:00:00+01:00",
                                                                  "2026-01-12T00:00:00+01:00"))))
    rules = refused(st, "abrechnen", S.params("abrechnen", (S.urn(), S.claim("claim"))))
    assert set(rules) == {"MopedAbrechnungComposition.no-overlap"}
    assert rules["MopedAbrechnungComposition.no-overlap"].expression == "Encounter.actualPeriod"
    # claim references must name a Procedure of the case
    (cond, _), = [x for x in of(st, "Condition") if "extension" in x[1]]
    rules = refused(discharged(admitted), "abrechnen",
                    S.params("abrechnen", (S.urn(), S.claim("claim", procedures=[cond]))))
    assert set(rules) == {"MopedAbrechnungComposition.procedure-reference"}
    assert rules["MopedAbrechnungComposition.procedure-reference"].expression == \
        "Claim.procedure[0].procedureReference"


def test_full_flow_decide_and_seal(admitted):
    st = discharged(admitted)
    (pref, _), = of(st, "Procedure")
    st = ok(st, "abrechnen", S.params("abrechnen", (S.urn(), S.claim("claim", procedures=[pref]))))
    assert st.workflow == codes.WF_REPORTED
    (cref, _), = of(st, "Claim")
    refused(st, "entscheiden", S.params("entscheiden", (None, S.claim_response(cref))), KH, code="forbidden")
    st2 = ok(st, "entscheiden", S.params("entscheiden", (None, S.claim_response(cref, "error"))), LGF)
    assert st2.workflow == codes.WF_CORRECTION and not st2.sealed
    rules = refused(st2, "entscheiden", S.params("entscheiden", (None, S.claim_response(cref))), LGF)
    assert set(rules) == {"MopedEntscheidenComposition.billed"}
    st = ok(st, "entscheiden", S.params("entscheiden", (None, S.claim_response(cref))), LGF)
    assert st.sealed and build_composition(st, st.vid, "x")["status"] == "final"
    assert build_composition(st, st.vid - 1, "x")["status"] == "preliminary"
    # each version's sections list what the case held then
    sections = {s["code"]["coding"][0]["code"]: len(s["entry"]) for s in build_composition(st, 1, "x")["section"]}
    assert sections == {"KH": 1, "DIAG": 1, "TENC": 1}
    later = {s["code"]["coding"][0]["code"]: len(s["entry"]) for s in build_composition(st, st.vid, "x")["section"]}
    assert later["DIAG"] == 2 and later["PROC"] == 1 and later["LKFReq"] == 1 and later["LKFResp"] == 1
    rules = refused(st, "update", S.params("update", (None, S.procedure())))
    assert set(rules) == {"MopedSiegelComposition.final"}
    st = ok(st, "melden", S.params("melden", (None, S.claim_response(cref))), LGF)
    assert [v.activity for v in st.versions] == ["aufnehmen", "update", "entlassen", "abrechnen", "entscheiden",
                                                 "melden"]


@pytest.mark.parametrize("body,status,rule", [
    (b"[]", 400, "json"),
    (b"\xff", 400, "json"),
    (json.dumps({"resourceType": "Bundle", "type": "collection", "total": "many"}).encode(), 400, "fhir-r5"),
    (json.dumps({"resourceType": "Bundle", "type": "nonsense"}).encode(), 400, "fhir-r5.binding"),
    (json.dumps(S.params("update", (None, dict(S.procedure(), status="done!")))).encode(), 400, "fhir-r5.binding"),
    (json.dumps(S.params("update", (None, {"resourceType": "Condition", "code": 5}))).encode(), 400, "fhir-r5"),
    (json.dumps(S.params("update", (None, {"resourceType": "Nope"}))).encode(), 422, "bundle-content.update"),
    (json.dumps(S.params("update", (None, {"resourceType": "Claim"}))).encode(), 422, "bundle-content.update"),
    (json.dumps({"resourceType": "Parameters", "parameter": [{"name": "x", "valueString": "y"}]}).encode(), 400,
     "operation-parameters"),
    (json.dumps(S.params("update")).encode(), 422, "bundle-content.update"),
])
def test_bad_bodies(body, status, rule):
    with pytest.raises(MopedError) as ei:
        parse_operation_body(body, "update")
    assert ei.value.status == status and rule in {i.rule for i in ei.value.issues}, ei.value.issues


def test_invalid_fhir_names_the_element():
    body = S.params("update", (None, {"resourceType": "Procedure", "status": "completed", "code": "AA010"}))
    with pytest.raises(MopedError) as ei:
        parse_operation_body(json.dumps(body).encode(), "update")
    assert any(i.expression.startswith("Bundle.entry[0].resource(Procedure).code") for i in ei.value.issues), \
        ei.value.issues


def test_capability_statement_is_valid_r5():
    pytest.importorskip("ray")
    from actors.moped.http import capability_statement

    cs = capability_statement("http://x/moped")
    assert validate_resource(cs, "CapabilityStatement") == []
    ops = {o["name"] for o in cs["rest"][0]["resource"][0]["operation"]}
    assert set(codes.INSTANCE_OPS) <= ops
