"""Deferred export of custom metrics to Ray (``actors.runtime.metrics``).

Regression: the KIM slip host recorded ``kim_step_seconds`` / ``kim_step_results`` straight
into Ray for every step of every mail (~80 Ray metric calls per mail); py-spy of the 240k
load test put 16 % of the slip host's samples in Ray's ``Metric._record``. A record now
only updates local values; one exporter thread per process sends the summed deltas.
"""

from __future__ import annotations

import pytest

from actors.runtime import metrics


class RayMetricRecorder:
    """Stands in for a ``ray.util.metrics`` object: records what it was handed."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, dict]] = []

    def inc(self, value, tags=None):
        self.calls.append(("inc", value, dict(tags or {})))

    def set(self, value, tags=None):
        self.calls.append(("set", value, dict(tags or {})))

    def observe(self, value, tags=None):
        self.calls.append(("observe", value, dict(tags or {})))


@pytest.fixture
def in_ray(monkeypatch):
    """A process that counts as inside Ray, with a fresh exporter (no thread started)."""
    exporter = metrics._Exporter()
    monkeypatch.setattr(metrics, "_EXPORTER", exporter)
    monkeypatch.setattr(metrics, "_ray_ready", lambda: True)
    monkeypatch.setattr(metrics._Exporter, "_loop", lambda self: None)  # flushed by hand here
    return exporter


def _with_recorder(m, monkeypatch) -> RayMetricRecorder:
    rec = RayMetricRecorder()
    monkeypatch.setattr(m, "_make_ray", lambda: rec)
    return rec


def test_a_thousand_increments_reach_ray_as_one_call_per_tag_set(in_ray, monkeypatch):
    c = metrics.Counter("automat_t_results", "t", ("step", "result"))
    rec = _with_recorder(c, monkeypatch)
    for i in range(1000):
        c.inc(step="parse_mime", result="ok")
        if i % 4 == 0:
            c.inc(2, step="unwrap_cms", result="retry")
    assert rec.calls == []  # nothing sent on the hot path
    assert c.value(step="parse_mime", result="ok") == 1000  # local value at once
    metrics.flush()  # the module's flush() is the process's exporter
    assert sorted(rec.calls, key=lambda x: x[2]["step"]) == [
        ("inc", 1000.0, {"step": "parse_mime", "result": "ok"}),
        ("inc", 500.0, {"step": "unwrap_cms", "result": "retry"}),
    ]
    in_ray.flush()  # nothing new: nothing sent again
    assert len(rec.calls) == 2
    c.inc(step="parse_mime", result="ok")
    in_ray.flush()
    assert rec.calls[-1] == ("inc", 1.0, {"step": "parse_mime", "result": "ok"})


def test_a_gauge_sends_its_last_value_and_a_histogram_every_observation(in_ray, monkeypatch):
    g = metrics.Gauge("automat_t_inflight", "t", ("host",))
    h = metrics.Histogram("automat_t_seconds", "t", (0.01, 0.1, 1), ("step",))
    grec, hrec = _with_recorder(g, monkeypatch), _with_recorder(h, monkeypatch)
    for v in (5, 9, 3):
        g.set(v, host="a")
    for v in (0.005, 0.05, 0.5, 5.0):
        h.observe(v, step="s")
    in_ray.flush()
    assert grec.calls == [("set", 3.0, {"host": "a"})]
    assert [c[1] for c in hrec.calls] == [0.005, 0.05, 0.5, 5.0]  # the buckets and the sum stay exact
    assert h.snapshot()[("s",)]["buckets"] == [1, 1, 1, 1]


def test_outside_ray_nothing_piles_up(monkeypatch):
    exporter = metrics._Exporter()
    monkeypatch.setattr(metrics, "_EXPORTER", exporter)
    monkeypatch.setattr(metrics, "_ray_ready", lambda: False)
    h = metrics.Histogram("automat_t_plain", "t", (1,), ())
    for _ in range(10_000):
        h.observe(0.5)
    assert h.count() == 10_000
    assert h._pending == [] and not exporter._dirty and exporter._thread is None


def test_a_failing_ray_metric_is_dropped_and_local_counting_goes_on(in_ray, monkeypatch):
    c = metrics.Counter("automat_t_broken", "t", ())

    class Broken:
        def inc(self, value, tags=None):
            raise RuntimeError("core worker gone")

    monkeypatch.setattr(c, "_make_ray", lambda: Broken())
    c.inc()
    in_ray.flush()  # logs once, does not raise
    for _ in range(5):
        c.inc()
    in_ray.flush()
    assert c.value() == 6 and c._pending == {}


def test_remembered_tag_sets_still_convert_check_and_merge_like_the_first_record(monkeypatch):
    """The tag-tuple cache of the hot path (a step result in the KIM slip host records three
    metrics) must not change what a record means: values become ``str``, a missing tag is
    ``""``, Ray's ``tags=`` style and keywords merge, an unknown tag is refused every time,
    and a metric with unbounded tag values does not grow the cache without end."""
    monkeypatch.setattr(metrics, "_KEY_CACHE_MAX", 8)
    c = metrics.Counter("automat_t_cached", "t", ("step", "result"))
    for _ in range(3):
        c.inc(step="parse_mime", result="ok")
        c.inc(tags={"step": "parse_mime"}, result="ok")
        c.inc(step=7)
    assert c.value(step="parse_mime", result="ok") == 6
    assert c.snapshot()[("7", "")] == 3
    for _ in range(2):
        with pytest.raises(ValueError, match="unknown tag"):
            c.inc(step="parse_mime", mailbox="x")
    for i in range(100):
        c.inc(step=f"s{i}", result="ok")
    assert len(c._keys) <= 8 and c.value(step="s99", result="ok") == 1
    h = metrics.Histogram("automat_t_cached_h", "t", (1,), ("step",))
    h.observe(0.5, step=["unhashable"])  # converted with str(), not cached
    assert h.count(step="['unhashable']") == 1
