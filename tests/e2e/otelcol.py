"""The real OpenTelemetry Collector (built from tests/otelcol by the test command) as the tests'
sidecars and tiers: a shipped config from deploy/collector loaded as it is, with only endpoints,
the flush interval and the Collector's own telemetry port set by a second config file merged on
top (the Collector merges `--config` files in order)."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import threading
import time

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client.parser import text_string_to_metric_families as parse_text

from conftest import ROOT, free_port, http_get

OTELCOL = os.environ.get("OTELCOL_BIN", str(ROOT / "target" / "otelcol" / "otelcol-spanagg"))
DEPLOY = ROOT / "deploy" / "collector"


class Collector:
    """One Collector process running `deploy/collector/<config>` with `overrides` merged on top."""

    def __init__(self, config, overrides, env=None, name="otelcol", overlays=()):
        """`overlays`: more files of deploy/collector merged on `config`, as shipped."""
        self.dir = tempfile.mkdtemp(prefix=f"spanagg-{name}-")
        self.name = name
        self.metrics_port = free_port()
        overrides = merge(
            overrides,
            {
                "service": {
                    "telemetry": {
                        "metrics": {
                            "level": "detailed",
                            "readers": [
                                {"pull": {"exporter": {"prometheus": {"host": "127.0.0.1", "port": self.metrics_port}}}}
                            ],
                        }
                    }
                }
            },
        )
        # JSON is YAML: no YAML library needed to write it.
        self.override_file = pathlib.Path(self.dir) / "overrides.yaml"
        self.override_file.write_text(json.dumps(overrides, indent=1))
        self.config = DEPLOY / config
        self.log = []
        self.proc = subprocess.Popen(
            [OTELCOL, "--config", str(self.config)]
            + [a for o in overlays for a in ("--config", str(DEPLOY / o))]
            + ["--config", str(self.override_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        ready = threading.Event()

        def pump():
            for line in self.proc.stderr:
                self.log.append(line)
                if "Everything is ready" in line:
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(60):
            self.proc.kill()
            raise RuntimeError(f"{name} did not start:\n" + "".join(self.log[-40:]))

    def metrics(self):
        """The Collector's own metrics as {(name, frozenset(labels)): value}."""
        text = http_get(f"http://127.0.0.1:{self.metrics_port}/metrics")[2].decode()
        out = {}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$", line)
            if not m:
                continue
            labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            out[(m.group(1), labels)] = float(m.group(3))
        return out

    def exporter_points(self, exporter):
        """(sent, failed) metric points of one exporter, by the Collector's own count."""
        sent = failed = 0.0
        for (name, labels), v in self.metrics().items():
            if ("exporter", exporter) not in labels:
                continue
            if name.startswith("otelcol_exporter_sent_metric_points"):
                sent += v
            elif name.startswith("otelcol_exporter_send_failed_metric_points"):
                failed += v
        return sent, failed

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def merge(a, b):
    """`b` merged into `a` as the Collector merges config files: maps deeply, the rest replaced."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(a.get(k), v) if k in a else v
        return out
    return b


def wait_for(what, check, timeout=60, interval=0.5):
    """Polls `check` until it returns a true value; fails naming `what` with its last value."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


# The sidecar config's buckets, in ms; durations below never sit on one.
BOUNDS = [2, 4, 6, 8, 10, 50, 100, 200, 400, 800, 1000, 1400, 2000, 5000, 10000, 15000]
DURATIONS_MS = [1.5, 3, 5, 7, 9, 30, 75, 150, 300, 600, 900, 1200, 1700, 3000, 7000, 12000, 20000]
ROUTES = [
    ("GET /cart", SpanKind.SERVER, "GET", 200, StatusCode.UNSET),
    ("POST /checkout", SpanKind.SERVER, "POST", 500, StatusCode.ERROR),
    ("GET /health", SpanKind.SERVER, "GET", 200, StatusCode.OK),
    ("SELECT orders", SpanKind.CLIENT, None, None, StatusCode.UNSET),
]
KIND = {SpanKind.SERVER: "SPAN_KIND_SERVER", SpanKind.CLIENT: "SPAN_KIND_CLIENT"}
STATUS = {StatusCode.UNSET: "STATUS_CODE_UNSET", StatusCode.OK: "STATUS_CODE_OK", StatusCode.ERROR: "STATUS_CODE_ERROR"}
# Five pods of two services: each sidecar has its pod's identity from K8S_POD_NAME.
PODS = [("checkout", 0), ("checkout", 1), ("checkout", 2), ("cart", 0), ("cart", 1)]
CALLS = "traces_span_metrics_calls_total"
DURATION = "traces_span_metrics_duration_milliseconds"


def sidecar_overrides(endpoint, receiver_port):
    """What a pod's sidecar changes from the shipped config: addresses, and a 1 s flush."""
    return {
        "receivers": {
            "otlp": {
                "protocols": {
                    "grpc": {"endpoint": f"127.0.0.1:{receiver_port}"},
                    "http": {"endpoint": f"127.0.0.1:{free_port()}"},
                }
            }
        },
        "connectors": {"span_metrics": {"metrics_flush_interval": "1s"}},
        "exporters": {
            "otlp_grpc/spanagg": {"endpoint": endpoint},
            # No trace backend here: spanagg's port refuses traces as unimplemented, which the
            # exporter drops at once instead of retrying.
            "otlp_grpc/traces": {"endpoint": endpoint},
        },
    }


