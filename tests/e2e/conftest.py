"""Fixtures that run the real spanagg binary and a real Prometheus on loopback."""

import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("SPANAGG_BIN", str(ROOT / "target" / "debug" / "spanagg"))


def http_get(url, headers=None, timeout=10, context=None):
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
        return r.status, r.headers, r.read()


class Spanagg:
    """One spanagg process on ephemeral ports."""

    def __init__(self, extra_yaml="", dir=None, ports=(0, 0, 0)):
        """`dir` restarts on an earlier run's state; fixed `ports` keep scrape targets stable."""
        self.dir = dir or tempfile.mkdtemp(prefix="spanagg-e2e-")
        self.extra_yaml, self.ports = extra_yaml, ports
        cfg = pathlib.Path(self.dir) / "spanagg.yaml"
        grpc, otlp, http = ports
        cfg.write_text(
            f"grpc_listen: 127.0.0.1:{grpc}\notlp_http_listen: 127.0.0.1:{otlp}\n"
            f"http_listen: 127.0.0.1:{http}\ndata_dir: {self.dir}/data\n{extra_yaml}"
        )
        self.proc = subprocess.Popen(
            [BIN, "serve", "--config", str(cfg)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "RUST_LOG": "info"},
        )
        self.log = []
        ready = threading.Event()

        def pump():
            for line in self.proc.stderr:
                self.log.append(line)
                m = re.search(r"OTLP/gRPC on (\S+), OTLP/HTTP on (\S+) .*, HTTP on (\S+) ", line)
                if m:
                    self.grpc, self.otlp_http, self.http = m.groups()
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(30):
            self.proc.kill()
            raise RuntimeError("spanagg did not start: " + "".join(self.log))

    # With auth.scrape_token_file set: the token scrape() and internal() send.
    scrape_token = None
    # With tls set: the CA file that scrape() and internal() trust (they then use https), and
    # whether the certificate must name the address dialled (not when it names a Service).
    ca_file = None
    check_hostname = True

    def _get(self, path, headers=None):
        headers = dict(headers or {})
        if self.scrape_token:
            headers["Authorization"] = f"Bearer {self.scrape_token}"
        if self.ca_file:
            import ssl

            context = ssl.create_default_context(cafile=self.ca_file)
            context.check_hostname = self.check_hostname
            return http_get(f"https://{self.http}{path}", headers, context=context)
        return http_get(f"http://{self.http}{path}", headers)

    def scrape(self, accept=None):
        status, hdrs, body = self._get("/metrics", {"Accept": accept} if accept else {})
        assert status == 200
        return body.decode(), hdrs

    def internal(self):
        return self._get("/internal/metrics")[2].decode()

    def stop(self, keep=False):
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        return code

    def restart(self, kill=False):
        """Stops (SIGTERM, or SIGKILL with `kill`) and starts again on the same state and ports."""
        if kill:
            self.proc.kill()
            self.proc.wait(30)
        else:
            assert self.stop(keep=True) == 0, "".join(self.log)
        return Spanagg(self.extra_yaml, dir=self.dir, ports=self.ports)


@pytest.fixture
def spanagg():
    s = Spanagg()
    yield s
    if s.proc.poll() is None:
        assert s.stop() == 0, "".join(s.log)


def _ephemeral_range():
    try:
        lo, hi = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


# Ports handed out in this session: a port is not bound until its server starts, so a later
# pick must not land on it meanwhile.
_GIVEN = set()


def free_port():
    """A port free now, never handed out before in this session, chosen below the kernel's
    ephemeral range. A port from bind(0) is an ephemeral one: before the server binds it, an
    outgoing connection (a Collector dialing spanagg) may take it as its source port, or a later
    bind(0) may return it again, and the server then fails with "address already in use"."""
    lo, _ = _ephemeral_range()
    for _ in range(1000):
        port = random.randrange(max(1024, lo - 12000), lo)
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


class Prometheus:
    """A real Prometheus server (Debian's package) scraping one target every second."""

    def __init__(self, target, internal=False, rule_files=(), credentials_file=None, ca_file=None):
        """`target`: one address, or a list of them (replicas scraped as one job);
        `credentials_file`: a bearer token for the scrape (`authorization`); `ca_file`: scrape
        over https, trusting this CA."""
        targets = [target] if isinstance(target, str) else list(target)
        self.dir = tempfile.mkdtemp(prefix="spanagg-prom-")
        self.port = free_port()
        cfg = pathlib.Path(self.dir) / "prometheus.yml"
        text = "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        if rule_files:
            text += "rule_files:\n" + "".join(f"  - {f}\n" for f in rule_files)
        text += (
            "scrape_configs:\n  - job_name: spanagg\n    static_configs:\n"
            f"      - targets: {targets!r}\n"
        )
        if credentials_file:
            text += f"    authorization:\n      credentials_file: {credentials_file}\n"
        if ca_file:
            text += f"    scheme: https\n    tls_config:\n      ca_file: {ca_file}\n"
        if internal:
            # spanagg's own telemetry, as the alerts and the dashboard expect it.
            text += (
                "  - job_name: spanagg-internal\n    metrics_path: /internal/metrics\n"
                f"    static_configs:\n      - targets: ['{target}']\n"
            )
        cfg.write_text(text)
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed (the test command installs it)")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={self.dir}/tsdb",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if http_get(f"http://127.0.0.1:{self.port}/-/ready")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("prometheus did not become ready")

    def get(self, path):
        import json

        body = json.loads(http_get(f"http://127.0.0.1:{self.port}{path}")[2])
        assert body["status"] == "success", body
        return body

    def query(self, promql):
        import urllib.parse

        return self.get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))["data"]["result"]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)
