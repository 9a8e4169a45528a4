"""The step worker pool ``kim.worker``: stateless, keyed by mail id, ``hosts`` = pool size.

One async handler: run the ordered step - or a fused segment of up to ``order.chain``
steps (``actors.kim.steps.run_chain``, which never raises) - with the host's ports, make
the blobs it wrote durable (one group commit shared by all orders the process is running,
``KimPorts.durable``) and tell the result(s) to the mail's slip. Nothing is stored;
a step that runs twice after a crash is idempotent (the step code's promise) and the
slip ignores a second, stale result.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time

from pydantic import BaseModel

from actors.runtime.entity import Entity, handles
from protocols.kim.messages import StepError, StepOrder, StepResult, StepResults

KIND = "kim.worker"
SLIP_KIND = "kim.slip"


class WorkerState(BaseModel):
    pass


class OldestFirst:
    """At most ``limit`` orders run at once in this process; waiting orders go in order of
    their mail's age (``StepOrder.since``), so a flood of new mails does not starve the
    later segments of mails already under way (first in, first done)."""

    def __init__(self, limit: int = 16) -> None:
        self.limit = limit
        self.running = 0
        self._heap: list = []
        self._seq = itertools.count()

    async def acquire(self, prio: float) -> None:
        if self.running < self.limit and not self._heap:
            self.running += 1
            return
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (prio, next(self._seq), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()
            raise

    def release(self) -> None:
        while self._heap:
            _, _, fut = heapq.heappop(self._heap)
            if not fut.done():
                fut.set_result(None)  # the slot passes on
                return
        self.running -= 1


_GATE: OldestFirst | None = None


def gate() -> OldestFirst:
    global _GATE
    if _GATE is None:
        _GATE = OldestFirst(limit=4)  # few at once: an order's wall time ~ limit x its CPU time
    return _GATE


class WorkerAck(BaseModel):
    step: str
    outcome: str


class StepWorker(Entity[WorkerState]):
    kind = KIND
    State = WorkerState
    talks_to = (SLIP_KIND,)

    @handles(readonly=True)
    async def on_order(self, msg: StepOrder) -> WorkerAck:
        run_step = getattr(self.ctx.ports, "run_step", None)  # a stand-in pool (tests) brings its own
        if run_step is None:
            return await self._run(msg)

        t0 = time.perf_counter()
        try:
            result = await run_step(msg, self.ctx.ports)
        except Exception as e:  # run_step promises not to raise; never lose the order anyway
            result = StepResult(mail_id=msg.mail_id, step=msg.step, attempt=msg.attempt, outcome="error",
                                error=StepError(code="step_crashed", reason=f"{type(e).__name__}", retryable=True))
        if not result.duration_ms:
            result.duration_ms = (time.perf_counter() - t0) * 1000.0
        self.ctx.tell(SLIP_KIND, msg.mail_id, result)
        return WorkerAck(step=msg.step, outcome=result.outcome)

    async def _run(self, msg: StepOrder) -> WorkerAck:
        """The real pool: a fused segment (``msg.chain`` steps at most), blobs made
        durable by the process-wide group commit before any result leaves."""
        from actors.kim.steps import run_chain

        ports = self.ctx.ports
        g = gate()
        await g.acquire(msg.since or msg.dispatched_at)
        try:
            results = await run_chain(msg, ports, sync=False)
            await ports.durable()
        except Exception as e:  # run_chain promises not to raise; a failed sync lands here
            results = [StepResult(mail_id=msg.mail_id, step=msg.step, attempt=msg.attempt, outcome="error",
                                  error=StepError(code="io_error" if isinstance(e, OSError) else "step_crashed",
                                                  reason=f"{type(e).__name__}", retryable=True))]
        finally:
            g.release()
        if msg.chain <= 1 and len(results) == 1:
            self.ctx.tell(SLIP_KIND, msg.mail_id, results[0])
        else:
            self.ctx.tell(SLIP_KIND, msg.mail_id, StepResults(mail_id=msg.mail_id, results=results))
        last = results[-1]
        return WorkerAck(step=last.step, outcome=last.outcome)
