"""EFA settings (env ``AUTOMAT_EFA_<FIELD>``), separate from the core configuration."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class EfaSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AUTOMAT_EFA_", extra="ignore")

    issuer: str = "automat-efa-idp"
    token_ttl_s: float = 3600.0
    max_document_bytes: int = 10 * 1024 * 1024
    max_submission_bytes: int = 50 * 1024 * 1024
    suspend_grace_s: float = 30 * 86400.0  # suspended -> retired
    archive_after_s: float = 365 * 86400.0  # retired -> archived
    access_log_max: int = 1000  # entries kept in the record (older ones are counted)
    record_hosts: int | None = None
    ingress_replicas: int = 1
