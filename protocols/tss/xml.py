"""FHIR R4 XML <-> resource dicts (the JSON shape), for the 116117 Terminservice profiles.

Pure, no I/O. The resource dicts are the FHIR JSON representation (``resourceType``,
arrays for repeating elements, primitives as JSON values). XML follows the FHIR XML
rules: namespace ``http://hl7.org/fhir``, primitives in a ``value`` attribute,
repeating elements repeated, ``extension@url`` and element ``id`` as attributes,
resources inside ``Bundle.entry.resource`` wrapped in their type's element.

Which elements repeat (and which primitives are boolean / integer) is not in the XML;
the tables below list them for the resources the Terminservice exchanges (Practitioner,
PractitionerRole, Organization, Schedule, Slot, Appointment, Provenance, Bundle,
OperationOutcome). Unknown elements parse as single values (never lost).
"""

from __future__ import annotations

from typing import Any
from xml.etree import ElementTree as ET

from protocols.tss.errors import JsonNotXml, MalformedXml, NotFhir

FHIR_NS = "http://hl7.org/fhir"
_NS = "{" + FHIR_NS + "}"

#: repeating elements: "<ResourceType>.<path>" (datatype-internal ones as "*.<name>")
REPEATING = {
    "*.profile", "*.tag", "*.security", "*.coding", "*.extension", "*.modifierExtension",
    "*.identifier", "*.telecom", "*.address", "*.given", "*.prefix", "*.suffix",
    "*.line", "*.contained",
    "Practitioner.name", "Practitioner.qualification",
    "PractitionerRole.code", "PractitionerRole.specialty", "PractitionerRole.location",
    "PractitionerRole.healthcareService", "PractitionerRole.availableTime",
    "PractitionerRole.availableTime.daysOfWeek", "PractitionerRole.endpoint",
    "Organization.type", "Organization.contact", "Organization.endpoint",
    "Schedule.serviceCategory", "Schedule.serviceType", "Schedule.specialty", "Schedule.actor",
    "Slot.serviceCategory", "Slot.serviceType", "Slot.specialty",
    "Appointment.serviceCategory", "Appointment.serviceType", "Appointment.specialty",
    "Appointment.reasonCode", "Appointment.reasonReference", "Appointment.supportingInformation",
    "Appointment.slot", "Appointment.basedOn", "Appointment.participant",
    "Appointment.participant.type", "Appointment.requestedPeriod",
    "Provenance.target", "Provenance.policy", "Provenance.reason", "Provenance.agent",
    "Provenance.agent.role", "Provenance.entity", "Provenance.signature",
    "Bundle.link", "Bundle.entry", "Bundle.entry.link",
    "OperationOutcome.issue", "OperationOutcome.issue.location", "OperationOutcome.issue.expression",
}
BOOLEANS = {"active", "overbooked"}
INTEGERS = {"total", "minutesDuration", "priority"}
RESOURCE_TYPES = {
    "Practitioner", "PractitionerRole", "Organization", "Schedule", "Slot", "Appointment",
    "Provenance", "Bundle", "OperationOutcome",
}
#: elements whose value is a resource (wrapped in the resource's type element)
_RESOURCE_HOLDERS = {"resource", "contained", "outcome"}


def _repeats(rtype: str, path: str) -> bool:
    name = path.rsplit(".", 1)[-1]
    return f"{rtype}.{path}" in REPEATING or f"*.{name}" in REPEATING


# -------------------------------------------------------------------------- serialise


def to_xml(resource: dict[str, Any], *, declaration: bool = True) -> bytes:
    """A resource dict as FHIR XML (UTF-8 bytes)."""
    root = _resource_element(resource)
    body = ET.tostring(root, encoding="unicode")
    head = '<?xml version="1.0" encoding="UTF-8"?>' if declaration else ""
    return (head + body).encode()


def _resource_element(resource: dict[str, Any]) -> ET.Element:
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str):
        raise NotFhir("resource dict without resourceType")
    el = ET.Element(rtype, {"xmlns": FHIR_NS})
    _fill(el, resource, rtype, "")
    return el


def _fill(el: ET.Element, obj: dict[str, Any], rtype: str, path: str) -> None:
    for name, value in obj.items():
        if name == "resourceType":
            continue
        if name == "url" and el.tag in ("extension", "modifierExtension"):
            el.set("url", value)
            continue
        if name == "id" and path:  # element id (not the resource id)
            el.set("id", str(value))
            continue
        sub = f"{path}.{name}" if path else name
        for item in value if isinstance(value, list) else [value]:
            _child(el, name, item, rtype, sub)


