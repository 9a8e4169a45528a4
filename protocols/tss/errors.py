"""Typed errors of the Terminservice protocol (pure)."""

from __future__ import annotations


class TssProtocolError(Exception):
    """Base: the payload cannot be used. ``code`` names the kind of fault."""

    code = "invalid"


class MalformedXml(TssProtocolError):
    code = "malformed_xml"


class JsonNotXml(TssProtocolError):
    """JSON where the Terminservice requires FHIR XML."""

    code = "json_not_xml"


class NotFhir(TssProtocolError):
    """Well-formed XML that is not the expected FHIR resource."""

    code = "not_fhir"


class WrongProfile(TssProtocolError):
    """A resource does not claim the 116117 Terminsynchronisation profile of its type."""

    code = "wrong_profile"


class InvalidResource(TssProtocolError):
    """A required element is missing or has a wrong value."""

    code = "invalid_resource"
