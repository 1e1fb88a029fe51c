"""The Arrow snapshot read by pyarrow equals the Prometheus scrape, and its filters work."""

import urllib.parse

import pyarrow as pa

from conftest import http_get
from test_sdk_prometheus import BOUNDS, assert_exact, run_pods


def snapshot(spanagg, **params):
    query = ("?" + urllib.parse.urlencode(params)) if params else ""
    status, headers, body = http_get(f"http://{spanagg.http}/api/v1/snapshot{query}")
    assert status == 200
    assert headers["Content-Type"] == "application/vnd.apache.arrow.stream"
    return pa.ipc.open_stream(body).read_all()


def series_from_snapshot(table):
    got = {}
    # Nanosecond timestamps as integers: datetime has only microseconds.
    created = table.column("created").cast(pa.int64()).to_pylist()
    updated = table.column("updated").cast(pa.int64()).to_pylist()
    for row, c, u in zip(table.drop_columns(["created", "updated"]).to_pylist(), created, updated):
        key = (row["service_name"], row["span_name"], row["status_code"])
        e = got.setdefault(key, {"calls": None, "sum": None, "count": None, "buckets": {}})
        assert row["labels"] == [], row["labels"]  # everything kept has its own column here
        if row["kind"] == "counter":
            assert row["metric"] == "traces_span_metrics_calls"
            assert row["count"] is None and row["bucket_counts"] is None
            e["calls"] = row["value"]
        else:
            assert row["metric"] == "traces_span_metrics_duration_milliseconds"
            assert row["otel_metric"] == "traces.span.metrics.duration" and row["unit"] == "ms"
            assert row["value"] is None
            assert row["bucket_bounds"] == BOUNDS
            assert len(row["bucket_counts"]) == len(BOUNDS) + 1
            assert sum(row["bucket_counts"]) == row["count"]
            e["count"], e["sum"] = row["count"], row["sum"]
            cumulative = 0
            for bound, n in zip(BOUNDS + [float("inf")], row["bucket_counts"]):
                cumulative += n
                e["buckets"][bound] = cumulative
        assert 0 < c <= u
    return got


def test_snapshot_read_by_pyarrow_equals_the_exact_merge(spanagg):
    expected = run_pods(spanagg, rounds=2, seed=7)
    table = snapshot(spanagg)
    assert table.schema.field("service_name").type == pa.dictionary(pa.int32(), pa.string())
    assert table.schema.field("created").type == pa.timestamp("ns", tz="UTC")
    assert_exact(expected, series_from_snapshot(table))
    assert table.num_rows == 2 * len(expected.series)


def test_snapshot_filters_by_service_and_metric(spanagg):
    expected = run_pods(spanagg, rounds=1, seed=8)
    cart = snapshot(spanagg, service="cart")
    assert set(cart.column("service_name").to_pylist()) == {"cart"}
    assert cart.num_rows == 2 * sum(1 for k in expected.series if k[0] == "cart")
    calls = snapshot(spanagg, metric="traces.span.metrics.calls")
    assert set(calls.column("kind").to_pylist()) == {"counter"}
    assert sum(calls.column("value").to_pylist()) == sum(v["calls"] for v in expected.series.values())
    # The family name, and the sample names as scraped, select the same series.
    for name in ("traces_span_metrics_calls", "traces_span_metrics_calls_total"):
        assert snapshot(spanagg, metric=name).num_rows == calls.num_rows, name
    buckets = snapshot(spanagg, metric="traces_span_metrics_duration_milliseconds_bucket")
    assert buckets.num_rows == calls.num_rows and set(buckets.column("kind").to_pylist()) == {"histogram"}
    none = snapshot(spanagg, service="nope")
    assert none.num_rows == 0


def test_flight_do_get_serves_the_same_snapshot(spanagg):
    from pyarrow import flight

    expected = run_pods(spanagg, rounds=1, seed=9)
    client = flight.FlightClient(f"grpc://{spanagg.grpc}")
    table = client.do_get(flight.Ticket(b"snapshot")).read_all()
    assert table.schema.equals(snapshot(spanagg).schema)
    assert_exact(expected, series_from_snapshot(table))
    cart = client.do_get(flight.Ticket(b"snapshot?service=cart")).read_all()
    assert set(cart.column("service_name").to_pylist()) == {"cart"}
    try:
        client.do_get(flight.Ticket(b"everything")).read_all()
        raise AssertionError("an unknown ticket must be refused")
    except pa.ArrowInvalid as e:  # INVALID_ARGUMENT
        assert "unknown ticket" in str(e)
    client.close()
