"""``automat mails ...``: the operator's view of KIM mails (routing slips). No personal data.

```
automat mails list [--status S] [--procedure P] [--limit N]   slips, newest first
automat mails show MAIL_ID                                    one slip: step history with timings
automat mails parked                                          parked slips with reason
automat mails redrive MAIL_ID [--wait S]                      resume a parked slip at its failed step
automat mails ledger                                          received = done + rejected + parked + in flight
```
Reads go straight to the slip store (Redis). A redrive is handed to the slip's shard host
as a durable timer due now, so it needs no Ray connection and survives a restart.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import datetime, timezone

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from actors.runtime.textui import data_row

mails_app = typer.Typer(help="KIM mails: routing slips, parked mails, redrive, ledger.", no_args_is_help=True)
console = Console()


def _cfg(ctx: typer.Context):
    from deploy.cli import get_config

    return get_config(ctx)


def _ts(t: float | None) -> str:
    if not t:
        return "-"
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


async def _with_redis(cfg, fn):
    import redis.asyncio as aioredis

    r = aioredis.from_url(cfg.redis.url)
    try:
        return await fn(r)
    finally:
        await r.aclose()


async def load_slip(r, mail_id: str) -> dict | None:
    from actors.runtime.store import state_key

    raw = await r.hget(state_key("kim.slip", mail_id), "s")
    return json.loads(raw) if raw else None


async def queue_redrive(cfg, r, mail_id: str, reason: str = "operator") -> None:
    """Hand a ``Redrive`` to the slip as a durable timer due now (fires on its shard host)."""
    from actors.kim.slip import Redrive
    from actors.runtime.kinds import shard_of
    from actors.runtime.store import encode_message, timer_member, timer_payloads, timer_zset

    shard = shard_of(mail_id, cfg.runtime.num_shards)
    member = timer_member(mail_id, f"redrive-{time.time_ns()}")
    pipe = r.pipeline(transaction=True)
    pipe.hset(timer_payloads("kim.slip", shard), member, encode_message(Redrive(reason=reason)))
    pipe.zadd(timer_zset("kim.slip", shard), {member: time.time()})
    await pipe.execute()


def _summary_rows(summaries: dict, status: str | None, procedure: str | None, limit: int) -> list[dict]:
    rows = [s for s in summaries.values() if s and s.get("status") != "new"]
    if status:
        rows = [s for s in rows if s["status"] == status]
    if procedure:
        rows = [s for s in rows if (s.get("procedure") or "") == procedure]
    rows.sort(key=lambda s: s.get("updated_at") or 0, reverse=True)
    return rows[:limit]


def _slip_table(rows: list[dict], title: str, reason: bool = False) -> Table:
    t = Table(title=title)
    t.add_column("mail id", no_wrap=True, min_width=32)
    for c in ("mailbox", "procedure", "status", "step", "attempt", "outcome / error", "updated (UTC)"):
        t.add_column(c)
    if reason:
        t.add_column("reason")
    for s in rows:
        out = s.get("outcome") or ""
        if s.get("error_code"):
            out = f"{out} {s['error_code']}".strip()
        cells = [s["mail_id"] or "", s.get("mailbox") or "", s.get("procedure") or "", s["status"], s.get("step") or "",
                 str(s.get("attempt") or ""), out, _ts(s.get("updated_at"))]
        if reason:
            cells.append((s.get("reason") or "")[:80])
        data_row(t, *cells)
    return t


@mails_app.command("list")
def list_cmd(
    ctx: typer.Context,
    status: str = typer.Option(None, "--status", "-s", help="received|running|waiting_retry|parked|done|rejected"),
    procedure: str = typer.Option(None, "--procedure", "-p", help="e.g. eAU_Lieferung, eEB_Anfrage, eMailPLUS"),
    limit: int = typer.Option(50, "--limit", "-n"),
) -> None:
    """Routing slips, most recently changed first."""
    from actors.kim.ledger import slip_summaries

    cfg = _cfg(ctx)
    summaries = asyncio.run(_with_redis(cfg, lambda r: slip_summaries(r)))
    rows = _summary_rows(summaries, status, procedure, limit)
    console.print(_slip_table(rows, f"KIM mails ({len(rows)} of {len(summaries)})"))


@mails_app.command("parked")
def parked_cmd(ctx: typer.Context, limit: int = typer.Option(200, "--limit", "-n")) -> None:
    """Parked slips (dead letters) with the reason; re-drive with `automat mails redrive ID`."""
    from actors.kim.ledger import slip_summaries

    cfg = _cfg(ctx)
    summaries = asyncio.run(_with_redis(cfg, lambda r: slip_summaries(r)))
    rows = _summary_rows(summaries, "parked", None, limit)
    console.print(_slip_table(rows, f"parked KIM mails: {len(rows)}", reason=True))


@mails_app.command("show")
def show_cmd(ctx: typer.Context, mail_id: str = typer.Argument(..., help="the mail id (pseudonym)")) -> None:
    """One slip: status, road map, and the step history with timings."""
    cfg = _cfg(ctx)
    s = asyncio.run(_with_redis(cfg, lambda r: load_slip(r, mail_id)))
    if s is None:
        print(f"no slip {mail_id}", file=sys.stderr)
        raise typer.Exit(1)
    console.print(f"[bold]mail {s['mail_id']}[/]  mailbox {s['mailbox']}  procedure {s.get('procedure')}  "
                  f"road map {s['roadmap']} v{s['roadmap_version']}")
    console.print(f"status [bold]{s['status']}[/]  step {s.get('step')} #{s.get('attempt')}  "
                  f"outcome {s.get('outcome')}  error {s.get('error_code')}  redrives {s.get('redrives', 0)}")
    if s.get("reason"):
        console.print(f"reason: {escape(s['reason'])}")
    end = s.get("finished_at") or s.get("updated_at") or 0
    console.print(f"received {_ts(s['created_at'])} UTC, {'finished' if s.get('finished_at') else 'last change'} "
                  f"after {end - s['created_at']:.3f} s, {s.get('steps_run', 0)} step runs")
    t = Table(title="step history")
    for c in ("#", "step", "attempt", "start +ms", "took ms", "worker ms", "result", "error"):
        t.add_column(c, justify="right" if c in ("#", "attempt", "start +ms", "took ms", "worker ms") else "left")
    t0 = s["created_at"]
    for i, h in enumerate(s.get("history", []), 1):
        took = f"{(h['ended'] - h['started']) * 1000:.1f}" if h.get("ended") else "running"
        data_row(t, str(i), h["step"], str(h["attempt"]), f"{(h['started'] - t0) * 1000:.1f}", took,
                 f"{h.get('worker_ms') or 0:.1f}", h.get("result") or "", (h.get("error") or "")[:60])
    console.print(t)
    if s.get("facts"):
        f = Table(title="facts (control information)")
        f.add_column("fact")
        f.add_column("value")
        for k, v in sorted(s["facts"].items()):
            data_row(f, k, str(v)[:80])
        console.print(f)


@mails_app.command("redrive")
def redrive_cmd(
    ctx: typer.Context,
    mail_id: str = typer.Argument(..., help="the mail id of a parked slip"),
    wait: float = typer.Option(10.0, "--wait", help="seconds to wait for the slip to move (0: don't wait)"),
) -> None:
    """Resume a parked slip at the step that failed (fresh attempts)."""
    cfg = _cfg(ctx)

    async def go(r) -> int:
        s = await load_slip(r, mail_id)
        if s is None:
            print(f"no slip {mail_id}", file=sys.stderr)
            return 1
        if s["status"] != "parked":
            print(f"slip {mail_id} is {s['status']}, not parked", file=sys.stderr)
            return 1
        await queue_redrive(cfg, r, mail_id)
        console.print(f"redrive of {mail_id} queued (resumes at step {s.get('step')})")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            s2 = await load_slip(r, mail_id)
            if s2 and s2.get("redrives", 0) > s.get("redrives", 0):
                console.print(f"slip {mail_id} resumed: now {s2['status']} at {s2.get('step')}")
                return 0
        if wait:
            console.print("[yellow]not picked up yet[/] (is the kim subtree running? it will be when it starts)")
        return 0

    rc = asyncio.run(_with_redis(cfg, go))
    if rc:
        raise typer.Exit(rc)


@mails_app.command("ledger")
def ledger_cmd(ctx: typer.Context) -> None:
    """received = done + rejected + parked + in flight, by procedure and error code."""
    from actors.kim.ledger import read_ledger, render_ledger

    cfg = _cfg(ctx)
    led = asyncio.run(_with_redis(cfg, lambda r: read_ledger(r)))
    render_ledger(led, console)
