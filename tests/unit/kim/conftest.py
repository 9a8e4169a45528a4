"""Shared fixtures for the KIM protocol unit tests (plain bytes in, typed results out)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from protocols.kim.generator import MailGenerator, make_pki


def _shared() -> Path:
    env = os.environ.get("AUTOMAT_SHARED_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[4] / "shared"


KIM_FIXTURES = _shared() / "fixtures" / "kim"


@pytest.fixture(scope="session")
def kim_fixtures() -> Path:
    if not KIM_FIXTURES.is_dir():
        pytest.skip(f"KIM fixtures not found at {KIM_FIXTURES}")
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
