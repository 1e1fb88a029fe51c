"""Scale-out as users run it: sidecars export to a Collector tier running the shipped
`deploy/collector/loadbalancing.yaml` (`routing_key: service`), which spreads services over three
spanagg replicas; a real Prometheus scrapes all three. Every output series lives on exactly one
replica and PromQL sums across replicas equal the spans sent. Then the tier is rolled to four
replicas (a new resolver list, the tier restarted, as a rollout does): the services that move
start over on their new replica, and the sums across replicas stay exact."""

import random
import time

from conftest import Prometheus, Spanagg, free_port
from otelcol import CALLS, Collector, Expected, Pod, Traffic, assert_exact, scraped, send, wait_for

# 48 services on 4 pods' sidecars, each service on two pods: with routing by service, adding a
# fourth replica moves about a quarter of them: none move with probability (3/4)^48 ≈ 1e-6 on an
# even hash ring. The ring is uneven (a hundred positions per replica, placed by hash), and with
# 24 services a CI run once saw none of them land on the new replica.
SERVICES = [f"svc{i:02}" for i in range(48)]
PODS = [[s for j, s in enumerate(SERVICES) if j % 2 == p % 2] for p in range(4)]


def tier(receiver_port, replicas):
    """The tier Collector in front of `replicas`, listening where the sidecars send."""
    overrides = {
        "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{receiver_port}"}}}},
        # The shipped config finds replicas through the Kubernetes API; here they are listed.
        "exporters": {
            "load_balancing": {"resolver": {"k8s": None, "static": {"hostnames": [r.grpc for r in replicas]}}}
        },
    }
    return Collector("loadbalancing.yaml", overrides, name="tier")


def per_replica(replicas):
    return [scraped(r.scrape()[0]) for r in replicas]


def summed(parts):
    """Calls and buckets added up across replicas, per series key."""
    out = {}
    for part in parts:
        for key, e in part.items():
            o = out.setdefault(key, {"calls": 0, "count": 0, "buckets": {}})
            o["calls"] += e["calls"] or 0
            o["count"] += e["count"] or 0
            for le, n in e["buckets"].items():
                o["buckets"][le] = o["buckets"].get(le, 0) + n
    return out


def total_calls(replicas):
    return sum(e["calls"] or 0 for part in per_replica(replicas) for e in part.values())


def test_services_spread_over_replicas_and_sums_stay_exact_across_a_rollout():
    seed = random.randrange(1 << 30)
    print(f"workload seed {seed}")
    rng = random.Random(seed)
    replicas = [Spanagg() for _ in range(3)]
    # The fourth replica's ports are chosen now, so Prometheus scrapes it from the start (a
    # target that is down until the rollout brings it up).
    fourth = (free_port(), free_port(), free_port())
    tier_port = free_port()
    lb = tier(tier_port, replicas)
    pods = [Pod(f"127.0.0.1:{tier_port}", f"node{p}", 0, services=PODS[p]) for p in range(4)]
    prom = Prometheus([r.http for r in replicas] + [f"127.0.0.1:{fourth[2]}"])
    expected = Expected()
    try:
        send(pods, expected, rng, 300)
        wait_for("every call on the replicas", lambda: total_calls(replicas) >= expected.total(), timeout=90)
        time.sleep(3)
        parts = per_replica(replicas)
        # Each output series on exactly one replica, and each service's series all on one.
        home = {}
        for i, part in enumerate(parts):
            for key in part:
                assert home.setdefault(key[0], i) == i, f"{key[0]} on replicas {home[key[0]]} and {i}"
        assert sum(len(p) for p in parts) == len(summed(parts)), "a series on two replicas"
        assert len({i for i in home.values()}) >= 2, f"services did not spread: {home}"
        assert_exact(expected, summed(parts))
        print(f"{len(home)} services over 3 replicas: {[sum(1 for v in home.values() if v == i) for i in range(3)]}")

        # PromQL over all replicas answers the totals.
        def promql():
            by_service = {}
            for (service, *_), s in expected.series.items():
                by_service[service] = by_service.get(service, 0) + s["calls"]
            res = prom.query(f"sum by (service_name) ({CALLS})")
            got = {r["metric"]["service_name"]: float(r["value"][1]) for r in res}
            return got == by_service or got

        assert wait_for("PromQL sums across replicas", lambda: promql() is True, timeout=30)

        # The rollout, under traffic: a fourth replica, the tier stopped (it drains its queues
        # to the old replicas) and started with the new list; the sidecars retry meanwhile.
        replicas.append(Spanagg(ports=fourth))
        with Traffic(pods, expected, rng, 20):
            time.sleep(2)
            lb.stop()
            lb = tier(tier_port, replicas)
            time.sleep(3)
        wait_for("every call after the rollout", lambda: total_calls(replicas) >= expected.total(), timeout=120)
        time.sleep(3)
        parts = per_replica(replicas)
        assert_exact(expected, summed(parts))
        moved = {key[0] for key in parts[3]}
        print(f"{len(moved)} services moved to the new replica: {sorted(moved)}")
        assert moved, "no service moved to the fourth replica"
        # A moved service's old series stay on its old replica (frozen until series_ttl) and its
        # new ones start from zero on the new one: the sum of both is exact.
        for key in parts[3]:
            assert any(key in p for p in parts[:3]), f"{key} moved but has no old series"
        # And PromQL over the four, old and new series of the moved services together.
        assert wait_for("PromQL sums across four replicas", lambda: promql() is True, timeout=30)
    finally:
        for pod in pods:
            pod.close()
        lb.stop()
        prom.stop()
        for r in replicas:
            r.stop()
