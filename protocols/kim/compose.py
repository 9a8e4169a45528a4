"""Compose outgoing KIM mails (answers, generated test mails) as raw RFC 5322 bytes.

Hand-rolled (CRLF, base64 attachments at 76 columns) rather than ``email.message`` for
speed: the load generator builds thousands of mails per second with it. Read receipts
are never requested: MDN headers (``Disposition-Notification-To`` etc.) are refused.
"""

from __future__ import annotations

import binascii
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from email.header import Header
from email.utils import format_datetime

from pydantic import BaseModel, Field

#: Value of ``X-KIM-Sendersystem`` on mails automat sends (``<Produkt>;<Version>``).
SENDERSYSTEM = "automat;0.1.0"

#: Headers that would ask for a read receipt (MDN). KIM answers of the insurer never do.
MDN_HEADERS = frozenset(
    {"disposition-notification-to", "disposition-notification-options", "return-receipt-to", "x-confirm-reading-to"}
)


class OutgoingMail(BaseModel):
    """A composed mail, ready for SMTP. ``raw`` may contain personal data (payload)."""

    raw: bytes = Field(repr=False)
    message_id: str  # with angle brackets
    sender: str
    recipients: list[str]
    subject: str
    dienstkennung: str | None = None
    in_reply_to: str | None = None
    attachment_name: str | None = None


@dataclass(frozen=True)
class OutAttachment:
    filename: str
    data: bytes
    content_type: str = "application/octet-stream"
    description: str | None = None


def new_message_id(domain: str, token: str | None = None) -> str:
    """``<token@domain>``; ``token`` defaults to a random UUID."""
    return f"<{token or uuid.uuid4().hex}@{domain}>"


def domain_of(address: str) -> str:
    return address.rsplit("@", 1)[-1] if "@" in address else "localhost"


def mail_date(when: datetime | None = None) -> str:
    when = when or datetime.now(timezone.utc)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return format_datetime(when)


def _header(name: str, value: str) -> bytes:
    if any(c in value for c in "\r\n"):
        raise ValueError(f"header {name} contains a line break")
    if not value.isascii():
        value = Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
    return f"{name}: {value}\r\n".encode("ascii")


def _b64(data: bytes) -> bytes:
    """base64 in 76-column lines, CRLF-terminated (RFC 2045)."""
    enc = binascii.b2a_base64(data, newline=False)
    return b"\r\n".join([enc[i : i + 76] for i in range(0, len(enc), 76)]) + b"\r\n"


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def compose(
    headers: list[tuple[str, str]],
    *,
    text: str | None = None,
    attachments: list[OutAttachment] | tuple[OutAttachment, ...] = (),
    boundary: str | None = None,
    multipart: bool | None = None,
) -> bytes:
    """Build a raw mail: ``headers`` (in order) + ``multipart/mixed`` with an optional
    UTF-8 text part and base64 attachments (or a single text/plain body if there are no
    attachments; ``multipart=True`` forces multipart/mixed anyway). ``MIME-Version`` and
    ``Content-Type`` are added here."""
    out = bytearray()
    for name, value in headers:
        if name.lower() in MDN_HEADERS:
            raise ValueError(f"{name}: KIM answers never request a read receipt")
        out += _header(name, value)
    out += b"MIME-Version: 1.0\r\n"
    if not attachments and not multipart:
        body = (text or "").replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")
        if body.isascii():
            out += b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n" + body
        else:
            out += b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n" + _b64(body)
        return bytes(out)
    b = boundary or ("----=_Part_" + uuid.uuid4().hex)
    out += f'Content-Type: multipart/mixed;\r\n\tboundary="{b}"\r\n\r\n'.encode("ascii")
    out += b"This is a multi-part message in MIME format.\r\n"
    bb = f"\r\n--{b}\r\n".encode("ascii")
    if text is not None:
        body = text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")
        out += bb
        if body.isascii():
            out += b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n" + body
        else:
            out += b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n" + _b64(body)
    for a in attachments:
        out += bb
        fn = _quote(a.filename)
        out += f"Content-Type: {a.content_type}; name={fn}\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename={fn}\r\n".encode(
            "ascii"
        )
        if a.description:
            out += _header("Content-Description", a.description)
        out += b"\r\n" + _b64(a.data)
    out += f"\r\n--{b}--\r\n".encode("ascii")
    return bytes(out)
