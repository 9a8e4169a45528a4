"""Fused step segments: the worker runs side-effect-free steps in one call, the slip still
records every step on its own; the blob store makes a segment's blobs durable at once."""

from __future__ import annotations

import time
from types import SimpleNamespace

from actors.kim.slip import Receive, RoutingSlip, SlipPorts, SlipState
from actors.kim.steps import CLAIMS, ENDS_SEGMENT, roadmap_for, run_chain
from actors.kim.steps.inline import run_mail_inline
from actors.kim.ports import make_memory_ports
from actors.runtime.entity import Effects, EntityContext
from protocols.kim.messages import StepOrder, StepResults
from protocols.kim.roadmap import peek_procedure, select_roadmap


def _first_order(ports, gen, *, chain: int):
    """An eAU's road map and the order of its first step (raw mail stored as the slip would)."""
    mail = gen.eau()
    rm = roadmap_for(select_roadmap(peek_procedure(mail.raw)))
    ref = ports.blobs.put(mail.raw, kind="mail")
    return rm, StepOrder(mail_id="m1", step=rm.first, roadmap=rm.name, roadmap_version=rm.version, mailbox="b",
                         blobs={"raw": ref}, chain=chain)


async def test_chain_stops_after_the_first_side_effect(ports, gen):
    rm, order = _first_order(ports, gen, chain=64)
    res = await run_chain(order, ports)
    steps = [r.step for r in res]
    assert steps[0] == rm.first and len(steps) > 20  # the whole technical scan in one call
    assert all(r.error is None for r in res)
    assert [s for s in steps if rm.step(s).impl in ENDS_SEGMENT] == [steps[-1]]  # ends with its one side effect
    assert all(a.started_at <= b.started_at for a, b in zip(res, res[1:]))
    assert ports.blobs.is_durable(ports.blobs.last_write)  # the segment's blobs are durable
    # chain=1: exactly one step, as before
    one = await run_chain(order.model_copy(update={"chain": 1}), ports)
    assert [r.step for r in one] == [rm.first]


async def test_fused_and_step_by_step_runs_take_the_same_path(tmp_path, gen):
    mails = [gen.eau(), gen.eeb_anfrage(), gen.ebz(), gen.emailplus()]
    from protocols.kim.generator import Fault

    mails += [gen.eau(Fault.BROKEN_SIGNATURE), gen.eau(Fault.DUPLICATE)]
    a = make_memory_ports(tmp_path / "a", test_seeds="7")
    b = make_memory_ports(tmp_path / "b", test_seeds="7")
    for m in mails:
        single = await run_mail_inline(m.raw, a, mail_id="x")
        rm = roadmap_for(single.roadmap, single.version)
        facts, blobs = {}, {"raw": b.blobs.put(m.raw, kind="mail")}
        step, trail = rm.first, []
        for _ in range(100):
            order = StepOrder(mail_id="x", step=step, roadmap=rm.name, roadmap_version=rm.version, mailbox="b",
                              facts=dict(facts), blobs=dict(blobs), chain=64)
            res = await run_chain(order, b)
            d = None
            for r in res:
                trail.append((r.step, r.outcome, r.error.code if r.error else None))
                facts.update(r.facts)
                blobs.update(r.blobs)
                d = rm.decide(r)
                facts.update(d.facts)
            if d.action == "terminal":
                break
            step = d.next_step
        assert trail == single.trail, m.procedure


def _slip(ports) -> RoutingSlip:
    kim = SimpleNamespace(fuse_max=64, step_timeout_s=60.0)
    ctx = EntityContext("kim.slip", "m1", SlipPorts(SimpleNamespace(kim=kim)), time.time, None)
    return RoutingSlip("m1", SlipState(), ctx)


async def test_slip_records_each_step_of_a_segment(ports, gen):
    mail = gen.eau()
    slip = _slip(ports)
    slip.ctx._effects = Effects()
    slip.on_receive(Receive(mail_id="m1", mailbox="b", blob=ports.blobs.put(mail.raw, kind="mail"), procedure="eAU_Lieferung"))
    (_, _, order), = slip.ctx._effects.tells
    assert order.chain == 64
    res = await run_chain(order, ports)
    slip.ctx._effects = Effects()
    ack = slip.on_results(StepResults(mail_id="m1", results=res))
    assert ack.accepted
    s = slip.state
    assert [h.step for h in s.history[:len(res)]] == [r.step for r in res]  # one history entry per step
    assert all(h.ended is not None and h.result == "ok" for h in s.history[:len(res)])
    assert s.status == "running" and s.step == roadmap_for("eau").ok_target(res[-1].step)
    assert s.steps_run == len(res) + 1
    (_, _, nxt), = slip.ctx._effects.tells  # exactly one new order: the next segment
    assert nxt.step == s.step and nxt.facts["attachment_hash"] == s.facts["attachment_hash"]
    assert "watchdog" in slip.ctx._effects.timers_set
    # the same results again are stale (a re-sent batch): nothing changes
    slip.ctx._effects = Effects()
    assert not slip.on_results(StepResults(mail_id="m1", results=res)).accepted
    assert slip.ctx._effects.tells == []


async def test_a_slip_is_at_rest_only_once_its_mail_is_finished(ports, gen):
    """The slip host lets a finished slip go at once (``at_rest``); one still at work stays."""
    mail = gen.eau()
    slip = _slip(ports)
    slip.ctx._effects = Effects()
    assert not slip.at_rest()  # new
    slip.on_receive(Receive(mail_id="m1", mailbox="b", blob=ports.blobs.put(mail.raw, kind="mail"), procedure="eAU_Lieferung"))
    (_, _, order), = slip.ctx._effects.tells
    for _ in range(100):
        assert not slip.at_rest(), slip.state.status  # received / running / waiting
        res = await run_chain(order, ports)
        slip.ctx._effects = Effects()
        assert slip.on_results(StepResults(mail_id="m1", results=res)).accepted
        if slip.state.status in ("done", "rejected", "parked"):
            break
        (_, _, order), = slip.ctx._effects.tells
    assert slip.state.status == "done" and slip.at_rest()


async def test_duplicate_claims_do_not_end_a_segment_and_a_rerun_keeps_the_claims(ports, gen):
    """An eAU went through its slip five times: the duplicate claims ended a segment each,
    although claiming again is harmless (``SET NX`` with the mail id: the owner gets its own
    claim back). Now the first segment runs through both claims up to the insured lookup -
    and a segment run again (the worker died before its answer) still finds the mail unique,
    while another mail with the same document is a duplicate."""
    rm, order = _first_order(ports, gen, chain=48)
    first = await run_chain(order, ports)
    steps = [r.step for r in first]
    assert {"dedupe_file_hash", "dedupe_bundle_id"} <= set(steps) and steps[-1] == "lookup_insured"
    assert {rm.step(s).impl for s in steps} & CLAIMS == CLAIMS
    again = await run_chain(order, ports)  # the same segment once more
    assert [(r.step, r.outcome) for r in again] == [(r.step, r.outcome) for r in first]
    assert all(r.error is None for r in again)
    assert {r.step: r.facts for r in again}["dedupe_bundle_id"] == {"bundle_unique": "1"}
    other = await run_chain(order.model_copy(update={"mail_id": "m2"}), ports)
    by_step = {r.step: r for r in other}
    assert by_step["dedupe_file_hash"].outcome == "duplicate" and by_step["dedupe_file_hash"].facts["duplicate_of"] == "m1"
    assert other[-1].step == "record_duplicate"
