"""116117 Terminservice FHIR XML (``protocols/tss/xml.py``) under random and mutated input.

``from_xml`` returns a resource dict or raises a ``TssProtocolError`` (MalformedXml,
JsonNotXml, NotFhir) - never anything else; ``to_xml`` / ``from_xml`` round-trip the
resources the Terminservice exchanges.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from protocols.tss.errors import TssProtocolError
from protocols.tss.xml import RESOURCE_TYPES, from_xml, to_xml
from tests.unit.fuzz._fuzz import fuzz, mutated, text_mutations, tried

SLOT = {
    "resourceType": "Slot", "id": "s1",
    "meta": {"profile": ["https://fhir.kbv.de/StructureDefinition/KBV_PR_TSS_Slot|1.0"]},
    "schedule": {"reference": "Schedule/sch1"}, "status": "free",
    "start": "2031-01-01T09:00:00Z", "end": "2031-01-01T09:15:00Z", "overbooked": False,
    "serviceType": [{"coding": [{"system": "urn:x", "code": "1"}]}],
}
BUNDLE = {"resourceType": "Bundle", "type": "searchset", "total": 1,
          "entry": [{"fullUrl": "https://tss/Slot/s1", "resource": SLOT}]}


def check(data) -> None:
    tried("tss.from_xml")
    try:
        res = from_xml(data)
    except TssProtocolError:
        return
    assert res["resourceType"] in RESOURCE_TYPES


@fuzz()
@given(st.binary(max_size=1500) | st.text(max_size=500))
def test_random_input(data):
    check(data)


@fuzz()
@given(st.data())
def test_byte_mutated_bundles(data):
    check(data.draw(mutated(to_xml(BUNDLE), (to_xml(SLOT),))))


@fuzz()
@given(st.data())
def test_text_mutated_bundles(data):
    check(data.draw(text_mutations(to_xml(BUNDLE).decode())))


@fuzz()
@given(st.sampled_from(("utf-8", "latin-1", "x-bogus", "utf-16", "ascii", "")), st.booleans())
def test_xml_declarations_with_any_encoding(enc, as_text):
    doc = f'<?xml version="1.0" encoding="{enc}"?><Slot xmlns="http://hl7.org/fhir"><status value="free"/></Slot>'
    check(doc if as_text else doc.encode())


safe_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=30)


@fuzz()
@given(safe_text, safe_text, st.booleans(), st.integers(0, 10**6))
def test_round_trip(status, code, overbooked, total):
    slot = dict(SLOT, status=status, overbooked=overbooked,
                serviceType=[{"coding": [{"system": "urn:x", "code": code}]}])
    bundle = dict(BUNDLE, total=total, entry=[{"fullUrl": "https://tss/Slot/s1", "resource": slot}])
    tried("tss.from_xml(round trip)")
    assert from_xml(to_xml(bundle)) == bundle
