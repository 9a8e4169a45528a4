"""Settings of the HL7 import: the interfaces of a deployment and where their data goes.

Loaded from ``$AUTOMAT_HL7_CONFIG`` or ``<run_dir>/hl7.yaml`` (YAML/JSON); without a file
the local default is one MLLP interface on 127.0.0.1:12575 and one file-drop interface
under ``<run_dir>/hl7/in`` (both mapping everything to billing unit ``PRAX1``), bridged
to the local MOPED (``http://127.0.0.1:8000/moped``).

```yaml
moped_url: http://127.0.0.1:18000/moped      # the MOPED bridge (omit: no bridge)
moped_token_file: /run/secrets/moped-token   # bearer token at MOPED (or AUTOMAT_HL7_MOPED_TOKEN)
interfaces:
  - config:                                  # protocols.hl7.Hl7InterfaceConfig
      name: kis1
      transport: tcp
      tcp: {port: 2575, framing: {start_char: 11, end_char: 28, after_end_char: 13}}
      id_fields: PID-3/PV1-19
      case_creation: background
      case_scope: per_billing_unit
      mapping: {rows: [{patient_class: O, contract_code: K, billing_unit: PRAX1},
                       {patient_class: "*", billing_unit: PRAX2}]}
    export: {transport: tcp, host: 10.0.0.5, port: 2576}   # FT1 back to the KIS
```
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, Field, model_validator

from actors.hl7.messages import ExportTarget
from protocols.hl7 import Hl7InterfaceConfig

DEFAULT_TCP_PORT = 12575
#: MOPED's bearer token for a hospital (KH) on the local stack (actors/moped dev tokens)
LOCAL_MOPED_TOKEN = "dev-kh"
#: where `automat run` serves MOPED (Ray Serve's proxy on 127.0.0.1:8000, route /moped)
LOCAL_MOPED_URL = "http://127.0.0.1:8000/moped"


class InterfaceSettings(BaseModel):
    config: Hl7InterfaceConfig
    export: ExportTarget | None = None
    #: run hl7apy's structural pass (20-240 ms per message); False: the positional parse only
    validate_hl7apy: bool = True
    file_poll_s: float = Field(0.5, gt=0)
    #: a dropped file is read only once its size and mtime did not change for this long
    file_settle_s: float = Field(1.0, ge=0)
    #: poll the drop directory continuously; None: as DURIA, only with case creation
    #: "background"/"all_background" (otherwise on `automat hl7 fetch`)
    file_autopoll: bool | None = None

    @property
    def name(self) -> str:
        return self.config.name

    def autopoll(self) -> bool:
        if self.file_autopoll is not None:
            return self.file_autopoll
        return self.config.case_creation in ("background", "all_background")


class Hl7Settings(BaseModel):
    interfaces: list[InterfaceSettings] = Field(default_factory=list)
    moped_url: str | None = None
    #: file holding this hub's bearer token at MOPED (the token itself is never in this file,
    #: in messages or in entity state; env ``AUTOMAT_HL7_MOPED_TOKEN`` overrides it)
    moped_token_file: str | None = None
    hosts: int = Field(1, ge=1, le=64)  # shard hosts per HL7 entity kind

    @model_validator(mode="after")
    def _unique(self) -> "Hl7Settings":
        names = [i.name for i in self.interfaces]
        if len(names) != len(set(names)):
            raise ValueError(f"interface names must be unique: {names}")
        return self

    def interface(self, name: str) -> InterfaceSettings:
        for i in self.interfaces:
            if i.name == name:
                return i
        raise KeyError(f"no HL7 interface {name!r} (have: {', '.join(i.name for i in self.interfaces) or 'none'})")

    def moped_bearer_token(self, cfg) -> str | None:
        """The MOPED bearer token, for the bridge host's ports only: ``AUTOMAT_HL7_MOPED_TOKEN``,
        else ``moped_token_file``, else (local stack only) MOPED's development KH token."""
        tok = os.environ.get("AUTOMAT_HL7_MOPED_TOKEN")
        if tok:
            return tok.strip()
        if self.moped_token_file:
            return Path(self.moped_token_file).read_text().strip()
        return LOCAL_MOPED_TOKEN if getattr(cfg, "local_stack", False) else None

    def billing_units(self) -> list[str]:
        out: list[str] = []
        for i in self.interfaces:
            for row in i.config.mapping.rows:
                if row.billing_unit not in out:
                    out.append(row.billing_unit)
        return out


def default_settings(cfg) -> Hl7Settings:
    run = Path(cfg.run_dir)
    mapping = {"rows": [{"billing_unit": "PRAX1"}]}
    return Hl7Settings.model_validate({
        "moped_url": LOCAL_MOPED_URL,
        "interfaces": [
            {"config": {"name": "kis-tcp", "transport": "tcp", "tcp": {"port": DEFAULT_TCP_PORT},
                        "case_creation": "background", "mapping": mapping},
             "export": {"transport": "file", "directory": str(run / "hl7" / "export")}},
            {"config": {"name": "kis-file", "transport": "file",
                        "file": {"directory": str(run / "hl7" / "in"), "wildcard": "*.hl7",
                                 "archive_directory": str(run / "hl7" / "archive")},
                        "case_creation": "background", "mapping": mapping},
             "export": {"transport": "file", "directory": str(run / "hl7" / "export")}},
        ],
    })


def load_hl7_settings(cfg) -> Hl7Settings:
    path = os.environ.get("AUTOMAT_HL7_CONFIG") or str(Path(cfg.run_dir) / "hl7.yaml")
    p = Path(path)
    if not p.exists():
        return default_settings(cfg)
    data = yaml.safe_load(p.read_text()) or {}
    return Hl7Settings.model_validate(data)
