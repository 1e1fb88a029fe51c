"""Restarts seen from outside: a real Prometheus scraping across a clean restart and a kill -9
sees no counter go down, and the checkpoint Parquet file reads in pyarrow as the same totals."""

import glob
import shutil
import time

import pyarrow.compute as pc
import pyarrow.parquet as pq

from conftest import Prometheus, Spanagg, free_port
from test_sdk_prometheus import run_pods


def calls(expected):
    return sum(v["calls"] for v in expected.series.values())


def test_prometheus_sees_no_reset_across_a_clean_restart_and_a_kill():
    ports = (free_port(), free_port(), free_port())
    s = Spanagg(ports=ports)
    prom = Prometheus(f"127.0.0.1:{ports[2]}", internal=True)
    want, series = 0, set()
    try:
        deadline = time.time() + 30
        while not prom.query('up{job="spanagg-internal"} == 1'):
            assert time.time() < deadline, "Prometheus never scraped spanagg"
            time.sleep(0.2)
        for seed, kill in ((11, False), (12, True), (13, None)):
            e = run_pods(s, rounds=2, seed=seed)
            want += calls(e)
            series |= set(e.series)
            time.sleep(2.5)  # scrapes before the restart
            if kill is not None:
                s = s.restart(kill=kill)
                time.sleep(2.5)  # scrapes after it, before new data
        deadline = time.time() + 30
        while True:
            res = prom.query("sum(traces_span_metrics_calls_total)")
            if res and float(res[0]["value"][1]) == want:
                break
            assert time.time() < deadline, f"PromQL never reached {want}: {res}"
            time.sleep(0.5)
        for metric in ("traces_span_metrics_calls_total", "traces_span_metrics_duration_milliseconds_count"):
            res = prom.query(f"sum(resets({metric}[5m]))")
            assert float(res[0]["value"][1]) == 0, f"{metric} went down across a restart"
        # Prometheus scraped three processes (two restarts), not one.
        res = prom.query("changes(spanagg_process_start_time_seconds[5m])")
        raw = prom.query("spanagg_process_start_time_seconds[5m]")
        assert float(res[0]["value"][1]) >= 2, f"Prometheus did not scrape across both restarts: {raw}"

        # The final clean stop's checkpoint, read by pyarrow, holds the same totals.
        dir = s.dir
        assert s.stop(keep=True) == 0
        newest = sorted(glob.glob(f"{dir}/data/checkpoints/checkpoint-*.parquet"))[-1]
        meta = pq.read_metadata(newest).metadata
        assert meta[b"spanagg.clean_shutdown"] == b"true"
        table = pq.read_table(newest)
        rows = table.filter(pc.equal(table["record"], "series"))
        counters = rows.filter(pc.equal(rows["metric"], "traces_span_metrics_calls"))
        assert pc.sum(counters["value"]).as_py() == want
        assert counters.num_rows == len(series)
        assert pc.sum(counters["int_total"]).as_py() == want
        streams = table.filter(pc.equal(table["record"], "stream"))
        assert set(streams["temporality"].to_pylist()) == {"delta"}
        # One stream per pod and series it fed (10 pods, each its own service's), two metrics.
        assert 2 * len(series) <= streams.num_rows <= 2 * len(series) * 5
        fed = set(zip(streams["series_key_lo"].to_pylist(), streams["series_key_hi"].to_pylist()))
        assert fed <= set(zip(rows["key_lo"].to_pylist(), rows["key_hi"].to_pylist()))
        shutil.rmtree(dir, ignore_errors=True)
    finally:
        prom.stop()
