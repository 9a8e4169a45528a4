"""Several Ray worker nodes on this machine (``ray.cluster_utils.Cluster``): the KIM shard
hosts and step pool spread over the worker nodes, the control actors stay on the head
(num_cpus 0), and a worker node killed during a KIM load loses nothing — its hosts come
back on the remaining node, every mail ends terminal exactly once, no deposit is doubled.

Runs ``deploy.multinode`` in its own process (its own Ray cluster of 1 head + 2 worker
nodes; the session's Ray is untouched) in Redis database 9 of the local stack. ~2 min.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


@pytest.mark.timeout(600)
def test_a_killed_worker_node_loses_nothing_and_its_hosts_move(stack, tmp_path):
    out = tmp_path / "multinode.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.multinode", "--workers", "2", "--mails", "300", "--kill",
         "--timeout", "300", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=580,
    )
    print("\n".join(ln for ln in proc.stdout.splitlines()  # our lines, not Ray's node logs
                    if ln.startswith("[") or (ln.startswith("  ") and not ln.startswith("   "))))
    assert out.exists(), proc.stderr[-4000:]
    res = json.loads(out.read_text())[0]
    # spread: both worker nodes carry hosts; supervisors are on the head
    before = res["placement_before"]
    assert sorted(k for k in before if k.startswith("worker")) == ["worker1", "worker2"], before
    assert "head" not in before, before
    assert res["control_on_head"], res
    # the kill happened mid-run and the killed node's hosts serve again on the other node
    kill = res["kill"]
    assert 0 < kill["at_terminal"] < res["mails"], kill
    assert kill.get("recovered_s") is not None, kill
    after = kill["placement_after"]
    assert kill["node"] not in after and "down" not in after, after
    assert sum(len(v) for v in after.values()) == sum(len(v) for v in before.values())
    # nothing lost, nothing doubled
    led = res["ledger"]
    assert res["not_terminal"] == 0 and led["missing"] == 0 and led["in_flight"] == 0, led
    assert led["received"] == res["distinct"] == led["done"] + led["rejected"] + led["parked"], led
    assert led["parked"] == 0, led["by_error"]  # step orders lost with the node were retried
    assert res["duplicates"] == 0
    assert proc.returncode == 0, proc.stderr[-2000:]
