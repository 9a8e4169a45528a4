"""The routing slip (Laufzettel) entity ``kim.slip`` — the stateshifter.

One entity per mail, keyed by ``mail_id`` (a pseudonym), sharded over the slip hosts. Its
state is control information only: mailbox, procedure, road map name + version, current
step and attempt, status, step history with timings, outcome, error code, the control
facts the steps reported and blob references (claim checks). Never personal data.

Every transition is one durable commit (state + outbox events + timers); the next
``StepOrder`` is told to the worker pool by the runtime only after that commit. Two
durable timers keep a slip moving after any crash:

- ``retry``    (``RetryDue``) — a retryable step error waits with exponential backoff
  plus deterministic jitter, then the step is dispatched again;
- ``watchdog`` (``StepTimeout``) — armed with every dispatch; if no result arrives in
  ``kim.step_timeout_s`` (an order lost with a crashed host) the step counts as a
  retryable failure and is dispatched again. Steps are idempotent, so a second run is
  harmless; a late result of the earlier attempt is stale and ignored.

Road map markers: ``@done`` (status done), ``@workbasket`` (status done, outcome
``workbasket``: handed to the clerk queue), ``@rejected`` and ``@parked``.
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from actors.runtime import metrics
from actors.runtime.entity import Entity, handles
from protocols.events import Event
from protocols.kim.messages import TERMINAL, StepError, StepOrder, StepResult, StepResults

log = logging.getLogger("automat.kim.slip")

KIND = "kim.slip"
WORKER_KIND = "kim.worker"
TOPIC = "kim.mail"
ROADMAP_DIR = Path(__file__).resolve().parent / "roadmaps"

MAILS = metrics.counter("kim_mails", "KIM mails by procedure and outcome (terminal transitions)",
                        ("procedure", "outcome"))
RECEIVED = metrics.counter("kim_mails_received", "KIM mails received (slips created), by mailbox", ("mailbox",))
STEP_SECONDS = metrics.histogram(
    "kim_step_seconds", "KIM step latency (dispatch to result), by step",
    (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), ("step",))
STEP_RESULTS = metrics.counter("kim_step_results", "KIM step results by step and result", ("step", "result"))
PARKED = metrics.counter("kim_parked", "KIM slips parked (dead letter), by step and error code", ("step", "code"))


# ----------------------------------------------------------------------------- messages
class Receive(BaseModel):
    """Mailbox -> slip: a mail was stored (claim check); create its slip."""

    mail_id: str
    mailbox: str
    blob: str  # blob ref of the encrypted raw mail
    size: int = 0
    uid: int = 0  # IMAP UID at receipt (control information)
    procedure: str | None = None  # if the mailbox already knows (normally a step finds out)
    received_at: float = 0.0


class ReceiveReply(BaseModel):
    mail_id: str
    created: bool  # False: already owned by an existing slip (re-fetch after a crash)
    blob: str = ""  # the raw-mail blob the slip holds (a retried Receive gets its own ref back)
    status: str


class StepAck(BaseModel):
    accepted: bool
    reason: str = ""


class RetryDue(BaseModel):
    step: str
    attempt: int  # the attempt to dispatch now


class StepTimeout(BaseModel):
    step: str
    attempt: int


class Redrive(BaseModel):
    """Operator: resume a parked slip at the step that failed (fresh attempts)."""

    reason: str = "operator"


class RedriveReply(BaseModel):
    ok: bool
    status: str
    step: str | None = None
    reason: str = ""


class GetSlip(BaseModel):
    pass


class StepRun(BaseModel):
    step: str
    attempt: int
    started: float
    ended: float | None = None
    result: str | None = None  # outcome, "retry", "timeout", "error:<code>"
    error: str | None = None
    worker_ms: float = 0.0


class SlipState(BaseModel):
    mail_id: str = ""
    mailbox: str = ""
    procedure: str | None = None
    roadmap: str = ""
    roadmap_version: int = 0
    step: str | None = None
    attempt: int = 0
    status: str = "new"  # before Receive; then received/running/waiting_retry/parked/done/rejected
    created_at: float = 0.0
    updated_at: float = 0.0
    finished_at: float | None = None
    size: int = 0
    history: list[StepRun] = Field(default_factory=list)
    facts: dict[str, str] = Field(default_factory=dict)
    blobs: dict[str, str] = Field(default_factory=dict)
    outcome: str | None = None
    error_code: str | None = None
    reason: str | None = None
    redrives: int = 0
    steps_run: int = 0


# ----------------------------------------------------------------------------- road maps
class RoadMaps:
    """The road maps (``protocols.kim.roadmap``), every version, loaded once per host."""

    def __init__(self, directory: str | Path = ROADMAP_DIR) -> None:
        from protocols.kim import roadmap as rm_mod

        self._mod = rm_mod
        self._by = rm_mod.load_roadmap_versions(directory)
        self._latest = rm_mod.load_roadmaps(directory)

    def select(self, procedure: str | None):
        return self._latest[self._mod.select_roadmap(procedure or "eMailPLUS")]

    def get(self, name: str, version: int):
        m = self._by.get((name, int(version)))
        return m if m is not None else self._latest[name]  # version no longer shipped: newest


class SlipPorts:
    """What a slip host injects: the road maps and the KIM configuration."""

    def __init__(self, cfg, roadmaps: RoadMaps | None = None) -> None:
        self.kim = cfg.kim
        self.roadmaps = roadmaps or RoadMaps()


def make_slip_ports(cfg) -> SlipPorts:
    return SlipPorts(cfg)


def decision_rng(mail_id: str, step: str, attempt: int) -> random.Random:
    """Deterministic jitter source: a replayed round computes the same backoff."""
    return random.Random(hashlib.sha256(f"{mail_id}/{step}/{attempt}".encode()).digest())


class LazyDecisionRng:
    """``decision_rng``, seeded only when a decision draws from it (a retry's jitter):
    seeding a ``Random`` from a digest for each of a mail's ~35 step results was 3 % of
    a slip host's samples, and only retries use it."""

    __slots__ = ("_args", "_rng")

    def __init__(self, mail_id: str, step: str, attempt: int) -> None:
        self._args, self._rng = (mail_id, step, attempt), None

    def random(self) -> float:
        if self._rng is None:
            self._rng = decision_rng(*self._args)
        return self._rng.random()


# ----------------------------------------------------------------------------- the entity
class RoutingSlip(Entity[SlipState]):
    kind = KIND
    State = SlipState
    personal_data = False  # control information only (checked by the leak scan tests)
    talks_to = (WORKER_KIND,)

    # -- helpers ------------------------------------------------------------------------
    @property
    def _rms(self) -> RoadMaps:
        return self.ctx.ports.roadmaps

    def _map(self):
        return self._rms.get(self.state.roadmap, self.state.roadmap_version)

    def _event(self, type_: str, **data: Any) -> None:
        s = self.state
        base = {"mailbox": s.mailbox, "procedure": s.procedure, "roadmap": s.roadmap,
                "roadmap_version": s.roadmap_version, "status": s.status}
        base.update(data)
        self.ctx.emit(Event(topic=TOPIC, type=type_, key=self.key, data=base))

    def _dispatch(self, step: str, attempt: int, *, send: bool = True) -> None:
        """Make ``step`` the current one; ``send``: order it from the worker pool (a step
        of a fused segment whose result is already here is only recorded)."""
        s = self.state
        now = self.ctx.now()
        s.step, s.attempt, s.status = step, attempt, "running"
        s.updated_at = now
        s.steps_run += 1
        s.history.append(StepRun(step=step, attempt=attempt, started=now))
        if send:
            self._send_order()

    def _send_order(self) -> None:
        s = self.state
        kim = self.ctx.ports.kim
        self.ctx.tell(WORKER_KIND, self.key, StepOrder(
            mail_id=self.key, step=s.step, attempt=s.attempt, roadmap=s.roadmap, roadmap_version=s.roadmap_version,
            mailbox=s.mailbox, facts=dict(s.facts), blobs=dict(s.blobs), dispatched_at=s.updated_at,
            chain=getattr(kim, "fuse_max", 1), since=s.created_at))
        self.ctx.cancel_timer("retry")
        chain = max(1, int(getattr(kim, "fuse_max", 1)))
        n = segment_length(self._map(), s.step, chain) if chain > 1 else 1
        # the watchdog budget grows with the work dispatched: step_timeout_s per 4 fused steps
        self.ctx.set_timer("watchdog", StepTimeout(step=s.step, attempt=s.attempt),
                           delay_s=kim.step_timeout_s * max(1.0, n / 4.0))

    def _close_run(self, result: str, error: str | None = None, worker_ms: float = 0.0,
                   ended: float | None = None) -> None:
        s = self.state
        now = ended if ended is not None else self.ctx.now()
        for run in reversed(s.history):
            if run.step == s.step and run.attempt == s.attempt and run.ended is None:
                run.ended, run.result, run.error, run.worker_ms = now, result, error, worker_ms
                STEP_SECONDS.observe(max(0.0, now - run.started), step=run.step)
                break
        STEP_RESULTS.inc(step=s.step or "", result=result)

    def _finish(self, status: str, outcome: str, *, code: str | None = None, reason: str | None = None) -> None:
        s = self.state
        s.status, s.outcome = status, outcome
        s.error_code = code if code is not None else s.error_code
        s.reason = reason if reason is not None else s.reason
        s.finished_at = s.updated_at = self.ctx.now()
        self.ctx.cancel_timer("watchdog")
        self.ctx.cancel_timer("retry")
        MAILS.inc(procedure=s.procedure or "", outcome=outcome)
        if status == "parked":
            PARKED.inc(step=s.step or "", code=s.error_code or "")
        ev = {"done": "mail.done", "rejected": "mail.rejected", "parked": "mail.parked"}[status]
        self._event(ev, outcome=outcome, step=s.step, error_code=s.error_code, reason=s.reason,
                    steps=s.steps_run, seconds=round(s.finished_at - s.created_at, 3),
                    **({"facts": dict(s.facts)} if status == "done" else {}))

    def _park(self, code: str, reason: str) -> None:
        self._finish("parked", "parked", code=code, reason=reason)

    def _apply(self, result: StepResult, *, send: bool = True) -> None:
        """Ask the road map what follows ``result`` and make it so."""
        s = self.state
        rm = self._map()
        self.ctx.cancel_timer("watchdog")
        try:
            d = rm.decide(result, rng=LazyDecisionRng(self.key, result.step, result.attempt))
        except KeyError as e:  # the slip's step is not in its road map (edited map, same version)
            self._park("roadmap_mismatch", str(e)[:300])
            return
        s.facts.update(d.facts)
        err = result.error
        if d.action == "retry":
            s.status = "waiting_retry"
            s.error_code, s.reason = (err.code, err.reason[:300]) if err else (None, d.reason)
            self.ctx.set_timer("retry", RetryDue(step=d.next_step, attempt=d.attempt), delay_s=d.delay_s)
            self._event("mail.step_retry", step=result.step, attempt=result.attempt,
                        error_code=s.error_code, retry_in_s=round(d.delay_s, 3))
        elif d.action == "next":
            if err is not None:
                s.error_code, s.reason = err.code, err.reason[:300]
            self._dispatch(d.next_step, d.attempt, send=send)
        else:
            code = d.facts.get("error_code") or (err.code if err else None)
            reason = d.reason[:300]
            if code is None and s.facts.get("error_code"):  # the error that routed here, not a later retry's
                code, reason = s.facts["error_code"], str(s.facts.get("error_reason") or reason)[:300]
            if d.terminal == "@workbasket":
                self._finish("done", "workbasket", code=code, reason=reason)
            elif d.status == "done":
                s.error_code = s.reason = None  # earlier retried errors stay in the history
                self._finish("done", "done")
            elif d.status == "rejected":
                self._finish("rejected", "rejected", code=code or s.error_code or "rejected",
                             reason=s.reason if (not code and s.error_code) else reason)
            else:
                self._park(code or s.error_code or "parked", reason)

    def at_rest(self) -> bool:
        """A finished mail (done, rejected, parked): its slip is only read again (status,
        redrive of a parked mail) - from the store."""
        return is_terminal(self.state.status)

    # -- handlers -----------------------------------------------------------------------
    @handles
    def on_receive(self, msg: Receive) -> ReceiveReply:
        s = self.state
        if s.status != "new":
            return ReceiveReply(mail_id=self.key, created=False, status=s.status, blob=s.blobs.get("raw", ""))
        now = self.ctx.now()
        s.mail_id, s.mailbox, s.size = self.key, msg.mailbox, msg.size
        s.created_at = s.updated_at = now
        s.blobs["raw"] = msg.blob
        s.procedure = msg.procedure
        s.status = "received"
        RECEIVED.inc(mailbox=msg.mailbox)
        rm = self._rms.select(msg.procedure)
        s.roadmap, s.roadmap_version = rm.name, int(rm.version)
        self._event("mail.received", size=msg.size, uid=msg.uid, received_at=msg.received_at or now)
        self._dispatch(rm.first, 1)
        return ReceiveReply(mail_id=self.key, created=True, status=s.status)

    def _take(self, msg: StepResult, ended: float | None = None) -> None:
        """Record one step result (facts, blobs, history entry with its timing)."""
        s = self.state
        s.facts.update(msg.facts)
        s.blobs.update(msg.blobs)
        if msg.facts.get("procedure") and msg.facts["procedure"] != s.procedure:
            s.procedure = msg.facts["procedure"]
        s.updated_at = self.ctx.now()
        err = msg.error
        res = ("retry" if err.retryable else f"error:{err.code}") if err else (msg.outcome or "ok")
        self._close_run(res, f"{err.code}: {err.reason[:200]}" if err else None, msg.duration_ms, ended)

    def _is_current(self, msg: StepResult) -> bool:
        s = self.state
        return s.status == "running" and msg.step == s.step and msg.attempt == s.attempt

    @handles
    def on_result(self, msg: StepResult) -> StepAck:
        s = self.state
        if not self._is_current(msg):
            return StepAck(accepted=False, reason=f"stale result {msg.step}#{msg.attempt}; slip is {s.status} "
                                                  f"at {s.step}#{s.attempt}")
        self._take(msg)
        self._apply(msg)
        return StepAck(accepted=True)

    @handles
    def on_results(self, msg: StepResults) -> StepAck:
        """A fused segment: every step recorded on its own, one durable transition."""
        s = self.state
        rs = msg.results
        if not rs or not self._is_current(rs[0]):
            first = f"{rs[0].step}#{rs[0].attempt}" if rs else "(empty)"
            return StepAck(accepted=False, reason=f"stale results from {first}; slip is {s.status} "
                                                  f"at {s.step}#{s.attempt}")
        for i, r in enumerate(rs):
            nxt = rs[i + 1] if i + 1 < len(rs) else None
            if nxt is None:
                self._take(r)
                self._apply(r)
                break
            self._take(r, ended=nxt.started_at or None)
            self._apply(r, send=False)
            if not self._is_current(nxt):  # the road map went elsewhere (a newer map?): follow it
                if s.status == "running":
                    self._send_order()
                break
            if nxt.started_at:
                s.history[-1].started = nxt.started_at
        return StepAck(accepted=True)

    @handles
    def on_retry_due(self, msg: RetryDue) -> StepAck:
        s = self.state
        if s.status != "waiting_retry" or msg.step != s.step or msg.attempt != s.attempt + 1:
            return StepAck(accepted=False, reason="stale retry timer")
        self._dispatch(msg.step, msg.attempt)
        return StepAck(accepted=True)

    @handles
    def on_timeout(self, msg: StepTimeout) -> StepAck:
        s = self.state
        if s.status != "running" or msg.step != s.step or msg.attempt != s.attempt:
            return StepAck(accepted=False, reason="stale watchdog")
        self._close_run("timeout", "no result in time")
        self._apply(StepResult(mail_id=self.key, step=s.step, attempt=s.attempt, outcome="error",
                               error=StepError(code="step_timeout", retryable=True,
                                               reason=f"no result from the worker pool in "
                                                      f"{self.ctx.ports.kim.step_timeout_s:g} s")))
        return StepAck(accepted=True)

    @handles
    def on_redrive(self, msg: Redrive) -> RedriveReply:
        s = self.state
        if s.status != "parked":
            return RedriveReply(ok=False, status=s.status, step=s.step, reason=f"slip is {s.status}, not parked")
        step = s.step or self._map().first
        s.redrives += 1
        s.outcome = s.finished_at = None
        self._event("mail.redriven", step=step, reason=msg.reason, redrives=s.redrives)
        self._dispatch(step, 1)
        return RedriveReply(ok=True, status=s.status, step=step)

    @handles(readonly=True)
    def on_get(self, msg: GetSlip) -> SlipState:
        return self.state


_SEGMENTS: dict[tuple[str, int, str, int], int] = {}


def segment_length(rm, step: str | None, chain: int) -> int:
    """How many steps a worker runs for an order of ``step`` if all succeed: the road map's
    "ok" path until (and including) the first step that ends a segment, at most ``chain``."""
    key = (rm.name, int(rm.version), step or "", chain)
    n = _SEGMENTS.get(key)
    if n is None:
        from actors.kim.steps._base import ENDS_SEGMENT

        n, cur = 0, step
        try:
            while cur and not cur.startswith("@") and n < chain:
                n += 1
                if rm.step(cur).impl in ENDS_SEGMENT:
                    break
                cur = rm.ok_target(cur)
        except KeyError:
            n = max(1, n)
        n = _SEGMENTS[key] = max(1, n)
    return n


def is_terminal(status: str) -> bool:
    return status in TERMINAL
