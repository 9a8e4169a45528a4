"""The 116117 Terminsynchronisation resources: profiles, builders, checks (pure).

Profile canonical URLs follow the KBV pattern
``https://fhir.kbv.de/StructureDefinition/KBV_PR_116117_TERMINSERVICE_TVS_TERMINSYNCHRONISATION_<Type>``
(no public instances exist; the shapes follow FHIR R4 and the ISiK Terminplanung examples).
Builders emit elements in FHIR definition order, so the XML is valid FHIR XML.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from protocols.tss.errors import InvalidResource, NotFhir, WrongProfile

PROFILE_BASE = "https://fhir.kbv.de/StructureDefinition/KBV_PR_116117_TERMINSERVICE_TVS_TERMINSYNCHRONISATION_"
PROFILE_SUFFIX = {
    "Practitioner": "Practitioner",
    "PractitionerRole": "PractitionerRole",
    "Organization": "Organization",
    "Schedule": "Schedule",
    "Slot": "Slot",
    "Appointment": "Appointment",
    "Provenance": "Provenance",
    "Bundle": "Bundle_Searchset",
    "OperationOutcome": "OperationOutcome_Error",
}
#: the resource types of a practice, in initial-sync order
SYNC_TYPES = ["Organization", "Practitioner", "PractitionerRole", "Schedule", "Slot", "Appointment"]
SLOT_STATUSES = {"busy", "free", "busy-unavailable", "busy-tentative", "entered-in-error"}
APPOINTMENT_STATUSES = {"proposed", "pending", "booked", "arrived", "fulfilled", "cancelled", "noshow",
                        "entered-in-error", "checked-in", "waitlist"}
ACTIVITIES = ("CREATE", "UPDATE", "DELETE")
ACTIVITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
AGENT_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
LANR_SYSTEM = "https://fhir.kbv.de/NamingSystem/KBV_NS_Base_ANR"
BSNR_SYSTEM = "https://fhir.kbv.de/NamingSystem/KBV_NS_Base_BSNR"
XML_TYPES = ("application/fhir+xml", "application/xml+fhir", "application/xml")


def profile(rtype: str) -> str:
    return PROFILE_BASE + PROFILE_SUFFIX[rtype]


def instant(ts: float) -> str:
    """A FHIR instant in UTC with microseconds (sorts as text in time order)."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_instant(s: str) -> datetime:
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidResource(f"{s!r} is not a FHIR instant") from None
    if dt.tzinfo is None:
        raise InvalidResource(f"instant {s!r} has no time zone")
    return dt


def _meta(rtype: str, version: int | None = None, last_updated: str | None = None) -> dict[str, Any]:
    m: dict[str, Any] = {}
    if version is not None:
        m["versionId"] = str(version)
    if last_updated is not None:
        m["lastUpdated"] = last_updated
    m["profile"] = [profile(rtype)]
    return m


def with_meta(res: dict[str, Any], rid: str, version: int, last_updated: str) -> dict[str, Any]:
    """The resource with server id and meta, elements kept in definition order."""
    meta = dict(res.get("meta") or {})
    out: dict[str, Any] = {"resourceType": res["resourceType"], "id": rid,
                           "meta": {"versionId": str(version), "lastUpdated": last_updated,
                                    "profile": meta.get("profile") or [profile(res["resourceType"])]}}
    for k, v in res.items():
        if k not in ("resourceType", "id", "meta"):
            out[k] = v
    return out


def ref(rtype: str, rid: str, version: int | None = None) -> str:
    return f"{rtype}/{rid}" + (f"/_history/{version}" if version is not None else "")


def split_ref(reference: str) -> tuple[str, str, int | None]:
    """``Type/id[/_history/v]`` (relative or absolute) -> (type, id, version)."""
    parts = reference.rstrip("/").split("/")
    version = None
    if len(parts) >= 4 and parts[-2] == "_history":
        try:
            version = int(parts[-1])
        except ValueError:
            raise InvalidResource(f"reference {reference!r}: version is not a number") from None
        parts = parts[:-2]
    if len(parts) < 2 or parts[-2] not in PROFILE_SUFFIX:
        raise InvalidResource(f"reference {reference!r} does not name a Terminservice resource")
    return parts[-2], parts[-1], version


