"""``automat status``: print the running supervisor tree.

Connects to the running Ray cluster (``ray.init(address="auto")``) unless already
connected, asks ``automat.root`` for its ``tree()`` and prints one row per supervisor and
child: name, state, restarts, last restart duration (death noticed → serving, ms), pid,
node and the last death reason. Exit code 0 when a root answers, 1 otherwise (no Ray
cluster, no root, or the root does not answer) with a message saying which.
"""

from __future__ import annotations

import socket
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from supervisors.supervisor import NAMESPACE, ROOT_NAME

_STATE_STYLE = {
    "running": "green",
    "starting": "cyan",
    "restarting": "yellow",
    "stopped": "dim",
    "failed": "bold red",
}


def _namespace(cfg: Any) -> str:
    try:
        return cfg.runtime.namespace
    except AttributeError:
        return NAMESPACE


def _reachable_cluster() -> str | None:
    """Error text when no Ray cluster can be reached quickly, else None.

    ``ray.init(address=...)`` towards a dead address blocks for a long time (INFRA.md),
    so look the address up and probe its port first (best effort: private Ray helper).
    """
    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die
    except ImportError:
        return None
    try:
        address = canonicalize_bootstrap_address_or_die("auto")
    except ConnectionError as e:
        return f"no Ray cluster is running ({e})"
    except Exception:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2.0):
            return None
    except (OSError, ValueError) as e:
        return f"the Ray cluster at {address} does not answer ({e})"


def _connect(namespace: str) -> str | None:
    import ray

    if ray.is_initialized():
        return None
    problem = _reachable_cluster()
    if problem:
        return problem
    try:
        ray.init(address="auto", namespace=namespace, log_to_driver=False, logging_level="ERROR")
    except Exception as e:
        return f"cannot connect to Ray: {type(e).__name__}: {e}"
    return None


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _rows(table: Table, node: dict, depth: int, last: bool, prefix: str) -> None:
    if depth == 0:
        label = node["name"]
        child_prefix = ""
    else:
        label = prefix + ("└─ " if last else "├─ ") + node["name"]
        child_prefix = prefix + ("   " if last else "│  ")
    if node.get("kind") == "supervisor":
        label += f"  [{node.get('strategy', '?')}]"
    state = node.get("state") or "?"
    node_id = node.get("node_id") or ""
    reason = node.get("failure") or node.get("error") or node.get("last_death_reason") or ""
    table.add_row(
        Text(label),  # plain text: "[one_for_one]" is no markup tag
        Text(state, style=_STATE_STYLE.get(state, "")),
        str(node.get("restarts", "-") if depth else node.get("restarts_in_window", 0)),
        _ms(node.get("last_restart_ms")),
        str(node.get("pid") or "-"),
        node_id[:8],
        Text(node.get("actor_name") or "-"),
        Text(reason),  # exception text may hold "[...]"
    )
    children = node.get("children") or []
    for i, child in enumerate(children):
        _rows(table, child, depth + 1, i == len(children) - 1, child_prefix)


def render_tree(tree: dict, console: Console | None = None) -> None:
    """Print a ``Supervisor.tree()`` result as a table (tree lines in the first column)."""
    console = console or Console()
    table = Table(title=f"automat supervisors ({tree.get('actor_name') or ROOT_NAME})", title_justify="left")
    for col, kw in (
        ("name", {"no_wrap": True}),
        ("state", {}),
        ("restarts", {"justify": "right"}),
        ("last restart ms", {"justify": "right"}),
        ("pid", {"justify": "right"}),
        ("node", {}),
        ("actor", {"no_wrap": True}),
        ("last death reason", {"overflow": "fold"}),
    ):
        table.add_column(col, **kw)
    _rows(table, tree, 0, True, "")
    if console.is_terminal:
        console.print(table)
    else:
        # a log or a pipe (``make run > log``, CI) has no width: rich assumes 80 columns and
        # squeezed state, restarts and pid to nothing next to the two no-wrap columns - print
        # the table as wide as it needs instead (a terminal keeps its own width)
        need = console.measure(table, options=console.options.update_width(10_000)).maximum
        was = console.width
        console.width = max(was, need)
        try:
            console.print(table)
        finally:
            console.width = was
    console.print(
        "[dim]restarts: per child, by its supervisor (root row: restarts in the current "
        "intensity window); last restart ms: death noticed → new incarnation serving[/dim]"
    )


def print_status(cfg: Any = None, *, console: Console | None = None, timeout_s: float = 10.0) -> int:
    """Print the supervisor tree of the running root; 0 if a root answered, else 1."""
    import ray

    console = console or Console()
    namespace = _namespace(cfg)
    problem = _connect(namespace)
    if problem:
        console.print(f"[red]automat is not running:[/red] {problem}")
        return 1
    try:
        root = ray.get_actor(ROOT_NAME, namespace=namespace)
    except ValueError:
        console.print(
            f"[red]automat is not running:[/red] no root supervisor {ROOT_NAME!r} in Ray namespace "
            f"{namespace!r} (start it with `automat run`)"
        )
        return 1
    try:
        tree = ray.get(root.tree.remote(), timeout=timeout_s)
    except Exception as e:
        from ray.exceptions import ActorDiedError

        from supervisors.supervisor import describe_exit

        if isinstance(e, ActorDiedError):  # its name outlives it while handles exist
            console.print(
                f"[red]automat is not running:[/red] no root supervisor running ({ROOT_NAME!r} has ended: "
                f"{describe_exit(e)})"
            )
        else:
            console.print(f"[red]root supervisor {ROOT_NAME!r} does not answer:[/red] {describe_exit(e)}")
        return 1
    render_tree(tree, console)
    return 0


__all__ = ["print_status", "render_tree"]
