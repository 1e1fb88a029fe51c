"""One span-metric workload through each system a platform team could pick, side by side.

`spanagg-pods` simulates P pods x R routes x B buckets (seeded, one round per interval). Each
system aggregates them across pods per service and route:

  prometheus-2.42, prometheus-3  scrape every pod; `sum without(pod, instance)` recording rules
  vmagent                         scrapes every pod; stream aggregation `total` outputs, written
                                  to a Prometheus 3 sink (not measured)
  spanagg-{http,grpc}-{gzip,zstd} the pods push the same rounds as OTLP deltas

Per system, in one run: CPU seconds per million input samples (over the rounds), RSS steady
(median of the second half of the rounds) and peak (VmHWM), how far the aggregate lags the
input (seconds since the oldest round it does not fully hold yet, sampled while rounds run),
and whether the aggregate is exact once the input holds still (every output series equal to
the pods' own totals). Every process binds 127.0.0.1, is bounded in time and is stopped by its
PID. Run it through `bench/compare/run`, which builds the binaries.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

HERE = os.path.dirname(os.path.abspath(__file__))
METRICS = {
    "traces_span_metrics_calls_total": "calls",
    "traces_span_metrics_duration_milliseconds_bucket": "bucket",
    "traces_span_metrics_duration_milliseconds_count": "count",
    "traces_span_metrics_duration_milliseconds_sum": "sum",
}
HZ = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, timeout=30):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


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


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def status_mb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


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


def key(metric, labels):
    le = labels.get("le")
    return (metric, labels.get("service_name"), labels.get("span_name"),
            None if le is None else le_value(le))


def scrape_text(text):
    """Output series of an exposition, keyed like `expected`."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            metric = METRICS.get(s.name)
            if metric:
                out[key(metric, s.labels)] = s.value
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
        return scrape_text(get(f"http://127.0.0.1:{self.http}/metrics").decode())

    def calls_total(self):
        # Only the calls lines; the reference parser reads every series once, at the end.
        text = get(f"http://127.0.0.1:{self.http}/metrics").decode()
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


class Prometheus(System):
    """Prometheus scraping every pod, recording `sum without(pod, instance)` per metric."""

    def __init__(self, name, bin_path):
        self.name, self.bin = name, bin_path

    def start(self, workdir, pods_port, args):
        self.port = free_port()
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

    def pods_flags(self):
        return []

    def poll_period(self, interval):
        return 1.0

    def calls_total(self):
        r = prom_query(self.port, "sum(cluster:traces_span_metrics_calls_total:sum)")
        return float(r[0]["value"][1]) if r else 0.0

    def series(self):
        out = {}
        for m, metric in METRICS.items():
            for s in prom_query(self.port, f"cluster:{m}:sum"):
                out[key(metric, s["metric"])] = float(s["value"][1])
        return out


class Vmagent(System):
    """vmagent scraping every pod, stream aggregation `total` by service and route, written to
    a Prometheus 3 sink (started here, not measured)."""

    name = "vmagent"

    def __init__(self, bin_path, sink_bin):
        self.bin, self.sink_bin = bin_path, sink_bin

    def start(self, workdir, pods_port, args):
        self.sink_port, port = free_port(), free_port()
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

    def pods_flags(self):
        return []

    def poll_period(self, interval):
        return 1.0

    def calls_total(self):
        r = prom_query(self.sink_port, 'sum({__name__=~"traces_span_metrics_calls_total:.+"})')
        return float(r[0]["value"][1]) if r else 0.0

    def series(self):
        out = {}
        for m, metric in METRICS.items():
            for s in prom_query(self.sink_port, f'{{__name__=~"{m}:.+"}}'):
                out[key(metric, s["metric"])] = float(s["value"][1])
        return out


def run_one(system, args, pods_bin):
    workdir = tempfile.mkdtemp(prefix=f"compare-{system.name}-")
    pods = None
    try:
        pods_port = free_port()
        proc = system.start(workdir, pods_port, args)
        pods = Process("pods", [
            pods_bin, "--listen", f"127.0.0.1:{pods_port}", "--pods", str(args.pods),
            "--services", str(args.services), "--routes", str(args.routes),
            "--bounds", str(args.bounds), "--seed", str(args.seed),
            "--interval", f"{args.interval}s", "--warmup", f"{args.warmup}s",
            "--rounds", str(args.rounds)] + system.pods_flags(), workdir)
        state = lambda: json.loads(get(f"http://127.0.0.1:{pods_port}/state"))
        wait_until("the pods", lambda: state() is not None, 30, pods)
        result = measure(system, proc, state, args)
        result.update(settle(system, proc, state, args, pods_port, result))
        if not proc.alive():
            result["error"] = f"{system.name} exited early (log in {workdir})"
        return result
    finally:
        if pods:
            pods.stop()
        system.stop()
        if args.keep:
            print(f"  logs and data kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def measure(system, proc, state, args):
    """Samples RSS every second and the aggregate every poll period while the rounds run."""
    rss, lags, over, settled_at = [], [], 0, None
    stop = threading.Event()

    def sample_rss():
        while not stop.is_set() and proc.alive():
            rss.append((time.time(), status_mb(proc.pid, "VmRSS")))
            stop.wait(1.0)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    while state()["round"] == 0:
        time.sleep(0.05)
    cpu0, t0 = cpu_seconds(proc.pid), time.time()
    end = t0 + args.rounds * args.interval
    period = system.poll_period(args.interval)
    next_poll = t0 + 0.5
    while time.time() < end and proc.alive():
        time.sleep(max(0.0, min(next_poll, end) - time.time()))
        next_poll += period
        if time.time() >= end:
            break
        # What the aggregate holds is judged against the rounds out when the poll began.
        asked, s = time.time(), state()
        try:
            total = system.calls_total()
        except (OSError, ValueError, KeyError, IndexError) as e:
            print(f"  {system.name}: poll failed: {e}", file=sys.stderr)
            continue
        held = [i for i, c in enumerate(s["calls"]) if c <= total]
        r = held[-1] if held else 0
        if total > s["calls"][-1]:
            over += 1
        if r == args.rounds and settled_at is None:
            settled_at = asked
        lags.append(0.0 if r >= s["round"] else max(0.0, asked - s["published_ms"][r] / 1000))
    cpu = cpu_seconds(proc.pid) - cpu0 if proc.alive() else float("nan")
    wall = time.time() - t0
    stop.set()
    sampler.join()
    s = state()
    half = [v for t, v in rss if t >= t0 + wall / 2]
    samples = s["samples_per_round"] * args.rounds
    return {
        "cpu_s_per_m_samples": round(cpu / (samples / 1e6), 4),
        "cores": round(cpu / wall, 3),
        "rss_steady_mb": round(statistics.median(half), 1) if half else None,
        "rss_peak_mb": round(status_mb(proc.pid, "VmHWM"), 1) if proc.alive() else None,
        "lag_p50_s": round(statistics.median(lags), 2) if lags else None,
        "lag_max_s": round(max(lags), 2) if lags else None,
        "polls_above_input": over,
        "poll_period_s": period,
        "settled_at": settled_at,
        "input_samples_per_s": round(s["samples_per_round"] / args.interval),
        "otlp_errors": s["otlp_errors"],
        "first_error": s["first_error"],
    }


def settle(system, proc, state, args, pods_port, measured):
    """Once every round is out: how long until the aggregate holds the last one, and whether
    every output series then equals the pods' own totals."""
    wait_until("the last round", lambda: state()["round"] >= args.rounds, args.interval * 3)
    last = state()
    final, since = last["calls"][-1], last["published_ms"][-1] / 1000
    got, settled_at = None, measured.pop("settled_at")
    deadline = time.time() + args.settle
    while time.time() < deadline and proc.alive():
        asked = time.time()
        try:
            got = system.calls_total()
        except (OSError, ValueError, KeyError, IndexError):
            got = None
        if got == final:
            settled_at = settled_at or asked
            break
        time.sleep(1.0)
    out = {"settled_s": round(settled_at - since, 1) if got == final else None}
    expected = json.loads(get(f"http://127.0.0.1:{pods_port}/expected"))
    want = {key(e["metric"], {"service_name": e["service"], "span_name": e["route"],
                              **({"le": e["le"]} if e["le"] else {})}): e["value"]
            for e in expected["series"]}
    have = system.series() if proc.alive() else {}
    wrong = sum(1 for k, v in want.items() if have.get(k) != v)
    extra = sum(1 for k in have if k not in want)
    out.update({"output_series": len(want), "wrong_series": wrong, "extra_series": extra,
                "exact": wrong == 0 and extra == 0 and got == final})
    return out


def systems(args, root):
    target = os.path.join(root, "target")
    bins = args.bin_dir or f"{target}/release"
    everything = {
        "prometheus-2.42": lambda: Prometheus("prometheus-2.42", args.prometheus2),
        "prometheus-3": lambda: Prometheus("prometheus-3", f"{target}/compare/prometheus"),
        "vmagent": lambda: Vmagent(f"{target}/compare/vmagent", f"{target}/compare/prometheus"),
    }
    for protocol in ("http", "grpc"):
        for compression in ("gzip", "zstd"):
            everything[f"spanagg-{protocol}-{compression}"] = (
                lambda p=protocol, c=compression: Spanagg(f"{bins}/spanagg", p, c))
    chosen = args.systems.split(",") if args.systems else list(everything)
    unknown = [s for s in chosen if s not in everything]
    if unknown:
        sys.exit(f"unknown systems {unknown}; choose from {list(everything)}")
    return [everything[s]() for s in chosen]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pods", type=int, default=200)
    p.add_argument("--services", type=int, default=10)
    p.add_argument("--routes", type=int, default=200)
    p.add_argument("--bounds", type=int, default=50, help="histogram bounds (buckets - 1)")
    p.add_argument("--interval", type=int, default=5, help="seconds between rounds")
    p.add_argument("--rounds", type=int, default=24)
    p.add_argument("--warmup", type=int, default=20, help="seconds at zero before round 1")
    p.add_argument("--settle", type=int, default=120,
                   help="seconds to wait for the last round after it went out")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--systems", help="comma-separated; default: all")
    p.add_argument("--prometheus2", default="/usr/bin/prometheus")
    p.add_argument("--bin-dir", help="where spanagg and spanagg-pods are (target/release)")
    p.add_argument("--keep", action="store_true", help="keep each system's logs and data")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    root = os.path.dirname(os.path.dirname(HERE))
    pods_bin = os.path.join(args.bin_dir or os.path.join(root, "target", "release"),
                            "spanagg-pods")
    results = []
    for system in systems(args, root):
        print(f"== {system.name}", file=sys.stderr)
        r = {"system": system.name}
        try:
            r.update(run_one(system, args, pods_bin))
        except (RuntimeError, OSError, ValueError, KeyError) as e:
            r["error"] = str(e)
        print("  " + json.dumps(r), file=sys.stderr)
        results.append(r)
    print(table(results, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workload": vars(args), "results": results}, f, indent=1)
    return 0 if all(r.get("exact") and not r.get("error") for r in results) else 1


def table(results, args):
    lines = [f"{args.pods} pods x {args.routes} routes x {args.bounds + 1} buckets, "
             f"{args.interval} s interval, {args.rounds} rounds, seed {args.seed}", "",
             "| system | CPU-s / M samples | cores | RSS steady MB | RSS peak MB "
             "| lag p50 / max s | settled s | exact |", "|" + " --- |" * 8]
    for r in results:
        lines.append(
            f"| {r['system']} | {r.get('cpu_s_per_m_samples')} | {r.get('cores')} "
            f"| {r.get('rss_steady_mb')} | {r.get('rss_peak_mb')} "
            f"| {r.get('lag_p50_s')} / {r.get('lag_max_s')} | {r.get('settled_s')} "
            f"| {'yes' if r.get('exact') else 'NO (%s wrong, %s extra)' % (r.get('wrong_series'), r.get('extra_series'))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
