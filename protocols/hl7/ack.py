"""Acknowledgements (ACK) for inbound HL7 v2 messages.

Acknowledgement modes (HL7 v2 chapter 2.9):

* **Original mode** - MSH-15 and MSH-16 both empty: the receiver answers every message
  with MSA-1 ``AA`` (accepted), ``AE`` (error: understood, but breaks a rule) or ``AR``
  (reject: not understood / unsupported type, version, processing id).
* **Enhanced mode** - MSH-15 (accept acknowledgement) and/or MSH-16 (application
  acknowledgement) are valued with ``AL`` (always), ``NE`` (never), ``ER`` (only on
  error/reject) or ``SU`` (only on success). The *accept* ACK (commit: the message is
  safely stored) uses ``CA``/``CE``/``CR``; the *application* ACK uses ``AA``/``AE``/``AR``.
  In enhanced mode an empty MSH-15 counts as ``AL`` and an empty MSH-16 as ``NE``.
  When the conditions say "no acknowledgement", the builders return ``None``.

The ACK mirrors the message: sending and receiving application/facility are swapped,
MSH-1/MSH-2, MSH-11 (processing id), MSH-12 (version) and MSH-18 (charset) are copied,
MSA-2 is the message's MSH-10. On AE/AR (CE/CR) an ERR segment carries the reason: from
v2.5 as ``ERR||<location>|<table 0357 code>|E||||<text>``, before v2.5 as the ERR-1
ELD composite; up to v2.6 the reason is also in MSA-3.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict

from protocols.hl7.er7 import (
    DEFAULT_ENCODING,
    EncodingChars,
    FieldPath,
    check_encoding_chars,
    escape,
    format_ts,
    version_tuple,
)
from protocols.hl7.errors import Hl7Error
from protocols.hl7.model import Hl7Message
from protocols.hl7.parse import SUPPORTED_VERSIONS, charset_codec


class AckCode(StrEnum):
    AA = "AA"  # application accept
    AE = "AE"  # application error
    AR = "AR"  # application reject
    CA = "CA"  # commit accept (enhanced mode)
    CE = "CE"  # commit error
    CR = "CR"  # commit reject


class Ack(BaseModel):
    """A built acknowledgement. ``er7`` is CR-separated and ends with CR."""

    model_config = ConfigDict(frozen=True)

    code: AckCode
    acked_control_id: str  # MSA-2 (the acknowledged message's MSH-10; "" if unknown)
    control_id: str  # MSH-10 of the ACK itself
    er7: str
    charset: str = "utf-8"  # Python codec for to_bytes (from the message's MSH-18)

    def to_bytes(self) -> bytes:
        return self.er7.encode(self.charset, errors="replace")


Phase = Literal["accept", "application"]


def new_control_id() -> str:
    """A fresh MSH-10 (20 characters: fits the v2.3/2.4 length limit)."""
    return uuid.uuid4().hex[:20].upper()


def ack_code(*, enhanced: bool, phase: Phase, error: Hl7Error | None) -> AckCode:
    commit = enhanced and phase == "accept"
    if error is None:
        return AckCode.CA if commit else AckCode.AA
    if error.severity == "reject":
        return AckCode.CR if commit else AckCode.AR
    return AckCode.CE if commit else AckCode.AE


def wants_ack(condition: str | None, ok: bool) -> bool:
    """Evaluate an MSH-15/MSH-16 condition (HL7 table 0155) for an outcome."""
    cond = (condition or "AL").upper()
    if cond == "NE":
        return False
    if cond == "ER":
        return not ok
    if cond == "SU":
        return ok
    return True  # AL and anything unknown: answering is the safe side


def build_ack(
    msg: Hl7Message,
    error: Hl7Error | None = None,
    *,
    phase: Phase = "accept",
    control_id: str | None = None,
    now: datetime | None = None,
    sending_application: str | None = None,
    sending_facility: str | None = None,
) -> Ack | None:
    """ACK for a parsed message. ``error=None`` accepts it; an :class:`Hl7Error` answers
    AE/CE (``severity == "error"``) or AR/CR (``"reject"``). ``phase`` matters only in
    enhanced mode (``"accept"``: commit ACK per MSH-15, ``"application"``: per MSH-16).
    Returns ``None`` when the message's acknowledgement conditions ask for none.
    ``sending_application``/``sending_facility`` override the values taken from MSH-5/6."""
    h = msg.header
    enhanced = h.enhanced_ack_mode
    if enhanced:
        if phase == "accept":
            cond = h.accept_ack_type or "AL"
        else:
            cond = h.application_ack_type or "NE"
        if not wants_ack(cond, error is None):
            return None
    msh = msg.segments[0]
    enc = h.encoding
    raw = {n: msh.field(n) for n in (3, 4, 5, 6, 11, 12, 18)}
    return _render(
        enc=enc,
        code=ack_code(enhanced=enhanced, phase=phase, error=error),
        fields=raw,
        version=h.version,
        trigger=h.trigger_event,
        acked=h.control_id,
        error=error,
        control_id=control_id,
        now=now,
        sending_application=sending_application,
        sending_facility=sending_facility,
        charset=(charset_codec(h.charset) if h.charset else None) or msg.charset,
    )


def build_reject_ack(
    raw: bytes | str,
    error: Hl7Error,
    *,
    control_id: str | None = None,
    now: datetime | None = None,
    sending_application: str | None = None,
    sending_facility: str | None = None,
) -> Ack | None:
    """ACK for data that did not parse (or failed a rule before a model existed):
    best-effort reading of MSH (applications, control id, version, ack conditions) from
    the raw data; anything unusable falls back to defaults (``|^~\\&``, version 2.5,
    empty MSA-2). The code is AR/AE (CR/CE in enhanced mode) per ``error.severity``.
    ``None`` only if the sender's MSH-15 asks for no accept acknowledgement."""
    text = raw if isinstance(raw, str) else _lenient_decode(bytes(raw))
    enc, fields = _sniff_msh(text)
    version = _first_comp(fields.get(12, ""), enc)
    if version not in SUPPORTED_VERSIONS:
        version = "2.5"
        fields[12] = version
    if enc.truncation is not None and version_tuple(version) < (2, 7):  # our ACK must be valid for its version
        enc = enc.model_copy(update={"truncation": None})
    acc = _first_comp(fields.get(15, ""), enc)
    app = _first_comp(fields.get(16, ""), enc)
    enhanced = bool(acc or app)
    if enhanced and not wants_ack(acc or "AL", False):
        return None
    acked = _first_comp(fields.get(10, ""), enc) or error.control_id or ""
    trigger = _comp(fields.get(9, ""), enc, 2) or None
    declared = _first_comp(fields.get(18, ""), enc)
    charset = (charset_codec(declared) or "utf-8") if declared else "utf-8"
    return _render(
        enc=enc,
        code=ack_code(enhanced=enhanced, phase="accept", error=error),
        fields=fields,
        version=version,
        trigger=trigger,
        acked=acked,
        error=error,
        control_id=control_id,
        now=now,
        sending_application=sending_application,
        sending_facility=sending_facility,
        charset=charset,
    )


