"""Parse HL7 v2 messages and batch files into :class:`~protocols.hl7.model.Hl7Message`.

Pipeline of :func:`parse_message`:

1. **Charset.** ``bytes`` are decoded with the charset named in MSH-18 (HL7 table 0211:
   ``ASCII``, ``8859/1`` … ``8859/15``, ``UNICODE UTF-8``, ``ISO IR100`` …); the MSH
   segment itself is ASCII, so it is sniffed first. Without MSH-18 the bytes are read as
   UTF-8, falling back to Windows-1252/Latin-1 with a warning (German KIS often send
   Latin-1 without declaring it). ``str`` input is taken as is.
2. **Encoding characters** come from MSH-1/MSH-2 of the message itself and are checked
   (4 distinct non-alphanumeric printable characters, a 5th truncation character only
   from v2.7; wrong ones are rejected with ``bad_encoding_chars``).
3. **Segments**: CR separates segments (LF or CRLF are accepted when the text holds no
   bare CR, e.g. files edited on Windows); every line must start with a segment id.
4. **hl7apy** (``parse_message(find_groups=False)``, validation level TOLERANT) parses
   the message for the version in MSH-12 (2.3 - 2.8.2). Z-segments (ZBE, ...) pass;
   segments hl7apy does not know for that version are left out of its pass and noted as
   a warning (HL7's rule: ignore unexpected segments).
5. **Typed model**: header, EVN, PID, PV1, DG1*, FT1*, ORC/OBR, ZBE are read
   positionally (see ``er7.py`` for why not from hl7apy's tree).
6. **Rules**: ADT messages need PID and, for visit-related events, PV1
   (``missing_segment``); DFT/BAR need PID. DURIA's "keine ADT-Nachricht ohne
   MSH/EVN/PID/PV1": a missing EVN is a warning only, as HL7 2.3 feeds omit it.

Nothing here raises on bad input; every failure is an :class:`Hl7Error`.
"""

from __future__ import annotations

import codecs
import functools
from decimal import Decimal, InvalidOperation

from hl7apy import load_reference
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message as _hl7apy_parse_message

from protocols.hl7.er7 import (
    HL7_NULL,
    EncodingChars,
    RawSegment,
    check_encoding_chars,
    is_segment_id,
    parse_ts,
    split_segments,
    unescape,
)
from protocols.hl7.errors import ErrorCode, Hl7Error, Hl7Warning
from protocols.hl7.model import (
    CodedValue,
    Diagnosis,
    EventInfo,
    FinancialTransaction,
    Hl7Batch,
    Hl7Message,
    Identifier,
    Location,
    MessageHeader,
    Movement,
    MovementAction,
    Order,
    Patient,
    PersonName,
    Visit,
)

#: versions accepted (MSH-12.1) and the hl7apy library used for each
_HL7APY_VERSION = {
    "2.3": "2.3",
    "2.3.1": "2.3.1",
    "2.4": "2.4",
    "2.5": "2.5",
    "2.5.1": "2.5.1",
    "2.6": "2.6",
    "2.7": "2.7",
    "2.7.1": "2.7",  # hl7apy has no 2.7.1 library; 2.7 is structurally the same
    "2.8": "2.8",
    "2.8.1": "2.8.1",
    "2.8.2": "2.8.2",
}
SUPPORTED_VERSIONS = tuple(_HL7APY_VERSION)

#: hl7apy needs ~0.15-0.25 ms per element (field, component, repetition, ...): a hostile
#: or odd message with 20,000 fields took 5 s. Above this many separators the hl7apy pass
#: is skipped (warning ``validation_skipped``); the positional parse is linear and still runs.
HL7APY_MAX_ELEMENTS = 4000

#: HL7 table 0211 (alternate character sets) -> Python codec
_CHARSETS = {
    "ASCII": "ascii",
    "UNICODE UTF-8": "utf-8",
    "UNICODE": "utf-8",
    "UTF-8": "utf-8",
    "ISO IR6": "ascii",
    "ISO IR100": "iso8859-1",
    "ISO IR101": "iso8859-2",
    "ISO IR109": "iso8859-3",
    "ISO IR110": "iso8859-4",
    "ISO IR144": "iso8859-5",
    "ISO IR127": "iso8859-6",
    "ISO IR126": "iso8859-7",
    "ISO IR138": "iso8859-8",
    "ISO IR148": "iso8859-9",
    "ISO IR192": "utf-8",
    "GB 18030-2000": "gb18030",
    "BIG-5": "big5",
    "KS X 1001": "euc_kr",
}
for _n in range(1, 16):
    if _n != 12:
        _CHARSETS[f"8859/{_n}"] = f"iso8859-{_n}"
_ASCII_INCOMPATIBLE = {"UNICODE UTF-16", "UNICODE UTF-32", "ISO IR87", "ISO IR159", "CNS 11643-1992"}

