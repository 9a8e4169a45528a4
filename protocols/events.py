"""Boundary events: what automat tells the world over Kafka (via the outbox)."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, Field


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Event(BaseModel):
    """One boundary event. ``id`` is unique: consumers dedupe by it (at-least-once)."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    topic: str  # logical topic without prefix, e.g. "kim.mail", "efa.record"
    type: str  # e.g. "mail.received", "mail.done"
    key: str  # partition key; pseudonymous, never personal data
    occurred_at: datetime = Field(default_factory=_now)
    data: dict[str, Any] = Field(default_factory=dict)  # control information only

    def payload(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_payload(cls, raw: bytes | str) -> "Event":
        return cls.model_validate_json(raw)
