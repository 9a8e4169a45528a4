"""Supervisor trees with real Ray actors: children are SIGKILLed and must come back.

Every kill→serving time is printed (``pytest -s``): from ``os.kill`` until the new
incarnation answered through ``resolve()``. Uses the session fixture ``ray_session``
(tests/conftest.py: one local Ray, namespace ``automat``, workers import this checkout).
"""

from __future__ import annotations

import io
import os
import signal
import time

import pytest
import ray

from supervisors.resolve import resolve
from supervisors.spec import SupervisorSpec
from supervisors.supervisor import ROOT_NAME, Supervisor, start_root, stop_root

pytestmark = pytest.mark.integration

WORKER = "tests.integration.sup_children:Worker"


def _spec(name: str, strategy: str, children: list[dict], **kw) -> SupervisorSpec:
    return SupervisorSpec.model_validate({"name": name, "strategy": strategy, "children": children, **kw})


def _workers(prefix: str, *names: str, restart: str = "permanent") -> list[dict]:
    return [{"name": f"{prefix}.{n}", "actor": WORKER, "kwargs": {"label": n}, "restart": restart} for n in names]


@pytest.fixture
def supervise(ray_session):
    started = []

    def _start(spec: SupervisorSpec):
        name = f"test.{spec.name}"
        sup = Supervisor.options(name=name, namespace="automat").remote(spec, "automat", name)
        ray.get(sup.start.remote(), timeout=120)
        started.append(sup)
        return sup

    yield _start
    for sup in started:
        try:
            ray.get(sup.stop.remote("test over"), timeout=30)
        except Exception:
            pass
        ray.kill(sup)


def pid_of(logical: str) -> int:
    return ray.get(resolve(logical, timeout_s=15).pid.remote(), timeout=15)


def children(sup) -> dict[str, dict]:
    return {c["name"]: c for c in ray.get(sup.tree.remote(), timeout=30)["children"]}


def all_running(sup) -> dict[str, dict] | None:
    kids = children(sup)
    return kids if all(c["state"] == "running" for c in kids.values()) else None


