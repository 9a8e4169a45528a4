"""Supervisor specs and the pure restart rules (no Ray processes)."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from supervisors.spec import ALLOWED_ACTOR_OPTIONS, RESERVED_ACTOR_OPTIONS, ChildSpec, SupervisorSpec
from supervisors.strategies import (
    BackoffStreak,
    RestartIntensity,
    backoff_delay,
    restart_group,
    should_restart,
)

W = "tests.integration.sup_children:Worker"


def tree(**root) -> dict:
    return {
        "name": "root",
        "children": [
            {"name": "infra.outbox", "actor": W},
            {
                "name": "kim",
                "strategy": "rest_for_one",
                "children": [
                    {"name": "kim.host.0", "actor": W, "options": {"num_cpus": 0.5, "max_concurrency": 8}},
                    {"name": "kim.host.1", "actor": W, "restart": "transient"},
                ],
            },
        ],
        **root,
    }


class Fake:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_tree_from_plain_data():
    spec = SupervisorSpec.model_validate(tree())
    assert spec.strategy == "one_for_one" and spec.max_restarts == 5 and spec.max_seconds == 30.0
    kim = spec.child("kim")
    assert isinstance(kim, SupervisorSpec) and kim.strategy == "rest_for_one"
    assert isinstance(spec.child("infra.outbox"), ChildSpec)
    assert kim.child("kim.host.1").restart == "transient"
    assert [p for p, _ in spec.walk()] == [
        "root",
        "root/infra.outbox",
        "root/kim",
        "root/kim/kim.host.0",
        "root/kim/kim.host.1",
    ]
    # round trip (YAML/JSON configs, and what crosses to the supervisor actor)
    assert SupervisorSpec.model_validate_json(spec.model_dump_json()) == spec


def test_an_explicit_kind_wins():
    spec = SupervisorSpec.model_validate(
        {"name": "r", "children": [{"kind": "supervisor", "name": "empty"}, {"kind": "worker", "name": "w", "actor": W}]}
    )
    assert isinstance(spec.children[0], SupervisorSpec) and isinstance(spec.children[1], ChildSpec)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t["children"].append({"name": "kim.host.0", "actor": W}), "unique in the whole tree"),
        (lambda t: t["children"][0].update(name="infra#2"), "must not contain '#'"),
        (lambda t: t["children"][0].update(name=""), "1-120 characters"),
        (lambda t: t["children"][0].update(actor="tests.integration.sup_children.Worker"), "module.path:ClassName"),
        (lambda t: t["children"][0].update(restart="sometimes"), "permanent"),
        (lambda t: t["children"][0].update(options={"name": "x"}), "set by the supervisor"),
        (lambda t: t["children"][0].update(options={"max_restarts": 3}), "set by the supervisor"),
        (lambda t: t["children"][0].update(options={"num_cpu": 1}), "unknown Ray actor options"),
        (lambda t: t["children"][0].update(options={"num_cpus": -1}), "num_cpus must be a number >= 0"),
        (lambda t: t["children"][0].update(options={"max_concurrency": 0}), "max_concurrency"),
        (lambda t: t["children"][0].update(options={"resources": {"kim": "x"}}), "resources"),
        (lambda t: t["children"][0].update(kwargs={"not an id": 1}), "identifiers"),
        (lambda t: t["children"][0].update(colour="red"), "Extra inputs are not permitted"),
        (lambda t: t.update(strategy="all_for_one"), "one_for_one"),
        (lambda t: t.update(max_restarts=-1), "greater than or equal to 0"),
        (lambda t: t.update(max_seconds=0), "greater than 0"),
        (lambda t: t.update(backoff_base_s=2.0, backoff_max_s=1.0), "backoff_max_s"),
    ],
)
def test_invalid_specs_are_refused_with_a_clear_message(mutate, message):
    data = tree()
    mutate(data)
    with pytest.raises(ValidationError) as err:
        SupervisorSpec.model_validate(data)
    assert message in str(err.value)


def test_duplicate_names_report_both_paths():
    data = tree()
    data["children"][1]["children"].append({"name": "infra.outbox", "actor": W})
    with pytest.raises(ValidationError, match=r"'infra.outbox' at root/infra.outbox and root/kim/infra.outbox"):
        SupervisorSpec.model_validate(data)


def test_allowed_options_are_ray_actor_options():
    ray_option_utils = pytest.importorskip("ray._common.ray_option_utils")
    assert ALLOWED_ACTOR_OPTIONS | RESERVED_ACTOR_OPTIONS <= set(ray_option_utils.actor_options)


@pytest.mark.parametrize(
    "restart, normal, expected",
    [
        ("permanent", True, True),
        ("permanent", False, True),
        ("transient", True, False),
        ("transient", False, True),
        ("temporary", True, False),
        ("temporary", False, False),
    ],
)
def test_restart_types(restart, normal, expected):
    assert should_restart(restart, normal) is expected


def test_restart_groups():
    names = ["a", "b", "c", "d"]
    assert restart_group("one_for_one", names, "b") == ["b"]
    assert restart_group("one_for_all", names, "b") == names
    assert restart_group("rest_for_one", names, "b") == ["b", "c", "d"]
    assert restart_group("rest_for_one", names, "d") == ["d"]
    with pytest.raises(KeyError):
        restart_group("one_for_one", names, "x")


def test_backoff_is_full_jitter_exponential_and_capped():
    rng = random.Random(7)
    for streak, cap in [(0, 0.05), (1, 0.1), (3, 0.4), (10, 5.0), (1000, 5.0)]:
        delays = [backoff_delay(streak, 0.05, 5.0, rng) for _ in range(300)]
        assert all(0.0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.8 and min(delays) < cap * 0.2  # spread over [0, cap]
    assert backoff_delay(5, 0.0, 5.0) == 0.0


def test_backoff_streak_resets_after_a_quiet_period():
    clock = Fake()
    streak = BackoffStreak(reset_after_s=30, clock=clock)
    rng = random.Random(1)
    for expected in (0, 1, 2):
        assert streak.streak == expected
        streak.next_delay(0.05, 5.0, rng)
    clock.t += 31
    streak.next_delay(0.05, 5.0, rng)
    assert streak.streak == 1  # counted again from zero


def test_restart_intensity_window():
    clock = Fake()
    intensity = RestartIntensity(max_restarts=3, max_seconds=10, clock=clock)
    assert [intensity.record() for _ in range(3)] == [True, True, True]
    assert intensity.in_window() == 3
    clock.t += 5
    assert intensity.record() is False  # the 4th within 10 s: too many
    clock.t += 5.5  # the first three left the window
    assert intensity.in_window() == 1
    assert intensity.record() is True
    assert RestartIntensity(0, 10, clock=clock).record() is False  # max_restarts=0: never restart


def test_incarnation_names():
    from supervisors.supervisor import incarnation_name, parse_incarnation

    assert incarnation_name("kim.host.0", 3) == "kim.host.0#3"
    assert parse_incarnation("kim.host.0#3") == ("kim.host.0", 3)
    assert parse_incarnation("automat.root") is None
    assert parse_incarnation("a#b") is None