#: ADT events whose message structure has no PV1 or only an optional one (HL7 2.5:
#: A20 bed status; ADT_A24/A37 link/unlink; ADT_A30 merges and id changes A30 A34-A36
#: A46-A49; ADT_A39/A40 merges A39-A42; ADT_A43 moves A43/A44; ADT_A60 allergies).
#: Every other ADT event needs PID and PV1 (DURIA: "keine ADT-Nachricht ohne ... PV1").
_ADT_WITHOUT_PID = {"A20"}
_ADT_PV1_OPTIONAL = {
    "A20", "A24", "A30", "A34", "A35", "A36", "A37", "A39", "A40", "A41", "A42",
    "A43", "A44", "A46", "A47", "A48", "A49", "A60",
}
_BATCH_SEGMENTS = ("FHS", "BHS", "BTS", "FTS")


# ============================================================================ public API


def parse_message(
    data: bytes | str,
    *,
    segment_sep: str | bytes | None = None,
    charset: str | None = None,
    check_required_segments: bool = True,
    validate: bool = True,
) -> Hl7Message | Hl7Error:
    """Parse one message. ``segment_sep`` overrides the separator (default: CR, or LF
    if there is no CR); ``charset`` forces a Python codec for ``bytes`` input regardless
    of MSH-18. A batch (FHS/BHS or several MSH) is ``unexpected_batch``: use
    :func:`parse_batch` or :func:`parse_messages`.

    ``validate=False`` skips the hl7apy pass (step 4). hl7apy costs ~20 ms for a small
    ADT and ~250 ms for an 8 KB one on this machine, the rest of the parse ~0.5 ms; in
    TOLERANT mode it adds little beyond the checks made here anyway. Messages with more
    than :data:`HL7APY_MAX_ELEMENTS` separators skip it automatically."""
    warnings: list[Hl7Warning] = []
    sep = _sep_str(segment_sep)
    decoded = _decode(data, charset, sep, warnings)
    if isinstance(decoded, Hl7Error):
        return decoded
    text, codec = decoded
    lines = split_segments(text, sep)
    if not lines:
        return Hl7Error(code=ErrorCode.EMPTY_MESSAGE, reason="no segments in the message")
    lines[0] = lines[0].lstrip()
    first = lines[0][:3]
    if first in ("FHS", "BHS"):
        return Hl7Error(
            code=ErrorCode.UNEXPECTED_BATCH,
            reason=f"data starts with {first}: this is a batch, not a single message",
            segment=first,
        )
    if first != "MSH":
        return Hl7Error(code=ErrorCode.NOT_HL7, segment="MSH",
                        reason=f"a message must start with MSH, found {_preview(lines[0])}")
    return _parse_lines(lines, codec, warnings, check_required_segments, validate)


def parse_batch(
    data: bytes | str,
    *,
    segment_sep: str | bytes | None = None,
    charset: str | None = None,
    check_required_segments: bool = True,
    validate: bool = True,
) -> Hl7Batch | Hl7Error:
    """Parse an HL7 batch file ``[FHS] {BHS {MSH…} BTS} [FTS]`` - or a file that simply
    holds one or more messages. Structural errors (BHS inside a message, segments before
    the first MSH, a second FHS, …) fail the whole file with ``batch_structure``; each
    message then parses on its own, so one bad message does not hide the others.
    BTS-1/FTS-1 counts that do not match are warnings."""
    warnings: list[Hl7Warning] = []
    sep = _sep_str(segment_sep)
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        if raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        lines_b = _split_lines_bytes(raw, sep)
        # segment names are ASCII in every supported charset
        names = [ln.lstrip()[:3].decode("latin-1") for ln in lines_b]
        units: list[bytes | str] = list(lines_b)
    else:
        lines_s = split_segments(data, sep)
        names = [ln.lstrip()[:3] for ln in lines_s]
        units = list(lines_s)
    if not units:
        return Hl7Error(code=ErrorCode.EMPTY_MESSAGE, reason="the file holds no segments")

    structure = _group_batch(names)
    if isinstance(structure, Hl7Error):
        return structure
    fhs_idx, bhs_idxs, groups = structure

    messages: list[Hl7Message | Hl7Error] = []
    for start, stop in groups:
        chunk = _join(units[start:stop])
        messages.append(
            parse_message(chunk, segment_sep="\r", charset=charset,
                          check_required_segments=check_required_segments, validate=validate)
        )

    def header(i: int) -> RawSegment:
        ln = units[i]
        txt = ln.decode("latin-1") if isinstance(ln, bytes) else ln
        txt = txt.lstrip()
        enc = check_encoding_chars(txt[3:4], txt[4:].split(txt[3:4], 1)[0] if len(txt) > 4 else "")
        return RawSegment.from_er7(txt, enc if isinstance(enc, EncodingChars) else EncodingChars())

    return Hl7Batch(
        file_header=header(fhs_idx) if fhs_idx is not None else None,
        batch_headers=[header(i) for i in bhs_idxs],
        messages=messages,
        warnings=warnings + _trailer_warnings(units, names),
    )


