"""MIME + KIM headers: read a raw KIM mail (bytes) into a typed :class:`ParsedMail`.

Pure: no I/O. Uses the stdlib ``email`` package with ``policy.default``; defects are
tolerated and reported in :attr:`ParsedMail.defects`, except those that make the
structure unusable (multipart without/with unmatched boundary, no header at all), which
raise :class:`~protocols.kim.errors.MimeError` with ``code=mime_broken``.

Errors (``MimeError.code``, see :class:`MimeErrorCode`):

* ``mime_empty``                – no bytes / only whitespace
* ``mime_oversized``            – larger than the configured limit (checked before parsing)
* ``mime_broken``               – not parseable as a MIME message
* ``mime_no_attachment``        – :meth:`ParsedMail.single_attachment`: none found
* ``mime_too_many_attachments`` – :meth:`ParsedMail.single_attachment`: more than one

The ``X-KIM-Dienstkennung`` header (``<Anwendung>;<Nachrichtentyp>;<Version>``) is parsed
into a :class:`Dienstkennung` whose :attr:`~Dienstkennung.status` tells ``valid``,
``missing`` and ``malformed`` apart; whether a valid one is *known* is decided by
:func:`protocols.kim.procedures.classify` (``unknown_dienstkennung``).
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from email import policy
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesParser
from email.utils import getaddresses, parsedate_to_datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from protocols.kim.errors import MimeError

#: Default upper bound for a raw mail. KIM 1.0 allowed 25 MB per message (larger
#: content goes through KAS); eAU/eEB mails are 10–30 KB.
DEFAULT_MAX_MAIL_BYTES = 25 * 1024 * 1024

DIENSTKENNUNG_HEADER = "X-KIM-Dienstkennung"

#: Attachments a KIM client adds on its own (signature check reports). They are listed
#: but ignored by :meth:`ParsedMail.single_attachment` unless asked otherwise.
KIM_CLIENT_REPORT = re.compile(r"^(Signaturpruefungsbericht|Pruefungsdetails)[^/\\]*\.(pdf|txt)$", re.IGNORECASE)


class MimeErrorCode(StrEnum):
    EMPTY = "mime_empty"
    OVERSIZED = "mime_oversized"
    BROKEN = "mime_broken"
    NO_ATTACHMENT = "mime_no_attachment"
    TOO_MANY_ATTACHMENTS = "mime_too_many_attachments"


class DienstkennungStatus(StrEnum):
    VALID = "valid"  # three non-empty parts
    MISSING = "missing"  # no X-KIM-Dienstkennung header (or an empty one)
    MALFORMED = "malformed"  # present but not <Anwendung>;<Nachrichtentyp>;<Version>, or ambiguous


class Dienstkennung(BaseModel):
    """Parsed ``X-KIM-Dienstkennung: <Anwendung>;<Nachrichtentyp>;<Version>``."""

    model_config = ConfigDict(frozen=True)

    status: DienstkennungStatus
    raw: str | None = None
    anwendung: str | None = None
    nachrichtentyp: str | None = None
    version: str | None = None
    reason: str | None = None  # why malformed

    @property
    def value(self) -> str | None:
        """Normalised ``Anwendung;Nachrichtentyp;Version`` (None unless valid)."""
        if self.status is not DienstkennungStatus.VALID:
            return None
        return f"{self.anwendung};{self.nachrichtentyp};{self.version}"

    def __str__(self) -> str:
        return self.value or f"<{self.status.value}>"


_DK_PART = re.compile(r"^[^\s;]+(?: [^\s;]+)*$")


def parse_dienstkennung(value: str | list[str] | None) -> Dienstkennung:
    """Parse the value(s) of ``X-KIM-Dienstkennung``.

    Several headers with differing values are ``malformed`` (ambiguous); identical
    repeats are accepted.
    """
    if isinstance(value, list):
        distinct = sorted({v.strip() for v in value if v and v.strip()})
        if not distinct:
            return Dienstkennung(status=DienstkennungStatus.MISSING)
        if len(distinct) > 1:
            return Dienstkennung(
                status=DienstkennungStatus.MALFORMED,
                raw=" | ".join(distinct),
                reason=f"{len(distinct)} different X-KIM-Dienstkennung headers",
            )
        value = distinct[0]
    if value is None or not value.strip():
        return Dienstkennung(status=DienstkennungStatus.MISSING)
    raw = value.strip()
    parts = [p.strip() for p in raw.split(";")]
    if len(parts) == 4 and parts[3] == "":  # tolerate one trailing ';'
        parts = parts[:3]
    if len(parts) != 3:
        return Dienstkennung(
            status=DienstkennungStatus.MALFORMED, raw=raw, reason=f"expected 3 ';'-separated parts, got {len(parts)}"
        )
    names = ("Anwendung", "Nachrichtentyp", "Version")
    for name, part in zip(names, parts):
        if not part:
            return Dienstkennung(status=DienstkennungStatus.MALFORMED, raw=raw, reason=f"{name} is empty")
        if not _DK_PART.match(part) or not part.isprintable():
            return Dienstkennung(status=DienstkennungStatus.MALFORMED, raw=raw, reason=f"{name} has invalid characters")
    return Dienstkennung(
        status=DienstkennungStatus.VALID, raw=raw, anwendung=parts[0], nachrichtentyp=parts[1], version=parts[2]
    )


class Attachment(BaseModel):
    """One attachment of a mail (a leaf MIME part that is not the text body)."""

    filename: str | None
    content_type: str
    description: str | None = None  # Content-Description
    disposition: str | None = None  # attachment / inline / None
    transfer_encoding: str | None = None
    size: int
    data: bytes = Field(repr=False)
    part: str  # MIME part path, e.g. "1.2"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def is_kim_client_report(self) -> bool:
        return bool(self.filename and KIM_CLIENT_REPORT.match(self.filename))


class ParsedMail(BaseModel):
    """A KIM mail as the step workers see it. Header values are decoded (RFC 2047)."""

    message_id: str | None  # as in the header, e.g. "<abc@host>"
    from_addr: str | None
    to: list[str]
    cc: list[str] = Field(default_factory=list)
    reply_to: str | None
    in_reply_to: str | None
    subject: str | None
    date: datetime | None
    date_raw: str | None = None
    kim_headers: dict[str, str]  # all X-KIM-* headers (first value; canonical names as sent)
    dienstkennung: Dienstkennung
    attachments: list[Attachment]
    body_text: str | None = Field(default=None, repr=False)
    defects: list[str]  # tolerated defects "<part>:<DefectClass>"
    content_hash: str  # sha256 hex of the raw bytes
    size: int
    headers: list[tuple[str, str]] = Field(default_factory=list, repr=False)  # all, decoded, in order

    @property
    def message_id_bare(self) -> str | None:
        """Message-ID without angle brackets (as used in OperationOutcome identifiers)."""
        return bare_message_id(self.message_id)

    @property
    def reply_address(self) -> str | None:
        """Where answers go: ``Reply-To``, else ``From``."""
        return self.reply_to or self.from_addr

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for k, v in self.headers:
            if k.lower() == lname:
                return v
        return None

    def relevant_attachments(self, *, include_reports: bool = False) -> list[Attachment]:
        return [a for a in self.attachments if include_reports or not a.is_kim_client_report]

    def single_attachment(self, *, suffix: str | None = None, include_reports: bool = False) -> Attachment:
        """The one attachment a procedure requires (eAU: exactly one ``.p7s``).

        Signature-check reports added by KIM clients are ignored unless
        ``include_reports``. With ``suffix`` (e.g. ``".p7s"``) only attachments whose
        file name ends with it count. Raises ``mime_no_attachment`` /
        ``mime_too_many_attachments``.
        """
        cands = self.relevant_attachments(include_reports=include_reports)
        if suffix is not None:
            cands = [a for a in cands if (a.filename or "").lower().endswith(suffix.lower())]
        if not cands:
            what = f"'{suffix}' attachment" if suffix else "attachment"
            raise MimeError(MimeErrorCode.NO_ATTACHMENT, f"mail has no {what}", attachments=len(self.attachments))
        if len(cands) > 1:
            raise MimeError(
                MimeErrorCode.TOO_MANY_ATTACHMENTS,
                f"exactly one attachment required, mail has {len(cands)}",
                attachments=len(cands),
            )
        return cands[0]


def bare_message_id(mid: str | None) -> str | None:
    if not mid:
        return None
    mid = mid.strip()
    if mid.startswith("<") and mid.endswith(">"):
        mid = mid[1:-1].strip()
    return mid or None


def content_hash(raw: bytes) -> str:
    """sha256 hex of the raw mail (the duplicate key besides Message-ID)."""
    return hashlib.sha256(raw).hexdigest()


_FATAL_DEFECTS = {
    "NoBoundaryInMultipartDefect",
    "StartBoundaryNotFoundDefect",
    "MultipartInvariantViolationDefect",
}
_UNFOLD = re.compile(r"\r?\n(?=[ \t])")
_MSGID = re.compile(r"<[^<>\s]+>")


def _unsurrogate(s: str) -> str:
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except Exception:
        return s.encode("utf-8", "replace").decode("utf-8")


def _decode_header(raw: str) -> str:
    v = _unsurrogate(_UNFOLD.sub("", raw)).strip()
    if "=?" in v:
        try:
            v = str(make_header(decode_header(v)))
        except Exception:
            pass
    return v


def _header_items(part: Message) -> list[tuple[str, str]]:
    out = []
    for name, value in part.raw_items():
        out.append((str(name), _decode_header(str(value))))
    return out


def _first(items: list[tuple[str, str]], name: str) -> str | None:
    lname = name.lower()
    for k, v in items:
        if k.lower() == lname:
            return v
    return None


def _all(items: list[tuple[str, str]], name: str) -> list[str]:
    lname = name.lower()
    return [v for k, v in items if k.lower() == lname]


def _addresses(values: list[str]) -> list[str]:
    try:
        pairs = getaddresses(values)
    except Exception:
        return []
    return [addr.strip() for _, addr in pairs if addr and "@" in addr]


def _message_id(value: str | None) -> str | None:
    if not value:
        return None
    m = _MSGID.search(value)
    if m:
        return m.group(0)
    v = value.strip()
    return v or None


def _payload_bytes(part: Message) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    if isinstance(data, bytes):
        return data
    payload = part.get_payload()
    if isinstance(payload, str):
        return _unsurrogate(payload).encode("utf-8")
    return b""


def _text(part: Message, data: bytes) -> str:
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset, "replace")
    except LookupError:
        return data.decode("utf-8", "replace")


def parse_mail(raw: bytes, *, max_bytes: int | None = DEFAULT_MAX_MAIL_BYTES) -> ParsedMail:
    """Parse a raw KIM mail. Raises :class:`MimeError` (``mime_empty``, ``mime_oversized``,
    ``mime_broken``); never anything else."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise MimeError(MimeErrorCode.BROKEN, f"mail must be bytes, got {type(raw).__name__}")
    raw = bytes(raw)
    if not raw.strip():
        raise MimeError(MimeErrorCode.EMPTY, "mail is empty")
    if max_bytes is not None and len(raw) > max_bytes:
        raise MimeError(
            MimeErrorCode.OVERSIZED, f"mail has {len(raw)} bytes, limit is {max_bytes}", size=len(raw), limit=max_bytes
        )
    try:
        # compat32: the structure and the defects are the same as with policy.default, the
        # headers we need are decoded by hand (_header_items) - 3-4x faster than building
        # a structured header object for every Content-Type lookup
        msg = BytesParser(policy=policy.compat32).parsebytes(raw)
        return _extract(raw, msg)
    except MimeError:
        raise
    except RecursionError:
        raise MimeError(MimeErrorCode.BROKEN, "MIME structure nested too deeply") from None
    except Exception as exc:
        raise MimeError(MimeErrorCode.BROKEN, f"mail is not parseable MIME ({type(exc).__name__})") from None


