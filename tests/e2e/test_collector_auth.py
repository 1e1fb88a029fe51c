"""TLS and tokens with the real peers: a Collector sidecar running the shipped `sidecar.yaml`
with the shipped `sidecar-auth.yaml` merged on top (TLS, the bearertokenauth extension) exports
to a spanagg serving TLS with every door closed; a sidecar with the wrong token is refused as
UNAUTHENTICATED, which its exporter counts as failed and does not retry; a real Prometheus
scrapes over https with `authorization.credentials_file`."""

import random
import subprocess
import time

from conftest import Prometheus, Spanagg, free_port
from otelcol import (
    CALLS,
    DURATIONS_MS,
    ROUTES,
    Collector,
    Expected,
    Pod,
    assert_exact,
    scraped,
    scraped_calls,
    wait_for,
)


def openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def issue(dir, ca, name, san):
    """A certificate for `san`, signed by the CA at `ca` (its .crt and .key)."""
    crt, key, csr, ext = (dir / f"{name}.{x}" for x in ("crt", "key", "csr", "ext"))
    ext.write_text(f"subjectAltName={san}\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr))
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca.with_suffix(".crt")), "-CAkey", str(ca.with_suffix(".key")),
            "-CAcreateserial", "-days", "2", "-out", str(crt), "-extfile", str(ext))
    return crt, key


def test_the_collector_and_prometheus_use_their_tokens_and_a_wrong_one_is_refused_for_good(tmp_path):
    # pytest's own temporary directory: its old ones are removed, keys and tokens with them.
    secrets = tmp_path
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


def test_the_tier_takes_only_tokened_sidecars_and_reaches_the_replicas_over_tls(tmp_path):
    """The shipped overlays together: sidecar-auth.yaml to a tier running loadbalancing-auth.yaml,
    which checks the sidecars' token over TLS and sends on over TLS (by the headless Service's
    name, as pod IPs are dialled) with the token; a sidecar without the token is refused by the
    tier itself."""
    d = tmp_path
    ca = d / "ca"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
            "-keyout", str(ca.with_suffix(".key")), "-out", str(ca.with_suffix(".crt")))
    replica_crt, replica_key = issue(d, ca, "replica", "DNS:spanagg-headless.observability.svc")
    tier_crt, tier_key = issue(d, ca, "tier", "IP:127.0.0.1")
    token = d / "ingest-token"
    token.write_text("tier-and-sidecars-3e9a71\n")
    (d / "none").write_text("not-the-token\n")
    config = f"auth:\n  ingest_token_file: {token}\ntls:\n  cert_file: {replica_crt}\n  key_file: {replica_key}\n"
    replicas = [Spanagg(config) for _ in range(2)]
    for r in replicas:
        # Their certificate names the headless Service, not 127.0.0.1 (the tier must check that
        # name, as it dials pod IPs); this scrape checks the CA only.
        r.ca_file, r.check_hostname = str(ca.with_suffix(".crt")), False
    tier_port = free_port()
    overrides = {
        "extensions": {"bearertokenauth/spanagg": {"filename": str(token)}},
        "receivers": {"otlp": {"protocols": {"grpc": {
            "endpoint": f"127.0.0.1:{tier_port}",
            "tls": {"cert_file": str(tier_crt), "key_file": str(tier_key)},
        }}}},
        "exporters": {"load_balancing": {
            "protocol": {"otlp": {"tls": {"ca_file": str(ca.with_suffix(".crt"))}}},
            "resolver": {"k8s": None, "static": {"hostnames": [r.grpc for r in replicas]}},
        }},
    }
    tier = Collector("loadbalancing.yaml", overrides, name="tier", overlays=("loadbalancing-auth.yaml",))
    # Placement hashes over the replicas' random ports: 16 services all on one replica has a
    # 1-in-32768 chance (6 had 1 in 32, seen once).
    services = [f"svc{i}" for i in range(16)]
    good = Pod(f"127.0.0.1:{tier_port}", "node", 0, services=services, token_file=token, ca_file=ca.with_suffix(".crt"))
    bad = Pod(f"127.0.0.1:{tier_port}", "intruder", 0, token_file=d / "none", ca_file=ca.with_suffix(".crt"))
    expected = Expected()
    rng = random.Random(9)
    try:
        for _ in range(120):
            service, route, ms = rng.choice(services), rng.choice(ROUTES), rng.choice(DURATIONS_MS)
            good.span(route, ms, service)
            expected.add(service, route, ms)
        for _ in range(10):
            bad.span(rng.choice(ROUTES), 5)
        good.flush()
        bad.flush()
        total = lambda: sum(scraped_calls(r) for r in replicas)  # noqa: E731
        wait_for("every call on the replicas", lambda: total() >= expected.total(), timeout=60)
        wait_for("the tier refusing the intruder", lambda: bad.sidecar.exporter_points(bad.exporter)[1] > 0)
        time.sleep(2)
        parts = [scraped(r.scrape()[0]) for r in replicas]
        merged = {}
        for p in parts:
            assert not set(p) & set(merged), "a series on two replicas"
            merged.update(p)
        assert_exact(expected, merged)
        assert all(parts), "services spread over both replicas"
        assert not any("intruder" in k[0] for k in merged)
    finally:
        good.close()
        bad.close()
        tier.stop()
        for r in replicas:
            r.stop()
