"""Real clients end to end: OpenTelemetry Python SDK "pods" export span metrics over OTLP/gRPC
and OTLP/HTTP; the scrape must equal the exact merge, parse with the reference parsers, pass
promtool, and a real Prometheus must compute the same totals with PromQL."""

import random
import subprocess
import time

from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from conftest import Prometheus

BOUNDS = [2.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0]
DELTA = {Counter: AggregationTemporality.DELTA, Histogram: AggregationTemporality.DELTA}
ROUTES = [("GET /cart", "STATUS_CODE_UNSET"), ("POST /checkout", "STATUS_CODE_ERROR"), ("GET /health", "STATUS_CODE_UNSET")]


class Pod:
    """One pod's sidecar, reduced to what matters here: an SDK exporting deltas."""

    def __init__(self, spanagg, service, name, protocol):
        if protocol == "grpc":
            exporter = GrpcExporter(endpoint=f"http://{spanagg.grpc}", insecure=True, preferred_temporality=DELTA)
        else:
            exporter = HttpExporter(
                endpoint=f"http://{spanagg.otlp_http}/v1/metrics",
                preferred_temporality=DELTA,
                compression=Compression.Gzip if protocol == "http-gzip" else Compression.NoCompression,
            )
        reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
        self.provider = MeterProvider(
            metric_readers=[reader],
            resource=Resource.create({"service.name": service, "k8s.pod.name": name, "service.instance.id": name}),
            views=[View(instrument_name="traces.span.metrics.duration", aggregation=ExplicitBucketHistogramAggregation(BOUNDS))],
        )
        meter = self.provider.get_meter("spanmetricsconnector")
        self.calls = meter.create_counter("traces.span.metrics.calls", unit="{call}")
        self.duration = meter.create_histogram("traces.span.metrics.duration", unit="ms")
        self.name = name

    def record(self, span, status, ms):
        attrs = {"span.name": span, "span.kind": "SPAN_KIND_SERVER", "status.code": status, "service.instance.id": self.name}
        self.calls.add(1, attrs)
        self.duration.record(ms, attrs)

    def flush(self):
        assert self.provider.force_flush(10_000)

    def close(self):
        self.provider.shutdown()


class Expected:
    def __init__(self):
        self.series = {}

    def add(self, service, span, status, ms):
        s = self.series.setdefault((service, span, status), {"calls": 0, "sum": 0.0, "buckets": [0] * (len(BOUNDS) + 1)})
        s["calls"] += 1
        s["sum"] += ms
        idx = next((i for i, b in enumerate(BOUNDS) if ms <= b), len(BOUNDS))
        s["buckets"][idx] += 1


def run_pods(spanagg, rounds=3, seed=None):
    seed = seed if seed is not None else random.randrange(1 << 30)
    print(f"workload seed {seed}")
    rng = random.Random(seed)
    protocols = ["grpc", "http", "http-gzip", "grpc", "http"]
    pods = [Pod(spanagg, svc, f"{svc}-{i}", protocols[i]) for svc in ("checkout", "cart") for i in range(len(protocols))]
    expected = Expected()
    for _ in range(rounds):
        for pod in pods:
            service = pod.name.rsplit("-", 1)[0]
            for _ in range(rng.randrange(1, 30)):
                span, status = rng.choice(ROUTES)
                ms = round(rng.expovariate(1 / 40.0), 3)
                pod.record(span, status, ms)
                expected.add(service, span, status, ms)
            pod.flush()
    for pod in pods:
        pod.close()
    return expected


def scraped_series(text, parser=parse_text):
    got = {}
    for fam in parser(text):
        for s in fam.samples:
            key = (s.labels.get("service_name"), s.labels.get("span_name"), s.labels.get("status_code"))
            e = got.setdefault(key, {"calls": None, "sum": None, "count": None, "buckets": {}})
            if s.name == "traces_span_metrics_calls_total":
                e["calls"] = s.value
            elif s.name == "traces_span_metrics_duration_milliseconds_sum":
                e["sum"] = s.value
            elif s.name == "traces_span_metrics_duration_milliseconds_count":
                e["count"] = s.value
            elif s.name == "traces_span_metrics_duration_milliseconds_bucket":
                e["buckets"][float(s.labels["le"])] = s.value
            assert "k8s_pod_name" not in s.labels and "service_instance_id" not in s.labels, s
    return got