def parse_messages(
    data: bytes | str,
    *,
    segment_sep: str | bytes | None = None,
    charset: str | None = None,
    check_required_segments: bool = True,
    validate: bool = True,
) -> list[Hl7Message | Hl7Error]:
    """One message or a batch: always a list (a broken batch gives one error)."""
    if _first_segment_name(data) in ("FHS", "BHS") or _count_msh(data) > 1:
        batch = parse_batch(data, segment_sep=segment_sep, charset=charset,
                            check_required_segments=check_required_segments, validate=validate)
        return [batch] if isinstance(batch, Hl7Error) else list(batch.messages)
    return [parse_message(data, segment_sep=segment_sep, charset=charset,
                          check_required_segments=check_required_segments, validate=validate)]


# ============================================================================ decoding


def charset_codec(msh18: str) -> str | None:
    """Python codec for an MSH-18 value (HL7 table 0211, lenient about case and
    common spellings such as ``ISO-8859-1``); ``None`` if unknown/unsupported."""
    key = " ".join(msh18.strip().upper().split())
    if key in _ASCII_INCOMPATIBLE:
        return None
    if key in _CHARSETS:
        return _CHARSETS[key]
    try:
        info = codecs.lookup(msh18.strip())
    except (LookupError, ValueError):  # ValueError: a NUL in the name
        return None
    # only ASCII-compatible codecs: the separators must stay single ASCII bytes
    if info.name.startswith(("utf-16", "utf-32")) or info.name in ("utf-7",):
        return None
    return info.name


def _decode(
    data: bytes | str, forced: str | None, sep: str | None, warnings: list[Hl7Warning]
) -> tuple[str, str] | Hl7Error:
    if isinstance(data, str):
        return (data[1:] if data.startswith("\ufeff") else data), "utf-8"
    raw = bytes(data)
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
        if forced is None:
            forced = "utf-8"
    if forced is not None:
        try:
            return raw.decode(forced), codecs.lookup(forced).name
        except LookupError:
            return Hl7Error(code=ErrorCode.UNSUPPORTED_CHARSET, reason=f"unknown charset {forced!r}")
        except UnicodeDecodeError as e:
            return Hl7Error(code=ErrorCode.CHARSET_MISMATCH,
                            reason=f"the message is not valid {forced} (byte {e.start})")
    sniff = raw.decode("latin-1")
    lines = split_segments(sniff, sep)
    msh18 = ""
    if lines and lines[0].lstrip().startswith("MSH") and len(lines[0].lstrip()) > 4:
        msh = lines[0].lstrip()
        fs = msh[3]
        fields = msh.split(fs)
        if len(fields) > 17:
            # first repetition / component of MSH-18 (separators from MSH-2)
            msh2 = fields[1]
            value = fields[17]
            if len(msh2) >= 2:
                value = value.split(msh2[1], 1)[0].split(msh2[0], 1)[0]
            msh18 = value.strip()
    codec = charset_codec(msh18) if msh18 else None
    if msh18 and codec is None:
        key = " ".join(msh18.upper().split())
        if key in _ASCII_INCOMPATIBLE:
            return Hl7Error(code=ErrorCode.UNSUPPORTED_CHARSET, field="MSH-18",
                            reason=f"MSH-18 names charset {msh18!r}, which is not supported",
                            control_id=_sniff_control_id(sniff))
        warnings.append(Hl7Warning(code="unknown_charset", field="MSH-18",
                                   reason=f"MSH-18 {msh18!r} is no known charset; the charset is guessed"))
    if codec is not None:
        try:
            return raw.decode(codec), codec
        except UnicodeDecodeError as e:
            return Hl7Error(code=ErrorCode.CHARSET_MISMATCH, field="MSH-18",
                            reason=f"MSH-18 declares {msh18!r} but byte {e.start} "
                                   f"(0x{raw[e.start]:02X}) is not valid in it",
                            control_id=_sniff_control_id(sniff))
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    for codec in ("cp1252", "latin-1"):
        try:
            text = raw.decode(codec)
        except UnicodeDecodeError:
            continue
        warnings.append(Hl7Warning(code="charset_guessed", field="MSH-18",
                                   reason=f"no usable MSH-18 and the data is not UTF-8; read as {codec}"))
        return text, codecs.lookup(codec).name
    return Hl7Error(code=ErrorCode.CHARSET_MISMATCH, reason="cannot decode the message")  # pragma: no cover


def _sniff_control_id(text: str) -> str | None:
    lines = split_segments(text)
    if not lines:
        return None
    msh = lines[0].lstrip()
    if not msh.startswith("MSH") or len(msh) < 5:
        return None
    return _field(msh.split(msh[3]), 9)


# ============================================================================ one message