def ack_for(
    raw: bytes | str,
    result: Hl7Message | Hl7Error,
    error: Hl7Error | None = None,
    **kwargs,
) -> Ack | None:
    """Convenience for listeners: the ACK for a parse ``result`` of ``raw``, with an
    optional later ``error`` (e.g. unknown billing unit) for a parsed message."""
    if isinstance(result, Hl7Message):
        return build_ack(result, error, **kwargs)
    return build_reject_ack(raw, result, **kwargs)


# ---------------------------------------------------------------------------- rendering


def _render(
    *,
    enc: EncodingChars,
    code: AckCode,
    fields: dict[int, str],
    version: str,
    trigger: str | None,
    acked: str,
    error: Hl7Error | None,
    control_id: str | None,
    now: datetime | None,
    sending_application: str | None,
    sending_facility: str | None,
    charset: str,
) -> Ack:
    v = version_tuple(version)
    fs = enc.field
    ctrl = control_id or new_control_id()
    ts = format_ts(now or datetime.now().astimezone())
    msg_type = f"ACK{enc.component}{escape(trigger, enc)}" if trigger else "ACK"
    if trigger and v >= (2, 3, 1):
        msg_type += f"{enc.component}ACK"
    msh = [
        "MSH",
        enc.msh2,
        escape(sending_application, enc) if sending_application is not None else fields.get(5, ""),
        escape(sending_facility, enc) if sending_facility is not None else fields.get(6, ""),
        fields.get(3, ""),
        fields.get(4, ""),
        ts,
        "",
        msg_type,
        escape(ctrl, enc),
        fields.get(11, "") or "P",
        fields.get(12, "") or escape(version, enc),
    ]
    declared = _first_comp(fields.get(18, ""), enc)
    if declared and charset_codec(declared):  # only a charset the peer declared and we know
        msh += ["", "", "", "", "", fields[18]]
    segments = [fs.join(msh)]
    msa = ["MSA", code.value, escape(acked, enc)]
    if error is not None and v < (2, 7):
        msa.append(escape(_one_line(error.reason)[:80], enc))
    segments.append(fs.join(msa))
    if error is not None:
        segments.append(_err_segment(error, enc, v))
    return Ack(
        code=code,
        acked_control_id=acked,
        control_id=ctrl,
        er7="\r".join(segments) + "\r",
        charset=charset,
    )


