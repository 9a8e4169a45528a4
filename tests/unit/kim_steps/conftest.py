"""Fixtures for the KIM step tests: in-memory ports (blobs + SQLite core under tmp_path)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from actors.kim.ports import make_memory_ports
from protocols.kim.generator import MailGenerator, make_pki


def _fixtures() -> Path:
    env = os.environ.get("AUTOMAT_FIXTURES_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "fixtures"


KIM_FIXTURES = _fixtures() / "kim"
SEED = 7


@pytest.fixture(scope="session")
def pki():
    return make_pki(SEED)


@pytest.fixture()
def ports(tmp_path):
    p = make_memory_ports(tmp_path, test_seeds=str(SEED))
    p.reference.max_mail_bytes = 250_000
    return p


@pytest.fixture()
def gen(pki) -> MailGenerator:
    return MailGenerator(SEED, pki=pki, oversize_bytes=300_000)


def fixture_mails() -> list[Path]:
    return sorted(KIM_FIXTURES.glob("*.eml")) if KIM_FIXTURES.is_dir() else []
