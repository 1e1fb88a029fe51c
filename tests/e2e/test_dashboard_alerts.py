"""The shipped dashboard and alert rules work against a real Prometheus scraping a real spanagg:
every query of every dashboard panel parses and returns data, the rules load, every alert's
expression is empty while spanagg is healthy, and one turns non-empty when its cause happens
(a rejected point), so the quiet check is not quiet by construction."""

import json
import time
import urllib.request

from conftest import ROOT, Prometheus
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from test_sdk_prometheus import run_pods


def dashboard_queries():
    """Every target of every panel, as (panel title, target index, PromQL)."""
    dash = json.loads((ROOT / "dashboards" / "spanagg.json").read_text())
    for panel in dash["panels"]:
        for i, target in enumerate(panel["targets"]):
            expr = (
                target["expr"]
                .replace("$__rate_interval", "1m")
                .replace("$job", "spanagg-internal")
                .replace("$instance", ".*")
            )
            yield (panel["title"], i), expr


def alert_rules(prom):
    groups = prom.get("/api/v1/rules")["data"]["groups"]
    return [r for g in groups for r in g["rules"] if r["type"] == "alerting"]


def post_rejected_point(spanagg):
    """A histogram point whose bucket counts do not match its bounds: refused, counted."""
    req = ExportMetricsServiceRequest()
    sm = req.resource_metrics.add().scope_metrics.add()
    metric = sm.metrics.add(name="traces.span.metrics.duration", unit="ms")
    metric.histogram.aggregation_temporality = 1  # delta
    now = time.time_ns()
    p = metric.histogram.data_points.add(
        start_time_unix_nano=now - 10**9, time_unix_nano=now, count=1, sum=1.0
    )
    p.explicit_bounds.extend([1.0, 2.0])
    p.bucket_counts.extend([1])
    r = urllib.request.Request(
        f"http://{spanagg.otlp_http}/v1/metrics",
        data=req.SerializeToString(),
        headers={"Content-Type": "application/x-protobuf"},
    )
    with urllib.request.urlopen(r, timeout=10) as resp:
        assert resp.status == 200


def wait_for(what, check, within=30):
    deadline = time.time() + within
    while not check():
        assert time.time() < deadline, what
        time.sleep(1)


def test_every_dashboard_query_returns_data_and_the_alerts_stay_quiet(spanagg):
    prom = Prometheus(spanagg.http, internal=True, rule_files=[ROOT / "alerts" / "spanagg.rules.yml"])
    try:
        run_pods(spanagg, rounds=2, seed=3)
        time.sleep(4)  # a few scrapes, so rates have two samples
        run_pods(spanagg, rounds=1, seed=4)
        pending = dict(dashboard_queries())
        assert len(pending) >= 20, f"only {len(pending)} queries found"

        def all_answered():
            for key, expr in list(pending.items()):
                if prom.query(expr):
                    del pending[key]
            return not pending

        wait_for(f"queries without data: {pending}", all_answered)

        rules = alert_rules(prom)
        names = {r["name"] for r in rules}
        assert {"SpanaggDown", "SpanaggRejectingPoints", "SpanaggRefusingExports"} <= names
        assert all(r["health"] == "ok" for r in rules), rules
        # Each alert's expression, evaluated now: `for:` would hide a true one for minutes.
        for r in rules:
            assert prom.query(r["query"]) == [], f"{r['name']} is true while healthy"

        # Its cause makes an alert's expression true: the check above can fail.
        post_rejected_point(spanagg)
        rejecting = next(r["query"] for r in rules if r["name"] == "SpanaggRejectingPoints")
        wait_for("SpanaggRejectingPoints stays false after a rejection", lambda: prom.query(rejecting))
        wait_for(
            "SpanaggRejectingPoints is not pending",
            lambda: prom.query('ALERTS{alertname="SpanaggRejectingPoints",alertstate="pending"}'),
        )
    finally:
        prom.stop()