def _err_segment(error: Hl7Error, enc: EncodingChars, v: tuple[int, ...]) -> str:
    c, s = enc.component, enc.subcomponent
    code, text = error.hl7_code
    seg, field_no = _location(error)
    if v >= (2, 5):
        location = ""
        if seg:
            location = seg + c + "1" + (c + str(field_no) if field_no else "")
        fields = [
            "ERR",
            "",
            location,
            c.join([code, escape(text, enc), "HL70357"]),
            "E",
            "",
            "",
            "",
            escape(_one_line(error.reason), enc),
        ]
        return enc.field.join(fields)
    # v2.3/2.4: ERR-1 ELD = segment id ^ sequence ^ field position ^ code (CE as subcomponents)
    eld = c.join([
        seg or "",
        "1" if seg else "",
        str(field_no) if field_no else "",
        s.join([code, escape(text, enc), "HL70357"]),
    ])
    return enc.field.join(["ERR", eld])


def _location(error: Hl7Error) -> tuple[str | None, int | None]:
    if error.field:
        try:
            fp = FieldPath.parse(error.field)
            return fp.segment, fp.field
        except ValueError:
            pass
        name = error.field[:3]
        if len(name) == 3 and name.isalnum() and name.isupper():
            return name, None
    if error.segment:
        return error.segment, None
    return None, None


def _one_line(s: str) -> str:
    return " ".join(s.split())


# ---------------------------------------------------------------------------- sniffing


def _lenient_decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _sniff_msh(text: str) -> tuple[EncodingChars, dict[int, str]]:
    """Find an MSH segment anywhere in ``text`` and return its encoding characters and
    raw fields 3..18 (sanitised). Unusable input gives default characters and {}."""
    i = text.find("MSH")
    if i == -1:
        return DEFAULT_ENCODING, {}
    line = text[i:]
    for stop in ("\r", "\n", "\x1c", "\x0b"):
        j = line.find(stop)
        if j != -1:
            line = line[:j]
    if len(line) < 8:
        return DEFAULT_ENCODING, {}
    fs = line[3]
    parts = line.split(fs)
    msh2 = parts[1] if len(parts) > 1 else ""
    version = parts[11].split(msh2[:1] or "^", 1)[0].strip() if len(parts) > 11 and msh2 else None
    enc = check_encoding_chars(fs, msh2, version or None)
    if isinstance(enc, str):
        # unusable separators: read nothing but a plausible control id
        return DEFAULT_ENCODING, {}
    fields: dict[int, str] = {}
    for n in range(3, min(len(parts) + 1, 19)):
        value = "".join(ch for ch in parts[n - 1] if ch.isprintable())[:200]
        fields[n] = value
    return enc, fields


def _first_comp(value: str, enc: EncodingChars) -> str:
    return value.split(enc.repetition, 1)[0].split(enc.component, 1)[0].strip()


def _comp(value: str, enc: EncodingChars, n: int) -> str:
    comps = value.split(enc.repetition, 1)[0].split(enc.component)
    return comps[n - 1].strip() if len(comps) >= n else ""
