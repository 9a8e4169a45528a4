"""Small, safe helpers for reading FHIR XML (namespace http://hl7.org/fhir) with the stdlib.

Internal to :mod:`protocols.kim`; the public error codes live in :class:`PayloadErrorCode`.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import date, datetime
from enum import StrEnum
from functools import lru_cache
from typing import Iterator

from protocols.kim.errors import FhirPayloadError

FHIR_NS = "http://hl7.org/fhir"
NS = "{" + FHIR_NS + "}"


class PayloadErrorCode(StrEnum):
    """Why a FHIR payload (eAU, eEB) could not be read. Distinct, stable codes."""

    NOT_XML = "payload_not_xml"  # empty, not well-formed, or a DTD/entity declaration
    NOT_FHIR = "payload_not_fhir"  # well-formed XML, but not in the FHIR namespace
    WRONG_RESOURCE = "payload_wrong_resource"  # FHIR, but not a Bundle (e.g. OperationOutcome)
    WRONG_PROFILE = "payload_wrong_profile"  # Bundle, but meta.profile is not the expected one
    MISSING_ELEMENT = "payload_missing_element"  # mandatory element absent (detail: element)


_DTD = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


def parse_root(data: bytes, error_cls: type[FhirPayloadError]) -> ET.Element:
    """Parse ``data`` as FHIR XML and return the root element, or raise ``error_cls``.

    DTDs and entity declarations are refused (FHIR XML never has them; they are the
    vehicle of entity-expansion attacks).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise error_cls(PayloadErrorCode.NOT_XML, "payload is not bytes")
    data = bytes(data)
    if not data.strip():
        raise error_cls(PayloadErrorCode.NOT_XML, "payload is empty")
    if _DTD.search(data):
        raise error_cls(PayloadErrorCode.NOT_XML, "payload contains a DTD or entity declaration")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise error_cls(PayloadErrorCode.NOT_XML, f"payload is not well-formed XML ({exc})") from None
    except Exception as exc:  # unknown encodings, decoder errors, ...
        raise error_cls(PayloadErrorCode.NOT_XML, f"payload is not readable XML ({type(exc).__name__})") from None
    if not isinstance(root.tag, str) or not root.tag.startswith(NS):
        ns = root.tag[1:].split("}", 1)[0] if isinstance(root.tag, str) and root.tag.startswith("{") else ""
        raise error_cls(
            PayloadErrorCode.NOT_FHIR,
            f"root element is not in the FHIR namespace (namespace {ns or 'none'!r})",
            namespace=ns or "none",
        )
    return root


def local(tag: str) -> str:
    return tag[len(NS):] if tag.startswith(NS) else tag


@lru_cache(maxsize=512)
def _path(path: str) -> str:
    return "/".join(p if p in (".", "..", "*") else NS + p for p in path.split("/"))


def find(el: ET.Element | None, path: str) -> ET.Element | None:
    if el is None:
        return None
    return el.find(_path(path))


def findall(el: ET.Element | None, path: str) -> list[ET.Element]:
    if el is None:
        return []
    return el.findall(_path(path))


def val(el: ET.Element | None, path: str | None = None) -> str | None:
    """The ``value`` attribute of the element at ``path`` (or of ``el``), stripped, or None."""
    target = el if path is None else find(el, path)
    if target is None:
        return None
    v = target.get("value")
    if v is None:
        return None
    v = v.strip()
    return v or None


def vals(el: ET.Element | None, path: str) -> list[str]:
    out = []
    for e in findall(el, path):
        v = e.get("value")
        if v and v.strip():
            out.append(v.strip())
    return out


def bundle_resources(root: ET.Element) -> Iterator[ET.Element]:
    """The resource elements of all ``Bundle.entry.resource``."""
    for res in findall(root, "entry/resource"):
        for child in res:
            if isinstance(child.tag, str):
                yield child
                break


def profiles(el: ET.Element) -> list[str]:
    return vals(el, "meta/profile")


def profile_matches(profile: str, name: str) -> bool:
    """True if canonical ``profile`` (``.../StructureDefinition/<name>|<version>``) names ``name``."""
    base = profile.split("|", 1)[0].rstrip("/")
    return base.rsplit("/", 1)[-1] == name


def profile_version(profile: str) -> str | None:
    return profile.split("|", 1)[1] if "|" in profile else None


def parse_date(s: str | None) -> date | None:
    """FHIR date/dateTime → date (None if absent or unparseable)."""
    if not s:
        return None
    try:
        return date.fromisoformat(s[:10])
    except ValueError:
        return None


def parse_datetime(s: str | None) -> datetime | None:
    if not s:
        return None
    try:
        return datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        d = parse_date(s)
        return datetime(d.year, d.month, d.day) if d else None


def coding_codes(el: ET.Element | None, path: str, system_suffix: str | None = None) -> list[str]:
    """Codes of the codings at ``path`` (a ``.../coding`` path), optionally filtered by system."""
    out = []
    for c in findall(el, path):
        system = val(c, "system") or ""
        if system_suffix is None or system.endswith(system_suffix):
            code = val(c, "code")
            if code:
                out.append(code)
    return out


def identifier_by(el: ET.Element | None, *, type_code: str | None = None, system_suffix: str | None = None) -> str | None:
    """The ``identifier.value`` whose type coding code or system matches."""
    for ident in findall(el, "identifier"):
        if type_code is not None and type_code in coding_codes(ident, "type/coding"):
            v = val(ident, "value")
            if v:
                return v
        if system_suffix is not None and (val(ident, "system") or "").endswith(system_suffix):
            v = val(ident, "value")
            if v:
                return v
    return None


def human_name(el: ET.Element | None) -> tuple[str | None, str | None, str | None]:
    """(family, given, prefix) of the first (official) ``name`` of a Patient/Practitioner."""
    names = findall(el, "name")
    if not names:
        return None, None, None
    chosen = names[0]
    for n in names:
        if val(n, "use") == "official":
            chosen = n
            break
    family = val(chosen, "family")
    given = " ".join(vals(chosen, "given")) or None
    prefix = " ".join(vals(chosen, "prefix")) or None
    return family, given, prefix


def extension(el: ET.Element | None, url_suffix: str) -> ET.Element | None:
    for ext in findall(el, "extension"):
        if (ext.get("url") or "").endswith(url_suffix):
            return ext
    return None


def xml_escape(s: str) -> str:
    """Escape for use inside a double-quoted XML attribute or text."""
    return (
        s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )
