"""The systems `compare.py` measures, each started on 127.0.0.1 and read the same way: the
pods' calls total (polled while rounds run) and every output series (once they hold still),
keyed by metric and the labels an aggregate keeps.
"""

import gzip
import json
import os
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families)
from prometheus_client.parser import text_string_to_metric_families

METRICS = {
    "traces_span_metrics_calls_total": "calls",
    "traces_span_metrics_duration_milliseconds_bucket": "bucket",
    "traces_span_metrics_duration_milliseconds_count": "count",
    "traces_span_metrics_duration_milliseconds_sum": "sum",
}

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, timeout=30):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


# What Prometheus 3 asks a target for: OpenMetrics first, gzipped.
SCRAPE_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
              "application/openmetrics-text;version=0.0.1;q=0.4,"
              "text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
    "Accept-Encoding": "gzip",
}


def scrape(url, timeout=30):
    """The target's exposition, fetched as Prometheus fetches it."""
    req = urllib.request.Request(url, headers=SCRAPE_HEADERS)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
        if r.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        return body.decode()


def wait_until(what, check, timeout, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited while waiting for {what}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


class Process:
    """A child in its own process group, logging to a file, stopped by its PID."""

    def __init__(self, name, argv, workdir):
        self.name = name
        self.log = open(os.path.join(workdir, f"{name}.log"), "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.pid = self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def le_value(text):
    return float("inf") if text == "+Inf" else float(text)


# Labels an aggregate across pods drops (pod, instance) or may keep from its scrape job.
DROPPED = {"pod", "instance", "job", "__name__"}


def key(metric, labels):
    """A series' identity: its metric and every label it keeps, `le` compared as a number."""
    return (metric, frozenset((k, le_value(v) if k == "le" else v)
                              for k, v in labels.items() if k not in DROPPED))


class Series(dict):
    """Output series by key; `duplicates` counts series that landed on a key already taken."""

    duplicates = 0

    def add(self, metric, labels, value):
        k = key(metric, labels)
        if k in self:
            self.duplicates += 1
        self[k] = value


def scrape_text(text):
    """Output series of an exposition, keyed like `expected`."""
    out = Series()
    parse = (openmetrics_families if text.endswith("# EOF\n")
             else text_string_to_metric_families)
    for family in parse(text):
        for s in family.samples:
            metric = METRICS.get(s.name)
            if metric:
                out.add(metric, s.labels, s.value)
    return out


def prom_query(port, promql):
    q = urllib.parse.urlencode({"query": promql})
    body = json.loads(get(f"http://127.0.0.1:{port}/api/v1/query?{q}"))
    return body["data"]["result"]


class System:
    """What every system has: the processes it started (stopped last to first)."""

    procs = ()

    def spawn(self, name, argv, workdir):
        proc = Process(name, argv, workdir)
        self.procs = [*self.procs, proc]
        return proc

    def stop(self):
        for proc in reversed(self.procs):
            proc.stop()
        self.procs = []

    def pods_flags(self):
        """What the pods need to feed this system (nothing: it scrapes them)."""
        return []

    def poll_period(self, interval):
        return 1.0


class PromQL(System):
    """A system whose aggregate is read by PromQL from a Prometheus API on `read_port`."""

    read_port = None

    def selector(self, metric):
        raise NotImplementedError

    def calls_total(self):
        r = prom_query(self.read_port, f"sum({self.selector('traces_span_metrics_calls_total')})")
        return float(r[0]["value"][1]) if r else 0.0

    def series(self):
        out = Series()
        for m, metric in METRICS.items():
            for s in prom_query(self.read_port, self.selector(m)):
                out.add(metric, s["metric"], float(s["value"][1]))
        return out


class Spanagg(System):
    """spanagg, fed by the pods over OTLP; its output is its own scrape."""

    def __init__(self, bin_path, protocol, compression):
        self.bin, self.protocol, self.compression = bin_path, protocol, compression
        self.name = f"spanagg-{protocol}-{compression}"

    def start(self, workdir, pods_port, args):
        self.grpc, self.otlp_http, self.http = free_port(), free_port(), free_port()
        self.proc = self.spawn(self.name, [
            self.bin, "serve", "--grpc-listen", f"127.0.0.1:{self.grpc}",
            "--otlp-http-listen", f"127.0.0.1:{self.otlp_http}",
            "--http-listen", f"127.0.0.1:{self.http}",
            "--data-dir", os.path.join(workdir, "data")], workdir)
        wait_until("spanagg ready",
                   lambda: get(f"http://127.0.0.1:{self.http}/-/ready", 2) is not None, 60,
                   self.proc)
        return self.proc

    def pods_flags(self):
        port = self.grpc if self.protocol == "grpc" else self.otlp_http
        return ["--otlp", self.protocol, "--endpoint", f"http://127.0.0.1:{port}",
                "--compression", self.compression]

    def poll_period(self, interval):
        # Read as a scraper in production would, once per interval: the scrape is spanagg's
        # whole output cost, so it is measured with the rest.
        return interval

    def series(self):
        return scrape_text(scrape(f"http://127.0.0.1:{self.http}/metrics"))

    def calls_total(self):
        # Only the calls lines; the reference parser reads every series once, at the end.
        text = scrape(f"http://127.0.0.1:{self.http}/metrics")
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("traces_span_metrics_calls_total{"))


def scrape_config(pods, pods_port, interval, more_global=""):
    targets = "\n".join(
        f"      - targets: ['127.0.0.1:{pods_port}']\n"
        f"        labels: {{pod: 'pod-{i}', __metrics_path__: '/pods/{i}/metrics'}}"
        for i in range(pods))
    return (f"global:\n  scrape_interval: {interval}s\n  scrape_timeout: {interval}s\n"
            f"{more_global}"
            f"scrape_configs:\n  - job_name: pods\n    static_configs:\n{targets}\n")


class Prometheus(PromQL):
    """Prometheus scraping every pod, recording `sum without(pod, instance)` per metric."""

    def __init__(self, name, bin_path):
        self.name, self.bin = name, bin_path

    def start(self, workdir, pods_port, args):
        self.port = self.read_port = free_port()
        rules = os.path.join(workdir, "rules.yml")
        with open(rules, "w") as f:
            f.write(f"groups:\n  - name: cluster\n    interval: {args.interval}s\n    rules:\n")
            for m in METRICS:
                f.write(f"      - record: cluster:{m}:sum\n"
                        f"        expr: sum without(pod, instance) ({m})\n")
        config = os.path.join(workdir, "prometheus.yml")
        with open(config, "w") as f:
            f.write(scrape_config(args.pods, pods_port, args.interval,
                                  f"  evaluation_interval: {args.interval}s\n"))
            f.write(f"rule_files: ['{rules}']\n")
        self.proc = self.spawn(self.name, [
            self.bin, f"--config.file={config}", f"--storage.tsdb.path={workdir}/tsdb",
            f"--web.listen-address=127.0.0.1:{self.port}"], workdir)
        wait_until(f"{self.name} ready",
                   lambda: get(f"http://127.0.0.1:{self.port}/-/ready", 2) is not None, 120,
                   self.proc)
        return self.proc

    def selector(self, metric):
        return f"cluster:{metric}:sum"


class Vmagent(PromQL):
    """vmagent scraping every pod, stream aggregation `total` by service and route, written to
    a Prometheus 3 sink (started here, not measured)."""

    name = "vmagent"

    def __init__(self, bin_path, sink_bin):
        self.bin, self.sink_bin = bin_path, sink_bin

    def start(self, workdir, pods_port, args):
        self.sink_port, port = free_port(), free_port()
        self.read_port = self.sink_port
        sink_config = os.path.join(workdir, "sink.yml")
        self._write(sink_config, "global: {}\n")
        self.sink = self.spawn("vmagent-sink", [
            self.sink_bin, f"--config.file={sink_config}", f"--storage.tsdb.path={workdir}/sink",
            "--web.enable-remote-write-receiver",
            f"--web.listen-address=127.0.0.1:{self.sink_port}"], workdir)
        wait_until("sink ready",
                   lambda: get(f"http://127.0.0.1:{self.sink_port}/-/ready", 2) is not None, 60,
                   self.sink)
        scrape = os.path.join(workdir, "scrape.yml")
        self._write(scrape, scrape_config(args.pods, pods_port, args.interval))
        aggr = os.path.join(workdir, "aggr.yml")
        self._write(aggr, f"- match: '{{__name__=~\"traces_span_metrics_.+\"}}'\n"
                          f"  interval: {args.interval}s\n  without: [pod, instance]\n"
                          # The default (one interval) forgets a pod whose scrape came late,
                          # and `total` then counts its whole running total again.
                          f"  staleness_interval: {4 * args.interval}s\n"
                          f"  outputs: [total]\n")
        self.proc = self.spawn("vmagent", [
            self.bin, f"-promscrape.config={scrape}", f"-streamAggr.config={aggr}",
            f"-remoteWrite.url=http://127.0.0.1:{self.sink_port}/api/v1/write",
            f"-remoteWrite.tmpDataPath={workdir}/vmagent", f"-httpListenAddr=127.0.0.1:{port}",
            "-loggerLevel=WARN"], workdir)
        wait_until("vmagent up", lambda: get(f"http://127.0.0.1:{port}/health", 2) is not None,
                   60, self.proc)
        return self.proc

    @staticmethod
    def _write(path, text):
        with open(path, "w") as f:
            f.write(text)

    def selector(self, metric):
        # vmagent names its outputs `<metric>:<interval>_without_instance_pod_total`.
        return f'{{__name__=~"{metric}:.+"}}'
