"""The worker's step cache (``actors.kim.steps._base._Lru``): bounded by memory, not by
entries, so a mail's parsed payload is still there when the mail comes back for its next
segment while the worker has had the other mails in flight in between.

Regression: with a bound of 256 entries (~32 mails) the eAU's XML was parsed again in
``extract_fields`` after every round trip through the slip - 9 % of the step work in a
py-spy of the 6,000-mail load test."""

from __future__ import annotations

import pytest

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


@pytest.fixture
def parses(monkeypatch) -> list[int]:
    """The XML payloads parsed (their sizes) while the test runs."""
    seen: list[int] = []
    real = _fhirxml.parse_root

    def counting(data, err):
        seen.append(len(data))
        return real(data, err)

    monkeypatch.setattr(_fhirxml, "parse_root", counting)
    CACHE.clear()
    return seen


async def _interleaved(ports, mails, *, chain: int, after_segment=None) -> int:
    """Run the mails as a worker host does: one segment of every mail in flight per round
    (``run_chain``), each mail back after its round trip. ``after_segment(blobs)`` is called
    for a mail that goes on. Returns the rounds."""
    rm = roadmap_for(select_roadmap(peek_procedure(mails[0].raw)))
    work = {i: (rm.first, {}, {"raw": ports.blobs.put(m.raw, kind="mail")}) for i, m in enumerate(mails)}
    rounds = 0
    while work and rounds < 20:
        rounds += 1
        for i, (step, facts, blobs) in list(work.items()):
            order = StepOrder(mail_id=f"m{i}", step=step, roadmap=rm.name, roadmap_version=rm.version,
                              mailbox="b", facts=dict(facts), blobs=dict(blobs), chain=chain)
            d = None
            for r in await run_chain(order, ports):
                assert r.error is None, (r.step, r.error)
                facts.update(r.facts)
                blobs.update(r.blobs)
                d = rm.decide(r)
                facts.update(d.facts)
            if d.action == "terminal":
                del work[i]
                continue
            work[i] = (d.next_step, facts, blobs)
            if after_segment is not None:
                after_segment(blobs)
    assert not work
    return rounds


async def test_a_mail_s_payload_is_parsed_once_while_150_others_are_in_flight(ports, gen, parses):
    mails = [gen.eau() for _ in range(150)]
    rounds = await _interleaved(ports, mails, chain=32)
    assert rounds >= 3  # several segments each, interleaved
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


def test_forget_of_some_kinds_keeps_the_others_of_the_same_ref():
    c = _Lru(budget_bytes=10_000_000)
    c.put(("xml", "p1"), object(), weight=700)
    c.put(("eau", "p1"), object(), weight=100)
    c.put(("bytes", "p1"), b"payload")
    assert c.forget(["p1", "unknown"], kinds={"xml"}) == 1
    assert c.get(("xml", "p1")) is None and c.get(("eau", "p1")) is not None
    assert c.used == 100 + len(b"payload")
    assert c.forget(["p1"]) == 2  # what is left of the ref still goes with a full forget
    assert len(c) == 0 and c.used == 0 and not c._kinds


async def test_a_segment_that_ends_at_an_effect_leaves_no_xml_tree_behind(ports, gen, parses):
    """Regression: every in-flight mail's parsed XML tree stayed in the worker's cache until
    the mail's end - ~660 objects the garbage collector tracks per eAU, 88 % of what the
    cache held, carried by every full collection while the mail went round its slip. The
    later segments read the typed documents; the tree is dropped when the first one ends."""
    mails = [gen.eau() for _ in range(20)]
    came_back = []

    def tree_gone(blobs):
        came_back.append(blobs["payload"])
        assert CACHE.get(("xml", blobs["payload"])) is None  # the tree went with the segment
        assert CACHE.get(("eau", blobs["payload"])) is not None  # the typed eAU stays for the next

    await _interleaved(ports, mails, chain=48, after_segment=tree_gone)
    assert len(came_back) >= 2 * len(mails)  # the mails did come back to the worker
    assert len(parses) == len(mails)  # and none of their later segments parsed the XML again
    assert len(CACHE) == 0


async def test_a_chain_cut_short_keeps_the_xml_tree_for_its_next_part(ports, gen):
    CACHE.clear()
    m = gen.eau()
    rm = roadmap_for(select_roadmap(peek_procedure(m.raw)))
    cut = [s.name for s in rm.steps].index("check_profile") + 1  # parse_xml ran, check_mandatory did not
    order = StepOrder(mail_id="m", step=rm.first, roadmap=rm.name, roadmap_version=rm.version, mailbox="b",
                      blobs={"raw": ports.blobs.put(m.raw, kind="mail")}, chain=cut)
    results = await run_chain(order, ports)
    assert [r.step for r in results][-1] == "check_profile" and all(r.error is None for r in results)
    payload = next(r.blobs["payload"] for r in results if "payload" in r.blobs)
    assert CACHE.get(("xml", payload)) is not None


async def test_a_mail_run_inline_leaves_nothing_in_the_cache(ports, gen):
    """Regression: the inline floor (``run_mail_inline``) kept every mail's parses until the
    cache's budget evicted them - ~390,000 objects after 400 mails, four full collections of
    ~160 ms each; it measured the collector as much as the step code."""
    from actors.kim.steps.inline import run_mail_inline

    CACHE.clear()
    for _ in range(3):
        run = await run_mail_inline(gen.eau().raw, ports)
        assert run.status == "done"
        assert len(CACHE) == 0 and CACHE.used == 0
