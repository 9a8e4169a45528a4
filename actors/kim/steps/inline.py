"""Run one mail through its whole road map in-process (tests, the benchmark's inline floor).

The same transitions as the stateshifter (``RoadMap.decide``), without durability:
retryable errors are retried at once (no backoff sleep) up to the step's attempt limit.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from actors.kim.steps import CACHE, roadmap_for, run_step
from protocols.kim.messages import StepOrder, StepResult
from protocols.kim.roadmap import peek_procedure, select_roadmap


@dataclass
class InlineRun:
    mail_id: str
    roadmap: str
    version: int
    terminal: str = ""
    status: str = ""
    facts: dict[str, str] = field(default_factory=dict)
    blobs: dict[str, str] = field(default_factory=dict)
    trail: list[tuple[str, str, str | None]] = field(default_factory=list)  # (step, outcome, error code)
    results: list[StepResult] = field(default_factory=list)

    @property
    def steps(self) -> list[str]:
        return [s for s, _, _ in self.trail]


async def run_mail_inline(
    raw: bytes, ports, *, mailbox: str = "", mail_id: str | None = None, roadmap: str | None = None,
    version: int | None = None, raw_ref: str | None = None, max_steps: int = 500,
) -> InlineRun:
    rm = roadmap_for(roadmap or select_roadmap(peek_procedure(raw)), version)
    mail_id = mail_id or uuid.uuid4().hex
    ref = raw_ref or ports.blobs.put(raw, kind="mail")
    run = InlineRun(mail_id=mail_id, roadmap=rm.name, version=rm.version, blobs={"raw": ref})
    step, attempt = rm.first, 1
    for _ in range(max_steps):
        order = StepOrder(
            mail_id=mail_id, step=step, attempt=attempt, roadmap=rm.name, roadmap_version=rm.version,
            mailbox=mailbox, facts=dict(run.facts), blobs=dict(run.blobs),
        )
        res = await run_step(order, ports)
        run.results.append(res)
        run.trail.append((step, res.outcome, res.error.code if res.error else None))
        run.facts.update(res.facts)
        run.blobs.update(res.blobs)
        d = rm.decide(res)
        run.facts.update(d.facts)
        if d.action == "terminal":
            run.terminal, run.status = d.terminal or "", d.status or ""
            CACHE.forget(run.blobs.values())  # as a worker does at a mail's end (run_chain)
            return run
        step, attempt = d.next_step or step, d.attempt
    raise RuntimeError(f"mail {mail_id}: no terminal after {max_steps} steps")
