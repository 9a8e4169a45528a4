"""CI smoke run of ``automat loadtest`` (the command a load tester runs), a few thousand
mails (at most 400 in flight: the mailbox actors' admission control holds the rest
back in IMAP): the ledger balances, nothing is lost or doubled, every mail ends as the spec
prescribes, and the report has its shape (JSON keys, Markdown, PNG chart, summary line).
Speed is not asserted here - the numbers are the report's business.

``KIM_LOADTEST_SMOKE_MAILS`` changes the number of mails (default 1500).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

N = int(os.environ.get("KIM_LOADTEST_SMOKE_MAILS", "1500"))
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(1500)
def test_loadtest_smoke_ledger_and_report_shape(stack, cfg, tmp_path):
    out = tmp_path / "report"
    # as a load tester types it, outside make: no RAY_AUTH_MODE in the environment.
    # Regression: Ray then turned token auth on for the local cluster while the workers
    # were told "disabled" - no actor ever started and the run waited (`automat loadtest`
    # hung after "Started a local Ray instance").
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env["AUTOMAT_RUN_DIR"] = str(cfg.run_dir)
    cmd = [sys.executable, "-m", "deploy.cli", "loadtest", "--mails", str(N), "--mailboxes", "8",
           "--baseline-mails", "60", "--redis-db", "5", "--max-in-flight", "400", "--no-live", "--out", str(out), "--timeout", "1200",
           "--seed", "4242"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1480)
    tail = (p.stdout + p.stderr)[-4000:]
    assert p.returncode == 0, tail

    # the one-line summary of BENCHMARK.md ends the output
    last = [ln for ln in p.stdout.splitlines() if ln.strip()][-1]
    m = re.fullmatch(r"mails=(\d+)  mails_per_s=([\d.]+)  p99_ms=(\d+)  lost=(\d+)  duplicates=(\d+)", last.strip())
    assert m, tail
    assert (int(m[1]), int(m[4]), int(m[5])) == (N, 0, 0)

    r = json.loads((out / "report.json").read_text())
    for key in ("run_id", "mode", "mails", "mix", "pipeline", "machine", "generator", "throughput", "latency_ms",
                "resources", "ledger", "baselines", "steps", "series"):
        assert key in r, key
    led = r["ledger"]
    # received = done + rejected + parked + in flight, and every delivered mail is terminal
    assert led["delivered"] == N == led["received"]
    assert led["received"] == led["done"] + led["rejected"] + led["parked"] + led["in_flight"]
    assert led["in_flight"] == 0 and led["missing"] == 0 and led["parked"] == 0
    assert led["lost"] == 0 and led["duplicates"] == 0 and led["balanced"]
    assert led["as_expected"] == N  # every fault ended as the spec prescribes (rejected / work basket / done)
    assert led["rejected"] > 0 and led["workbasket"] > 0  # the mix has faulty and eMailPLUS mails
    # each deposited eAU is in the core system exactly once
    assert led["core_records"] == led["core_mails"]
    assert led["inbox_left"] == 0

    assert r["throughput"]["mails_per_s"] > 0 and r["throughput"]["terminal"] == N
    lat = r["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert r["resources"]["cpu_s_per_mail"] > 0 and r["resources"]["peak_rss_mib"] > 0
    names = {b["name"] for b in r["baselines"]}
    assert names == {"inline floor", "naive Ray (one task per step)"}
    for b in r["baselines"]:
        assert b["mails"] == 60 and b["mails_per_s"] > 0 and b["ratio"] > 0
        assert sum(b["outcomes"].values()) == 60
    steps = {s["step"] for s in r["steps"]}
    assert {"parse_mime", "verify_chain", "deposit_core", "release_record"} <= steps
    # the calibration before and after the run, and the throughput in its units
    cal = r["machine"]["calibration"]
    assert cal["start"]["ms_per_mail"] > 0 and cal["end"]["ms_per_mail"] > 0
    assert r["throughput"]["kernel_cores"] == pytest.approx(
        r["throughput"]["mails_per_s"] * (cal["start"]["ms_per_mail"] + cal["end"]["ms_per_mail"]) / 2000, rel=1e-3)
    assert len(r["series"]["t"]) == len(r["series"]["done_per_s"]) > 0
    # the shard hosts' CPU split by role: every slip and worker host found by its pid; counted
    # from the clock's start, together they are the ray::ShardHost processes less their start-up
    roles = r["resources"]["shard_hosts_by_role"]
    assert set(roles) == {"kim.slip", "kim.worker"}
    assert roles["kim.slip"]["hosts"] == r["pipeline"]["slip_hosts"]
    assert roles["kim.worker"]["hosts"] >= r["pipeline"]["worker_hosts"]  # the autoscaler may add one
    assert all(v["cpu_s"] > 0 and v["cpu_ms_per_mail"] > 0 for v in roles.values())
    assert all(v["gc_s"] >= 0 and v["gc_full_passes"] >= 0 and v["gc_max_pause_ms"] > 0 for v in roles.values())
    assert sum(v["cpu_s"] for v in roles.values()) <= r["resources"]["cpu_s_by_process"]["ray::ShardHost"] + 0.5
    # the slowest mails, broken down: they set the p99, and their parts add up to their latency
    slow = r["slowest"]
    assert 0 < len(slow) <= 12 and slow[0]["latency_ms"] == pytest.approx(lat["max"], abs=1.0)
    for s in slow:
        assert s["pickup_ms"] + s["work_ms"] + s["wait_ms"] == pytest.approx(s["latency_ms"], abs=0.5)
        assert s["steps"] > 0 and s["slowest_step"]

    # the clock started on a warm pipeline (every host and mailbox actor answered its readiness probe)
    assert not [n for n in r["notes"] if n.startswith("not warm")], r["notes"]

    md = (out / "report.md").read_text()
    assert "## Ledger" in md and "## Baselines" in md and "cores' worth of the kernel" in md and "## The slowest mails" in md and "Shard hosts by role" in md and md.rstrip().endswith(last.strip())
    png = (out / "chart.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.timeout(900)
def test_rate_sweep_finds_the_knee_and_stops_at_saturation(stack, cfg, tmp_path):
    """``automat loadtest --sweep``: a point the pipeline keeps up with, then one it cannot
    (400 mails/s offered for 5 s - far beyond this machine); the sweep stops there, the third
    rate is not run, and the knee is the first point. Every point balanced, nothing lost."""
    out = tmp_path / "sweep"
    env = {**os.environ, "AUTOMAT_RUN_DIR": str(cfg.run_dir)}
    cmd = [sys.executable, "-m", "deploy.cli", "loadtest", "--sweep", "3,400,800", "--sweep-seconds", "5",
           "--mailboxes", "4", "--redis-db", "5", "--no-live", "--out", str(out), "--timeout", "600", "--seed", "77"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=880)
    tail = (p.stdout + p.stderr)[-4000:]
    assert p.returncode == 0, tail
    last = [ln for ln in p.stdout.splitlines() if ln.strip()][-1].strip()
    assert last == "sweep knee_mails_per_s=3  p99_target_ms=500  points=2  lost=0  duplicates=0", tail

    s = json.loads((out / "sweep.json").read_text())
    low, high = s["points"]
    assert (low["offered_mails_per_s"], low["mails"], high["offered_mails_per_s"], high["mails"]) == (3, 15, 400, 2000)
    assert low["kept_up"] and not high["kept_up"] and high["finished_mails_per_s"] < 380
    assert s["summary"]["first_saturated_mails_per_s"] == 400
    assert any("not run: 800" in n for n in s["notes"])
    assert not (out / "rate-800").exists()
    for p_, rate in ((low, 3), (high, 400)):
        r = json.loads((Path(p_["report"]) / "report.json").read_text())
        assert r["mode"] == "rate" and r["offered_rate"] == rate and r["baselines"] == []
        assert r["ledger"]["balanced"] and r["ledger"]["lost"] == 0 and r["ledger"]["as_expected"] == r["mails"]
    md = (out / "sweep.md").read_text()
    assert "**Knee: 3 mails/s**" in md and md.rstrip().endswith(last)
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
