"""An hour (or --duration) of pod churn against one spanagg on loopback, scraped every 15 s.

Pods come and go (new identities, new source streams), each service's routes drift a route a
minute (old ones expire by `series_ttl`, new ones appear; every pod of a service serves the same
ones, as replicas do, so the number of live series is the same from minute to minute),
a share of exports is sent twice at once and a share again one interval later (retries after
a lost reply). Every scrape is read as OpenMetrics; the run fails if

- any counter or histogram count goes down while its `_created` stays the same,
- any export is refused or any point rejected, or the log shows an error or a panic,
- the RSS the service holds leaves a 10% band after the warm-up: RSS is read every second, its
  median over each 5-minute window after the warm-up is that window's level, and every level
  must stay within 10% of the first. Transients (a checkpoint's batches every 60 s, a scrape's
  buffers, a burst of requests) last seconds; each window's minimum and maximum, the band of
  single readings and the peak (VmHWM) are reported beside the levels, not judged,
- the sentinel routes (sent by every pod, all the time) do not equal exactly what was
  acknowledged once the traffic stops.

Run with `scripts/soak [SECONDS]`; it builds the release binary and prints a summary for
BENCHMARKS.md. It binds 127.0.0.1 only and stops itself and spanagg after the duration.
"""

import argparse
import http.client
import json
import os
import pathlib
import random
import sys
import threading
import time
import urllib.parse

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "e2e"))

from conftest import Spanagg  # noqa: E402
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as svc  # noqa: E402
from opentelemetry.proto.common.v1 import common_pb2 as common  # noqa: E402
from opentelemetry.proto.metrics.v1 import metrics_pb2 as m  # noqa: E402
from prometheus_client.openmetrics.parser import text_string_to_metric_families  # noqa: E402

BOUNDS = [2.0, 4, 6, 8, 10, 50, 100, 200, 400, 800, 1000, 1400, 2000, 5000, 10000, 15000]
SENTINELS = 10
DELTA = m.AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA


def kv(k, v):
    return common.KeyValue(key=k, value=common.AnyValue(string_value=v))


class Pod:
    """One sidecar: its identity, its streams' last interval end, and its last request."""

    next_id = 0

    def __init__(self, services, now_ns, interval_ns):
        Pod.next_id += 1
        self.id = Pod.next_id
        self.service = f"svc-{self.id % services}"
        # The first delta covers the interval before it, as a sidecar's first export does.
        self.last_end = now_ns - interval_ns
        self.last_body = None

    def request(self, routes, now_ns, rng):
        """The next delta: sentinel routes plus this minute's window of drifting routes."""
        req = svc.ExportMetricsServiceRequest()
        rm = req.resource_metrics.add()
        rm.resource.attributes.extend(
            [kv("service.name", self.service), kv("service.instance.id", f"pod-{self.id}")]
        )
        sm = rm.scope_metrics.add()
        sm.scope.name = "spanmetricsconnector"
        calls = sm.metrics.add(name="traces.span.metrics.calls")
        calls.sum.aggregation_temporality = DELTA
        calls.sum.is_monotonic = True
        dur = sm.metrics.add(name="traces.span.metrics.duration", unit="ms")
        dur.histogram.aggregation_temporality = DELTA
        sentinel_counts = {}
        for route in routes:
            n = rng.randint(1, 20)
            buckets = [0] * (len(BOUNDS) + 1)
            for _ in range(n):
                buckets[rng.randrange(len(buckets))] += 1
            attrs = [kv("span.name", f"route-{route}"), kv("span.kind", "SPAN_KIND_SERVER")]
            p = calls.sum.data_points.add(
                start_time_unix_nano=self.last_end, time_unix_nano=now_ns, as_int=n
            )
            p.attributes.extend(attrs)
            h = dur.histogram.data_points.add(
                start_time_unix_nano=self.last_end,
                time_unix_nano=now_ns,
                count=n,
                sum=float(n),
                bucket_counts=buckets,
                explicit_bounds=BOUNDS,
            )
            h.attributes.extend(attrs)
            if route < SENTINELS:
                sentinel_counts[(self.service, f"route-{route}")] = n
        self.last_end = now_ns
        return req.SerializeToString(), sentinel_counts