def assert_exact(expected, got):
    assert set(got) == set(expected.series), (sorted(got), sorted(expected.series))
    for key, want in expected.series.items():
        g = got[key]
        assert g["calls"] == want["calls"], key
        assert g["count"] == want["calls"], key
        assert abs(g["sum"] - want["sum"]) < 1e-6, key
        cumulative = 0
        for bound, n in zip(BOUNDS + [float("inf")], want["buckets"]):
            cumulative += n
            assert g["buckets"][bound] == cumulative, (key, bound)


def test_sdk_pods_over_grpc_and_http_merge_exactly(spanagg):
    expected = run_pods(spanagg)
    text, headers = spanagg.scrape()
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert_exact(expected, scraped_series(text))
    # The OpenMetrics rendering of the same state passes the reference OpenMetrics parser.
    om, headers = spanagg.scrape("application/openmetrics-text; version=1.0.0")
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert_exact(expected, scraped_series(om, parse_openmetrics))
    # spanagg's own count of what it took: every flush of every pod (2 services x 5 pods, 2
    # of them gRPC, 3 rounds), and nothing refused. The series exist at 0 from the start, so
    # only their values say anything.
    requests = {}
    for fam in parse_text(spanagg.internal()):
        for smp in fam.samples:
            if smp.name == "spanagg_requests_total":
                requests[(smp.labels["protocol"], smp.labels["outcome"])] = smp.value
    assert requests.pop(("grpc", "success")) == 2 * 2 * 3
    assert requests.pop(("http_protobuf", "success")) == 2 * 3 * 3
    assert all(v == 0 for v in requests.values()), requests


def test_promtool_accepts_the_scrape(spanagg):
    run_pods(spanagg, rounds=1, seed=1)
    text, _ = spanagg.scrape()
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    # Exit 1 is a parse failure; 3 is lint only. The one lint allowed is promtool's preference
    # for seconds over the milliseconds unit that spanmetrics sends by default.
    assert r.returncode in (0, 3), r.stdout + r.stderr
    problems = [l for l in (r.stdout + r.stderr).splitlines() if l.strip()]
    assert all('use base unit "seconds"' in p for p in problems), problems


def test_real_prometheus_sums_match_and_never_see_a_reset(spanagg):
    prom = Prometheus(spanagg.http)
    try:
        total = Expected()
        for round_ in range(3):
            part = run_pods(spanagg, rounds=1, seed=100 + round_)
            for key, v in part.series.items():
                t = total.series.setdefault(key, {"calls": 0, "sum": 0.0, "buckets": [0] * (len(BOUNDS) + 1)})
                t["calls"] += v["calls"]
            time.sleep(1.5)  # let Prometheus scrape between rounds
        want = sum(v["calls"] for v in total.series.values())
        want_checkout = sum(v["calls"] for k, v in total.series.items() if k[0] == "checkout")
        deadline = time.time() + 30
        while True:
            res = prom.query("sum(traces_span_metrics_calls_total)")
            if res and float(res[0]["value"][1]) == want:
                break
            assert time.time() < deadline, f"PromQL never reached {want}: {res}"
            time.sleep(0.5)
        res = prom.query('sum by (service_name) (traces_span_metrics_duration_milliseconds_count{service_name="checkout"})')
        assert float(res[0]["value"][1]) == want_checkout
        res = prom.query("count(traces_span_metrics_calls_total)")
        assert float(res[0]["value"][1]) == len(total.series), "one series per service/route/status"
        res = prom.query("sum(resets(traces_span_metrics_calls_total[5m]))")
        assert float(res[0]["value"][1]) == 0
        res = prom.query('up{job="spanagg"}')
        assert res[0]["value"][1] == "1"
    finally:
        prom.stop()
