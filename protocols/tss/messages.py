"""Messages of the practice sync entity ``tss.practice`` (pure pydantic)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from protocols.tss.sync import Cursor

MIN_POLL_INTERVAL_S = 300.0  # the Terminservice rule: never more often than every 5 minutes


class Configure(BaseModel):
    """Connect a practice (TVS) to a Terminservice; starts the initial sync once."""

    base_url: str  # e.g. http://127.0.0.1:8117/fhir
    client_id: str
    client_secret: str
    poll_interval_s: float = MIN_POLL_INTERVAL_S
    page_size: int = Field(50, ge=1, le=1000)

    @field_validator("poll_interval_s")
    @classmethod
    def _at_least_five_minutes(cls, v: float) -> float:
        if v < MIN_POLL_INTERVAL_S:
            raise ValueError(f"poll interval {v} s is below the Terminservice minimum of 300 s (5 minutes)")
        return v


class StartInitialSync(BaseModel):
    """Fetch everything again (first start, or after a long pause)."""


class PollNow(BaseModel):
    """Manual request for a continuous-sync poll; refused when it is too early."""


class PollDue(BaseModel):
    """The durable poll timer fired."""


class Step(BaseModel):
    """Internal: do the next page of the running sync (durable timer)."""

    seq: int


class ReadResource(BaseModel):
    """Fetch one resource's current state directly (allowed at any time)."""

    resource_type: str
    resource_id: str


class PublishSlot(BaseModel):
    """Report a free slot to the Terminservice."""

    schedule_id: str
    start: str
    end: str
    status: Literal["free", "busy", "busy-unavailable", "busy-tentative"] = "free"


class SetSlotStatus(BaseModel):
    slot_id: str
    status: Literal["free", "busy", "busy-unavailable", "busy-tentative", "entered-in-error"]


class CreateResource(BaseModel):
    """Create a Terminprofil (Schedule), Slot or Appointment (FHIR JSON shape)."""

    resource: dict[str, Any]


class ReplaceResource(BaseModel):
    """Any change other than a slot's status: delete the old resource, create the new one."""

    resource_type: str
    resource_id: str
    resource: dict[str, Any]


class DeleteResource(BaseModel):
    resource_type: str
    resource_id: str


class GetStatus(BaseModel):
    pass


class GetStore(BaseModel):
    pass


# -------------------------------------------------------------------------- replies


class PollAccepted(BaseModel):
    runs_at: float


class PollRefused(BaseModel):
    """Too early: the Terminservice allows one poll per interval."""

    reason: str
    not_before: float  # entity clock (epoch seconds)
    retry_in_s: float


class ResourceReply(BaseModel):
    ok: bool
    resource: dict[str, Any] | None = None
    error: str = ""
    code: str = ""


class SyncStatus(BaseModel):
    practice: str
    phase: str
    cursor: Cursor
    last_sync_at: float | None
    last_poll_at: float | None
    next_poll_at: float | None
    lag_s: float | None
    poll_interval_s: float
    applied: int
    resources: dict[str, int]
    last_error: str
    error_code: str
    errors: int
    initial_done: bool


class StoreSnapshot(BaseModel):
    resources: dict[str, dict[str, Any]]
    cursor: Cursor
    applied_ids: list[str]
