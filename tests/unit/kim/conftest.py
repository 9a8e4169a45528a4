"""Shared fixtures for the KIM protocol unit tests (plain bytes in, typed results out)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from protocols.kim.generator import MailGenerator, make_pki


def _fixtures() -> Path:
    """The repository's ``fixtures/`` (real public samples, licences in SOURCES.md)."""
    env = os.environ.get("AUTOMAT_FIXTURES_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "fixtures"


KIM_FIXTURES = _fixtures() / "kim"


@pytest.fixture(scope="session")
def kim_fixtures() -> Path:
    if not KIM_FIXTURES.is_dir():
        pytest.fail(f"KIM fixtures not found at {KIM_FIXTURES}")
    return KIM_FIXTURES


@pytest.fixture(scope="session")
def pki():
    return make_pki(7)


@pytest.fixture()
def gen(pki) -> MailGenerator:
    return MailGenerator(7, pki=pki, oversize_bytes=300_000)


def fixture_files(pattern: str) -> list[Path]:
    """Fixture files for parametrisation (empty list if the fixtures are absent)."""
    return sorted(KIM_FIXTURES.glob(pattern)) if KIM_FIXTURES.is_dir() else []
