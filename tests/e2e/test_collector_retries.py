"""The sidecars' OTLP exporter retries out of its sending queue, and spanagg's answers tell it
what to retry: with the WAL on, `kill -9` while sidecars export and a restart lose and double
nothing; an UNAVAILABLE answer is retried until it succeeds; a partial success is not retried."""

import random
import time

import pytest

from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from conftest import Spanagg, free_port
from otelcol import Expected, Pod, Traffic, assert_exact, scraped, scraped_calls, send, wait_for


def internal(spanagg, name, **labels):
    """A counter of spanagg's own metrics, summed over series matching `labels`."""
    total = 0.0
    for fam in parse_openmetrics(spanagg.internal()):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def settle(spanagg, expected):
    """Waits for every call, then a few flush intervals more: nothing may come twice."""
    wait_for("every call in spanagg's scrape", lambda: scraped_calls(spanagg) >= expected.total(), timeout=90)
    time.sleep(3)
    assert_exact(expected, scraped(spanagg.scrape()[0]))


def test_kill_9_while_sidecars_export_loses_and_doubles_nothing():
    seed = random.randrange(1 << 30)
    print(f"workload seed {seed}")
    rng = random.Random(seed)
    ports = (free_port(), free_port(), free_port())
    spanagg = Spanagg("durability: wal\n", ports=ports)
    pods = [Pod(spanagg.grpc, service, i) for service, i in [("checkout", 0), ("checkout", 1), ("cart", 0)]]
    expected = Expected()
    try:
        # Spans all the while: some deltas are in flight when spanagg dies.
        with Traffic(pods, expected, rng, 5, pause=0.1):
            time.sleep(3)
            spanagg.proc.kill()
            spanagg.proc.wait(30)
            # Down for several flush intervals, well inside the exporter's max_elapsed_time (5m).
            time.sleep(4)
            spanagg = Spanagg("durability: wal\n", dir=spanagg.dir, ports=ports)
            time.sleep(3)
        settle(spanagg, expected)
        print(f"{expected.total()} spans, {len(expected.series)} series, exact across kill -9")
        assert internal(spanagg, "spanagg_wal_replayed_records_total") > 0
        for pod in pods:
            sent, failed = pod.sidecar.exporter_points("otlp_grpc/spanagg")
            assert sent > 0 and failed == 0, (pod.name, sent, failed)
    finally:
        for pod in pods:
            pod.close()
        if spanagg.proc.poll() is None:
            spanagg.stop()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unavailable_is_retried_until_it_succeeds(protocol):
    rng = random.Random(7)
    ports = (free_port(), free_port(), free_port())
    # One source stream per shard: the sidecar's series are refused with UNAVAILABLE (gRPC) or
    # 503 (OTLP/HTTP, through an otlp_http exporter).
    spanagg = Spanagg("limits:\n  max_source_streams: 1\n", ports=ports)
    pod = Pod(spanagg.grpc, "checkout", 0, http=spanagg.otlp_http if protocol == "http" else None)
    expected = Expected()
    try:
        send([pod], expected, rng, 40)
        wait_for(
            "an UNAVAILABLE answer",
            lambda: internal(spanagg, "spanagg_requests_total", outcome="unavailable", protocol={"grpc": "grpc", "http": "http_protobuf"}[protocol]) > 0,
        )
        # The limit raised, on the same state: the exporter's retry gets through.
        spanagg.proc.kill()
        spanagg.proc.wait(30)
        spanagg = Spanagg("", dir=spanagg.dir, ports=ports)
        # The refused export is sent again (the Collector counts it sent only then) ...
        wait_for("the retried export", lambda: pod.sidecar.exporter_points(pod.exporter)[0] > 0, timeout=90)
        # ... and what the first try had applied comes back as duplicates, not twice.
        settle(spanagg, expected)
        assert pod.sidecar.exporter_points(pod.exporter)[1] == 0
    finally:
        pod.close()
        spanagg.stop()


def test_a_partial_success_is_not_retried():
    rng = random.Random(11)
    # Output bounds no sidecar bucket layout folds into: every histogram point is refused
    # (layout_mismatch) while the calls are applied, so each export is a partial success.
    spanagg = Spanagg("histogram:\n  bounds:\n    traces.span.metrics.duration: [3, 7]\n")
    pod = Pod(spanagg.grpc, "checkout", 0)
    expected = Expected()
    try:
        send([pod], expected, rng, 40)
        wait_for(
            "a partial success",
            lambda: internal(spanagg, "spanagg_requests_total", outcome="partial_success") > 0,
        )
        wait_for("every call", lambda: scraped_calls(spanagg) >= expected.total())
        # Several retry intervals (the exporter's first retry comes after ~5 s).
        time.sleep(8)
        assert internal(spanagg, "spanagg_points_total", outcome="duplicate") == 0, "a partial success was retried"
        assert internal(spanagg, "spanagg_points_total", outcome="layout_mismatch") > 0
        got = scraped(spanagg.scrape()[0])
        calls = {k: v["calls"] for k, v in got.items()}
        assert calls == {k: s["calls"] for k, s in expected.series.items()}
        # The Collector counts the points of a partial success as sent, none as failed.
        sent, failed = pod.sidecar.exporter_points("otlp_grpc/spanagg")
        assert sent > 0 and failed == 0, (sent, failed)
    finally:
        pod.close()
        spanagg.stop()
