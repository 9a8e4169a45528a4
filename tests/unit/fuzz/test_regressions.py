"""Bugs the parser fuzzers found, each pinned by name (tests/unit/fuzz/test_fuzz_*.py)."""

from __future__ import annotations

import json

import pytest

from protocols.tss.errors import MalformedXml
from protocols.tss.xml import from_xml


def test_tss_xml_unknown_encoding_in_declaration_is_malformed_xml():
    """Found by test_fuzz_tss.test_xml_declarations_with_any_encoding: expat raised a bare
    LookupError for ``encoding="x-bogus"``; the sync entity would have crashed on it."""
    with pytest.raises(MalformedXml, match="unknown encoding"):
        from_xml(b'<?xml version="1.0" encoding="x-bogus"?><Slot xmlns="http://hl7.org/fhir"/>')


def test_tss_xml_text_with_lone_surrogate_is_malformed_xml():
    """A ``str`` payload with a lone surrogate raised UnicodeEncodeError in ``from_xml``."""
    with pytest.raises(MalformedXml):
        from_xml('<Slot xmlns="http://hl7.org/fhir"><status value="\ud800"/></Slot>')


def test_efa_token_with_nan_expiry_is_not_valid_forever():
    """Found by test_fuzz_efa.test_validity_period_with_odd_numbers: ``exp`` = NaN made
    ``now > exp`` always false - a signed token that never expired. Non-finite times are
    refused when signing and when reading a token."""
    import base64
    import json

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from protocols.efa.assertion import AssertionRejected, Claims, key_id, verify

    k = Ed25519PrivateKey.from_private_bytes(bytes(32))
    kid = key_id(k.public_key())
    with pytest.raises(ValueError):
        Claims(iss="i", kid=kid, sub="s", org="o", role="r", iat=0.0, exp=float("nan"), jti="0123456789")
    body = json.dumps({"iss": "i", "kid": kid, "sub": "s", "org": "o", "role": "r", "iat": 0, "exp": float("nan"),
                       "jti": "0123456789"}).encode()  # json writes NaN
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
    head = f"efa1.{b64(body)}"
    token = f"{head}.{b64(k.sign(head.encode()))}"
    with pytest.raises(AssertionRejected, match="malformed_token"):
        verify(token, {kid: k.public_key()}, now=1e9)


def test_moped_bundle_entry_with_a_list_as_resource_type_is_a_400():
    """Found by test_fuzz_moped.test_structurally_edited_admissions: ``resourceType: [..]``
    in an entry raised TypeError (unhashable list) - an HTTP 500 from the FHIR endpoint."""
    from protocols.moped import samples
    from protocols.moped.fhirio import MopedError, parse_operation_body

    body = samples.admission()
    body["parameter"][0]["resource"]["entry"][0]["resource"]["resourceType"] = ["Patient"]
    with pytest.raises(MopedError) as ei:
        parse_operation_body(json.dumps(body).encode(), "aufnehmen")
    assert ei.value.status in (400, 422)


def test_moped_encounter_type_of_odd_shape_is_a_400():
    """Found by the same fuzzer: ``Encounter.type`` holding lists instead of
    CodeableConcepts raised AttributeError in the transfer check (HTTP 500)."""
    from protocols.moped import samples
    from protocols.moped.fhirio import MopedError, parse_operation_body

    body = samples.admission()
    enc = next(e["resource"] for e in body["parameter"][0]["resource"]["entry"]
               if e["resource"]["resourceType"] == "Encounter")
    enc["type"] = [["TENC"]]
    with pytest.raises(MopedError) as ei:
        parse_operation_body(json.dumps(body).encode(), "aufnehmen")
    assert ei.value.status == 400


def test_hl7_nul_in_msh18_charset_is_answered_not_raised():
    """Found by test_fuzz_hl7.test_mutated_fixtures_through_the_listener_path (deep
    profile): a NUL byte in MSH-18 made ``codecs.lookup`` raise ValueError out of
    ``parse_message`` - the listener could not even answer the frame."""
    from protocols.hl7 import Hl7Error, Hl7Message, ack_for, parse_message

    raw = (b"MSH|^~\\&|KIS|H|AUTOMAT|K|20240101000000||ADT^A01|C1|P|2.5||||||\x00S\r"  # MSH-18 = NUL + "S"
           b"PID|1||79471||Nachname^Vorname\rPV1|1|I\r")
    result = parse_message(raw)
    assert isinstance(result, (Hl7Message, Hl7Error))
    assert ack_for(raw, result) is not None


def test_hl7_reject_ack_for_garbage_with_five_encoding_chars_is_valid_hl7():
    """Found by test_fuzz_hl7 (deep profile): for the garbage ``MMSH}^~\\&|`` the NAK took
    over five encoding characters (a v2.7 truncation character) but said version 2.5 - our
    own answer was not valid HL7 for the KIS to read."""
    from protocols.hl7 import Hl7Message, ack_for, parse_message

    raw = b"MMSH}^~\\&|"
    result = parse_message(raw)
    ack = ack_for(raw, result)
    back = parse_message(ack.to_bytes())
    assert isinstance(back, Hl7Message), back
    assert back.header.message_type == "ACK"
