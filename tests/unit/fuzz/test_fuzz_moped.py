"""MOPED bodies (FHIR R5 Parameters/Bundle JSON) under random and mutated input.

``parse_operation_body`` either returns the entries or raises ``MopedError`` with HTTP
400/422 and issues that render as an OperationOutcome - never anything else (an HTTP 500
would be the Serve ingress crashing on a client's body).
"""

from __future__ import annotations

import copy
import json

from hypothesis import given
from hypothesis import strategies as st

from protocols.moped import codes, samples
from protocols.moped.fhirio import MopedError, operation_outcome, parse_operation_body, validate_resource
from tests.unit.fuzz._fuzz import fuzz, mutated, tried

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20) | st.sampled_from(("Bundle", "Parameters", "Patient", "Encounter", "urn:uuid:x", "")),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
        st.sampled_from(("resourceType", "parameter", "name", "resource", "entry", "fullUrl", "id", "status",
                         "subject", "reference", "valueBoolean", "meta", "type")) | st.text(max_size=8), kids,
        max_size=5),
    max_leaves=25,
)


def check(raw: bytes, op: str) -> None:
    tried(f"moped.parse_operation_body")
    try:
        entries, aviso = parse_operation_body(raw, op)
    except MopedError as e:
        assert e.status in (400, 422), e.status
        assert e.issues
        json.dumps(operation_outcome(e.issues))  # the answer renders
        return
    assert isinstance(aviso, bool)
    assert entries and all(isinstance(x.resource, dict) for x in entries)


_ops = st.sampled_from(codes.ALL_OPS)


@fuzz()
@given(st.binary(max_size=2000), _ops)
def test_random_bytes(raw, op):
    check(raw, op)


@fuzz()
@given(json_values, _ops)
def test_random_json_documents(doc, op):
    check(json.dumps(doc).encode(), op)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@st.composite
def edited_admissions(draw):
    """A valid $aufnehmen body with 1-4 structural edits (delete / replace / retype)."""
    body = samples.admission()
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(body) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = body
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(("delete", "replace", "dup")))
        if op == "delete":
            if isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent.pop(path[-1])
        elif op == "replace":
            parent[path[-1]] = draw(json_values)
        else:
            parent[path[-1]] = [copy.deepcopy(parent[path[-1]])] * 2
    return body


@fuzz(0.5)
@given(edited_admissions())
def test_structurally_edited_admissions(body):
    check(json.dumps(body).encode(), "aufnehmen")


@fuzz(0.5)
@given(st.data())
def test_byte_mutated_admissions(data):
    raw = json.dumps(samples.admission()).encode()
    check(data.draw(mutated(raw)), "aufnehmen")


@fuzz()
@given(json_values.filter(lambda v: isinstance(v, dict)),
       st.sampled_from(("Patient", "Encounter", "Condition", "Claim", "Bogus", "")))
def test_validate_resource_is_total(doc, rtype):
    tried("moped.validate_resource")
    issues = validate_resource(dict(doc, resourceType=rtype), "x")
    assert isinstance(issues, list)
