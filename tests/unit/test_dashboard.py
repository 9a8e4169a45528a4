"""The Grafana dashboard only shows metrics that exist in the code, with the right type.

Ray exports a metric ``automat_x`` as ``ray_automat_x`` (gauge), ``ray_automat_x_total``
(counter; a name already ending in ``_total`` keeps it) and ``ray_automat_x_bucket`` /
``_sum`` / ``_count`` (histogram). The names and types are read from the source: every
``metrics.counter/gauge/histogram("name", ...)`` call and ``ray.util.metrics`` metric.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "automat-dashboard.json"

_DEF = re.compile(r"\b(counter|gauge|histogram)\(\s*\"([a-z0-9_]+)\"", re.S)
_RAY_DEF = re.compile(r"metrics\.(Counter|Gauge|Histogram)\(\s*\"([a-z0-9_]+)\"", re.S)
_USE = re.compile(r"\bray_(automat_[a-z0-9_]+)")


def defined_metrics() -> dict[str, str]:
    """Prometheus series name (without ``ray_``) -> kind, from the source tree."""
    out: dict[str, str] = {}
    for room in ("actors", "supervisors", "deploy"):
        for py in (REPO / room).rglob("*.py"):
            text = py.read_text()
            defs = [(k, n) for k, n in _DEF.findall(text)] + [(k.lower(), n) for k, n in _RAY_DEF.findall(text)]
            for kind, name in defs:
                full = name if name.startswith("automat_") else "automat_" + name
                if kind == "counter":
                    out[full if full.endswith("_total") else full + "_total"] = "counter"
                elif kind == "gauge":
                    out[full] = "gauge"
                else:
                    for suffix in ("_bucket", "_sum", "_count"):
                        out[full + suffix] = "histogram"
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    d = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in d["panels"] if p["type"] != "row" for t in p["targets"]]


def test_every_panel_metric_exists_in_the_code():
    known = defined_metrics()
    assert "automat_kim_step_seconds_bucket" in known and "automat_restarts_total" in known
    used = {(title, m) for title, e in dashboard_exprs() for m in _USE.findall(e)}
    assert len(used) >= 20
    missing = sorted((t, m) for t, m in used if m not in known)
    assert not missing, f"panels use metrics the code does not define: {missing}"


def test_rate_and_quantile_are_used_on_the_right_types():
    known = defined_metrics()
    for title, e in dashboard_exprs():
        for m in _USE.findall(e):
            if known[m] == "counter":
                assert re.search(rf"(rate|increase)\(ray_{m}\b", e), (title, e)
            if m.endswith("_bucket"):
                assert "histogram_quantile" in e, (title, e)
            if known[m] == "gauge":
                assert not re.search(rf"(rate|increase)\(ray_{m}\b", e), (title, e)


def test_the_dashboard_covers_what_operators_asked_for():
    titles = " | ".join(t for t, _ in dashboard_exprs()).lower()
    for topic in ("throughput by procedure", "step latency", "backlog", "parked", "restarts", "sync lag",
                  "efa operations", "moped operations", "pool hosts"):
        assert topic in titles, topic
    exprs = " ".join(e for _, e in dashboard_exprs())
    # kinds named in label matchers exist as entity kinds in the code
    code = " ".join(p.read_text() for p in (REPO / "actors").rglob("*.py"))
    for kind in set(re.findall(r'kind="([a-z0-9_.]+)"', exprs)):
        assert f'"{kind}"' in code, kind


def test_the_committed_json_is_what_the_builder_makes():
    from deploy.grafana.build import build

    assert json.loads(DASHBOARD.read_text()) == json.loads(json.dumps(build()))