class Pod:
    """One pod: the SDK exporting its spans to its own sidecar. With `services`, the sidecar
    takes the spans of several services (as a node's agent would), each its own SDK."""

    def __init__(self, endpoint, service, i, services=None, http=None, token_file=None, ca_file=None, compression="gzip"):
        """A pod of `service` whose sidecar exports to gRPC `endpoint` (spanagg or a tier), or
        with `http` (spanagg's OTLP/HTTP address) through an otlp_http exporter instead; with
        `token_file` (and the `ca_file` of spanagg's certificate), the shipped
        `sidecar-auth.yaml` sends the ingest token from that file over TLS. `compression` is
        the exporter's (the shipped config's gzip by default)."""
        self.service, self.name = service, f"{service}-{i}"
        port = free_port()
        overrides = sidecar_overrides(endpoint, port)
        overlays = ()
        if token_file:
            overlays = ("sidecar-auth.yaml",)
            overrides["extensions"] = {"bearertokenauth/spanagg": {"filename": str(token_file)}}
            overrides["exporters"]["otlp_grpc/spanagg"]["tls"] = {"ca_file": str(ca_file)}
        self.exporter = "otlp_grpc/spanagg"
        if compression != "gzip":
            overrides["exporters"][self.exporter]["compression"] = compression
        if http:
            self.exporter = "otlp_http/spanagg"
            overrides["exporters"][self.exporter] = {"endpoint": f"http://{http}", "compression": compression}
            overrides["service"] = {"pipelines": {"metrics/spanmetrics": {"exporters": [self.exporter]}}}
        self.sidecar = Collector(
            "sidecar.yaml", overrides, env={"K8S_POD_NAME": self.name}, name=self.name, overlays=overlays
        )
        self.providers, self.tracers = [], {}
        for svc in services or [service]:
            exporter = OTLPSpanExporter(endpoint=f"127.0.0.1:{port}", insecure=True)
            provider = TracerProvider(resource=Resource.create({"service.name": svc, "service.instance.id": self.name}))
            provider.add_span_processor(BatchSpanProcessor(exporter))
            self.providers.append(provider)
            self.tracers[svc] = provider.get_tracer("shop")

    def span(self, route, ms, service=None):
        name, kind, method, code, status = route
        attrs = {}
        if method:
            attrs = {"http.request.method": method, "http.response.status_code": code}
        start = time.time_ns()
        span = self.tracers[service or self.service].start_span(name, kind=kind, attributes=attrs, start_time=start)
        span.set_status(Status(status))
        span.end(end_time=start + int(ms * 1_000_000))

    def flush(self):
        for p in self.providers:
            assert p.force_flush(10_000)

    def close(self):
        for p in self.providers:
            p.shutdown()
        self.sidecar.stop()


class Expected:
    """Calls and per-bucket counts per output series, as the spans were sent."""

    def __init__(self):
        self.series = {}

    def add(self, service, route, ms):
        name, kind, method, code, status = route
        key = (service, name, KIND[kind], STATUS[status], method or "", str(code) if code else "")
        s = self.series.setdefault(key, {"calls": 0, "buckets": [0] * (len(BOUNDS) + 1)})
        s["calls"] += 1
        s["buckets"][next((i for i, b in enumerate(BOUNDS) if ms <= b), len(BOUNDS))] += 1

    def total(self):
        return sum(s["calls"] for s in self.series.values())


def scraped(text):
    """The scrape as {key: {"calls", "count", "buckets": {le: cumulative}}}."""
    got = {}
    for fam in parse_text(text):
        for s in fam.samples:
            if not s.name.startswith(("traces_span_metrics_calls", "traces_span_metrics_duration")):
                continue
            assert "k8s_pod_name" not in s.labels and "collector_instance_id" not in s.labels, s
            key = tuple(
                s.labels.get(k, "")
                for k in ("service_name", "span_name", "span_kind", "status_code", "http_request_method", "http_response_status_code")
            )
            e = got.setdefault(key, {"calls": None, "count": None, "buckets": {}})
            if s.name == CALLS:
                e["calls"] = s.value
            elif s.name == DURATION + "_count":
                e["count"] = s.value
            elif s.name == DURATION + "_bucket":
                e["buckets"][float(s.labels["le"])] = s.value
    return got


def assert_exact(expected, got):
    assert set(got) == set(expected.series), (sorted(got), sorted(expected.series))
    for key, want in expected.series.items():
        g = got[key]
        assert g["calls"] == want["calls"] and g["count"] == want["calls"], (key, g, want)
        cumulative = 0
        for bound, n in zip([float(b) for b in BOUNDS] + [float("inf")], want["buckets"]):
            cumulative += n
            assert g["buckets"][bound] == cumulative, (key, bound, g["buckets"])


def scraped_calls(spanagg):
    return sum(e["calls"] or 0 for e in scraped(spanagg.scrape()[0]).values())


def send(pods, expected, rng, n):
    """`n` random spans per pod (of a service it runs, picked at random when it runs several),
    recorded in `expected` and flushed to the sidecars."""
    for pod in pods:
        services = list(pod.tracers)
        for _ in range(n):
            service = services[0] if len(services) == 1 else rng.choice(services)
            route, ms = rng.choice(ROUTES), rng.choice(DURATIONS_MS)
            pod.span(route, ms, service)
            expected.add(service, route, ms)
        pod.flush()


class Traffic:
    """`send` rounds in the background, every `pause` seconds, while the `with` block runs: spans
    are in flight whatever the block does to the pipeline. An error in them fails the block."""

    def __init__(self, pods, expected, rng, n, pause=0.2):
        self.stop, self.errors = threading.Event(), []

        def run():
            try:
                while not self.stop.is_set():
                    send(pods, expected, rng, n)
                    time.sleep(pause)
            except Exception as e:  # noqa: BLE001 - raised by __exit__
                self.errors.append(e)

        self.thread = threading.Thread(target=run)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, kind, *_):
        self.stop.set()
        self.thread.join(30)
        if kind is None and self.errors:
            raise self.errors[0]
