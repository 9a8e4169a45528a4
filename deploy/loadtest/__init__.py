"""``automat loadtest``: the KIM throughput benchmark (``BENCHMARK.md``) as a command."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape


def loadtest_cmd(
    ctx: typer.Context,
    mails: Optional[int] = typer.Option(None, "--mails", "-n", help="how many KIM mails (e.g. 240000 = a day of the "
                                        "seed's profile); required unless --sweep"),
    rate: Optional[float] = typer.Option(None, "--rate", help="rate mode: offered load in mails/s over IMAP APPEND "
                                         "(2.8 = 240k/day, 7 = the seed's peak); default: throughput mode"),
    mailboxes: int = typer.Option(20, "--mailboxes", "-m", help="mailboxes (IMAP users load01..loadMM), 1..100"),
    mix: Optional[str] = typer.Option(None, "--mix", help="procedure weights, e.g. 'eAU=80,eEB=8,EBZ=5,AAR=2,eMailPLUS=5' "
                                      "(the default); also Storno"),
    faults: float = typer.Option(0.05, "--faults", help="share of faulty mails (broken signature, untrusted signer, "
                                 "non-FHIR payload, duplicate)"),
    out: Optional[Path] = typer.Option(None, "--out", help="report folder (default <run_dir>/loadtest/<run>/report)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="generator seed (default: random)"),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="inline floor + naive Ray on the same mails"),
    baseline_mails: int = typer.Option(1000, "--baseline-mails", help="how many of the mails the baselines run"),
    slip_hosts: int = typer.Option(2, "--slip-hosts", help="stateshifter shard hosts"),
    worker_hosts: int = typer.Option(2, "--worker-hosts", help="step worker pool size"),
    fetchers: int = typer.Option(2, "--fetchers", help="mailbox actors"),
    fuse_max: Optional[int] = typer.Option(None, "--fuse-max", help="steps per dispatch (1 = a durable transition "
                                           "per step; default: kim.fuse_max)"),
    max_in_flight: Optional[int] = typer.Option(None, "--max-in-flight", help="admission control: mails in flight "
                                                "(received, not terminal) at most; default: kim.max_in_flight"),
    pickup_poll_ms: Optional[float] = typer.Option(None, "--pickup-poll-ms", min=0, help="hot pick-up: NOOP-poll a mailbox "
                                                   "that had mail in the last kim.pickup_hot_s every N ms instead of "
                                                   "IDLE (Dovecot notifies IDLE 500 ms late); 0 = IDLE; default: 100 in rate mode, "
                                                   "else kim.pickup_poll_ms"),
    redis_db: Optional[int] = typer.Option(None, "--redis-db", help="run in this Redis database (emptied at the end); "
                                           "default: the configured one (only this run's slips are read)"),
    timeout: float = typer.Option(3600.0, "--timeout", help="give up waiting after this many seconds"),
    keep: bool = typer.Option(False, "--keep", help="keep mails, blobs, core system and Redis data afterwards"),
    live: bool = typer.Option(True, "--live/--no-live", help="live progress display"),
    profile: bool = typer.Option(False, "--profile", help="py-spy the step workers for 30 s mid-run"),
    sweep: Optional[str] = typer.Option(None, "--sweep", help="rate sweep: one rate-mode run per offered rate, e.g. "
                                        "'7,20,40,60' (mails/s, rising); finds the highest rate that keeps up "
                                        "within the p99 target (the knee)"),
    sweep_seconds: float = typer.Option(60.0, "--sweep-seconds", help="seconds of offered load per sweep point "
                                        "(mails = rate x seconds)"),
    p99_target_ms: float = typer.Option(500.0, "--p99-target-ms", help="the sweep's latency target (end to end p99)"),
    sweep_all: bool = typer.Option(False, "--sweep-all", help="run every sweep point, also past the first "
                                   "saturated one"),
) -> None:
    """Load test of the KIM pipeline: generated KIM mails into Dovecot, the real pipeline, a report.

    Ends with the ledger, a report (JSON + Markdown + PNG chart) and the one-line summary
    `mails=N  mails_per_s=X  p99_ms=Y  lost=0  duplicates=0`. Exit code 1 if a mail was
    lost or doubled or the ledger does not balance."""
    from deploy.cli import get_config
    from deploy.loadtest.driver import Options, run_loadtest

    cfg = get_config(ctx)
    logging.basicConfig(level=logging.WARNING)
    console = Console()
    if sweep is not None:
        _sweep(cfg, console, sweep, sweep_seconds, p99_target_ms, sweep_all, rate=rate, mails=mails,
               mailboxes=mailboxes, mix=mix, faults=faults, out=out, seed=seed, slip_hosts=slip_hosts,
               worker_hosts=worker_hosts, fetchers=fetchers, fuse_max=fuse_max, max_in_flight=max_in_flight, pickup_poll_ms=pickup_poll_ms,
               redis_db=redis_db, timeout_s=timeout, keep=keep, live=live, profile=profile)
        return
    if mails is None:
        console.print("[red]error:[/] --mails is required (or --sweep RATES for a rate sweep)")
        raise typer.Exit(2)
    opt = Options(mails=mails, rate=rate, mailboxes=mailboxes, mix=mix, faults=faults, out=out, seed=seed,
                  baselines=baselines, baseline_mails=baseline_mails, slip_hosts=slip_hosts, worker_hosts=worker_hosts,
                  fetchers=fetchers, fuse_max=fuse_max, max_in_flight=max_in_flight, pickup_poll_ms=pickup_poll_ms, redis_db=redis_db, timeout_s=timeout, keep=keep, live=live,
                  profile=profile)
    try:
        r = asyncio.run(run_loadtest(cfg, opt, console))
    except ValueError as e:
        console.print(f"[red]error:[/] {escape(str(e))}")
        raise typer.Exit(2) from None
    led = r["ledger"]
    if led["lost"] or led["duplicates"] or not led["balanced"]:
        raise typer.Exit(1)


def _sweep(cfg, console, rates_text: str, seconds: float, p99_target_ms: float, all_points: bool, *, rate, mails,
           **kw) -> None:
    from deploy.loadtest.driver import Options
    from deploy.loadtest.sweep import parse_rates, run_sweep

    try:
        if rate is not None or mails is not None:
            raise ValueError("--sweep sets each point's rate and mails (rate x --sweep-seconds): leave out --rate "
                             "and --mails")
        rates = parse_rates(rates_text)
        opt = Options(mails=1, rate=rates[0], baselines=False, **kw)
        s = asyncio.run(run_sweep(cfg, opt, rates, seconds, p99_target_ms, console, all_points=all_points))
    except ValueError as e:
        console.print(f"[red]error:[/] {escape(str(e))}")
        raise typer.Exit(2) from None
    if s["summary"]["lost"] or s["summary"]["duplicates"] or not s["summary"]["balanced"]:
        raise typer.Exit(1)
