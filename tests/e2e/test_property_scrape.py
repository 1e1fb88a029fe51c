"""Property test: whatever a client sends, every scrape stays valid and no counter goes down.

Random requests (random and reserved attribute names, names that sanitise alike, unicode, empty
values, extreme numbers, odd timestamps, every temporality and kind) go to the real binary over
OTLP/HTTP, as protobuf or as the protobuf library's own proto3 JSON. After each one the
exposition, in both formats, must pass the reference parsers (prometheus-client's text and
OpenMetrics parsers) and `promtool check metrics`; no counter, bucket or `_sum` may decrease;
and every histogram must be whole (`+Inf` == `_count`, buckets non-decreasing).

The seed is printed; rerun one with SPANAGG_PROPERTY_SEED=<seed>, and run longer with
SPANAGG_PROPERTY_REQUESTS=<n> (the test command runs a bounded number).
"""

import math
import os
import random
import subprocess
import time
import urllib.request

from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2 as m
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

NOW = time.time_ns()
KEYS = [
    "service.name", "span.name", "le", "__name__", "__meta", "_.x", "otel_metric_overflow",
    "http.method", "http_method", "http-method", "1st", "", "ü", "exported_le", "quantile",
    "k8s.pod.name", "service.instance.id", "a" * 40,
]
VALUES = ["", "GET", "POST", "ü", 'q"u\\o\nte', "x;y", "0.5", "+Inf", "a" * 50]
NAMES = [
    "traces.span.metrics.calls", "traces.span.metrics.duration", "x", "x_total", "x.count",
    "x_bucket", "1metric", "métric", "a:b", "", "http.server.duration",
]
UNITS = ["", "ms", "s", "{call}", "By", "1", "%", "weird unit"]
INTS = [0, 1, 2, 7, 1000, 2**31, 2**53 + 1, 2**63 - 1, -1]
DOUBLES = [0.0, -0.0, 0.5, 1.0, 3.25, 1e-300, 5e-324, 1e300, 1.7e308, -2.0, math.nan, math.inf, -math.inf]


def timestamps(rng):
    roll = rng.random()
    if roll < 0.05:
        return 0, NOW
    if roll < 0.1:
        return NOW - 10**9, 4102444800 * 10**9  # year 2100
    if roll < 0.15:
        return NOW, NOW  # start == end
    if roll < 0.2:
        return NOW, NOW - 10**9  # start after end
    if roll < 0.25:
        return 1, 2  # 1970
    start = NOW - rng.randrange(1, 600) * 10**9
    return start, start + rng.randrange(1, 120) * 10**9


def attrs(rng, n):
    out = []
    for _ in range(n):
        kv = KeyValue(key=rng.choice(KEYS))
        roll = rng.random()
        if roll < 0.7:
            kv.value.string_value = rng.choice(VALUES)
        elif roll < 0.8:
            kv.value.int_value = rng.choice(INTS)
        elif roll < 0.9:
            kv.value.double_value = rng.choice(DOUBLES)
        elif roll < 0.95:
            kv.value.bool_value = rng.random() < 0.5
        # else: no value at all
        out.append(kv)
    return out


def number_point(rng, p):
    p.start_time_unix_nano, p.time_unix_nano = timestamps(rng)
    p.attributes.extend(attrs(rng, rng.randrange(0, 6)))
    if rng.random() < 0.5:
        p.as_int = rng.choice(INTS)
    elif rng.random() < 0.95:
        p.as_double = rng.choice(DOUBLES)
    if rng.random() < 0.03:
        p.flags = 1


def histogram_point(rng, p):
    p.start_time_unix_nano, p.time_unix_nano = timestamps(rng)
    p.attributes.extend(attrs(rng, rng.randrange(0, 6)))
    layouts = [[1.0, 5.0], [1.0, 2.0, 5.0, 10.0], [0.5], [], [5.0, 1.0], [1.0, math.inf]]
    bounds = rng.choice(layouts)
    p.explicit_bounds.extend(bounds)
    n = len(bounds) + 1 if rng.random() < 0.95 else len(bounds)
    big = rng.random() < 0.05
    counts = [rng.choice([0, 1, 3, 2**63 if big else 2]) for _ in range(n)]
    p.bucket_counts.extend(counts)
    # A true count may not fit (the point is then refused); the wire holds it modulo 2^64.
    p.count = (sum(counts) if rng.random() < 0.95 else sum(counts) + 1) % 2**64
    if rng.random() < 0.95:
        p.sum = rng.choice(DOUBLES) if rng.random() < 0.3 else float(sum(counts)) * 1.5


