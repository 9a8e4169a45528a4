"""The KIM ledger: ``received = done + rejected + parked + in flight``, from the slips.

The slip store is the truth, so the ledger is read from it: every ``kim.slip`` entity
(``automat:e:kim.slip:<mail_id>``, control information only) is one received mail; its
status says where it is. ``mail_ids`` restricts the ledger to a known set (a test run, a
demo batch); without it every slip in Redis is counted (SCAN, pipelined reads).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Iterable

from pydantic import BaseModel, Field

from actors.runtime import metrics
from actors.runtime.store import state_key

SLIP_KIND = "kim.slip"
IN_FLIGHT = ("received", "running", "waiting_retry")

LEDGER_GAUGE = metrics.gauge("kim_ledger", "KIM slips by status (at the last ledger read)", ("status",))


class Ledger(BaseModel):
    received: int = 0
    done: int = 0  # of which workbasket: handed to the clerk queue
    workbasket: int = 0
    rejected: int = 0
    parked: int = 0
    in_flight: int = 0
    missing: int = 0  # asked-for mail ids without a slip (not (yet) received)
    by_status: dict[str, int] = Field(default_factory=dict)
    by_procedure: dict[str, dict[str, int]] = Field(default_factory=dict)
    by_error: dict[str, int] = Field(default_factory=dict)

    @property
    def balanced(self) -> bool:
        return self.received == self.done + self.rejected + self.parked + self.in_flight

    @property
    def terminal(self) -> int:
        return self.done + self.rejected + self.parked


def _summary(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    d = json.loads(raw)
    return {k: d.get(k) for k in ("mail_id", "status", "procedure", "outcome", "error_code", "step", "attempt",
                                   "mailbox", "roadmap", "created_at", "updated_at", "finished_at", "reason",
                                   "steps_run", "redrives")}


async def slip_summaries(redis, mail_ids: Iterable[str] | None = None, *, chunk: int = 1000) -> dict[str, dict | None]:
    """mail_id -> summary of its slip (None: no slip)."""
    out: dict[str, dict | None] = {}
    if mail_ids is None:
        prefix = state_key(SLIP_KIND, "")
        keys: list[bytes] = []
        async for k in redis.scan_iter(match=prefix + "*", count=2000):
            keys.append(k)
        ids = [(k.decode() if isinstance(k, bytes) else k)[len(prefix):] for k in keys]
    else:
        ids = list(mail_ids)
    for i in range(0, len(ids), chunk):
        part = ids[i:i + chunk]
        pipe = redis.pipeline(transaction=False)
        for m in part:
            pipe.hget(state_key(SLIP_KIND, m), "s")
        for m, raw in zip(part, await pipe.execute()):
            out[m] = _summary(raw)
    return out


def ledger_of(summaries: dict[str, dict | None]) -> Ledger:
    led = Ledger()
    status = Counter()
    for s in summaries.values():
        if s is None:
            led.missing += 1
            continue
        st = s["status"]
        if st == "new":
            led.missing += 1
            continue
        status[st] += 1
        led.received += 1
        if st == "done":
            led.done += 1
            if s.get("outcome") == "workbasket":
                led.workbasket += 1
        elif st == "rejected":
            led.rejected += 1
        elif st == "parked":
            led.parked += 1
        else:
            led.in_flight += 1
        proc = s.get("procedure") or "?"
        led.by_procedure.setdefault(proc, {})
        key = s.get("outcome") or st if st in ("done", "rejected", "parked") else "in_flight"
        led.by_procedure[proc][key] = led.by_procedure[proc].get(key, 0) + 1
        if st in ("rejected", "parked") and s.get("error_code"):
            led.by_error[s["error_code"]] = led.by_error.get(s["error_code"], 0) + 1
    led.by_status = dict(status)
    for st in ("received", "running", "waiting_retry", "parked", "done", "rejected"):
        LEDGER_GAUGE.set(status.get(st, 0), status=st)
    return led


async def read_ledger(redis, mail_ids: Iterable[str] | None = None) -> Ledger:
    return ledger_of(await slip_summaries(redis, mail_ids))


def render_ledger(led: Ledger, console=None, title: str = "KIM ledger") -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=title)
    for c in ("received", "done", "(workbasket)", "rejected", "parked", "in flight", "balanced"):
        t.add_column(c, justify="right")
    t.add_row(str(led.received), str(led.done), str(led.workbasket), str(led.rejected), str(led.parked),
              str(led.in_flight), "yes" if led.balanced else "[red]NO[/]")
    console.print(t)
    if led.by_procedure:
        p = Table(title="by procedure")
        outs = sorted({k for v in led.by_procedure.values() for k in v})
        p.add_column("procedure")
        for o in outs:
            p.add_column(o, justify="right")
        for proc, v in sorted(led.by_procedure.items()):
            p.add_row(proc, *[str(v.get(o, 0)) for o in outs])
        console.print(p)
    if led.by_error:
        e = Table(title="rejected / parked by error code")
        e.add_column("error code")
        e.add_column("mails", justify="right")
        for code, n in sorted(led.by_error.items(), key=lambda kv: -kv[1]):
            e.add_row(code, str(n))
        console.print(e)
