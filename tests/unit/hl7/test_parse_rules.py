"""Parser rules: encoding characters, charsets, versions, required segments, batches."""

from __future__ import annotations

import pytest

from protocols.hl7 import (
    ErrorCode,
    FieldPath,
    Hl7Error,
    Hl7Message,
    escape,
    parse_batch,
    parse_message,
    parse_messages,
    parse_ts,
    unescape,
)
from protocols.hl7.er7 import EncodingChars, format_ts


def seg(name: str, fields: dict[int, str]) -> str:
    """A segment from {position: value} (no counting of pipes by hand)."""
    n = max(fields)
    return "|".join([name] + [fields.get(i, "") for i in range(1, n + 1)]) + "\r"


ADT = (
    "MSH|^~\\&|KIS|KLINIK|DURIA|PRAX1|20240301101500||ADT^A01^ADT_A01|MSG1|P|2.5\r"
    "EVN|A01|20240301101500\r"
    + seg("PID", {1: "1", 3: "4711^^^Klinik^PI", 5: "Müller^Jörg", 7: "19700102", 8: "M"})
    + seg("PV1", {1: "1", 2: "O", 3: "NOTF^^^CHIR", 10: "UCH", 19: "0815^^^Klinik^VN", 24: "GKV",
                  44: "20240301101500"})
)


def ok(data, **kw) -> Hl7Message:
    r = parse_message(data, **kw)
    assert isinstance(r, Hl7Message), r
    return r


def err(data, code, **kw) -> Hl7Error:
    r = parse_message(data, **kw)
    assert isinstance(r, Hl7Error), r
    assert r.code == code, r
    return r


def test_german_conventions():
    m = ok(ADT.encode("utf-8"))
    pid = m.patient.identifier(type_code="PI")
    assert (pid.id, pid.assigning_authority, pid.type_code) == ("4711", "Klinik", "PI")
    vn = m.visit.visit_number
    assert (vn.id, vn.assigning_authority, vn.type_code) == ("0815", "Klinik", "VN")
    assert m.visit.patient_class == "O" and m.visit.contract_code == "GKV"
    assert m.visit.location.point_of_care == "NOTF" and m.visit.location.facility == "CHIR"
    assert (m.visit.location.function_area, m.visit.location.discipline) == ("NOTF", "CHIR")
    assert m.visit.hospital_service == "UCH"
    assert m.patient.names[0].family == "Müller"
    assert "Müller" not in repr(m.patient)  # no personal data in repr/logs
    assert m.value("PV1-3") == "NOTF" and m.value("PV1-3.4") == "CHIR" and m.value("PV1-10") == "UCH"
    assert m.get("PV1-19") == "0815^^^Klinik^VN" and m.get("PV1-19.5") == "VN"
    assert m.value("PV1-99") is None and m.value("ZBE-1") is None


# ------------------------------------------------------------------ encoding characters


@pytest.mark.parametrize(
    "msh",
    [
        "MSH|^~\\|KIS",  # 3 encoding chars
        "MSH|^~\\&&|KIS",  # duplicate
        "MSH|^~|&|KIS",  # field separator inside MSH-2 -> MSH-2 = "^~"
        "MSHA^~\\&AKIS",  # letter as field separator
        "MSH ^~\\& KIS",  # space as field separator
        "MSH|^~\\a|KIS",  # letter as encoding character
        "MSH|^~\\&#|KIS|KLINIK|DURIA|PRAX1|2024||ADT^A01|1|P|2.5",  # truncation char before 2.7
        "MSH|",
    ],
)
def test_bad_encoding_chars_are_rejected(msh):
    e = err(msh + "\rPID|1\r", ErrorCode.BAD_ENCODING_CHARS)
    assert e.severity == "reject"
    assert "MSH-" in e.reason


def test_truncation_char_allowed_from_27():
    m = ok("MSH|^~\\&#|KIS|KLINIK|DURIA|PRAX1|2024||ADT^A01|1|P|2.7\rPID|1||4711\rPV1|1|I\r")
    assert m.header.encoding.truncation == "#"


def test_non_standard_encoding_characters():
    text = ADT.replace("|", "!").replace("^", "$").replace("~", "*").replace("&", "%")
    m = ok(text)
    assert m.header.encoding.field == "!" and m.header.encoding.component == "$"
    assert m.visit.visit_number.id == "0815" and m.visit.visit_number.type_code == "VN"


def test_escape_sequences():
    text = ADT.replace("Müller^Jörg", "Müller\\S\\Lüdenscheid\\T\\Co\\F\\x\\E\\^Jörg\\X0A\\")
    m = ok(text)
    assert m.patient.names[0].family == "Müller^Lüdenscheid&Co|x\\"
    assert m.patient.names[0].given == "Jörg"  # \X0A\ becomes a line break, stripped at the end
    enc = EncodingChars()
    for s in ["a|b^c&d~e\\f", "plain", "line\nbreak", ""]:
        assert unescape(escape(s, enc), enc) == s
    assert unescape("\\H\\bold\\N\\ \\.br\\x \\Zabc\\ \\unterminated", enc) == "bold \nx \\Zabc\\ \\unterminated"


