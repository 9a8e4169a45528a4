"""The worker's step cache (``actors.kim.steps._base._Lru``): bounded by memory, not by
entries, so a mail's parsed payload is still there when the mail comes back for its next
segment while the worker has had the other mails in flight in between.

Regression: with a bound of 256 entries (~32 mails) the eAU's XML was parsed again in
``extract_fields`` after every round trip through the slip - 9 % of the step work in a
py-spy of the 6,000-mail load test."""

from __future__ import annotations

from actors.kim.steps import CACHE, roadmap_for, run_chain
from actors.kim.steps._base import _Lru
from protocols.kim import _fhirxml
from protocols.kim.messages import StepOrder
from protocols.kim.roadmap import peek_procedure, select_roadmap


def test_bytes_weigh_their_length_and_the_oldest_go_first():
    c = _Lru(budget_bytes=1000)
    c.put(("bytes", "a"), b"x" * 400)
    c.put(("bytes", "b"), b"y" * 400)
    assert c.get(("bytes", "a")) is not None  # a is now the most recent
    c.put(("bytes", "c"), b"z" * 400)  # over budget: b (least recent) goes
    assert c.get(("bytes", "b")) is None
    assert c.get(("bytes", "a")) == b"x" * 400 and c.get(("bytes", "c")) == b"z" * 400
    assert c.used == 800


def test_a_parsed_object_weighs_what_its_caller_estimates():
    c = _Lru(budget_bytes=10_000)
    c.put(("xml", "r1"), object(), weight=7_000)
    c.put(("eau", "r1"), object())  # the default estimate of a typed document
    assert c.get(("xml", "r1")) is None  # 7,000 + 32 KiB > 10,000
    c.put(("eau", "r1"), "replaced", weight=100)  # a re-put replaces the weight, not adds
    assert c.used == 100 and len(c) == 1
    c.resize(50)  # shrinking evicts down to the new budget
    assert len(c) == 0 and c.used == 0


async def test_a_mail_s_payload_is_parsed_once_while_150_others_are_in_flight(ports, gen, monkeypatch):
    parses = []
    real = _fhirxml.parse_root

    def counting(data, err):
        parses.append(len(data))
        return real(data, err)

    monkeypatch.setattr(_fhirxml, "parse_root", counting)
    CACHE.clear()
    mails = [gen.eau() for _ in range(150)]
    rm = roadmap_for(select_roadmap(peek_procedure(mails[0].raw)))
    work = {}
    for i, m in enumerate(mails):
        work[i] = (rm.first, {}, {"raw": ports.blobs.put(m.raw, kind="mail")})
    rounds = 0
    while work and rounds < 20:  # one segment of every mail in flight per round, as a worker host
        rounds += 1
        for i, (step, facts, blobs) in list(work.items()):
            order = StepOrder(mail_id=f"m{i}", step=step, roadmap=rm.name, roadmap_version=rm.version,
                              mailbox="b", facts=dict(facts), blobs=dict(blobs), chain=32)
            d = None
            for r in await run_chain(order, ports):
                assert r.error is None, (r.step, r.error)
                facts.update(r.facts)
                blobs.update(r.blobs)
                d = rm.decide(r)
                facts.update(d.facts)
            if d.action == "terminal":
                del work[i]
            else:
                work[i] = (d.next_step, facts, blobs)
    assert not work and rounds >= 3  # several segments each, interleaved
    assert len(parses) == len(mails)  # once per payload (twice each with the 256-entry bound)
    # every mail reached its end: the cache let go of all of them (not left for eviction -
    # in rate mode a full cache made the heap big and the GC's full passes 200 ms stalls)
    assert len(CACHE) == 0 and CACHE.used == 0


def test_forget_drops_every_kind_cached_for_a_ref():
    c = _Lru(budget_bytes=10_000_000)
    c.put(("bytes", "r1"), b"raw")
    c.put(("mail", "r1"), object(), weight=100)
    c.put(("bytes", "r2"), b"other")
    assert c.forget(["r1", "unknown"]) == 2
    assert c.get(("mail", "r1")) is None and c.get(("bytes", "r2")) == b"other"
    assert c.used == len(b"other")
