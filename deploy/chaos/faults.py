"""The faults a chaos run injects, and how each one's recovery is measured.

Every fault has a *kind* (what is done), a *target* (which actor / service) and a
*recovery time*: from the moment the fault hits (the SIGKILL, the crash of a service, the
end of a core-system episode) until the hit part **serves again**:

| kind | what | serving again when |
|---|---|---|
| ``kill:mailbox``      | SIGKILL a ``kim.mailboxes.N`` actor          | its next incarnation answers |
| ``kill:slip-host``    | SIGKILL a ``kim.slip.host.N`` (stateshifter) | idem |
| ``kill:worker-host``  | SIGKILL a ``kim.worker.host.N`` (steps)      | idem |
| ``kill:outbox-relay`` | SIGKILL ``outbox.relay``                     | idem |
| ``kill:supervisor``   | SIGKILL a subtree supervisor (kim, infra, efa, ...): its whole subtree dies with it | it and every child below it run again |
| ``kill:<cap>-host``   | SIGKILL a shard host of efa / moped / hl7 / tss | its next incarnation answers |
| ``restart:redis``     | SIGKILL redis-server, start it (AOF reload)   | it answers and the pipeline moved on (a mail became terminal) |
| ``restart:kafka``     | SIGKILL Tansu, start it (topics on SeaweedFS) | it answers and the outbox relay published again |
| ``restart:dovecot``   | SIGKILL Dovecot's tree, start it             | it answers and a new mail was received |
| ``drop:imap``         | SIGKILL Dovecot's ``imap`` connection processes | a new mail was received over a new connection |
| ``core:fail``         | the core system raises for a few seconds      | a deposit succeeded after the episode |
| ``core:hang``         | core calls hang (past the step timeout)       | idem |
| ``core:slow``         | core calls take seconds                       | idem |

"The pipeline moved on" falls back to "nothing was left to do" when the load is over.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from pydantic import BaseModel

KILL_KINDS = ("kill:mailbox", "kill:slip-host", "kill:worker-host", "kill:outbox-relay", "kill:supervisor",
              "kill:efa-host", "kill:moped-host", "kill:hl7-host", "kill:tss-host")
SERVICE_KINDS = ("restart:redis", "restart:kafka", "restart:dovecot", "drop:imap")
CORE_KINDS = ("core:fail", "core:hang", "core:slow")
ALL_KINDS = KILL_KINDS + SERVICE_KINDS + CORE_KINDS

#: core-system fault specs (see actors/kim/core_faults.py); ``{hang}`` = seconds a call hangs
CORE_SPECS = {"core:fail": "error=1.0", "core:hang": "timeout=1.0,timeout_s={hang}", "core:slow": "slow=1.0,slow_s=2.0"}
#: always on during a chaos run: a few deposits whose reply is lost (exercises idempotency)
CORE_BACKGROUND = "lost_reply=0.02,error=0.01"


class FaultRecord(BaseModel):
    kind: str
    target: str
    at_s: float  # seconds since the run started
    recovery_s: float | None = None  # None: did not recover within the limit
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.recovery_s is not None


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(faults: list[FaultRecord]) -> dict[str, dict[str, Any]]:
    """kind -> {n, recovered, p50_s, p99_s, max_s}."""
    out: dict[str, dict[str, Any]] = {}
    for kind in sorted({f.kind for f in faults}):
        fs = [f for f in faults if f.kind == kind]
        rec = [f.recovery_s for f in fs if f.recovery_s is not None]
        out[kind] = {"n": len(fs), "recovered": len(rec), "p50_s": _pct(rec, 50), "p99_s": _pct(rec, 99),
                     "max_s": max(rec) if rec else None}
    return out


# --------------------------------------------------------------------------- the tree
def walk(tree: dict, parent: str = "") -> list[dict]:
    """Flatten ``Supervisor.tree()`` into nodes (each with ``name``, ``kind``, ``pid``, ``state``)."""
    out = []
    for c in tree.get("children", []):
        out.append({**{k: v for k, v in c.items() if k != "children"}, "parent": parent})
        if c.get("kind") == "supervisor":
            out.extend(walk(c, c["name"]))
    return out


def targets_of(kind: str, nodes: list[dict]) -> list[str]:
    """Logical names the kill ``kind`` may hit (running children only)."""
    names = [n["name"] for n in nodes if n.get("state") == "running"]
    sups = {n["name"] for n in nodes if n.get("kind") == "supervisor"}
    if kind == "kill:mailbox":
        return [n for n in names if n.startswith("kim.mailboxes.")]
    if kind == "kill:slip-host":
        return [n for n in names if n.startswith("kim.slip.host.")]
    if kind == "kill:worker-host":
        return [n for n in names if n.startswith("kim.worker.host.")]
    if kind == "kill:outbox-relay":
        return [n for n in names if n == "outbox.relay"]
    if kind == "kill:supervisor":
        return [n for n in names if n in sups]
    if kind.startswith("kill:") and kind.endswith("-host"):
        cap = kind[5:-5]
        return [n for n in names if n.startswith(cap + ".") and ".host." in n and n not in sups]
    raise ValueError(kind)


@dataclass
class Probe:
    """What the injector may look at (provided by the run): progress counters and helpers."""

    namespace: str
    root_name: str
    progress: Callable[[str], Awaitable[float | None]]  # wait for a counter to move; None: gave up
    idle: Callable[[], bool]  # nothing left to do (load over, nothing pending)


async def _supervised_pid(name: str, namespace: str, timeout_s: float = 30.0) -> int:
    from supervisors.resolve import resolve_async

    h = await resolve_async(name, namespace=namespace, timeout_s=timeout_s)
    info = await asyncio.wait_for(h.supervised_info.remote(), 10)
    return int(info["pid"])


async def root_tree(namespace: str, root_name: str) -> dict:
    import ray

    root = ray.get_actor(root_name, namespace=namespace)
    return await asyncio.wait_for(root.tree.remote(10.0), 30)


async def _subtree_running(name: str, namespace: str) -> bool:
    from supervisors.resolve import resolve_async

    h = await resolve_async(name, namespace=namespace, timeout_s=5)
    t = await asyncio.wait_for(h.tree.remote(5.0), 10)
    nodes = walk(t)
    return bool(nodes) and all(n.get("state") == "running" and not n.get("error") for n in nodes)


class Injector:
    """Injects one fault at a time and measures its recovery."""

    def __init__(self, stack, probe: Probe, core_file: Path, *, hang_s: float, episode_s: tuple[float, float],
                 rng: random.Random, limit_s: float = 240.0, log: Callable[[str], None] = print):
        self.stack = stack
        self.probe = probe
        self.core_file = core_file
        self.hang_s = hang_s
        self.episode_s = episode_s
        self.rng = rng
        self.limit_s = limit_s
        self.log = log
        self.t0 = time.monotonic()

    def set_core(self, spec: str) -> None:
        tmp = self.core_file.with_suffix(".tmp")
        tmp.write_text(spec + "\n")
        os.replace(tmp, self.core_file)

    async def inject(self, kind: str) -> FaultRecord:
        at = time.monotonic() - self.t0
        try:
            if kind.startswith("kill:"):
                target, rec, detail = await self._kill(kind)
            elif kind.startswith("restart:"):
                target, rec, detail = await self._restart(kind.split(":", 1)[1])
            elif kind == "drop:imap":
                target, rec, detail = await self._drop_imap()
            elif kind.startswith("core:"):
                target, rec, detail = await self._core(kind)
            else:
                raise ValueError(f"unknown fault kind {kind}")
        except Exception as e:  # the injection itself failed: recorded, the run goes on
            return FaultRecord(kind=kind, target="?", at_s=round(at, 2), detail=f"injection failed: {type(e).__name__}: {e}")
        return FaultRecord(kind=kind, target=target, at_s=round(at, 2),
                           recovery_s=None if rec is None else round(rec, 3), detail=detail)

    # -- actors ------------------------------------------------------------------------
    async def _kill(self, kind: str) -> tuple[str, float | None, str]:
        ns = self.probe.namespace
        nodes = walk(await root_tree(ns, self.probe.root_name))
        names = targets_of(kind, nodes)
        if not names:
            raise RuntimeError(f"no running target for {kind}")
        name = self.rng.choice(sorted(names))
        old = await _supervised_pid(name, ns)
        t0 = time.monotonic()
        os.kill(old, signal.SIGKILL)
        deadline = t0 + self.limit_s
        while time.monotonic() < deadline:
            try:
                new = await _supervised_pid(name, ns, timeout_s=min(10.0, max(0.1, deadline - time.monotonic())))
                if new != old and (kind != "kill:supervisor" or await _subtree_running(name, ns)):
                    return name, time.monotonic() - t0, f"pid {old} -> {new}"
            except Exception:
                pass
            await asyncio.sleep(0.05)
        return name, None, f"pid {old}: no serving incarnation within {self.limit_s:.0f} s"

    # -- services ----------------------------------------------------------------------
    async def _restart(self, what: str) -> tuple[str, float | None, str]:
        service = {"redis": "redis", "kafka": "kafka", "dovecot": "imap"}[what]
        counter = {"redis": "terminal", "kafka": "published", "dovecot": "received"}[what]
        t0 = time.monotonic()
        took = await asyncio.to_thread(self.stack.restart, service, hard=True)
        rec = await self.probe.progress(counter)
        detail = f"answering after {took:.2f} s"
        return what, (None if rec is None else time.monotonic() - t0), detail

    async def _drop_imap(self) -> tuple[str, float | None, str]:
        pids = self.stack.imap_connection_pids()
        if not pids:
            raise RuntimeError("no IMAP connection to drop")
        t0 = time.monotonic()
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        rec = await self.probe.progress("received")
        return f"{len(pids)} connections", (None if rec is None else time.monotonic() - t0), ""

    # -- the core system ---------------------------------------------------------------
    async def _core(self, kind: str) -> tuple[str, float | None, str]:
        lo, hi = self.episode_s
        length = self.rng.uniform(lo, hi)
        self.set_core(CORE_SPECS[kind].format(hang=self.hang_s) + "," + CORE_BACKGROUND)
        await asyncio.sleep(length)
        self.set_core(CORE_BACKGROUND)
        t0 = time.monotonic()
        rec = await self.probe.progress("deposits")
        return "core system", (None if rec is None else time.monotonic() - t0), f"episode {length:.1f} s"


def plan(n: int, kinds: tuple[str, ...], rng: random.Random) -> list[str]:
    """``n`` fault kinds: every kind once per round, shuffled, rounds repeated."""
    out: list[str] = []
    while len(out) < n:
        r = list(kinds)
        rng.shuffle(r)
        out.extend(r)
    return out[:n]
