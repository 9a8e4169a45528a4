"""Outgoing KIM mails (error answers, eEB answers) over SMTP, idempotent per (mail_id, kind).

:class:`SmtpMailSender` sends to ``cfg.smtp.host:port`` (the local stack's aiosmtpd sink,
or the KIM client module's SMTP interface in production) with retries (exponential
backoff). A Redis marker ``kim:smtp:sent:<mail_id>:<kind>`` is set (SET NX) **only after
the server accepted the mail**; a step that runs again first checks the marker and does
not send twice.

At-least-once edge: if the process dies after the server accepted the mail but before
the marker is written, a re-run sends the mail once more. Answers are built with a
deterministic Message-ID per (mail_id, kind), so the receiving KIM client sees the same
Message-ID twice and can drop the copy. A true exactly-once would need the SMTP server
to deduplicate by Message-ID.

:class:`MemoryMailSender` is the in-process stand-in for unit tests and the inline floor.
"""

from __future__ import annotations

import asyncio
import smtplib
from typing import Protocol

from pydantic import BaseModel

from protocols.kim.compose import OutgoingMail

MARKER_PREFIX = "kim:smtp:sent:"


class SmtpSendError(Exception):
    """Sending failed after the retries (transient: the step is retried later)."""

    code = "smtp_unavailable"


class SendReceipt(BaseModel):
    sent: bool  # True: sent now; False: an earlier run had sent it already
    message_id: str
    recipients: list[str]


class MailSender(Protocol):
    async def send(self, mail: OutgoingMail, *, mail_id: str, kind: str) -> SendReceipt: ...

    async def was_sent(self, mail_id: str, kind: str) -> bool: ...


class SmtpMailSender:
    def __init__(self, host: str, port: int, redis, *, attempts: int = 3, backoff_s: float = 0.2, timeout_s: float = 10.0,
                 marker_ttl_s: int = 30 * 86400):
        self.host = host
        self.port = port
        self.redis = redis
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.marker_ttl_s = marker_ttl_s

    @classmethod
    def for_config(cls, cfg, redis) -> "SmtpMailSender":
        return cls(cfg.smtp.host, cfg.smtp.port, redis)

    @staticmethod
    def marker(mail_id: str, kind: str) -> str:
        return f"{MARKER_PREFIX}{mail_id}:{kind}"

    async def was_sent(self, mail_id: str, kind: str) -> bool:
        return bool(await self.redis.exists(self.marker(mail_id, kind)))

    def _send_sync(self, mail: OutgoingMail) -> None:
        with smtplib.SMTP(self.host, self.port, timeout=self.timeout_s) as s:
            s.sendmail(mail.sender, mail.recipients, mail.raw)

    async def send(self, mail: OutgoingMail, *, mail_id: str, kind: str) -> SendReceipt:
        if await self.was_sent(mail_id, kind):
            return SendReceipt(sent=False, message_id=mail.message_id, recipients=mail.recipients)
        last: Exception | None = None
        for i in range(self.attempts):
            try:
                await asyncio.to_thread(self._send_sync, mail)
                break
            except (smtplib.SMTPException, OSError) as exc:
                last = exc
                if isinstance(exc, smtplib.SMTPResponseException) and 500 <= exc.smtp_code < 600:
                    raise SmtpSendError(f"SMTP server refused the mail permanently ({exc.smtp_code})") from None
                await asyncio.sleep(self.backoff_s * (2**i))
        else:
            raise SmtpSendError(f"SMTP send failed after {self.attempts} attempts ({type(last).__name__})")
        await self.redis.set(self.marker(mail_id, kind), mail.message_id, nx=True, ex=self.marker_ttl_s)
        return SendReceipt(sent=True, message_id=mail.message_id, recipients=mail.recipients)


class MemoryMailSender:
    """Keeps sent mails in a list (unit tests, inline floor); same idempotency rule."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, OutgoingMail]] = []
        self._markers: set[tuple[str, str]] = set()
        self.fail_next = 0  # inject transient failures

    async def was_sent(self, mail_id: str, kind: str) -> bool:
        return (mail_id, kind) in self._markers

    async def send(self, mail: OutgoingMail, *, mail_id: str, kind: str) -> SendReceipt:
        if (mail_id, kind) in self._markers:
            return SendReceipt(sent=False, message_id=mail.message_id, recipients=mail.recipients)
        if self.fail_next > 0:
            self.fail_next -= 1
            raise SmtpSendError("SMTP unavailable (injected)")
        self.sent.append((mail_id, kind, mail))
        self._markers.add((mail_id, kind))
        return SendReceipt(sent=True, message_id=mail.message_id, recipients=mail.recipients)
