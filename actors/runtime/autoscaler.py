"""The app-level autoscaler ``autoscaler`` (a supervised child of the ``infra`` subtree).

Every ``autoscale.interval_s`` it looks at each configured pool — the shard hosts of one
entity kind: the KIM step worker pool ``kim.worker``, the stateshifter ``kim.slip``, any
other kind — and

- reads the load of every host (``ShardHost.load()``): messages in flight (delivered, not
  yet answered, plus held), p95 batch latency over the last 10 s, event-loop lag;
- **grows** the pool when the backlog per host is above ``up_backlog`` or the worst p95
  above ``up_latency_ms`` for ``up_after_s`` — to as many hosts as the backlog asks for
  (``backlog / up_backlog``, at least ``step`` more) in one handover — **shrinks** it by one
  when both are below the ``down_*`` marks for ``down_after_s`` — between ``min_hosts``
  (default: the kind's configured host count) and ``max_hosts``, with ``cooldown_s`` after every change (hysteresis: the two marks
  and the two durations differ, so a pool does not flap);
- grows by asking the owning supervisor for one more host child
  (``Supervisor.add_child``), then hands shards over to it (``actors.runtime.rebalance``);
  shrinks by handing the highest host's shards to the others, then removing it;
- grows only by as many hosts as the CPU of the pool's nodes can feed: each host reports
  its node's CPU share and its own CPU use (``actors.runtime.nodecpu``; smoothed here);
  the CPU left below ``grow_max_node_busy`` divided by what one host of the pool uses now
  is how many more fit. None fit (every node saturated, no other node in the cluster):
  no growth - more host processes on full cores add Ray overhead and no CPU (the 240k load
  test grew ``kim.worker`` 2 -> 8 on 2 cores, twice: once on backlog alone, once when the
  node read 89 % busy for a tick) - a ``hold`` event once per episode (it ends when the
  backlog stayed low for ``down_after_s``) and a request to Ray for a node; growth
  resumes when a node has CPU again (or a new one joined);
- asks Ray for capacity (``ray.autoscaler.sdk.request_resources``) when a new host does
  not fit on the nodes there are (hosts carry ``runtime.host_num_cpus``), so Ray's own
  autoscaler (cluster launcher / KubeRay) adds a worker node; the request is lowered
  again when pools shrink;
- reconciles: a host in the map that its supervisor does not have (that supervisor was
  restarted and came back with its spec's children only) is added again; a host child
  that is not in the map is removed; an interrupted handover is finished.

``status()`` shows the pools, the last signals and a timeline of decisions;
``set_hosts(kind, n)`` resizes a pool by hand (the automatic bounds still apply later).
Metrics: ``automat_pool_hosts``, ``automat_pool_backlog``, ``automat_pool_latency_seconds``,
``automat_scale_decisions_total``, ``automat_shard_moves_total``, ``automat_handover_seconds``,
``automat_capacity_requests_total``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import redis.asyncio as aioredis

from actors.runtime import metrics
from actors.runtime.kinds import EntityKind
from actors.runtime.rebalance import default_host_resolver, rebalance
from actors.runtime.router import KINDS_KEY
from actors.runtime.shardmap import cluster_epoch, load_map
from actors.runtime.system import host_actor_options, host_child_spec
from supervisors.child import Supervised

log = logging.getLogger("automat.autoscaler")

AUTOSCALER_NAME = "autoscaler"
_EVENTS_MAX = 500


class _Pool:
    def __init__(self, policy) -> None:
        self.policy = policy
        self.kind: EntityKind | None = None
        self.hosts: list[int] = []
        self.version = 0
        self.above_since: float | None = None
        self.below_since: float | None = None
        self.last_change = 0.0
        self.action: asyncio.Task | None = None
        self.signal: dict[str, Any] = {}
        self.note = ""
        self.moving = False
        self.node_busy: dict[str, float] = {}  # node id -> smoothed CPU share (hosts' reports)
        self.node_cpus: dict[str, float] = {}  # node id -> CPUs it gives us
        self.host_cpu: float | None = None  # smoothed CPU (cores) one host of the pool uses
        self.holding = False  # a grow is held back: every node saturated

    @property
    def busy(self) -> bool:
        return self.action is not None and not self.action.done()


class Autoscaler(Supervised):
    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.acfg = cfg.autoscale
        self.ns = cfg.runtime.namespace
        self.pools = {p.kind: _Pool(p) for p in self.acfg.pools}
        self.events: list[dict] = []
        self._redis: Any = None
        self._resolve = default_host_resolver(self.ns, timeout_s=2.0)  # load(): a missing host is skipped
        self._resolve_move = default_host_resolver(self.ns, timeout_s=10.0)  # handovers wait for restarts
        self._handles: dict[str, Any] = {}
        self._requested: list[dict] | None = None
        self._t0 = time.time()
        self._epoch = cluster_epoch()
        self._ticks = 0
        self._errors = 0
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = asyncio.get_event_loop()
        self._task = loop.create_task(self._run())

    # ---- public ------------------------------------------------------------------------
    async def status(self) -> dict:
        return {
            "enabled": self.acfg.enabled, "interval_s": self.acfg.interval_s, "ticks": self._ticks,
            "errors": self._errors, "requested": self._requested,
            "pools": {k: {"hosts": p.hosts, "version": p.version, "min": self._min(p),
                          "max": p.policy.max_hosts, "busy": p.busy, "signal": p.signal, "note": p.note}
                      for k, p in self.pools.items()},
            "events": self.events[-50:],
        }

    async def timeline(self) -> list[dict]:
        return list(self.events)

    async def set_hosts(self, kind: str, n: int) -> dict:
        """Resize a pool now (operator); waits for the resize. Returns the pool's status."""
        p = self.pools.get(kind)
        if p is None:
            raise KeyError(f"no autoscaled pool {kind!r}; configured: {sorted(self.pools)}")
        while p.busy:
            await asyncio.sleep(0.05)
        await self._refresh(p)
        if p.kind is None:
            raise RuntimeError(f"kind {kind} is not registered (not running?)")
        n = max(1, min(n, self.cfg.runtime.num_shards))
        p.action = asyncio.get_running_loop().create_task(self._resize(p, n, "operator"))
        await p.action
        return (await self.status())["pools"][kind]

    async def on_stop(self) -> None:
        self._task.cancel()
        for p in self.pools.values():
            if p.action is not None:
                p.action.cancel()
        if self._redis is not None:
            await self._redis.aclose()

    # ---- the loop -------------------------------------------------------------------------
    def _r(self):
        if self._redis is None:
            self._redis = aioredis.from_url(self.cfg.redis.url)
        return self._redis

    def _event(self, p: _Pool, action: str, **data: Any) -> dict:
        ev = {"t": round(time.time() - self._t0, 2), "at": time.time(), "kind": p.policy.kind, "action": action,
              **data}
        self.events.append(ev)
        del self.events[:-_EVENTS_MAX]
        log.warning("autoscaler %s %s: %s", p.policy.kind, action,
                    {k: v for k, v in data.items() if k not in ("report",)})
        return ev

    async def _run(self) -> None:
        if not self.acfg.enabled:
            return
        while True:
            t0 = time.monotonic()
            try:
                for p in self.pools.values():
                    if not p.busy:
                        await self._tick(p)
                self._ticks += 1
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._errors += 1
                log.warning("autoscaler tick failed: %s: %s", type(e).__name__, e)
            await asyncio.sleep(max(0.05, self.acfg.interval_s - (time.monotonic() - t0)))

    async def _refresh(self, p: _Pool) -> None:
        if p.kind is None:
            raw = await self._r().hget(KINDS_KEY, p.policy.kind)
            if raw is None:
                p.note = "kind not registered"
                return
            p.kind = EntityKind.model_validate_json(raw)
        m = await load_map(self._r(), p.kind.name, p.kind.host_count(self.cfg), self.cfg.runtime.num_shards,
                           self._epoch)
        p.hosts, p.version = list(m.hosts), m.version
        p.moving = bool(m.moving)

    async def _host(self, name: str):
        h = self._handles.get(name)
        if h is None:
            h = await self._resolve(name)
            if h is not None:
                self._handles[name] = h
        return h

    async def _load(self, name: str) -> dict | None:
        try:
            h = await self._host(name)
            if h is None:
                return None
            return await asyncio.wait_for(h.load.remote(), 5.0)
        except Exception:
            self._handles.pop(name, None)
            return None

    async def _supervisor(self, p: _Pool):
        from supervisors.resolve import resolve_async

        try:
            return await resolve_async(p.policy.supervisor, namespace=self.ns, timeout_s=2.0)
        except LookupError:
            return None

    async def _tick(self, p: _Pool) -> None:
        await self._refresh(p)
        if p.kind is None:
            return
        pol, now = p.policy, time.monotonic()
        if p.moving:  # a handover was interrupted: finish it
            p.action = asyncio.get_running_loop().create_task(self._resize(p, len(p.hosts), "resume handover"))
            return
        sup = await self._supervisor(p)
        if sup is None:
            p.note = f"supervisor {pol.supervisor} not running"
            return
        # reconcile the supervisor's host children with the map
        children = {c["name"]: c for c in await sup.which_children.remote()}
        prefix = f"{p.kind.name}.host."
        missing = [i for i in p.hosts if p.kind.host_name(i) not in children]
        extra = [c for name, c in children.items() if name.startswith(prefix)
                 and name[len(prefix):].isdigit() and int(name[len(prefix):]) not in p.hosts
                 and p.version > 0]
        if missing or extra:
            p.action = asyncio.get_running_loop().create_task(self._reconcile(p, sup, missing, extra))
            return
        loads = await asyncio.gather(*(self._load(p.kind.host_name(i)) for i in p.hosts))
        seen = [x for x in loads if x]
        lo = self._min(p)
        if len(seen) < len(p.hosts) and lo <= len(p.hosts) <= pol.max_hosts:
            # a host did not answer (restarting, or too busy even for its control thread):
            # keep the hysteresis timers as they are, decide on the next tick
            p.note = f"{len(p.hosts) - len(seen)} host(s) not answering"
            return
        backlog = sum(x["inflight"] + x["held"] for x in seen)
        per_host = backlog / max(1, len(p.hosts))
        lat = max((x["lat_p95_ms"] for x in seen), default=0.0)
        lag = max((x["loop_lag_ms"] for x in seen), default=0.0)
        for x in seen:
            b, node = x.get("node_cpu_busy"), x.get("node") or ""
            if b is not None:
                old = p.node_busy.get(node)
                p.node_busy[node] = b if old is None else 0.5 * old + 0.5 * b
                p.node_cpus[node] = float(x.get("node_cpus") or 1.0)
        cpus = [x["cpu"] for x in seen if x.get("cpu") is not None]
        if cpus:
            mean = sum(cpus) / len(cpus)
            p.host_cpu = mean if p.host_cpu is None else 0.5 * p.host_cpu + 0.5 * mean
        p.note = ""
        p.signal = {"backlog": backlog, "per_host": round(per_host, 1), "lat_p95_ms": lat,
                    "loop_lag_ms": lag, "hosts_seen": len(seen),
                    "node_busy": {k[:8]: round(v, 2) for k, v in p.node_busy.items()}}
        metrics.POOL_HOSTS.set(len(p.hosts), kind=pol.kind)
        metrics.POOL_BACKLOG.set(backlog, kind=pol.kind)
        metrics.POOL_LATENCY.set(lat / 1000.0, kind=pol.kind)
        up = per_host > pol.up_backlog or lat > pol.up_latency_ms
        down = per_host < pol.down_backlog and lat < pol.down_latency_ms
        p.above_since = (p.above_since or now) if up else None
        p.below_since = (p.below_since or now) if down else None
        n = len(p.hosts)
        target = n
        reason = ""
        if n < lo:
            target, reason = lo, "below min_hosts"
        elif n > pol.max_hosts:
            target, reason = pol.max_hosts, "above max_hosts"
        elif now - p.last_change >= pol.cooldown_s:
            if up and now - p.above_since >= pol.up_after_s and n < pol.max_hosts:
                # as many hosts as the backlog asks for (at least `step` more): one handover
                target = min(pol.max_hosts, max(n + pol.step, math.ceil(backlog / pol.up_backlog)))
                reason = (f"backlog {per_host:.0f}/host > {pol.up_backlog:g}" if per_host > pol.up_backlog
                          else f"p95 {lat:.0f} ms > {pol.up_latency_ms:g}")
            elif down and now - p.below_since >= pol.down_after_s and n > lo:
                target = n - 1
                reason = f"backlog {per_host:.1f}/host < {pol.down_backlog:g}, p95 {lat:.0f} ms for {pol.down_after_s:g} s"
        if target > n and reason != "below min_hosts":
            fit = await self._fit(p)
            if fit is not None and fit < target - n:
                if fit <= 0:
                    p.note = (f"grow held: no CPU left below {pol.grow_max_node_busy:.0%} on the pool's "
                              f"node(s) ({reason})")
                    if not p.holding:
                        p.holding = True
                        self._event(p, "hold", hosts_before=n, wanted=target, reason=p.note,
                                    signal=dict(p.signal))
                        await self._capacity(p, target - n, force=True)
                    return
                reason += f"; {fit} more fit the free CPU (wanted {target - n})"
                target = n + fit
        if p.holding and down and now - p.below_since >= pol.down_after_s:
            # the episode is over when the pressure has stayed low as long as a shrink waits -
            # not at one tick's dip (a driver starved of CPU refills its asks late: the
            # backlog read 0 for a tick, and the next tick held and asked Ray again)
            p.holding = False
        if target != n:
            p.holding = False
            p.action = asyncio.get_running_loop().create_task(self._resize(p, target, reason))

    def _min(self, p: _Pool) -> int:
        """The pool's floor: ``min_hosts``, or the kind's configured host count."""
        if p.policy.min_hosts is not None:
            return p.policy.min_hosts
        configured = p.kind.host_count(self.cfg) if p.kind is not None else 1
        return max(1, min(p.policy.max_hosts, configured))

    async def _alive_nodes(self) -> list[str] | None:
        """Node ids of the cluster's live nodes (None: Ray cannot tell)."""
        try:
            import ray

            return await asyncio.to_thread(lambda: [n["NodeID"] for n in ray.nodes() if n.get("Alive")])
        except Exception:
            return None

    async def _fit(self, p: _Pool) -> int | None:
        """How many more hosts of this pool the CPU of its nodes can feed: the nodes' CPU
        left below ``grow_max_node_busy`` over what one host of the pool uses now (its
        hosts' mean, at least 0.1 core). None: no limit (guard off, no readings yet, or a
        live node without a host of this pool - it may have room)."""
        lim = p.policy.grow_max_node_busy
        if lim >= 1.0 or not p.node_busy:
            return None
        alive = await self._alive_nodes()
        if alive is not None and set(alive) - set(p.node_busy):
            return None
        free = sum(max(0.0, lim - b) * p.node_cpus.get(node, 1.0) for node, b in p.node_busy.items())
        need = max(0.1, p.host_cpu or 0.0)
        return int(free / need)

    # ---- actions ----------------------------------------------------------------------------

    async def _reconcile(self, p: _Pool, sup, missing: list[int], extra: list[dict]) -> None:
        try:
            for i in missing:
                self._event(p, "re-add", host=p.kind.host_name(i), reason="in the map, not in its supervisor")
                await sup.add_child.remote(host_child_spec(self.cfg, p.kind, i))
            for c in extra:
                self._event(p, "remove-extra", host=c["name"], reason="not in the map")
                await sup.remove_child.remote(c["name"], "not in the shard map")
                self._handles.pop(c["name"], None)
        except Exception as e:
            self._errors += 1
            log.warning("reconcile of %s failed: %s", p.policy.kind, e)

    def _shape(self, p: _Pool) -> dict:
        cpus = host_actor_options(p.kind, self.cfg).get("num_cpus") or 0
        return {"CPU": cpus} if cpus > 0 else {}

    async def _capacity(self, p: _Pool, adding: int, force: bool = False) -> None:
        """Ask Ray for nodes when the hosts to add do not fit on the nodes there are
        (``force``: they would fit, but the nodes' CPUs are saturated)."""
        shape = self._shape(p) or ({"CPU": 1.0} if force else {})
        if not shape or not self.acfg.request_resources:
            return
        import ray

        avail = ray.available_resources().get("CPU", 0.0)
        need = shape["CPU"] * adding
        if force:  # Ray's free CPUs are reservations, not what the node's cores have left
            total = ray.cluster_resources().get("CPU", 0.0)
            bundles = [{"CPU": 1.0}] * math.ceil(total + need)  # more than the cluster has: a node
            await self._request(bundles, p, f"{adding} host(s) wanted, every node's CPU saturated")
            return
        if avail + 1e-9 >= need:
            return
        bundles = []
        for q in self.pools.values():
            s = self._shape(q) if q.kind is not None else {}
            if s:
                n = len(q.hosts) + (adding if q is p else 0)
                bundles.extend([dict(s)] * n)
        await self._request(bundles, p, f"{adding} host(s) of {shape['CPU']:g} CPU do not fit "
                                         f"({avail:g} CPU free)")

    async def _request(self, bundles: list[dict], p: _Pool, why: str) -> None:
        if bundles == self._requested:
            return
        from ray.autoscaler.sdk import request_resources

        try:
            await asyncio.to_thread(request_resources, bundles=bundles)
            self._requested = bundles
            metrics.CAPACITY_REQUESTS.inc()
            self._event(p, "request_resources", bundles=len(bundles), cpus=sum(b.get("CPU", 0) for b in bundles),
                        reason=why)
        except Exception as e:
            log.warning("request_resources failed: %s", e)

    async def _resize(self, p: _Pool, target: int, reason: str) -> None:
        t0 = time.monotonic()
        before = list(p.hosts)
        sup = await self._supervisor(p)
        try:
            if sup is None:
                raise RuntimeError(f"supervisor {p.policy.supervisor} not running")
            if target > len(before):
                free = [i for i in range(self.cfg.runtime.num_shards) if i not in before]
                new = free[: target - len(before)]
                await self._capacity(p, len(new))
                started = await asyncio.gather(
                    *(sup.add_child.remote(host_child_spec(self.cfg, p.kind, i)) for i in new),
                    return_exceptions=True)
                ok = [i for i, r in zip(new, started) if not isinstance(r, BaseException)]
                for i, r in zip(new, started):
                    if isinstance(r, BaseException):
                        self._event(p, "grow-failed", host=p.kind.host_name(i), reason=str(r)[:300])
                if not ok:
                    return
                nodes = sorted({r.get("node_id", "")[:8] for r in started if isinstance(r, dict)})
                report = await rebalance(self.cfg, self._r(), p.kind, before + ok, resolve=self._resolve_move)
                metrics.SCALE_DECISIONS.inc(kind=p.policy.kind, direction="up")
                self._event(p, "grow", hosts_before=len(before), hosts_after=len(before) + len(ok), reason=reason,
                            signal=dict(p.signal), moved=report["moved"], handover_s=report["seconds"],
                            nodes=nodes, seconds=round(time.monotonic() - t0, 2))
            elif target < len(before):
                keep = sorted(before)[:target]
                leave = [i for i in before if i not in keep]
                report = await rebalance(self.cfg, self._r(), p.kind, keep, resolve=self._resolve_move)
                for i in leave:
                    await sup.remove_child.remote(p.kind.host_name(i), "pool shrunk")
                    self._handles.pop(p.kind.host_name(i), None)
                metrics.SCALE_DECISIONS.inc(kind=p.policy.kind, direction="down")
                self._event(p, "shrink", hosts_before=len(before), hosts_after=len(keep), reason=reason,
                            signal=dict(p.signal), moved=report["moved"], handover_s=report["seconds"],
                            passivated=report.get("passivated", 0), seconds=round(time.monotonic() - t0, 2))
                if self._requested:
                    bundles = []
                    for q in self.pools.values():
                        s = self._shape(q) if q.kind is not None else {}
                        if s:
                            n = len(keep) if q is p else len(q.hosts)
                            bundles.extend([dict(s)] * n)
                    await self._request(bundles, p, "pool shrunk")
            else:  # same size: an interrupted handover to finish
                report = await rebalance(self.cfg, self._r(), p.kind, before, resolve=self._resolve_move)
                if report.get("resumed"):
                    self._event(p, "handover-resumed", reason=reason)
        except Exception as e:
            self._errors += 1
            self._event(p, "resize-failed", target=target, reason=f"{type(e).__name__}: {str(e)[:300]}")
        finally:
            p.last_change = time.monotonic()
            p.above_since = p.below_since = None
            try:
                await self._refresh(p)
            except Exception:
                pass
            metrics.POOL_HOSTS.set(len(p.hosts), kind=p.policy.kind)

