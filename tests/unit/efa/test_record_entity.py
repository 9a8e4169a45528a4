"""The case record entity's handlers in-process (no Ray, no Redis): outcomes, effects
(events, timers, tells) and the lifecycle driven by its timers."""

from __future__ import annotations

from actors.efa.ports import EfaPorts
from actors.efa.record import CaseRecord
from actors.efa.settings import EfaSettings
from actors.runtime.entity import Effects, EntityContext
from protocols.efa.messages import (
    CloseECR,
    ConsentLapsed,
    CreateECR,
    DeleteBlobs,
    LifecycleStep,
    ListContent,
    ProvideData,
    RegisterConsent,
    RetrieveDocs,
)
from protocols.efa.model import Caller, Consent, DocumentIn, Relationship

A = Caller(sub="arzt-a", org="praxis-a")
X = Caller(sub="arzt-x", org="praxis-x")
KEY = "f" * 32


class Clock:
    t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def entity(clock: Clock) -> CaseRecord:
    ports = EfaPorts(settings=EfaSettings(suspend_grace_s=10, archive_after_s=20, access_log_max=3), clock=clock)
    ctx = EntityContext("efa.record", KEY, ports, clock, None)
    return CaseRecord(KEY, CaseRecord.initial_state(KEY), ctx)


def effects(e: CaseRecord) -> Effects:
    eff, e.ctx._effects = e.ctx._effects, Effects()
    return eff


def doc(i: str) -> DocumentIn:
    return DocumentIn(local_id=i, size=1, sha256="0" * 64, blob_ref=f"efa/00/{i:0>30}")


def test_create_merge_provide_and_the_lifecycle_by_timers():
    clock = Clock()
    e = entity(clock)
    r = e.on_create(CreateECR(caller=A, patient="P1", purpose="I21", consent=Consent(
        participants=[], valid_until=clock.t + 100, may_extend=True), documents=[doc("c")]))
    assert r.ok and r.data["outcome"] == "created" and r.data["partition_id"] == f"{KEY}.p1"
    eff = effects(e)
    assert [ev.type for ev in eff.events] == ["document.provided", "record.created"]
    assert all("P1" not in ev.model_dump_json() for ev in eff.events)  # no patient id in events
    assert eff.timers_set["lapse"].due == clock.t + 100
    # merge by a new participant
    r = e.on_create(CreateECR(caller=X, patient="P1", purpose="I21", consent=Consent(
        participants=["arzt-x"], valid_until=clock.t + 200, may_merge=True)))
    assert r.data["outcome"] == "merged" and e.state.participants == ["arzt-a", "arzt-x"]
    assert effects(e).timers_set["lapse"].due == clock.t + 200  # validity extended
    # relationships: replace the consent document
    r = e.on_provide(ProvideData(caller=X, partition_id=f"{KEY}.p2", documents=[doc("n")],
                                 relationships=[Relationship(source="n", target=f"{KEY}.d1", type="RPLC")]))
    assert r.ok and e.state.documents[f"{KEY}.d1"].status == "deprecated"
    # a refused call changes nothing but the access log
    before = e.state.model_copy(deep=True)
    r = e.on_provide(ProvideData(caller=X, partition_id=f"{KEY}.p2", documents=[doc("m")],
                                 relationships=[Relationship(source="m", target="missing", type="APND")]))
    assert not r.ok and r.code == "relationship_target_missing"
    assert e.state.documents == before.documents and e.state.access_log[-1].outcome == "relationship_target_missing"
    assert len(e.state.access_log) == 3 and e.state.access_log_dropped > 0  # bounded
    # consent lapses: stale timer ignored, the current one suspends
    effects(e)
    e.on_lapsed(ConsentLapsed(generation=1, valid_until=clock.t + 100))
    assert e.state.status == "open"
    clock.t += 200
    e.on_lapsed(ConsentLapsed(generation=1, valid_until=clock.t))
    assert e.state.status == "suspended" and e.state.close_reason == "consent_expired"
    eff = effects(e)
    assert "record.closed" in [ev.type for ev in eff.events] and "lifecycle" in eff.timers_set
    assert e.on_list_content(ListContent(caller=A, partition_id=f"{KEY}.p1")).ok  # manager, grace period
    e.on_step(LifecycleStep(generation=1, expected="suspended"))
    assert e.state.status == "retired"
    assert e.on_retrieve(RetrieveDocs(caller=A, document_ids=[f"{KEY}.d1"])).code == "record_not_open"
    e.on_step(LifecycleStep(generation=1, expected="retired"))
    assert e.state.status == "archived"
    eff = effects(e)
    (kind, _, msg), = eff.tells
    assert kind == "efa.janitor" and isinstance(msg, DeleteBlobs) and len(msg.refs) == 2
    assert all(not d.blob_ref for d in e.state.documents.values()) and len(e.state.documents) == 2
    # a new record for the same patient + purpose after archiving: new generation, fresh ids
    r = e.on_create(CreateECR(caller=A, patient="P1", purpose="I21", consent=Consent(valid_until=clock.t + 50)))
    assert r.data["outcome"] == "created" and e.state.generation == 2 and r.data["partition_id"] == f"{KEY}.p3"


def test_close_and_revocation():
    clock = Clock()
    e = entity(clock)
    e.on_create(CreateECR(caller=A, patient="P", purpose="Z", consent=Consent(valid_until=clock.t + 100)))
    assert e.on_close(CloseECR(caller=X, reason="x")).code == "not_participant"
    r = e.on_close(CloseECR(caller=A, reason="done", documents=[doc("r")]))
    assert r.ok and e.state.status == "suspended" and e.state.close_reason == "done"
    assert "lapse" in effects(e).timers_cancelled
    e2 = entity(clock)
    e2.on_create(CreateECR(caller=A, patient="P", purpose="Z", consent=Consent(valid_until=clock.t + 100)))
    r = e2.on_register_consent(RegisterConsent(caller=A, consent=Consent(valid_until=clock.t + 100, revoked=True)))
    assert r.ok and e2.state.status == "suspended" and e2.state.close_reason == "consent_revoked"


def test_unknown_record_is_not_created_by_a_refused_call():
    e = entity(Clock())
    r = e.on_provide(ProvideData(caller=A, partition_id=f"{KEY}.p1", documents=[doc("d")]))
    assert r.code == "unknown_record" and e.ctx._effects.delete
