"""The RED overview dashboard (`dashboards/red.json`) against the real pipeline: SDK spans into
real Collector sidecars, into spanagg, scraped by a real Prometheus. Every query of every panel
returns data, and its numbers are those of the spans sent.

Rates are made exact by choosing the window: the queries run at the time `tn` of a scrape with
`$__rate_interval` set to `tn - t0`, `t0` being an earlier scrape. Prometheus 2.x selects
`[tn - w, tn]` inclusive, so both ends hold a sample and nothing is extrapolated: a rate is then
exactly the increase between the two scrapes (the spans of round two) over the window."""

import json
import random
import time
import urllib.parse

from conftest import ROOT, Prometheus
from otelcol import BOUNDS, CALLS, DURATIONS_MS, ROUTES, Expected, Pod, wait_for

DASHBOARD = ROOT / "dashboards" / "red.json"


def quantile(q, counts):
    """Prometheus' histogram_quantile over per-bucket counts (the last one +Inf)."""
    bounds = [float(b) for b in BOUNDS] + [float("inf")]
    cumulative, total = [], 0
    for n in counts:
        total += n
        cumulative.append(total)
    rank = q * total
    b = next(i for i, c in enumerate(cumulative) if c >= rank)
    if b == len(bounds) - 1:
        return bounds[-2]
    start, count = (0.0, cumulative[0]) if b == 0 else (bounds[b - 1], cumulative[b] - cumulative[b - 1])
    if b > 0:
        rank -= cumulative[b - 1]
    return start + (bounds[b] - start) * rank / count


def grouped(expected, by_route):
    """Round-two calls, errors and bucket counts per service (or per service and route)."""
    out = {}
    for (service, span, _kind, status, *_), s in expected.series.items():
        key = (service, span) if by_route else (service,)
        g = out.setdefault(key, {"calls": 0, "errors": 0, "buckets": [0] * (len(BOUNDS) + 1)})
        g["calls"] += s["calls"]
        g["errors"] += s["calls"] if status == "STATUS_CODE_ERROR" else 0
        g["buckets"] = [a + b for a, b in zip(g["buckets"], s["buckets"])]
    return out


def expectation(title, legend, expected, window_s):
    """What a panel's series should show, by its labels: (label names, value of a group)."""
    by_route = "route" in title
    labels = ("service_name", "span_name") if by_route else ("service_name",)
    groups = grouped(expected, by_route)
    if title.startswith("Request rate"):
        value = lambda g: g["calls"] / window_s  # noqa: E731
    elif title.startswith("Error ratio"):
        value = lambda g: g["errors"] / g["calls"]  # noqa: E731
    elif "latency" in title.lower():
        # The quantile a target shows is in its legend ("p95 {{service_name}}") or its title.
        named = [p for p in ("p50", "p95", "p99") if p in legend] or [p for p in ("p50", "p95", "p99") if p in title]
        q = {"p50": 0.5, "p95": 0.95, "p99": 0.99}[named[0]]
        value = lambda g: quantile(q, g["buckets"])  # noqa: E731
    else:
        raise AssertionError(f"no expectation for the panel {title!r}: add one to this test")
    return labels, {k: value(g) for k, g in groups.items()}


def send(pods, expected, rng, extra):
    for pod in pods:
        # Every route at least once per pod, so every series moves in the window.
        picks = list(ROUTES) + [rng.choice(ROUTES) for _ in range(extra)]
        for route in picks:
            ms = rng.choice(DURATIONS_MS)
            pod.span(route, ms)
            expected.add(pod.service, route, ms)
        pod.flush()


def test_red_dashboard_shows_the_spans_sent(spanagg):
    dash = json.loads(DASHBOARD.read_text())
    # Portable: the data source is a variable and nothing names a UID of one installation.
    uids = {ds["uid"] for p in dash["panels"] for ds in [p["datasource"]] + [t["datasource"] for t in p["targets"]]}
    assert uids == {"${datasource}"} and "uid" not in dash, uids
    assert [v["name"] for v in dash["templating"]["list"]][:1] == ["datasource"]
    assert all(p.get("description") for p in dash["panels"]), "every panel says what it shows"

    seed = random.randrange(1 << 30)
    print(f"workload seed {seed}")
    rng = random.Random(seed)
    prom = Prometheus(spanagg.http)
    pods = [Pod(spanagg.grpc, service, i) for service, i in [("checkout", 0), ("checkout", 1), ("cart", 0)]]
    first, second = Expected(), Expected()
    try:

        def scraped_total(at=None):
            path = "/api/v1/query?" + urllib.parse.urlencode(
                {"query": f"sum({CALLS})", **({"time": at} if at else {})}
            )
            res = prom.get(path)["data"]["result"]
            return float(res[0]["value"][1]) if res else 0.0

        def last_scrape():
            res = prom.query(f"max(timestamp({CALLS}))")
            return float(res[0]["value"][1]) if res else None

        send(pods, first, rng, 10)
        wait_for("round one in Prometheus", lambda: scraped_total() == first.total(), timeout=60)
        time.sleep(1.5)
        t0 = last_scrape()
        send(pods, second, rng, 60)
        total = first.total() + second.total()
        wait_for("round two in Prometheus", lambda: scraped_total() == total, timeout=60)
        tn = last_scrape()
        assert scraped_total(t0) == first.total() and scraped_total(tn) == total
        window_ms = round((tn - t0) * 1000)

        checked = 0
        for panel in dash["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$service", ".*").replace("$__rate_interval", f"{window_ms}ms")
                path = "/api/v1/query?" + urllib.parse.urlencode({"query": expr, "time": tn})
                result = prom.get(path)["data"]["result"]
                assert result, f"{panel['title']} / {target['refId']}: no data for {expr}"
                labels, want = expectation(panel["title"], target["legendFormat"], second, window_ms / 1000)
                got = {tuple(r["metric"].get(k) for k in labels): float(r["value"][1]) for r in result}
                assert set(got) == set(want), (panel["title"], sorted(got), sorted(want))
                for k, v in want.items():
                    assert abs(got[k] - v) <= 1e-9 * max(1.0, abs(v)), (panel["title"], target["refId"], k, got[k], v)
                checked += 1
        print(f"{checked} queries match {second.total()} spans over a {window_ms} ms window")
    finally:
        for pod in pods:
            pod.close()
        prom.stop()
