"""MOPED wiring: entity kind, supervisor subtree, configuration."""

from __future__ import annotations

import pytest

from actors.moped.app import kinds, supervisor_spec
from actors.moped.composition import CompositionEntity
from actors.moped.config import DEV_TOKENS, MopedConfig
from actors.runtime.config import load_config
from actors.runtime.kinds import import_path


def test_kind_and_subtree(tmp_path):
    cfg = load_config(run_dir=tmp_path)
    (k,) = kinds(cfg)
    assert k.name == "moped.composition" and import_path(k.entity) is CompositionEntity
    assert CompositionEntity.personal_data is True
    spec = supervisor_spec(cfg)
    assert spec.name == "moped"
    assert [c.name for c in spec.children] == [k.host_name(i) for i in range(k.host_count(cfg))]


def test_tokens_and_conflict_status(tmp_path, monkeypatch):
    cfg = load_config(run_dir=tmp_path)
    assert MopedConfig().callers(cfg).keys() == DEV_TOKENS.keys()  # local stack: dev tokens
    assert MopedConfig(dev_tokens=False).callers(cfg) == {}
    monkeypatch.setenv("AUTOMAT_MOPED_CONFLICT_STATUS", "412")
    monkeypatch.setenv("AUTOMAT_MOPED_TOKENS", '{"t1": {"device": "Device/d", "organization": "Organization/o", '
                                               '"role": "SV"}}')
    m = MopedConfig(dev_tokens=False)
    assert m.conflict_status == 412 and m.callers(cfg)["t1"].role == "SV"
    with pytest.raises(ValueError):
        MopedConfig(conflict_status=500)
