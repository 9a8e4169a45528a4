"""The load test's calibration (``deploy.loadtest.calibration``): how fast the machine ran
the step code's compute kernel at the start and end of a run, and the throughput in those
units - what a load tester compares runs of different hours by."""

from __future__ import annotations

import pytest

from deploy.loadtest import calibration
from deploy.loadtest.report import markdown


def test_the_calibration_times_the_kernel_on_good_mails():
    c = calibration.calibrate(rounds=2)
    assert c["mails"] == calibration.MAILS and c["rounds"] == 2
    assert 0.05 < c["ms_per_mail"] < 200  # MIME + CMS + chain + XML of one eAU on one core
    assert c["spread"] >= 1.0
    raws, trust = calibration._corpus()
    assert calibration.kernel(raws[0], trust) == 4


def test_a_kernel_that_stops_passing_its_checks_is_no_calibration(monkeypatch):
    """A calibration that timed failing checks (a changed generator, an expired test
    certificate) would time less work than a real mail's: it refuses instead."""
    monkeypatch.setattr(calibration, "kernel", lambda raw, trust: 3)
    with pytest.raises(RuntimeError, match="did not pass the kernel"):
        calibration.calibrate(rounds=1)


def _report(mails_per_s: float, start_ms: float | None, end_ms: float | None) -> dict:
    cal = {"start": {"ms_per_mail": start_ms}, "end": {"ms_per_mail": end_ms}} if start_ms else None
    return {"run_id": "x", "mode": "throughput", "mails": 10, "mix_text": "eAU 100%", "fault_rate": 0.0,
            "mailboxes": 1, "pipeline": {"slip_hosts": 1, "worker_hosts": 1, "fetchers": 1, "fuse_max": 8},
            "machine": {"cores": 2, "memory_gib": 24, "loadavg_start": "0", "loadavg_end": "0", "calibration": cal},
            "generator": {"mails_per_s": 1.0, "mode": "imap"},
            "throughput": {"seconds": 1.0, "mails_per_s": mails_per_s, "sustained_mails_per_s": mails_per_s},
            "latency_ms": {"p50": 1.0, "p95": 1.0, "p99": 1.0, "max": 1.0},
            "resources": {"cpu_s_per_mail": 0.1, "peak_rss_mib": 1.0, "rss_mib_at": [1, 1, 1], "redis_ops_per_mail": 1},
            "ledger": {"delivered": 10, "done": 10, "workbasket": 0, "rejected": 0, "parked": 0, "in_flight": 0,
                       "missing": 0, "balanced": True, "core_records": 10, "core_mails": 10, "lost": 0,
                       "duplicates": 0, "as_expected": 10}}


def test_the_same_pipeline_on_a_slower_hour_has_the_same_throughput_in_machine_units():
    # 90 mails/s on a fast hour, 65 on an hour when the kernel took 90/65 as long
    fast = calibration.kernel_cores(_report(90.0, 1.30, 1.30))
    slow = calibration.kernel_cores(_report(65.0, 1.80, 1.80))
    assert fast == pytest.approx(0.117) and slow == pytest.approx(fast, rel=1e-3)
    assert calibration.kernel_cores(_report(80.0, 1.0, 2.0)) == pytest.approx(0.12)  # mean of start and end
    assert calibration.kernel_cores(_report(80.0, None, None)) is None


def test_the_markdown_report_gives_the_calibration_and_the_ceiling():
    r = _report(75.0, 1.6, 1.8)
    r["throughput"]["kernel_cores"] = calibration.kernel_cores(r)
    md = markdown(r)
    assert "start / end of the run | 1.600 / 1.800 ms per mail |" in md
    assert "| 0.128 of 2 (the kernel alone: 1,176 mails/s) |" in md
    assert "## Ledger" in md
    assert "calibration" not in markdown(_report(75.0, None, None))
