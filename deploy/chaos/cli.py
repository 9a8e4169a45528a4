"""``automat chaos --mails N --duration S``: KIM load while everything fails; prints the report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def chaos_cmd(
    ctx: typer.Context,
    mails: int = typer.Option(2000, "--mails", "-n", help="Mails to deliver (rate mode)."),
    duration: float = typer.Option(300.0, "--duration", "-d", help="Seconds of load: rate = mails / duration."),
    faults: Optional[int] = typer.Option(None, help="Faults to inject (default: max(#kinds, duration/12))."),
    kinds: Optional[str] = typer.Option(None, help="Comma list of fault kinds (default: all; see deploy/chaos/faults.py)."),
    seed: Optional[int] = typer.Option(None, help="Seed of mails, fault order and timing."),
    run_dir: Optional[Path] = typer.Option(None, help="Run dir of the chaos stack (default: <run_dir>/chaos)."),
    port_base: int = typer.Option(26000, help="Ports of the chaos stack: redis B+379, kafka B+92, imap B+143/B+993, "
                                              "smtp B+25, SeaweedFS B+700..712."),
    mailboxes: int = typer.Option(8, help="IMAP mailboxes the load is spread over."),
    settle: float = typer.Option(900.0, help="Seconds to wait after the load until every mail is terminal."),
    keep: bool = typer.Option(False, "--keep/--no-keep", help="Leave the chaos stack running afterwards."),
    recheck: bool = typer.Option(False, "--recheck", help="Only run the end checks again on the finished run in "
                                                         "--run-dir/--port-base (its report.json, mails.jsonl)."),
) -> None:
    """KIM under fire: SIGKILL actors of every kind, crash Redis/Kafka/Dovecot, drop IMAP
    connections, make the core system fail/hang/slow - then prove nothing was lost or doubled.

    Runs on its own stack (run dir, ports) and its own Ray: safe next to `automat run` and tests.
    """
    from deploy.chaos.faults import ALL_KINDS
    from deploy.chaos.run import ChaosOptions, run_chaos
    from deploy.cli import get_config

    ks = [k.strip() for k in kinds.split(",") if k.strip()] if kinds else list(ALL_KINDS)
    bad = [k for k in ks if k not in ALL_KINDS]
    if bad:
        raise typer.BadParameter(f"unknown fault kinds {bad}; known: {', '.join(ALL_KINDS)}")
    opts = ChaosOptions(mails=mails, duration_s=duration, faults=faults, kinds=ks, seed=seed, run_dir=run_dir,
                        port_base=port_base, mailboxes=mailboxes, settle_s=settle, keep=keep)
    if recheck:
        from deploy.chaos.run import ChaosRun

        rep = ChaosRun(get_config(ctx), opts).recheck()
    else:
        rep = run_chaos(get_config(ctx), opts)
    raise typer.Exit(0 if rep.ok else 1)
