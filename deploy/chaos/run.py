"""``automat chaos``: KIM under load while actors, services and the core system fail.

1. A chaos stack (own run dir and ports, see :mod:`deploy.chaos.stack`) and an own local
   Ray come up; the root tree is the outbox relay, the ``kim`` subtree and the shard hosts
   of every other capability (efa, moped, hl7, tss: one host per kind).
2. **Load (rate mode)**: ``--mails N`` generated KIM mails (every procedure and bad-mail
   type once, then the benchmark mix with 10 % bad mails) are dropped into the IMAP
   INBOXes at ``N / --duration`` mails per second.
3. **Faults**: one after the other, at random moments, every kind of
   :mod:`deploy.chaos.faults` in turn (SIGKILLed actors of every kind, crashed and
   restarted Redis / Kafka / Dovecot, dropped IMAP connections, a failing, hanging or slow
   core system); each fault's recovery time is measured. A few core deposits lose their
   reply all the time (idempotency keys must hold).
4. **Checks** when every mail is terminal (or the settle time is over): the ledger (every
   delivered mail in exactly one terminal state, nothing in flight, INBOX empty, each mail
   moved once), the core system (each mail deposited at most once; every valid eAU once
   per duplicate group), Kafka (every mail's ``mail.received`` and terminal event there,
   exactly one distinct event id each; redeliveries of the same id are deduped), the
   outbox drained, and no personal data in plain form in Redis, Kafka, logs or blobs.
5. A report: faults by kind with recovery p50/p99/max, lost (must be 0), duplicates
   (must be 0); JSON in ``<run_dir>/report.json``. Exit code 1 if anything failed.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import sqlite3
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from rich.console import Console
from rich.table import Table

from actors.runtime.config import AutomatConfig
from deploy.chaos.faults import (
    ALL_KINDS,
    CORE_BACKGROUND,
    FaultRecord,
    Injector,
    Probe,
    plan,
    summarize,
)
from deploy.chaos.pii import Needles, scan_files, scan_redis
from deploy.chaos.stack import DEFAULT_PORT_BASE, ChaosStack, chaos_config, worker_env

ROOT = "chaos.root"
MARKER = ".automat-chaos"
TERMINAL = ("done", "rejected", "parked")
#: error codes of the infrastructure (retried): never the reason a mail is rejected
TRANSIENT_CODES = frozenset({"redis_unavailable", "io_error", "core_unavailable", "core_timeout", "step_timeout",
                             "internal_error", "transient", "blob_missing", "blob_integrity", "smtp_unavailable",
                             "step_crashed"})
TERMINAL_EVENTS = {"done": "mail.done", "rejected": "mail.rejected", "parked": "mail.parked"}


class ChaosOptions(BaseModel):
    mails: int = Field(2000, ge=1)
    duration_s: float = Field(300.0, gt=0)  # load phase: rate = mails / duration_s
    faults: int | None = None  # default: max(#kinds, duration_s / 12)
    kinds: list[str] = Field(default_factory=lambda: list(ALL_KINDS))
    seed: int | None = None
    run_dir: Path | None = None
    port_base: int = DEFAULT_PORT_BASE
    mailboxes: int = 8
    fetchers: int = 2
    slip_hosts: int = 2
    worker_hosts: int = 2
    step_timeout_s: float = 60.0  # the watchdog (kim.step_timeout_s default); shorter parks slips under backlog
    hang_s: float = 20.0  # a hanging core call returns a timeout after this long
    settle_s: float = 900.0  # after the load: how long to wait for every mail to be terminal
    recovery_limit_s: float = 240.0
    episode_s: tuple[float, float] = (3.0, 8.0)
    keep: bool = False  # leave the stack running afterwards
    fault_rate: float = 0.1
    #: the load goes on (same rate, up to this many times ``mails`` more) until every planned
    #: fault was injected: faults always hit a system under load
    max_extra: float = 2.0


class ChaosReport(BaseModel):
    ok: bool = False
    seed: int = 0
    run_dir: str = ""
    mails: int = 0
    distinct_mails: int = 0
    offered_rate: float = 0.0
    load_s: float = 0.0
    total_s: float = 0.0
    throughput: float = 0.0  # terminal mails / s from first delivery to last terminal
    ledger: dict[str, Any] = Field(default_factory=dict)
    lost: int = 0
    duplicates: int = 0
    lost_detail: dict[str, int] = Field(default_factory=dict)
    duplicate_detail: dict[str, int] = Field(default_factory=dict)
    wrong_outcome: int = 0  # valid mails rejected or parked
    checks: dict[str, Any] = Field(default_factory=dict)
    faults: list[FaultRecord] = Field(default_factory=list)
    fault_summary: dict[str, dict[str, Any]] = Field(default_factory=dict)
    pii: dict[str, Any] = Field(default_factory=dict)
    problems: list[str] = Field(default_factory=list)


# --------------------------------------------------------------------------- mails
class MailMeta(BaseModel):
    mail_id: str
    procedure: str
    fault: str
    message_id: str
    duplicate_of: str | None = None


def mail_stream(n: int, seed: int, fault_rate: float):
    """Every procedure x bad-mail type once, then the benchmark mix (lazy: 20,000 mails are ~400 MB)."""
    from protocols.kim.generator import SUPPORTED_FAULTS, MailGenerator, make_pki
    from protocols.kim.procedures import Procedure

    gen = MailGenerator(seed=seed, pki=make_pki(0), oversize_bytes=512 * 1024)
    first = [(Procedure.EAU_LIEFERUNG, None)]
    for proc in (Procedure.EAU_LIEFERUNG, Procedure.EAU_STORNO, Procedure.EEB_ANFRAGE, Procedure.EBZ,
                 Procedure.AAR, Procedure.EMAILPLUS):
        for fault in sorted(SUPPORTED_FAULTS[proc], key=str):
            first.append((proc, fault))
    count = 0
    for proc, fault in first:
        if count >= n:
            return
        yield gen.eau() if fault is None else gen.generate(proc, fault)
        count += 1
    if n > count:
        yield from gen.mix(n - count, fault_rate=fault_rate)


# --------------------------------------------------------------------------- the tree
def chaos_root_spec(cfg):
    """infra (outbox relay) + kim + one shard host per kind of every other capability."""
    from actors.runtime.system import host_child_specs
    from deploy.app import capability_modules, infra_spec
    from supervisors.spec import ChildSpec, SupervisorSpec

    slow = {"start_timeout_s": 900}  # a busy 2-core machine starts ~25 actors slowly
    children = [infra_spec(cfg).model_copy(update=slow)]
    for m in capability_modules():
        cap = m.__name__.split(".")[1]
        if cap == "kim":
            children.append(m.supervisor_spec(cfg).model_copy(update=slow))
            continue
        kinds = [k.model_copy(update={"hosts": 1}) for k in m.kinds(cfg)]
        children.append(SupervisorSpec(
            name=cap, strategy="one_for_one", max_restarts=50, max_seconds=60, parallel_start=True,
            start_timeout_s=900, children=[ChildSpec(**d) for k in kinds for d in host_child_specs(cfg, k)]))
    return SupervisorSpec(name="root", strategy="one_for_one", max_restarts=1000, max_seconds=60,
                          start_timeout_s=900, children=children)


def chaos_kinds(cfg):
    from deploy.app import capability_modules

    out = []
    for m in capability_modules():
        cap = m.__name__.split(".")[1]
        ks = m.kinds(cfg)
        out += ks if cap == "kim" else [k.model_copy(update={"hosts": 1}) for k in ks]
    return out


# --------------------------------------------------------------------------- progress
class Tracker:
    """Counters sampled every ``interval`` s: received, terminal (of the delivered mails),
    core deposits, events published by the relay."""

    def __init__(self, cfg, redis, interval: float = 0.5):
        self.cfg = cfg
        self.redis = redis
        self.interval = interval
        self.delivered: list[str] = []
        self._pending: dict[str, None] = {}  # delivered, not terminal yet (insertion ordered)
        self.per_sample = 1000
        self._received: set[str] = set()
        self.terminal = 0
        self.samples: dict[str, tuple[float, float]] = {}  # counter -> (time, value)
        self.load_done = False
        self.errors = 0
        self._core_path = Path(cfg.run_dir) / "core" / "core.sqlite3"

    def add(self, mail_id: str) -> None:
        self.delivered.append(mail_id)
        self._pending[mail_id] = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def received(self) -> int:
        return len(self._received)

    def idle(self) -> bool:
        return self.load_done and not self._pending

    def _deposits(self) -> int:
        if not self._core_path.exists():
            return 0
        db = sqlite3.connect(f"file:{self._core_path}?mode=ro", uri=True, timeout=5)
        try:
            return int(db.execute("SELECT COUNT(*) FROM records").fetchone()[0])
        finally:
            db.close()

    async def _relay_published(self) -> int | None:
        from supervisors.resolve import resolve_async

        try:
            h = await resolve_async("outbox.relay", namespace=self.cfg.runtime.namespace, timeout_s=1)
            s = await asyncio.wait_for(h.stats.remote(), 2)
            return int(s["published"]) if s.get("published") is not None else None
        except Exception:
            return None

    async def sample(self) -> None:
        from actors.kim.ledger import slip_summaries

        now = time.monotonic()
        # the oldest pending mails (most likely finished) and the newest (just received?):
        # a bounded read per sample, whatever the backlog (the final ledger reads them all)
        pend = list(self._pending)
        if len(pend) > self.per_sample:
            pend = pend[: self.per_sample - 200] + pend[-200:]
        if pend:
            try:
                sums = await asyncio.wait_for(slip_summaries(self.redis, pend), 10)
                for mid, s in sums.items():
                    if s is None or s["status"] == "new":
                        continue
                    self._received.add(mid)
                    if s["status"] in TERMINAL:
                        self._pending.pop(mid, None)
                        self.terminal += 1
            except Exception:
                self.errors += 1
                return
        self.samples["received"] = (now, float(self.received))
        self.samples["terminal"] = (now, float(self.terminal))
        try:
            self.samples["deposits"] = (now, float(await asyncio.to_thread(self._deposits)))
        except Exception:
            pass
        pub = await self._relay_published()
        if pub is not None:
            # published counts per relay incarnation: keep a monotonic sum across restarts
            last_raw = getattr(self, "_pub_raw", 0)
            acc = getattr(self, "_pub_acc", 0.0)
            acc += pub - last_raw if pub >= last_raw else pub
            self._pub_raw, self._pub_acc = pub, acc
            self.samples["published"] = (now, acc)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sample()
            try:
                await asyncio.wait_for(stop.wait(), self.interval)
            except asyncio.TimeoutError:
                pass

    async def progress(self, counter: str, limit_s: float) -> float | None:
        """Wait until ``counter`` moves after now (or nothing is left to do); returns the time."""
        t_call = time.monotonic()
        deadline = t_call + limit_s
        base = None
        while time.monotonic() < deadline:
            t, v = self.samples.get(counter, (0.0, 0.0))
            if t > t_call:
                if base is None:
                    base = v
                elif v > base:
                    return t
            if self.idle() and counter != "published":
                return time.monotonic()
            if counter == "published" and self.idle() and base is not None:
                # nothing left to publish? the outbox is empty once the relay is back
                try:
                    if int(await self.redis.xlen("automat:outbox")) == 0:
                        return time.monotonic()
                except Exception:
                    pass
            await asyncio.sleep(0.1)
        return None


# --------------------------------------------------------------------------- the run
class ChaosRun:
    def __init__(self, base_cfg: AutomatConfig, opts: ChaosOptions, console: Console | None = None):
        self.opts = opts
        self.console = console or Console()
        self.seed = opts.seed if opts.seed is not None else random.randrange(1 << 30)
        self.rng = random.Random(self.seed)
        self.cfg = chaos_config(base_cfg, run_dir=opts.run_dir, port_base=opts.port_base, mailboxes=opts.mailboxes,
                                fetchers=opts.fetchers, slip_hosts=opts.slip_hosts, worker_hosts=opts.worker_hosts,
                                step_timeout_s=opts.step_timeout_s)
        self.stack = ChaosStack(self.cfg, port_base=opts.port_base)
        self.core_file = Path(self.cfg.run_dir) / "chaos" / "core-faults"
        self.meta: list[MailMeta] = []
        self.needles = Needles()
        self.report = ChaosReport(seed=self.seed, run_dir=str(self.cfg.run_dir), mails=opts.mails)
        self.faults_done = False

    def say(self, msg: str) -> None:
        self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {msg}", highlight=False)

    # -- setup / teardown ------------------------------------------------------------------
    def _fresh_run_dir(self) -> None:
        rd = Path(self.cfg.run_dir)
        if rd.exists():
            if not (rd / MARKER).exists() and any(rd.iterdir()):
                raise RuntimeError(f"{rd} exists and is not a chaos run dir (no {MARKER}); choose another --run-dir")
            self.stack.down()
            for sub in ("redis", "s3", "kafka", "imap/mail", "smtp", "blobs", "core", "secrets", "chaos", "logs"):
                shutil.rmtree(rd / sub, ignore_errors=True)
        rd.mkdir(parents=True, exist_ok=True)
        (rd / MARKER).write_text("run dir of `automat chaos`: wiped at the start of every run\n")
        (rd / "chaos").mkdir(exist_ok=True)

    def _start_ray(self) -> None:
        import ray

        os.environ.pop("RAY_ADDRESS", None)  # never attach to somebody else's cluster
        repo = str(Path(__file__).resolve().parents[2])
        env = {
            "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p),
            "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
            "RAY_USAGE_STATS_ENABLED": "0",
            "AUTOMAT_KIM_CORE_FAULTS": f"file:{self.core_file}",
            **worker_env(self.cfg),
        }
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        for attempt in range(5):  # Ray gives its raylet 30 s to register: too short on a busy machine
            try:
                ray.init(address="local", namespace=self.cfg.runtime.namespace, num_cpus=4, include_dashboard=False,
                         log_to_driver=False, runtime_env={"env_vars": env})
                return
            except Exception as e:
                if attempt == 4 or "timed out during startup" not in str(e):
                    raise
                self.say(f"[yellow]Ray did not come up ({e}); once more[/]")
                ray.shutdown()

    async def _start_tree(self):
        import redis.asyncio as aioredis

        from actors.runtime.router import register_kinds
        from supervisors.supervisor import start_root

        r = aioredis.from_url(self.cfg.redis.url)
        try:
            await register_kinds(r, chaos_kinds(self.cfg))
        finally:
            await r.aclose()
        spec = chaos_root_spec(self.cfg)
        ns = self.cfg.runtime.namespace

        def start():
            import ray

            from supervisors.supervisor import Supervisor

            # create the root first and give it time: on a busy 2-core machine an actor can
            # take longer than start_root's 60 s to come up
            h = Supervisor.options(name=ROOT, namespace=ns, lifetime="detached", get_if_exists=True,
                                   **spec.options).remote(spec, ns, ROOT)
            ray.get(h.get_spec.remote(), timeout=600)
            return start_root(spec, namespace=ns, name=ROOT, timeout_s=900)

        return await asyncio.to_thread(start)

    def _stop_tree(self) -> None:
        import ray

        from supervisors.supervisor import stop_root

        try:
            stop_root(namespace=self.cfg.runtime.namespace, name=ROOT)
        except Exception as e:
            self.say(f"[yellow]stopping the tree: {e}[/]")
        try:
            self.log_dir = Path(ray._private.worker._global_node.get_logs_dir_path())
        except Exception:
            self.log_dir = None
        ray.shutdown()

    # -- load ----------------------------------------------------------------------------
    async def _load(self, tracker: Tracker) -> None:
        from actors.kim.mailbox import mail_id_of
        from actors.runtime.crypto import Pseudonymizer

        o = self.opts
        pseudo = Pseudonymizer.from_file(self.cfg.crypto.pseudonym_key_file)
        users = [b.user for b in self.cfg.kim.mailboxes]
        rate = o.mails / o.duration_s
        n_max = int(o.mails * (1 + o.max_extra))
        stream = mail_stream(n_max, self.seed, o.fault_rate)
        by_msgid: dict[str, str] = {}
        t0 = time.monotonic()
        sent = 0
        chunk = max(1, int(rate * 0.2))

        def produce(k: int):
            out = []
            for _ in range(k):
                m = next(stream, None)
                if m is None:
                    break
                out.append(m)
            return out

        while sent < o.mails or (not self.faults_done and sent < n_max):
            due = min(n_max, int((time.monotonic() - t0) * rate) + 1)
            if due <= sent:
                await asyncio.sleep(min(0.2, (sent + 1) / rate - (time.monotonic() - t0)))
                continue
            mails = await asyncio.to_thread(produce, min(due - sent, chunk * 5))
            if not mails:
                break
            for m in mails:
                raw = m.raw
                await asyncio.to_thread(self.stack.deliver_maildir, users[sent % len(users)], raw)
                mid = mail_id_of(pseudo, raw)
                dup_of = by_msgid.get(m.duplicate_of) if m.duplicate_of else None
                self.meta.append(MailMeta(mail_id=mid, procedure=m.procedure.value, fault=m.fault.value,
                                          message_id=m.message_id, duplicate_of=dup_of))
                by_msgid.setdefault(m.message_id, mid)
                self.needles.add(m.patient_name, m.kvnr)
                tracker.add(mid)
                sent += 1
        tracker.load_done = True
        self.report.mails = sent
        if sent > o.mails:
            self.say(f"load extended to {sent} mails until every planned fault was injected")
        self.report.load_s = time.monotonic() - t0

    # -- faults --------------------------------------------------------------------------
    async def _faults(self, tracker: Tracker, stop: asyncio.Event) -> None:
        o = self.opts
        n = o.faults if o.faults is not None else max(len(o.kinds), int(o.duration_s / 12))
        kinds = plan(n, tuple(o.kinds), self.rng)
        gap = o.duration_s / max(n, 1)
        probe = Probe(namespace=self.cfg.runtime.namespace, root_name=ROOT,
                      progress=lambda c: tracker.progress(c, o.recovery_limit_s), idle=tracker.idle)
        inj = Injector(self.stack, probe, self.core_file, hang_s=o.hang_s, episode_s=o.episode_s,
                       rng=self.rng, limit_s=o.recovery_limit_s, log=self.say)
        inj.t0 = self.t0
        try:
            await self._inject_all(inj, kinds, gap, tracker, stop)
        finally:
            self.faults_done = True

    async def _inject_all(self, inj, kinds, gap, tracker, stop) -> None:
        """Fault i at a random moment of slot i (slots of ``gap`` s over the load phase);
        never two at once - a fault that recovers late pushes the next one back."""
        t_start = time.monotonic()
        for i, kind in enumerate(kinds):
            due = t_start + (i + self.rng.uniform(0.1, 0.9)) * gap
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if stop.is_set():
                break
            if tracker.idle():
                self.say(f"[yellow]load done and every mail terminal: {len(kinds) - i} faults not injected[/]")
                break
            rec = await inj.inject(kind)
            self.report.faults.append(rec)
            took = "[red]NOT RECOVERED[/]" if rec.recovery_s is None else f"serving after {rec.recovery_s:.2f} s"
            self.say(f"fault {i + 1}/{len(kinds)} {rec.kind} {rec.target}: {took} {rec.detail} "
                     f"[dim](received {tracker.received}, terminal {tracker.terminal}/{len(tracker.delivered)})[/]")

    # -- main ----------------------------------------------------------------------------
    async def _main(self) -> ChaosReport:
        import redis.asyncio as aioredis

        o = self.opts
        self.t0 = time.monotonic()
        self.say(f"chaos stack in {self.cfg.run_dir} (ports {o.port_base}+), seed {self.seed}")
        self._fresh_run_dir()
        Path(self.core_file).write_text(CORE_BACKGROUND + "\n")
        await asyncio.to_thread(self.stack.up)
        self.say("stack up (Redis, SeaweedFS + Tansu, Dovecot, SMTP); starting Ray and the tree ...")
        self._start_ray()
        try:
            await self._start_tree()
            self._secret_needles()
            self.say(f"tree serving; load: {o.mails} mails at {o.mails / o.duration_s:.1f}/s into "
                     f"{len(self.cfg.kim.mailboxes)} mailboxes")
            r = aioredis.from_url(self.cfg.redis.url, socket_timeout=10, socket_connect_timeout=3)
            tracker = Tracker(self.cfg, r)
            stop = asyncio.Event()
            mon = asyncio.create_task(tracker.run(stop))
            shower = asyncio.create_task(self._show(tracker, stop))
            load = asyncio.create_task(self._load(tracker))
            faults = asyncio.create_task(self._faults(tracker, stop))
            t_load = time.monotonic()
            await load
            self.say(f"load delivered: {len(tracker.delivered)} mails in {self.report.load_s:.0f} s")
            await faults
            # every mail terminal, or the settle time is over
            deadline = time.monotonic() + o.settle_s
            while tracker.pending and time.monotonic() < deadline:
                await asyncio.sleep(1.0)
            t_end = time.monotonic()
            self.report.throughput = tracker.terminal / max(1e-6, t_end - t_load)
            stop.set()
            await asyncio.gather(mon, shower, return_exceptions=True)
            Path(self.core_file).write_text("")
            self.say(f"{tracker.terminal}/{len(tracker.delivered)} terminal; checking ...")
            (Path(self.cfg.run_dir) / "mails.jsonl").write_text("".join(m.model_dump_json() + "\n" for m in self.meta))
            try:
                await self._checks(r)
            except Exception as e:  # a check that cannot run is a failed check, never a lost report
                import traceback

                self.report.problems.append(f"checks failed to run: {type(e).__name__}: {e}")
                traceback.print_exc()
            await r.aclose()
        finally:
            await asyncio.to_thread(self._stop_tree)
        try:
            await self._pii_files()
        except Exception as e:
            self.report.problems.append(f"log/blob scan failed to run: {type(e).__name__}: {e}")
        self.report.total_s = time.monotonic() - self.t0
        self._verdict()
        return self.report

    def _secret_needles(self) -> None:
        """Key material and mailbox passwords: the scans must not find them anywhere either."""
        try:
            doc = json.loads(Path(self.cfg.crypto.keys_file).read_text())
            for k in doc.get("keys", {}).values():
                self.needles.add_secret(k)
            self.needles.add_secret(Path(self.cfg.crypto.pseudonym_key_file).read_text().strip())
        except (OSError, ValueError) as e:
            self.report.problems.append(f"could not read the secrets to scan for: {e}")
        for b in self.cfg.kim.mailboxes:
            self.needles.add_secret(b.secret())

    async def _show(self, tracker: Tracker, stop: asyncio.Event) -> None:
        last = 0.0
        while not stop.is_set():
            await asyncio.sleep(1.0)
            if time.monotonic() - last >= 15:
                last = time.monotonic()
                self.say(f"delivered {len(tracker.delivered)}  received {tracker.received}  terminal "
                         f"{tracker.terminal}  in flight/waiting {tracker.pending}  faults {len(self.report.faults)}")

    # -- checks --------------------------------------------------------------------------
    async def _wait_outbox_drained(self, r, timeout_s: float = 120) -> tuple[int, int]:
        deadline = time.monotonic() + timeout_s
        left = pend = -1
        while time.monotonic() < deadline:
            try:
                left = int(await r.xlen("automat:outbox"))
                try:
                    pend = int((await r.xpending("automat:outbox", "relay")).get("pending", 0))
                except Exception:
                    pend = 0
                if left == 0 and pend == 0:
                    break
            except Exception:
                pass
            await asyncio.sleep(0.5)
        return left, pend

    async def _checks(self, r) -> None:
        from actors.kim.ledger import ledger_of, slip_summaries
        from actors.kim.mailbox import count_mailbox

        rep = self.report
        ids = [m.mail_id for m in self.meta]
        want = set(ids)
        rep.distinct_mails = len(want)
        rep.offered_rate = self.opts.mails / self.opts.duration_s
        slips = await slip_summaries(r, want)
        led = ledger_of(slips)
        rep.ledger = led.model_dump(exclude={"by_procedure"})
        lost: Counter = Counter()
        dups: Counter = Counter()
        lost["no_slip"] = led.missing
        lost["in_flight"] = led.in_flight
        # IMAP: nothing left in INBOX, each mail moved exactly once
        inbox = sum(await asyncio.gather(*[asyncio.to_thread(count_mailbox, self.cfg, b.user)
                                           for b in self.cfg.kim.mailboxes]))
        moved = sum(await asyncio.gather(*[asyncio.to_thread(count_mailbox, self.cfg, b.user, None,
                                                             self.cfg.kim.done_folder)
                                           for b in self.cfg.kim.mailboxes]))
        lost["left_in_inbox"] = inbox
        dups["moved_twice"] = max(0, moved - len(self.meta))
        rep.checks["imap"] = {"inbox": inbox, "moved": moved, "delivered": len(self.meta)}
        # valid mails must not be rejected or parked
        # a valid mail must never be rejected; parked (kept for an operator with its reason,
        # `automat mails redrive`) is terminal, not lost - reported with the reasons
        wrong = [m for m in self.meta if m.fault == "none" and (slips.get(m.mail_id) or {}).get("status") == "rejected"]
        rep.wrong_outcome = len(wrong)
        rep.checks["parked"] = led.parked
        rep.checks["parked_valid"] = sum(1 for m in self.meta if m.fault == "none"
                                         and (slips.get(m.mail_id) or {}).get("status") == "parked")
        rep.checks["terminal_by_error"] = led.by_error
        # a parked slip whose claim check is gone has lost its mail inside the system
        lost["claim_check_lost"] = sum(1 for s in slips.values() if s and s["status"] == "parked"
                                       and s.get("error_code") == "blob_missing")
        # a rejection / clerk hand-over must name the mail's own fault, never a transient
        # error of the infrastructure that was retried away
        wrong_reason = [mid for mid, s in slips.items() if s and s["status"] == "rejected"
                        and (s.get("error_code") or "") in TRANSIENT_CODES]
        rep.checks["wrong_reason"] = len(wrong_reason)
        if wrong_reason:
            rep.problems.append(f"{len(wrong_reason)} rejected mails report a transient error as their reason "
                                f"(e.g. {wrong_reason[0]})")
        # the core system: each mail at most once; each duplicate group once; valid eAUs deposited
        core_path = Path(self.cfg.run_dir) / "core" / "core.sqlite3"
        keys: Counter = Counter()
        if core_path.exists():
            db = sqlite3.connect(f"file:{core_path}?mode=ro", uri=True)
            try:
                for (k,) in db.execute("SELECT idempotency_key FROM records"):
                    keys[k.split(":", 1)[1] if ":" in k else k] += 1
            finally:
                db.close()
        dups["core_deposit_twice"] = sum(1 for m in want if keys[m] > 1)
        groups: dict[str, list[str]] = defaultdict(list)
        for m in self.meta:
            if m.fault == "duplicate" and m.duplicate_of:
                groups[m.duplicate_of].append(m.mail_id)
        for orig, members in groups.items():
            n = keys[orig] + sum(keys[x] for x in members)
            if n > 1:
                dups["core_duplicate_group_twice"] += 1
        in_group = set(groups) | {x for v in groups.values() for x in v}
        not_deposited = [m.mail_id for m in self.meta if m.procedure == "eAU_Lieferung" and m.fault == "none"
                         and m.mail_id not in in_group and (slips.get(m.mail_id) or {}).get("status") == "done"
                         and keys[m.mail_id] != 1]
        lost["valid_eau_not_in_core"] = len(not_deposited)
        rep.checks["core"] = {"records": sum(keys.values()), "mails_with_record": sum(1 for m in want if keys[m]),
                              "duplicate_groups": len(groups)}
        # Kafka: the outbox drained, every mail's events there (dedupe by id)
        left, pend = await self._wait_outbox_drained(r)
        dead = int(await r.xlen("automat:outbox:dead"))
        events, payloads = await self._read_kafka()
        by_id: dict[str, tuple[str, str]] = {}
        copies: Counter = Counter()
        for ev in events:
            by_id[ev.id] = (ev.type, ev.key)
            copies[ev.id] += 1
        per_mail: dict[tuple[str, str], set[str]] = defaultdict(set)
        for eid, (typ, key) in by_id.items():
            per_mail[(key, typ)].add(eid)
        miss_recv = miss_term = two_recv = two_term = 0
        for m in self.meta:
            s = slips.get(m.mail_id)
            if not per_mail.get((m.mail_id, "mail.received")):
                miss_recv += 1
            elif len(per_mail[(m.mail_id, "mail.received")]) > 1:
                two_recv += 1
            if s and s["status"] in TERMINAL:
                n_term = sum(len(per_mail.get((m.mail_id, t), ())) for t in TERMINAL_EVENTS.values())
                if not per_mail.get((m.mail_id, TERMINAL_EVENTS[s["status"]])):
                    miss_term += 1
                elif n_term > 1:
                    two_term += 1
        lost["event_received_missing"] = miss_recv
        lost["event_terminal_missing"] = miss_term
        dups["event_received_twice"] = two_recv
        dups["event_terminal_twice"] = two_term
        rep.checks["kafka"] = {**rep.checks.get("kafka", {}), "records_read": len(events), "distinct_event_ids": len(by_id),
                               "redelivered_same_id": sum(c - 1 for c in copies.values() if c > 1),
                               "outbox_left": left, "outbox_pending": pend, "outbox_dead": dead}
        if left or pend:
            lost["outbox_not_drained"] = max(left, pend)
        # personal data: Redis and Kafka
        t = time.monotonic()
        redis_hits = await scan_redis(r, self.needles)
        kafka_hits = sum(1 for p in payloads if self.needles.find(p))
        rep.pii = {"needles": len(self.needles), "redis_hits": sum(redis_hits.values()),
                   "redis_hit_keys": dict(redis_hits.most_common(5)), "kafka_hits": kafka_hits,
                   "kafka_records": len(payloads), "scan_s": round(time.monotonic() - t, 1)}
        rep.lost_detail = {k: v for k, v in lost.items()}
        rep.duplicate_detail = {k: v for k, v in dups.items()}
        rep.lost = sum(lost.values())
        rep.duplicates = sum(dups.values())

    async def _read_kafka(self):
        """Every record of every ``<prefix>*`` topic from the beginning: (events, raw payloads).

        Partition by partition up to its end offset, each fetch from an explicit position:
        a continuously fetching consumer stalls on Tansu/SeaweedFS after broker restarts
        (empty fetches long before the end offset, while a fresh fetch from the same
        position returns the records). Offsets that stay unreadable are counted
        (``kafka.unreadable_offsets``), never skipped silently."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from actors.runtime.outbox import kafka_client_kwargs
        from protocols.events import Event

        prefix = self.cfg.kafka.topic_prefix
        c = AIOKafkaConsumer(**kafka_client_kwargs(self.cfg), group_id=None, auto_offset_reset="earliest",
                             enable_auto_commit=False, metadata_max_age_ms=1000)
        await c.start()
        events: list[Event] = []
        payloads: list[bytes] = []
        unreadable = 0
        try:
            topics = [t for t in await c.topics() if t.startswith(prefix)]
            tps = [TopicPartition(t, p) for t in topics for p in sorted(c.partitions_for_topic(t) or ())]
            if not tps:
                return events, payloads
            c.assign(tps)
            begin = await c.beginning_offsets(tps)
            end = await c.end_offsets(tps)
            for tp in tps:
                pos, stalls = begin[tp], 0
                while pos < end[tp]:
                    c.seek(tp, pos)
                    recs = (await c.getmany(tp, timeout_ms=3000, max_records=2000)).get(tp, [])
                    recs = [r for r in recs if r.offset >= pos]
                    if not recs:
                        stalls += 1
                        if stalls >= 5:  # give up on this offset, count it, go on
                            unreadable += 1
                            pos, stalls = pos + 1, 0
                        continue
                    stalls = 0
                    for rec in recs:
                        payloads.append(rec.value)
                        try:
                            events.append(Event.from_payload(rec.value))
                        except Exception:
                            self.report.problems.append(f"not an event: {rec.topic}@{rec.offset}")
                    pos = recs[-1].offset + 1
        finally:
            await c.stop()
        self.report.checks.setdefault("kafka", {})["unreadable_offsets"] = unreadable
        return events, payloads

    async def _pii_files(self) -> None:
        rd = Path(self.cfg.run_dir)
        files = [p for p in rd.rglob("*") if p.is_file() and (p.suffix in (".log", ".out", ".err", ".txt")
                                                             or "log" in p.parent.name)]
        files = [p for p in files if "imap/mail" not in str(p) and "smtp/mailbox" not in str(p)]
        log_dir = getattr(self, "log_dir", None)
        if log_dir and log_dir.exists():
            files += [p for p in log_dir.rglob("*") if p.is_file()]
        blobs = [p for p in Path(self.cfg.blob.dir).rglob("*") if p.is_file()] if Path(self.cfg.blob.dir).exists() else []
        n_logs, log_hits = await asyncio.to_thread(scan_files, files, self.needles)
        n_blobs, blob_hits = await asyncio.to_thread(scan_files, blobs, self.needles)
        self.report.pii.update({"log_files": n_logs, "log_hits": sum(log_hits.values()),
                                "log_hit_files": dict(log_hits.most_common(5)),
                                "blob_files": n_blobs, "blob_hits": sum(blob_hits.values())})

    def _verdict(self) -> None:
        rep = self.report
        rep.fault_summary = summarize(rep.faults)
        if rep.lost:
            rep.problems.append(f"lost {rep.lost}: {rep.lost_detail}")
        if rep.duplicates:
            rep.problems.append(f"duplicates {rep.duplicates}: {rep.duplicate_detail}")
        if rep.wrong_outcome:
            rep.problems.append(f"{rep.wrong_outcome} valid mails rejected")
        for k in ("redis_hits", "kafka_hits", "log_hits", "blob_hits"):
            if rep.pii.get(k):
                rep.problems.append(f"personal data in plain form: {k}={rep.pii[k]}")
        bad = [f for f in rep.faults if f.recovery_s is None]
        if bad:
            rep.problems.append(f"{len(bad)} faults without recovery: " + ", ".join(f"{f.kind} {f.target}" for f in bad[:5]))
        rep.ok = not rep.problems

    def run(self) -> ChaosReport:
        try:
            rep = asyncio.run(self._main())
        finally:
            if not self.opts.keep:
                try:
                    self.stack.down()
                except Exception as e:
                    self.say(f"[yellow]stack down: {e}[/]")
        out = Path(self.cfg.run_dir) / "report.json"
        out.write_text(rep.model_dump_json(indent=2))
        render(rep, self.console)
        self.say(f"report: {out}")
        return rep


    # -- re-check a finished run ------------------------------------------------------------
    async def _recheck(self) -> ChaosReport:
        """The end checks again on a finished run's data (stack up, no Ray, no load, no
        faults): ledger, IMAP, core system, Kafka, Redis leak scan. Faults, timings and the
        log/blob scans are kept from the run's report."""
        import redis.asyncio as aioredis

        rd = Path(self.cfg.run_dir)
        old = ChaosReport.model_validate_json((rd / "report.json").read_text())
        self.meta = [MailMeta.model_validate_json(line) for line in (rd / "mails.jsonl").read_text().splitlines()
                     if line.strip()]
        self.seed = old.seed
        self.say(f"re-checking {len(self.meta)} mails of {rd} (seed {old.seed}); regenerating the needles ...")
        stream = mail_stream(len(self.meta), old.seed, self.opts.fault_rate)
        for m, meta in zip(stream, self.meta):
            if m.message_id != meta.message_id:
                raise RuntimeError("regenerated mails differ from mails.jsonl (other seed or generator)")
            self.needles.add(m.patient_name, m.kvnr)
        self._secret_needles()
        keep = {k: v for k, v in old.pii.items() if k.startswith(("log", "blob"))}
        self.report = old.model_copy(update={"checks": {}, "problems": [], "pii": {}, "lost_detail": {},
                                             "duplicate_detail": {}})
        await asyncio.to_thread(self.stack.up)
        r = aioredis.from_url(self.cfg.redis.url, socket_timeout=30)
        try:
            await self._checks(r)
        finally:
            await r.aclose()
        self.report.pii.update(keep)
        self.report.offered_rate = old.offered_rate
        self.report.checks["rechecked"] = True
        self._verdict()
        return self.report

    def recheck(self) -> ChaosReport:
        try:
            rep = asyncio.run(self._recheck())
        finally:
            if not self.opts.keep:
                self.stack.down()
        out = Path(self.cfg.run_dir) / "report.json"
        out.write_text(rep.model_dump_json(indent=2))
        render(rep, self.console)
        self.say(f"report (re-checked): {out}")
        return rep


