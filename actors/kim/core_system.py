"""The insurer's core system ("APD" in the seed): an external system behind an adapter.

* :class:`CoreSystem` – the adapter interface the KIM domain steps use.
* :class:`SqliteCoreSystem` – the reference implementation: a durable SQLite file
  (WAL, ``synchronous=FULL``) under ``<run_dir>/core/``. ``deposit`` is idempotent by
  a UNIQUE idempotency key: a retried deposit returns the first receipt and never makes
  a second record. It holds personal data (it *is* the insurer's system), which is why
  nothing of it goes into Redis, Kafka or logs.
* :class:`FaultyCoreSystem` – wraps any core system and injects errors, timeouts and
  slowness at configurable rates (seeded), and "lost replies" (the deposit happened, the
  answer did not arrive) to exercise the idempotency key.

All methods are async; reads run in a thread (``asyncio.to_thread``). Writes (deposit,
status change, enrolment) go through a **group commit**: a writer thread runs every write
that is waiting in one transaction (one WAL fsync for all of them) and answers each
caller only after that commit - as durable as one transaction per write, far fewer
fsyncs under load. Several processes (worker pool hosts) may share one file (WAL + busy
timeout).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import random
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel


class CoreSystemError(Exception):
    """A transient fault of the core system (retryable)."""

    code = "core_unavailable"


class CoreSystemTimeout(CoreSystemError):
    code = "core_timeout"


class CoreSystemRejected(Exception):
    """The core system refused the record for good (not retryable)."""

    code = "core_rejected"


class Receipt(BaseModel):
    receipt_id: str
    idempotency_key: str
    kind: str
    status: str
    created: bool  # False: an earlier deposit with this key already existed
    deposited_at: float


class Insured(BaseModel):
    """Master data of an insured person (personal data – stays in the core system / memory)."""

    kvnr_hash: str
    insurer_ik: str
    data: dict[str, Any]  # kvnr, family, given, birth_date, address, coverage_start, ...
    coverage_start: str | None = None  # ISO date
    coverage_end: str | None = None


@runtime_checkable
class CoreSystem(Protocol):
    async def deposit(self, record: dict[str, Any], idempotency_key: str) -> Receipt: ...

    async def lookup_insured(self, kvnr_hash: str) -> Insured | None: ...

    async def enroll(self, insured: Insured) -> None: ...

    async def find_by_document(self, doc_hash: str) -> Receipt | None: ...

    async def set_status(self, idempotency_key: str, status: str) -> Receipt | None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    idempotency_key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    doc_hash TEXT,
    status TEXT NOT NULL,
    record TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS records_doc ON records(doc_hash);
CREATE TABLE IF NOT EXISTS insured (
    kvnr_hash TEXT PRIMARY KEY,
    insurer_ik TEXT NOT NULL,
    data TEXT NOT NULL,
    coverage_start TEXT,
    coverage_end TEXT
);
"""