def _child(parent: ET.Element, name: str, value: Any, rtype: str, path: str) -> None:
    c = ET.SubElement(parent, name)
    if name in _RESOURCE_HOLDERS and isinstance(value, dict) and "resourceType" in value:
        inner = ET.SubElement(c, value["resourceType"])
        _fill(inner, value, value["resourceType"], "")
    elif isinstance(value, dict):
        _fill(c, value, rtype, path)
    elif isinstance(value, bool):
        c.set("value", "true" if value else "false")
    else:
        c.set("value", str(value))


# -------------------------------------------------------------------------- parse


def from_xml(data: bytes | str, *, content_type: str | None = None) -> dict[str, Any]:
    """Parse FHIR XML into a resource dict. Raises ``JsonNotXml``, ``MalformedXml``,
    ``NotFhir`` (typed, with a clear message)."""
    if content_type and "json" in content_type.lower():
        raise JsonNotXml(f"content type {content_type!r}: the Terminservice exchanges XML only")
    try:
        raw = data.encode() if isinstance(data, str) else bytes(data)
    except UnicodeEncodeError as e:  # lone surrogates in a str
        raise MalformedXml(f"payload is not encodable text: {e.reason}") from None
    head = raw.lstrip()[:1]
    if head in (b"{", b"["):
        raise JsonNotXml("payload is JSON; the Terminservice exchanges FHIR XML only")
    if not head:
        raise MalformedXml("empty payload")
    if b"<!DOCTYPE" in raw[:2048] or b"<!ENTITY" in raw[:4096]:
        raise MalformedXml("DTDs / entities are not allowed in FHIR XML")
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as e:
        raise MalformedXml(f"not well-formed XML: {e}") from None
    except (LookupError, ValueError) as e:  # e.g. encoding="x-bogus" in the XML declaration
        raise MalformedXml(f"unreadable XML: {e}") from None
    if not root.tag.startswith(_NS):
        raise NotFhir(f"root element {root.tag!r} is not in the FHIR namespace {FHIR_NS}")
    rtype = root.tag[len(_NS):]
    if rtype not in RESOURCE_TYPES:
        raise NotFhir(f"unexpected resource type {rtype!r}")
    return _resource_dict(root)


def _local(tag: str) -> str:
    if not tag.startswith(_NS):
        raise NotFhir(f"element {tag!r} is not in the FHIR namespace")
    return tag[len(_NS):]


def _resource_dict(el: ET.Element) -> dict[str, Any]:
    rtype = _local(el.tag)
    out: dict[str, Any] = {"resourceType": rtype}
    _read(el, out, rtype, "")
    return out


def _read(el: ET.Element, out: dict[str, Any], rtype: str, path: str) -> None:
    for child in el:
        if not isinstance(child.tag, str):  # comments
            continue
        name = _local(child.tag)
        sub = f"{path}.{name}" if path else name
        value = _value(child, name, rtype, sub)
        if _repeats(rtype, sub):
            out.setdefault(name, []).append(value)
        elif name in out:
            raise NotFhir(f"{rtype}.{sub} occurs more than once")
        else:
            out[name] = value


def _value(el: ET.Element, name: str, rtype: str, path: str) -> Any:
    kids = [c for c in el if isinstance(c.tag, str)]
    if name in _RESOURCE_HOLDERS and len(kids) == 1 and _local(kids[0].tag) in RESOURCE_TYPES:
        return _resource_dict(kids[0])
    if "value" in el.attrib and not kids:
        v = el.attrib["value"]
        if name in BOOLEANS:
            if v not in ("true", "false"):
                raise NotFhir(f"{rtype}.{path}: {v!r} is not a boolean")
            return v == "true"
        if name in INTEGERS:
            try:
                return int(v)
            except ValueError:
                raise NotFhir(f"{rtype}.{path}: {v!r} is not an integer") from None
        return v
    obj: dict[str, Any] = {}
    if "id" in el.attrib:
        obj["id"] = el.attrib["id"]
    if "url" in el.attrib:
        obj["url"] = el.attrib["url"]
    _read(el, obj, rtype, path)
    return obj
