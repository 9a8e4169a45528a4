"""Typed messages of the KIM mail statemachine (control information only).

Nothing here may carry personal data: no names, insurance numbers (KVNR), diagnoses,
subjects or mail bodies. Mail content lives in the encrypted blob store and is referred
to by blob references (claim check). ``mail_id`` is a pseudonym (HMAC over Message-ID and
content hash), never the Message-ID itself.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

SlipStatus = Literal["received", "running", "waiting_retry", "parked", "done", "rejected"]
TERMINAL: frozenset[str] = frozenset({"parked", "done", "rejected"})


class StepError(BaseModel):
    code: str  # stable, e.g. "cms_broken_signature", "core_unavailable"
    reason: str  # readable, no personal data
    retryable: bool = False


class StepOrder(BaseModel):
    """Stateshifter -> step worker: perform one step of one mail's road map."""

    mail_id: str
    step: str
    attempt: int = 1
    roadmap: str
    roadmap_version: int
    mailbox: str
    facts: dict[str, str] = Field(default_factory=dict)  # control facts gathered so far
    blobs: dict[str, str] = Field(default_factory=dict)  # name -> blob ref (encrypted)
    dispatched_at: float = 0.0
    #: run up to this many steps in one worker call ("fused" segment): after this step the
    #: worker goes on with the road map's next step as long as the step succeeded, the road
    #: map says "next" and the step had no external side effect (a segment ends after the
    #: first side-effecting step, so no two side effects happen without a durable
    #: transition between them). 1 = one step per dispatch.
    chain: int = 1
    since: float = 0.0  # when the slip was created: workers run the oldest mails' orders first


class StepResult(BaseModel):
    """Step worker -> stateshifter: what the step found. ``outcome`` picks the branch."""

    mail_id: str
    step: str
    attempt: int
    outcome: str = "ok"  # "ok" or a named branch of the road map (e.g. "duplicate")
    facts: dict[str, str] = Field(default_factory=dict)
    blobs: dict[str, str] = Field(default_factory=dict)
    error: StepError | None = None  # set -> retry (retryable) or the step's error branch
    duration_ms: float = 0.0
    started_at: float = 0.0  # wall clock (epoch s) when the worker started the step


class StepResults(BaseModel):
    """Step worker -> stateshifter: the results of a fused segment, in road-map order.

    The slip records every step on its own (history entry with its own timing, facts,
    blobs) in one durable transition; the last result decides what follows."""

    mail_id: str
    results: list[StepResult]
