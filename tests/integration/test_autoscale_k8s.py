"""Per-expert and router autoscaling by the operator on the real control plane, from a real
Prometheus scraping a real Triton router under load.

The router and its experts run on this machine (kwok runs no containers); Prometheus scrapes
them with the labels the PodMonitor gives pods in a cluster (deployment, namespace,
component, slot, version), so the operator's queries are the ones it runs in production.
"""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient

from autoglm.autoscale import rate_window
from autoglm.gateway.app import GatewayServer, Routing, Target
from autoglm.k8s.rollout import epoch, server_experts
from autoglm.k8s.scaling import SCRAPE_SECONDS
from autoglm.k8s.status import retiring
from autoglm.local.dataplane import DataPlane
from autoglm.local.prometheus_server import PrometheusServer
from autoglm.models.tiny import PRESETS
from autoglm.procs import free_port
from autoglm.prometheus import Prometheus
from autoglm.repository import build
from autoglm.spec import parse
from autoglm.testing import eventually, metric_value
from autoglm.testing.cluster import Cluster, tiny
from autoglm.testing.controlplane import ControlPlane
from autoglm.testing.operator import OperatorProcess, running_operator

pytestmark = [pytest.mark.k8s, pytest.mark.triton, pytest.mark.prometheus]
MODEL = replace(PRESETS["tiny"], num_experts=2, top_k=1)
STABILIZATION = 20
INTERVAL = 2
TARGET = 100  # tokens/s per replica


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataPlane]:
    repo = tmp_path_factory.mktemp("repo")
    build(repo, "tiny-moe", 1, MODEL)
    dp = DataPlane(repo, 1, tmp_path_factory.mktemp("plane"))
    dp.start(1)
    try:
        yield dp
    finally:
        dp.stop()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    prom = PrometheusServer(tmp_path_factory.mktemp("prometheus"), free_port()).start()
    try:
        yield prom
    finally:
        prom.stop()


@pytest.fixture(scope="module")
def gateway(plane: DataPlane) -> Iterator[GatewayServer]:
    """The gateway in front of slot a, as the operator's drain sees it through Prometheus."""
    assert plane.router is not None
    routing = Routing()
    routing.flip(Target("a", 1, f"http://{plane.router.http_url}"))
    server = GatewayServer(routing, free_port()).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def operator(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory,
             ) -> Iterator[OperatorProcess]:
    with running_operator(control_plane, tmp_path_factory.mktemp("operator")) as op:
        yield op


