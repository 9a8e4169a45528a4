"""HL7 v2 + MLLP under random and mutated input: what a listener does with every frame.

Complements ``tests/unit/hl7/test_fuzz.py`` (decoder/parser/ACK never raise) with the
listener's whole path per frame (decode -> parse -> import decision -> ACK) over every
shared fixture, a "nothing lost" property of the framing (every framed message comes out
exactly once, in order, however the stream is cut, with garbage in between), batches,
and the ER7 escape round trip.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from hypothesis import assume, given
from hypothesis import strategies as st

from protocols.hl7 import (
    Ack,
    Frame,
    FrameDecoder,
    Framing,
    FramingError,
    Hl7Batch,
    Hl7Error,
    Hl7InterfaceConfig,
    Hl7Message,
    ack_for,
    decide_import,
    parse_batch,
    parse_message,
    parse_messages,
)
from protocols.hl7.er7 import DEFAULT_ENCODING, escape, unescape
from tests.unit.fuzz._fuzz import fuzz, mutated, tried

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures" / "hl7v2"


@lru_cache(maxsize=1)
def fixtures() -> dict[str, bytes]:
    out = {str(p.relative_to(FIXTURES)): p.read_bytes() for p in sorted(FIXTURES.glob("*/*.hl7"))}
    assert out, "no HL7 fixtures"
    return out


@lru_cache(maxsize=1)
def iface() -> Hl7InterfaceConfig:
    return Hl7InterfaceConfig.model_validate({"name": "fuzz", "transport": "tcp", "tcp": {"port": 2575}})


def listener_path(payload: bytes) -> None:
    """What ``actors/hl7/listener.py`` does with one frame; nothing may raise."""
    tried("hl7.parse_message")
    result = parse_message(payload)
    assert isinstance(result, (Hl7Message, Hl7Error))
    err = None
    if isinstance(result, Hl7Message):
        tried("hl7.decide_import")
        d = decide_import(result, iface())
        err = d if isinstance(d, Hl7Error) else None
    tried("hl7.ack_for")
    ack = ack_for(payload, result, err)
    assert ack is None or isinstance(ack, Ack)
    if ack is not None:  # our own answer must be valid HL7
        back = parse_message(ack.to_bytes())
        assert isinstance(back, Hl7Message), (back, ack.er7)


@fuzz()
@given(st.data())
def test_mutated_fixtures_through_the_listener_path(data):
    name = data.draw(st.sampled_from(sorted(fixtures())))
    raw = data.draw(mutated(fixtures()[name], tuple(fixtures().values())))
    listener_path(raw)


@fuzz(0.5)
@given(st.data())
def test_mutated_batches_parse_to_typed_results(data):
    name = data.draw(st.sampled_from(sorted(fixtures())))
    raw = data.draw(mutated(fixtures()[name], tuple(fixtures().values())))
    tried("hl7.parse_batch")
    b = parse_batch(raw)
    assert isinstance(b, (Hl7Batch, Hl7Error))
    tried("hl7.parse_messages")
    for r in parse_messages(raw):
        assert isinstance(r, (Hl7Message, Hl7Error))


_framings = st.sampled_from([
    Framing(),
    Framing(start=b"", end=b"\x1c", after_end=b""),
    Framing(start=b"\x02", end=b"\x03", after_end=b"", segment_sep=b"\n"),
    Framing(start=b"\x0b", end=b"\x1c", after_end=b"\r", max_frame_bytes=1 << 20),
])


def _clean(msg: bytes, f: Framing) -> bytes:
    for b in (f.start, f.end, f.after_end):
        if b:
            msg = msg.replace(b, b"")
    return msg


@fuzz()
@given(st.data(), _framings)
def test_framing_loses_nothing_however_the_stream_is_cut(data, f):
    """Every framed message comes out exactly once and in order; bytes between frames
    are reported as framing errors, never glued to a message."""
    msgs = [_clean(data.draw(st.sampled_from(list(fixtures().values()))), f)[:4000] for _ in range(data.draw(st.integers(1, 5)))]
    msgs = [m for m in msgs if m.strip()]
    assume(msgs)
    stream = b""
    for m in msgs:
        if f.start:  # garbage only where a start char delimits it
            stream += data.draw(st.binary(max_size=8).map(lambda g: _clean(g, f)))
        stream += f.encode(m)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    d = FrameDecoder(f)
    out: list = []
    prev = 0
    for c in cuts + [len(stream)]:
        out += d.feed(stream[prev:c])
        prev = c
    tried("hl7.FrameDecoder.feed", len(cuts) + 1)
    frames = [x for x in out if isinstance(x, Frame)]
    want = [m if m.endswith(f.segment_sep) else m + f.segment_sep for m in msgs]
    assert [fr.payload for fr in frames] == want
    assert all(isinstance(x, (Frame, FramingError)) for x in out)


@fuzz()
@given(st.text(max_size=200))
def test_er7_escape_round_trips_any_text(s):
    tried("hl7.er7.unescape")
    esc = escape(s, DEFAULT_ENCODING)
    for sep in (DEFAULT_ENCODING.field, DEFAULT_ENCODING.component, DEFAULT_ENCODING.repetition,
                DEFAULT_ENCODING.subcomponent):
        assert sep not in esc
    assert "\r" not in esc  # a CR would end the segment
    assert unescape(esc, DEFAULT_ENCODING) == s


@fuzz()
@given(st.text(alphabet="\\FSTREPHNXC.br0123456789abcdefZ", max_size=60))
def test_er7_unescape_of_escape_soup_never_raises(s):
    tried("hl7.er7.unescape")
    assert isinstance(unescape(s, DEFAULT_ENCODING), str)
