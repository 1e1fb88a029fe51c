"""High availability as shipped: a Collector tier running `deploy/collector/ha.yaml` fans every
export out to two spanagg replicas. Both serve identical output (OpenMetrics, `_created`
included), and still do after one of them is killed and restarted while data flows: the tier
retries into it out of its queue and its WAL restores the rest."""

import random
import time

from conftest import Spanagg, free_port
from otelcol import Collector, Expected, Pod, Traffic, assert_exact, scraped, scraped_calls, send, wait_for

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def ha_tier(port, a, b):
    overrides = {
        "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{port}"}}}},
        "exporters": {"otlp_grpc/spanagg-a": {"endpoint": a.grpc}, "otlp_grpc/spanagg-b": {"endpoint": b.grpc}},
    }
    return Collector("ha.yaml", overrides, name="ha-tier")


def exposition(replica):
    """The replica's OpenMetrics exposition, lines sorted (series order is not part of it)."""
    return sorted(replica.scrape(OPENMETRICS)[0].splitlines())


def converged(a, b, expected):
    for r in (a, b):
        wait_for("every call on both replicas", lambda r=r: scraped_calls(r) >= expected.total(), timeout=90)
    time.sleep(2)
    assert_exact(expected, scraped(a.scrape()[0]))
    ea, eb = exposition(a), exposition(b)
    assert ea == eb, "\n".join(sorted(set(ea) ^ set(eb))[:20])
    assert any(line.startswith("traces_span_metrics_calls_created") for line in ea), "no _created served"


def test_two_replicas_fed_the_same_stream_serve_identical_output_through_a_restart():
    seed = random.randrange(1 << 30)
    print(f"workload seed {seed}")
    rng = random.Random(seed)
    ports_b = (free_port(), free_port(), free_port())
    a, b = Spanagg(), Spanagg(ports=ports_b)
    tier_port = free_port()
    tier = ha_tier(tier_port, a, b)
    pods = [Pod(f"127.0.0.1:{tier_port}", service, i) for service, i in [("checkout", 0), ("checkout", 1), ("cart", 0)]]
    expected = Expected()
    try:
        send(pods, expected, rng, 50)
        time.sleep(1.5)
        send(pods, expected, rng, 50)
        converged(a, b, expected)

        with Traffic(pods, expected, rng, 5):
            time.sleep(2)
            # Replica b dies hard and is down for a few flush intervals; a keeps serving.
            b.proc.kill()
            b.proc.wait(30)
            time.sleep(3)
            assert scraped_calls(a) > 0
            b = Spanagg(dir=b.dir, ports=ports_b)
            time.sleep(2)
        converged(a, b, expected)
        print(f"{expected.total()} spans; both replicas identical after b's restart")
    finally:
        for pod in pods:
            pod.close()
        tier.stop()
        for r in (a, b):
            if r.proc.poll() is None:
                r.stop()
