"""The load test report's per-mail latency breakdown (``report.latency_breakdown``): the
parts a load tester reads to see what sets the p99."""

from __future__ import annotations

import pytest

from deploy.loadtest.report import latency_breakdown, markdown


def _slip(created: float, steps: list[tuple[str, float, float, float]]) -> dict:
    hist = [{"step": s, "attempt": 1, "started": a, "ended": b, "result": "ok", "worker_ms": w} for s, a, b, w in steps]
    return {"created_at": created, "finished_at": steps[-1][2], "history": hist}


def test_a_mail_that_waited_for_its_first_step_shows_the_wait_not_work():
    # delivered at 100.0, picked up 80 ms later; load_raw's wall 1.2 s of which 5 ms work
    slip = _slip(100.08, [("load_raw", 100.08, 101.28, 5.0), ("parse_mime", 101.28, 101.31, 25.0),
                          ("release_record", 101.31, 101.32, 4.0)])
    b = latency_breakdown(100.0, slip, t0=95.0)
    assert b["at_s"] == 5.0
    assert b["latency_ms"] == pytest.approx(1320.0, abs=0.1)
    assert b["pickup_ms"] == pytest.approx(80.0, abs=0.1)
    assert b["work_ms"] == 34.0
    assert b["wait_ms"] == pytest.approx(1320.0 - 80.0 - 34.0, abs=0.1)
    assert (b["slowest_step"], b["slowest_step_wall_ms"], b["slowest_step_worker_ms"]) == ("load_raw", 1200.0, 5.0)
    assert b["steps"] == 3


def test_a_slip_without_history_still_gives_its_latency_and_pickup():
    b = latency_breakdown(10.0, {"created_at": 10.5, "finished_at": 11.0, "history": []}, t0=10.0)
    assert (b["latency_ms"], b["pickup_ms"], b["work_ms"], b["wait_ms"], b["slowest_step"]) == (1000.0, 500.0, 0, 500.0, None)


def _report(**resources) -> dict:
    return {"run_id": "x", "mode": "rate", "mails": 1, "mix_text": "eAU 100%", "fault_rate": 0.0, "mailboxes": 1,
            "pipeline": {"slip_hosts": 1, "worker_hosts": 1, "fetchers": 1, "fuse_max": 8},
            "machine": {"cores": 2, "memory_gib": 24, "loadavg_start": "0", "loadavg_end": "0"},
            "generator": {"mails_per_s": 1.0, "mode": "imap"},
            "throughput": {"seconds": 1.0, "mails_per_s": 1.0, "sustained_mails_per_s": 1.0},
            "latency_ms": {"p50": 900.0, "p95": 900.0, "p99": 900.0, "max": 900.0},
            "resources": {"cpu_s_per_mail": 0.1, "peak_rss_mib": 1.0, "rss_mib_at": [1, 1, 1], "redis_ops_per_mail": 1,
                          **resources},
            "ledger": {"delivered": 1, "done": 1, "workbasket": 0, "rejected": 0, "parked": 0, "in_flight": 0,
                       "missing": 0, "balanced": True, "core_records": 1, "core_mails": 1, "lost": 0, "duplicates": 0,
                       "as_expected": 1},
            "slowest": []}


def test_the_markdown_report_splits_the_shard_hosts_cpu_by_role():
    md = markdown(_report(cpu_s_by_process={"ray::ShardHost": 28.0},
                          shard_hosts_by_role={"kim.slip": {"hosts": 2, "cpu_s": 8.0, "cpu_ms_per_mail": 4.0},
                                               "kim.worker": {"hosts": 1, "cpu_s": 20.0, "cpu_ms_per_mail": 10.0}}))
    assert ("Shard hosts by role (`ray::ShardHost` above; from the clock's start): kim.slip (2 hosts) 8.0 s = 4.00 ms per mail, "
            "kim.worker (1 host) 20.0 s = 10.00 ms per mail.") in md
    assert "Shard hosts by role" not in markdown(_report())  # a report of before: no such line


def test_the_markdown_report_gives_each_role_s_garbage_collector():
    md = markdown(_report(shard_hosts_by_role={
        "kim.slip": {"hosts": 2, "cpu_s": 8.0, "cpu_ms_per_mail": 4.0, "gc_s": 0.42, "gc_full_passes": 3,
                     "gc_max_pause_ms": 61.4},
        "kim.worker": {"hosts": 1, "cpu_s": 20.0, "cpu_ms_per_mail": 10.0}}))  # no gc: a host of before
    assert ("kim.slip (2 hosts) 8.0 s = 4.00 ms per mail (garbage collector 0.4 s, 3 full passes, longest pause "
            "61 ms), kim.worker (1 host) 20.0 s = 10.00 ms per mail.") in md


def test_the_markdown_report_lists_the_slowest_mails():
    slow = latency_breakdown(100.0, _slip(100.1, [("load_raw", 100.1, 100.9, 3.0)]), t0=99.0)
    r = {"run_id": "x", "mode": "rate", "mails": 1, "mix_text": "eAU 100%", "fault_rate": 0.0, "mailboxes": 1,
         "pipeline": {"slip_hosts": 1, "worker_hosts": 1, "fetchers": 1, "fuse_max": 8},
         "machine": {"cores": 2, "memory_gib": 24, "loadavg_start": "0", "loadavg_end": "0"},
         "generator": {"mails_per_s": 1.0, "mode": "imap"},
         "throughput": {"seconds": 1.0, "mails_per_s": 1.0, "sustained_mails_per_s": 1.0},
         "latency_ms": {"p50": 900.0, "p95": 900.0, "p99": 900.0, "max": 900.0},
         "resources": {"cpu_s_per_mail": 0.1, "peak_rss_mib": 1.0, "rss_mib_at": [1, 1, 1], "redis_ops_per_mail": 1},
         "ledger": {"delivered": 1, "done": 1, "workbasket": 0, "rejected": 0, "parked": 0, "in_flight": 0,
                    "missing": 0, "balanced": True, "core_records": 1, "core_mails": 1, "lost": 0, "duplicates": 0,
                    "as_expected": 1},
         "slowest": [slow]}
    md = markdown(r)
    assert "## The slowest mails" in md
    assert "| 1 | 900.0 | 100.0 | 3 | 797.0 | 1 | load_raw (800.0 / 3) |" in md
