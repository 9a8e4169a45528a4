"""Bugs the parser fuzzers found, each pinned by name (tests/unit/fuzz/test_fuzz_*.py)."""

from __future__ import annotations

import pytest

from protocols.tss.errors import MalformedXml
from protocols.tss.xml import from_xml


def test_tss_xml_unknown_encoding_in_declaration_is_malformed_xml():
    """Found by test_fuzz_tss.test_xml_declarations_with_any_encoding: expat raised a bare
    LookupError for ``encoding="x-bogus"``; the sync entity would have crashed on it."""
    with pytest.raises(MalformedXml, match="unknown encoding"):
        from_xml(b'<?xml version="1.0" encoding="x-bogus"?><Slot xmlns="http://hl7.org/fhir"/>')


def test_tss_xml_text_with_lone_surrogate_is_malformed_xml():
    """A ``str`` payload with a lone surrogate raised UnicodeEncodeError in ``from_xml``."""
    with pytest.raises(MalformedXml):
        from_xml('<Slot xmlns="http://hl7.org/fhir"><status value="\ud800"/></Slot>')