# ------------------------------------------------------------------ segments and separators


def test_lf_and_crlf_separators_are_accepted():
    for sep in ("\n", "\r\n"):
        m = ok(ADT.replace("\r", sep))
        assert m.segment_names == ["MSH", "EVN", "PID", "PV1"]


def test_custom_segment_separator():
    m = ok(ADT.replace("\r", "\x1e"), segment_sep="\x1e")
    assert m.visit.visit_number.id == "0815"


def test_leading_whitespace_and_trailing_blank_lines():
    m = ok("\r\n  " + ADT + "\r\r\n")
    assert m.control_id == "MSG1"


def test_bad_segment_id():
    e = err(ADT + "p1d|x\r", ErrorCode.BAD_SEGMENT)
    assert e.control_id == "MSG1"
    assert "segment 5" in e.reason
    err(ADT + "PIDX|1\r", ErrorCode.BAD_SEGMENT)


def test_not_hl7_and_empty():
    err(b"", ErrorCode.EMPTY_MESSAGE)
    err(b"\r\n \r", ErrorCode.EMPTY_MESSAGE)
    e = err(b"PID|1||4711\r", ErrorCode.NOT_HL7)
    assert e.segment == "MSH" and "MSH" in e.reason
    err(b"<xml/>", ErrorCode.NOT_HL7)


def test_two_messages_given_to_parse_message():
    e = err(ADT + ADT.replace("MSG1", "MSG2"), ErrorCode.UNEXPECTED_BATCH)
    assert e.segment == "MSH" and e.control_id == "MSG1"
    both = parse_messages(ADT + ADT.replace("MSG1", "MSG2"))
    assert [m.control_id for m in both] == ["MSG1", "MSG2"]


def test_unknown_standard_segment_is_ignored_with_warning():
    # PRT does not exist in HL7 2.3: hl7apy's pass skips it, the message is still taken
    text = ADT.replace("|2.5\r", "|2.3\r").replace("ADT^A01^ADT_A01", "ADT^A01") + "PRT|1|AD\r"
    m = ok(text)
    assert m.segment_names[-1] == "PRT"
    assert any(w.code == "unknown_segment" and w.field == "PRT" for w in m.warnings)


# ------------------------------------------------------------------ header fields


@pytest.mark.parametrize("version", ["2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.2"])
def test_supported_versions(version):
    m = ok(ADT.replace("|2.5\r", f"|{version}\r"))
    assert m.header.version == version


@pytest.mark.parametrize("version", ["2.2", "2.9", "3.0", "abc"])
def test_unsupported_versions(version):
    e = err(ADT.replace("|2.5\r", f"|{version}\r"), ErrorCode.UNSUPPORTED_VERSION)
    assert e.field == "MSH-12" and e.control_id == "MSG1"
    assert e.hl7_code == ("203", "Unsupported version id")


def test_missing_version_control_id_type():
    err(ADT.replace("|2.5\r", "|\r"), ErrorCode.UNSUPPORTED_VERSION)
    e = err(ADT.replace("|MSG1|", "||"), ErrorCode.MISSING_CONTROL_ID)
    assert e.field == "MSH-10"
    e = err(ADT.replace("ADT^A01^ADT_A01", ""), ErrorCode.MISSING_MESSAGE_TYPE)
    assert e.control_id == "MSG1"


# ------------------------------------------------------------------ charsets


def latin1_adt(msh18: str) -> bytes:
    text = ADT.replace("|P|2.5\r", f"|P|2.5||||||{msh18}\r", 1)
    return text.encode("latin-1")


def test_charset_8859_1_declared():
    m = ok(latin1_adt("8859/1"))
    assert m.header.charset == "8859/1" and m.charset == "iso8859-1"
    assert m.patient.names[0].family == "Müller"


def test_charset_utf8_declared_but_latin1_bytes():
    e = err(latin1_adt("UNICODE UTF-8"), ErrorCode.CHARSET_MISMATCH)
    assert e.field == "MSH-18" and e.control_id == "MSG1"


def test_charset_ascii_declared_but_umlaut():
    err(latin1_adt("ASCII"), ErrorCode.CHARSET_MISMATCH)


def test_charset_utf16_is_unsupported():
    e = err(latin1_adt("UNICODE UTF-16"), ErrorCode.UNSUPPORTED_CHARSET)
    assert e.severity == "reject"


def test_charset_missing_latin1_bytes_are_guessed_with_warning():
    m = ok(ADT.encode("latin-1"))
    assert m.patient.names[0].family == "Müller"
    assert any(w.code == "charset_guessed" for w in m.warnings)
    m = ok(ADT.encode("utf-8"))
    assert m.charset == "utf-8" and m.warnings == []


