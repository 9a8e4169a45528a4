"""``automat tss ...`` and ``automat sim tss``.

```
automat tss status [--practice ID]        cursor, last sync, next allowed poll, lag per practice
automat tss clock [--advance S|--reset]   the controllable clock (<run_dir>/tss/clock.json)
automat sim tss [--practices N] [--port P] [--change-every S]   run the Terminservice simulator
automat bench tss [--practices 1000]      N practices synced against the simulator, stores compared
```
"""

from __future__ import annotations

import time
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from actors.runtime.textui import data_row

console = Console()
tss_app = typer.Typer(help="116117 appointment sync: practice sync cursors.", no_args_is_help=True)
sim_app = typer.Typer(help="Simulators of external services.", no_args_is_help=True)


def _cfg(ctx: typer.Context):
    from deploy.cli import get_config

    return get_config(ctx)


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    d = ts - now
    return f"in {d:.0f}s" if d >= 0 else f"{-d:.0f}s ago"


def read_states(cfg, practice: str | None = None, kind: str | None = None) -> dict:
    """The stored practice states (decrypted with the key ring), by practice id."""
    import redis

    from actors.runtime.crypto import KeyRing
    from actors.runtime.store import state_key
    from actors.tss.entity import KIND, PracticeState

    kind = kind or KIND
    r = redis.Redis.from_url(cfg.redis.url)
    ring = KeyRing.from_file(cfg.crypto.keys_file)
    prefix = state_key(kind, "")
    keys = [state_key(kind, practice).encode()] if practice else sorted(r.scan_iter(match=prefix + "*", count=1000))
    out = {}
    for k in keys:
        raw = r.hget(k, "s")
        if raw is None:
            continue
        pid = k.decode()[len(prefix):]
        out[pid] = PracticeState.model_validate_json(ring.decrypt(raw, f"{kind}:{pid}".encode()))
    r.close()
    return out


@tss_app.command("status")
def status(ctx: typer.Context, practice: Optional[str] = typer.Option(None, help="one practice id"),
           limit: int = typer.Option(50, help="rows to show"),
           kind: Optional[str] = typer.Option(None, hidden=True, help="another practice kind (tests, bench)"),
           clock_name: Optional[str] = typer.Option(None, "--clock", hidden=True, help="a named clock (tests)")) -> None:
    """Each practice: phase, cursor, last sync, next allowed poll, lag, errors."""
    from actors.tss.ports import clock_file, file_clock

    cfg = _cfg(ctx)
    states = read_states(cfg, practice, kind)
    now = file_clock(clock_file(cfg, clock_name))()
    t = Table(title=f"116117 sync: {len(states)} practices")
    for c in ("practice", "phase", "cursor (recorded / id)", "last sync", "next poll allowed", "lag", "applied",
              "resources", "error"):
        t.add_column(c, overflow="fold")
    for pid, s in list(states.items())[:limit]:
        allowed = (s.last_poll_at + s.poll_interval_s) if s.last_poll_at else None
        data_row(t, pid, s.phase, f"{s.cursor.recorded or '-'} / {s.cursor.id or '-'}", _ago(s.last_sync_at, now),
                 _ago(allowed, now) if allowed and allowed > now else "now",
                 f"{now - s.last_sync_at:.0f}s" if s.last_sync_at else "-",
                 str(s.applied), str(len(s.store.resources)), s.error_code or "")
    console.print(t)
    for pid, s in list(states.items())[:limit] if practice else []:
        if s.last_error:
            console.print(escape(f"{pid}: last error ({s.errors} so far): {s.last_error}"))
    if states:
        lags = [now - s.last_sync_at for s in states.values() if s.last_sync_at]
        errs = sum(1 for s in states.values() if s.error_code)
        console.print(f"max lag {max(lags):.0f}s, practices with errors: {errs}" if lags else "no sync yet")


@tss_app.command("clock")
def clock(ctx: typer.Context, advance: float = typer.Option(0.0, help="move the clock forward by S seconds"),
          reset: bool = typer.Option(False, help="back to the wall clock")) -> None:
    """Show / move the controllable clock shared by the practice entities and the simulator."""
    from actors.tss.ports import clock_offset, set_clock_offset

    cfg = _cfg(ctx)
    off = 0.0 if reset else clock_offset(cfg) + advance
    if reset or advance:
        set_clock_offset(cfg, off)
    console.print(f"clock offset {off:.1f}s (now {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(time.time() + off))}Z)")


@sim_app.command("tss")
def sim_tss(ctx: typer.Context, practices: int = typer.Option(10, help="practices to create"),
            port: int = typer.Option(8117, help="port on 127.0.0.1"),
            change_every: float = typer.Option(5.0, help="one random change every S seconds (0: none)"),
            poll_interval: float = typer.Option(300.0, help="the server's poll rule (s)")) -> None:
    """Run the 116117 Terminservice simulator in the foreground (Ctrl-C stops it)."""
    from actors.tss.ports import clock_file, file_clock
    from deploy.sim_tss import SimServer, TerminService

    cfg = _cfg(ctx)
    sim = TerminService(clock=file_clock(clock_file(cfg)), poll_interval_s=poll_interval)
    for i in range(practices):
        sim.add_practice(f"prx-{i:04d}")
    srv = SimServer(sim, port=port, change_every_s=change_every)
    console.print(f"116117 Terminservice simulator on {srv.base_url} ({practices} practices; credentials of "
                  f"practice prx-0000: client_id tvs-prx-0000, secret secret-prx-0000); Ctrl-C stops it")
    srv.run()


try:  # `automat bench tss` (the 1,000-practice run), when deploy.bench's app is mounted
    from actors.tss.bench import bench_tss
    from deploy.bench import bench_app

    bench_app.command("tss")(bench_tss)
except ImportError:  # pragma: no cover
    pass
