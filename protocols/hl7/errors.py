"""Typed errors and warnings of the HL7 v2 layer.

Nothing in ``protocols.hl7`` raises on bad *input*: every function that reads bytes from
the outside returns either a result or an :class:`Hl7Error` (``code`` is stable and meant
for programs, ``reason`` is a sentence for the operator). The error also knows how it
is answered: :attr:`Hl7Error.severity` decides between AR/CR ("reject": the message
could not be understood at all) and AE/CE ("error": understood, but breaks a rule), and
:attr:`Hl7Error.hl7_code` is the HL7 table 0357 code put into the ERR segment.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class ErrorCode(StrEnum):
    # framing (MLLP or custom start/end characters)
    GARBAGE = "garbage"  # bytes outside a frame
    MISSING_START = "missing_start"  # data ended by the end char, but no start char seen
    MISSING_END = "missing_end"  # a frame never got its end char
    FRAME_TOO_LARGE = "frame_too_large"
    EMPTY_FRAME = "empty_frame"
    # message level (reject: AR / CR)
    EMPTY_MESSAGE = "empty_message"
    NOT_HL7 = "not_hl7"  # does not start with MSH (or FHS/BHS for batches)
    BAD_ENCODING_CHARS = "bad_encoding_chars"  # MSH-1 / MSH-2 unusable
    UNSUPPORTED_CHARSET = "unsupported_charset"  # MSH-18 names a charset we cannot decode
    CHARSET_MISMATCH = "charset_mismatch"  # bytes are not valid in the declared charset
    UNSUPPORTED_VERSION = "unsupported_version"  # MSH-12 empty or outside 2.3 - 2.8.x
    MISSING_CONTROL_ID = "missing_control_id"  # MSH-10 empty
    MISSING_MESSAGE_TYPE = "missing_message_type"  # MSH-9 empty
    BAD_SEGMENT = "bad_segment"  # a line that is not a segment (bad segment id)
    PARSE_ERROR = "parse_error"  # hl7apy could not parse the message
    BATCH_STRUCTURE = "batch_structure"  # FHS/BHS/BTS/FTS in the wrong place
    UNEXPECTED_BATCH = "unexpected_batch"  # a batch given to parse_message
    # content level (error: AE / CE)
    MISSING_SEGMENT = "missing_segment"  # e.g. PID or PV1 missing in an ADT message
    MISSING_FIELD = "missing_field"  # a configured / required field is empty
    UNKNOWN_BILLING_UNIT = "unknown_billing_unit"  # no mapping-table row matches
    AMBIGUOUS_BILLING_UNIT = "ambiguous_billing_unit"  # two equally specific rows differ


#: codes answered with AR / CR (the message is not processable at all)
_REJECT = {
    ErrorCode.GARBAGE,
    ErrorCode.MISSING_START,
    ErrorCode.MISSING_END,
    ErrorCode.FRAME_TOO_LARGE,
    ErrorCode.EMPTY_FRAME,
    ErrorCode.EMPTY_MESSAGE,
    ErrorCode.NOT_HL7,
    ErrorCode.BAD_ENCODING_CHARS,
    ErrorCode.UNSUPPORTED_CHARSET,
    ErrorCode.CHARSET_MISMATCH,
    ErrorCode.UNSUPPORTED_VERSION,
    ErrorCode.MISSING_CONTROL_ID,
    ErrorCode.MISSING_MESSAGE_TYPE,
    ErrorCode.BAD_SEGMENT,
    ErrorCode.PARSE_ERROR,
    ErrorCode.BATCH_STRUCTURE,
    ErrorCode.UNEXPECTED_BATCH,
}

#: HL7 table 0357 (message error condition codes) for the ERR segment
_HL7_CODES: dict[ErrorCode, tuple[str, str]] = {
    ErrorCode.MISSING_SEGMENT: ("100", "Segment sequence error"),
    ErrorCode.MISSING_FIELD: ("101", "Required field missing"),
    ErrorCode.MISSING_CONTROL_ID: ("101", "Required field missing"),
    ErrorCode.MISSING_MESSAGE_TYPE: ("200", "Unsupported message type"),
    ErrorCode.UNSUPPORTED_VERSION: ("203", "Unsupported version id"),
    ErrorCode.UNKNOWN_BILLING_UNIT: ("103", "Table value not found"),
    ErrorCode.AMBIGUOUS_BILLING_UNIT: ("103", "Table value not found"),
    ErrorCode.BAD_SEGMENT: ("100", "Segment sequence error"),
    ErrorCode.BATCH_STRUCTURE: ("100", "Segment sequence error"),
    ErrorCode.UNEXPECTED_BATCH: ("100", "Segment sequence error"),
    ErrorCode.BAD_ENCODING_CHARS: ("102", "Data type error"),
    ErrorCode.UNSUPPORTED_CHARSET: ("102", "Data type error"),
    ErrorCode.CHARSET_MISMATCH: ("102", "Data type error"),
}
_DEFAULT_HL7_CODE = ("207", "Application internal error")


class Hl7Error(BaseModel):
    """A typed failure. ``segment``/``field`` point at the culprit where one is known
    (``field`` in HL7 notation, e.g. ``"PID-3"``); ``control_id`` is MSH-10 when it could
    be read, so that even a rejected message can be acknowledged by id."""

    model_config = ConfigDict(frozen=True)

    code: ErrorCode
    reason: str
    segment: str | None = None
    field: str | None = None
    control_id: str | None = None

    @property
    def severity(self) -> str:
        """``"reject"`` (answered AR/CR) or ``"error"`` (answered AE/CE)."""
        return "reject" if self.code in _REJECT else "error"

    @property
    def hl7_code(self) -> tuple[str, str]:
        """(code, text) from HL7 table 0357 for ERR-3 (v2.5+) / ERR-1.4 (v2.3/2.4)."""
        return _HL7_CODES.get(self.code, _DEFAULT_HL7_CODE)

    def __str__(self) -> str:  # readable in logs
        where = f" [{self.field or self.segment}]" if (self.field or self.segment) else ""
        return f"{self.code.value}{where}: {self.reason}"


class Hl7Warning(BaseModel):
    """Something odd but not fatal (an unparseable date, an unknown segment, ...)."""

    model_config = ConfigDict(frozen=True)

    code: str
    reason: str
    field: str | None = None
