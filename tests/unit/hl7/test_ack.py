"""ACK building: original and enhanced mode, ERR segment, ACKs for broken input."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from protocols.hl7 import (
    AckCode,
    ErrorCode,
    FrameDecoder,
    Hl7Error,
    Hl7Message,
    ack_for,
    build_ack,
    build_reject_ack,
    parse_message,
)

from ._files import fixture_bytes

NOW = datetime(2024, 3, 1, 10, 15, 0, tzinfo=timezone.utc)
MSH = "MSH|^~\\&|KIS|KLINIK|DURIA|PRAX1|20240301101500||ADT^A01^ADT_A01|MSG1|P|{v}|||{acc}|{app}|DEU|{cs}\r"
BODY = "EVN|A01|20240301101500\rPID|1||4711^^^Klinik^PI\rPV1|1|O|||||||||||||||||0815^^^Klinik^VN\r"
UNKNOWN_UNIT = Hl7Error(code=ErrorCode.UNKNOWN_BILLING_UNIT, reason="unknown billing unit: no mapping row for O/X",
                        field="PV1-2")


def msg(v="2.5", acc="", app="", cs="") -> Hl7Message:
    m = parse_message(MSH.format(v=v, acc=acc, app=app, cs=cs) + BODY)
    assert isinstance(m, Hl7Message), m
    return m


def segs(ack) -> list[list[str]]:
    assert ack.er7.endswith("\r")
    return [s.split("|") for s in ack.er7.rstrip("\r").split("\r")]


def test_original_mode_accept():
    ack = build_ack(msg(), now=NOW, control_id="ACK1")
    assert ack.code == AckCode.AA and ack.acked_control_id == "MSG1" and ack.control_id == "ACK1"
    msh, msa = segs(ack)
    # sending and receiving swapped, MSH-1/2 kept, processing id and version copied
    assert msh[:12] == ["MSH", "^~\\&", "DURIA", "PRAX1", "KIS", "KLINIK", "20240301101500+0000", "",
                        "ACK^A01^ACK", "ACK1", "P", "2.5"]
    assert msa == ["MSA", "AA", "MSG1"]
    # the ACK is itself a valid HL7 message
    parsed = parse_message(ack.to_bytes())
    assert isinstance(parsed, Hl7Message)
    assert parsed.header.message_type == "ACK" and parsed.get("MSA-2") == "MSG1"


def test_original_mode_error_and_reject():
    ae = build_ack(msg(), UNKNOWN_UNIT, now=NOW, control_id="A2")
    assert ae.code == AckCode.AE
    msh, msa, err = segs(ae)
    assert msa[:3] == ["MSA", "AE", "MSG1"] and msa[3].startswith("unknown billing unit")
    assert err[0] == "ERR" and err[2] == "PV1^1^2" and err[3] == "103^Table value not found^HL70357"
    assert err[4] == "E" and err[8] == UNKNOWN_UNIT.reason
    ar = build_ack(msg(), Hl7Error(code=ErrorCode.UNSUPPORTED_VERSION, reason="nope", field="MSH-12"),
                   now=NOW, control_id="A3")
    assert ar.code == AckCode.AR
    assert segs(ar)[2][3] == "203^Unsupported version id^HL70357"


def test_err_segment_before_v25_uses_eld():
    ack = build_ack(msg(v="2.3"), UNKNOWN_UNIT, now=NOW, control_id="A4")
    msh, msa, err = segs(ack)
    assert msh[8] == "ACK^A01"  # no message structure component before 2.3.1
    assert err == ["ERR", "PV1^1^2^103&Table value not found&HL70357"]


def test_msa3_dropped_from_27():
    ack = build_ack(msg(v="2.7"), UNKNOWN_UNIT, now=NOW, control_id="A5")
    assert segs(ack)[1] == ["MSA", "AE", "MSG1"]


def test_reason_is_escaped():
    e = Hl7Error(code=ErrorCode.MISSING_FIELD, reason="PID-3 a|b^c is empty", field="PID-3")
    ack = build_ack(msg(), e, now=NOW, control_id="A6")
    parsed = parse_message(ack.er7)
    assert parsed.get("ERR-8") == "PID-3 a|b^c is empty"
    assert parsed.get("MSA-3") == "PID-3 a|b^c is empty"


@pytest.mark.parametrize(
    "acc, ok_code, err_code",
    [("AL", AckCode.CA, AckCode.CE), ("NE", None, None), ("ER", None, AckCode.CE), ("SU", AckCode.CA, None)],
)
def test_enhanced_mode_accept_ack(acc, ok_code, err_code):
    m = msg(acc=acc, app="NE")
    ok = build_ack(m, now=NOW, control_id="E1")
    bad = build_ack(m, UNKNOWN_UNIT, now=NOW, control_id="E2")
    assert (ok.code if ok else None) == ok_code
    assert (bad.code if bad else None) == err_code


def test_enhanced_mode_reject_is_cr():
    ack = build_ack(msg(acc="AL"), Hl7Error(code=ErrorCode.BAD_SEGMENT, reason="x"), now=NOW, control_id="E3")
    assert ack.code == AckCode.CR


def test_enhanced_mode_application_ack():
    m = msg(acc="AL", app="AL")
    assert build_ack(m, phase="application", now=NOW, control_id="E4").code == AckCode.AA
    assert build_ack(m, UNKNOWN_UNIT, phase="application", now=NOW, control_id="E5").code == AckCode.AE
    only_errors = msg(acc="AL", app="ER")
    assert build_ack(only_errors, phase="application") is None
    assert build_ack(only_errors, UNKNOWN_UNIT, phase="application").code == AckCode.AE
    # only MSH-16 valued: enhanced mode, the commit ACK defaults to "always"
    assert build_ack(msg(app="AL"), now=NOW, control_id="E6").code == AckCode.CA
    assert build_ack(msg(acc="AL"), phase="application") is None


def test_fixture_ack_conditions():
    sap = parse_message(fixture_bytes("ipf/sap-ish_adt_a01_v25.hl7"))  # MSH-15 = ER
    assert build_ack(sap) is None
    assert build_ack(sap, UNKNOWN_UNIT).code == AckCode.CE
    orbis = parse_message(fixture_bytes("ipf/orbis_mdm_t01_v25deu_zbe.hl7"))  # NE / NE
    assert build_ack(orbis) is None and build_ack(orbis, phase="application") is None
    v28 = parse_message(fixture_bytes("cdc-trusted-intermediary/001_ADT_A01_v28.hl7"))
    ack = build_ack(v28, now=NOW, control_id="F1")
    assert ack.code == AckCode.AA
    assert segs(ack)[0][2:6] == ["GHH LAB, INC.", "GOOD HEALTH HOSPITAL", "ADT1", "GOOD HEALTH HOSPITAL"]
    assert segs(ack)[0][10:12] == ["D", "2.8"]


def test_charset_and_country_version_are_mirrored():
    m = msg(v="2.5^DEU", cs="8859/1")
    ack = build_ack(m, now=NOW, control_id="C1")
    msh = segs(ack)[0]
    assert msh[11] == "2.5^DEU" and msh[17] == "8859/1"
    assert ack.charset == "iso8859-1"
    assert ack.to_bytes().decode("latin-1") == ack.er7


def test_own_sending_application():
    ack = build_ack(msg(), now=NOW, control_id="C2", sending_application="AUTOMAT", sending_facility="HUB")
    assert segs(ack)[0][2:6] == ["AUTOMAT", "HUB", "KIS", "KLINIK"]


def test_generated_control_ids_are_unique():
    ids = {build_ack(msg()).control_id for _ in range(50)}
    assert len(ids) == 50 and all(len(i) == 20 for i in ids)


# ------------------------------------------------------------------ broken input


def test_ack_for_missing_segment_keeps_control_id():
    raw = (MSH.format(v="2.5", acc="", app="", cs="") + "EVN|A01\rPID|1||4711\r").encode()
    result = parse_message(raw)
    assert isinstance(result, Hl7Error) and result.code == ErrorCode.MISSING_SEGMENT
    ack = ack_for(raw, result, now=NOW, control_id="R1")
    assert ack.code == AckCode.AE and ack.acked_control_id == "MSG1"
    msh, msa, err = segs(ack)
    assert msh[2:6] == ["DURIA", "PRAX1", "KIS", "KLINIK"]
    assert err[2] == "PV1^1" and err[3].startswith("100^")


def test_ack_for_bad_encoding_chars_best_effort():
    raw = b"MSH|^~\\|KIS|KLINIK|DURIA|PRAX1|2024||ADT^A01|MSG9|P|2.4\rPID|1\r"
    result = parse_message(raw)
    assert result.code == ErrorCode.BAD_ENCODING_CHARS and result.control_id == "MSG9"
    ack = ack_for(raw, result, now=NOW, control_id="R2")
    assert ack.code == AckCode.AR
    assert ack.acked_control_id == "MSG9"  # from the error: MSH-2 itself was unusable
    assert ack.er7.startswith("MSH|^~\\&|||||")  # default separators, nothing else trusted
    assert isinstance(parse_message(ack.er7), Hl7Message)


def test_ack_for_unsupported_version():
    raw = MSH.format(v="2.9", acc="", app="", cs="") + BODY
    ack = ack_for(raw, parse_message(raw), now=NOW, control_id="R3")
    assert ack.code == AckCode.AR and ack.acked_control_id == "MSG1"
    assert segs(ack)[0][11] == "2.5"  # a version we speak
    assert segs(ack)[2][3].startswith("203^")


def test_ack_for_garbage_and_framing_errors():
    ack = build_reject_ack(b"\x00\xff junk", Hl7Error(code=ErrorCode.NOT_HL7, reason="not HL7"),
                           now=NOW, control_id="G1")
    assert ack.code == AckCode.AR and ack.acked_control_id == ""
    assert segs(ack)[1] == ["MSA", "AR", "", "not HL7"]
    # a frame without start char still yields its control id
    d = FrameDecoder()
    (missing_start,) = d.feed((MSH.format(v="2.5", acc="", app="", cs="") + BODY).encode() + b"\x1c\r")
    ack = build_reject_ack(missing_start.data, missing_start, now=NOW, control_id="G2")
    assert ack.code == AckCode.AR and ack.acked_control_id == "MSG1"


def test_reject_ack_respects_enhanced_never():
    raw = MSH.format(v="2.9", acc="NE", app="NE", cs="") + BODY
    assert ack_for(raw, parse_message(raw)) is None
    raw = MSH.format(v="2.9", acc="AL", app="NE", cs="") + BODY
    assert ack_for(raw, parse_message(raw)).code == AckCode.CR


def test_unknown_charset_is_not_mirrored():
    m = parse_message(fixture_bytes("ipf/oru_r01_v24_zbe_zyx.hl7"))  # MSH-18 "code1~code2"
    ack = build_ack(m, now=NOW, control_id="C3")
    assert len(segs(ack)[0]) == 12 and ack.charset == "utf-8"
    assert parse_message(ack.er7).warnings == []
