"""Every compression the Collector's OTLP exporters offer that spanagg reads, from real sidecars:
zstd and Snappy over OTLP/gRPC (Snappy is framed there, and tonic has none: spanagg inflates it
itself), zstd, Snappy (block) and deflate over OTLP/HTTP. Each sidecar's points must arrive
exactly, with none failed, and spanagg must count every request a success."""

import random
import time

from otelcol import Expected, Pod, assert_exact, scraped, scraped_calls, send, wait_for
from test_collector_retries import internal

SIDECARS = [
    ("grpc", "zstd"),
    ("grpc", "snappy"),
    ("http", "zstd"),
    ("http", "snappy"),
    ("http", "deflate"),
]


def test_every_exporter_compression_arrives_exactly(spanagg):
    rng = random.Random(5)
    pods = [
        Pod(spanagg.grpc, f"svc-{protocol}-{compression}", 0,
            http=spanagg.otlp_http if protocol == "http" else None, compression=compression)
        for protocol, compression in SIDECARS
    ]
    expected = Expected()
    try:
        for _ in range(2):
            send(pods, expected, rng, 30)
            time.sleep(1.5)
        wait_for("every call in spanagg's scrape", lambda: scraped_calls(spanagg) >= expected.total())
        time.sleep(3)
        assert_exact(expected, scraped(spanagg.scrape()[0]))
        for pod, (protocol, compression) in zip(pods, SIDECARS):
            sent, failed = pod.sidecar.exporter_points(pod.exporter)
            assert sent > 0 and failed == 0, (protocol, compression, sent, failed)
        for protocol in ("grpc", "http_protobuf"):
            assert internal(spanagg, "spanagg_requests_total", protocol=protocol, outcome="success") > 0
        refused = {
            (s, o): internal(spanagg, "spanagg_requests_total", protocol=s, outcome=o)
            for s in ("grpc", "http_protobuf")
            for o in ("invalid_argument", "too_large", "unavailable")
        }
        assert not any(refused.values()), refused
    finally:
        for pod in pods:
            pod.close()
