"""Pure EFA rules: access policy, the merge decision (every refusal), lifecycle, relationships, tokens."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocols.efa import assertion
from protocols.efa.assertion import AssertionRejected, Claims
from protocols.efa.model import Caller, Consent, Document, DocumentIn, Partition, RecordState, Relationship
from protocols.efa.rules import (
    HTTP_STATUS,
    Refusal,
    advance,
    check_consent,
    check_submission,
    merge_decision,
    partition_record,
    require,
    rights,
)

A = Caller(sub="arzt-a", org="praxis-a")
B = Caller(sub="arzt-b", org="klinik-b")
X = Caller(sub="arzt-x", org="praxis-x")
NOW = 1_000_000.0


def record(may_extend=True, status="open") -> RecordState:
    st = RecordState(status=status, ecr_ref="e" * 32, consent=Consent(participants=["arzt-a", "klinik-b"],
                     valid_until=NOW + 100, may_extend=may_extend), participants=["arzt-a", "klinik-b"])
    st.partitions["p1"] = Partition(id="p1", owner="arzt-a", owner_org="praxis-a")
    st.documents["d1"] = Document(id="d1", partition_id="p1")
    return st


def doc(local_id="n1") -> DocumentIn:
    return DocumentIn(local_id=local_id, size=1, sha256="0" * 64, blob_ref="efa/00/" + "0" * 30)


def test_participants_by_person_or_organisation_have_rights_others_none():
    st = record()
    assert rights(st, A) == {"read", "write", "manage"}
    assert rights(st, B) == {"read", "write"}  # via organisation; no partition -> not a manager
    assert rights(st, X) == set()
    with pytest.raises(Refusal) as e:
        require(st, X, "read")
    assert e.value.code == "not_participant" and e.value.http_status == 403


def test_suspended_record_only_managers_read_retired_nobody():
    st = record(status="suspended")
    assert rights(st, A) == {"read", "manage"}
    assert rights(st, B) == set()
    with pytest.raises(Refusal) as e:
        require(st, A, "write")
    assert e.value.code == "record_not_open"
    assert rights(record(status="retired"), A) == set()


def test_merge_new_participant_with_extendable_and_merging_consent():
    assert merge_decision(record(), X, Consent(participants=["arzt-x"], valid_until=NOW + 5, may_merge=True)) == "merge"


@pytest.mark.parametrize("caller,may_extend,may_merge,code", [
    (A, True, True, "already_participant"),       # already a participant (by person)
    (B, True, True, "already_participant"),       # ... or by organisation
    (X, False, True, "consent_not_extendable"),   # existing consent does not allow extension
    (X, True, False, "merge_not_authorised"),     # new consent does not authorise merging
])
def test_merge_refusals(caller, may_extend, may_merge, code):
    with pytest.raises(Refusal) as e:
        merge_decision(record(may_extend=may_extend), caller,
                       Consent(participants=[caller.sub], valid_until=NOW + 5, may_merge=may_merge))
    assert e.value.code == code and HTTP_STATUS[code] == 409


def test_consent_must_be_valid_and_not_revoked():
    with pytest.raises(Refusal):
        check_consent(Consent(valid_until=NOW - 1), NOW)
    with pytest.raises(Refusal):
        check_consent(Consent(valid_until=NOW + 1, revoked=True), NOW)
    check_consent(Consent(valid_until=NOW + 1), NOW)


def test_lifecycle_order():
    assert [advance(s) for s in ("open", "suspended", "retired", "archived")] == \
        ["suspended", "retired", "archived", "archived"]


@pytest.mark.parametrize("rel", ["RPLC", "APND", "XFRM", "XFRM_RPLC", "signs"])
def test_relationships_to_existing_documents(rel):
    check_submission(record(), [doc()], [Relationship(source="n1", target="d1", type=rel)])
    with pytest.raises(Refusal) as e:
        check_submission(record(), [doc()], [Relationship(source="n1", target="nope", type=rel)])
    assert e.value.code == "relationship_target_missing"


def test_replacing_a_deprecated_document_and_unknown_sources_are_refused():
    st = record()
    st.documents["d1"].status = "deprecated"
    with pytest.raises(Refusal) as e:
        check_submission(st, [doc()], [Relationship(source="n1", target="d1", type="RPLC")])
    assert e.value.code == "relationship_target_deprecated"
    check_submission(st, [doc()], [Relationship(source="n1", target="d1", type="APND")])
    with pytest.raises(Refusal) as e:
        check_submission(st, [doc()], [Relationship(source="zz", target="d1", type="APND")])
    assert e.value.code == "relationship_source_unknown"
    with pytest.raises(Refusal) as e:
        check_submission(st, [doc(), doc()], [])
    assert e.value.code == "duplicate_local_id"


def test_partition_and_document_ids_name_their_record():
    assert partition_record("a" * 32 + ".p3") == "a" * 32
    assert partition_record("a" * 32 + ".d12") == "a" * 32
    for bad in ("x", "abc.q1", ".p1", "abc.p"):
        with pytest.raises(Refusal):
            partition_record(bad)


# ---- signed identity assertions -------------------------------------------------------------

def _claims(key, **kw) -> Claims:
    base = dict(iss="idp", kid=assertion.key_id(key.public_key()), sub="arzt-a", org="praxis-a", role="arzt",
                iat=NOW, exp=NOW + 60, jti="j" * 16)
    base.update(kw)
    return Claims(**base)


def test_assertion_roundtrip_and_every_rejection():
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    trusted = {assertion.key_id(key.public_key()): key.public_key()}
    tok = assertion.sign(_claims(key), key)
    assert assertion.verify(tok, trusted, NOW + 1).sub == "arzt-a"

    def code(token, now=NOW + 1):
        with pytest.raises(AssertionRejected) as e:
            assertion.verify(token, trusted, now)
        return e.value.code

    assert code(tok, NOW + 3600) == "expired"
    head, body, sig = tok.split(".")
    forged_body = assertion._b64e(_claims(key, sub="arzt-evil").model_dump_json().encode())
    assert code(f"{head}.{forged_body}.{sig}") == "bad_signature"  # forged claims
    # signed by a foreign key that claims the trusted key id
    assert code(assertion.sign(_claims(key), other)) == "bad_signature"
    # signed by a foreign key under its own id
    assert code(assertion.sign(_claims(other), other)) == "untrusted_issuer"
    assert code("garbage") == "malformed_token"
    assert code(f"{head}.!!!.{sig}") == "malformed_token"
