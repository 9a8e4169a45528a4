"""CI's chaos run: a small ``automat chaos`` on every push (bounded; ~4-5 min on an idle
2-core machine).

300 KIM mails in rate mode while every fault kind hits once: SIGKILLed mailbox actor, slip
host, step worker, outbox relay, a supervisor and a shard host of each other capability;
Redis, Kafka (Tansu) and Dovecot crashed and restarted; IMAP connections dropped; the core
system failing, hanging and slow. It runs on its own stack (``.run/chaos-ci``, ports
27000+) and its own Ray, so the shared stack of the other tests is never touched.
Afterwards: nothing lost, nothing doubled, every fault recovered, no personal data or
secret in Redis, Kafka, logs or blobs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.chaos.faults import ALL_KINDS

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(1500)
def test_small_chaos_run_loses_and_doubles_nothing(cfg):
    run_dir = Path(cfg.run_dir) / "chaos-ci"
    automat = Path(sys.executable).parent / "automat"
    argv = [str(automat), "chaos", "--mails", os.environ.get("AUTOMAT_CHAOS_CI_MAILS", "300"),
            "--duration", "150", "--faults", str(len(ALL_KINDS)), "--seed", "20260505",
            "--run-dir", str(run_dir), "--port-base", "27000", "--settle", "600"]
    (run_dir / "report.json").unlink(missing_ok=True)  # never read an earlier run's report
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOMAT_") and k != "RAY_ADDRESS"}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=1400)
    out = proc.stdout[-6000:] + proc.stderr[-3000:]
    print(out)
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["lost"] == 0, (rep["lost_detail"], out)
    assert rep["duplicates"] == 0, (rep["duplicate_detail"], out)
    assert rep["ledger"]["received"] == rep["distinct_mails"] and rep["ledger"]["in_flight"] == 0
    assert rep["checks"]["kafka"]["outbox_left"] == 0 and rep["checks"]["imap"]["inbox"] == 0
    injected = {f["kind"] for f in rep["faults"]}
    assert injected == set(ALL_KINDS), sorted(set(ALL_KINDS) - injected)
    assert all(f["recovery_s"] is not None for f in rep["faults"]), [f for f in rep["faults"] if f["recovery_s"] is None]
    pii = rep["pii"]
    assert pii["redis_hits"] == pii["kafka_hits"] == pii["log_hits"] == pii["blob_hits"] == 0, pii
    assert rep["ok"] and proc.returncode == 0, (rep["problems"], out)
