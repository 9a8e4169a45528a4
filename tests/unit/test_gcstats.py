"""The collector's share of a shard host (``actors.runtime.gcstats``): what ``stats()["gc"]``
reports to an operator, and the settings a host applies after warm-up."""

from __future__ import annotations

import gc
import time

import pytest

from actors.runtime import gcstats


class Cycle:
    def __init__(self) -> None:
        self.me = self
        self.payload = list(range(50))


@pytest.fixture
def clean_gc(monkeypatch):
    threshold = gc.get_threshold()
    monkeypatch.setattr(gcstats, "_frozen", False)
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_a_full_collection_is_counted_with_its_pause_and_what_it_freed():
    clock = gcstats.GcClock().install()
    try:
        for _ in range(1000):
            Cycle()  # unreachable cycles: only the collector frees them
        t0 = time.perf_counter()
        gc.collect()
        wall = time.perf_counter() - t0
        snap = clock.snapshot()
    finally:
        clock.uninstall()
    assert snap["collections"][2] >= 1
    assert snap["collected"] >= 1000
    assert 0 < snap["seconds"][2] <= wall + 0.001
    assert 0 < snap["max_pause_ms"] <= wall * 1000 + 1
    assert snap["total_s"] == pytest.approx(sum(snap["seconds"]), abs=1e-3)
    gc.collect()
    assert clock.snapshot()["collections"][2] == snap["collections"][2]  # uninstalled: no longer counts


def test_tune_freezes_what_start_up_left_and_sets_the_first_threshold(clean_gc):
    keep = [Cycle() for _ in range(100)]  # alive at "start-up"
    gcstats.tune(freeze=True, threshold0=50_000)
    assert gc.get_freeze_count() >= 100 * 2
    assert gc.get_threshold()[0] == 50_000
    before = gc.get_freeze_count()
    snap = gcstats.gc_clock().snapshot()
    after = gc.get_freeze_count()
    # A frozen object that dies leaves the permanent generation (the CI run of f1d3e7e saw
    # the count drop by 3 between the snapshot and the check): the snapshot lies in between.
    assert snap["threshold"][0] == 50_000 and before >= snap["frozen"] >= after >= 100 * 2
    del keep


def test_tune_with_the_defaults_changes_nothing(clean_gc):
    threshold, frozen = gc.get_threshold(), gc.get_freeze_count()
    gcstats.tune(freeze=False, threshold0=None)
    assert gc.get_threshold() == threshold
    assert gc.get_freeze_count() <= frozen  # nothing frozen (frozen objects may only die)