# -------------------------------------------------------------------------- builders


def organization(bsnr: str, name: str) -> dict[str, Any]:
    return {"resourceType": "Organization", "meta": _meta("Organization"),
            "identifier": [{"system": BSNR_SYSTEM, "value": bsnr}], "active": True, "name": name}


def practitioner(lanr: str, family: str, given: str) -> dict[str, Any]:
    return {"resourceType": "Practitioner", "meta": _meta("Practitioner"),
            "identifier": [{"system": LANR_SYSTEM, "value": lanr}], "active": True,
            "name": [{"use": "official", "family": family, "given": [given]}]}


def practitioner_role(practitioner_id: str, organization_id: str, specialty: str) -> dict[str, Any]:
    return {"resourceType": "PractitionerRole", "meta": _meta("PractitionerRole"), "active": True,
            "practitioner": {"reference": ref("Practitioner", practitioner_id)},
            "organization": {"reference": ref("Organization", organization_id)},
            "specialty": [{"coding": [{"system": "http://ihe-d.de/CodeSystems/AerztlicheFachrichtungen",
                                       "code": specialty}]}]}


def schedule(role_id: str, service_type: str, title: str) -> dict[str, Any]:
    """A Terminprofil."""
    return {"resourceType": "Schedule", "meta": _meta("Schedule"), "active": True,
            "serviceType": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/service-type",
                                         "code": service_type}]}],
            "actor": [{"reference": ref("PractitionerRole", role_id)}], "comment": title}


def slot(schedule_id: str, start: str, end: str, status: str = "free") -> dict[str, Any]:
    return {"resourceType": "Slot", "meta": _meta("Slot"), "schedule": {"reference": ref("Schedule", schedule_id)},
            "status": status, "start": start, "end": end}


def appointment(slot_id: str, start: str, end: str, patient: str, status: str = "booked") -> dict[str, Any]:
    return {"resourceType": "Appointment", "meta": _meta("Appointment"), "status": status,
            "start": start, "end": end, "slot": [{"reference": ref("Slot", slot_id)}],
            "participant": [{"actor": {"display": patient}, "status": "accepted"}]}


def provenance(pid: str, target: str, recorded: str, activity: str, agent: str,
               agent_display: str) -> dict[str, Any]:
    return {"resourceType": "Provenance", "id": pid, "meta": _meta("Provenance"),
            "target": [{"reference": target}], "recorded": recorded,
            "activity": {"coding": [{"system": ACTIVITY_SYSTEM, "code": activity}]},
            "agent": [{"type": {"coding": [{"system": AGENT_TYPE_SYSTEM, "code": agent}]},
                       "who": {"display": agent_display}}]}


