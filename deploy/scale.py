"""``automat scale ...``: pools, shard maps and the autoscaler of a running instance;
multi-node runs on this machine.

```
automat scale status                 pools (hosts, backlog, p95), shard maps, recent decisions
automat scale set kim.worker 4       resize a pool now (the autoscaler's bounds apply again later)
automat scale nodes --workers 1,2,3 --mails 400 [--kill]
                                     the KIM pipeline on 1, 2, 3 local worker nodes (own Ray cluster
                                     per run); --kill kills the busiest worker node in the last run
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
scale_app = typer.Typer(help="Scale-out: pools, shard maps, the autoscaler; multi-node runs.", no_args_is_help=True)


def _connect(cfg) -> None:
    import ray

    from deploy.app import use_running_cluster

    use_running_cluster(cfg)
    ray.init(address="auto", namespace=cfg.runtime.namespace, log_to_driver=False)


def _autoscaler(cfg):
    from supervisors.resolve import resolve

    return resolve("autoscaler", namespace=cfg.runtime.namespace, timeout_s=5)


@scale_app.command("status")
def status(ctx: typer.Context) -> None:
    """Pools, their shard maps and the autoscaler's last decisions."""
    import ray

    from deploy.cli import get_config

    cfg = get_config(ctx)
    try:
        _connect(cfg)
        st = ray.get(_autoscaler(cfg).status.remote(), timeout=10)
    except Exception as e:
        console.print(f"[red]no running autoscaler[/] ({type(e).__name__}: {escape(str(e))}); is `automat run` up "
                      "(and autoscale.enabled)?")
        raise typer.Exit(1)
    t = Table(title="autoscaled pools")
    for col in ("kind", "hosts", "min..max", "map v", "backlog", "per host", "p95 ms", "loop lag ms", "note"):
        t.add_column(col)
    for kind, p in st["pools"].items():
        sig = p.get("signal") or {}
        t.add_row(kind, ",".join(map(str, p["hosts"])) or "-", f"{p['min']}..{p['max']}", str(p["version"]),
                  str(sig.get("backlog", "-")), str(sig.get("per_host", "-")), str(sig.get("lat_p95_ms", "-")),
                  str(sig.get("loop_lag_ms", "-")), ("busy " if p["busy"] else "") + (p.get("note") or ""))
    console.print(t)
    if st.get("requested"):
        console.print(f"capacity requested from Ray (request_resources): {len(st['requested'])} bundles")
    ev = Table(title="recent decisions")
    for col in ("t [s]", "kind", "action", "hosts", "reason", "moved", "handover s"):
        ev.add_column(col)
    for e in st["events"][-15:]:
        hosts = f"{e.get('hosts_before', '')}->{e.get('hosts_after', '')}" if "hosts_before" in e else e.get("host", "")
        data_row(ev, str(e["t"]), e["kind"], e["action"], str(hosts), str(e.get("reason", ""))[:70],
                 str(e.get("moved", "")), str(e.get("handover_s", "")))
    console.print(ev)


@scale_app.command("set")
def set_hosts(ctx: typer.Context, kind: str = typer.Argument(..., help="e.g. kim.worker"),
              hosts: int = typer.Argument(..., min=1)) -> None:
    """Resize a pool now (hand-over of shards included); waits until done."""
    import ray

    from deploy.cli import get_config

    cfg = get_config(ctx)
    _connect(cfg)
    t0 = time.monotonic()
    p = ray.get(_autoscaler(cfg).set_hosts.remote(kind, hosts), timeout=600)
    console.print(f"{kind}: hosts {p['hosts']} (map v{p['version']}) after {time.monotonic() - t0:.1f} s")


@scale_app.command("nodes")
def nodes(ctx: typer.Context,
          workers: str = typer.Option("1,2,3", help="worker node counts, one run each"),
          mails: int = typer.Option(400, help="KIM mails per run"),
          kill: bool = typer.Option(False, "--kill", help="kill the busiest worker node mid-run (last run)"),
          redis_db: int = typer.Option(9, help="Redis database of the runs (flushed before and after)"),
          json_out: Optional[str] = typer.Option(None, "--json", help="write the results as JSON")) -> None:
    """The KIM pipeline on several local Ray worker nodes (mechanics, not speed-up: one machine)."""
    from deploy.cli import get_config
    from deploy.multinode import main as multinode_main

    cfg = get_config(ctx)
    args = ["--workers", workers, "--mails", str(mails), "--redis-db", str(redis_db)]
    if kill:
        args.append("--kill")
    if json_out:
        args += ["--json", json_out]
    lease = None
    if cfg.local_stack:
        from deploy.stack import LocalStack

        lease = LocalStack(cfg).shared(owner="automat scale nodes")
        lease.__enter__()
    try:
        raise typer.Exit(multinode_main(args, cfg=cfg))
    finally:
        if lease is not None:
            lease.__exit__(None, None, None)

