"""The two baselines of ``automat loadtest`` - same mails, same step code, same stores.

* **inline floor** (:func:`inline_floor`): every step called in a plain loop in this
  process (``actors.kim.steps.inline.run_mail_inline``), each step's blobs durable before
  the next step (``run_step(sync=True)``), the same SQLite core system, Redis duplicate
  index and SMTP sink - what the work itself costs on one core.
* **naive Ray** (:func:`naive_ray`): one Ray task per step per mail (``@ray.remote``
  function, default resources), the driver keeps each mail's facts and asks the road map
  what comes next - what a straightforward Ray program gets. Its state lives in the
  driver only (no durable transitions), which flatters it.

Both use their own blob folder, core-system file and duplicate-index prefix, so they do
not see the pipeline's run of the same mails as duplicates.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path


def _baseline_cfg(cfg, root: Path, name: str):
    c = cfg.model_copy(deep=True)
    c.blob.dir = root / name / "blobs"
    c.kim.core_db = root / name / "core.sqlite3"
    return c


async def _ports(cfg, dup_prefix: str):
    import redis.asyncio as aioredis

    from actors.kim.ports import RedisDuplicateIndex, make_ports

    r = aioredis.Redis.from_url(cfg.redis.url)
    ports = await make_ports(cfg, redis=r)
    ports.dupes = RedisDuplicateIndex(r, prefix=dup_prefix, ttl_s=3600)
    return ports


def _summary(name: str, n: int, wall: float, cpu: float, outcomes: dict, steps: int) -> dict:
    return {"name": name, "mails": n, "seconds": round(wall, 3), "mails_per_s": round(n / wall, 2) if wall else None,
            "cpu_s_per_mail": round(cpu / n, 5) if n else None, "steps": steps, "outcomes": outcomes}


async def inline_floor(cfg, raws: list[bytes], root: Path, run_id: str) -> dict:
    from actors.kim.steps.inline import run_mail_inline

    c = _baseline_cfg(cfg, root, "inline")
    ports = await _ports(c, f"kim:dup:lt:{run_id}:inline:")
    outcomes: dict[str, int] = {}
    steps = 0
    t0, c0 = time.monotonic(), time.process_time()
    for raw in raws:
        run = await run_mail_inline(raw, ports)
        key = f"{run.status}/{run.terminal}"
        outcomes[key] = outcomes.get(key, 0) + 1
        steps += len(run.trail)
    wall, cpu = time.monotonic() - t0, time.process_time() - c0
    await ports.redis.aclose()
    ports.core.close()
    return _summary("inline floor", len(raws), wall, cpu, outcomes, steps)


# ----------------------------------------------------------------------------- naive Ray
_WORKER: dict = {}


def _naive_step(cfg, dup_prefix: str, order_json: str) -> str:
    """One step in a Ray worker process (ports and event loop made once per process)."""
    from actors.kim.steps import run_step
    from protocols.kim.messages import StepOrder

    st = _WORKER.get(dup_prefix)
    if st is None:
        loop = asyncio.new_event_loop()
        ports = loop.run_until_complete(_ports(cfg, dup_prefix))
        st = _WORKER[dup_prefix] = (loop, ports)
    loop, ports = st
    res = loop.run_until_complete(run_step(StepOrder.model_validate_json(order_json), ports))
    return res.model_dump_json()


async def naive_ray(cfg, raws: list[bytes], root: Path, run_id: str, *, concurrency: int = 32) -> dict:
    import ray

    from actors.kim.steps import roadmap_for
    from actors.runtime.blobs import BlobStore
    from actors.runtime.crypto import KeyRing
    from protocols.kim.messages import StepOrder, StepResult
    from protocols.kim.roadmap import peek_procedure, select_roadmap

    c = _baseline_cfg(cfg, root, "naive")
    prefix = f"kim:dup:lt:{run_id}:naive:"
    step_task = ray.remote(_naive_step)
    blobs = BlobStore(c.blob.dir, KeyRing.from_file(c.crypto.keys_file))
    cfg_ref = ray.put(c)
    sem = asyncio.Semaphore(concurrency)
    outcomes: dict[str, int] = {}
    steps = 0

    async def one(i: int, raw: bytes) -> None:
        nonlocal steps
        async with sem:
            rm = roadmap_for(select_roadmap(peek_procedure(raw)))
            ref = await asyncio.to_thread(blobs.put, raw, kind="mail")
            facts: dict[str, str] = {}
            bl = {"raw": ref}
            step, attempt = rm.first, 1
            for _ in range(500):
                order = StepOrder(mail_id=f"naive-{run_id}-{i}", step=step, attempt=attempt, roadmap=rm.name,
                                  roadmap_version=rm.version, mailbox="naive", facts=dict(facts), blobs=dict(bl))
                res = StepResult.model_validate_json(await step_task.remote(cfg_ref, prefix, order.model_dump_json()))
                steps += 1
                facts.update(res.facts)
                bl.update(res.blobs)
                d = rm.decide(res)
                facts.update(d.facts)
                if d.action == "terminal":
                    key = f"{d.status}/{d.terminal}"
                    outcomes[key] = outcomes.get(key, 0) + 1
                    return
                step, attempt = d.next_step or step, d.attempt
            outcomes["no_terminal"] = outcomes.get("no_terminal", 0) + 1

    # warm-up: the worker processes start and build their ports before the clock runs
    warm = StepOrder(mail_id="warm", step="load_raw", attempt=1, roadmap="eau", roadmap_version=1, mailbox="naive",
                     blobs={"raw": "mail/00/" + "0" * 30})
    await asyncio.gather(*[step_task.remote(cfg_ref, prefix, warm.model_dump_json()) for _ in range(4)])
    t0 = time.monotonic()
    await asyncio.gather(*(one(i, raw) for i, raw in enumerate(raws)))
    wall = time.monotonic() - t0
    return _summary("naive Ray (one task per step)", len(raws), wall, 0.0, outcomes, steps)