def _parse_lines(
    lines: list[str], codec: str, warnings: list[Hl7Warning], check_required: bool, validate: bool
) -> Hl7Message | Hl7Error:
    msh_line = lines[0]
    if len(msh_line) < 8:
        return Hl7Error(code=ErrorCode.BAD_ENCODING_CHARS, segment="MSH",
                        reason="MSH is too short to hold MSH-1 and MSH-2")
    field_sep = msh_line[3]
    naive = msh_line.split(field_sep)
    msh2 = naive[1] if len(naive) > 1 else ""
    naive_version = naive[11].split(msh2[:1] or "^")[0].strip() if len(naive) > 11 and msh2 else None
    enc = check_encoding_chars(field_sep, msh2, naive_version)
    if isinstance(enc, str):
        return Hl7Error(code=ErrorCode.BAD_ENCODING_CHARS, field="MSH-2" if "MSH-2" in enc else "MSH-1",
                        reason=enc, control_id=(naive[9].strip() or None) if len(naive) > 9 else None)

    # segments
    segments: list[RawSegment] = []
    for idx, line in enumerate(lines):
        line = line.lstrip()
        name = line[:3]
        if not is_segment_id(name) or (len(line) > 3 and line[3] != field_sep):
            return Hl7Error(code=ErrorCode.BAD_SEGMENT,
                            reason=f"segment {idx + 1} does not start with a segment id: {_preview(line)}",
                            control_id=_field(naive, 9))
        if idx and name in ("MSH", *_BATCH_SEGMENTS):
            kind = "several messages" if name == "MSH" else f"a {name} segment inside a message"
            return Hl7Error(code=ErrorCode.UNEXPECTED_BATCH if name in ("MSH", "FHS", "FTS") else ErrorCode.BATCH_STRUCTURE,
                            segment=name, control_id=_field(naive, 9),
                            reason=f"found {kind} (segment {idx + 1}); use parse_batch for batch files")
        segments.append(RawSegment.from_er7(line, enc))
    msh = segments[0]
    r = _Reader(enc)

    # header
    control_id = r.leaf(msh, 10)
    version = r.leaf(msh, 12)
    mtype = r.leaf(msh, 9)
    if not version:
        return Hl7Error(code=ErrorCode.UNSUPPORTED_VERSION, field="MSH-12", control_id=control_id or None,
                        reason="MSH-12 (version id) is empty")
    if version not in _HL7APY_VERSION:
        return Hl7Error(code=ErrorCode.UNSUPPORTED_VERSION, field="MSH-12", control_id=control_id or None,
                        reason=f"HL7 version {version!r} is not supported (supported: 2.3 to 2.8.2)")
    if not control_id:
        return Hl7Error(code=ErrorCode.MISSING_CONTROL_ID, field="MSH-10",
                        reason="MSH-10 (message control id) is empty")
    if not mtype:
        return Hl7Error(code=ErrorCode.MISSING_MESSAGE_TYPE, field="MSH-9", control_id=control_id,
                        reason="MSH-9 (message type) is empty")
    header = MessageHeader(
        encoding=enc,
        sending_application=r.opt(msh, 3),
        sending_facility=r.opt(msh, 4),
        receiving_application=r.opt(msh, 5),
        receiving_facility=r.opt(msh, 6),
        sent_at=r.ts(msh, 7, warnings),
        message_type=mtype,
        trigger_event=r.opt(msh, 9, 2),
        message_structure=r.opt(msh, 9, 3),
        control_id=control_id,
        processing_id=r.opt(msh, 11),
        version=version,
        version_country=r.opt(msh, 12, 2),
        accept_ack_type=r.opt(msh, 15),
        application_ack_type=r.opt(msh, 16),
        country_code=r.opt(msh, 17),
        charset=r.opt(msh, 18),
        language=r.opt(msh, 19),
    )

    # hl7apy pass
    if validate:
        err = _hl7apy_check(segments, enc, version, warnings)
        if err is not None:
            return err.model_copy(update={"control_id": control_id})

    if check_required:
        err = _check_required(header, [s.name for s in segments], warnings)
        if err is not None:
            return err
    return _build(header, segments, r, codec, warnings)


def _field(fields: list[str], n: int) -> str | None:
    return (fields[n].strip() or None) if len(fields) > n else None


@functools.lru_cache(maxsize=2048)
def _hl7apy_knows(name: str, version: str) -> bool:
    if name.startswith("Z"):
        return True
    try:
        load_reference(name, "Segment", version)
    except Exception:  # hl7apy raises ChildNotFound / KeyError / InvalidName
        return False
    return True


