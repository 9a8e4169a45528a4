"""Side-effect ports of the KIM step workers (built once per worker process).

``await make_ports(cfg)`` gives the real ports: encrypted blob store, key ring and
pseudonymizer (files from ``cfg.crypto``), the trust store, the reference core system
(SQLite under ``<run_dir>/core/``), the SMTP sender (``cfg.smtp``) with Redis markers,
the Redis duplicate index and the reference data. :func:`make_memory_ports` builds the
same with in-memory duplicate index and mail sender (unit tests, inline floor).

Reference data (:func:`reference_from_env`): the insurer's IKs, own KIM addresses, size
limit. Trust store: the CA files named in ``AUTOMAT_KIM_CA_FILES`` (``os.pathsep``-separated
PEM files) plus – only with ``cfg.local_stack`` (test environments) – the TEST-ONLY CAs
of :func:`protocols.kim.generator.make_pki` for the seeds in ``AUTOMAT_KIM_TEST_PKI_SEEDS``
(default ``0-9``). The insurer's signing identity for eEB Bescheinigungen is the test
PKI's insurer signer (local stack only; production would configure an HSM-backed signer
– not implemented).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from actors.kim.core_system import CoreSystem, SqliteCoreSystem
from actors.kim.smtp import MailSender, MemoryMailSender, SmtpMailSender
from actors.runtime.blobs import BlobStore
from actors.runtime.crypto import KeyFileError, KeyRing, Pseudonymizer
from protocols.kim.pkcs7 import Signer, TrustStore

DUP_PREFIX = "kim:dup:"

#: KV-Bezirke (first two digits of a BSNR).
KV_REGIONS = frozenset(
    {"01", "02", "03", "17", "20", "38", "46", "47", "48", "49", "51", "52", "60", "61", "62", "71", "72", "73", "78", "83", "88", "93", "98"}
)

#: IKs of the synthetic insurers of ``protocols.kim.generator`` (the local test insurer group).
TEST_INSURER_IKS = frozenset({"101575519", "104212059", "108310400", "109519005", "102114819", "105830016"})


class DuplicateIndex(Protocol):
    async def claim(self, kind: str, key_hash: str, mail_id: str) -> str:
        """Claim ``key_hash`` for ``mail_id``; returns the mail id that owns it (this one
        if it was free or already ours: a re-run is not a duplicate of itself)."""
        ...


class RedisDuplicateIndex:
    """``SET kim:dup:<kind>:<hash> <mail_id> NX`` – keys are pseudonymous hashes only."""

    def __init__(self, redis, prefix: str = DUP_PREFIX, ttl_s: int | None = 400 * 86400):
        self.redis = redis
        self.prefix = prefix
        self.ttl_s = ttl_s

    async def claim(self, kind: str, key_hash: str, mail_id: str) -> str:
        key = f"{self.prefix}{kind}:{key_hash}"
        ok = await self.redis.set(key, mail_id, nx=True, ex=self.ttl_s)
        if ok:
            return mail_id
        owner = await self.redis.get(key)
        if owner is None:  # expired between SET and GET: try once more
            await self.redis.set(key, mail_id, nx=True, ex=self.ttl_s)
            owner = await self.redis.get(key)
        return owner.decode() if isinstance(owner, bytes) else str(owner)


class MemoryDuplicateIndex:
    def __init__(self) -> None:
        self.owners: dict[tuple[str, str], str] = {}

    async def claim(self, kind: str, key_hash: str, mail_id: str) -> str:
        return self.owners.setdefault((kind, key_hash), mail_id)


@dataclass
class ReferenceData:
    """Control reference data of the insurer (no personal data)."""

    insurer_iks: frozenset[str] = TEST_INSURER_IKS
    own_addresses: frozenset[str] = frozenset()  # the insurer's KIM addresses ("" = any KIM address)
    kim_domain_suffixes: tuple[str, ...] = (".kim.telematik", ".kim.telematik-test")
    kv_regions: frozenset[str] = KV_REGIONS
    max_mail_bytes: int = 25 * 1024 * 1024
    max_au_days: int = 366  # an AU period longer than this is a finding
    signing_time_skew_s: float = 600.0  # clock skew allowed for a signing time after receipt
    auto_enroll_unknown: bool = False  # TEST ONLY: unknown insured become insured at the addressed IK
    insurer_name: str = "Testkasse"


@dataclass
class KimPorts:
    blobs: BlobStore
    keyring: KeyRing
    pseudonymizer: Pseudonymizer
    trust: TrustStore
    core: CoreSystem
    mail: MailSender
    dupes: DuplicateIndex
    reference: ReferenceData = field(default_factory=ReferenceData)
    insurer_signer: Signer | None = None
    sender_address: str = "annahme@kasse.kim.telematik"
    clock: Callable[[], float] = time.time
    redis: Any = None
    _barrier: Any = field(default=None, init=False, repr=False)

    def pseudonym(self, value: str, domain: str) -> str:
        return self.pseudonymizer.pseudonym(value, domain)

    async def warm(self) -> None:
        """The worker host's warm-up (``ShardHost._warm``): the step code imported, the
        road maps loaded and a Redis connection open before the first order comes."""
        from actors.kim.steps import roadmap_versions

        roadmap_versions()
        if self.redis is not None:
            await self.redis.ping()

    async def durable(self) -> None:
        """Group commit of the blob store for this process: every blob written before
        this call is durable when it returns. Concurrent callers (the orders a worker runs
        at once) share one file-system barrier, run in a thread."""
        token = self.blobs.last_write
        while not self.blobs.is_durable(token):
            if self._barrier is None or self._barrier.done():
                self._barrier = asyncio.ensure_future(asyncio.to_thread(self.blobs.sync))
            await asyncio.shield(self._barrier)


def _seeds(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def build_trust_store(local_stack: bool, *, ca_files: str | None = None, test_seeds: str | None = None) -> TrustStore:
    store = TrustStore()
    files = ca_files if ca_files is not None else os.environ.get("AUTOMAT_KIM_CA_FILES", "")
    for f in files.split(os.pathsep):
        if f.strip():
            for cert in TrustStore.from_pem(Path(f.strip()).read_bytes()).anchors:
                store.add(cert)
    if local_stack:
        from protocols.kim.generator import make_pki

        for seed in _seeds(test_seeds if test_seeds is not None else os.environ.get("AUTOMAT_KIM_TEST_PKI_SEEDS", "0-9")):
            store.add(make_pki(seed).ca_cert)
    return store


def reference_from_env(*, local_stack: bool) -> ReferenceData:
    """Reference data; ``AUTOMAT_KIM_INSURER_IKS`` / ``AUTOMAT_KIM_OWN_ADDRESSES`` (comma
    lists) and ``AUTOMAT_KIM_MAX_MAIL_BYTES`` override the defaults. Unknown insured are
    auto-enrolled only on the local (test) stack."""
    ref = ReferenceData(auto_enroll_unknown=local_stack)
    iks = os.environ.get("AUTOMAT_KIM_INSURER_IKS")
    if iks:
        ref.insurer_iks = frozenset(x.strip() for x in iks.split(",") if x.strip())
    own = os.environ.get("AUTOMAT_KIM_OWN_ADDRESSES")
    if own:
        ref.own_addresses = frozenset(x.strip().lower() for x in own.split(",") if x.strip())
    mx = os.environ.get("AUTOMAT_KIM_MAX_MAIL_BYTES")
    if mx:
        ref.max_mail_bytes = int(mx)
    return ref


def core_from_env(core: CoreSystem, spec: str | None = None) -> CoreSystem:
    """Wrap ``core`` in a :class:`FaultyCoreSystem` when ``AUTOMAT_KIM_CORE_FAULTS`` is set,
    e.g. ``error=0.05,timeout=0.01,lost_reply=0.02,slow=0.1,slow_s=0.2,seed=1`` (chaos runs)."""
    spec = spec if spec is not None else os.environ.get("AUTOMAT_KIM_CORE_FAULTS", "")
    if not spec.strip():
        return core
    if spec.strip().startswith("file:"):  # live-switchable faults (chaos runs): actors/kim/core_faults.py
        from actors.kim.core_faults import ControlledFaults

        return ControlledFaults(core, spec.strip()[5:])
    from actors.kim.core_system import FaultyCoreSystem

    names = {"error": "error_rate", "timeout": "timeout_rate", "lost_reply": "lost_reply_rate", "slow": "slow_rate",
             "slow_s": "slow_s", "timeout_s": "timeout_s", "seed": "seed"}
    kw: dict[str, Any] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        k, _, v = part.partition("=")
        k = k.strip()
        if k not in names:
            raise ValueError(f"AUTOMAT_KIM_CORE_FAULTS: unknown key {k!r} (known: {', '.join(names)})")
        kw[names[k]] = int(v) if k == "seed" else float(v)
    return FaultyCoreSystem(core, **kw)


def _keyring(cfg) -> KeyRing:
    path = Path(cfg.crypto.keys_file)
    if not path.exists() and cfg.local_stack:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            KeyRing.create_file(path)
        except KeyFileError:
            pass  # another process made it first
    return KeyRing.from_file(path)


def _pseudonymizer(cfg) -> Pseudonymizer:
    path = Path(cfg.crypto.pseudonym_key_file)
    if not path.exists() and cfg.local_stack:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            Pseudonymizer.create_file(path)
        except KeyFileError:
            pass
    return Pseudonymizer.from_file(path)


async def make_ports(cfg, *, core: CoreSystem | None = None, redis=None, reference: ReferenceData | None = None) -> KimPorts:
    """The real ports for one worker process (the pool host calls this once)."""
    import redis.asyncio as aioredis

    from actors.kim.steps._base import CACHE

    CACHE.resize(int(cfg.kim.parse_cache_mb * 1024 * 1024))
    keyring = _keyring(cfg)
    r = redis or aioredis.Redis.from_url(cfg.redis.url)
    signer = None
    if cfg.local_stack:
        from protocols.kim.generator import make_pki

        signer = make_pki(0).insurer_signer
    ref = reference or reference_from_env(local_stack=bool(cfg.local_stack))
    return KimPorts(
        blobs=BlobStore(cfg.blob.dir, keyring),
        keyring=keyring,
        pseudonymizer=_pseudonymizer(cfg),
        trust=build_trust_store(cfg.local_stack),
        core=core or core_from_env(SqliteCoreSystem.for_config(cfg)),
        mail=SmtpMailSender.for_config(cfg, r),
        dupes=RedisDuplicateIndex(r),
        reference=ref,
        insurer_signer=signer,
        sender_address=cfg.smtp.sender,
        redis=r,
    )


def make_memory_ports(
    root: str | Path,
    *,
    trust: TrustStore | None = None,
    core: CoreSystem | None = None,
    reference: ReferenceData | None = None,
    test_seeds: str = "0-9",
) -> KimPorts:
    """Ports without services: blobs + SQLite core under ``root``, in-memory duplicate
    index and mail sender (unit tests, the inline floor of the benchmark)."""
    from protocols.kim.generator import make_pki

    root = Path(root)
    keyring = KeyRing.generate()
    return KimPorts(
        blobs=BlobStore(root / "blobs", keyring),
        keyring=keyring,
        pseudonymizer=Pseudonymizer(os.urandom(32)),
        trust=trust or build_trust_store(True, ca_files="", test_seeds=test_seeds),
        core=core or SqliteCoreSystem(root / "core" / "core.sqlite3"),
        mail=MemoryMailSender(),
        dupes=MemoryDuplicateIndex(),
        reference=reference or ReferenceData(auto_enroll_unknown=True),
        insurer_signer=make_pki(0).insurer_signer,
    )
