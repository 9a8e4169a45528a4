"""The rate sweep's arithmetic (``deploy.loadtest.sweep``): which point kept up, where the
knee is, what the report says. The runs themselves: the integration smoke run."""

from __future__ import annotations

import json

import pytest

from deploy.loadtest.sweep import markdown, mails_for, parse_rates, point_of, summarize, summary_line, write


def _report(mails: int, achieved: float, p99: float, lost: int = 0, dup: int = 0) -> dict:
    return {"run_id": "r", "mails": mails, "throughput": {"mails_per_s": achieved},
            "latency_ms": {"p50": p99 / 2, "p95": p99 * 0.9, "p99": p99, "max": p99 * 1.2, "pickup_p99": 100.0},
            "ledger": {"lost": lost, "duplicates": dup, "balanced": True},
            "resources": {"cpu_s_per_mail": 0.03, "cpu_s_by_process": {"ray::MailboxFet": mails * 0.01, "imap": mails * 0.004,
                                                                        "imap-login": mails * 0.002},
                          "shard_hosts_by_role": {"kim.slip": {"cpu_ms_per_mail": 11.0},
                                                  "kim.worker": {"cpu_ms_per_mail": 20.0}}}}


def test_rates_are_positive_and_rising():
    assert parse_rates("7, 20,40.5") == [7.0, 20.0, 40.5]
    for bad in ("", "7,x", "7,0", "20,7", "7,7", "-1", "nan"):
        with pytest.raises(ValueError):
            parse_rates(bad)


def test_a_point_offers_rate_times_seconds():
    assert mails_for(7, 60) == 420 and mails_for(2.8, 60) == 168 and mails_for(0.01, 1) == 1


def test_a_point_splits_its_cpu_per_mail_by_part():
    p = point_of(20, _report(1200, 19.9, 260))
    assert (p["slip_ms_per_mail"], p["worker_ms_per_mail"], p["mailbox_actors_ms_per_mail"],
            p["dovecot_ms_per_mail"]) == (11.0, 20.0, 10.0, 6.0)


def test_a_point_that_finished_fewer_mails_than_offered_is_saturated():
    assert point_of(40, _report(2400, 39.2, 300))["kept_up"]  # 98 %
    assert not point_of(80, _report(4800, 71.0, 30_000))["kept_up"]  # 89 %


def test_the_knee_is_the_highest_rate_that_kept_up_within_target():
    pts = [point_of(7, _report(420, 7.0, 190)), point_of(20, _report(1200, 19.9, 260)),
           point_of(40, _report(2400, 39.5, 720)), point_of(80, _report(4800, 70.0, 40_000))]
    s = summarize(pts, 500)
    assert (s["knee_mails_per_s"], s["knee_p99_ms"], s["first_saturated_mails_per_s"]) == (20, 260, 80)
    assert summarize(pts, 1000)["knee_mails_per_s"] == 40
    assert summarize(pts, 100)["knee_mails_per_s"] is None


def test_a_point_that_lost_a_mail_is_no_knee():
    pts = [point_of(7, _report(420, 7.0, 190)), point_of(20, _report(1200, 20.0, 200, lost=1))]
    s = summarize(pts, 500)
    assert s["knee_mails_per_s"] == 7 and s["lost"] == 1
    assert summary_line(s, pts) == "sweep knee_mails_per_s=7  p99_target_ms=500  points=2  lost=1  duplicates=0"


def test_the_report_has_its_table_chart_and_summary_line(tmp_path):
    pts = [point_of(7, _report(420, 7.0, 190), tmp_path / "rate-7"), point_of(80, _report(4800, 70.0, 40_000))]
    sweep = {"sweep_id": "s1", "seconds_per_point": 60, "mailboxes": 20, "seed": 1, "machine": "2 cores",
             "rates": [7, 80], "points": pts, "summary": summarize(pts, 500), "notes": ["stopped after 80"]}
    paths = write(sweep, tmp_path)
    md = paths["markdown"].read_text()
    assert "**Knee: 7 mails/s** offered kept up with p99 190 ms (<= 500 ms); saturated from 80 mails/s" in md
    assert "| 80 | 4800 | 70.0 | no |" in md and "rate-7" in md
    assert "| 7 | 30 | 11 | 20 | 10 | 6 |" in md
    assert md.strip().splitlines()[-1] == "sweep knee_mails_per_s=7  p99_target_ms=500  points=2  lost=0  duplicates=0"
    assert json.loads(paths["json"].read_text())["summary"]["knee_mails_per_s"] == 7
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "No point" in markdown({**sweep, "summary": summarize(pts, 10)})


@pytest.mark.parametrize("args, message", [
    (["--sweep", "7,20", "--mails", "100"], "leave out --rate and --mails"),
    (["--sweep", "20,7"], "rising rates"),
    ([], "--mails is required"),
])
def test_the_command_refuses_what_it_cannot_run(args, message):
    """Usage errors end with exit code 2 and say what to change - before any stack is touched."""
    from typer.testing import CliRunner

    from deploy.cli import app

    res = CliRunner().invoke(app, ["loadtest", *args], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and message in res.output, res.output


def test_a_point_that_fails_leaves_the_sweep_report_of_the_points_before(tmp_path, monkeypatch):
    """A run that raises (no disk, the stack gone) ends the sweep with the error - and the
    points already run keep their sweep report, with a note of what failed and what did not run."""
    import asyncio

    from rich.console import Console

    import deploy.loadtest.driver as driver
    from deploy.loadtest.driver import Options
    from deploy.loadtest.sweep import run_sweep

    async def fake_run(cfg, opt, console):
        if opt.rate > 10:
            raise RuntimeError("not enough disk")
        return _report(opt.mails, opt.rate, 200.0)

    monkeypatch.setattr(driver, "run_loadtest", fake_run)
    opt = Options(mails=1, rate=7, out=tmp_path, seed=1, baselines=False)
    with pytest.raises(RuntimeError, match="not enough disk"):
        asyncio.run(run_sweep(None, opt, [7, 20, 40], 10, 500, Console(file=open(tmp_path / "log", "w"))))
    s = json.loads((tmp_path / "sweep.json").read_text())
    assert [p["offered_mails_per_s"] for p in s["points"]] == [7]
    assert s["notes"] == ["point 20 mails/s failed: RuntimeError: not enough disk; not run: 40"]
    assert s["summary"]["knee_mails_per_s"] == 7