class Run:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.lock = threading.Lock()
        self.expected = {}  # (service, route) -> acknowledged calls of sentinel routes
        self.errors = []
        self.stats = {"requests": 0, "duplicates": 0, "late_retries": 0, "pods_started": 0}
        self.rss = []  # (seconds since start, KiB before and after the scrape, samples, state)
        self.fine = []  # (seconds since start, KiB) every --rss-every seconds
        self.scrapes = 0
        self.decreases = 0
        self.last = {}  # (name, labels) -> (value, created)
        self.stop = threading.Event()

    def error(self, what):
        with self.lock:
            if len(self.errors) < 50:
                self.errors.append(what)

    def post(self, conn, body):
        """One export; the connection is reopened if the server closed it."""
        for attempt in range(2):
            try:
                conn.request(
                    "POST", "/v1/metrics", body, {"Content-Type": "application/x-protobuf"}
                )
                resp = conn.getresponse()
                data = resp.read()
                break
            except (http.client.HTTPException, OSError) as e:
                conn.close()
                if attempt == 1:
                    self.error(f"export failed: {e!r}")
                    return False
        self.stats["requests"] += 1
        if resp.status != 200:
            self.error(f"export answered {resp.status}: {data[:200]!r}")
            return False
        reply = svc.ExportMetricsServiceResponse.FromString(data)
        if reply.partial_success.rejected_data_points:
            self.error(f"points rejected: {reply.partial_success.error_message}")
        return True

    def send_loop(self, url):
        a = self.args
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        now = time.time_ns()
        step = int(a.interval * 1e9)
        pods = [Pod(a.services, now, step) for _ in range(a.pods)]
        self.stats["pods_started"] = len(pods)
        start = time.monotonic()
        tick = 0
        while not self.stop.is_set():
            tick += 1
            minute = int((time.monotonic() - start) // 60)
            now = time.time_ns()
            # Churn: some pods end, new ones (new identities) take their place.
            for i in range(len(pods)):
                if self.rng.random() < a.churn:
                    pods[i] = Pod(a.services, now, step)
                    self.stats["pods_started"] += 1
            for pod in pods:
                drift = (minute + 97 * (pod.id % a.services)) % a.route_pool
                routes = list(range(SENTINELS)) + [
                    SENTINELS + (drift + r) % a.route_pool for r in range(a.routes)
                ]
                late, pod.last_body = pod.last_body, None
                body, sentinels = pod.request(routes, now, self.rng)
                if self.post(conn, body):
                    with self.lock:
                        for k, n in sentinels.items():
                            self.expected[k] = self.expected.get(k, 0) + n
                    pod.last_body = body
                if self.rng.random() < a.duplicates:
                    self.stats["duplicates"] += 1
                    self.post(conn, body)
                if late and self.rng.random() < a.duplicates:
                    self.stats["late_retries"] += 1
                    self.post(conn, late)
            self.stop.wait(max(0.0, start + tick * a.interval - time.monotonic()))

    def scrape_once(self, s):
        text, _ = s.scrape("application/openmetrics-text; version=1.0.0")
        samples = {}
        for fam in text_string_to_metric_families(text):
            for smp in fam.samples:
                key = (smp.name, tuple(sorted(smp.labels.items())))
                samples[key] = smp.value
        for (name, labels), value in samples.items():
            if not (name.endswith("_total") or name.endswith("_count")):
                continue
            base = name.rsplit("_", 1)[0]
            created = samples.get((base + "_created", labels))
            before = self.last.get((name, labels))
            if before and before[1] == created and value < before[0]:
                self.decreases += 1
                self.error(f"{name}{dict(labels)} went {before[0]} -> {value}")
            self.last[(name, labels)] = (value, created)
        self.scrapes += 1
        return samples

    def state(self, s):
        """spanagg's own gauges: what it holds, to tell growth of state from the allocator's."""
        want = ("spanagg_output_series", "spanagg_source_streams")
        out = {}
        for line in s.internal().splitlines():
            name = line.split(" ")[0].split("{")[0]
            if name in want:
                out[name[len("spanagg_"):]] = out.get(name[len("spanagg_"):], 0) + float(
                    line.split()[-1])
        return out

    def sample_loop(self, pid, t0):
        while not self.stop.wait(self.args.rss_every):
            self.fine.append((round(time.monotonic() - t0, 1), self.rss_kib(pid)))

    def rss_kib(self, pid, field="VmRSS:"):
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
        return 0

    def run(self):
        a = self.args
        s = Spanagg(
            f"series_ttl: {a.series_ttl}\ncheckpoint_interval: 60s\n"
            "limits:\n  max_series_per_service: 100000\n"
        )
        t0 = time.monotonic()
        try:
            url = urllib.parse.urlparse(f"http://{s.otlp_http}")
            sender = threading.Thread(target=self.send_loop, args=(url,), daemon=True)
            sender.start()
            if a.rss_every > 0:
                threading.Thread(
                    target=self.sample_loop, args=(s.proc.pid, t0), daemon=True
                ).start()
            deadline = t0 + a.duration
            while time.monotonic() < deadline:
                time.sleep(min(a.scrape_interval, max(0, deadline - time.monotonic())))
                before = self.rss_kib(s.proc.pid)
                samples = self.scrape_once(s)
                after = self.rss_kib(s.proc.pid)
                self.rss.append(
                    (round(time.monotonic() - t0), before, after, len(samples), self.state(s))
                )
            self.hwm = self.rss_kib(s.proc.pid, "VmHWM:")
            # utime + stime of spanagg over the run, in clock ticks (100 a second on Linux).
            stat = pathlib.Path(f"/proc/{s.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            self.cpu_s = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
            self.stop.set()
            sender.join(60)
            time.sleep(1)
            final = self.scrape_once(s)
            self.check_sentinels(final)
            self.check_log(s)
            code = s.stop(keep=False)
            if code != 0:
                self.error(f"spanagg exited with {code}")
        finally:
            self.stop.set()
            if s.proc.poll() is None:
                s.proc.kill()
        return self.report()

    def check_sentinels(self, final):
        with self.lock:
            expected = dict(self.expected)
        if not expected:
            self.error("no sentinel export was acknowledged")
        self.stats["sentinel_series_checked"] = len(expected)
        for (service, route), calls in expected.items():
            labels = (("service_name", service), ("span_kind", "SPAN_KIND_SERVER"),
                      ("span_name", route))
            got = final.get(("traces_span_metrics_calls_total", labels))
            if got != calls:
                self.error(f"{service}/{route}: served {got}, acknowledged {calls}")

    def check_log(self, s):
        for line in s.log:
            if " ERROR " in line or "panicked" in line:
                self.error("log: " + line.strip())

    def report(self):
        a = self.args
        after = [kib for t, kib, *_ in self.rss if t >= a.warmup]
        windows = rss_windows(self.fine, a.warmup, a.rss_window)
        levels = [w["median_kib"] for w in windows]
        base = levels[0] if levels else 0
        band = (min(levels) / base, max(levels) / base) if base else (0, 0)
        if not base:
            self.error("no RSS window after the warm-up (run longer, or lower --warmup)")
        elif band[0] < 0.9 or band[1] > 1.1:
            self.error(f"RSS level left the 10% band after warm-up: {band[0]:.3f}..{band[1]:.3f}")
        out = {
            "duration_s": a.duration,
            "pods": a.pods,
            "routes_per_pod": a.routes + SENTINELS,
            **self.stats,
            "scrapes": self.scrapes,
            "counter_decreases": self.decreases,
            "rss_level_kib_first_window": base,
            "rss_level_band": [round(band[0], 3), round(band[1], 3)],
            # Per window after the warm-up: start (s), median (the level), min and max (KiB).
            "rss_windows": windows,
            "rss_kib_before_scrapes_min_max_after_warmup": [
                min(after, default=0), max(after, default=0)],
            "rss_kib_after_scrape_max": max((k for _, _, k, *_ in self.rss), default=0),
            "rss_kib_peak_vmhwm": getattr(self, "hwm", 0),
            "spanagg_cpu_seconds": getattr(self, "cpu_s", 0),
            "series_at_end": len(self.last),
            "errors": self.errors,
            # Every scrape: seconds since start, RSS (KiB) before and after it, samples served,
            # and spanagg's own count of the series and streams it holds.
            "trace": self.rss,
            "rss_fine": self.fine,
        }
        print(json.dumps(out, indent=2))
        return not self.errors


def rss_windows(fine, warmup, window):
    """Each whole `window` seconds of 1-s RSS readings after `warmup`: start, median, min, max."""
    out = []
    start = warmup
    while True:
        vals = sorted(k for t, k in fine if start <= t < start + window)
        if not vals or fine[-1][0] < start + window - 2:
            return out
        out.append({"start_s": start, "median_kib": vals[len(vals) // 2],
                    "min_kib": vals[0], "max_kib": vals[-1]})
        start += window


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=3600)
    p.add_argument("--warmup", type=float, default=600)
    p.add_argument("--pods", type=int, default=50)
    p.add_argument("--services", type=int, default=10)
    p.add_argument("--routes", type=int, default=200, help="drifting routes per pod and export")
    p.add_argument("--route-pool", type=int, default=2000)
    p.add_argument("--interval", type=float, default=5.0, help="seconds between a pod's exports")
    p.add_argument("--scrape-interval", type=float, default=15.0)
    p.add_argument("--churn", type=float, default=0.01, help="chance a pod is replaced per export")
    p.add_argument("--duplicates", type=float, default=0.05)
    p.add_argument("--series-ttl", default="3m")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rss-window", type=float, default=300.0,
                   help="seconds of RSS readings whose median is one level")
    p.add_argument("--rss-every", type=float, default=1.0,
                   help="seconds between RSS readings between scrapes (0: none)")
    sys.exit(0 if Run(p.parse_args()).run() else 1)


if __name__ == "__main__":
    if "SPANAGG_BIN" not in os.environ:
        sys.exit("set SPANAGG_BIN (scripts/soak does)")
    main()
