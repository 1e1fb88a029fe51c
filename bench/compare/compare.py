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
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from systems import (Prometheus, Process, Series, Spanagg, Vmagent, free_port, get,
                     wait_until)

HERE = os.path.dirname(os.path.abspath(__file__))
HZ = os.sysconf("SC_CLK_TCK")


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
        result = measure(system, proc, state, args, pods)
        result.update(settle(system, proc, state, args, pods_port, result))
        if not proc.alive():
            result["error"] = f"{system.name} exited early (log in {workdir})"
        return result
    finally:
        try:
            if pods:
                pods.stop()
        finally:
            system.stop()
        if args.keep:
            print(f"  logs and data kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def measure(system, proc, state, args, pods):
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
    cpu0, pods_cpu0, t0 = cpu_seconds(proc.pid), cpu_seconds(pods.pid), time.time()
    end = t0 + args.rounds * args.interval
    period = system.poll_period(args.interval)
    # Polls land anywhere in a round: the lag is sampled, not tied to when rounds go out.
    jitter = random.Random(args.seed)
    next_poll = t0 + period * jitter.random()
    while time.time() < end and proc.alive():
        time.sleep(max(0.0, min(next_poll, end) - time.time()))
        next_poll += period * (0.5 + jitter.random())
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
    # The generator shares the two cores: its share says how much it took from the system.
    pods_cores = (cpu_seconds(pods.pid) - pods_cpu0) / (time.time() - t0)
    wall = time.time() - t0
    stop.set()
    sampler.join()
    s = state()
    half = [v for t, v in rss if t >= t0 + wall / 2]
    # The rounds that went out in the window (all of them unless the generator fell behind).
    samples = s["samples_per_round"] * s["round"]
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
        "rounds_in_window": s["round"],
        "generator_cores": round(pods_cores, 3),
        "generator_late_ms_max": s["late_ms_max"],
        "otlp_errors": s["otlp_errors"],
        "otlp_rejected_points": s["otlp_rejected_points"],
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
    want = Series()
    for e in expected["series"]:
        want.add(e["metric"], e["labels"], e["value"])
    # The calls total can settle before the other series (rules run in order, remote write
    # sends in batches): read them all again until they agree or the time is up.
    while True:
        have = system.series() if proc.alive() else Series()
        wrong = sum(1 for k, v in want.items() if have.get(k) != v)
        extra = sum(1 for k in have if k not in want) + have.duplicates
        if (wrong == 0 and extra == 0) or time.time() >= deadline or not proc.alive():
            break
        time.sleep(1.0)
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
    # A harness stopped by a signal still stops what it started (the `finally`s run).
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit("stopped by a signal"))
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
    print(f"\nPrometheus 2: {version(args.prometheus2)}; Prometheus 3: "
          f"{version(os.path.join(root, 'target', 'compare', 'prometheus'))}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workload": vars(args), "results": results}, f, indent=1)
    return 0 if all(ok(r) for r in results) else 1


def ok(r):
    """Exact, every request accepted, and no poll ever saw more than the pods produced."""
    return (r.get("exact") and not r.get("error") and not r.get("otlp_errors")
            and not r.get("otlp_rejected_points") and not r.get("polls_above_input"))


def version(binary):
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def verdict(r):
    if ok(r):
        return "yes"
    if r.get("error"):
        return f"NO: {r['error']}"
    return (f"NO: {r.get('wrong_series')} wrong, {r.get('extra_series')} extra, "
            f"{r.get('otlp_errors')} failed and {r.get('otlp_rejected_points')} rejected, "
            f"{r.get('polls_above_input')} polls above the input")


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
            f"| {verdict(r)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
