"""Several Ray nodes on one machine: the KIM pipeline spread over them, a node killed.

``run_cluster(workers=3, mails=400, kill=True)`` starts a Ray cluster of its own
(``ray.cluster_utils.Cluster``: a head node with ``num_cpus=0`` — supervisors, the
driver — and ``workers`` worker nodes with 2 CPUs each and the resource ``mail_worker``),
starts the KIM shard hosts there (stateshifter ``kim.slip`` and step pool ``kim.worker``,
``workers`` hosts each, ``runtime.host_num_cpus=0.5`` and ``SPREAD``, so they spread over
the worker nodes), feeds generated KIM mails (every procedure, 10 % faults) at the
mailbox actors' hand-over point (claim check in the blob store + ``Receive`` to the
slip — what a mailbox actor does after its IMAP fetch) and waits until every mail is
terminal. With ``kill``, the worker node with the most hosts is killed (raylet and all
its workers, no grace) once a third of the mails are terminal: its hosts come back on the
remaining nodes (their supervisor runs on the head), the router re-sends what was in
flight, slips re-dispatch lost step orders (watchdog), nothing is lost or doubled.

Everything lives in Redis database ``redis_db`` (default 9) of the local stack, so the
run's kinds, slips and shard maps never meet those of other test sessions; it is
flushed before and after the run. Result: a dict (mails/s, ledger, placement before
and after, the kill and its recovery). ``python -m deploy.multinode --help``;
``automat scale nodes`` runs it for 1, 2, 3 worker nodes and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ROOT_NAME = "automat.multinode.root"
CONTROL = "automat_control"  # only the head node has it


def cluster_config(cfg, workers: int, redis_db: int, *, step_timeout_s: float = 5.0):
    """A copy of ``cfg`` for the multi-node run (own Redis database, hosts spread)."""
    c = cfg.model_copy(deep=True)
    base = c.redis.url.rsplit("/", 1)[0] if c.redis.url.count("/") >= 3 else c.redis.url
    c.redis.url = f"{base}/{redis_db}"
    c.runtime.host_num_cpus = 0.5
    c.runtime.host_scheduling = "SPREAD"
    c.kim.slip_hosts = workers
    c.kim.worker_hosts = workers
    c.kim.step_timeout_s = step_timeout_s
    c.runtime.control_resource = CONTROL  # supervisors stay on the head
    c.autoscale.enabled = False  # fixed pool sizes: the runs compare node counts
    return c


def kim_hosts_spec(cfg):
    from actors.kim.app import kinds
    from actors.runtime.system import host_child_specs
    from deploy.app import pin_control
    from supervisors.spec import ChildSpec, SupervisorSpec

    hosts = [ChildSpec(**d) for k in kinds(cfg) for d in host_child_specs(cfg, k)]
    kim = SupervisorSpec(name="kim", strategy="one_for_one", max_restarts=50, max_seconds=60, parallel_start=True,
                         children=hosts)
    return pin_control(SupervisorSpec(name="root", strategy="one_for_one", children=[kim]),
                       cfg.runtime.control_resource)


def placement(tree: dict) -> dict[str, str]:
    """Host child name -> node id (from the supervision tree)."""
    out: dict[str, str] = {}

    def walk(node: dict) -> None:
        for c in node.get("children", []):
            if c.get("kind") == "supervisor":
                walk(c)
            elif ".host." in c["name"]:
                out[c["name"]] = (c.get("node_id") or "") if c.get("state") == "running" else ""

    walk(tree)
    return out


def make_mails(n: int, seed: int, tag: str) -> list[bytes]:
    from actors.kim.app import generated_mails

    return [f"X-Automat-Multinode-Run: {tag}\r\n".encode() + m.raw
            for m in generated_mails(n, seed=seed, fault_rate=0.1)]


async def _feed(cfg, router, raws: list[bytes], pseudo, blobs) -> tuple[list[str], float]:
    """Claim check + ``Receive`` for every mail (as a mailbox actor does); returns ids."""
    from actors.kim.mailbox import BLOB_KIND, mail_id_of
    from actors.kim.slip import Receive
    from protocols.kim.roadmap import peek_procedure

    sem = asyncio.Semaphore(200)
    ids: list[str] = []
    t0 = time.monotonic()

    async def one(i: int, raw: bytes) -> None:
        async with sem:
            ref = await asyncio.to_thread(blobs.put, raw, kind=BLOB_KIND)
            mid = mail_id_of(pseudo, raw)
            ids.append(mid)
            await router.ask("kim.slip", mid, Receive(
                mail_id=mid, mailbox=f"kasse{1 + i % 20:02d}", blob=ref, size=len(raw), uid=i + 1,
                procedure=peek_procedure(raw).value, received_at=time.time()), timeout_s=120)

    await asyncio.gather(*(one(i, r) for i, r in enumerate(raws)))
    return ids, time.monotonic() - t0


async def _drive(cfg, cluster, raws: list[bytes], kill: bool, timeout_s: float, log) -> dict:
    import ray
    import redis.asyncio as aioredis

    from actors.kim.app import kinds
    from actors.kim.core_system import SqliteCoreSystem
    from actors.kim.ledger import read_ledger
    from actors.kim.mailbox import mail_id_of
    from actors.runtime.blobs import BlobStore
    from actors.runtime.crypto import KeyRing, Pseudonymizer
    from actors.runtime.router import Router, register_kinds
    from supervisors.supervisor import start_root, stop_root

    r = aioredis.from_url(cfg.redis.url)
    await r.flushdb()
    await register_kinds(r, kinds(cfg))
    head = cluster.head_node.node_id
    out: dict[str, Any] = {"workers": len(cluster.worker_nodes), "mails": len(raws)}
    t_start = time.monotonic()
    root = await asyncio.to_thread(start_root, kim_hosts_spec(cfg), namespace=cfg.runtime.namespace, name=ROOT_NAME)
    out["start_s"] = round(time.monotonic() - t_start, 1)
    tree = await root.tree.remote()
    before = placement(tree)
    out["control_on_head"] = tree["node_id"] == head and all(
        c.get("node_id") == head for c in tree["children"] if c.get("kind") == "supervisor")
    out["placement_before"] = _by_node(before, cluster)
    log(f"  {len(cluster.worker_nodes)} worker node(s); hosts per node: {out['placement_before']}")
    pseudo = Pseudonymizer.from_file(cfg.crypto.pseudonym_key_file)
    blobs = BlobStore(cfg.blob.dir, KeyRing.from_file(cfg.crypto.keys_file))
    router = Router(cfg)
    want = {mail_id_of(pseudo, raw) for raw in raws}
    out["distinct"] = len(want)  # an exact duplicate mail (same bytes) is one mail id
    t0 = time.monotonic()
    feeder = asyncio.create_task(_feed(cfg, router, raws, pseudo, blobs))
    killed: dict[str, Any] | None = None
    samples = []
    led = None
    t_all: float | None = None  # when the last mail was terminal
    while time.monotonic() - t0 < timeout_s:
        # before the kill, look often: a fused eAU needs 3 slip round trips, and a 0.5 s poll
        # once saw 142 of 150 mails terminal at its first look past a third
        await asyncio.sleep(0.1 if kill and killed is None else 0.5)
        if feeder.done() and "feed_s" not in out:
            out["feed_s"] = round(feeder.result()[1], 2)
        led = await read_ledger(r, want)
        samples.append((round(time.monotonic() - t0, 1), led.terminal))
        if kill and killed is None and led.terminal >= len(raws) // 3:
            killed = await _kill_busiest(cfg, cluster, root, log)
            killed["at_terminal"] = led.terminal
            killed["t"] = round(time.monotonic() - t0, 1)
        if killed is not None and "recovered_s" not in killed:
            now_place = placement(await root.tree.remote())
            if all(n and n != killed["node_id"] for n in now_place.values()):
                killed["recovered_s"] = round(time.monotonic() - killed["_t0"], 1)
                killed["placement_after"] = _by_node(now_place, cluster)
                log(f"  hosts of the killed node serving again on the others after {killed['recovered_s']} s: "
                    f"{killed['placement_after']}")
        if led.terminal >= len(want):
            t_all = t_all or time.monotonic()
            if killed is None or "recovered_s" in killed:
                break  # all terminal - and after a kill, its hosts serve again (the mails may be faster)
    elapsed = (t_all or time.monotonic()) - t0
    await feeder
    out["seconds"] = round(elapsed, 1)
    out["mails_per_s"] = round(len(raws) / elapsed, 1)
    out["ledger"] = led.model_dump(exclude={"by_procedure"}) if led else None
    out["not_terminal"] = len(want) - (led.terminal if led else 0)  # at the end: none in flight, none missing
    core = SqliteCoreSystem.for_config(cfg)
    try:
        deposits = Counter(rec["idempotency_key"].split(":", 1)[1] for rec in core.records())
    finally:
        core.close()
    out["deposits"] = sum(deposits[m] for m in want)
    out["duplicates"] = sum(deposits[m] - 1 for m in want if deposits[m] > 1)
    out["samples"] = samples
    if killed is not None:
        killed.pop("_t0", None)
        out["kill"] = killed
    stats = await asyncio.gather(*(_host_stats(cfg, name) for name in before))
    out["handled_by_node"] = _handled_by_node(stats, cluster)  # hosts alive at the end (a restart resets)
    await router.close()
    await asyncio.to_thread(stop_root, namespace=cfg.runtime.namespace, name=ROOT_NAME)
    await r.flushdb()
    await r.aclose()
    return out


async def _host_stats(cfg, name: str) -> dict:
    from supervisors.resolve import resolve_async

    try:
        h = await resolve_async(name, namespace=cfg.runtime.namespace, timeout_s=5)
        st = await h.stats.remote()
        info = await h.supervised_info.remote()
        return {"host": name, "node_id": info["node_id"], "messages": st["messages"]}
    except Exception:
        return {"host": name, "node_id": "", "messages": 0}


def _node_label(cluster, node_id: str) -> str:
    if not node_id:
        return "down"
    if node_id == cluster.head_node.node_id:
        return "head"
    for i, n in enumerate(sorted(cluster._all_worker_ids, key=lambda x: x[0])):
        if n[1] == node_id:
            return f"worker{n[0]}"
    return node_id[:8]


def _by_node(place: dict[str, str], cluster) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for host, node in sorted(place.items()):
        out.setdefault(_node_label(cluster, node), []).append(host)
    return out


def _handled_by_node(stats: list[dict], cluster) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in stats:
        k = _node_label(cluster, s["node_id"])
        out[k] = out.get(k, 0) + s["messages"]
    return out


async def _kill_busiest(cfg, cluster, root, log) -> dict:
    place = placement(await root.tree.remote())
    per = Counter(n for n in place.values() if n)
    workers = {n.node_id: n for n in cluster.worker_nodes}
    victim_id = max((nid for nid in per if nid in workers), key=lambda nid: per[nid])
    label = _node_label(cluster, victim_id)
    hosts = sorted(h for h, n in place.items() if n == victim_id)
    log(f"  killing {label} (raylet + workers, no grace) with {hosts}")
    t0 = time.monotonic()
    await asyncio.to_thread(cluster.remove_node, workers[victim_id], False)
    return {"node": label, "node_id": victim_id, "hosts": hosts, "_t0": t0}


def _retry(make, what: str, log, attempts: int = 5):
    """Ray gives a node 30 s to register; on a machine under load that is sometimes short."""
    for i in range(attempts):
        try:
            return make()
        except Exception as e:  # "The current node timed out during startup"
            if i == attempts - 1:
                raise
            log(f"  {what} did not come up ({str(e)[:80]}); again")
            time.sleep(10)


def run_cluster(cfg, *, workers: int, raws: list[bytes], kill: bool = False, redis_db: int = 9,
                timeout_s: float = 240.0, log=print) -> dict:
    """One run on a fresh local cluster of ``workers`` worker nodes (see the module doc)."""
    import ray
    from ray.cluster_utils import Cluster

    from deploy.app import ray_env

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.pop("RAY_ADDRESS", None)
    ccfg = cluster_config(cfg, workers, redis_db)
    cluster = _retry(lambda: Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "resources": {CONTROL: 100}, "include_dashboard": False}), "head node", log)
    cluster._all_worker_ids = []
    try:
        for i in range(workers):
            node = _retry(lambda: cluster.add_node(num_cpus=2, resources={"mail_worker": 1}), f"worker node {i + 1}",
                          log)
            cluster._all_worker_ids.append((i + 1, node.node_id))
        env = ray_env(ccfg)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        env.pop("AUTOMAT_CONFIG", None)
        ray.init(address=cluster.address, namespace=ccfg.runtime.namespace, runtime_env={"env_vars": env},
                 log_to_driver=False)
        cluster.wait_for_nodes()
        try:
            return asyncio.run(_drive(ccfg, cluster, raws, kill, timeout_s, log))
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()


def main(argv: list[str] | None = None, cfg=None) -> int:
    from actors.runtime.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,2,3", help="worker node counts, e.g. 1,2,3")
    ap.add_argument("--mails", type=int, default=400)
    ap.add_argument("--kill", action="store_true", help="kill the busiest worker node mid-run (last count)")
    ap.add_argument("--redis-db", type=int, default=9)
    ap.add_argument("--seed", type=int, default=9)
    ap.add_argument("--timeout", type=float, default=240.0)
    ap.add_argument("--json", type=Path, help="write the results here")
    a = ap.parse_args(argv)
    cfg = cfg or load_config()
    counts = [int(x) for x in a.workers.split(",") if x]
    results = []
    for i, w in enumerate(counts):
        kill = a.kill and i == len(counts) - 1
        tag = f"{time.time_ns()}-{w}"
        t = time.monotonic()
        raws = make_mails(a.mails, a.seed + i, tag)
        print(f"[{w} worker node(s){', node kill' if kill else ''}] {len(raws)} mails generated in "
              f"{time.monotonic() - t:.1f} s", flush=True)
        res = run_cluster(cfg, workers=w, raws=raws, kill=kill, redis_db=a.redis_db, timeout_s=a.timeout,
                          log=lambda s: print(s, flush=True))
        led = res["ledger"] or {}
        print(f"  {res['mails']} mails in {res['seconds']} s = {res['mails_per_s']} mails/s; "
              f"done {led.get('done')} rejected {led.get('rejected')} parked {led.get('parked')} "
              f"in flight {led.get('in_flight')}; not terminal {res['not_terminal']}, duplicates "
              f"{res['duplicates']}; "
              f"messages by node {res['handled_by_node']}", flush=True)
        results.append(res)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1, default=str))
    return 0 if all(r["not_terminal"] == 0 and r["duplicates"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
