"""One validated configuration model for every part of automat.

Sources, later ones win: built-in defaults (the embedded local stack on 127.0.0.1),
a YAML/JSON file (``AUTOMAT_CONFIG`` or ``--config``), environment variables
``AUTOMAT_<SECTION>__<FIELD>`` (e.g. ``AUTOMAT_REDIS__URL``,
``AUTOMAT_KAFKA__BOOTSTRAP_SERVERS``). A production deployment points the sections at
its real Redis, Kafka cluster and IMAP servers; secrets come from the environment or
from files (``*_file`` fields), never from the repository.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


def default_run_dir() -> Path:
    return Path(os.environ.get("AUTOMAT_RUN_DIR", Path.cwd() / ".run")).resolve()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RedisConfig(_Section):
    url: str = "redis://127.0.0.1:16379/0"
    password_file: Path | None = None

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v


class KafkaConfig(_Section):
    bootstrap_servers: str = "127.0.0.1:19092"
    topic_prefix: str = "automat."
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password_file: Path | None = None


class ImapConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(1143, ge=1, le=65535)
    ssl_port: int = Field(1993, ge=1, le=65535)
    use_ssl: bool = True
    ca_file: Path | None = None  # None -> the local stack's self-signed cert
    poll_interval_s: float = Field(2.0, gt=0)


class SmtpConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8025, ge=1, le=65535)
    sender: str = "annahme@kasse.kim.telematik"


class CryptoConfig(_Section):
    """AES-256-GCM keys: a file of ``{"active": kid, "keys": {kid: base64}}``."""

    keys_file: Path | None = None  # None -> <run_dir>/secrets/keys.json (made by the stack)
    pseudonym_key_file: Path | None = None  # HMAC key for pseudonymous ids


class BlobConfig(_Section):
    dir: Path | None = None  # None -> <run_dir>/blobs


class RuntimeConfig(_Section):
    namespace: str = "automat"
    num_shards: int = Field(64, ge=1, le=4096)
    hosts_per_kind: int = Field(2, ge=1, le=256)
    # a busy lane's batch window: all of it from batch_full_rate messages/s, less below
    # (actors.runtime.router.BatchWindow; 2 ms fixed until 2026-11-24: 25 % less throughput)
    batch_window_ms: float = Field(50.0, ge=0, le=1000)
    batch_full_rate: float = Field(50.0, gt=0, le=1_000_000)
    batch_max: int = Field(500, ge=1, le=100_000)
    # a shard host's garbage collector (actors.runtime.gcstats.tune), applied after warm-up:
    # freeze what start-up left alive; the first generation's threshold (None: Python's 700)
    gc_freeze: bool = False
    gc_threshold0: int | None = Field(None, ge=100, le=10_000_000)
    max_inflight_batches: int = Field(8, ge=1, le=1024)
    order_wait_s: float = Field(2.0, gt=0, le=60)  # an early batch waits this long for its predecessors
    passivate_after_s: float = Field(300.0, gt=0)
    timer_poll_ms: float = Field(200.0, gt=0)
    handler_retries: int = Field(2, ge=0, le=100)
    ask_timeout_s: float = Field(30.0, gt=0)
    shardmap_poll_s: float = Field(1.0, gt=0)  # hosts check their kind's shard map version
    handover_drain_s: float = Field(60.0, gt=0)  # a moved shard's entities get this long to finish
    host_num_cpus: float | None = Field(None, ge=0)  # CPUs per shard host actor (None: the kind's)
    host_scheduling: Literal["DEFAULT", "SPREAD"] = "DEFAULT"  # SPREAD: hosts over the nodes
    # Ray task events (the dashboard's per-call task list) for the shard hosts' calls: off -
    # thousands of batch calls a second, each reported to the GCS, cost CPU in every process
    # and GCS memory and tell an operator nothing the hosts' metrics do not (Ray Serve turns
    # them off for its replicas for the same reason). The actors themselves still show.
    host_task_events: bool = False
    control_resource: str | None = None  # a resource only the head has: supervisors etc. stay there


class KimMailbox(_Section):
    """One KIM address (IMAP account). Password inline (local stack) or from a file."""

    user: str
    password: str | None = None
    password_file: Path | None = None

    def secret(self) -> str:
        if self.password_file is not None:
            return Path(self.password_file).read_text().strip()
        return self.password if self.password is not None else f"{self.user}pw"


class KimConfig(_Section):
    """The KIM pipeline: mailboxes, fetchers, pools, retries."""

    mailboxes: list[KimMailbox] = Field(
        default_factory=lambda: [KimMailbox(user=f"kasse{i:02d}") for i in range(1, 21)]
    )
    fetchers: int = Field(2, ge=1, le=64)  # mailbox actors kim.mailboxes.N (share the mailboxes)
    slip_hosts: int = Field(2, ge=1, le=256)
    worker_hosts: int = Field(2, ge=1, le=256)  # the step worker pool size
    done_folder: str = "Verarbeitet"
    fetch_batch: int = Field(100, ge=1, le=5000)
    idle_timeout_s: float = Field(10.0, gt=0)
    # hot pick-up: NOOP-poll a mailbox that had mail within pickup_hot_s every pickup_poll_ms
    # instead of IDLE (Dovecot notifies an IDLE client 500 ms late); 0 = IDLE only
    pickup_poll_ms: float = Field(0.0, ge=0)
    pickup_hot_s: float = Field(30.0, gt=0)
    step_timeout_s: float = Field(60.0, gt=0)  # watchdog: re-dispatch a step not answered
    retry_base_s: float = Field(1.0, ge=0)
    retry_max_s: float = Field(300.0, ge=0)
    default_attempts: int = Field(5, ge=1, le=100)
    # steps per dispatch: consecutive side-effect-free steps run fused in one worker call,
    # each still recorded in the slip's history with its own timing (1 = one per dispatch)
    # 48 (32 until 2026-11-24): an eAU's first segment, duplicate claims included, is 36 steps
    fuse_max: int = Field(48, ge=1, le=256)
    core_db: Path | None = None  # the reference core system's SQLite file (None -> <run_dir>/core/core.sqlite3)
    # admission control: mails received but not yet terminal, over all mailbox actors (0 = no
    # limit); beyond it new mails wait in their INBOX (the backlog stays visible in IMAP)
    max_in_flight: int = Field(500, ge=0)
    # a worker process keeps raw and parsed mails between a mail's segments (step cache,
    # actors.kim.steps._base._Lru): ~0.35 MB a mail, so 128 MiB hold ~380 mails
    parse_cache_mb: float = Field(128.0, ge=1, le=65536)


class PoolPolicy(_Section):
    """Autoscaling of one kind's shard hosts (a step pool or a stateshifter)."""

    kind: str  # entity kind, e.g. kim.worker
    supervisor: str  # logical name of the supervisor that owns its hosts, e.g. kim
    # None: the kind's configured host count (e.g. kim.worker_hosts) - the autoscaler grows
    # above it for a burst and shrinks back to it, not below (a shrink hands shards over:
    # a pause the pool's configured size should not pay at a steady, light load)
    min_hosts: int | None = Field(None, ge=1, le=256)
    max_hosts: int = Field(8, ge=1, le=256)
    up_backlog: float = Field(50.0, gt=0)  # messages in flight per host above which it grows
    down_backlog: float = Field(5.0, ge=0)  # ... below which (and latency low) it may shrink
    up_latency_ms: float = Field(2000.0, gt=0)  # worst host's p95 batch latency above which it grows
    down_latency_ms: float = Field(250.0, ge=0)
    up_after_s: float = Field(2.0, ge=0)  # hysteresis: the condition must hold this long
    down_after_s: float = Field(20.0, ge=0)
    cooldown_s: float = Field(5.0, ge=0)  # after any change, before the next one
    step: int = Field(1, ge=1, le=64)  # at least this many hosts per grow (more when the backlog asks)
    # no growth while every node of the pool is this busy (CPU share, smoothed): another
    # host there adds processes, not CPU - the autoscaler asks Ray for a node instead.
    # 1.0 turns the guard off.
    grow_max_node_busy: float = Field(0.9, gt=0, le=1.0)

    @model_validator(mode="after")
    def _bounds(self) -> "PoolPolicy":
        if self.min_hosts is not None and self.min_hosts > self.max_hosts:
            raise ValueError(f"min_hosts ({self.min_hosts}) must be <= max_hosts ({self.max_hosts})")
        if self.down_backlog >= self.up_backlog:
            raise ValueError("down_backlog must be below up_backlog (hysteresis)")
        return self