def _hl7apy_check(
    segments: list[RawSegment], enc: EncodingChars, version: str, warnings: list[Hl7Warning]
) -> Hl7Error | None:
    elements = sum(len(seg.fields) for seg in segments) + sum(
        f.count(enc.component) + f.count(enc.repetition) + f.count(enc.subcomponent)
        for seg in segments for f in seg.fields[3 if seg.name == "MSH" else 1 :]
    )
    if elements > HL7APY_MAX_ELEMENTS:
        warnings.append(Hl7Warning(code="validation_skipped",
                                   reason=f"{elements} elements exceed the hl7apy budget of {HL7APY_MAX_ELEMENTS}; "
                                          f"parsed without the hl7apy pass"))
        return None
    lib_version = _HL7APY_VERSION[version]
    if lib_version != version:
        warnings.append(Hl7Warning(code="version_mapped", field="MSH-12",
                                   reason=f"HL7 {version} is validated with the {lib_version} definitions"))
    parts = []
    for seg in segments:
        if not _hl7apy_knows(seg.name, lib_version):
            warnings.append(Hl7Warning(code="unknown_segment", field=seg.name,
                                       reason=f"segment {seg.name} is not defined in HL7 {lib_version}; ignored"))
            continue
        if seg.name == "MSH" and lib_version != version:
            fields = list(seg.fields)
            fields[12] = lib_version + fields[12][len(version):]
            seg = RawSegment(name="MSH", fields=fields)
        # hl7apy splits on CR only; a CR inside a segment (custom separator) must not split it
        parts.append(seg.to_er7(enc).replace("\r", " "))
    try:
        parsed = _hl7apy_parse_message(
            "\r".join(parts), validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False
        )
        names = [c.name for c in parsed.children]
    except Exception as e:  # hl7apy signals bad input with many exception types
        return Hl7Error(code=ErrorCode.PARSE_ERROR, reason=f"hl7apy could not parse the message: "
                                                           f"{type(e).__name__}: {_short(str(e))}")
    expected = [p[:3] for p in parts]
    if names != expected:  # pragma: no cover - defensive consistency check
        return Hl7Error(code=ErrorCode.PARSE_ERROR,
                        reason=f"hl7apy saw segments {names}, expected {expected}")
    return None


def _check_required(header: MessageHeader, segment_names: list[str], warnings: list[Hl7Warning]) -> Hl7Error | None:
    mtype = header.message_type
    trig = header.trigger_event or ""
    names = set(segment_names)
    need: list[str] = []
    if mtype == "ADT":
        if trig not in _ADT_WITHOUT_PID:
            need.append("PID")
        if trig not in _ADT_PV1_OPTIONAL:
            need.append("PV1")
        if "EVN" not in names:
            warnings.append(Hl7Warning(code="missing_evn", field="EVN", reason="ADT message without EVN segment"))
    elif mtype in ("DFT", "BAR"):
        need.append("PID")
    for seg in need:
        if seg not in names:
            return Hl7Error(code=ErrorCode.MISSING_SEGMENT, segment=seg, control_id=header.control_id,
                            reason=f"{mtype} {trig} message without {seg} segment".replace("  ", " "))
    return None


# ============================================================================ extraction


class _Reader:
    """Positional reads with unescaping; HL7 null ``""`` -> None."""

    def __init__(self, enc: EncodingChars) -> None:
        self.enc = enc

    def reps(self, seg: RawSegment | None, f: int) -> list[str]:
        if seg is None:
            return []
        raw = seg.field(f)
        if not raw:
            return []
        if seg.name == "MSH" and f in (1, 2):
            return [raw]
        return raw.split(self.enc.repetition)

    def comps(self, rep: str) -> list[str]:
        return rep.split(self.enc.component)

    def leaf(self, seg: RawSegment | None, f: int, c: int = 1, s: int = 1, rep: int = 1) -> str:
        reps = self.reps(seg, f)
        if len(reps) < rep:
            return ""
        return self.leaf_of(reps[rep - 1], c, s)

    def leaf_of(self, rep: str, c: int = 1, s: int = 1) -> str:
        comps = rep.split(self.enc.component)
        if len(comps) < c:
            return ""
        subs = comps[c - 1].split(self.enc.subcomponent)
        if len(subs) < s:
            return ""
        return unescape(subs[s - 1], self.enc).strip()

    def opt(self, seg: RawSegment | None, f: int, c: int = 1, s: int = 1, rep: int = 1) -> str | None:
        v = self.leaf(seg, f, c, s, rep)
        return None if v in ("", HL7_NULL) else v

    def opt_of(self, rep: str, c: int = 1, s: int = 1) -> str | None:
        v = self.leaf_of(rep, c, s)
        return None if v in ("", HL7_NULL) else v

    def ts(self, seg: RawSegment | None, f: int, warnings: list[Hl7Warning], c: int = 1, rep: int = 1):
        v = self.opt(seg, f, c, 1, rep)
        if v is None:
            return None
        dt = parse_ts(v)
        if dt is None and seg is not None:
            warnings.append(Hl7Warning(code="bad_timestamp", field=f"{seg.name}-{f}",
                                       reason=f"{seg.name}-{f} is not an HL7 date/time"))
        return dt

    def decimal(self, value: str | None, field: str, warnings: list[Hl7Warning]) -> Decimal | None:
        if value is None:
            return None
        try:
            d = Decimal(value.replace(",", ".") if value.count(",") == 1 and "." not in value else value)
        except InvalidOperation:
            d = None
        if d is None or not d.is_finite():
            warnings.append(Hl7Warning(code="bad_number", field=field, reason=f"{field} is not a number"))
            return None
        return d

    def identifier(self, rep: str) -> Identifier | None:
        ident = self.opt_of(rep, 1)
        if ident is None:
            return None
        return Identifier(
            id=ident,
            check_digit=self.opt_of(rep, 2),
            assigning_authority=self.opt_of(rep, 4, 1),
            assigning_authority_id=self.opt_of(rep, 4, 2),
            type_code=self.opt_of(rep, 5),
            assigning_facility=self.opt_of(rep, 6, 1),
        )

    def identifiers(self, seg: RawSegment | None, f: int) -> list[Identifier]:
        out = []
        for rep in self.reps(seg, f):
            ident = self.identifier(rep)
            if ident is not None:
                out.append(ident)
        return out

    def coded(self, rep: str | None) -> CodedValue | None:
        if not rep:
            return None
        cv = CodedValue(code=self.opt_of(rep, 1), text=self.opt_of(rep, 2), coding_system=self.opt_of(rep, 3))
        return cv if (cv.code or cv.text) else None

    def location(self, seg: RawSegment | None, f: int) -> Location | None:
        reps = self.reps(seg, f)
        if not reps:
            return None
        rep = reps[0]
        loc = Location(
            point_of_care=self.opt_of(rep, 1),
            room=self.opt_of(rep, 2),
            bed=self.opt_of(rep, 3),
            facility=self.opt_of(rep, 4),
            status=self.opt_of(rep, 5),
            location_type=self.opt_of(rep, 6),
            building=self.opt_of(rep, 7),
            floor=self.opt_of(rep, 8),
        )
        return loc if any(v is not None for v in loc.model_dump().values()) else None