def test_charset_forced_and_bom():
    assert ok(ADT.encode("cp1252"), charset="cp1252").patient.names[0].family == "Müller"
    assert ok(b"\xef\xbb\xbf" + ADT.encode("utf-8")).patient.names[0].family == "Müller"
    err(ADT.encode("latin-1"), ErrorCode.CHARSET_MISMATCH, charset="utf-8")
    err(ADT.encode("utf-8"), ErrorCode.UNSUPPORTED_CHARSET, charset="no-such-codec")


def test_charset_lenient_spelling():
    m = ok(latin1_adt("ISO-8859-1"))
    assert m.charset == "iso8859-1"


# ------------------------------------------------------------------ required segments


def test_adt_without_pv1_names_the_segment():
    text = "".join(seg + "\r" for seg in ADT.split("\r") if seg and not seg.startswith("PV1"))
    e = err(text, ErrorCode.MISSING_SEGMENT)
    assert e.segment == "PV1" and e.control_id == "MSG1" and "PV1" in e.reason
    assert e.severity == "error"  # answered AE, not AR


def test_adt_without_pid_names_the_segment():
    text = "".join(seg + "\r" for seg in ADT.split("\r") if seg and not seg.startswith("PID"))
    e = err(text, ErrorCode.MISSING_SEGMENT)
    assert e.segment == "PID"


def test_pv1_optional_for_merge_and_required_check_can_be_off():
    text = "".join(seg + "\r" for seg in ADT.split("\r") if seg and not seg.startswith("PV1"))
    assert ok(text.replace("ADT^A01^ADT_A01", "ADT^A40^ADT_A39") + "MRG|4710^^^Klinik^PI\r").visit is None
    assert ok(text, check_required_segments=False).visit is None


def test_dft_without_pid():
    e = err("MSH|^~\\&|A|B|C|D|2024||DFT^P03|9|P|2.5\rEVN|P03\rFT1|1\r", ErrorCode.MISSING_SEGMENT)
    assert e.segment == "PID"


# ------------------------------------------------------------------ batches


def test_batch_errors():
    msh = ADT
    cases = {
        "BHS|^~\\&\rBHS|^~\\&\r" + msh + "BTS|1\r": "BHS inside a batch",
        msh + "BHS|^~\\&\r" + msh + "BTS|1\r": "follows messages outside a batch",
        "BHS|^~\\&\rPID|1\r" + msh + "BTS|1\r": "outside a message",
        "BHS|^~\\&\r" + msh + "BTS|1\rFTS|1\r": "FTS without FHS",
        "FHS|^~\\&\rBHS|^~\\&\r" + msh + "FTS|1\r": "FTS before the batch was closed",
        "FHS|^~\\&\r" + msh + "FTS|1\r" + msh: "after FTS",
        "BTS|0\r": "BTS without BHS",
        "BHS|^~\\&\rBTS|0\r": "no MSH",
    }
    for text, reason in cases.items():
        e = parse_batch(text)
        assert isinstance(e, Hl7Error) and e.code == ErrorCode.BATCH_STRUCTURE, (text, e)
        assert reason in e.reason, (reason, e.reason)


def test_batch_count_mismatch_warns_and_bad_message_does_not_hide_others():
    bad = ADT.replace("MSG1", "MSG2").replace("PV1|", "PVX|")
    b = parse_batch("BHS|^~\\&\r" + ADT + bad + "BTS|3\r")
    assert [w.code for w in b.warnings] == ["batch_count"]
    assert [m.control_id for m in b.ok] == ["MSG1"]
    (e,) = b.failed
    assert e.code == ErrorCode.MISSING_SEGMENT and e.control_id == "MSG2"


def test_plain_file_with_several_messages():
    b = parse_batch((ADT + ADT.replace("MSG1", "MSG2")).encode())
    assert [m.control_id for m in b.ok] == ["MSG1", "MSG2"]
    assert b.file_header is None and b.batch_headers == []


# ------------------------------------------------------------------ small helpers


def test_field_path_parsing():
    assert str(FieldPath.parse("PID-3[2].4.1")) == "PID-3[2].4.1"
    for bad in ["PID", "pid-3", "PID-0", "PID-3.0", "PID-3[0]", "PV1-x", ""]:
        with pytest.raises(ValueError):
            FieldPath.parse(bad)


def test_timestamps():
    assert parse_ts("2024") .year == 2024
    assert format_ts(parse_ts("20240301101500.1234+0130")) == "20240301101500+0130"
    assert parse_ts("20240301101500.1234+0130").microsecond == 123400
    for bad in ["", "2024-03-01", "20241301", "20240230", "2024030125", "DOB", "20240301+9999"]:
        assert parse_ts(bad) is None, bad


def test_huge_message_skips_hl7apy_but_still_parses():
    m = ok(ADT + "NTE|" + "x|" * 20000 + "\r")
    assert [w.code for w in m.warnings] == ["validation_skipped"]
    assert m.visit.visit_number.id == "0815" and m.get("NTE-999") == "x"
