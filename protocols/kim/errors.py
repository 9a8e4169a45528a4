"""Typed errors of the KIM protocol code.

Every function in :mod:`protocols.kim` either returns a typed result or raises a
subclass of :class:`KimError`. A ``KimError`` carries

* ``code``   – a stable, machine-readable string (the value of one of the ``*Code``
  enums of the module that raised it, e.g. ``"mime_broken"``); road maps branch on it,
* ``reason`` – a readable sentence for operators (never personal data: no names,
  insurance numbers or diagnoses; element names and technical facts only),
* ``detail`` – optional extra control information (e.g. ``element="Patient"``).

:meth:`KimError.fault` turns it into a :class:`KimFault` pydantic model that can be
stored on a routing slip (Laufzettel) or put into an event.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, Field


class KimFault(BaseModel):
    """Serialisable form of a :class:`KimError` (control information only)."""

    domain: str
    code: str
    reason: str
    detail: dict[str, str] = Field(default_factory=dict)


class KimError(Exception):
    """Base class of all typed KIM protocol errors."""

    domain: ClassVar[str] = "kim"

    def __init__(self, code: str, reason: str, **detail: object) -> None:
        self.code = str(code)
        self.reason = reason
        self.detail = {k: str(v) for k, v in detail.items() if v is not None}
        super().__init__(f"{self.code}: {reason}")

    def fault(self) -> KimFault:
        return KimFault(domain=self.domain, code=self.code, reason=self.reason, detail=self.detail)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, reason={self.reason!r})"


class MimeError(KimError):
    """The raw mail could not be used (see :class:`protocols.kim.mime.MimeErrorCode`)."""

    domain = "mime"


class CmsError(KimError):
    """The ``.p7s`` could not be unwrapped (see :class:`protocols.kim.pkcs7.CmsErrorCode`)."""

    domain = "cms"


class FhirPayloadError(KimError):
    """A FHIR payload could not be read (see :class:`protocols.kim.eau.PayloadErrorCode`).

    ``element`` names the missing/faulty element for ``*_missing_element``.
    """

    domain = "fhir"

    @property
    def element(self) -> str | None:
        return self.detail.get("element")


class EauError(FhirPayloadError):
    """The eAU payload is not a usable ``KBV_PR_EAU_Bundle`` / ``KBV_PR_EAU_Storno_Bundle``."""

    domain = "eau"


class EebError(FhirPayloadError):
    """The eEB payload is not a usable eEB Anfrage."""

    domain = "eeb"


class AnswerError(KimError):
    """An answer mail cannot be built (no reply address, business fault, ...)."""

    domain = "answer"
