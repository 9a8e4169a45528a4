"""Run a practice entity without Ray: durable state, timers and events like the shard host.

A round's effects become durable only when it completes; ``crash_rounds`` drops a round
after its handler ran (its HTTP went out) — what a host crash before the commit does.
"""

from __future__ import annotations

import httpx

from actors.runtime.entity import Effects, EntityContext
from actors.tss.client import TssClient
from actors.tss.entity import PracticeSync
from actors.tss.ports import TssPorts
from deploy.sim_tss import TerminService, make_app


class FakeClock:
    def __init__(self, t: float = 2_000_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


class Harness:
    def __init__(self, key: str, ports: TssPorts) -> None:
        self.key = key
        self.ports = ports
        self.durable: str | None = None
        self.timers: dict[str, tuple[float, object]] = {}
        self.events: list = []
        self.entity: PracticeSync | None = None
        self.rounds = 0
        self.crash_rounds: set[int] = set()
        self.crashes = 0

    def restart(self) -> None:
        self.entity = None

    def _activate(self) -> PracticeSync:
        st = PracticeSync.State.model_validate_json(self.durable) if self.durable else PracticeSync.initial_state(self.key)
        ctx = EntityContext(PracticeSync.kind, self.key, self.ports, self.ports.clock, None)
        ent = PracticeSync(self.key, st, ctx)
        ent.on_activate()
        return ent

    async def send(self, msg, *, timer: str | None = None):
        if self.entity is None:
            self.entity = self._activate()
        ent = self.entity
        eff = Effects()
        ent.ctx._effects = eff
        h = PracticeSync.handler_for(msg)
        fn = getattr(ent, h.name)
        r = (await fn(msg)) if h.is_async else fn(msg)
        self.rounds += 1
        if self.rounds in self.crash_rounds:
            self.crashes += 1
            self.entity = None  # host died before the commit: nothing of this round is durable
            return None
        if not h.readonly:
            self.durable = ent.state.model_dump_json()
        self.events.extend(eff.events)
        if timer is not None:
            self.timers.pop(timer, None)
        for name in eff.timers_cancelled:
            self.timers.pop(name, None)
        for name, t in eff.timers_set.items():
            self.timers[name] = (t.due, t.message)
        return r

    async def run_due(self, limit: int = 10_000) -> int:
        """Fire due timers (earliest first) until none is due."""
        n = 0
        while n < limit:
            now = self.ports.clock()
            due = sorted((d, name) for name, (d, _) in self.timers.items() if d <= now)
            if not due:
                return n
            name = due[0][1]
            await self.send(self.timers[name][1], timer=name)
            n += 1
        raise RuntimeError("timers keep firing")

    @property
    def state(self):
        return PracticeSync.State.model_validate_json(self.durable)


def make_sim_client(sim: TerminService, *, retries: int = 2) -> TssClient:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(sim)), base_url="http://sim")

    async def no_sleep(_s: float) -> None:
        return None

    return TssClient(http, retries=retries, backoff_s=0.01, sleep=no_sleep)


BASE = "http://sim/fhir"
