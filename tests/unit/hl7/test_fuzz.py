"""Property tests: random bytes never make the frame decoder, the parser or the ACK
builder raise - they only ever return frames, messages or typed errors."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.hl7 import (
    Ack,
    ErrorCode,
    Frame,
    FrameDecoder,
    Framing,
    FramingError,
    Hl7Batch,
    Hl7Error,
    Hl7Message,
    ack_for,
    build_ack,
    encode,
    parse_batch,
    parse_message,
    parse_messages,
)

from ._files import fixture_bytes

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# bytes with a high share of the characters that matter to HL7 and MLLP
hl7ish = st.lists(
    st.one_of(
        st.sampled_from([b"\x0b", b"\x1c", b"\r", b"\n", b"|", b"^", b"~", b"\\", b"&", b"MSH", b"PID", b"BHS",
                         b"MSH|^~\\&|", b"2.5", b"\xc3\xbc", b"\xfc", b'""']),
        st.binary(min_size=1, max_size=8),
    ),
    max_size=60,
).map(b"".join)

framings = st.sampled_from([
    Framing(),
    Framing(start=b"", end=b"\x1c", after_end=b""),
    Framing(start=b"\x02", end=b"\x03", after_end=b"", segment_sep=b"\n"),
    Framing(max_frame_bytes=64),
])


@FAST
@given(data=st.one_of(st.binary(max_size=400), hl7ish), cuts=st.lists(st.integers(0, 400), max_size=6),
       framing=framings)
def test_decoder_never_raises(data, cuts, framing):
    d = FrameDecoder(framing)
    out = []
    prev = 0
    for c in sorted(cuts) + [len(data)]:
        c = min(c, len(data))
        out += d.feed(data[prev:c])
        prev = max(prev, c)
    out += d.finish()
    assert all(isinstance(i, (Frame, FramingError)) for i in out)
    for i in out:
        if isinstance(i, FramingError):
            assert isinstance(i.code, ErrorCode) and i.reason and len(i.data) <= 4096
    assert d.buffered == 0


message_bodies = st.binary(min_size=1, max_size=200).filter(lambda b: b"\x0b" not in b and b"\x1c" not in b)


@FAST
@given(bodies=st.lists(message_bodies, min_size=1, max_size=5), cuts=st.lists(st.integers(0, 1200), max_size=8))
def test_decoder_reassembles_any_split(bodies, cuts):
    wire = b"".join(encode(b) for b in bodies)
    d = FrameDecoder()
    out = []
    prev = 0
    for c in sorted(cuts) + [len(wire)]:
        c = min(c, len(wire))
        out += d.feed(wire[prev:c])
        prev = max(prev, c)
    expected = [b if b.endswith(b"\r") else b + b"\r" for b in bodies]
    got = [i.payload for i in out if isinstance(i, Frame)]
    blank = [b for b in expected if not b.strip(b" \t\r\n")]
    assert got == [b for b in expected if b not in blank]
    assert [i.code for i in out if isinstance(i, FramingError)] == [ErrorCode.EMPTY_FRAME] * len(blank)


def _check(result):
    assert isinstance(result, (Hl7Message, Hl7Error)), result
    if isinstance(result, Hl7Error):
        assert isinstance(result.code, ErrorCode) and result.reason


@SLOW
@given(data=st.one_of(st.binary(max_size=300), hl7ish, st.text(max_size=200)))
def test_parser_never_raises_on_random_input(data):
    _check(parse_message(data))
    for r in parse_messages(data):
        _check(r)
    b = parse_batch(data)
    assert isinstance(b, (Hl7Batch, Hl7Error))


BASE = None


def _base() -> bytes:
    global BASE
    if BASE is None:
        BASE = fixture_bytes("ipf/sap-ish_adt_a01_v25.hl7")
    return BASE


@SLOW
@given(edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 3), st.binary(max_size=4)), min_size=1,
                      max_size=6))
def test_parser_and_ack_never_raise_on_mutated_messages(edits):
    data = bytearray(_base())
    for pos, dele, ins in edits:
        pos = min(pos, len(data))
        data[pos : pos + dele] = ins
    raw = bytes(data)
    result = parse_message(raw)
    _check(result)
    ack = ack_for(raw, result, now=None)
    assert ack is None or isinstance(ack, Ack)
    if ack is not None:
        reparsed = parse_message(ack.to_bytes())
        assert isinstance(reparsed, Hl7Message), (raw, ack.er7, reparsed)
        assert reparsed.header.message_type == "ACK"
    if isinstance(result, Hl7Message):
        err = Hl7Error(code=ErrorCode.MISSING_FIELD, reason="x", field="PID-3")
        for phase in ("accept", "application"):
            a = build_ack(result, err, phase=phase)
            assert a is None or isinstance(a, Ack)