def random_request(rng):
    req = ExportMetricsServiceRequest()
    for _ in range(rng.randrange(1, 3)):
        rm = req.resource_metrics.add()
        rm.resource.attributes.extend(attrs(rng, rng.randrange(0, 4)))
        sm = rm.scope_metrics.add()
        sm.scope.name = rng.choice(["spanmetricsconnector", "", "other"])
        for _ in range(rng.randrange(1, 4)):
            metric = sm.metrics.add()
            metric.name = rng.choice(NAMES)
            metric.unit = rng.choice(UNITS)
            temporality = rng.choice([0, 1, 1, 1, 2, 2])
            kind = rng.choice(["sum", "sum", "histogram", "histogram", "gauge", "nonmono"])
            npoints = rng.randrange(0, 4)
            if kind in ("sum", "nonmono"):
                metric.sum.aggregation_temporality = temporality
                metric.sum.is_monotonic = kind == "sum"
                for _ in range(npoints):
                    number_point(rng, metric.sum.data_points.add())
            elif kind == "histogram":
                metric.histogram.aggregation_temporality = temporality
                for _ in range(npoints):
                    histogram_point(rng, metric.histogram.data_points.add())
            else:
                for _ in range(npoints):
                    number_point(rng, metric.gauge.data_points.add())
    return req


def post(spanagg, req, rng):
    if rng.random() < 0.5:
        body, ctype = req.SerializeToString(), "application/x-protobuf"
    else:
        body, ctype = json_format.MessageToJson(req).encode(), "application/json"
    r = urllib.request.Request(
        f"http://{spanagg.otlp_http}/v1/metrics", data=body, headers={"Content-Type": ctype}
    )
    with urllib.request.urlopen(r, timeout=30) as resp:
        return resp.status


def samples_of(families):
    out = {}
    for fam in families:
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = (fam.type, s.value)
    return out


def check_histograms(samples, where):
    buckets, counts = {}, {}
    for (name, labels), (_, value) in samples.items():
        plain = tuple(kv for kv in labels if kv[0] != "le")
        if name.endswith("_bucket"):
            le = dict(labels)["le"]
            buckets.setdefault((name[: -len("_bucket")], plain), []).append((float(le), value))
        elif name.endswith("_count"):
            counts[(name[: -len("_count")], plain)] = value
    for key, bs in buckets.items():
        bs.sort()
        values = [v for _, v in bs]
        assert values == sorted(values), f"{where}: buckets decrease in {key}: {bs}"
        assert bs[-1][0] == math.inf, f"{where}: no +Inf bucket in {key}"
        assert counts.get(key) == bs[-1][1], f"{where}: +Inf != _count for {key}"


def check_never_decreases(before, after, where):
    for key, (kind, value) in after.items():
        name = key[0]
        if kind not in ("counter", "histogram") or name.endswith("_created"):
            continue
        if key in before:
            old = before[key][1]
            assert value >= old, f"{where}: {key} went down {old} -> {value}"


def promtool(text, where):
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    # 1 is a parse failure; 3 is lint only (random names break naming conventions by design).
    assert r.returncode in (0, 3), f"{where}: promtool: {r.stdout}{r.stderr}"


def test_random_requests_never_break_the_scrape(spanagg):
    seed = int(os.environ.get("SPANAGG_PROPERTY_SEED", random.randrange(2**32)))
    count = int(os.environ.get("SPANAGG_PROPERTY_REQUESTS", "60"))
    print(f"property seed {seed} ({count} requests); rerun with SPANAGG_PROPERTY_SEED={seed}")
    rng = random.Random(seed)
    before_text, before_om = {}, {}
    for i in range(count):
        where = f"seed {seed}, request {i}"
        assert post(spanagg, random_request(rng), rng) == 200, where
        text, _ = spanagg.scrape()
        om, _ = spanagg.scrape("application/openmetrics-text; version=1.0.0")
        try:
            text_samples = samples_of(parse_text(text))
            om_samples = samples_of(parse_openmetrics(om))
        except Exception as e:  # the parsers say what is wrong; add where and the text
            raise AssertionError(f"{where}: {e}\n{text}\n{om}") from e
        check_histograms(text_samples, where)
        check_never_decreases(before_text, text_samples, where)
        check_never_decreases(before_om, om_samples, where)
        before_text, before_om = text_samples, om_samples
        if i % 5 == 4 or i == count - 1:
            promtool(text, where)
    # The Arrow snapshot of the same state reads back (its counts are sums of the buckets).
    import pyarrow as pa

    snapshot = urllib.request.urlopen(f"http://{spanagg.http}/api/v1/snapshot", timeout=30).read()
    pa.ipc.open_stream(snapshot).read_all()
    # spanagg's own telemetry stays parseable too, and counted what it refused.
    internal = spanagg.internal()
    list(parse_openmetrics(internal))
    assert "spanagg_points_rejected_total" in internal