def render(rep: ChaosReport, console: Console) -> None:
    t = Table(title=f"chaos: {rep.mails} mails, {len(rep.faults)} faults, seed {rep.seed}")
    for c in ("fault kind", "n", "recovered", "p50 s", "p99 s", "max s"):
        t.add_column(c, justify="right" if c != "fault kind" else "left")
    f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    for kind, s in rep.fault_summary.items():
        t.add_row(kind, str(s["n"]), str(s["recovered"]), f(s["p50_s"]), f(s["p99_s"]), f(s["max_s"]))
    console.print(t)
    led = rep.ledger
    console.print(f"ledger: received {led.get('received')} = done {led.get('done')} + rejected {led.get('rejected')} "
                  f"+ parked {led.get('parked')} + in flight {led.get('in_flight')}; missing {led.get('missing')}")
    console.print(f"checks: {json.dumps(rep.checks)}")
    console.print(f"personal data scan: {json.dumps(rep.pii)}")
    console.print(f"load {rep.load_s:.0f} s at {rep.offered_rate:.1f} mails/s offered; "
                  f"{rep.throughput:.1f} mails/s terminal; total {rep.total_s:.0f} s")
    color = "green" if rep.lost == 0 else "red"
    dcolor = "green" if rep.duplicates == 0 else "red"
    console.print(f"[bold {color}]lost {rep.lost}[/] {rep.lost_detail}   "
                  f"[bold {dcolor}]duplicates {rep.duplicates}[/] {rep.duplicate_detail}")
    if rep.problems:
        console.print("[bold red]FAILED[/]: " + "; ".join(rep.problems))
    else:
        console.print("[bold green]OK[/]: nothing lost, nothing doubled, no personal data in plain form")


def run_chaos(base_cfg: AutomatConfig, opts: ChaosOptions, console: Console | None = None) -> ChaosReport:
    return ChaosRun(base_cfg, opts, console).run()


if __name__ == "__main__":  # pragma: no cover
    from actors.runtime.config import load_config

    sys.exit(0 if run_chaos(load_config(), ChaosOptions()).ok else 1)