def _extract(raw: bytes, msg: Message) -> ParsedMail:
    items = _header_items(msg)
    if not items:
        raise MimeError(MimeErrorCode.BROKEN, "mail has no header fields")

    defects: list[str] = []
    attachments: list[Attachment] = []
    bodies: list[str] = []

    def visit(part: Message, path: str, depth: int) -> None:
        if depth > 20:
            raise MimeError(MimeErrorCode.BROKEN, "MIME structure nested deeper than 20 levels")
        for d in getattr(part, "defects", []) or []:
            name = type(d).__name__
            if name in _FATAL_DEFECTS:
                raise MimeError(MimeErrorCode.BROKEN, f"MIME part {path}: {name}", part=path, defect=name)
        ctype = part.get_content_type()
        if part.is_multipart() and ctype != "message/rfc822":
            defects.extend(f"{path}:{type(d).__name__}" for d in part.defects)
            sub = part.get_payload()
            if not isinstance(sub, list):
                raise MimeError(MimeErrorCode.BROKEN, f"MIME part {path}: multipart without parts", part=path)
            for i, p in enumerate(sub, 1):
                visit(p, f"{path}.{i}" if path != "0" else str(i), depth + 1)
            return
        if ctype.startswith("multipart/"):
            raise MimeError(MimeErrorCode.BROKEN, f"MIME part {path}: multipart body has no parts", part=path)
        pitems = _header_items(part) if part is not msg else items
        disposition = part.get_content_disposition()
        try:
            filename = part.get_filename()
        except Exception:
            filename = None
        if filename is not None:
            filename = _decode_header(str(filename)) or None
        if ctype == "message/rfc822":
            try:
                inner = part.get_payload(0)
                data = inner.as_bytes() if isinstance(inner, Message) else _payload_bytes(part)
            except Exception:
                data = _payload_bytes(part)
        else:
            data = _payload_bytes(part)
        # decoding adds defects (e.g. invalid base64), so collect them afterwards
        defects.extend(f"{path}:{type(d).__name__}" for d in part.defects)
        is_body = (
            ctype in ("text/plain", "text/html") and filename is None and disposition != "attachment"
        )
        if is_body:
            bodies.append(_text(part, data))
            return
        attachments.append(
            Attachment(
                filename=filename,
                content_type=ctype,
                description=_first(pitems, "Content-Description"),
                disposition=disposition,
                transfer_encoding=(_first(pitems, "Content-Transfer-Encoding") or "").lower() or None,
                size=len(data),
                data=data,
                part=path,
            )
        )

    visit(msg, "0", 0)

    kim_headers: dict[str, str] = {}
    for k, v in items:
        if k.lower().startswith("x-kim-"):
            if k in kim_headers or any(x.lower() == k.lower() for x in kim_headers):
                defects.append(f"0:DuplicateHeader[{k}]")
                continue
            kim_headers[k] = v

    date_raw = _first(items, "Date")
    date = None
    if date_raw:
        try:
            date = parsedate_to_datetime(date_raw)
        except Exception:
            defects.append("0:InvalidDateHeader")

    from_addrs = _addresses(_all(items, "From"))
    reply_to = _addresses(_all(items, "Reply-To"))
    subject = _first(items, "Subject")
    return ParsedMail(
        message_id=_message_id(_first(items, "Message-ID")),
        from_addr=from_addrs[0] if from_addrs else None,
        to=_addresses(_all(items, "To")),
        cc=_addresses(_all(items, "Cc")),
        reply_to=reply_to[0] if reply_to else None,
        in_reply_to=_message_id(_first(items, "In-Reply-To")),
        subject=subject if subject else None,
        date=date,
        date_raw=date_raw,
        kim_headers=kim_headers,
        dienstkennung=parse_dienstkennung(_all(items, DIENSTKENNUNG_HEADER)),
        attachments=attachments,
        body_text="\n".join(bodies) if bodies else None,
        defects=defects,
        content_hash=content_hash(raw),
        size=len(raw),
        headers=items,
    )
