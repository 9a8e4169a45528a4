"""``automat loadtest``: the KIM throughput benchmark of ``BENCHMARK.md`` as a command.

One run:

1. a run-private configuration: mailboxes ``load01..loadMM``, blob folder and core-system
   file under ``<run_dir>/loadtest/<run id>/``, a run-unique Kafka topic prefix and
   (``--redis-db``) an own Redis database;
2. throughput mode: all mails generated and delivered (Maildir) *before* the pipeline
   starts; rate mode: the pipeline runs and a feeder APPENDs at the offered rate;
3. the real pipeline on a local Ray: mailbox actors (IMAPS) -> routing slips -> step
   workers -> core system / SMTP, plus the outbox relay to Kafka; the driver follows the
   ``kim.mail`` events on Kafka for live progress (rich: done/s, backlog, p99);
4. the ledger from the slip store (``received = done + rejected + parked + in flight``),
   lost/duplicates against the core system, latencies per mail and per step;
5. the baselines on the first ``--baseline-mails`` of the same mails (inline floor,
   naive Ray), then the report (JSON + Markdown + PNG) and cleanup.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sqlite3
import statistics
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from rich.markup import escape

from deploy.loadtest import report as rep
from deploy.loadtest.calibration import calibrate, kernel_cores
from deploy.loadtest.feed import RateFeeder, expected_outcome, feed_maildir, parse_mix
from deploy.loadtest.procstat import ProcSampler

log = logging.getLogger("automat.loadtest")

ROOT_NAME = "kim.loadtest.root"


@dataclass
class Options:
    mails: int
    rate: float | None = None
    mailboxes: int = 20
    mix: str | None = None
    faults: float = 0.05
    out: Path | None = None
    seed: int | None = None
    baselines: bool = True
    baseline_mails: int = 1000
    slip_hosts: int = 2
    worker_hosts: int = 2
    fetchers: int = 2
    fuse_max: int | None = None
    max_in_flight: int | None = None
    pickup_poll_ms: float | None = None  # kim.pickup_poll_ms: NOOP-poll hot mailboxes instead of IDLE
    redis_db: int | None = None
    timeout_s: float = 3600.0
    stall_s: float = 180.0
    keep: bool = False
    live: bool = True
    profile: bool = False  # py-spy the worker hosts for 30 s mid-run


class MailboxLock:
    """One load test at a time on a stack's loadtest mailboxes (``load01``...): a second
    run would empty the first one's INBOXes at its start and its ledger would show them
    as lost (found when the CI smoke run was started beside a 240k run). An ``flock`` on
    ``<run_dir>/loadtest/mailboxes.lock``: the kernel releases it when the holder dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ValueError(f"another load test is running on this stack's loadtest mailboxes ({holder}); "
                             f"wait for it, or run this one against another stack (AUTOMAT_RUN_DIR + ports)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "MailboxLock":
        if self._fd is None:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


RATE_PICKUP_POLL_MS = 100.0  # rate mode's hot pick-up unless --pickup-poll-ms says otherwise


def run_config(cfg, opt: Options, run_id: str):
    from actors.runtime.config import KimMailbox

    c = cfg.model_copy(deep=True)
    work = Path(cfg.run_dir) / "loadtest" / run_id
    c.blob.dir = work / "blobs"
    c.kim.core_db = work / "core.sqlite3"
    c.kim.mailboxes = [KimMailbox(user=f"load{i:02d}") for i in range(1, opt.mailboxes + 1)]
    c.kim.slip_hosts, c.kim.worker_hosts, c.kim.fetchers = opt.slip_hosts, opt.worker_hosts, opt.fetchers
    c.kim.fetch_batch = max(c.kim.fetch_batch, 200)
    if opt.fuse_max is not None:
        c.kim.fuse_max = opt.fuse_max
    if opt.max_in_flight is not None:
        c.kim.max_in_flight = opt.max_in_flight
    if opt.pickup_poll_ms is not None:
        c.kim.pickup_poll_ms = opt.pickup_poll_ms
    elif opt.rate and not c.kim.pickup_poll_ms:
        # rate mode measures latency: the local Dovecot is ours, hot pick-up costs it little
        # (IDLE would add Dovecot's 500 ms notify delay to every mail)
        c.kim.pickup_poll_ms = RATE_PICKUP_POLL_MS
    c.kafka.topic_prefix = f"{cfg.kafka.topic_prefix}lt{run_id}."
    c.runtime.namespace = f"automat-lt-{run_id}"
    if opt.redis_db is not None:
        base, _, _db = cfg.redis.url.rpartition("/")
        c.redis.url = f"{base}/{opt.redis_db}" if _db.isdigit() else f"{cfg.redis.url.rstrip('/')}/{opt.redis_db}"
    return c, work


def _loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def _mem_gib() -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return 0.0


class _Background:
    """A task of the driver's: the subclass's ``_run``, from :meth:`start` until :meth:`stop`."""

    _task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass


class Monitor(_Background):
    """Follows ``<prefix>kim.mail`` on Kafka: received and terminal events per mail."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.topic = f"{cfg.kafka.topic_prefix}kim.mail"
        self.received: dict[str, float] = {}
        self.terminal: dict[str, tuple[float, str]] = {}
        self.events = 0
        self.recent: deque[tuple[float, str]] = deque()  # (wall time seen, mail id) of terminal events
        self.error: str | None = None
        self.interval_s = 1.0

    async def _run(self) -> None:
        from aiokafka import AIOKafkaConsumer

        while True:
            consumer = AIOKafkaConsumer(self.topic, bootstrap_servers=self.cfg.kafka.bootstrap_servers,
                                        auto_offset_reset="earliest", enable_auto_commit=False, group_id=None,
                                        max_poll_records=5000, metadata_max_age_ms=2000)
            try:
                await consumer.start()
                while True:
                    batch = await consumer.getmany(timeout_ms=500, max_records=5000)
                    now = time.time()
                    for recs in batch.values():
                        for rec in recs:
                            self._take(rec.value, now)
                    # read in intervals, not at the tail: every fetch costs Tansu (memory
                    # storage) time in proportion to what the topic holds, and a consumer
                    # at the tail fetches after every produce - in the 240k run that was
                    # Tansu at 5 ms CPU per mail, more than Redis and Dovecot together
                    parts = consumer.assignment()
                    if parts:
                        consumer.pause(*parts)
                        await asyncio.sleep(self.interval_s)
                        consumer.resume(*parts)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the broker restarted or the topic is not there yet
                self.error = f"{type(e).__name__}: {e}"
                await asyncio.sleep(1.0)
            finally:
                try:
                    await consumer.stop()
                except Exception:
                    pass

    def _take(self, value: bytes, now: float) -> None:
        self.events += 1
        try:
            ev = json.loads(value)
        except ValueError:
            return
        typ, key = ev.get("type"), ev.get("key")
        at = datetime.fromisoformat(ev["occurred_at"]).timestamp() if ev.get("occurred_at") else now
        if typ == "mail.received":
            self.received.setdefault(key, at)
        elif typ in ("mail.done", "mail.rejected", "mail.parked") and key not in self.terminal:
            self.terminal[key] = (at, typ[5:])
            self.recent.append((now, key))


class HostRoles(_Background):
    """Which process is which shard host: pid -> role (``kim.slip``, ``kim.worker``), read from
    the hosts themselves every ``interval_s`` - a restarted host or one the autoscaler added
    comes with a new pid. The report splits the shard hosts' CPU by role with it (all of them
    are ``ray::ShardHost`` to ``/proc``), and gives each role's garbage collector (the hosts'
    ``stats()["gc"]``, read in the same call)."""

    def __init__(self, interval_s: float = 15.0) -> None:
        self.roles: dict[int, str] = {}
        self.hosts: dict[str, set[str]] = {}  # role -> host names seen
        self.gc_first: dict[int, dict] = {}  # pid -> its collector (stats()["gc"]) at the first look
        self.gc_last: dict[int, dict] = {}  # pid -> ... at the latest look
        self.interval_s = interval_s

    async def look(self) -> None:
        import ray
        from ray.util import list_named_actors

        try:
            names = await asyncio.to_thread(lambda: [a["name"] if isinstance(a, dict) else a
                                                     for a in list_named_actors()])
        except Exception:  # noqa: BLE001 - Ray busy or going down: the next look
            return
        for name in names:
            if ".host." not in name:
                continue
            role = name.split(".host.", 1)[0]
            try:
                h = await asyncio.to_thread(ray.get_actor, name)
                st = await asyncio.wait_for(h.stats.remote(), 10)
                pid = int(st["pid"])
            except Exception:  # noqa: BLE001 - a host restarting right now: the next look
                continue
            self.roles[pid] = role
            self.hosts.setdefault(role, set()).add(name.split("#", 1)[0])
            if isinstance(st.get("gc"), dict):
                self.gc_first.setdefault(pid, st["gc"])
                self.gc_last[pid] = st["gc"]

    async def _run(self) -> None:
        while True:
            await self.look()
            await asyncio.sleep(self.interval_s)

    def cpu_by_role(self, sampler: "ProcSampler", terminal: int, since: dict[int, float] | None = None) -> dict[str, dict]:
        """role -> {hosts, cpu_s, cpu_ms_per_mail} (``terminal``: the mails the run finished;
        ``since``: per-pid CPU when the clock started - a host's start-up is not the mails')."""
        out: dict[str, dict] = {}
        for role in sorted(set(self.roles.values())):
            cpu = sampler.cpu_of((p for p, r in self.roles.items() if r == role), since=since)
            out[role] = {"hosts": len(self.hosts.get(role, ())), "cpu_s": round(cpu, 1),
                         "cpu_ms_per_mail": round(1000 * cpu / terminal, 2) if terminal else None,
                         **self.gc_of(role)}
        return out

    def gc_of(self, role: str) -> dict:
        """The garbage collector in a role's hosts between the first and the last look (the
        first is right after the clock started): pause seconds (wall time, see
        ``actors.runtime.gcstats``), full (generation 2) passes, the longest pause of a host's
        life. Empty when no host of the role answered with its ``gc``."""
        pids = [p for p, r in self.roles.items() if r == role and p in self.gc_last]
        if not pids:
            return {}
        secs, full = 0.0, 0
        for p in pids:
            a, b = self.gc_first[p], self.gc_last[p]
            secs += float(b.get("total_s", 0.0)) - float(a.get("total_s", 0.0))
            full += int(b.get("collections", [0, 0, 0])[2]) - int(a.get("collections", [0, 0, 0])[2])
        return {"gc_s": round(secs, 2), "gc_full_passes": full,
                "gc_max_pause_ms": max(float(self.gc_last[p].get("max_pause_ms", 0.0)) for p in pids)}


async def _empty_boxes(cfg, users: list[str], redis) -> int:
    from actors.kim.mailbox import CURSOR_KEY, empty_mailbox

    n = 0
    for u in users:
        n += await asyncio.to_thread(empty_mailbox, cfg, u, None, ("INBOX", cfg.kim.done_folder))
    await redis.hdel(CURSOR_KEY, *users)
    return n


async def _inbox_left(cfg, users: list[str]) -> int:
    from actors.kim.mailbox import count_mailbox

    n = 0
    for u in users:
        n += await asyncio.to_thread(count_mailbox, cfg, u)
    return n


def _core_check(path: Path) -> dict:
    if not path.exists():
        return {"records": 0, "mails": 0, "duplicates": 0, "by_kind": {}}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        rows = db.execute("SELECT kind, json_extract(record, '$.mail_id'), COUNT(*) FROM records GROUP BY 1, 2").fetchall()
    finally:
        db.close()
    by_kind = Counter()
    dup = 0
    mails = set()
    for kind, mid, c in rows:
        by_kind[kind] += c
        dup += c - 1
        mails.add(mid)
    return {"records": sum(by_kind.values()), "mails": len(mails), "duplicates": dup, "by_kind": dict(by_kind)}


async def _step_stats(redis, ids: list[str], sample: int = 3000) -> list[dict]:
    from actors.runtime.store import state_key

    ids = ids[:: max(1, len(ids) // sample)][:sample]
    per: dict[str, list[float]] = {}
    for i in range(0, len(ids), 500):
        pipe = redis.pipeline(transaction=False)
        for m in ids[i:i + 500]:
            pipe.hget(state_key("kim.slip", m), "s")
        for raw in await pipe.execute():
            if not raw:
                continue
            for h in json.loads(raw).get("history", []):
                if h.get("ended"):
                    per.setdefault(h["step"], []).append((h["ended"] - h["started"]) * 1000.0)
    out = [{"step": k, "runs": len(v), "p50_ms": round(rep.pct(v, 50), 3), "p99_ms": round(rep.pct(v, 99), 3)}
           for k, v in per.items()]
    return sorted(out, key=lambda s: -s["runs"])


async def _slowest(redis, delivered: dict[str, float], summaries: dict, t0: float, n: int = 12) -> list[dict]:
    """The ``n`` mails with the longest delivered -> terminal time, each broken down
    (:func:`report.latency_breakdown`) - what sets the p99."""
    from actors.runtime.store import state_key

    lat = [(s["finished_at"] - delivered[m], m) for m, s in summaries.items()
           if s and s.get("finished_at") and m in delivered]
    top = [m for _, m in sorted(lat, reverse=True)[:n]]
    if not top:
        return []
    pipe = redis.pipeline(transaction=False)
    for m in top:
        pipe.hget(state_key("kim.slip", m), "s")
    return [rep.latency_breakdown(delivered[m], json.loads(raw), t0)
            for m, raw in zip(top, await pipe.execute()) if raw]


def _windows(t0: float, end: float, finish: list[tuple[float, float]], delivered: list[float], width: float = 10.0):
    """Per window: terminal/s, delivered/s, latency percentiles of mails finished in it."""
    series = {"t": [], "done_per_s": [], "offered_per_s": [], "lat_p50": [], "lat_p95": [], "lat_p99": []}
    nwin = max(1, int((end - t0) // width) + 1)
    fins: list[list[float]] = [[] for _ in range(nwin)]
    for t, lat in finish:
        k = int((t - t0) // width)
        if 0 <= k < nwin:
            fins[k].append(lat)
    offs = [0] * nwin
    for t in delivered:
        k = int((t - t0) // width)
        if 0 <= k < nwin:
            offs[k] += 1
    for k in range(nwin):
        series["t"].append(round((k + 1) * width, 1))
        series["done_per_s"].append(len(fins[k]) / width)
        series["offered_per_s"].append(offs[k] / width)
        for p in (50, 95, 99):
            v = rep.pct(fins[k], p)
            series[f"lat_p{p}"].append(round(v, 1) if v is not None else None)
    return series


async def _profile_workers(cfg, out: Path, seconds: int = 30) -> list[str]:
    """py-spy the worker hosts for ``seconds``: collapsed stacks + the top functions."""
    import sys

    from supervisors.resolve import resolve_async

    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        return ["py-spy not installed (pip install -e '.[dev]')"]
    notes = []
    for i in range(cfg.kim.worker_hosts):
        try:
            h = await resolve_async(f"kim.worker.host.{i}", namespace=cfg.runtime.namespace, timeout_s=10)
            pid = await h.pid.remote()
        except Exception as e:
            notes.append(f"worker host {i}: {e}")
            continue
        raw = out / f"profile-worker-{i}.folded"
        proc = await asyncio.create_subprocess_exec(
            str(spy), "record", "-p", str(pid), "-d", str(seconds), "-r", "50", "-f", "raw", "-o", str(raw), "--nonblocking",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        if proc.returncode != 0 or not raw.exists():
            notes.append(f"py-spy on worker host {i} failed: {err.decode(errors='replace')[-200:]}")
            continue
        top = fold_top(raw.read_text())
        (out / f"profile-worker-{i}.top.txt").write_text(top)
        notes.append(f"py-spy profile of worker host {i} (pid {pid}, {seconds} s): {raw.name}, top: "
                     f"profile-worker-{i}.top.txt")
    return notes


def fold_top(folded: str, n: int = 40) -> str:
    """Collapsed stacks -> share of samples per function (inclusive) and per leaf (self)."""
    incl: Counter = Counter()
    leaf: Counter = Counter()
    total = 0
    for line in folded.splitlines():
        stack, _, cnt = line.rpartition(" ")
        if not cnt.isdigit():
            continue
        c = int(cnt)
        total += c
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")" if " (" in f else f
                  for f in stack.split(";")]
        for f in set(frames):
            incl[f] += c
        leaf[frames[-1]] += c
    # where the step work goes: samples under run_chain, by the step function running
    steps: Counter = Counter()
    in_chain = 0
    for line in folded.splitlines():
        stack, _, cnt = line.rpartition(" ")
        if not cnt.isdigit() or "run_chain" not in stack:
            continue
        in_chain += int(cnt)
        frames = stack.split(";")
        k = next((i for i, f in enumerate(frames) if f.startswith("_run_step")), None)
        name = frames[k + 1].split(" (")[0] if k is not None and k + 1 < len(frames) else "(chain overhead)"
        steps[name] += int(cnt)
    lines = [f"{total} samples, {in_chain} in step work (run_chain)", "", "step work by step function "
             "(% of run_chain samples):"]
    lines += [f"{100 * c / max(1, in_chain):6.1f}%  {f}" for f, c in steps.most_common(30)]
    lines += ["", "inclusive (% of samples with the function on the stack):"]
    lines += [f"{100 * c / max(1, total):6.1f}%  {f}" for f, c in incl.most_common(n)]
    lines += ["", "self (% of samples with the function on top):"]
    lines += [f"{100 * c / max(1, total):6.1f}%  {f}" for f, c in leaf.most_common(n)]
    return "\n".join(lines) + "\n"


async def run_loadtest(cfg, opt: Options, console) -> dict:
    import redis.asyncio as aioredis

    if opt.mails < 1:
        raise ValueError("--mails must be at least 1")
    if not 1 <= opt.mailboxes <= 100:
        raise ValueError("--mailboxes must be 1..100 (IMAP users load01..load100)")
    if opt.rate is not None and opt.rate <= 0:
        raise ValueError("--rate must be > 0 mails/s")
    mix = parse_mix(opt.mix)
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4]
    seed = opt.seed if opt.seed is not None else int.from_bytes(os.urandom(3), "big")
    lcfg, work = run_config(cfg, opt, run_id)
    out = Path(opt.out) if opt.out else work / "report"
    users = [b.user for b in lcfg.kim.mailboxes]
    mode = "rate" if opt.rate else "throughput"
    keep_raw = min(opt.mails, opt.baseline_mails) if opt.baselines else 0
    notes: list[str] = []
    need = opt.mails * 140 * 1024
    free = shutil.disk_usage(Path(cfg.run_dir)).free
    if free < need:
        raise RuntimeError(f"not enough disk: {opt.mails} mails need about {need / 2**30:.1f} GiB under {cfg.run_dir} "
                           f"(mails in IMAP, blobs, core system), {free / 2**30:.1f} GiB free")
    mix_text = ", ".join(f"{p.value} {w:.0%}" for p, w in mix.items())
    console.print(f"[bold]automat loadtest[/] {run_id}: {mode} mode, {opt.mails} mails ({mix_text}; faulty "
                  f"{opt.faults:.0%}) into {len(users)} mailboxes; report -> {out}")
    loadavg_start = _loadavg()

    import contextlib

    mailbox_lock = MailboxLock(Path(cfg.run_dir) / "loadtest" / "mailboxes.lock")
    lease = contextlib.nullcontext()
    stack = None
    if lcfg.local_stack:
        from deploy.stack import LocalStack

        stack = LocalStack(cfg)
        lease = stack.shared(owner=f"automat loadtest {run_id}")
    with mailbox_lock, lease:
        if stack is not None and stack.ensure_imap_users():
            await asyncio.sleep(0.5)
        redis = aioredis.from_url(lcfg.redis.url)
        work.mkdir(parents=True, exist_ok=True)
        try:
            emptied = await _empty_boxes(lcfg, users, redis)
            if emptied:
                notes.append(f"{emptied} mails of an earlier run were removed from the loadtest mailboxes first")
            fed, raws, gen_stats = [], [], {}
            if mode == "throughput":
                console.print(f"generating and delivering {opt.mails} mails (Maildir, one process per core) ...")
                fed, raws, gen_stats = await asyncio.to_thread(
                    feed_maildir, lcfg, users, opt.mails, seed=seed, mix=mix, fault_rate=opt.faults, keep_raw=keep_raw)
                console.print(f"generator: {gen_stats['mails']} mails in {gen_stats['seconds']} s = "
                              f"{gen_stats['mails_per_s']} mails/s ({gen_stats['processes']} processes)")
            cal_start = await asyncio.to_thread(calibrate)
            console.print(f"calibration: {cal_start['ms_per_mail']} ms CPU per mail for the step code's compute kernel")
            result = await _run_pipeline(lcfg, opt, console, run_id, redis, fed, raws, gen_stats, mix, seed, keep_raw,
                                         out, notes, stack)
            result["machine"]["calibration"] = {"start": cal_start, "end": await asyncio.to_thread(calibrate)}
            result["throughput"]["kernel_cores"] = kernel_cores(result)
        finally:
            if not opt.keep:
                with contextlib.suppress(Exception):
                    await _empty_boxes(lcfg, users, redis)
                if opt.redis_db is not None and opt.redis_db != _db_of(cfg.redis.url):
                    with contextlib.suppress(Exception):
                        await redis.flushdb()
                shutil.rmtree(work / "blobs", ignore_errors=True)
                shutil.rmtree(work / "baselines", ignore_errors=True)
                for f in work.glob("core.sqlite3*"):
                    f.unlink(missing_ok=True)
            await redis.aclose()
    result["machine"]["loadavg_start"] = loadavg_start
    result["mix_text"] = mix_text
    paths = rep.write(result, result.pop("_series"), out)
    _print_end(console, result)
    console.print(f"report: {paths['markdown']}  {paths['json']}  {paths['chart']}")
    console.print(rep.summary_line(result))
    return result


def _print_end(console, r: dict) -> None:
    from rich.table import Table

    led, t, lat, res = r["ledger"], r["throughput"], r["latency_ms"], r["resources"]
    tab = Table(title="ledger: delivered = done + rejected + parked + in flight")
    for c in ("delivered", "received", "done", "(work basket)", "rejected", "parked", "in flight", "lost",
              "duplicates", "as spec", "balanced"):
        tab.add_column(c, justify="right")
    tab.add_row(*(str(led[k]) for k in ("delivered", "received", "done", "workbasket", "rejected", "parked",
                                        "in_flight", "lost", "duplicates", "as_expected")),
                "yes" if led["balanced"] else "[red]NO[/]")
    console.print(tab)
    console.print(f"{t['mails_per_s']} mails/s overall, {t['sustained_mails_per_s']} sustained; latency p50/p95/p99 "
                  f"{lat['p50']}/{lat['p95']}/{lat['p99']} ms; CPU {res['cpu_s_per_mail']} s/mail; peak RSS "
                  f"{res['peak_rss_mib']} MiB")
    cal = r["machine"].get("calibration")
    if cal and t.get("kernel_cores") is not None:
        console.print(f"calibration {cal['start']['ms_per_mail']} / {cal['end']['ms_per_mail']} ms per mail (start / "
                      f"end) -> {t['kernel_cores']} cores' worth of the step kernel per second")
    for b in r.get("baselines", []):
        console.print(f"baseline {b['name']}: {b['mails_per_s']} mails/s -> automat is {b.get('ratio')}x")


def _db_of(url: str) -> int:
    tail = url.rpartition("/")[2]
    return int(tail) if tail.isdigit() else 0


async def _run_pipeline(lcfg, opt, console, run_id, redis, fed, raws, gen_stats, mix, seed, keep_raw, out, notes,
                        stack) -> dict:
    import ray

    from actors.kim.app import kinds, pipeline_ready, supervisor_spec
    from actors.kim.ledger import ledger_of, slip_summaries
    from actors.runtime.router import register_kinds
    from deploy.app import infra_spec, ray_env
    from supervisors.spec import SupervisorSpec
    from supervisors.supervisor import start_root, stop_root

    users = [b.user for b in lcfg.kim.mailboxes]
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # as the workers get it (ray_env)
    for attempt in range(5):  # Ray gives a local node 30 s to come up; a busy machine may need more
        try:
            if os.environ.get("RAY_ADDRESS"):
                ray.init(namespace=lcfg.runtime.namespace, runtime_env={"env_vars": ray_env(lcfg)})
            else:
                ray.init(address="local", namespace=lcfg.runtime.namespace, include_dashboard=False,
                         runtime_env={"env_vars": ray_env(lcfg)}, log_to_driver=False)
            break
        except Exception as e:
            if attempt == 4 or "timed out during startup" not in str(e):
                raise
            console.print(f"[yellow]Ray did not come up ({escape(str(e))}); trying again[/]")
            ray.shutdown()
            await asyncio.sleep(5.0 * (attempt + 1))
    roots = [os.getpid()]
    if stack is not None:
        roots += [p for ps in stack.processes().values() for p in ps[:1]]
    sampler = ProcSampler(roots)
    pipe_sampler = ProcSampler([os.getpid()])  # the driver and its Ray cluster only (no stack services)
    sampler.also = pipe_sampler
    await asyncio.to_thread(sampler.sample)
    info0 = await redis.info("stats")
    mon = Monitor(lcfg)
    roles = HostRoles()
    feeder = None
    try:
        await register_kinds(redis, kinds(lcfg))
        spec = SupervisorSpec(name="loadtest", strategy="one_for_one", max_restarts=20, max_seconds=60,
                              children=[infra_spec(lcfg), supervisor_spec(lcfg)])
        t_start = time.time()
        await asyncio.to_thread(start_root, spec, namespace=lcfg.runtime.namespace, name=ROOT_NAME,
                                timeout_s=600)  # a busy machine starts actors slowly
        console.print(f"pipeline up after {time.time() - t_start:.1f} s (Ray, {lcfg.kim.slip_hosts} slip hosts, "
                      f"{lcfg.kim.worker_hosts} worker hosts, {lcfg.kim.fetchers} mailbox actors, outbox relay)")
        warm = await pipeline_ready(lcfg)
        cold = [w for w in warm if w.get("error")]
        console.print(f"pipeline warm after {time.time() - t_start:.1f} s (lanes open, IMAP sessions logged in"
                      + (f"; not ready: {', '.join(w['host'] for w in cold)}" if cold else "") + ")")
        if cold:
            notes.append("not warm when the clock started: " + "; ".join(f"{w['host']} ({w['error']})" for w in cold))
        mon.start()
        roles.start()
        await asyncio.to_thread(sampler.sample)
        cpu_at_clock = dict(sampler.cpu_last)  # the hosts' CPU by role counts from here (no start-up)
        if opt.rate:
            feeder = RateFeeder(lcfg, users, opt.mails, opt.rate, seed=seed, mix=mix, fault_rate=opt.faults,
                                keep_raw=keep_raw)
            await asyncio.to_thread(feeder.connect)
            feed_task = asyncio.get_running_loop().create_task(feeder.run())
            t0 = time.time()
        else:
            feed_task = None
            t0 = time.time()  # all mails are waiting: the clock runs from "pipeline up"
        prof_task = None
        if opt.profile:
            async def later():
                await asyncio.sleep(20)
                return await _profile_workers(lcfg, out, 30)
            out.mkdir(parents=True, exist_ok=True)
            prof_task = asyncio.get_running_loop().create_task(later())
        await _follow(opt, console, mon, sampler, fed, feeder, feed_task, t0, redis)
        t_end = time.time()
        await roles.stop()
        await roles.look()  # the hosts as they are at the end (before they stop)
        await asyncio.to_thread(sampler.sample)
        cpu_by_process = sampler.cpu_by_name()
        if feed_task is not None:
            if not feed_task.done():
                feed_task.cancel()
                notes.append("the feeder did not finish in time")
            feeder.close()
            fed, raws, gen_stats = feeder.mails, feeder.raws, feeder.stats()
        if prof_task is not None:
            notes += await prof_task
        await asyncio.to_thread(sampler.sample)
        info1 = await redis.info("stats")
        ids = [m.mail_id for m in fed]
        console.print("reading the ledger from the slip store ...")
        summaries = await slip_summaries(redis, ids)
        led = ledger_of(summaries)
        inbox_left = await _inbox_left(lcfg, users)
        steps = await _step_stats(redis, ids)
        slowest = await _slowest(redis, {m.mail_id: m.delivered_at for m in fed}, summaries, t0)
        scaling = await _autoscaler_timeline(lcfg, t0)
        # ---- the baselines, with the pipeline stopped
        await asyncio.to_thread(stop_root, namespace=lcfg.runtime.namespace, name=ROOT_NAME)
        baselines = []
        if opt.baselines and raws:
            from deploy.loadtest.baselines import inline_floor, naive_ray

            broot = Path(lcfg.blob.dir).parent / "baselines"
            console.print(f"baseline 1/2: inline floor on {len(raws)} of the same mails ...")
            baselines.append(await inline_floor(lcfg, raws, broot, run_id))
            console.print(f"  {baselines[-1]['mails_per_s']} mails/s")
            console.print(f"baseline 2/2: naive Ray (one task per step) on {len(raws)} of the same mails ...")
            await asyncio.to_thread(sampler.sample)
            tb0 = time.time()
            b = await naive_ray(lcfg, raws, broot, run_id)
            await asyncio.to_thread(sampler.sample)
            b["cpu_s_per_mail"] = round(sampler.cpu_between(tb0, time.time()) / max(1, len(raws)), 5)
            baselines.append(b)
            console.print(f"  {b['mails_per_s']} mails/s")
    finally:
        await mon.stop()
        await roles.stop()
        try:
            await asyncio.to_thread(stop_root, namespace=lcfg.runtime.namespace, name=ROOT_NAME)
        except Exception:
            pass
        ray.shutdown()
    # ---- numbers
    delivered = {m.mail_id: m for m in fed}
    lat_all, lat_eau, finish, as_expected, pickup = [], [], [], 0, []
    for mid, m in delivered.items():
        s = summaries.get(mid)
        if not s or s.get("status") not in ("done", "rejected", "parked") or not s.get("finished_at"):
            continue
        lat = (s["finished_at"] - m.delivered_at) * 1000.0
        lat_all.append(lat)
        if s.get("created_at"):
            pickup.append((s["created_at"] - m.delivered_at) * 1000.0)
        finish.append((s["finished_at"], lat))
        if m.procedure == "eAU_Lieferung" and m.fault == "none" and s.get("outcome") == "done":
            lat_eau.append(lat)
        if f"{s['status']}/{s.get('outcome')}" == expected_outcome(m.procedure, m.fault):
            as_expected += 1
    n_term = len(finish)
    last = max((t for t, _ in finish), default=t_end)
    span = max(1e-6, last - t0)
    series = _windows(t0, last, finish, [m.delivered_at for m in fed])
    warm = [x for t, x in zip(series["t"], series["done_per_s"]) if 10.0 < t <= (last - t0) - 0.0 and x > 0]
    full = warm[:-1] if len(warm) > 1 else warm  # the last window is partial
    sustained = statistics.median(full) if full else (n_term / span if n_term else 0.0)
    core = _core_check(Path(lcfg.kim.core_db))
    cpu = sampler.cpu_between(t0, last)
    res_t = [round(t - t0, 1) for t, _, _, _ in sampler.samples]
    rss = [round(r / 2**20, 1) for _, _, r, _ in sampler.samples]
    cpu_pct = [0.0] + [round(100 * (c1 - c0) / max(1e-6, t1 - ta), 1)
                       for (ta, c0, _, _), (t1, c1, _, _) in zip(sampler.samples, sampler.samples[1:])]
    run_samples = [r for (t, _, r, _) in sampler.samples if t0 <= t <= last] or [0]
    pipe_samples = [r for (t, _, r, _) in pipe_sampler.samples if t0 <= t <= last] or [0]

    def rss_at(frac: float, xs=run_samples) -> float:
        return round(xs[min(len(xs) - 1, int(frac * len(xs)))] / 2**20, 1)

    series.update({"res_t": res_t, "rss_mib": rss, "cpu_pct": cpu_pct})
    lost = len(delivered) - led.terminal
    mails_per_s = round(n_term / span, 1) if n_term else 0.0
    for b in baselines:
        b["ratio"] = round((sustained if mode_is_tp(opt) else mails_per_s) / b["mails_per_s"], 2) if b.get("mails_per_s") else None
    if opt.rate:
        notes.append("rate mode: the pipeline's throughput equals the offered rate; the baseline ratios compare "
                     "that rate, not the pipeline's capacity (use throughput mode for capacity)")
    if inbox_left:
        notes.append(f"{inbox_left} mails were still in the INBOXes at the end")
    if mon.error and not mon.terminal:
        notes.append(f"Kafka follower: {mon.error}")
    ops = info1.get("total_commands_processed", 0) - info0.get("total_commands_processed", 0)
    return {
        "run_id": run_id, "mode": "rate" if opt.rate else "throughput", "mails": len(delivered),
        "offered_rate": opt.rate, "fault_rate": opt.faults, "mailboxes": len(users), "seed": seed,
        "mix": {p.value: round(w, 4) for p, w in mix.items()},
        "pipeline": {"slip_hosts": lcfg.kim.slip_hosts, "worker_hosts": lcfg.kim.worker_hosts,
                     "fetchers": lcfg.kim.fetchers, "fuse_max": lcfg.kim.fuse_max, "num_shards": lcfg.runtime.num_shards,
                     "max_in_flight": lcfg.kim.max_in_flight, "pickup_poll_ms": lcfg.kim.pickup_poll_ms},
        "machine": {"cores": os.cpu_count(), "memory_gib": _mem_gib(), "loadavg_end": _loadavg()},
        "generator": gen_stats,
        "throughput": {"seconds": round(span, 2), "mails_per_s": mails_per_s,
                       "sustained_mails_per_s": round(sustained, 1), "terminal": n_term},
        "latency_ms": {"p50": _r(rep.pct(lat_all, 50)), "p95": _r(rep.pct(lat_all, 95)), "p99": _r(rep.pct(lat_all, 99)),
                       "max": _r(max(lat_all) if lat_all else None), "eau_done_p50": _r(rep.pct(lat_eau, 50)),
                       "eau_done_p99": _r(rep.pct(lat_eau, 99)),
                       # delivered into IMAP -> slip created (mailbox actor: IDLE, fetch, claim check)
                       "pickup_p50": _r(rep.pct(pickup, 50)), "pickup_p99": _r(rep.pct(pickup, 99))},
        "resources": {"cpu_s": round(cpu, 1), "cpu_s_per_mail": round(cpu / n_term, 5) if n_term else None,
                      "peak_rss_mib": round(max(run_samples) / 2**20, 1),
                      "rss_mib_at": [rss_at(0.25), rss_at(0.5), rss_at(0.9)],
                      "pipeline_peak_rss_mib": round(max(pipe_samples) / 2**20, 1),
                      "pipeline_rss_mib_at": [rss_at(0.25, pipe_samples), rss_at(0.5, pipe_samples),
                                              rss_at(0.9, pipe_samples)],
                      "pipeline_cpu_s_per_mail": round(pipe_sampler.cpu_between(t0, last) / n_term, 5) if n_term else None,
                      "rss_mib_by_process_at": sampler.rss_growth_by_name(t0, last),
                      "redis_ops_per_mail": round(ops / max(1, n_term), 1),
                      "processes_peak": sampler.peak_procs,
                      "cpu_s_by_process": cpu_by_process,
                      "shard_hosts_by_role": roles.cpu_by_role(sampler, n_term, since=cpu_at_clock),
                      "scope": "the driver, its Ray cluster and the local stack's services (Redis, Dovecot, Tansu, "
                               "SMTP sink); a stack shared with other work counts their load too"},
        "ledger": {"delivered": len(delivered), "received": led.received, "done": led.done,
                   "workbasket": led.workbasket, "rejected": led.rejected, "parked": led.parked,
                   "in_flight": led.in_flight, "missing": led.missing, "balanced": led.balanced,
                   "terminal": led.terminal, "lost": lost, "duplicates": core["duplicates"],
                   "core_records": core["records"], "core_mails": core["mails"], "core_by_kind": core["by_kind"],
                   "as_expected": as_expected, "inbox_left": inbox_left, "by_error": led.by_error,
                   "by_procedure": led.by_procedure},
        "baselines": baselines,
        "autoscaler": scaling,
        "steps": steps,
        "slowest": slowest,
        "notes": notes,
        "_series": series,
    }


async def _autoscaler_timeline(cfg, t0: float) -> list[dict]:
    """The autoscaler's decisions during the run (grow / shrink / capacity requests /
    holds), with ``t`` in seconds since the run's clock started - to read latency spikes
    and throughput steps against. Empty when the autoscaler is off or not reachable."""
    from supervisors.resolve import resolve_async

    try:
        h = await resolve_async("autoscaler", namespace=cfg.runtime.namespace, timeout_s=5.0)
        events = await asyncio.wait_for(h.timeline.remote(), 10.0)
    except Exception:
        return []
    keep = ("kind", "action", "hosts_before", "hosts_after", "reason", "moved", "handover_s", "seconds")
    return [{"t": round(e.get("at", t0) - t0, 1), **{k: e[k] for k in keep if k in e}} for e in events]


def mode_is_tp(opt) -> bool:
    return not opt.rate


def _r(v):
    return round(v, 1) if v is not None else None


async def _follow(opt, console, mon: Monitor, sampler: ProcSampler, fed, feeder, feed_task, t0: float,
                  redis=None) -> None:
    """Live progress until every delivered mail is terminal (or stall / timeout)."""
    from rich.live import Live
    from rich.table import Table

    import contextlib

    last_progress, last_count, last_cmds = time.time(), -1, 0
    cpu_prev = None

    def table() -> Table:
        nonlocal cpu_prev
        now = time.time()
        n_fed = len(feeder.mails) if feeder is not None else len(fed)
        while mon.recent and mon.recent[0][0] < now - 10:
            mon.recent.popleft()
        delivered_at = {m.mail_id: m.delivered_at for m in (feeder.mails if feeder is not None else [])}
        lats = []
        for _, mid in list(mon.recent):
            d = delivered_at.get(mid) if feeder is not None else None
            if d is None and feeder is None:
                d = _fed_index.get(mid)
            t = mon.terminal.get(mid)
            if d is not None and t is not None:
                lats.append((t[0] - d) * 1000)
        cpu, rss = sampler.samples[-1][1], sampler.samples[-1][2]
        pct = ""
        if cpu_prev is not None and now > cpu_prev[0]:
            pct = f"{100 * (cpu - cpu_prev[1]) / (now - cpu_prev[0]):.0f}%"
        cpu_prev = (now, cpu)
        t = Table(box=None, show_header=True, header_style="bold")
        for c in ("elapsed", "delivered", "received", "terminal", "done/s (10 s)", "backlog", "in INBOX", "p99 (10 s)",
                  "CPU", "RSS"):
            t.add_column(c, justify="right")
        p99 = rep.pct(lats, 99)
        t.add_row(f"{now - t0:.0f} s", str(n_fed), str(len(mon.received)), str(len(mon.terminal)),
                  f"{len(mon.recent) / 10:.1f}", str(n_fed - len(mon.terminal)), str(max(0, n_fed - len(mon.received))),
                  f"{p99:.0f} ms" if p99 is not None else "-", pct, f"{rss / 2**20:.0f} MiB")
        return t

    _fed_index = {m.mail_id: m.delivered_at for m in fed}
    deadline = time.time() + opt.timeout_s
    live = Live(table(), console=console, refresh_per_second=2, transient=False) if opt.live else None
    if live:
        live.start()
    try:
        while True:
            await asyncio.sleep(1.0)
            await asyncio.to_thread(sampler.sample)
            if live:
                live.update(table())
            n_fed = len(feeder.mails) if feeder is not None else len(fed)
            want = opt.mails if feeder is not None else n_fed
            done = len(mon.terminal)
            if redis is not None and int(time.time()) % 5 == 0:
                # slips still moving (commits in Redis) count as progress, too: in throughput
                # mode the first mails finish only after many segments ran
                with contextlib.suppress(Exception):
                    cmds = (await redis.info("stats")).get("total_commands_processed", 0)
                    if cmds - last_cmds > 100:
                        last_cmds, last_progress = cmds, time.time()
            if done != last_count:
                last_count, last_progress = done, time.time()
            if done >= want and (feed_task is None or feed_task.done()):
                break
            if time.time() - last_progress > opt.stall_s:
                console.print(f"[yellow]no progress for {opt.stall_s:.0f} s: stopping the wait[/]")
                break
            if time.time() > deadline:
                console.print("[yellow]timeout: stopping the wait[/]")
                break
            if not opt.live and int(time.time() - t0) % 15 == 0:
                console.print(f"{time.time() - t0:.0f} s: delivered {n_fed}, received {len(mon.received)}, "
                              f"terminal {done}")
    finally:
        if live:
            live.stop()