class SqliteCoreSystem:
    """Reference core system: one SQLite file, idempotent deposits."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=30.0, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=30000")
        with self._lock:
            self._db.executescript(_SCHEMA)
        self._wq: deque = deque()
        self._wq_cv = threading.Condition()
        self._writer: threading.Thread | None = None
        self._closed = False
        self.stats = {"writes": 0, "commits": 0}

    @classmethod
    def for_config(cls, cfg) -> "SqliteCoreSystem":
        path = getattr(getattr(cfg, "kim", None), "core_db", None)
        return cls(Path(path) if path else Path(cfg.run_dir) / "core" / "core.sqlite3")

    def close(self) -> None:
        with self._wq_cv:
            self._closed = True
            self._wq_cv.notify_all()
        if self._writer is not None:
            self._writer.join(timeout=10)
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ group commit
    def _submit(self, fn, *args) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._wq_cv:
            if self._closed:
                raise CoreSystemError("core system is closed")
            self._wq.append((fn, args, fut))
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="core-writer", daemon=True)
                self._writer.start()
            self._wq_cv.notify()
        return fut

    def _write_loop(self) -> None:
        while True:
            with self._wq_cv:
                while not self._wq and not self._closed:
                    self._wq_cv.wait()
                if not self._wq and self._closed:
                    return
                batch = list(self._wq)
                self._wq.clear()
            results: list = []
            try:
                with self._lock:
                    self._db.execute("BEGIN IMMEDIATE")
                    try:
                        for fn, args, _ in batch:
                            try:
                                results.append((True, fn(*args)))
                            except sqlite3.Error as e:  # statement rolled back; the others go on
                                results.append((False, e))
                        self._db.execute("COMMIT")
                    except BaseException:
                        try:
                            self._db.execute("ROLLBACK")
                        except sqlite3.Error:
                            pass
                        raise
                self.stats["writes"] += len(batch)
                self.stats["commits"] += 1
            except Exception as e:  # nothing of the batch is committed: every caller hears it
                for _, _, fut in batch:
                    fut.set_exception(CoreSystemError(f"core system write failed: {type(e).__name__}: {e}"))
                continue
            for (_, _, fut), (ok, val) in zip(batch, results):
                if ok:
                    fut.set_result(val)
                else:
                    fut.set_exception(CoreSystemError(f"core system write failed: {type(val).__name__}: {val}"))

    # ------------------------------------------------------------------ sync core
    def _receipt(self, row, created: bool) -> Receipt:
        rid, key, kind, status, created_at = row
        return Receipt(receipt_id=f"APD-{rid:09d}", idempotency_key=key, kind=kind, status=status, created=created, deposited_at=created_at)

    def deposit_sync(self, record: dict[str, Any], idempotency_key: str) -> Receipt:
        if not idempotency_key:
            raise CoreSystemRejected("a deposit needs an idempotency key")
        kind = str(record.get("kind", "record"))
        doc_hash = record.get("doc_hash")
        now = time.time()
        body = json.dumps(record, sort_keys=True, default=str)
        with self._lock:
            return self._deposit_tx(idempotency_key, kind, doc_hash, record, body, now)

    def _deposit_tx(self, idempotency_key, kind, doc_hash, record, body, now) -> Receipt:
        cur = self._db.execute(
            "INSERT OR IGNORE INTO records(idempotency_key, kind, doc_hash, status, record, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (idempotency_key, kind, doc_hash, str(record.get("status", "received")), body, now, now),
        )
        created = cur.rowcount == 1
        row = self._db.execute(
            "SELECT id, idempotency_key, kind, status, created_at FROM records WHERE idempotency_key = ?", (idempotency_key,)
        ).fetchone()
        return self._receipt(row, created)

    def set_status_sync(self, idempotency_key: str, status: str) -> Receipt | None:
        with self._lock:
            return self._set_status_tx(idempotency_key, status)

    def _set_status_tx(self, idempotency_key: str, status: str) -> Receipt | None:
        self._db.execute(
            "UPDATE records SET status = ?, updated_at = ? WHERE idempotency_key = ?", (status, time.time(), idempotency_key)
        )
        row = self._db.execute(
            "SELECT id, idempotency_key, kind, status, created_at FROM records WHERE idempotency_key = ?", (idempotency_key,)
        ).fetchone()
        return self._receipt(row, False) if row else None

    def find_by_document_sync(self, doc_hash: str, kind: str | None = None) -> Receipt | None:
        q = "SELECT id, idempotency_key, kind, status, created_at FROM records WHERE doc_hash = ?"
        args: tuple = (doc_hash,)
        if kind:
            q += " AND kind = ?"
            args += (kind,)
        with self._lock:
            row = self._db.execute(q + " ORDER BY id LIMIT 1", args).fetchone()
        return self._receipt(row, False) if row else None

    def lookup_insured_sync(self, kvnr_hash: str) -> Insured | None:
        with self._lock:
            row = self._db.execute(
                "SELECT kvnr_hash, insurer_ik, data, coverage_start, coverage_end FROM insured WHERE kvnr_hash = ?", (kvnr_hash,)
            ).fetchone()
        if not row:
            return None
        return Insured(kvnr_hash=row[0], insurer_ik=row[1], data=json.loads(row[2]), coverage_start=row[3], coverage_end=row[4])

    def enroll_sync(self, insured: Insured) -> None:
        with self._lock:
            self._enroll_tx(insured)

    def _enroll_tx(self, insured: Insured) -> None:
        self._db.execute(
            "INSERT INTO insured(kvnr_hash, insurer_ik, data, coverage_start, coverage_end) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(kvnr_hash) DO NOTHING",
            (insured.kvnr_hash, insured.insurer_ik, json.dumps(insured.data, default=str), insured.coverage_start, insured.coverage_end),
        )

    # ------------------------------------------------------------------ async API
    async def deposit(self, record: dict[str, Any], idempotency_key: str) -> Receipt:
        if not idempotency_key:
            raise CoreSystemRejected("a deposit needs an idempotency key")
        body = json.dumps(record, sort_keys=True, default=str)
        return await asyncio.wrap_future(self._submit(
            self._deposit_tx, idempotency_key, str(record.get("kind", "record")), record.get("doc_hash"), record, body,
            time.time()))

    async def set_status(self, idempotency_key: str, status: str) -> Receipt | None:
        return await asyncio.wrap_future(self._submit(self._set_status_tx, idempotency_key, status))

    async def find_by_document(self, doc_hash: str, kind: str | None = None) -> Receipt | None:
        return await asyncio.to_thread(self.find_by_document_sync, doc_hash, kind)

    async def lookup_insured(self, kvnr_hash: str) -> Insured | None:
        return await asyncio.to_thread(self.lookup_insured_sync, kvnr_hash)

    async def enroll(self, insured: Insured) -> None:
        await asyncio.wrap_future(self._submit(self._enroll_tx, insured))

    # ------------------------------------------------------------------ inspection (tests, bench ledger)
    def count(self, kind: str | None = None) -> int:
        with self._lock:
            if kind:
                return self._db.execute("SELECT COUNT(*) FROM records WHERE kind = ?", (kind,)).fetchone()[0]
            return self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0]

    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        q = "SELECT id, idempotency_key, kind, status, record FROM records"
        args: tuple = ()
        if kind:
            q += " WHERE kind = ?"
            args = (kind,)
        with self._lock:
            rows = self._db.execute(q + " ORDER BY id", args).fetchall()
        return [
            {"receipt_id": f"APD-{r[0]:09d}", "idempotency_key": r[1], "kind": r[2], "status": r[3], "record": json.loads(r[4])}
            for r in rows
        ]


class FaultyCoreSystem:
    """Fault injection around a core system (tests, chaos, benchmark of retries).

    Per call, with the given probabilities (seeded ``random.Random``): ``error_rate`` –
    raise :class:`CoreSystemError` before doing anything; ``timeout_rate`` – wait
    ``timeout_s`` then raise :class:`CoreSystemTimeout` (nothing done); ``lost_reply_rate``
    – do the deposit, then raise :class:`CoreSystemTimeout` (the caller must retry with
    the same key); ``slow_rate`` – add ``slow_s`` of latency.
    """

    def __init__(
        self,
        inner: CoreSystem,
        *,
        error_rate: float = 0.0,
        timeout_rate: float = 0.0,
        lost_reply_rate: float = 0.0,
        slow_rate: float = 0.0,
        slow_s: float = 0.05,
        timeout_s: float = 0.05,
        seed: int = 0,
    ):
        self.inner = inner
        self.error_rate = error_rate
        self.timeout_rate = timeout_rate
        self.lost_reply_rate = lost_reply_rate
        self.slow_rate = slow_rate
        self.slow_s = slow_s
        self.timeout_s = timeout_s
        self.rng = random.Random(seed)
        self.injected: dict[str, int] = {"error": 0, "timeout": 0, "lost_reply": 0, "slow": 0}

    async def _before(self) -> None:
        r = self.rng.random()
        if r < self.error_rate:
            self.injected["error"] += 1
            raise CoreSystemError("core system unavailable (injected)")
        r -= self.error_rate
        if r < self.timeout_rate:
            self.injected["timeout"] += 1
            await asyncio.sleep(self.timeout_s)
            raise CoreSystemTimeout("core system timed out (injected)")
        if self.rng.random() < self.slow_rate:
            self.injected["slow"] += 1
            await asyncio.sleep(self.slow_s)

    async def deposit(self, record: dict[str, Any], idempotency_key: str) -> Receipt:
        await self._before()
        receipt = await self.inner.deposit(record, idempotency_key)
        if self.rng.random() < self.lost_reply_rate:
            self.injected["lost_reply"] += 1
            raise CoreSystemTimeout("core system reply lost after the deposit (injected)")
        return receipt

    async def set_status(self, idempotency_key: str, status: str) -> Receipt | None:
        await self._before()
        return await self.inner.set_status(idempotency_key, status)

    async def find_by_document(self, doc_hash: str, kind: str | None = None) -> Receipt | None:
        await self._before()
        return await self.inner.find_by_document(doc_hash, kind)

    async def lookup_insured(self, kvnr_hash: str) -> Insured | None:
        await self._before()
        return await self.inner.lookup_insured(kvnr_hash)

    async def enroll(self, insured: Insured) -> None:
        await self.inner.enroll(insured)

    def count(self, kind: str | None = None) -> int:
        return self.inner.count(kind)  # type: ignore[attr-defined]

    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        return self.inner.records(kind)  # type: ignore[attr-defined]
