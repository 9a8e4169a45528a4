"""Messages the entity runtime itself answers with (pure, no Ray)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

FailureCode = Literal[
    "unknown_message",  # the entity kind has no handler for this message type
    "handler_failed",  # the handler raised on every attempt; the message is dead-lettered
    "unknown_kind",  # no entity kind of that name is registered
    "unavailable",  # the shard host could not be reached in time
    "timeout",  # no reply within the ask timeout
    "conflict",  # the stored version moved under us too often (two owners)
    "moved",  # the shard is no longer on this host (handover): re-read the shard map, re-send
]


class Failure(BaseModel):
    """A message could not be handled. Recorded (dead letter) and answered, never dropped."""

    code: FailureCode
    reason: str
    kind: str
    key: str
    message_type: str


class Ack(BaseModel):
    """Default reply of a handler that returns nothing."""

    ok: bool = True


class DeadLetter(BaseModel):
    """What an operator sees for a message that could not be handled."""

    stream_id: str
    kind: str
    key: str
    message_type: str
    reason: str
    at: float
