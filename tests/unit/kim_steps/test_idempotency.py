"""Steps may run twice after a crash: their effect happens once."""

from __future__ import annotations

import pytest

from actors.kim.core_system import FaultyCoreSystem, SqliteCoreSystem
from actors.kim.steps import run_step
from actors.kim.steps.inline import run_mail_inline
from protocols.kim.generator import Fault
from protocols.kim.messages import StepOrder


async def test_deposit_twice_one_record(tmp_path):
    core = SqliteCoreSystem(tmp_path / "core.sqlite3")
    r1 = await core.deposit({"kind": "eau", "doc_hash": "h1", "x": 1}, "eau:m1")
    r2 = await core.deposit({"kind": "eau", "doc_hash": "h1", "x": 2}, "eau:m1")
    assert r1.created and not r2.created and r1.receipt_id == r2.receipt_id
    assert core.count() == 1 and core.records()[0]["record"]["x"] == 1
    # durable: a new connection (another process) sees it
    again = SqliteCoreSystem(tmp_path / "core.sqlite3")
    assert again.count() == 1 and (await again.find_by_document("h1")).receipt_id == r1.receipt_id


async def test_whole_mail_run_twice_one_deposit_no_duplicate_of_itself(ports, gen):
    gm = gen.eau()
    first = await run_mail_inline(gm.raw, ports, mail_id="m-1")
    # a crash after the last step: every step is dispatched again with the same mail id
    second = await run_mail_inline(gm.raw, ports, mail_id="m-1", raw_ref=first.blobs["raw"])
    assert first.terminal == second.terminal == "@done"
    assert second.facts.get("result") == "accepted" and second.facts["deposit"] == "existing"
    assert ports.core.count("eau") == 1


async def test_each_step_twice(ports, gen):
    """Re-running any single step with the same order gives the same outcome and no second effect."""
    gm = gen.eau(Fault.UNTRUSTED_SIGNER)
    run = await run_mail_inline(gm.raw, ports, mail_id="m-2")
    assert run.terminal == "@rejected" and len(ports.mail.sent) == 1
    facts, blobs = {}, {"raw": run.blobs["raw"]}
    for res in run.results:
        order = StepOrder(mail_id="m-2", step=res.step, roadmap="eau", roadmap_version=2, mailbox="", facts=dict(facts), blobs=dict(blobs))
        again = await run_step(order, ports)
        assert again.outcome == res.outcome and (again.error is None) == (res.error is None), res.step
        facts.update(res.facts)
        blobs.update(res.blobs)
        if res.error:
            facts.update({"error_code": res.error.code, "error_step": res.step})
    assert len(ports.mail.sent) == 1, "the error answer went out once"


async def test_faulty_core_system_retries_never_duplicate(ports, gen, tmp_path):
    faulty = FaultyCoreSystem(ports.core, error_rate=0.15, timeout_rate=0.05, lost_reply_rate=0.5, timeout_s=0.001, seed=1)
    ports.core = faulty
    done = parked = 0
    for _ in range(8):
        run = await run_mail_inline(gen.eau().raw, ports)
        if run.terminal == "@done":
            done += 1
        else:
            assert run.terminal == "@parked", run.trail
            assert run.facts["park_reason"] == "attempts_exhausted"
            parked += 1
    assert faulty.injected["lost_reply"] > 0 and faulty.injected["error"] > 0, (faulty.injected, done, parked)
    eau = [r for r in faulty.records("eau")]
    assert len(eau) == len({r["idempotency_key"] for r in eau})
    assert done >= 1 and len([r for r in eau if r["status"] == "released"]) == done


async def test_core_outage_is_retryable(ports, gen):
    ports.core = FaultyCoreSystem(ports.core, error_rate=1.0)
    run = await run_mail_inline(gen.eau().raw, ports)
    assert run.terminal == "@parked"
    errs = [r.error for r in run.results if r.error]
    assert errs and all(e.retryable and e.code == "core_unavailable" for e in errs)


async def test_smtp_failure_is_retried_then_sent_once(ports, gen):
    ports.mail.fail_next = 2
    run = await run_mail_inline(gen.eau(Fault.BROKEN_SIGNATURE).raw, ports)
    assert run.terminal == "@rejected"
    assert [t[2] for t in run.trail if t[0] == "answer_error"] == ["smtp_unavailable", "smtp_unavailable", None]
    assert len(ports.mail.sent) == 1


def test_core_faults_from_env(tmp_path):
    from actors.kim.ports import core_from_env

    core = SqliteCoreSystem(tmp_path / "c.sqlite3")
    assert core_from_env(core, "") is core
    f = core_from_env(core, "error=0.1,lost_reply=0.2,slow=0.5,slow_s=0.01,seed=4")
    assert isinstance(f, FaultyCoreSystem) and f.error_rate == 0.1 and f.lost_reply_rate == 0.2 and f.slow_s == 0.01
    with pytest.raises(ValueError, match="unknown key"):
        core_from_env(core, "explode=1")
