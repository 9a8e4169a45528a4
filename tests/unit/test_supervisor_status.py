"""``render_tree``: the supervisor tree as an operator reads it, in a terminal or a log."""

from __future__ import annotations

import io

from rich.console import Console

from supervisors.status import render_tree


def _tree() -> dict:
    hosts = [
        {"name": f"kim.{kind}.host.{i}", "kind": "worker", "state": "running", "restarts": 0, "pid": 41000 + n,
         "node_id": "bb0a03192ba5a619", "actor_name": f"kim.{kind}.host.{i}#0", "last_restart_ms": None}
        for n, (kind, i) in enumerate([("slip", 0), ("slip", 1), ("worker", 0), ("worker", 1)])
    ]
    hosts[2] |= {"state": "restarting", "restarts": 2, "last_restart_ms": 812.0, "last_death_reason": "ActorDiedError: [/tmp] lost"}
    kim = {"name": "kim", "kind": "supervisor", "strategy": "one_for_one", "state": "running", "restarts": 0,
           "pid": 40999, "node_id": "bb0a03192ba5a619", "actor_name": "kim#0", "children": hosts}
    return {"name": "automat.root", "kind": "supervisor", "strategy": "one_for_one", "state": "running",
            "restarts_in_window": 0, "pid": 40998, "node_id": "bb0a03192ba5a619", "actor_name": "automat.root",
            "children": [{"name": "infra", "kind": "supervisor", "strategy": "rest_for_one", "state": "running",
                          "children": [kim]}]}


def _lines(console: Console) -> list[str]:
    render_tree(_tree(), console)
    return console.file.getvalue().splitlines()


def test_a_log_gets_every_column_of_every_row():
    """Regression: written to a file (``make run > log``, CI) rich assumed 80 columns and
    squeezed state, restarts and pid to nothing beside the no-wrap name and actor columns.
    Regressions too: a supervisor's ``[strategy]`` was read as a markup tag and vanished, and a
    death reason with ``[/...]`` in it made rich raise ``MarkupError`` - the status crashed."""
    lines = _lines(Console(file=io.StringIO(), width=80, force_terminal=False, color_system=None))
    row = next(line for line in lines if "kim.worker.host.0 " in line)
    assert "restarting" in row and "41002" in row and "812" in row and "[/tmp] lost" in row and "kim.worker.host.0#0" in row
    assert any("kim  [one_for_one]" in line for line in lines)  # regression: read as a markup tag
    assert any("infra  [rest_for_one]" in line for line in lines)
    header = next(line for line in lines if "name" in line and "actor" in line)
    for col in ("state", "restarts", "pid", "node", "last death reason"):
        assert col in header


def test_a_terminal_keeps_its_width():
    lines = _lines(Console(file=io.StringIO(), width=100, force_terminal=True, color_system=None))
    assert max(len(line) for line in lines) <= 100
