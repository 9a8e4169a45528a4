"""HL7 v2 for the DURIA-style import: framing, parsing, ACKs, configuration, FT1 export.

Pure code: no I/O, no Ray, no sockets. Bad input never raises - functions return a
result or an :class:`Hl7Error` with a stable ``code`` and a readable ``reason``.

    from protocols.hl7 import FrameDecoder, parse_messages, ack_for, decide_import

    decoder = FrameDecoder(cfg.tcp.framing.to_framing())
    for item in decoder.feed(chunk):
        if isinstance(item, FramingError):
            reply = build_reject_ack(item.data, item)          # NAK, best effort
        else:
            result = parse_message(item.payload)
            decision = decide_import(result, cfg) if isinstance(result, Hl7Message) else None
            error = decision if isinstance(decision, Hl7Error) else None
            reply = ack_for(item.payload, result, error)       # AA/AE/AR (or CA/CE/CR)
"""

from protocols.hl7.ack import Ack, AckCode, ack_for, build_ack, build_reject_ack, new_control_id, wants_ack
from protocols.hl7.config import (
    AckSettings,
    BillingUnitMatch,
    CaseCreation,
    CaseScope,
    CaseType,
    FileDropSettings,
    FramingSettings,
    Hl7InterfaceConfig,
    IdFieldChoice,
    ImportDecision,
    MappingRow,
    MappingTable,
    PatientCaseIds,
    TcpSettings,
    billable_diagnoses,
    decide_import,
    purge_due,
    resolve_billing_unit,
    resolve_ids,
)
from protocols.hl7.er7 import EncodingChars, FieldPath, RawSegment, escape, format_ts, parse_ts, unescape
from protocols.hl7.errors import ErrorCode, Hl7Error, Hl7Warning
from protocols.hl7.framing import MLLP, Frame, FrameDecoder, FrameEncodeError, Framing, FramingError, encode
from protocols.hl7.ft1 import BilledService, CaseRef, OutboundMessage, build_dft_p03
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
from protocols.hl7.parse import SUPPORTED_VERSIONS, charset_codec, parse_batch, parse_message, parse_messages

__all__ = [
    "MLLP",
    "SUPPORTED_VERSIONS",
    "Ack",
    "AckCode",
    "AckSettings",
    "BilledService",
    "BillingUnitMatch",
    "CaseCreation",
    "CaseRef",
    "CaseScope",
    "CaseType",
    "CodedValue",
    "Diagnosis",
    "EncodingChars",
    "ErrorCode",
    "EventInfo",
    "FieldPath",
    "FileDropSettings",
    "FinancialTransaction",
    "Frame",
    "FrameDecoder",
    "FrameEncodeError",
    "Framing",
    "FramingError",
    "FramingSettings",
    "Hl7Batch",
    "Hl7Error",
    "Hl7InterfaceConfig",
    "Hl7Message",
    "Hl7Warning",
    "IdFieldChoice",
    "Identifier",
    "ImportDecision",
    "Location",
    "MappingRow",
    "MappingTable",
    "MessageHeader",
    "Movement",
    "MovementAction",
    "Order",
    "OutboundMessage",
    "Patient",
    "PatientCaseIds",
    "PersonName",
    "RawSegment",
    "TcpSettings",
    "Visit",
    "ack_for",
    "billable_diagnoses",
    "build_ack",
    "build_dft_p03",
    "build_reject_ack",
    "charset_codec",
    "decide_import",
    "encode",
    "escape",
    "format_ts",
    "new_control_id",
    "parse_batch",
    "parse_message",
    "parse_messages",
    "parse_ts",
    "purge_due",
    "resolve_billing_unit",
    "resolve_ids",
    "unescape",
    "wants_ack",
]
