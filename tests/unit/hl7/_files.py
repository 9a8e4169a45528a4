"""Helpers for the HL7 unit tests: the fixture files (``fixtures/hl7v2``, licences in fixtures/SOURCES.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
FIXTURES = Path(os.environ.get("AUTOMAT_HL7_FIXTURES", REPO / "fixtures" / "hl7v2"))


def fixture_bytes(name: str) -> bytes:
    """``name`` like ``"ipf/sap-ish_adt_a01_v25.hl7"``."""
    path = FIXTURES / name
    if not path.exists():
        pytest.fail(f"fixture {path} not available")
    return path.read_bytes()


def all_fixture_names() -> list[str]:
    if not FIXTURES.exists():
        return []
    return sorted(str(p.relative_to(FIXTURES)) for p in FIXTURES.glob("*/*.hl7"))