def searchset(entries: list[dict[str, Any]], *, timestamp: str, self_url: str, next_url: str | None,
              total: int | None = None, included: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    links = [{"relation": "self", "url": self_url}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    b: dict[str, Any] = {"resourceType": "Bundle", "meta": _meta("Bundle"), "type": "searchset",
                         "timestamp": timestamp}
    if total is not None:
        b["total"] = total
    b["link"] = links
    ents = [{"fullUrl": f"urn:{r['resourceType']}:{r['id']}", "resource": r, "search": {"mode": "match"}}
            for r in entries]
    ents += [{"fullUrl": f"urn:{r['resourceType']}:{r['id']}/_history/{r['meta']['versionId']}",
              "resource": r, "search": {"mode": "include"}} for r in included or []]
    if ents:
        b["entry"] = ents
    return b


def operation_outcome(code: str, diagnostics: str, severity: str = "error") -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "meta": _meta("OperationOutcome"),
            "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]}


def outcome_text(oo: dict[str, Any]) -> str:
    return "; ".join(f"{i.get('severity', '?')}/{i.get('code', '?')}: {i.get('diagnostics', '')}"
                     for i in oo.get("issue") or []) or "OperationOutcome without issues"


# -------------------------------------------------------------------------- checks


def check_profile(res: dict[str, Any]) -> None:
    rtype = res.get("resourceType")
    if rtype not in PROFILE_SUFFIX:
        raise NotFhir(f"unexpected resource type {rtype!r}")
    profiles = (res.get("meta") or {}).get("profile") or []
    if profile(rtype) not in profiles:
        raise WrongProfile(f"{rtype}/{res.get('id', '?')} does not claim profile {profile(rtype)} "
                           f"(claims {profiles or 'none'})")


def check_resource(res: dict[str, Any], *, expect: str | None = None, need_id: bool = True) -> dict[str, Any]:
    """Validate what the Terminservice delivers or accepts; returns it unchanged."""
    rtype = res.get("resourceType")
    if expect is not None and rtype != expect:
        raise NotFhir(f"expected a {expect}, got {rtype!r}")
    check_profile(res)
    if need_id and not res.get("id"):
        raise InvalidResource(f"{rtype} without id")
    if rtype == "Slot":
        if not (res.get("schedule") or {}).get("reference"):
            raise InvalidResource("Slot.schedule missing")
        if res.get("status") not in SLOT_STATUSES:
            raise InvalidResource(f"Slot.status {res.get('status')!r} is not a slot status")
        for k in ("start", "end"):
            parse_instant(res.get(k) or "")
    elif rtype == "Appointment":
        if res.get("status") not in APPOINTMENT_STATUSES:
            raise InvalidResource(f"Appointment.status {res.get('status')!r} is not an appointment status")
        if not res.get("participant"):
            raise InvalidResource("Appointment.participant missing")
    elif rtype == "Provenance":
        provenance_change(res)
    elif rtype == "Bundle":
        if res.get("type") != "searchset":
            raise InvalidResource(f"Bundle.type {res.get('type')!r}, expected searchset")
    return res


def provenance_change(res: dict[str, Any]) -> tuple[str, str, str, int | None, str, str]:
    """(provenance id, recorded, target type, target id, target version, activity)."""
    targets = res.get("target") or []
    if len(targets) != 1 or not targets[0].get("reference"):
        raise InvalidResource(f"Provenance/{res.get('id')}: exactly one target reference expected")
    rtype, rid, version = split_ref(targets[0]["reference"])
    recorded = res.get("recorded") or ""
    parse_instant(recorded)
    codes = [c.get("code") for c in ((res.get("activity") or {}).get("coding") or [])]
    act = next((c for c in codes if c in ACTIVITIES), None)
    if act is None:
        raise InvalidResource(f"Provenance/{res.get('id')}: activity {codes} is not CREATE/UPDATE/DELETE")
    if not res.get("agent"):
        raise InvalidResource(f"Provenance/{res.get('id')}: agent missing")
    return res.get("id") or "", recorded, rtype, rid, version, act  # type: ignore[return-value]


def bundle_parts(bundle: dict[str, Any]) -> tuple[list[dict], list[dict], str | None]:
    """(matches, includes, next url) of a searchset (resources profile-checked)."""
    check_resource(bundle, expect="Bundle", need_id=False)
    matches, includes = [], []
    for e in bundle.get("entry") or []:
        r = e.get("resource")
        if not isinstance(r, dict):
            raise InvalidResource("Bundle.entry without resource")
        (includes if (e.get("search") or {}).get("mode") == "include" else matches).append(r)
    nxt = next((ln.get("url") for ln in bundle.get("link") or [] if ln.get("relation") == "next"), None)
    return matches, includes, nxt


def version_of(res: dict[str, Any]) -> int:
    try:
        return int((res.get("meta") or {}).get("versionId") or 0)
    except ValueError:
        raise InvalidResource(f"{res.get('resourceType')}/{res.get('id')}: versionId is not a number") from None


def only_status_differs(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """A TVS may change a slot's status only."""
    strip = lambda r: {k: v for k, v in r.items() if k not in ("meta", "status", "id", "text")}  # noqa: E731
    return strip(old) == strip(new)