def wait_until(pred, timeout_s: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def kill_and_wait_serving(logical: str, label: str) -> tuple[int, int, float]:
    """SIGKILL the current incarnation; return (old pid, new pid, kill→serving ms)."""
    old = pid_of(logical)
    t0 = time.monotonic()
    os.kill(old, signal.SIGKILL)

    def serving_again():
        try:
            new = ray.get(resolve(logical, timeout_s=15).pid.remote(), timeout=15)
        except Exception:
            return None
        return new if new != old else None

    new = wait_until(serving_again, 30, f"{logical} serving again")
    ms = (time.monotonic() - t0) * 1000
    print(f"\n[kill→serving] {label}: {logical} pid {old} → {new} in {ms:.0f} ms")
    return old, new, ms


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_one_for_one_restarts_only_the_dead_child(supervise):
    sup = supervise(_spec("o4o", "one_for_one", _workers("o4o", "a", "b", "c")))
    before = {n: pid_of(f"o4o.{n}") for n in "abc"}

    old, new, _ = kill_and_wait_serving("o4o.b", "one_for_one")

    kids = children(sup)
    assert kids["o4o.b"]["state"] == "running"
    assert kids["o4o.b"]["restarts"] == 1
    assert kids["o4o.b"]["actor_name"] == "o4o.b#1"
    assert kids["o4o.b"]["pid"] == new != old
    assert "died" in kids["o4o.b"]["last_death_reason"]
    assert kids["o4o.b"]["last_restart_ms"] > 0
    print(f"[supervisor] one_for_one: death noticed → serving {kids['o4o.b']['last_restart_ms']} ms")
    for n in "ac":  # the others were not touched
        assert kids[f"o4o.{n}"]["pid"] == before[n] == pid_of(f"o4o.{n}")
        assert kids[f"o4o.{n}"]["restarts"] == 0
    # resolve gives a working handle of the new incarnation
    assert ray.get(resolve("o4o.b").hello.remote(), timeout=10) == f"hello from b ({new})"

    # an operator restart: new incarnation, the others untouched
    info = ray.get(sup.restart_child.remote("o4o.c"), timeout=60)
    assert info["state"] == "running" and info["restarts"] == 1 and info["pid"] != before["c"]
    assert pid_of("o4o.a") == before["a"]


def test_one_for_all_restarts_all(supervise):
    # parallel_start: the three come back at once (rest_for_one below restarts in order)
    sup = supervise(_spec("o4a", "one_for_all", _workers("o4a", "a", "b", "c"), parallel_start=True))
    before = {n: pid_of(f"o4a.{n}") for n in "abc"}

    kill_and_wait_serving("o4a.b", "one_for_all")

    kids = wait_until(lambda: all_running(sup), what="all running")
    for n in "abc":
        assert kids[f"o4a.{n}"]["restarts"] == 1
        assert kids[f"o4a.{n}"]["pid"] != before[n]
        assert pid_of(f"o4a.{n}") == kids[f"o4a.{n}"]["pid"]
        assert gone(before[n])
    print(f"[supervisor] one_for_all: last restart ms {[kids[f'o4a.{n}']['last_restart_ms'] for n in 'abc']}")


def test_rest_for_one_restarts_the_dead_child_and_later_ones(supervise):
    sup = supervise(_spec("r4o", "rest_for_one", _workers("r4o", "a", "b", "c")))
    before = {n: pid_of(f"r4o.{n}") for n in "abc"}

    kill_and_wait_serving("r4o.b", "rest_for_one")

    kids = wait_until(lambda: all_running(sup), what="all running")
    assert kids["r4o.a"]["pid"] == before["a"] and kids["r4o.a"]["restarts"] == 0
    for n in "bc":
        assert kids[f"r4o.{n}"]["pid"] != before[n] and kids[f"r4o.{n}"]["restarts"] == 1
        assert pid_of(f"r4o.{n}") == kids[f"r4o.{n}"]["pid"]


def test_restart_types(supervise):
    sup = supervise(
        _spec(
            "rt",
            "one_for_one",
            _workers("rt", "transient", restart="transient")
            + _workers("rt", "temporary", restart="temporary")
            + _workers("rt", "permanent"),
        )
    )
    # transient, ends normally → not restarted
    ray.get(resolve("rt.transient").finish.remote("work done"), timeout=10)
    wait_until(lambda: children(sup)["rt.transient"]["state"] == "stopped", what="transient stopped")
    # temporary, killed → not restarted
    temp_pid = pid_of("rt.temporary")
    os.kill(temp_pid, signal.SIGKILL)
    wait_until(lambda: children(sup)["rt.temporary"]["state"] == "failed", what="temporary failed")
    # permanent, killed → restarted
    kill_and_wait_serving("rt.permanent", "permanent child")

    time.sleep(0.3)  # nothing else comes back meanwhile
    kids = children(sup)
    assert kids["rt.transient"]["state"] == "stopped" and kids["rt.transient"]["restarts"] == 0
    assert kids["rt.transient"]["last_death_reason"] == "normal: work done"
    assert kids["rt.temporary"]["state"] == "failed" and kids["rt.temporary"]["restarts"] == 0
    assert "died" in kids["rt.temporary"]["last_death_reason"]
    assert kids["rt.permanent"]["state"] == "running" and kids["rt.permanent"]["restarts"] == 1
    live = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert not any(n.startswith(("rt.transient#", "rt.temporary#")) for n in live)
    with pytest.raises(LookupError):
        resolve("rt.temporary", timeout_s=0.3)


def test_restart_intensity_fails_the_subtree_and_the_parent_restarts_it(supervise):
    sub = {
        "name": "int.sub",
        "strategy": "one_for_one",
        "max_restarts": 1,
        "max_seconds": 30,
        "children": _workers("int.sub", "w"),
    }
    parent = supervise(_spec("int", "one_for_one", _workers("int", "keep") + [sub]))
    keep_pid = pid_of("int.keep")
    sub_pid = children(parent)["int.sub"]["pid"]

    # within the intensity (1 restart in 30 s): the sub-supervisor restarts its child
    kill_and_wait_serving("int.sub.w", "intensity, the one allowed restart")
    t0 = time.monotonic()
    os.kill(pid_of("int.sub.w"), signal.SIGKILL)  # the second in 30 s: one too many

    def subtree_back():
        k = children(parent)
        s = k["int.sub"]
        return k if s["restarts"] == 1 and s["state"] == "running" and s["children"] else None

    kids = wait_until(subtree_back, 60, "the parent to restart the subtree")
    new_w = wait_until(lambda: pid_of("int.sub.w"), 30, "new int.sub.w")
    print(
        f"\n[kill→serving] intensity: second kill → new subtree serving in {(time.monotonic() - t0) * 1000:.0f} ms "
        f"(parent: death noticed → serving {kids['int.sub']['last_restart_ms']} ms)"
    )
    s = kids["int.sub"]
    assert "intensity" in s["last_death_reason"], s["last_death_reason"]
    assert s["pid"] != sub_pid
    wait_until(lambda: gone(sub_pid), 10, "the failed sub-supervisor process to exit")
    w = s["children"][0]
    assert w["name"] == "int.sub.w" and w["state"] == "running" and w["restarts"] == 0
    assert w["pid"] == new_w
    assert kids["int.keep"]["pid"] == keep_pid == pid_of("int.keep")  # one_for_one in the parent
    assert ray.get(resolve("int.sub.w").hello.remote(), timeout=10).startswith("hello from w")


def test_start_fails_when_a_child_cannot_start(ray_session):
    from supervisors.supervisor import SupervisorStartError

    spec = _spec(
        "bad",
        "one_for_one",
        _workers("bad", "ok") + [{"name": "bad.broken", "actor": "tests.integration.sup_children:Broken"}],
    )
    sup = Supervisor.options(name="test.bad", namespace="automat").remote(spec, "automat", "test.bad")
    try:
        with pytest.raises(SupervisorStartError, match="bad.broken did not start: .*cannot open the mailbox"):
            ray.get(sup.start.remote(), timeout=120)
        kids = children(sup)
        assert kids["bad.broken"]["state"] == "failed"
        assert kids["bad.ok"]["state"] == "stopped"  # the started one was stopped again
        assert not any(a["name"].startswith("bad.") for a in ray.util.list_named_actors(True))
    finally:
        ray.kill(sup)


def test_root_tree_status(ray_session, cfg):
    from rich.console import Console

    from supervisors.status import print_status

    spec = _spec("root", "one_for_one", _workers("rootkid", "x"))
    try:
        root = start_root(spec)
        assert start_root(spec)._actor_id == root._actor_id  # get_if_exists
        out = io.StringIO()
        assert print_status(cfg, console=Console(file=out, width=200)) == 0
        text = out.getvalue()
        print("\n" + text)
        assert "rootkid.x" in text and "running" in text and str(pid_of("rootkid.x")) in text
    finally:
        root = None  # a dead named actor's name stays taken while handles live
        assert stop_root() is True
    out = io.StringIO()
    wait_until(lambda: not any(a["name"] == ROOT_NAME for a in ray.util.list_named_actors(True)), 10, "root gone")
    assert print_status(cfg, console=Console(file=out, width=200)) == 1
    assert "no root supervisor" in out.getvalue()
