"""Road maps: validation errors, the shipped maps, transitions."""

from __future__ import annotations

import pytest

from actors.kim.steps import LAYER, STEPS, roadmap_for, roadmap_versions, roadmaps
from protocols.kim.messages import StepError, StepResult
from protocols.kim.procedures import Procedure
from protocols.kim.roadmap import (
    DONE,
    PARKED,
    REJECTED,
    RoadMapError,
    load_roadmaps,
    parse_roadmap,
    peek_procedure,
    select_roadmap,
)

BASE = """
name: t
version: 1
procedure: eAU_Lieferung
steps:
"""


def _map(steps: str, impls=("a", "b", "c", "d")):
    return parse_roadmap(BASE + steps, known_impls=impls)


def test_valid_map_default_transitions():
    rm = _map("  - {name: a, layer: technical}\n  - {name: b, layer: domain, on: {odd: d}}\n"
              "  - {name: c, layer: domain, on: {ok: '@done'}}\n  - {name: d, layer: domain, on: {ok: '@workbasket'}}\n")
    assert rm.ok_target("a") == "b" and rm.ok_target("b") == "c" and rm.ok_target("c") == DONE
    assert rm.error_target("a") == REJECTED


def test_step_lookups_stay_right_when_the_steps_change_after_first_use():
    """``step``/``index``/``ok_target`` answer from a name -> position table built on first
    use (``decide`` asks three times per step result); a map whose steps were changed
    afterwards - replaced, renamed, cut - is still answered right (by scanning)."""
    rm = _map("  - {name: a, layer: technical}\n  - {name: b, layer: domain}\n  - {name: c, layer: domain}\n")
    assert [rm.index(n) for n in "abc"] == [0, 1, 2] and rm.step("b").name == "b" and rm.ok_target("c") == DONE
    eau = roadmap_for("eau")
    assert [eau.index(s.name) for s in eau.steps] == list(range(len(eau.steps)))
    assert all(eau.step(s.name) is s for s in eau.steps)
    rm.steps = [rm.steps[2], rm.steps[0], rm.steps[1]]  # replaced: c, a, b
    assert [rm.index(n) for n in "abc"] == [1, 2, 0] and rm.ok_target("a") == "b" and rm.ok_target("b") == DONE
    rm.steps[0].name = "z"  # renamed in place
    assert rm.step("z") is rm.steps[0]
    with pytest.raises(KeyError):
        rm.step("c")
    del rm.steps[1:]  # cut
    with pytest.raises(KeyError):
        rm.index("b")


@pytest.mark.parametrize(
    "steps, message",
    [
        ("  - {name: a, layer: technical, on: {ok: nowhere}}\n", "unknown step 'nowhere'"),
        ("  - {name: a, layer: technical, on_error: ghost}\n", "on_error targets unknown step 'ghost'"),
        ("  - {name: a, layer: technical, impl: zz}\n", "unknown implementation 'zz'"),
        ("  - {name: a, layer: technical}\n  - {name: b, layer: technical, on: {ok: a}}\n", "cycle"),
        ("  - {name: a, layer: technical, on: {ok: '@done'}}\n  - {name: b, layer: technical}\n", "unreachable steps ['b']"),
        ("  - {name: a, layer: technical}\n  - {name: a, layer: domain}\n", "duplicate step names"),
        ("  - {name: a, layer: business}\n", "steps.0.layer"),
        ("  - {name: a, layer: technical, on: {ok: a}}\n", "targets itself"),
    ],
)
def test_validation_errors_are_clear(steps, message):
    with pytest.raises(RoadMapError) as e:
        _map(steps)
    assert message in str(e.value)
    assert "road map t" in str(e.value) or "<string>" in str(e.value)


def test_unknown_procedure():
    with pytest.raises(RoadMapError, match="unknown procedure"):
        parse_roadmap(BASE.replace("eAU_Lieferung", "Fax") + "  - {name: a, layer: technical}\n")


def test_every_shipped_map_is_valid_and_every_step_is_used():
    versions = roadmap_versions()
    assert {n for n, _ in versions} == {"eau", "eau_storno", "eeb_anfrage", "eeb_received", "ebz", "aar", "emailplus"}
    used = {s.impl for rm in versions.values() for s in rm.steps}
    assert used == set(STEPS)


