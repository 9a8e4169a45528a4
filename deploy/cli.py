"""The ``automat`` command line (console script ``automat`` -> ``deploy.cli:main``).

```
automat [--config PATH] stack up|down|status   the local stack (Redis, Tansu, Dovecot, SMTP)
automat [--config PATH] config show            effective configuration as YAML
automat [--config PATH] run                    start the application (deploy.app.run_main)
automat [--config PATH] status                 supervision tree status (supervisors.status)
```
Sub-commands of capabilities are added with ``app.add_typer(...)`` in the marked block at
the end of this file. Inside a command, get the configuration with ``get_config(ctx)``
(a ``ConfigError`` becomes a message and exit code 2).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

from actors.runtime.config import AutomatConfig, ConfigError, load_config

console = Console()

LOG_COLUMNS = 160
"""Width of the command's output when it is not a terminal (``make run > log``, CI, pipes)."""

app = typer.Typer(
    name="automat",
    help="automat: actor-model integration hub for German healthcare data exchange, on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
stack_app = typer.Typer(help="The local stack on 127.0.0.1: Redis, Tansu (Kafka), Dovecot (IMAP), SMTP sink.",
                        no_args_is_help=True)
config_app = typer.Typer(help="Configuration (defaults + file + AUTOMAT_* environment).",
                         no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(config_app, name="config")


@app.callback()
def _global(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="YAML/JSON configuration file (default: $AUTOMAT_CONFIG).",
        dir_okay=False,
    ),
) -> None:
    ctx.obj = {"config_path": config}


def get_config(ctx: typer.Context) -> AutomatConfig:
    """The effective configuration for this invocation; exits with code 2 if invalid."""
    root = ctx.find_root()
    obj = root.obj if isinstance(root.obj, dict) else {}
    if "config" not in obj:
        try:
            obj["config"] = load_config(obj.get("config_path"))
        except ConfigError as e:
            print(str(e), file=sys.stderr)
            raise typer.Exit(2) from None
        root.obj = obj
    return obj["config"]


def _stack_error(e: Exception) -> typer.Exit:
    print(f"error: {e}", file=sys.stderr)
    return typer.Exit(1)


# --------------------------------------------------------------------------- stack


def _short(p: Path) -> str:
    try:
        return str(Path(p).relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _status_table(statuses: dict[str, Any], title: str) -> Table:
    t = Table(title=title)
    for col in ("service", "running", "answers", "pid", "ports"):
        t.add_column(col, no_wrap=True)
    t.add_column("data dir", overflow="fold")
    for st in statuses.values():
        answers = {True: "yes", False: "[red]no[/red]", None: "-"}[st.answering]
        t.add_row(
            st.name,
            "[green]yes[/green]" if st.running else "[red]no[/red]",
            answers,
            str(st.pid or "-"),
            "/".join(map(str, st.ports)),
            _short(st.data_dir),
        )
    return t


@stack_app.command("up")
def stack_up(
    ctx: typer.Context,
    services: Optional[list[str]] = typer.Argument(None, help="redis kafka imap smtp (default: all)"),
) -> None:
    """Start the local services (idempotent) and wait until each answers."""
    from deploy.stack import LocalStack, StackError

    cfg = get_config(ctx)
    stack = LocalStack(cfg)
    try:
        result = stack.up(services)
    except StackError as e:
        raise _stack_error(e) from None
    stack.mark_manual()
    console.print(_status_table(result, f"local stack up (run dir {cfg.run_dir})"))


@stack_app.command("down")
def stack_down(
    ctx: typer.Context,
    services: Optional[list[str]] = typer.Argument(None, help="redis kafka imap smtp (default: all)"),
) -> None:
    """Stop the local services this run dir started (idempotent)."""
    from deploy.stack import LocalStack, StackError

    cfg = get_config(ctx)
    try:
        stopped = LocalStack(cfg).down(services)
    except StackError as e:
        raise _stack_error(e) from None
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@stack_app.command("status")
def stack_status(ctx: typer.Context) -> None:
    """Show each local service: running, answering, pid, ports, data dir."""
    from deploy.stack import LocalStack

    cfg = get_config(ctx)
    console.print(_status_table(LocalStack(cfg).status(), f"local stack (run dir {cfg.run_dir})"))


# --------------------------------------------------------------------------- config

_SECRET_WORDS = ("password", "secret", "token", "passphrase", "private_key", "api_key")


def _redact(obj: Any, key: str = "") -> Any:
    """Hide values of secret-looking fields; paths to key files (``*_file``) stay visible."""
    if isinstance(obj, dict):
        return {k: _redact(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact(v, key) for v in obj]
    k = key.lower()
    if obj is not None and any(w in k for w in _SECRET_WORDS) and not k.endswith(("_file", "_path")):
        return "***"
    if isinstance(obj, str) and "://" in obj and "@" in obj:  # credentials in a URL: scheme://user:pw@host
        scheme, _, rest = obj.partition("://")
        userinfo, at, host = rest.partition("@")
        if at and "/" not in userinfo:
            user = userinfo.split(":", 1)[0]
            return f"{scheme}://{user + ':' if user else ''}***@{host}"
    return obj


def config_yaml(cfg: AutomatConfig) -> str:
    """The effective configuration as YAML, secrets redacted (key files shown by path)."""
    data = _redact(cfg.model_dump(mode="json"))
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


@config_app.command("show")
def config_show(ctx: typer.Context) -> None:
    """Print the effective configuration as YAML (key files by path, never their contents)."""
    cfg = get_config(ctx)
    src = ctx.find_root().obj.get("config_path") or "defaults"
    print(f"# effective automat configuration (source: {src} + AUTOMAT_* environment)")
    print(config_yaml(cfg), end="")


# --------------------------------------------------------------------------- run / status


@app.command("run")
def run(
    ctx: typer.Context,
    stack: bool = typer.Option(True, "--stack/--no-stack",
                               help="Bring the local stack up first (only if local_stack is true)."),
    duration: Optional[float] = typer.Option(None, help="Stop by itself after this many seconds."),
    demo: bool = typer.Option(True, "--demo/--no-demo", help="Run the capabilities' demo jobs."),
) -> None:
    """Run automat: the local stack (if configured) and the supervision tree on Ray."""
    cfg = get_config(ctx)
    try:
        from deploy.app import run_main
    except ImportError as e:
        print(f"error: the application entry deploy.app.run_main is not available: {e}", file=sys.stderr)
        raise typer.Exit(1) from None
    from deploy.stack import StackError

    try:
        result = run_main(cfg, demo=demo, duration_s=duration, with_stack=stack)
    except StackError as e:
        raise _stack_error(e) from None
    if isinstance(result, int) and result:
        raise typer.Exit(result)


@app.command("status")
def status(ctx: typer.Context) -> None:
    """Status of the running supervision tree (supervisors.status.print_status)."""
    cfg = get_config(ctx)
    try:
        from supervisors.status import print_status
    except ImportError as e:
        print(f"error: supervisors.status.print_status is not available: {e}", file=sys.stderr)
        raise typer.Exit(1) from None
    from deploy.app import use_running_cluster

    use_running_cluster(cfg)
    result = print_status(cfg)
    if isinstance(result, int) and result:
        raise typer.Exit(result)


# --------------------------------------------------------------------------- sub-apps
# >>> capability sub-apps: one `app.add_typer(...)` per line below; import inside this block
from actors.kim.cli import mails_app; app.add_typer(mails_app, name="mails")  # noqa: E402,E702
from deploy.bench import bench_app  # noqa: E402

app.add_typer(bench_app, name="bench")
from actors.tss.cli import sim_app, tss_app  # noqa: E402
from actors.hl7.cli import hl7_app; app.add_typer(hl7_app, name="hl7")  # noqa: E402,E702

app.add_typer(tss_app, name="tss")
app.add_typer(sim_app, name="sim")
from actors.moped.cli import moped_app; app.add_typer(moped_app, name="moped")  # noqa: E402,E702
from actors.efa.cli import bench_efa, efa_app; app.add_typer(efa_app, name="efa"); bench_app.command("efa")(bench_efa)  # noqa: E402,E702
from deploy.chaos.cli import chaos_cmd; app.command("chaos")(chaos_cmd)  # noqa: E402,E702
from deploy.keys_cli import keys_app; app.add_typer(keys_app, name="keys")  # noqa: E402,E702
from deploy.loadtest import loadtest_cmd; app.command("loadtest")(loadtest_cmd)  # noqa: E402,E702
from deploy.scale import scale_app; app.add_typer(scale_app, name="scale")  # noqa: E402,E702
# <<< end of capability sub-apps


def main() -> None:
    """Console-script entry point."""
    # Ray >= 2.52 turns token auth on for a new local cluster unless told otherwise, and
    # hands the workers our runtime_env (RAY_AUTH_MODE=disabled): they could not join it
    # and `automat loadtest` run outside make waited for actors that never started.
    # Production clusters set RAY_AUTH_MODE=token explicitly (deploy/k8s), which wins.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not sys.stdout.isatty():
        # a log or a pipe has no width: rich took 80 columns and squeezed the ledger's and the
        # status tables' columns to "del…"; LOG_COLUMNS unless the caller set COLUMNS
        os.environ.setdefault("COLUMNS", str(LOG_COLUMNS))
    try:
        app()
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
