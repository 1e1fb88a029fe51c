"""The shipped dashboard and alert rules work against a real Prometheus scraping a real spanagg:
every dashboard query parses and returns data, and the rules load and stay quiet when healthy."""

import json
import time

from conftest import ROOT, Prometheus
from test_sdk_prometheus import run_pods


def dashboard_queries():
    dash = json.loads((ROOT / "dashboards" / "spanagg.json").read_text())
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = (
                target["expr"]
                .replace("$__rate_interval", "1m")
                .replace("$job", "spanagg-internal")
                .replace("$instance", ".*")
            )
            yield panel["title"], expr


def test_every_dashboard_query_returns_data_and_the_alerts_stay_quiet(spanagg):
    prom = Prometheus(spanagg.http, internal=True, rule_files=[ROOT / "alerts" / "spanagg.rules.yml"])
    try:
        run_pods(spanagg, rounds=2, seed=3)
        time.sleep(4)  # a few scrapes, so rates have two samples
        run_pods(spanagg, rounds=1, seed=4)
        deadline = time.time() + 30
        pending = dict(dashboard_queries())
        while pending:
            for title, expr in list(pending.items()):
                if prom.query(expr):
                    del pending[title]
            assert time.time() < deadline, f"queries without data: {pending}"
            time.sleep(1)
        rules = prom.get("/api/v1/rules")["data"]["groups"]
        names = {r["name"] for g in rules for r in g["rules"]}
        assert {"SpanaggDown", "SpanaggRejectingPoints", "SpanaggRefusingExports"} <= names
        assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
        assert prom.query('ALERTS{alertstate="firing"}') == []
    finally:
        prom.stop()