class Load:
    """Requests to the router from ``clients`` keep-alive connections until stopped."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.stop = threading.Event()
        self.failed = 0
        self.threads = [threading.Thread(target=self._run, args=(url, i)) for i in range(clients)]

    def _run(self, url: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpclient.InferenceServerClient(url) as c:
            while not self.stop.is_set():
                ids = rng.integers(0, MODEL.vocab_size, (1, 16)).astype(np.int64)
                inp = httpclient.InferInput("INPUT_IDS", list(ids.shape), "INT64")
                inp.set_data_from_numpy(ids)
                try:
                    c.infer("router", [inp])
                except Exception:
                    self.failed += 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def test_experts_follow_their_load_hold_without_metrics_and_scale_down_after_stabilization(
        control_plane: ControlPlane, operator: OperatorProcess, namespace: str,
        plane: DataPlane, prometheus: PrometheusServer, gateway: GatewayServer) -> None:
    cluster = Cluster(control_plane, namespace)
    assert plane.router is not None
    base = {"deployment": "m", "namespace": namespace, "slot": "a", "version": "1"}
    prometheus.set_targets([
        ({"deployment": "m", "namespace": namespace, "component": "gateway"},
         [f"127.0.0.1:{gateway.port}"]),
        ({**base, "component": "router"}, [f"127.0.0.1:{plane.router.metrics_port}"]),
        ({**base, "component": "expert"},
         [f"127.0.0.1:{s.metrics_port}" for ss in plane.experts.values() for s in ss])])
    obj = tiny("m", model__numExperts=2, model__topK=1,
               experts__minReplicas=1, experts__maxReplicas=3, experts__replicaBudget=5)
    obj["spec"]["autoscaling"] = {"prometheusUrl": prometheus.url, "target": TARGET,
                                  "intervalSeconds": INTERVAL,
                                  "stabilizationSeconds": STABILIZATION}
    lag = rate_window(parse(obj["spec"], "m"), SCRAPE_SECONDS)
    cluster.apply(obj)
    cluster.wait_ready("m")

    def autoscaling() -> dict[str, Any]:
        return dict(cluster.resource("m")["status"].get("autoscaling") or {})

    def next_decision() -> None:
        """Until the autoscaler has made another decision (its status's lastDecision)."""
        last = autoscaling().get("lastDecision")
        eventually(lambda: autoscaling().get("lastDecision") != last,
                   "the autoscaler's next decision", 30)

    def servers() -> dict[str, tuple[frozenset[int], bool]]:
        """The expert servers' Deployments: what each holds, and whether it retires."""
        out = {}
        for d in cluster.get("deployments", None)["items"]:
            name = d["metadata"]["name"]
            if name.startswith("m-a-experts-"):
                held = server_experts(d)
                assert held is not None, name
                out[name] = (held, retiring(d))
        return out

    def replicas() -> list[int]:
        """Per expert: the servers holding it that serve on."""
        serving = [held for held, retiring in servers().values() if not retiring]
        return [sum(e in held for held in serving) for e in range(2)]

    def decided(enough: Callable[[list[dict[str, Any]]], bool]) -> dict[str, Any] | None:
        st = autoscaling()
        return st if enough(st.get("experts") or []) else None

    eventually(lambda: autoscaling().get("metricsAvailable"), "metrics to be available")
    assert (cluster.condition("m", "MetricsAvailable") or {}).get("status") == "True"
    assert replicas() == [1, 1], "no load: the minimum"

    selector = {"deployment": "m", "namespace": namespace}
    with Load(f"127.0.0.1:{gateway.port}") as load:
        t0 = time.monotonic()
        eventually(lambda: max(replicas()) > 1, "an expert under load to scale up", 60)
        print(f"\nload start -> first expert Deployment scaled: {time.monotonic() - t0:.1f} s")
        st = autoscaling()
        assert all(e["load"] > 0 for e in st["experts"]) and st["imbalance"] is not None, st
        assert sum(e["desired"] for e in st["experts"]) <= 5, "within the replica budget"
        assert any(ev["reason"] == "Scaled" for ev in cluster.events("m"))
        # what a drain waits on: the gateways' in-flight requests per slot, scraped after
        # the moment asked about (4 clients keep at most 4 in flight)
        with Prometheus(prometheus.url) as prom:
            since = time.time()
            def fresh() -> tuple[int] | None:
                n = prom.gateway_inflight(selector, "a", since)
                return None if n is None else (n,)
            (inflight,) = eventually(fresh, "a fresh in-flight count", 30)
            assert 0 <= inflight <= 4
            assert prom.gateway_inflight(selector, "a", float("inf")) is None, "none newer"
        metrics = urllib.request.urlopen(
            f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5).read().decode()
        ours = {"namespace": namespace, "deployment": "m"}
        assert metric_value(metrics, "autoglm_autoscaler_desired_replicas",
                            {**ours, "expert": "0"}) is not None
        assert metric_value(metrics, "autoglm_autoscaler_metrics_available", ours) == 1

        # Prometheus gone: replicas held (not scaled down, whatever the window), reason shown
        prometheus.stop()
        eventually(lambda: autoscaling().get("metricsAvailable") is False,
                   "MetricsAvailable=False", 30)
        scaled = replicas()
        assert sum(scaled) > 2
        cond = cluster.condition("m", "MetricsAvailable") or {}
        assert cond.get("status") == "False" and "unreachable" in cond.get("message", ""), cond
        assert any(ev["reason"] == "MetricsUnavailable" for ev in cluster.events("m"))
        # held at every decision for more decisions than the stabilization window plus the
        # rate window the signal lags by take
        for _ in range(math.ceil((STABILIZATION + lag) / INTERVAL) + 2):
            next_decision()
            assert replicas() == scaled, "replicas held without metrics"
        prometheus.start()
        eventually(lambda: autoscaling().get("metricsAvailable"), "metrics back", 60)
        # The premise of the window check below: every expert above the minimum is, at a
        # decision, recommended where it is (its load over the target), so each expert's
        # window starts only once its own load shows gone. (Right after the restart the
        # rate rests on few samples; an expert held above the minimum while its load was
        # under the target, by such a sample or by a lookahead, would have its window
        # start before the load stops.)
        eventually(lambda: decided(lambda es: bool(es) and all(
            e["desired"] <= 1 or (e.get("load") or 0) > TARGET for e in es)),
            "every expert above the minimum to be loaded over the target",
            STABILIZATION + lag + 60)
        assert load.failed == 0

    # no more load: down to the minimum, but only once the stabilization window has passed.
    # An expert's window counts from when the signal shows its own load gone (the rate over
    # `lag` seconds still shows it before): from then on its every recommendation is the
    # minimum. The decisions' own times (the operator's clock), not this test's.
    t1 = time.monotonic()
    loaded = replicas()
    first_low: dict[int, float] = {}

    def scaled_down() -> dict[str, Any] | None:
        st = autoscaling()
        es = st.get("experts") or []
        for e in es:
            if (e.get("load") or 0) < TARGET:
                first_low.setdefault(e["expert"], epoch(st["lastDecision"]))
        return st if es and sum(e["desired"] for e in es) < sum(loaded) else None

    # (placement may still move a replica between experts; only the total counts)
    down = eventually(scaled_down, "the autoscaler to scale down", lag + 150)
    print(f"load stop -> scaled down: {time.monotonic() - t1:.1f} s (rate window "
          f"{lag:.0f} s, stabilization {STABILIZATION} s)")
    # whichever expert went down, its load showed gone no earlier than the first one's
    quiet = min((first_low[e] for e in range(len(loaded)) if loaded[e] > 1 and e in first_low),
                default=None)
    assert quiet is not None, f"no expert above the minimum showed its load gone: {down}"
    assert epoch(down["lastDecision"]) - quiet \
        >= STABILIZATION - 2 * INTERVAL, "no scale-down within the stabilization window"
    eventually(lambda: replicas() == [1, 1], "the experts to scale back down", 120)
    # and the servers no longer needed go, once the one left serves every expert
    eventually(lambda: list(servers().values()) == [(frozenset({0, 1}), False)],
               "the retired expert servers to be deleted", 120)
    assert any(ev["reason"] == "Placed" for ev in cluster.events("m"))
    with Prometheus(prometheus.url) as prom:
        assert prom.gateway_inflight(selector, "a", t1) == 0, "drained"
    print(f"load stop -> back to the minimum: {time.monotonic() - t1:.1f} s")


class Generations:
    """Generations streamed from the router's Triton, back to back on ``clients``
    connections, until stopped: its KV cache holds their sequences meanwhile."""

    def __init__(self, url: str, clients: int = 2) -> None:
        self.url, self.stop, self.failed, self.done = url, threading.Event(), 0, 0
        self.threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self) -> None:
        body = json.dumps({"text_input": "Once upon a time",
                           "parameters": {"max_tokens": 64, "ignore_eos": True}}).encode()
        while not self.stop.is_set():
            req = urllib.request.Request(f"{self.url}/v2/models/generate/generate_stream",
                                         body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    r.read()
                self.done += 1
            except OSError:
                self.failed += 1

    def __enter__(self) -> Generations:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


ROUTER_STABILIZATION = 6


def test_router_replicas_follow_kv_cache_use_and_scale_down_after_stabilization(
        control_plane: ControlPlane, operator: OperatorProcess, namespace: str,
        plane: DataPlane, prometheus: PrometheusServer) -> None:
    """The routers' KV cache in use over the target: the router Deployment scales up at the
    next decision, reconciliation leaves the autoscaler's replicas alone, and without load
    it scales down once its stabilization window has passed since the scale-up."""
    cluster = Cluster(control_plane, namespace)
    assert plane.router is not None
    prometheus.set_targets([
        ({"deployment": "r", "namespace": namespace, "component": "router", "slot": "a",
          "version": "1"}, [f"127.0.0.1:{plane.router.metrics_port}"])])
    obj = tiny("r", model__numExperts=2, model__topK=1)
    # the experts stay as they are: only the routers scale, from the same Prometheus
    obj["spec"]["autoscaling"] = {"enabled": False, "prometheusUrl": prometheus.url,
                                  "intervalSeconds": 1}
    # any sequence running is far over the target (a tiny cache use)
    obj["spec"]["router"] = {"replicas": 1, "autoscaling": {
        "enabled": True, "minReplicas": 1, "maxReplicas": 2, "kvCacheUtilization": 0.0001,
        "stabilizationSeconds": ROUTER_STABILIZATION}}
    cluster.apply(obj)
    cluster.wait_ready("r")

    def router() -> dict[str, Any]:
        return dict(cluster.resource("r")["status"].get("router") or {})

    def replicas() -> int:
        return int(cluster.get("deployments", "r-a-router")["spec"]["replicas"])

    eventually(lambda: router().get("metricsAvailable"), "the router metrics", 60)
    assert (cluster.condition("r", "RouterMetricsAvailable") or {}).get("status") == "True"
    assert replicas() == 1 and router()["desiredReplicas"] == 1, router()
    with Generations(f"http://{plane.router.http_url}") as load:
        eventually(lambda: replicas() == 2, "the routers to scale up", 60)
        up = router()
        assert up["desiredReplicas"] == 2 and "1 -> 2 replicas" in up["reason"], up
        scaled = [e for e in cluster.events("r") if e["reason"] == "RouterScaled"]
        assert scaled and "r-a-router: KV cache use" in scaled[0]["message"], scaled
        # a spec change reconciles: the autoscaler's replicas stay (spec.router.replicas: 1)
        cluster.kubectl("patch", "autoglmdeployment", "r", "--type=merge", "-p",
                        json.dumps({"spec": {"rollout": {"drainTimeoutSeconds": 5}}}))
        cluster.wait_ready("r")
        assert replicas() == 2, "reconciliation reset the router replicas"
        assert load.done > 0
    assert load.failed == 0
    down = eventually(lambda: (st := router()).get("desiredReplicas") == 1 and st,
                      "the routers to scale down", ROUTER_STABILIZATION + 60)
    assert replicas() == 1
    # the scale-up's recommendation stays in the window: the operator's own times
    assert epoch(down["lastScaleTime"]) - epoch(up["lastScaleTime"]) \
        >= ROUTER_STABILIZATION, "no scale-down within the stabilization window"
