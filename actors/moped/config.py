"""MOPED settings (env ``AUTOMAT_MOPED_<FIELD>``; ``tokens`` as JSON).

Kept here rather than in ``AutomatConfig`` (owned by the runtime) until a ``moped``
section is added there.
"""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocols.moped.messages import Caller

#: bearer tokens of the local stack only (``local_stack: true``); production lists its own
DEV_TOKENS = {
    "dev-kh": Caller(device="Device/XDokV5", organization="Organization/KHK999", role="KH"),
    "dev-sv": Caller(device="Device/SV11-gateway", organization="Organization/SV11", role="SV"),
    "dev-lgf": Caller(device="Device/LGF-gateway", organization="Organization/LGF9", role="LGF"),
}


class MopedConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AUTOMAT_MOPED_", env_nested_delimiter="__", extra="forbid")

    conflict_status: int = 409  # stale {vid}: HAPI answers 409, FHIR If-Match 412
    max_body_bytes: int = Field(2_000_000, ge=1024)
    custodian: str = "Organization/moped-server"
    hosts: int | None = Field(None, ge=1, le=256)
    tokens: dict[str, Caller] = Field(default_factory=dict)
    dev_tokens: bool | None = None  # None: on when the configuration runs the local stack
    replicas: int = Field(1, ge=1, le=64)  # HTTP ingress replicas

    @field_validator("conflict_status")
    @classmethod
    def _409_or_412(cls, v: int) -> int:
        if v not in (409, 412):
            raise ValueError("conflict_status must be 409 or 412")
        return v

    def callers(self, cfg) -> dict[str, Caller]:
        use_dev = self.dev_tokens if self.dev_tokens is not None else bool(getattr(cfg, "local_stack", False))
        return ({**DEV_TOKENS} if use_dev else {}) | self.tokens


class Ports:
    """Injected into each Composition entity host."""

    def __init__(self, custodian: str) -> None:
        self.custodian = custodian


def make_ports(cfg) -> Ports:
    return Ports(MopedConfig().custodian)