def _default_pools() -> list[PoolPolicy]:
    return [
        PoolPolicy(kind="kim.worker", supervisor="kim", max_hosts=8),
        PoolPolicy(kind="kim.slip", supervisor="kim", max_hosts=4, up_backlog=500.0,
                   down_backlog=20.0),
    ]


class AutoscaleConfig(_Section):
    """The app-level autoscaler (``actors.runtime.autoscaler``, in the ``infra`` subtree)."""

    enabled: bool = True
    interval_s: float = Field(1.0, gt=0)
    request_resources: bool = True  # ask Ray's autoscaler for nodes when a new host does not fit
    pools: list[PoolPolicy] = Field(default_factory=_default_pools)


class AutomatConfig(BaseSettings):
    """The whole configuration. ``load_config()`` builds it; errors name the field."""

    model_config = SettingsConfigDict(
        env_prefix="AUTOMAT_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    run_dir: Path = Field(default_factory=default_run_dir)
    redis: RedisConfig = RedisConfig()
    kafka: KafkaConfig = KafkaConfig()
    imap: ImapConfig = ImapConfig()
    smtp: SmtpConfig = SmtpConfig()
    crypto: CryptoConfig = CryptoConfig()
    blob: BlobConfig = BlobConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    kim: KimConfig = KimConfig()
    autoscale: AutoscaleConfig = AutoscaleConfig()
    local_stack: bool = True  # False in production: never start services ourselves

    @model_validator(mode="after")
    def _fill_paths(self) -> "AutomatConfig":
        self.run_dir = Path(self.run_dir).resolve()
        if self.crypto.keys_file is None:
            self.crypto.keys_file = self.run_dir / "secrets" / "keys.json"
        if self.crypto.pseudonym_key_file is None:
            self.crypto.pseudonym_key_file = self.run_dir / "secrets" / "pseudonym.key"
        if self.blob.dir is None:
            self.blob.dir = self.run_dir / "blobs"
        if self.imap.ca_file is None:
            self.imap.ca_file = self.run_dir / "imap" / "tls" / "cert.pem"
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # environment beats the file (init kwargs carry the file's values)
        return (env_settings, init_settings, file_secret_settings)


class ConfigError(Exception):
    """Invalid configuration; the message names each offending field."""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid automat configuration ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        env = "AUTOMAT_" + "__".join(str(p).upper() for p in e["loc"])
        lines.append(f"  - {loc}: {e['msg']} (got {e.get('input')!r}; env {env})")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, **overrides: Any) -> AutomatConfig:
    """Load defaults + file + environment (+ explicit overrides). Raises ConfigError."""
    path = path or os.environ.get("AUTOMAT_CONFIG")
    data: dict[str, Any] = {}
    source = "defaults + environment"
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"configuration file {p} does not exist")
        text = p.read_text()
        try:
            loaded = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as e:
            raise ConfigError(f"configuration file {p} is not valid YAML/JSON: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"configuration file {p} must hold a mapping at the top")
        data = loaded or {}
        source = f"{p} + environment"
    data.update(overrides)
    try:
        return AutomatConfig(**data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
