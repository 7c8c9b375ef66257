"""Router autoscaling: the spec's block and its rules, the pure decision (with an explicit
clock, and properties over generated histories), its queries, the router pods' drain and
the replicas reconciliation leaves to the autoscaler."""

from __future__ import annotations

import ast
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm import autoscale
from autoglm import plan as p
from autoglm import router_scale as rs
from autoglm.k8s import builders, status
from autoglm.k8s.crd import crd
from autoglm.k8s.drain import wait_drained
from autoglm.prometheus import (
    kv_utilization_query,
    router_newest_query,
    router_pods_query,
    ttft_p90_query,
    waiting_query,
)
from autoglm.spec import AutoGLMStatus, InvalidSpec, RouterStatus, parse

ROOT = Path(__file__).resolve().parents[2]
POLICY = rs.RouterPolicy(
    autoscale.Policy(target=1.0, min_replicas=1, max_replicas=6, tolerance=0.1,
                     scale_up_limit=2, stabilization=300, stale_after=60),
    kv_cache_utilization=0.7, waiting_per_replica=4.0, ttft_p90_seconds=2.0)


def tiny(**router: Any) -> dict[str, Any]:
    doc = dict(yaml.safe_load((ROOT / "examples/tiny.yaml").read_text())["spec"])
    doc["router"] = {**doc["router"], **router}
    return doc


def start(current: int, now: float = 0.0) -> autoscale.State:
    """The state the operator starts with: the current count in the window."""
    return autoscale.State(history=((now, (current,)),))


def sample(at: float = 0.0, pods: int = 2, kv: float | None = 0.7,
           waiting: float | None = 0.0, ttft: float | None = 0.0) -> rs.RouterSample:
    return rs.RouterSample(at, pods, kv, waiting, ttft)


# -- the spec -------------------------------------------------------------------------------

def test_the_block_is_off_by_default_and_bounded() -> None:
    a = parse(tiny(), "tiny").router.autoscaling
    assert (a.enabled, a.min_replicas, a.max_replicas, a.kv_cache_utilization,
            a.waiting_per_replica, a.ttft_p90_seconds, a.stabilization_seconds,
            a.scale_up_limit) == (False, 1, 4, 0.7, None, None, 300, 2)
    on = parse(tiny(autoscaling={"enabled": True, "maxReplicas": 8, "waitingPerReplica": 2,
                                 "ttftP90Seconds": 0.5}), "tiny")
    policy = rs.policy_for(on)
    assert (policy.waiting_per_replica, policy.ttft_p90_seconds) == (2.0, 0.5)
    # the experts' tolerance and staleness, read the same way
    experts = autoscale.policy_for(on)
    assert (policy.scaling.tolerance, policy.scaling.stale_after) == (
        experts.tolerance, experts.stale_after)
    assert (policy.scaling.max_replicas, policy.scaling.target) == (8, 1.0)


