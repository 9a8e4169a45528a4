"""The load generator: realistic KIM mails (``protocols.kim.generator``) into Dovecot.

* :func:`feed_maildir` (throughput mode) - generates ``n`` mails in the configured mix in
  one process per core and drops them straight into the mailboxes' Maildirs
  (``LocalStack.deliver_maildir``): thousands of mails per second, so the generator is
  never the bottleneck and does not compete with the pipeline (it runs before it starts).
* :class:`RateFeeder` (rate mode) - generates and delivers over IMAP APPEND at an offered
  rate while the pipeline runs (fixed spacing, open loop: a slow pipeline does not slow
  the offered load down).

Every mail is signed under the local stack's trusted TEST-ONLY PKI (``make_pki(0)``; the
faulty ones as the fault says) and carries synthetic personal data only.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from protocols.kim.generator import DEFAULT_FAULTS, DEFAULT_MIX, Fault, MailGenerator, make_pki
from protocols.kim.procedures import Procedure

_ALIASES = {
    "eau": Procedure.EAU_LIEFERUNG, "eau_lieferung": Procedure.EAU_LIEFERUNG, "storno": Procedure.EAU_STORNO,
    "eau_storno": Procedure.EAU_STORNO, "eeb": Procedure.EEB_ANFRAGE, "eeb_anfrage": Procedure.EEB_ANFRAGE,
    "ebz": Procedure.EBZ, "aar": Procedure.AAR, "emailplus": Procedure.EMAILPLUS,
}


def parse_mix(spec: str | None) -> dict[Procedure, float]:
    """``"eAU=80,eEB=8,EBZ=5,AAR=2,eMailPLUS=5"`` (weights, any scale) -> shares."""
    if not spec:
        return dict(DEFAULT_MIX)
    out: dict[Procedure, float] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        name, _, w = part.partition("=")
        key = name.strip().lower().replace("-", "_").replace(";", "_")
        if key not in _ALIASES:
            raise ValueError(f"unknown procedure {name.strip()!r} in --mix (known: eAU, Storno, eEB, EBZ, AAR, eMailPLUS)")
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(f"--mix: weight of {name.strip()!r} is not a number: {w!r}") from None
        if weight < 0:
            raise ValueError(f"--mix: weight of {name.strip()!r} is negative")
        out[_ALIASES[key]] = out.get(_ALIASES[key], 0.0) + weight
    total = sum(out.values())
    if total <= 0:
        raise ValueError("--mix: the weights add up to 0")
    return {p: w / total for p, w in out.items() if w > 0}


@dataclass
class FedMail:
    mail_id: str
    mailbox: str
    procedure: str
    fault: str
    delivered_at: float
    size: int


def _generator(seed: int, oversize_bytes: int) -> MailGenerator:
    return MailGenerator(seed=seed, pki=make_pki(0), oversize_bytes=oversize_bytes)


def _feed_part(cfg, users: list[str], part: int, parts: int, n: int, seed: int, mix: dict, fault_rate: float,
               keep_raw: int, oversize_bytes: int) -> tuple[list[tuple], list[bytes], float]:
    """One generator process: mails ``part, part+parts, ...`` of ``n`` (global index picks
    the mailbox). Returns (rows, raws of global index < keep_raw, cpu seconds)."""
    from actors.kim.mailbox import mail_id_of
    from actors.runtime.crypto import Pseudonymizer
    from deploy.stack import LocalStack

    c0 = time.process_time()
    stack = LocalStack(cfg)
    pseudo = Pseudonymizer.from_file(cfg.crypto.pseudonym_key_file)
    gen = _generator(seed * 1000 + part, oversize_bytes)
    idx = list(range(part, n, parts))
    rows: list[tuple] = []
    raws: list[tuple[int, bytes]] = []
    for i, m in zip(idx, gen.mix(len(idx), weights=mix, fault_rate=fault_rate, faults=DEFAULT_FAULTS)):
        user = users[i % len(users)]
        stack.deliver_maildir(user, m.raw)
        rows.append((i, mail_id_of(pseudo, m.raw), user, m.procedure.value, m.fault.value, time.time(), len(m.raw)))
        if i < keep_raw:
            raws.append((i, m.raw))
    return rows, raws, time.process_time() - c0


def feed_maildir(cfg, users: list[str], n: int, *, seed: int, mix: dict, fault_rate: float, keep_raw: int = 0,
                 processes: int | None = None, oversize_bytes: int = 512 * 1024):
    """Generate and deliver ``n`` mails (Maildir). Returns (mails in index order, raws of
    the first ``keep_raw``, stats)."""
    procs = max(1, min(processes or os.cpu_count() or 1, max(1, n // 200)))
    t0 = time.monotonic()
    if procs == 1:
        parts = [_feed_part(cfg, users, 0, 1, n, seed, mix, fault_rate, keep_raw, oversize_bytes)]
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=procs, mp_context=mp.get_context("fork")) as ex:
            futs = [ex.submit(_feed_part, cfg, users, p, procs, n, seed, mix, fault_rate, keep_raw, oversize_bytes)
                    for p in range(procs)]
            parts = [f.result() for f in futs]
    wall = time.monotonic() - t0
    rows = sorted((r for p in parts for r in p[0]), key=lambda r: r[0])
    raws = [raw for _, raw in sorted((x for p in parts for x in p[1]), key=lambda x: x[0])]
    mails = [FedMail(mail_id=r[1], mailbox=r[2], procedure=r[3], fault=r[4], delivered_at=r[5], size=r[6]) for r in rows]
    cpu = sum(p[2] for p in parts)
    stats = {"mode": "maildir", "mails": n, "processes": procs, "seconds": round(wall, 3),
             "mails_per_s": round(n / wall, 1) if wall else None, "cpu_s": round(cpu, 2),
             "bytes": sum(m.size for m in mails)}
    return mails, raws, stats


class RateFeeder:
    """Offered load over IMAP APPEND: mail ``k`` goes out at ``t0 + k / rate``."""

    def __init__(self, cfg, users: list[str], n: int, rate: float, *, seed: int, mix: dict, fault_rate: float,
                 keep_raw: int = 0, oversize_bytes: int = 512 * 1024) -> None:
        self.cfg, self.users, self.n, self.rate = cfg, users, n, rate
        self.gen = _generator(seed * 1000, oversize_bytes)
        self.mix, self.fault_rate, self.keep_raw = mix, fault_rate, keep_raw
        self.mails: list[FedMail] = []
        self.raws: list[bytes] = []
        self.late = 0  # mails sent more than one interval late (the feeder fell behind)
        self.started = self.finished = 0.0
        self._conns: dict[str, object] = {}

    def _conn(self, user: str):
        c = self._conns.get(user)
        if c is None:
            from imapclient import IMAPClient

            from actors.kim.mailbox import tls_context

            c = IMAPClient(self.cfg.imap.host, port=self.cfg.imap.ssl_port, ssl=True,
                           ssl_context=tls_context(self.cfg), timeout=30)
            c.login(user, f"{user}pw")
            self._conns[user] = c
        return c

    def connect(self) -> None:
        """Log in to every mailbox before the clock starts (else the first mail of each
        mailbox goes out late by a TLS handshake and login)."""
        for user in self.users:
            self._conn(user)

    def _append(self, user: str, raw: bytes) -> float:
        self._conn(user).append("INBOX", raw)
        return time.time()

    async def run(self) -> None:
        from actors.kim.mailbox import mail_id_of
        from actors.runtime.crypto import Pseudonymizer

        pseudo = Pseudonymizer.from_file(self.cfg.crypto.pseudonym_key_file)
        it = self.gen.mix(self.n, weights=self.mix, fault_rate=self.fault_rate, faults=DEFAULT_FAULTS)
        self.started = t0 = time.monotonic()
        interval = 1.0 / self.rate
        for k, m in enumerate(it):
            due = t0 + k * interval
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
            elif now - due > interval:
                self.late += 1
            user = self.users[k % len(self.users)]
            at = await asyncio.to_thread(self._append, user, m.raw)
            self.mails.append(FedMail(mail_id=mail_id_of(pseudo, m.raw), mailbox=user, procedure=m.procedure.value,
                                      fault=m.fault.value, delivered_at=at, size=len(m.raw)))
            if k < self.keep_raw:
                self.raws.append(m.raw)
        self.finished = time.monotonic()

    def close(self) -> None:
        for c in self._conns.values():
            try:
                c.logout()  # type: ignore[attr-defined]
            except Exception:
                pass

    def stats(self) -> dict:
        wall = (self.finished or time.monotonic()) - self.started if self.started else 0.0
        return {"mode": "imap_append", "mails": len(self.mails), "offered_rate": self.rate, "seconds": round(wall, 3),
                "mails_per_s": round(len(self.mails) / wall, 2) if wall else None, "late": self.late,
                "bytes": sum(m.size for m in self.mails)}


def expected_outcome(procedure: str, fault: str) -> str:
    """The terminal status/outcome the spec prescribes (as in the pipeline tests)."""
    answered = procedure in (Procedure.EAU_LIEFERUNG.value, Procedure.EAU_STORNO.value, Procedure.EEB_ANFRAGE.value)
    if fault == Fault.MISSING_DIENSTKENNUNG.value or procedure == Procedure.EMAILPLUS.value:
        return "done/workbasket"
    if fault in (Fault.NONE.value, Fault.DUPLICATE.value):
        return "done/done"
    return "rejected/rejected" if answered else "done/workbasket"
