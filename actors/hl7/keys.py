"""Entity kinds and pseudonymous keys of the HL7 import.

Keys never hold a patient or case number: ``patient_key`` is an HMAC pseudonym over
billing unit + patient number, ``case_key`` over the case key of
:func:`protocols.hl7.decide_import` (billing unit + case number, or the case number alone
for one case per order, + order number for a case per ORC/OBR). The pending list is
keyed by the billing unit name (a practice id, no personal data).
"""

from __future__ import annotations

from functools import lru_cache

from actors.runtime.crypto import Pseudonymizer

PATIENT = "hl7.patient"
CASE = "hl7.case"
PENDING = "hl7.pending"
BRIDGE = "hl7.bridge"
EXPORT = "hl7.export"

_SEP = "\x1f"


@lru_cache(maxsize=4)
def pseudonymizer(path: str) -> Pseudonymizer:
    return Pseudonymizer.from_file(path)


def pseudonymizer_for(cfg) -> Pseudonymizer:
    return pseudonymizer(str(cfg.crypto.pseudonym_key_file))


def patient_key(p: Pseudonymizer, billing_unit: str, patient_number: str) -> str:
    return "p" + p.pseudonym(f"{billing_unit}{_SEP}{patient_number}", PATIENT)


def case_key(p: Pseudonymizer, decision_key: str) -> str:
    """``decision_key`` is one of ``ImportDecision.case_keys``."""
    return "c" + p.pseudonym(decision_key, CASE)
