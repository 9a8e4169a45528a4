"""KIM bugs the chaos runs found, each pinned by name (deploy/chaos, `automat chaos`)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from actors.kim.slip import Receive, RetryDue, RoutingSlip, SlipPorts, SlipState
from actors.kim.steps import run_chain
from actors.runtime.entity import Effects, EntityContext
from protocols.kim.generator import Fault
from protocols.kim.messages import StepError, StepResult, StepResults


def _slip() -> RoutingSlip:
    kim = SimpleNamespace(fuse_max=64, step_timeout_s=60.0)
    ctx = EntityContext("kim.slip", "m1", SlipPorts(SimpleNamespace(kim=kim)), time.time, None)
    return RoutingSlip("m1", SlipState(), ctx)


async def test_rejection_keeps_its_reason_when_the_answer_step_was_retried(ports, gen):
    """Chaos run (Redis restarted while an error answer was sent): the slip of a non-FHIR
    eAU ended ``rejected`` with error code ``redis_unavailable`` (the transient error of
    the retried answer step) instead of ``payload_not_fhir`` - the operator saw the wrong
    reason. The error that routed the mail to its rejection is what the slip reports."""
    mail = gen.eau(Fault.NON_FHIR_PAYLOAD)
    slip = _slip()
    slip.ctx._effects = Effects()
    slip.on_receive(Receive(mail_id="m1", mailbox="b", blob=ports.blobs.put(mail.raw, kind="mail"),
                            procedure="eAU_Lieferung"))
    failed_once = False
    for _ in range(100):
        if slip.state.status in ("done", "rejected", "parked"):
            break
        tells = [m for _, _, m in slip.ctx._effects.tells]
        slip.ctx._effects = Effects()
        if slip.state.status == "waiting_retry":
            slip.on_retry_due(RetryDue(step=slip.state.step, attempt=slip.state.attempt + 1))
            continue
        (order,) = tells
        if order.step == "answer_error" and not failed_once:
            failed_once = True  # Redis went away while the answer was being sent
            res = [StepResult(mail_id="m1", step=order.step, attempt=order.attempt, outcome="error",
                              error=StepError(code="redis_unavailable", reason="ConnectionError", retryable=True))]
        else:
            res = await run_chain(order, ports)
        assert slip.on_results(StepResults(mail_id="m1", results=res)).accepted
    s = slip.state
    assert failed_once and s.status == "rejected"
    assert s.error_code == "payload_not_fhir", (s.error_code, s.reason)
    assert "FHIR" in (s.reason or ""), s.reason
    assert any(h.result == "retry" for h in s.history)  # the transient error stays in the history