def _first(segments: list[RawSegment], name: str) -> RawSegment | None:
    for s in segments:
        if s.name == name:
            return s
    return None


def _build(
    header: MessageHeader, segments: list[RawSegment], r: _Reader, codec: str, warnings: list[Hl7Warning]
) -> Hl7Message:
    evn = _first(segments, "EVN")
    pid = _first(segments, "PID")
    pv1 = _first(segments, "PV1")
    zbe = _first(segments, "ZBE")

    event = None
    if evn is not None:
        event = EventInfo(
            event_type=r.opt(evn, 1),
            recorded_at=r.ts(evn, 2, warnings),
            planned_at=r.ts(evn, 3, warnings),
            reason_code=r.opt(evn, 4),
            operator_id=r.opt(evn, 5),
            occurred_at=r.ts(evn, 6, warnings),
        )

    patient = None
    if pid is not None:
        names = []
        for rep in r.reps(pid, 5):
            n = PersonName(
                family=r.opt_of(rep, 1), given=r.opt_of(rep, 2), middle=r.opt_of(rep, 3),
                suffix=r.opt_of(rep, 4), prefix=r.opt_of(rep, 5), degree=r.opt_of(rep, 6),
                name_type=r.opt_of(rep, 7),
            )
            if any(v is not None for v in n.model_dump().values()):
                names.append(n)
        ext = r.reps(pid, 2)
        acct = r.reps(pid, 18)
        birth = r.ts(pid, 7, warnings)
        patient = Patient(
            set_id=r.opt(pid, 1),
            external_id=r.identifier(ext[0]) if ext else None,
            identifiers=r.identifiers(pid, 3),
            alternate_ids=r.identifiers(pid, 4),
            names=names,
            birth_date=birth.date() if birth else None,
            sex=r.opt(pid, 8),
            account_number=r.identifier(acct[0]) if acct else None,
        )

    visit = None
    if pv1 is not None:
        vn = r.reps(pv1, 19)
        visit = Visit(
            set_id=r.opt(pv1, 1),
            patient_class=r.opt(pv1, 2),
            location=r.location(pv1, 3),
            admission_type=r.opt(pv1, 4),
            prior_location=r.location(pv1, 6),
            attending_doctor_id=r.opt(pv1, 7),
            hospital_service=r.opt(pv1, 10),
            admit_source=r.opt(pv1, 14),
            patient_type=r.opt(pv1, 18),
            visit_number=r.identifier(vn[0]) if vn else None,
            financial_class=r.opt(pv1, 20),
            contract_code=r.opt(pv1, 24),
            discharge_disposition=r.opt(pv1, 36),
            admit_at=r.ts(pv1, 44, warnings),
            discharge_at=r.ts(pv1, 45, warnings),
        )

    diagnoses = []
    for dg1 in (s for s in segments if s.name == "DG1"):
        code_rep = (r.reps(dg1, 3) or [""])[0]
        diagnoses.append(Diagnosis(
            set_id=r.opt(dg1, 1),
            coding_method=r.opt(dg1, 2),
            code=r.opt_of(code_rep, 1),
            text=r.opt_of(code_rep, 2) or r.opt(dg1, 4),
            coding_system=r.opt_of(code_rep, 3) or r.opt(dg1, 2),
            diagnosed_at=r.ts(dg1, 5, warnings),
            diagnosis_type=r.opt(dg1, 6),
            priority=r.opt(dg1, 15),
            clinician_id=r.opt(dg1, 16),
            classification=r.opt(dg1, 17),
            identifier=r.opt(dg1, 20),
            action_code=r.opt(dg1, 21),
        ))

    transactions = []
    for ft1 in (s for s in segments if s.name == "FT1"):
        n = r.opt(ft1, 1) or str(len(transactions) + 1)
        transactions.append(FinancialTransaction(
            set_id=r.opt(ft1, 1),
            transaction_id=r.opt(ft1, 2),
            batch_id=r.opt(ft1, 3),
            transaction_date=r.ts(ft1, 4, warnings),
            transaction_date_end=r.ts(ft1, 4, warnings, c=2),
            posting_date=r.ts(ft1, 5, warnings),
            transaction_type=r.opt(ft1, 6),
            code=r.coded((r.reps(ft1, 7) or [None])[0]),
            description=r.opt(ft1, 8),
            quantity=r.decimal(r.opt(ft1, 10), f"FT1-10 (FT1 {n})", warnings),
            amount_extended=r.decimal(r.opt(ft1, 11, 1, 1), f"FT1-11 (FT1 {n})", warnings),
            currency=r.opt(ft1, 11, 1, 2),
            amount_unit=r.decimal(r.opt(ft1, 12, 1, 1), f"FT1-12 (FT1 {n})", warnings),
            department=r.opt(ft1, 13),
            diagnoses=[cv for cv in (r.coded(rep) for rep in r.reps(ft1, 19)) if cv is not None],
            performed_by=r.opt(ft1, 20),
            ordered_by=r.opt(ft1, 21),
            filler_order_number=r.opt(ft1, 23),
            procedure_code=r.coded((r.reps(ft1, 25) or [None])[0]),
        ))

    orders = _orders(segments, r, warnings)

    movement = None
    if zbe is not None:
        action_raw = r.opt(zbe, 4)
        action = None
        if action_raw is not None:
            try:
                action = MovementAction(action_raw.upper())
            except ValueError:
                warnings.append(Hl7Warning(code="bad_movement_action", field="ZBE-4",
                                           reason=f"ZBE-4 {action_raw!r} is not INSERT/UPDATE/DELETE/CANCEL"))
        hist = r.opt(zbe, 5)
        movement = Movement(
            movement_id=r.opt(zbe, 1),
            movement_namespace=r.opt(zbe, 1, 2),
            started_at=r.ts(zbe, 2, warnings),
            ended_at=r.ts(zbe, 3, warnings),
            action=action,
            historic={"Y": True, "N": False}.get((hist or "").upper()),
            original_trigger=r.opt(zbe, 6),
            responsible_ward=r.opt(zbe, 7, 10) or r.opt(zbe, 7),
        )

    return Hl7Message(
        header=header,
        event=event,
        patient=patient,
        visit=visit,
        diagnoses=diagnoses,
        transactions=transactions,
        orders=orders,
        movement=movement,
        segments=segments,
        charset=codec,
        warnings=warnings,
    )