@pytest.mark.parametrize(("router", "field", "message"), [
    ({"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 2}},
     "spec.router.autoscaling.maxReplicas", "maxReplicas must be at least minReplicas"),
    ({"autoscaling": {"kvCacheUtilization": 1.5}},
     "spec.router.autoscaling.kvCacheUtilization", "less than or equal to 1"),
    ({"autoscaling": {"kvCacheUtilization": 0}},
     "spec.router.autoscaling.kvCacheUtilization", "greater than 0"),
    ({"autoscaling": {"waitingPerReplica": -1}},
     "spec.router.autoscaling.waitingPerReplica", "greater than 0"),
    ({"autoscaling": {"maxReplicas": 65}}, "spec.router.autoscaling.maxReplicas", "64"),
    ({"autoscaling": {"target": 3}}, "spec.router.autoscaling.target", "unknown field"),
    ({"drainSeconds": -1}, "spec.router.drainSeconds", "greater than or equal to 0"),
])
def test_bad_blocks_name_the_field(router: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(InvalidSpec) as err:
        parse(tiny(**router), "tiny")
    assert err.value.field == field and message in err.value.message, err.value


def test_router_autoscaling_needs_prometheus_and_the_crd_says_so() -> None:
    doc = tiny(autoscaling={"enabled": True})
    del doc["autoscaling"]
    with pytest.raises(InvalidSpec, match=r"set autoscaling\.prometheusUrl") as err:
        parse(doc, "tiny")
    assert err.value.field == "spec.router.autoscaling.enabled"
    assert parse({**doc, "autoscaling": {"enabled": False, "prometheusUrl": "http://p:9090"}},
                 "tiny").router.autoscaling.enabled, "the experts may stay fixed"
    spec = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert {(r["rule"], r["fieldPath"]) for r in spec["x-kubernetes-validations"]} >= {
        ("!self.router.autoscaling.enabled || has(self.autoscaling.prometheusUrl)",
         ".router.autoscaling.enabled")}
    block = spec["properties"]["router"]["properties"]["autoscaling"]
    assert block["x-kubernetes-validations"] == [{
        "rule": "self.minReplicas <= self.maxReplicas",
        "message": "maxReplicas must be at least minReplicas", "fieldPath": ".maxReplicas"}]
    assert block["default"]["enabled"] is False


# -- the decision ---------------------------------------------------------------------------

def test_kv_cache_use_over_the_target_scales_up_at_once_within_the_limit() -> None:
    _, d = rs.decide(POLICY, sample(pods=2, kv=0.95), 2, start(2), 1)
    assert d.replicas == 3 and d.metrics_ok, "ceil(2 * 0.95 / 0.7) = 3"
    assert d.reason == "KV cache use 95% (target 70%), 0.0 waiting sequences per replica " \
                       "(target 4), TTFT p90 0.00 s (target 2 s): 2 -> 3 replicas"
    _, d = rs.decide(POLICY, sample(pods=2, kv=1.0, waiting=40), 2, start(2), 1)
    assert d.replicas == 4, "ceil(2 * 40 / 4) = 20, but +2 at most per decision"
    _, d = rs.decide(POLICY, sample(pods=5, kv=1.0, waiting=40), 5, start(5), 1)
    assert d.replicas == 6 and d.reason.endswith("5 -> 6 replicas"), "maxReplicas"
    _, d = rs.decide(POLICY, sample(pods=6, kv=1.0, waiting=40), 6, start(6), 1)
    assert d.replicas == 6 and d.reason.endswith("6 replicas (maxReplicas)")


def test_the_highest_recommendation_of_the_targets_wins() -> None:
    # KV 0.35 of 0.7 wants 1, waiting 6 of 4 wants 3, TTFT 5 s of 2 s wants 5 (limit: 4)
    for kv, waiting, ttft, want in ((0.35, 6.0, 0.0, 3), (0.35, 0.0, 3.0, 3),
                                    (0.35, 6.0, 5.0, 4), (0.9, 0.0, 0.0, 3)):
        _, d = rs.decide(POLICY, sample(kv=kv, waiting=waiting, ttft=ttft), 2, start(2), 1)
        assert d.replicas == want, (kv, waiting, ttft, d)
    # a target not given is not read (nor required)
    kv_only = rs.RouterPolicy(POLICY.scaling)
    _, d = rs.decide(kv_only, sample(kv=0.7, waiting=None, ttft=None), 2, start(2), 1)
    assert d.replicas == 2 and d.metrics_ok and d.reason == \
        "KV cache use 70% (target 70%): 2 replicas, within tolerance"


def test_within_tolerance_nothing_moves() -> None:
    for kv in (0.64, 0.76):  # 0.7 +- 10 %
        _, d = rs.decide(POLICY, sample(kv=kv), 2, start(2), 1)
        assert d.replicas == 2, kv
    _, d = rs.decide(POLICY, sample(kv=0.78), 2, start(2), 1)
    assert d.replicas == 3


def test_scale_down_waits_for_the_stabilization_window() -> None:
    s, d = rs.decide(POLICY, sample(at=0, pods=4, kv=0.1), 4, start(4), 0)
    assert d.replicas == 4 and "1 wanted, the scale-down waits for the 300 s" in d.reason
    s, d = rs.decide(POLICY, sample(at=100, pods=4, kv=0.5), 4, s, 100)  # wants 3
    s, d = rs.decide(POLICY, sample(at=301, pods=4, kv=0.1), 4, s, 301)
    assert d.replicas == 3, "the recommendation of 3 at 100 s is still in the window"
    assert d.reason.endswith("4 -> 3 replicas (every recommendation of the last 300 s at "
                             "most 3)")
    s, d = rs.decide(POLICY, sample(at=401, pods=3, kv=0.1), 3, s, 401)
    assert d.replicas == 1


def test_missing_or_stale_metrics_hold_within_the_bounds_and_say_which() -> None:
    for smp, now, why in (
            (None, 0, "no router metrics: holding 3 router replicas"),
            (sample(kv=None), 0, "no KV cache use from the slot's routers"),
            (sample(waiting=None, ttft=float("nan")), 0,
             "no waiting sequences, TTFT p90 from the slot's routers"),
            (sample(pods=0), 0, "no KV cache use, waiting sequences, TTFT p90"),
            (sample(at=0, kv=0.1), 61, "router metrics stale for 61 s")):
        s, d = rs.decide(POLICY, smp, 3, start(3), now)
        assert (d.replicas, d.metrics_ok) == (3, False) and why in d.reason, d
        assert s == start(3), "nothing enters the window"
    _, d = rs.decide(POLICY, None, 9, start(9), 0)
    assert d.replicas == 6 and d.reason == "no router metrics: holding 6 router replicas"
    _, d = rs.decide(POLICY, sample(kv=None), 0, start(0), 0)
    assert d.replicas == 1, "within minReplicas"


def test_pods_not_reporting_yet_are_idle_up_and_at_the_target_down() -> None:
    # scaled to 4, two report at 0.95: the two starting are not asked for again (HPA)
    _, d = rs.decide(POLICY, sample(pods=2, kv=0.95), 4, start(4), 1)
    assert d.replicas == 4 and "2 reporting" in d.reason
    # idle where they report; the silent ones count as at the target: they stay
    _, d = rs.decide(POLICY, sample(pods=2, kv=0.0), 4, start(4, -1000), 1)
    assert d.replicas == 2, "ceil(0 + 2 silent at the target)"
    _, d = rs.decide(POLICY, sample(pods=1, kv=0.0), 4, start(4, -1000), 1)
    assert d.replicas == 3, "ceil(0 + 3 silent at the target)"


def test_initial_replicas_keep_the_bounds() -> None:
    assert rs.initial_replicas(parse(tiny(replicas=9), "tiny")) == 9, "not autoscaled"
    on = {"enabled": True, "minReplicas": 2, "maxReplicas": 4}
    assert rs.initial_replicas(parse(tiny(replicas=9, autoscaling=on), "tiny")) == 4
    assert rs.initial_replicas(parse(tiny(replicas=1, autoscaling=on), "tiny")) == 2


def mostly(value: st.SearchStrategy[Any], rarely: st.SearchStrategy[Any],
           ) -> st.SearchStrategy[Any]:
    return st.one_of(value, value, value, value, rarely)


steps = st.lists(st.tuples(
    st.floats(0, 80),  # seconds to the next decision
    mostly(st.builds(
        rs.RouterSample, at=st.just(0.0), pods=mostly(st.integers(1, 8), st.just(0)),
        kv_cache_utilization=mostly(st.floats(0, 1), st.none()),
        waiting_per_replica=mostly(st.floats(0, 50), st.none()),
        ttft_p90_seconds=mostly(st.floats(0, 30), st.none() | st.just(float("nan")))),
        st.none()),
    mostly(st.floats(0, 30), st.floats(0, 120))),  # the sample's age
    min_size=1, max_size=25)


@settings(max_examples=300, deadline=None)
@given(lo=st.integers(1, 4), extra=st.integers(0, 4), first=st.integers(0, 12),
       stabilization=st.sampled_from([0.0, 30.0, 300.0]), history=steps)
def test_properties(lo: int, extra: int, first: int, stabilization: float,
                    history: list[tuple[float, rs.RouterSample | None, float]]) -> None:
    """Always within the bounds; missing metrics change nothing but to bring the replicas
    within the bounds; no scale-down within a window of the start, nor below what a
    scale-up asked for within a window of it."""
    policy = rs.RouterPolicy(
        autoscale.Policy(target=1.0, min_replicas=lo, max_replicas=lo + extra,
                         scale_up_limit=2, stabilization=stabilization, stale_after=60),
        0.7, 4.0, 2.0)
    now, current, state = 0.0, first, start(first)
    ups: list[tuple[float, int]] = []  # (time, replicas) of each scale-up
    for dt, smp, age in history:
        now += dt
        if smp is not None:
            smp = rs.RouterSample(now - age, smp.pods, smp.kv_cache_utilization,
                                  smp.waiting_per_replica, smp.ttft_p90_seconds)
        state, d = rs.decide(policy, smp, current, state, now)
        bounded = min(max(current, lo), lo + extra)
        assert lo <= d.replicas <= lo + extra
        if not d.metrics_ok:
            assert d.replicas == bounded and "holding" in d.reason
        if d.replicas < bounded:
            assert now >= stabilization, "no scale-down within a window of the start"
            assert all(d.replicas >= n for t, n in ups if now - t < stabilization), ups
        if d.replicas > current:
            ups.append((now, d.replicas))
        current = d.replicas


def test_the_decision_is_pure_core() -> None:
    """It imports only the pure core (whose own imports test_core_imports checks)."""
    tree = ast.parse(Path(rs.__file__).read_text())
    found = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    found |= {f"{n.module}.{a.name}" if n.module == "autoglm" else str(n.module)
              for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert found == {"__future__", "math", "dataclasses", "typing", "autoglm.autoscale",
                     "autoglm.spec"}, found


# -- the queries ----------------------------------------------------------------------------

def test_router_queries_read_the_slots_routers() -> None:
    router = {"deployment": "tiny", "namespace": "ns", "component": "router", "slot": "a"}
    sel = '{component="router",deployment="tiny",namespace="ns",slot="a"}'
    assert kv_utilization_query(router) == (f"sum(autoglm_kv_cache_used_tokens{sel}) / "
                                            f"sum(autoglm_kv_cache_capacity_tokens{sel})")
    assert waiting_query(router) == f"avg(autoglm_generate_waiting{sel})"
    assert ttft_p90_query(router, 30) == (
        f"histogram_quantile(0.9, sum by (le) (rate("
        f"autoglm_time_to_first_token_seconds_bucket{sel}[30s])))")
    assert router_pods_query(router) == f"count(autoglm_kv_cache_capacity_tokens{sel})"
    assert router_newest_query(router) == \
        f"max(timestamp(autoglm_kv_cache_capacity_tokens{sel}))"


# -- the router pods and their replicas -----------------------------------------------------

def objects(spec: Any) -> dict[str, Any]:
    topo = p.plan("tiny", spec, p.RoutingState())
    return {o["metadata"]["name"]: o for o in builders.desired_objects(
        "tiny", "ns", "uid", spec, topo, False) if o["kind"] == "Deployment"}


def test_router_pods_drain_before_they_go() -> None:
    deps = objects(parse(tiny(drainSeconds=200), "tiny"))
    pod = deps["tiny-a-router"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/models/router/versions/1/ready"
    assert c["lifecycle"]["preStop"]["exec"]["command"] == [
        "python", "-m", "autoglm.k8s.drain", "--timeout=200",
        "--url=http://127.0.0.1:8002/metrics"]
    assert pod["terminationGracePeriodSeconds"] == 200 + builders.ROUTER_STOP_SECONDS
    expert = deps["tiny-a-experts-0"]["spec"]["template"]["spec"]
    assert "lifecycle" not in expert["containers"][0]
    assert expert["terminationGracePeriodSeconds"] == builders.GRACE_SECONDS
    none = objects(parse(tiny(drainSeconds=0), "tiny"))["tiny-a-router"]
    assert "lifecycle" not in none["spec"]["template"]["spec"]["containers"][0]


def test_reconciliation_leaves_router_replicas_to_the_autoscaler() -> None:
    fixed = parse(tiny(replicas=2), "tiny")
    on = parse(tiny(replicas=2, autoscaling={"enabled": True, "maxReplicas": 5}), "tiny")

    def replicas(spec: Any, live: dict[str, int], routing: p.RoutingState | None = None,
                 ) -> dict[str, int]:
        topo = p.plan("tiny", spec, routing or p.RoutingState())
        desired = builders.desired_objects("tiny", "ns", "uid", spec, topo, False)
        deployments = {n: {"spec": {"replicas": r}} for n, r in live.items()}
        return {o["metadata"]["name"]: o["spec"]["replicas"]
                for o in builders.router_replicas(spec, topo, desired, deployments)
                if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("router")}

    assert replicas(fixed, {"tiny-a-router": 4}) == {"tiny-a-router": 2}, "the spec's"
    assert replicas(on, {}) == {"tiny-a-router": 2}, "the initial count"
    assert replicas(on, {"tiny-a-router": 4}) == {"tiny-a-router": 4}, "the autoscaler's"
    assert replicas(on, {"tiny-a-router": 9}) == {"tiny-a-router": 5}, "within the bounds"
    # a standby being staged starts at the serving slot's count
    staging = p.RoutingState("a", {"a": p.SlotState(1), "b": p.SlotState(2)})
    assert replicas(on, {"tiny-a-router": 4}, staging) == {"tiny-a-router": 4,
                                                           "tiny-b-router": 4}


def test_reconciled_status_keeps_the_router_autoscalers() -> None:
    spec = parse(tiny(), "tiny")
    topo = p.plan("tiny", spec, p.RoutingState())
    router = RouterStatus(slot="a", replicas=2, desired_replicas=3, metrics_available=True)
    st = status.observed_status(AutoGLMStatus(router=router), 1, topo, {}, "tiny", 1, None,
                                "t0")
    assert st.router == router


# -- the drain ------------------------------------------------------------------------------

@pytest.fixture
def router_metrics() -> Iterator[tuple[str, list[int]]]:
    """A real HTTP server answering as a router's metrics: running, then waiting, from a
    list (its last value repeated)."""
    busy: list[int] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            n = busy.pop(0) if len(busy) > 1 else busy[0]
            body = ("# TYPE autoglm_generate_running gauge\n"
                    f'autoglm_generate_running{{version="1"}} {n}\n'
                    "# TYPE autoglm_generate_waiting gauge\n"
                    f'autoglm_generate_waiting{{version="1"}} {n % 2}\n').encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics", busy
    finally:
        server.shutdown()
        server.server_close()


def test_the_drain_waits_for_the_generations_to_end(
        router_metrics: tuple[str, list[int]]) -> None:
    url, busy = router_metrics
    clock = iter(range(1000))

    def tick() -> float:  # a second a call: the deadline counts reads, not wall time
        return float(next(clock))

    def wait(url: str, timeout: float) -> tuple[bool, str]:
        return wait_drained(url, timeout, settle=0, poll=1, clock=tick,
                            sleep=lambda _: None)

    busy[:] = [3, 1, 0, 2, 0, 0]  # running (waiting: odd counts); an idle read is not enough
    assert wait(url, 100) == (True, "no generation running or waiting")
    assert busy == [0], "read until idle twice in a row"
    busy[:] = [1]
    assert wait(url, 5) == (False, "2 generations still running or waiting after 5 s")
    dead = url.rsplit(":", 1)[0] + ":1/metrics"
    assert wait(dead, 100) == (True, f"metrics at {dead} do not answer: nothing left to "
                                     "finish")
