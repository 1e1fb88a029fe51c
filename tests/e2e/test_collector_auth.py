"""TLS and tokens with the real peers: a Collector sidecar running the shipped `sidecar.yaml`
with the shipped `sidecar-auth.yaml` merged on top (TLS, the bearertokenauth extension) exports
to a spanagg serving TLS with every door closed; a sidecar with the wrong token is refused as
UNAUTHENTICATED, which its exporter counts as failed and does not retry; a real Prometheus
scrapes over https with `authorization.credentials_file`."""

import pathlib
import random
import subprocess
import tempfile
import time

from conftest import Prometheus, Spanagg
from otelcol import CALLS, Expected, Pod, ROUTES, DURATIONS_MS, assert_exact, scraped, scraped_calls, wait_for


def test_the_collector_and_prometheus_use_their_tokens_and_a_wrong_one_is_refused_for_good():
    secrets = pathlib.Path(tempfile.mkdtemp(prefix="spanagg-secrets-"))
    tokens = {"ingest": "ingest-2b7d0c9e4f", "read": "read-91af3e6c0d", "scrape": "scrape-5c0e8d2a7b"}
    for door, token in tokens.items():
        (secrets / door).write_text(token + "\n")
    (secrets / "wrong").write_text("ingest-2b7d0c9e4X\n")
    # A self-signed certificate for 127.0.0.1, its own CA.
    cert, key = secrets / "tls.crt", secrets / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=spanagg",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    config = "auth:\n" + "".join(f"  {d}_token_file: {secrets / d}\n" for d in tokens)
    config += f"tls:\n  cert_file: {cert}\n  key_file: {key}\n"
    spanagg = Spanagg(config)
    spanagg.scrape_token, spanagg.ca_file = tokens["scrape"], str(cert)
    good = Pod(spanagg.grpc, "checkout", 0, token_file=secrets / "ingest", ca_file=cert)
    bad = Pod(spanagg.grpc, "intruder", 0, token_file=secrets / "wrong", ca_file=cert)
    prom = Prometheus(spanagg.http, credentials_file=secrets / "scrape", ca_file=cert)
    expected = Expected()
    rng = random.Random(5)
    try:
        for pod in (good, bad):
            for _ in range(30):
                route, ms = rng.choice(ROUTES), rng.choice(DURATIONS_MS)
                pod.span(route, ms)
                if pod is good:
                    expected.add(pod.service, route, ms)
            pod.flush()
        wait_for("the good sidecar's calls", lambda: scraped_calls(spanagg) >= expected.total())
        # The wrong token: refused, counted, failed for good (no retry keeps it queued).
        wait_for("the wrong token refused", lambda: bad.sidecar.exporter_points(bad.exporter)[1] > 0)
        time.sleep(2)
        assert_exact(expected, scraped(spanagg.scrape()[0]))
        assert good.sidecar.exporter_points(good.exporter)[1] == 0
        internal = spanagg.internal()
        assert 'spanagg_auth_failures_total{door="ingest",reason="wrong"}' in internal
        assert 'spanagg_auth_failures_total{door="ingest",reason="wrong"} 0' not in internal
        # The exporter drops it at once ("not retryable"), it does not schedule a retry.
        refused = [line for line in bad.sidecar.log if "Unauthenticated" in line]
        assert any("Dropping data" in line for line in refused), refused
        assert not any("Will retry" in line for line in refused), refused
        # Prometheus scrapes with its credentials file.
        wait_for("Prometheus scraping with its token", lambda: prom.query(f"sum({CALLS})"), timeout=30)
        up = prom.query("up")
        assert [float(r["value"][1]) for r in up] == [1.0], up
        # No token, no secret in spanagg's log.
        log = "".join(spanagg.log)
        assert not any(t in log for t in tokens.values())
    finally:
        good.close()
        bad.close()
        prom.stop()
        spanagg.stop()
