"""The client our users run: real OpenTelemetry Collector sidecars, one per pod, each running the
shipped `deploy/collector/sidecar.yaml` (span_metrics connector, DELTA temporality, OTLP/gRPC
with gzip to spanagg). The OTel Python SDK sends them spans with chosen durations, kinds and
statuses, so every expected call and bucket count is known exactly. spanagg's scrape must equal
them, and a real Prometheus scraping spanagg must answer the same through PromQL."""

import random
import time

from conftest import Prometheus
from otelcol import BOUNDS, CALLS, DURATION, DURATIONS_MS, PODS, ROUTES, Expected, Pod, assert_exact, scraped, scraped_calls, wait_for


def test_collector_sidecars_merge_exactly_and_prometheus_agrees(spanagg):
    seed = random.randrange(1 << 30)
    print(f"workload seed {seed}")
    rng = random.Random(seed)
    prom = Prometheus(spanagg.http)
    pods = [Pod(spanagg.grpc, service, i) for service, i in PODS]
    expected = Expected()
    try:
        # Two rounds, so each sidecar exports more than one delta per series.
        for _ in range(2):
            for pod in pods:
                for _ in range(rng.randrange(20, 60)):
                    route, ms = rng.choice(ROUTES), rng.choice(DURATIONS_MS)
                    pod.span(route, ms)
                    expected.add(pod.service, route, ms)
                pod.flush()
            time.sleep(1.5)
        wait_for("every call in spanagg's scrape", lambda: scraped_calls(spanagg) >= expected.total())
        # Several more flush intervals: nothing is counted twice.
        time.sleep(3)
        assert_exact(expected, scraped(spanagg.scrape()[0]))

        print(f"{expected.total()} spans from {len(pods)} pods -> {len(expected.series)} output series")

        # Every sidecar's exporter sent its points and had none fail; the shipped config uses
        # the component names this Collector release prefers (no deprecation warnings).
        for pod in pods:
            sent, failed = pod.sidecar.exporter_points("otlp_grpc/spanagg")
            assert sent > 0 and failed == 0, (pod.name, sent, failed)
            deprecated = [line for line in pod.sidecar.log if "deprecat" in line.lower()]
            assert not deprecated, deprecated

        # The real Prometheus scraping spanagg answers the same through PromQL.
        by_route = {}
        for (service, span, *_), s in expected.series.items():
            by_route[(service, span)] = by_route.get((service, span), 0) + s["calls"]

        def promql_calls():
            res = prom.query(f"sum by (service_name, span_name) ({CALLS})")
            got = {(r["metric"]["service_name"], r["metric"]["span_name"]): float(r["value"][1]) for r in res}
            return got if got == by_route else None

        wait_for("PromQL calls by service and route", promql_calls, timeout=30)
        buckets = [0] * (len(BOUNDS) + 1)
        for s in expected.series.values():
            buckets = [a + b for a, b in zip(buckets, s["buckets"])]
        got = {float(r["metric"]["le"]): float(r["value"][1]) for r in prom.query(f"sum by (le) ({DURATION}_bucket)")}
        cumulative = 0
        for bound, n in zip([float(b) for b in BOUNDS] + [float("inf")], buckets):
            cumulative += n
            assert got[bound] == cumulative, (bound, got)
    finally:
        for pod in pods:
            pod.close()
        prom.stop()
