"""Frame decoder with plain bytes, in the style of python-hl7's MLLP tests."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from protocols.hl7 import MLLP, ErrorCode, Frame, FrameDecoder, FrameEncodeError, Framing, FramingError, encode

from ._files import fixture_bytes

MSG1 = b"MSH|^~\\&|KIS|KLINIK|DURIA|PRAX1|20240301101500||ADT^A01^ADT_A01|MSG1|P|2.5\rPID|1||4711^^^Klinik^PI\r"
MSG2 = b"MSH|^~\\&|KIS|KLINIK|DURIA|PRAX1|20240301101600||ADT^A08^ADT_A01|MSG2|P|2.5\rPID|1||4712^^^Klinik^PI\r"


def frames(items):
    return [i.payload for i in items if isinstance(i, Frame)]


def errors(items):
    return [i for i in items if isinstance(i, FramingError)]


def test_mllp_encode_wraps_message():
    assert encode(MSG1) == b"\x0b" + MSG1 + b"\x1c\r"
    # a missing final segment separator is added (MLLP: the last segment ends with CR)
    assert encode(MSG1.rstrip(b"\r")) == b"\x0b" + MSG1 + b"\x1c\r"


def test_encode_refuses_payload_with_framing_bytes():
    with pytest.raises(FrameEncodeError):
        encode(b"MSH|^~\\&|\x1c|oops\r")


def test_single_message_one_read():
    d = FrameDecoder()
    out = d.feed(encode(MSG1))
    assert frames(out) == [MSG1]
    assert out[0].offset == 1
    assert d.buffered == 0


@pytest.mark.parametrize("name", ["ipf/sap-ish_adt_a01_v25.hl7", "ms-fhir-converter/ADT-A03-01.hl7"])
def test_message_split_at_every_offset(name):
    msg = fixture_bytes(name)
    wire = encode(msg)
    expected = msg if msg.endswith(b"\r") else msg + b"\r"
    for cut in range(len(wire) + 1):
        d = FrameDecoder()
        out = d.feed(wire[:cut]) + d.feed(wire[cut:])
        assert frames(out) == [expected], cut
        assert errors(out) == [], cut
        assert d.finish() == []


def test_byte_by_byte():
    d = FrameDecoder()
    out = []
    for b in encode(MSG1) + encode(MSG2):
        out += d.feed(bytes([b]))
    assert frames(out) == [MSG1, MSG2]
    assert errors(out) == []


def test_many_messages_in_one_chunk():
    wire = b"".join(encode(m) for m in [MSG1, MSG2] * 50)
    out = FrameDecoder().feed(wire)
    assert frames(out) == [MSG1, MSG2] * 50
    assert errors(out) == []


def test_garbage_between_frames_is_reported_and_decoder_resyncs():
    wire = encode(MSG1) + b"HELLO?" + encode(MSG2)
    out = FrameDecoder().feed(wire)
    assert [type(i) for i in out] == [Frame, FramingError, Frame]
    err = out[1]
    assert err.code == ErrorCode.GARBAGE
    assert err.data == b"HELLO?"
    assert err.offset == len(encode(MSG1))
    assert err.severity == "reject"
    assert frames(out) == [MSG1, MSG2]


def test_whitespace_between_frames_is_not_garbage():
    wire = encode(MSG1) + b"\r\n" + encode(MSG2) + b"\n"
    d = FrameDecoder()
    out = d.feed(wire)
    assert frames(out) == [MSG1, MSG2]
    assert errors(out) == [] and d.finish() == []
    strict = FrameDecoder(Framing(report_whitespace=True))
    assert [e.code for e in errors(strict.feed(wire) + strict.finish())] == [ErrorCode.GARBAGE, ErrorCode.GARBAGE]


def test_missing_start_char_is_reported_with_its_bytes():
    wire = MSG1 + b"\x1c\r" + encode(MSG2)
    out = FrameDecoder().feed(wire)
    assert [type(i) for i in out] == [FramingError, Frame]
    assert out[0].code == ErrorCode.MISSING_START
    assert out[0].data == MSG1  # kept for a best-effort NAK by control id
    assert frames(out) == [MSG2]


def test_missing_end_char_new_start_resyncs():
    wire = b"\x0b" + MSG1 + encode(MSG2)  # first frame never ends
    out = FrameDecoder().feed(wire)
    assert [type(i) for i in out] == [FramingError, Frame]
    assert out[0].code == ErrorCode.MISSING_END
    assert out[0].data == MSG1
    assert frames(out) == [MSG2]


def test_missing_end_at_stream_end():
    d = FrameDecoder()
    assert d.feed(b"\x0b" + MSG1[:30]) == []
    assert d.buffered == 30
    errs = d.finish()
    assert [e.code for e in errs] == [ErrorCode.MISSING_END]
    assert errs[0].data == MSG1[:30]
    assert d.buffered == 0 and d.finish() == []


def test_trailing_garbage_reported_on_finish():
    d = FrameDecoder()
    assert frames(d.feed(encode(MSG1) + b"xyz")) == [MSG1]
    assert [e.code for e in d.finish()] == [ErrorCode.GARBAGE]


def test_stray_end_char_is_garbage():
    out = FrameDecoder().feed(encode(MSG1) + b"\x1c\r" + encode(MSG2))
    assert frames(out) == [MSG1, MSG2]
    assert [e.code for e in errors(out)] == [ErrorCode.GARBAGE]


def test_missing_after_end_char_is_tolerated():
    wire = b"\x0b" + MSG1 + b"\x1c" + b"\x0b" + MSG2 + b"\x1c"
    out = FrameDecoder().feed(wire)
    assert frames(out) == [MSG1, MSG2]
    assert errors(out) == []


def test_empty_frame():
    out = FrameDecoder().feed(b"\x0b\x1c\r" + encode(MSG1))
    assert [e.code for e in errors(out)] == [ErrorCode.EMPTY_FRAME]
    assert frames(out) == [MSG1]


def test_oversized_frame_is_skipped_and_next_frame_survives():
    f = Framing(max_frame_bytes=100)
    big = b"MSH|^~\\&|" + b"X" * 500 + b"\r"
    d = FrameDecoder(f)
    out = []
    wire = f.encode(big) + f.encode(MSG1[:90])
    for i in range(0, len(wire), 37):  # also across reads
        out += d.feed(wire[i : i + 37])
    errs = errors(out)
    assert [e.code for e in errs] == [ErrorCode.FRAME_TOO_LARGE]
    assert errs[0].data.startswith(b"MSH|^~\\&|XXX")
    assert frames(out) == [MSG1[:90] + b"\r"]
    assert d.buffered == 0


def test_oversized_frame_without_end_resyncs_at_next_start():
    out = FrameDecoder(Framing(max_frame_bytes=200)).feed(b"\x0b" + b"Y" * 300 + encode(MSG1))
    assert [e.code for e in errors(out)] == [ErrorCode.FRAME_TOO_LARGE]
    assert frames(out) == [MSG1]
    # with a limit below MSG1's size, both frames are reported, nothing is delivered
    out = FrameDecoder(Framing(max_frame_bytes=64)).feed(b"\x0b" + b"Y" * 300 + encode(MSG1))
    assert [e.code for e in errors(out)] == [ErrorCode.FRAME_TOO_LARGE] * 2
    assert frames(out) == []


def test_custom_framing_chars():
    # DURIA lets the operator choose: here STX ... ETX, no char after the end
    f = Framing(start=b"\x02", end=b"\x03", after_end=b"", segment_sep=b"\n")
    msg = MSG1.replace(b"\r", b"\n")
    wire = f.encode(msg) + f.encode(msg)
    assert wire.startswith(b"\x02MSH") and wire.endswith(b"\n\x03")
    out = FrameDecoder(f).feed(wire)
    assert frames(out) == [msg, msg]
    # MLLP bytes mean nothing to this decoder: \x0b is garbage, \x1c is payload
    out = FrameDecoder(f).feed(b"\x0b" + f.encode(msg))
    assert [e.code for e in errors(out)] == [ErrorCode.GARBAGE]


def test_framing_without_start_char():
    f = Framing(start=b"", end=b"\x1c", after_end=b"\r")
    wire = MSG1 + b"\x1c\r" + MSG2 + b"\x1c\r"
    for cut in range(len(wire) + 1):
        d = FrameDecoder(f)
        out = d.feed(wire[:cut]) + d.feed(wire[cut:])
        assert frames(out) == [MSG1, MSG2], cut
        assert errors(out) == [] and d.finish() == []


def test_framing_settings_are_validated():
    with pytest.raises(ValidationError):
        Framing(start=b"\x1c", end=b"\x1c")
    with pytest.raises(ValidationError):
        Framing(end=b"")
    with pytest.raises(ValidationError):
        Framing(end=b"\r")  # same as the segment separator
    with pytest.raises(ValidationError):
        Framing(start=b"\x0b\x0b")
    assert MLLP.start == b"\x0b" and MLLP.end == b"\x1c" and MLLP.after_end == b"\r"


def test_offsets_count_across_feeds():
    d = FrameDecoder()
    first = d.feed(encode(MSG1))
    second = d.feed(b"zz" + encode(MSG2))
    assert first[0].offset == 1
    assert second[0].code == ErrorCode.GARBAGE and second[0].offset == len(encode(MSG1))
    assert second[1].offset == len(encode(MSG1)) + 3
