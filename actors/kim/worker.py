"""The step worker pool ``kim.worker``: stateless, keyed by mail id, ``hosts`` = pool size.

One async handler: run the ordered step (``actors.kim.steps.run_step``, which never
raises) with the host's ports and tell the result to the mail's slip. Nothing is stored;
a step that runs twice after a crash is idempotent (the step code's promise) and the
slip ignores a second, stale result.
"""

from __future__ import annotations

import time

from pydantic import BaseModel

from actors.runtime.entity import Entity, handles
from protocols.kim.messages import StepError, StepOrder, StepResult

KIND = "kim.worker"
SLIP_KIND = "kim.slip"


class WorkerState(BaseModel):
    pass


class WorkerAck(BaseModel):
    step: str
    outcome: str


class StepWorker(Entity[WorkerState]):
    kind = KIND
    State = WorkerState

    @handles(readonly=True)
    async def on_order(self, msg: StepOrder) -> WorkerAck:
        run_step = getattr(self.ctx.ports, "run_step", None)  # a stand-in pool (tests) brings its own
        if run_step is None:
            from actors.kim.steps import run_step

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
