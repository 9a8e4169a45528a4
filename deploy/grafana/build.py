"""Builds ``automat-dashboard.json`` (Grafana) from the panel list below.

    .venv/bin/python -m deploy.grafana.build      # rewrites deploy/grafana/automat-dashboard.json

Every query is over automat's own metrics (``actors/runtime/metrics.py``, the
capabilities' ``metrics.counter/gauge/histogram`` calls, the supervisors' restart
counter) as Ray exports them to Prometheus: prefix ``ray_``; counters get ``_total``;
histograms ``_bucket`` / ``_sum`` / ``_count``. tests/unit/test_dashboard.py checks that
every metric a panel uses exists in the code with that type.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "automat-dashboard.json"
DS = {"type": "prometheus", "uid": "${datasource}"}

# (title, unit, [(legend, expr)], description)  ; rows start with a str
PANELS: list = [
    "KIM mail pipeline",
    ("KIM throughput by procedure (mails/s, terminal)", "reqps",
     [("{{procedure}} {{outcome}}", 'sum by (procedure, outcome) (rate(ray_automat_kim_mails_total[1m]))')],
     "Slips reaching a terminal state per second, by procedure (eAU, eEB, EBZ, AAR, eMailPLUS) and outcome."),
    ("KIM mails received (mails/s)", "reqps",
     [("{{mailbox}}", 'sum by (mailbox) (rate(ray_automat_kim_mails_received_total[1m]))'),
      ("fetched {{result}}", 'sum by (result) (rate(ray_automat_kim_mails_fetched_total[1m]))')],
     "Slips created per mailbox; IMAP fetch results (created / already_owned after a crash)."),
    ("KIM step latency p50 / p95 / p99 (dispatch to result)", "s",
     [("p50", 'histogram_quantile(0.5, sum by (le) (rate(ray_automat_kim_step_seconds_bucket[5m])))'),
      ("p95", 'histogram_quantile(0.95, sum by (le) (rate(ray_automat_kim_step_seconds_bucket[5m])))'),
      ("p99", 'histogram_quantile(0.99, sum by (le) (rate(ray_automat_kim_step_seconds_bucket[5m])))')],
     "Time from a step's dispatch by the stateshifter to its result, all steps."),
    ("KIM slowest steps (p95)", "s",
     [("{{step}}", 'topk(8, histogram_quantile(0.95, sum by (le, step) (rate(ray_automat_kim_step_seconds_bucket[5m]))))')],
     "The eight steps with the highest p95 latency."),
    ("KIM step results", "reqps",
     [("{{result}}", 'sum by (result) (rate(ray_automat_kim_step_results_total[1m]))')],
     "ok / retry / error / timeout per second."),
    ("KIM backlog", "short",
     [("INBOX {{mailbox}}", 'sum by (mailbox) (ray_automat_kim_mailbox_backlog)'),
      ("slips in flight", 'sum(ray_automat_kim_ledger{status=~"received|running|waiting_retry"})'),
      ("step pool in flight", 'sum(ray_automat_pool_backlog{kind="kim.worker"})')],
     "Mails waiting in the INBOXes, slips not yet terminal (last ledger read), step orders in flight."),
    ("KIM parked (last 15 min)", "short",
     [("{{step}} {{code}}", 'sum by (step, code) (increase(ray_automat_kim_parked_total[15m]))'),
      ("parked now (ledger)", 'sum(ray_automat_kim_ledger{status="parked"})')],
     "Parked slips wait for an operator: `automat mails parked`, `automat mails show ID`, `automat mails redrive ID`."),
    "Shard hosts, pools and the autoscaler",
    ("Messages handled by entity kind", "reqps",
     [("{{kind}}", 'sum by (kind) (rate(ray_automat_messages_handled_total[1m]))')],
     "Every message delivered to a shard host, by entity kind."),
    ("Pool hosts (autoscaler)", "short",
     [("{{kind}}", 'max by (kind) (ray_automat_pool_hosts)')],
     "Shard hosts of each autoscaled kind (step pool kim.worker, stateshifter kim.slip)."),
    ("Pool backlog and latency (autoscaler's view)", "short",
     [("backlog {{kind}}", 'max by (kind) (ray_automat_pool_backlog)'),
      ("p95 s {{kind}}", 'max by (kind) (ray_automat_pool_latency_seconds)')],
     "What the autoscaler decides on: messages in flight on the pool's hosts, worst host's p95."),
    ("Host in-flight and event-loop lag", "short",
     [("in flight {{host}}", 'max by (host) (ray_automat_host_inflight)'),
      ("loop lag s {{host}}", 'max by (host) (ray_automat_host_loop_lag_seconds)')],
     "Per shard host: messages delivered and not yet answered; loop lag = CPU saturation."),
    ("Batch latency p95 by kind", "s",
     [("{{kind}}", 'histogram_quantile(0.95, sum by (le, kind) (rate(ray_automat_deliver_seconds_bucket[5m])))')],
     "Arrival of a batch at a shard host to its last reply."),
    ("Scaling actions and shard moves", "short",
     [("{{direction}} {{kind}}", 'sum by (kind, direction) (increase(ray_automat_scale_decisions_total[10m]))'),
      ("shards moved {{kind}}", 'sum by (kind) (increase(ray_automat_shard_moves_total[10m]))'),
      ("capacity requests", 'sum(increase(ray_automat_capacity_requests_total[10m]))'),
      ("handover p95 s", 'histogram_quantile(0.95, sum by (le) (rate(ray_automat_handover_seconds_bucket[30m])))')],
     "Grow/shrink decisions, shards handed over, request_resources calls (node full), handover time."),
    "Supervision and reliability",
    ("Restarts (last 5 min)", "short",
     [("{{supervisor}}/{{child}}", 'sum by (supervisor, child) (increase(ray_automat_restarts_total[5m]))')],
     "Child restarts by supervisors. `automat status` shows the tree with last death reasons."),
    ("Handler errors and dead letters", "short",
     [("errors {{kind}}", 'sum by (kind) (increase(ray_automat_handler_errors_total[5m]))'),
      ("dead letters {{kind}}", 'sum by (kind) (increase(ray_automat_dead_letters_total[5m]))')],
     "Handler exceptions (retried from the last durable state) and messages dead-lettered (automat:deadletters)."),
    ("Outbox to Kafka", "short",
     [("backlog", 'max(ray_automat_outbox_backlog)'),
      ("published/s {{topic}}", 'sum by (topic) (rate(ray_automat_outbox_published_total[1m]))'),
      ("errors {{error}}", 'sum by (error) (increase(ray_automat_outbox_errors_total[5m]))'),
      ("publish p95 s", 'histogram_quantile(0.95, sum by (le) (rate(ray_automat_outbox_publish_seconds_bucket[5m])))')],
     "Events waiting in the Redis outbox, published per topic, relay errors, publish latency."),
    "EFA, MOPED, HL7, 116117",
    ("EFA operations", "reqps",
     [("{{kind}}", 'sum by (kind) (rate(ray_automat_messages_handled_total{kind=~"efa\\\\..*"}[1m]))'),
      ("errors {{kind}}", 'sum by (kind) (rate(ray_automat_handler_errors_total{kind=~"efa\\\\..*"}[1m]))')],
     "Messages to the EFA case record, patient index and janitor entities (every API operation is one)."),
    ("MOPED operations", "reqps",
     [("{{kind}}", 'sum by (kind) (rate(ray_automat_messages_handled_total{kind=~"moped\\\\..*"}[1m]))'),
      ("p95 s", 'histogram_quantile(0.95, sum by (le) (rate(ray_automat_deliver_seconds_bucket{kind="moped.composition"}[5m])))')],
     "Messages to the MOPED composition entities (each FHIR operation is one) and their batch latency."),
    ("HL7 v2 messages", "reqps",
     [("{{kind}}", 'sum by (kind) (rate(ray_automat_messages_handled_total{kind=~"hl7\\\\..*"}[1m]))')],
     "Messages to the HL7 patient, case and pending entities."),
    ("116117 sync lag", "s",
     [("{{host}}", 'max by (host) (ray_automat_timer_lag_seconds{kind="tss.practice"})')],
     "How late the practices' due sync timers are (0 = every due poll/page runs on time); it grows "
     "when the 116117 sync falls behind."),
]


def build() -> dict:
    panels, y, x, pid = [], 0, 0, 1
    for item in PANELS:
        if isinstance(item, str):
            if x:
                y, x = y + 8, 0
            panels.append({"id": pid, "type": "row", "title": item, "collapsed": False,
                           "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
            pid += 1
            y += 1
            continue
        title, unit, targets, desc = item
        panels.append({
            "id": pid, "type": "timeseries", "title": title, "description": desc, "datasource": DS,
            "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
            "targets": [{"refId": chr(65 + i), "datasource": DS, "expr": e, "legendFormat": leg}
                        for i, (leg, e) in enumerate(targets)],
        })
        pid += 1
        x = 12 - x
        if x == 0:
            y += 8
    return {
        "title": "automat", "uid": "automat-main", "tags": ["automat", "ray"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "label": "Prometheus", "type": "datasource",
                                 "query": "prometheus", "current": {}, "hide": 0}]},
        "annotations": {"list": []}, "editable": True, "panels": panels,
        "description": "automat on Ray: KIM pipeline, shard hosts, autoscaler, supervision, outbox, "
                       "EFA/MOPED/HL7/116117. Metrics from Ray's metrics export port (8080).",
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(build(), indent=1) + "\n")
    print(f"wrote {OUT}")
