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


class _Client:
    """Just what ``MailboxFetcher._handle_chunk`` uses of an IMAPClient."""

    def __init__(self, mails: dict[int, bytes]):
        self.mails = mails
        self.moved: list[int] = []

    def fetch(self, uids, what):
        return {u: {b"BODY[]": self.mails[u]} for u in uids if u in self.mails}

    def has_capability(self, name):
        return name == "MOVE"

    def folder_status(self, folder, what):
        return {b"UIDNEXT": 1}

    def move(self, uids, folder):
        self.moved += list(uids)


class _RouterThatResends:
    """The router's behaviour when a slip host dies right after committing a Receive: the
    same message goes again to the next incarnation, whose answer is "already owned"."""

    def __init__(self, slip: RoutingSlip):
        self.slip = slip

    async def ask(self, kind, key, msg, **kw):
        self.slip.ctx._effects = Effects()
        first = self.slip.on_receive(msg)  # committed; the reply is lost with the host
        assert first.created
        self.slip.ctx._effects = Effects()
        return self.slip.on_receive(msg)  # the re-sent Receive


async def test_mailbox_keeps_the_blob_when_its_own_receive_was_resent(tmp_path, gen):
    """Chaos run (slip host SIGKILLed while slips were being created): two valid eAUs
    ended parked with ``blob_missing`` - the mailbox actor took the "already owned" answer
    to its own re-sent Receive for a re-fetch and deleted the raw mail the slip held."""
    from actors.kim.mailbox import MailboxFetcher
    from actors.runtime.blobs import BlobStore
    from actors.runtime.config import KimMailbox, load_config
    from actors.runtime.crypto import KeyRing, Pseudonymizer

    cfg = load_config(run_dir=tmp_path / ".run")
    cfg.kim.mailboxes = [KimMailbox(user="kasse01")]
    cfg.kim.fetchers = 1
    f = MailboxFetcher(cfg, 0)
    f.blobs = BlobStore(tmp_path / "blobs", KeyRing.generate())
    f.pseudo = Pseudonymizer(b"k" * 32)
    slip = _slip()
    f.router = _RouterThatResends(slip)

    async def no_cursor(*a):
        return None

    f._save_cursor = no_cursor
    f._journal_move = no_cursor
    raw = gen.eau().raw
    client = _Client({7: raw})
    await f._handle_chunk(cfg.kim.mailboxes[0], client, 1, [7])
    ref = slip.state.blobs["raw"]
    assert client.moved == [7] and slip.state.status != "new"
    assert f.blobs.get(ref) == raw  # the claim check the slip holds is still there


def test_a_few_mails_with_lost_orders_do_not_stop_the_mailbox_intake():
    """Chaos run (a worker host SIGKILLed): the orders it held were lost, their ~20 slips
    waited for the watchdog (step_timeout_s per 4 fused steps: minutes), and because the
    oldest mail in flight was "too old", every mailbox took no new mail until then - the
    intake stood still for minutes while nothing was queued. Congestion now needs a tenth
    of the in-flight limit to be old; a real queue (many old mails) still holds the intake."""
    from actors.kim.mailbox import MailboxFetcher
    from actors.runtime.config import AutomatConfig

    cfg = AutomatConfig()
    cfg.kim.max_in_flight, cfg.kim.fetchers = 500, 2
    mb = MailboxFetcher(cfg, 0)
    assert mb._limit == 250
    now = time.monotonic()

    def in_flight(old: int, young: int) -> None:
        mb._inflight.clear()
        mb._since.clear()
        for i in range(old):
            mb._inflight.append(f"o{i}")
            mb._since[f"o{i}"] = now - 10 * mb._max_age
        for i in range(young):
            mb._inflight.append(f"y{i}")
            mb._since[f"y{i}"] = now

    in_flight(old=20, young=100)  # orders lost with a crashed worker host
    assert not mb._congested()
    in_flight(old=60, young=100)  # orders queue up
    assert mb._congested()
    mb._retrying = {f"o{i}" for i in range(60)}  # waiting for a retry is not congestion
    assert not mb._congested()