def test_eau_has_the_seed_shape():
    rm = roadmaps()["eau"]
    tech = [s for s in rm.steps if s.layer == "technical"]
    dom = [s for s in rm.steps if s.layer == "domain"]
    # the main path alone (without the error/duplicate/clerk branches)
    main, step = [], rm.first
    while step not in ("@done", "@rejected", "@workbasket", "@parked"):
        main.append(rm.step(step))
        step = rm.ok_target(step)
    main_tech = [s for s in main if s.layer == "technical"]
    main_dom = [s for s in main if s.layer == "domain"]
    assert len(main_tech) >= 25 and len(main_dom) >= 12, (len(main_tech), len(main_dom))
    impls = [s.impl for s in rm.steps]
    assert len(impls) == len(set(impls)), "each step is a distinct implementation"
    assert all(LAYER[s.impl] == s.layer for s in rm.steps if s.impl in LAYER and s.impl != "handoff_clerk")
    assert len(tech) >= 25 and len(dom) >= 12


def test_old_versions_stay_loadable():
    assert roadmap_for("eau").version == 2
    v1 = roadmap_for("eau", 1)
    assert v1.version == 1 and "check_signing_time" not in [s.name for s in v1.steps]


def test_select_and_peek(gen):
    assert select_roadmap(Procedure.EAU_LIEFERUNG) == "eau"
    assert select_roadmap("eEB_Fehler") == "eeb_received"
    assert select_roadmap("whatever") == "emailplus"
    assert peek_procedure(gen.eau().raw) is Procedure.EAU_LIEFERUNG
    assert peek_procedure(gen.eeb_anfrage().raw) is Procedure.EEB_ANFRAGE
    assert peek_procedure(b"garbage") is Procedure.EMAILPLUS


def _res(step, outcome="ok", error=None, attempt=1):
    return StepResult(mail_id="m", step=step, attempt=attempt, outcome=outcome, error=error)


def test_decide_branches_retries_and_parks():
    rm = roadmaps()["eau"]
    assert rm.decide(_res("load_raw")).next_step == "check_size"
    d = rm.decide(_res("dedupe_bundle_id", "duplicate"))
    assert d.action == "next" and d.next_step == "record_duplicate"
    d = rm.decide(_res("verify_chain", error=StepError(code="unknown_issuer", reason="x")))
    assert d.next_step == "answer_error" and d.facts["error_code"] == "unknown_issuer"
    d = rm.decide(_res("answer_error"))
    assert d.action == "terminal" and d.terminal == REJECTED and d.status == "rejected"
    d = rm.decide(_res("deposit_core", error=StepError(code="core_unavailable", reason="x", retryable=True), attempt=1))
    assert d.action == "retry" and d.attempt == 2 and 0 < d.delay_s <= rm.backoff_max_s
    d = rm.decide(_res("deposit_core", error=StepError(code="core_unavailable", reason="x", retryable=True), attempt=8))
    assert d.terminal == PARKED and d.status == "parked"
    d = rm.decide(_res("load_raw", "surprise"))
    assert d.terminal == PARKED and d.facts["park_reason"] == "unknown_outcome"
    assert rm.decide(_res("release_record")).terminal == DONE


def test_load_roadmaps_directory(tmp_path):
    (tmp_path / "x.yaml").write_text(BASE + "  - {name: a, layer: technical}\n")
    (tmp_path / "x.v0.yaml").write_text(BASE.replace("version: 1", "version: 0") + "  - {name: a, layer: technical}\n")
    with pytest.raises(RoadMapError):  # version must be >= 1
        load_roadmaps(tmp_path)
    (tmp_path / "x.v0.yaml").unlink()
    (tmp_path / "x.v2.yaml").write_text(BASE.replace("version: 1", "version: 2") + "  - {name: a, layer: technical}\n")
    assert load_roadmaps(tmp_path)["t"].version == 2
    (tmp_path / "y.yaml").write_text(BASE + "  - {name: a, layer: technical}\n")
    with pytest.raises(RoadMapError, match="defined twice"):
        load_roadmaps(tmp_path)