def _orders(segments: list[RawSegment], r: _Reader, warnings: list[Hl7Warning]) -> list[Order]:
    """ORC starts an order; the next OBR (before another ORC) belongs to it. An OBR with
    no ORC before it (older ORU) is an order of its own. A second OBR after one ORC
    (ORC OBR OBR) also becomes its own order, inheriting nothing."""
    orders: list[Order] = []
    current: dict | None = None

    def close() -> None:
        nonlocal current
        if current is not None:
            orders.append(Order(**current))
        current = None

    for seg in segments:
        if seg.name == "ORC":
            close()
            current = dict(
                order_control=r.opt(seg, 1),
                placer_order_number=r.opt(seg, 2),
                placer_namespace=r.opt(seg, 2, 2),
                filler_order_number=r.opt(seg, 3),
                filler_namespace=r.opt(seg, 3, 2),
                placer_group_number=r.opt(seg, 4),
                order_status=r.opt(seg, 5),
                has_orc=True,
            )
        elif seg.name == "OBR":
            if current is None or current.get("has_obr"):
                close()
                current = {}
            current["placer_order_number"] = current.get("placer_order_number") or r.opt(seg, 2)
            current["placer_namespace"] = current.get("placer_namespace") or r.opt(seg, 2, 2)
            current["filler_order_number"] = current.get("filler_order_number") or r.opt(seg, 3)
            current["filler_namespace"] = current.get("filler_namespace") or r.opt(seg, 3, 2)
            current["service"] = r.coded((r.reps(seg, 4) or [None])[0])
            current["observed_at"] = r.ts(seg, 7, warnings)
            current["has_obr"] = True
    close()
    return orders


# ============================================================================ batches


def _sep_str(sep: str | bytes | None) -> str | None:
    if sep is None:
        return None
    return sep.decode("latin-1") if isinstance(sep, (bytes, bytearray)) else sep


def _split_lines_bytes(raw: bytes, sep: str | None) -> list[bytes]:
    if sep is None:
        if b"\r" in raw:
            lines = raw.replace(b"\r\n", b"\r").split(b"\r")
        else:
            lines = raw.split(b"\n")
    else:
        lines = raw.split(sep.encode("latin-1"))
    return [ln for ln in lines if ln.strip()]


def _join(units: list[bytes | str]) -> bytes | str:
    if units and isinstance(units[0], bytes):
        return b"\r".join(u.lstrip() for u in units)  # type: ignore[union-attr]
    return "\r".join(u.lstrip() for u in units)  # type: ignore[union-attr]


