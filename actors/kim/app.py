"""KIM capability wiring: entity kinds, the ``kim`` supervision subtree, the demo.

Subtree ``kim`` (one_for_one, children started in parallel):

- ``kim.slip.host.N``    shard hosts of the routing slips (the stateshifter)
- ``kim.worker.host.N``  the stateless step worker pool (``kim.worker_hosts`` = pool size)
- ``kim.mailboxes.N``    mailbox actors, each serving a share of ``kim.mailboxes``
"""

from __future__ import annotations

import asyncio
import glob
import time
from pathlib import Path

from actors.runtime.kinds import EntityKind
from actors.runtime.system import host_child_specs
from supervisors.spec import ChildSpec, SupervisorSpec

# the real public sample mails (licences: fixtures/SOURCES.md)
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "kim"


def slip_kind(cfg) -> EntityKind:
    # a step order is sent after the slip's commit: one not yet sent when the slip host died
    # is lost, so a new slip host fires its slips' watchdogs at once (re-dispatch; a result
    # of the old order that still comes is stale and ignored)
    return EntityKind(name="kim.slip", entity="actors.kim.slip:RoutingSlip", hosts=cfg.kim.slip_hosts,
                      ports="actors.kim.slip:make_slip_ports", restart_timers=["watchdog"])


def worker_kind(cfg) -> EntityKind:
    return EntityKind(name="kim.worker", entity="actors.kim.worker:StepWorker", hosts=cfg.kim.worker_hosts,
                      ports="actors.kim.ports:make_ports", stateless=True)


def kinds(cfg) -> list[EntityKind]:
    return [slip_kind(cfg), worker_kind(cfg)]


def fetcher_specs(cfg) -> list[ChildSpec]:
    from actors.kim.mailbox import fetcher_name

    return [
        ChildSpec(name=fetcher_name(i), actor="actors.kim.mailbox:MailboxFetcher", args=[cfg, i],
                  options={"num_cpus": 0, "max_concurrency": 1000})
        for i in range(cfg.kim.fetchers)
    ]


def supervisor_spec(cfg, *, name: str = "kim") -> SupervisorSpec:
    hosts = [ChildSpec(**d) for k in kinds(cfg) for d in host_child_specs(cfg, k)]
    return SupervisorSpec(name=name, strategy="one_for_one", max_restarts=20, max_seconds=60,
                          parallel_start=True, children=hosts + fetcher_specs(cfg))


async def pipeline_ready(cfg, *, timeout_s: float = 60.0) -> list[dict]:
    """Wait for the readiness probe (``ready()``) of every slip host, worker host and
    mailbox actor: started, lanes to the next kind open, IMAP sessions logged in. Returns
    each one's answer; one that does not answer in time is reported with its error
    (the pipeline still works - its first mails pay for the start-up)."""
    from actors.kim.mailbox import fetcher_name
    from supervisors.resolve import resolve_async

    names = [k.host_name(i) for k in kinds(cfg) for i in range(k.host_count(cfg))]
    names += [fetcher_name(i) for i in range(cfg.kim.fetchers)]

    async def one(name: str) -> dict:
        try:
            h = await resolve_async(name, namespace=cfg.runtime.namespace, timeout_s=timeout_s)
            return await asyncio.wait_for(h.ready.remote(), timeout_s)
        except Exception as e:
            return {"host": name, "error": f"{type(e).__name__}: {e}"[:200]}

    return list(await asyncio.gather(*(one(n) for n in names)))


def fixture_mails() -> list[Path]:
    """The real sample KIM mails (``fixtures/kim/**/*.eml``)."""
    return sorted(Path(p) for p in glob.glob(str(FIXTURES / "**" / "*.eml"), recursive=True))


def generated_mails(n: int, *, seed: int, fault_rate: float = 0.1, mailboxes=None):
    """``n`` generated mails: every procedure, every fault type once, then the benchmark mix."""
    from protocols.kim.generator import SUPPORTED_FAULTS, MailGenerator, make_pki
    from protocols.kim.procedures import Procedure

    # signed under the local stack's trusted TEST-ONLY PKI (seed 0); content varies by seed
    gen = MailGenerator(seed=seed, pki=make_pki(0), mailboxes=mailboxes, oversize_bytes=2 * 1024 * 1024)
    out = [gen.eau()]  # a valid eAU first (duplicates and Storno refer to it)
    for proc in (Procedure.EAU_LIEFERUNG, Procedure.EAU_STORNO, Procedure.EEB_ANFRAGE, Procedure.EBZ,
                 Procedure.AAR, Procedure.EMAILPLUS):
        for fault in sorted(SUPPORTED_FAULTS[proc], key=str):
            out.append(gen.generate(proc, fault))
    if n > len(out):
        out.extend(gen.mix(n - len(out), fault_rate=fault_rate))
    return out if n >= len(out) else out[:n]


async def demo(cfg, router, console) -> None:
    """Fill the mailboxes with KIM mails, show live progress until all are terminal."""
    import random

    import redis.asyncio as aioredis
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from actors.kim.ledger import read_ledger, render_ledger
    from actors.kim.mailbox import mail_id_of
    from actors.runtime.crypto import Pseudonymizer
    from deploy.stack import LocalStack

    stack = LocalStack(cfg)
    pseudo = Pseudonymizer.from_file(cfg.crypto.pseudonym_key_file)
    users = [m.user for m in cfg.kim.mailboxes]
    n = 300
    console.print(f"[bold]KIM demo[/]: generating {n} KIM mails (every procedure, faults included) "
                  f"+ {len(fixture_mails())} real fixture mails into {len(users)} mailboxes ...")
    mails = await asyncio.to_thread(generated_mails, n, seed=random.randrange(1 << 30), fault_rate=0.1)
    tag = f"X-Automat-Demo-Run: {time.time_ns()}\r\n".encode()  # fixtures: new content hash per run
    raws = [m.raw for m in mails] + [tag + p.read_bytes() for p in fixture_mails()]
    ids = set()
    t0 = time.monotonic()
    for i, raw in enumerate(raws):
        stack.deliver_maildir(users[i % len(users)], raw)
        ids.add(mail_id_of(pseudo, raw))
    console.print(f"delivered {len(raws)} mails ({len(ids)} distinct) in {time.monotonic() - t0:.1f} s; "
                  "the mailbox actors pick them up over IMAPS ...")
    r = aioredis.from_url(cfg.redis.url)
    try:
        t0 = time.monotonic()
        cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn())
        with Progress(*cols, console=console) as prog:
            task = prog.add_task("mails terminal", total=len(ids), info="")
            led = await read_ledger(r, ids)
            while True:
                led = await read_ledger(r, ids)
                el = max(1e-6, time.monotonic() - t0)
                prog.update(task, completed=led.terminal,
                            info=f"received {led.received}  done {led.done}  rejected {led.rejected}  "
                                 f"parked {led.parked}  in flight {led.in_flight}  {led.terminal / el:.1f} mails/s")
                if led.terminal >= len(ids):
                    break
                await asyncio.sleep(0.5)
        el = time.monotonic() - t0
        console.print(f"all {len(ids)} mails terminal in {el:.1f} s ({len(ids) / el:.1f} mails/s)")
        render_ledger(led, console)
        console.print("operator view: `automat mails list|parked|show ID|redrive ID|ledger`; "
                      "dashboard: http://127.0.0.1:8265")
    finally:
        await r.aclose()