def _group_batch(names: list[str]) -> tuple[int | None, list[int], list[tuple[int, int]]] | Hl7Error:
    """Check the batch structure and cut it into messages: (FHS index, BHS indexes,
    [(start, stop) segment range per message]) or an Hl7Error."""
    fhs_idx = None
    bhs_idxs: list[int] = []
    groups: list[tuple[int, int]] = []
    in_batch = False
    file_closed = False
    loose = False  # messages seen outside any BHS/BTS
    msg_start: int | None = None

    def err(reason: str, seg: str) -> Hl7Error:
        return Hl7Error(code=ErrorCode.BATCH_STRUCTURE, segment=seg, reason=reason)

    def close_msg(i: int) -> None:
        nonlocal msg_start
        if msg_start is not None:
            groups.append((msg_start, i))
        msg_start = None

    for i, name in enumerate(names):
        if file_closed:
            return err(f"segment {name} (segment {i + 1}) after FTS", name)
        if name == "FHS":
            if i != 0:
                return err(f"FHS must be the first segment of the file, found at segment {i + 1}", name)
            fhs_idx = i
        elif name == "BHS":
            if in_batch:
                where = "inside a message" if msg_start is not None else "inside a batch"
                return err(f"BHS {where} (segment {i + 1}): the previous batch was not closed with BTS", name)
            if loose:
                return err(f"BHS at segment {i + 1} follows messages outside a batch", name)
            in_batch = True
            bhs_idxs.append(i)
        elif name == "BTS":
            if not in_batch:
                return err(f"BTS without BHS (segment {i + 1})", name)
            close_msg(i)
            in_batch = False
        elif name == "FTS":
            if fhs_idx is None:
                return err(f"FTS without FHS (segment {i + 1})", name)
            if in_batch:
                return err(f"FTS before the batch was closed with BTS (segment {i + 1})", name)
            close_msg(i)
            file_closed = True
        elif name == "MSH":
            close_msg(i)
            msg_start = i
            loose = loose or not in_batch
        else:
            if msg_start is None:
                return err(f"segment {name!r} (segment {i + 1}) outside a message", name or "?")
    close_msg(len(names))  # a batch without BTS is tolerated (warning by the caller)
    if not groups:
        return err("the file holds no MSH segment", "MSH")
    return fhs_idx, bhs_idxs, groups


def _trailer_warnings(units: list[bytes | str], names: list[str]) -> list[Hl7Warning]:
    """Compare BTS-1 / FTS-1 counts with what the file holds."""
    out: list[Hl7Warning] = []
    msgs = 0
    batches = 0
    open_batch = False
    has_fhs = bool(names) and names[0] == "FHS"
    has_fts = "FTS" in names
    for unit, name in zip(units, names):
        txt = unit.decode("latin-1") if isinstance(unit, bytes) else unit
        txt = txt.lstrip()
        if name == "BHS":
            msgs = 0
            open_batch = True
        elif name == "MSH":
            msgs += 1
        elif name in ("BTS", "FTS"):
            fields = txt.split(txt[3]) if len(txt) > 3 else []
            declared = fields[1].strip() if len(fields) > 1 else ""
            actual = msgs if name == "BTS" else batches
            if name == "BTS":
                batches += 1
                open_batch = False
            if declared.isdigit() and int(declared) != actual:
                what = "messages" if name == "BTS" else "batches"
                out.append(Hl7Warning(code="batch_count", field=f"{name}-1",
                                      reason=f"{name}-1 declares {declared} {what}, the file holds {actual}"))
    if open_batch:
        out.append(Hl7Warning(code="batch_unclosed", field="BTS", reason="the last batch has no BTS segment"))
    if has_fhs and not has_fts:
        out.append(Hl7Warning(code="file_unclosed", field="FTS", reason="the file has FHS but no FTS segment"))
    return out


def _first_segment_name(data: bytes | str) -> str:
    if isinstance(data, str):
        return data.lstrip("\ufeff \t\r\n")[:3]
    raw = bytes(data[:64])
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    return raw.lstrip(b" \t\r\n")[:3].decode("latin-1")


def _count_msh(data: bytes | str) -> int:
    if isinstance(data, str):
        return sum(1 for ln in split_segments(data) if ln.lstrip().startswith("MSH"))
    return sum(1 for ln in _split_lines_bytes(bytes(data), None) if ln.lstrip().startswith(b"MSH"))


# ============================================================================ helpers


def _preview(line: str, n: int = 4) -> str:
    # short on purpose: reasons end up in ACKs and logs, segment content may be personal
    return repr(line[:n]) + ("…" if len(line) > n else "")


def _short(s: str, n: int = 200) -> str:
    return s if len(s) <= n else s[:n] + "…"


__all__ = [
    "HL7APY_MAX_ELEMENTS",
    "SUPPORTED_VERSIONS",
    "charset_codec",
    "parse_batch",
    "parse_message",
    "parse_messages",
]
