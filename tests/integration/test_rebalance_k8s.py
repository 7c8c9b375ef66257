"""Live rebalancing by the operator on the real control plane: the load comes from a real
Triton router and its expert servers on this machine (kwok runs no containers), Prometheus
scrapes them, and the operator, running outside the cluster, reaches the expert servers
through the addresses file (``AUTOGLM_SERVICE_ADDRESSES``: Deployment -> its pods) and moves
experts between them over Triton's HTTP API while they serve.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from autoglm.gateway.app import GatewayServer, Routing, Target
from autoglm.k8s.rollout import server_experts
from autoglm.k8s.status import live_experts
from autoglm.local.dataplane import DataPlane, control
from autoglm.local.prometheus_server import PrometheusServer
from autoglm.models.tiny import PRESETS
from autoglm.placement import Placement
from autoglm.procs import free_port
from autoglm.repository import build, load_reference
from autoglm.testing import eventually, metric_value
from autoglm.testing.cluster import Cluster, tiny
from autoglm.testing.controlplane import ControlPlane
from autoglm.testing.operator import running_operator

pytestmark = [pytest.mark.k8s, pytest.mark.triton, pytest.mark.prometheus]
MODEL = replace(PRESETS["tiny"], num_experts=4, top_k=1)
INTERVAL = 2
# what the operator places 4 experts of one replica at up to 3 a server (placement.place by
# count: the fewest servers, 2, so each has room for one more replica)
START = Placement((frozenset({0, 2}), frozenset({1, 3})))


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataPlane]:
    repo = tmp_path_factory.mktemp("repo")
    build(repo, "tiny-moe", 1, MODEL)
    dp = DataPlane(repo, 1, tmp_path_factory.mktemp("plane"), capacity=3)
    dp.start(START)
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


def routed(plane: DataPlane, tokens: list[int]) -> list[float]:
    """Tokens the router counts per expert after one request of ``tokens``."""
    assert plane.router is not None
    url = plane.router.metrics_url

    def counts() -> list[float]:
        text = urllib_get(url)
        return [metric_value(text, "autoglm_expert_tokens_total", {"expert": str(e)}) or 0.0
                for e in range(MODEL.num_experts)]

    before = counts()
    infer(plane, tokens)
    time.sleep(1.2)  # the router adds to its counters every 0.5 s, in the background
    return [a - b for a, b in zip(counts(), before, strict=True)]


def urllib_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return str(r.read().decode())


def infer(plane: DataPlane, tokens: list[int]) -> None:
    assert plane.router is not None
    with httpclient.InferenceServerClient(plane.router.http_url) as c:
        ids = np.array([tokens], dtype=np.int64)
        inp = httpclient.InferInput("INPUT_IDS", list(ids.shape), "INT64")
        inp.set_data_from_numpy(ids)
        c.infer("router", [inp])


class Load:
    """The prompts ``tokens`` (the test changes them) from three kinds of client, each on
    its own keep-alive connection: KServe v2 over HTTP and over gRPC to the router, every
    answer compared with the in-process reference, and streamed OpenAI completions through
    the gateway. Each request's start and latency is kept."""

    def __init__(self, plane: DataPlane, gateway: GatewayServer, repo: Path,
                 tokens: list[list[int]]) -> None:
        assert plane.router is not None
        self.tokens = tokens
        self.stop = threading.Event()
        self.failed = self.answered = self.wrong = 0
        self.errors: list[str] = []
        self.latency: list[tuple[str, float, float]] = []  # (kind, start, seconds)
        self.reference = load_reference(repo, 1)
        self._wanted: dict[tuple[int, ...], Any] = {}
        self._lock = threading.Lock()
        router = plane.router
        self.threads = [
            threading.Thread(target=self._run, args=("http", httpclient.InferenceServerClient(
                router.http_url).infer, httpclient.InferInput)),
            threading.Thread(target=self._run, args=("http", httpclient.InferenceServerClient(
                router.http_url).infer, httpclient.InferInput)),
            threading.Thread(target=self._run, args=("grpc", grpcclient.InferenceServerClient(
                router.grpc_url).infer, grpcclient.InferInput)),
            threading.Thread(target=self._openai, args=(f"http://127.0.0.1:{gateway.port}",))]

    def wanted(self, prompt: list[int]) -> Any:
        with self._lock:
            key = tuple(prompt)
            if key not in self._wanted:
                with torch.no_grad():
                    self._wanted[key] = self.reference(torch.tensor([prompt])).numpy()
            return self._wanted[key]

    def _record(self, kind: str, t0: float, error: str | None) -> None:
        with self._lock:
            self.latency.append((kind, t0, time.monotonic() - t0))
            if error is None:
                self.answered += 1
            else:
                self.failed += 1
                self.errors.append(f"{kind}: {error[:200]}")

    def _run(self, kind: str, infer: Any, make_input: Any) -> None:
        for n in itertools.count():
            if self.stop.is_set():
                break
            prompt = self.tokens[n % len(self.tokens)]
            ids = np.array([prompt], dtype=np.int64)
            inp = make_input("INPUT_IDS", list(ids.shape), "INT64")
            inp.set_data_from_numpy(ids)
            t0 = time.monotonic()
            try:
                logits = infer("router", [inp]).as_numpy("LOGITS")
            except Exception as e:
                self._record(kind, t0, str(e))
                continue
            self._record(kind, t0, None)
            if not np.allclose(logits, self.wanted(prompt), rtol=1e-4, atol=1e-4):
                with self._lock:
                    self.wrong += 1

    def _openai(self, base: str) -> None:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                chunks = list(client.completions.create(
                    model="tiny-moe", prompt="Once upon a time", max_tokens=8, stream=True,
                    extra_body={"ignore_eos": True}))
                ok = chunks and chunks[-1].choices[0].finish_reason is not None
                self._record("openai", t0, None if ok else "a stream ended unfinished")
            except Exception as e:
                self._record("openai", t0, str(e))

    def p99(self, kind: str, when: Any) -> tuple[float, int]:
        """The p99 latency (ms) of ``kind``'s requests that started when ``when(t)``, and
        how many there were."""
        with self._lock:
            xs = sorted(dt for k, t0, dt in self.latency if k == kind and when(t0))
        return (1000 * xs[min(len(xs) - 1, int(0.99 * len(xs)))] if xs else math.nan), len(xs)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


class Kubelet:
    """Plays the kubelet for the expert server Deployments the operator adds and deletes
    (kwok runs no containers): an added one gets a real server, booted with its template's
    experts, named in the addresses file and Prometheus' targets; a deleted one leaves the
    router's view, then stops. Servers go by index, as Deployments ``m-a-experts-<s>``."""

    def __init__(self, plane: DataPlane, deployments: Any, addresses: Path,
                 prometheus: PrometheusServer, labels: dict[str, str]) -> None:
        self.plane, self.deployments, self.addresses = plane, deployments, addresses
        self.prometheus, self.labels = prometheus, labels
        self.started = self.stopped = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def publish(self) -> None:
        plane, ns = self.plane, self.labels["namespace"]
        assert plane.router is not None
        self.addresses.write_text(json.dumps({
            f"{ns}/m-a-experts-{s}": f"http://{x.server.http_url}"
            for s, x in enumerate(plane.expert_servers)}))
        self.prometheus.set_targets([
            ({**self.labels, "component": "router"}, [f"127.0.0.1:{plane.router.metrics_port}"]),
            ({**self.labels, "component": "expert"},
             [f"127.0.0.1:{x.server.metrics_port}" for x in plane.expert_servers])])

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                wanted = [d for d in self.deployments()
                          if not d["metadata"].get("deletionTimestamp")]
            except Exception:
                continue
            if not wanted:
                continue  # not created yet
            plane = self.plane
            try:
                while len(plane.expert_servers) < len(wanted):
                    plane.add_server(server_experts(wanted[len(plane.expert_servers)]) or
                                     frozenset())
                    self.started += 1
                    self.publish()
                while len(plane.expert_servers) > len(wanted):
                    gone = plane.expert_servers[-1]
                    plane.expert_servers = plane.expert_servers[:-1]
                    plane.write_endpoints()
                    self.publish()
                    time.sleep(2 * plane.resolve_seconds)  # the router stopped asking it
                    gone.server.stop()
                    self.stopped += 1
            except Exception as e:  # reported by the test
                self.errors.append(repr(e))

    def __enter__(self) -> Kubelet:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self.thread.join()


def test_the_operator_moves_experts_live_and_resumes_a_rebalance_after_a_restart(
        control_plane: ControlPlane, namespace: str, plane: DataPlane,
        prometheus: PrometheusServer, tmp_path: Path) -> None:
    """Load mostly on the two experts of server 0: the operator moves experts between the
    servers live (the servers report the new sets; no pod restarted, no template changed);
    then load on a pair now together: another rebalance, with the operator killed while its
    moves are under way and resumed by the next one. No request fails."""
    assert plane.router is not None
    cluster = Cluster(control_plane, namespace)
    base = {"deployment": "m", "namespace": namespace, "slot": "a", "version": "1"}
    addresses = tmp_path / "addresses.json"
    # where requests go, measured on the router itself: random prompts, tokens per expert
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, MODEL.vocab_size, 16).tolist() for _ in range(16)]
    spread = {i: routed(plane, prompt) for i, prompt in enumerate(prompts)}

    def tokens_for(experts: set[int]) -> list[list[int]]:
        """The 3 prompts whose tokens go most to ``experts``."""
        share = {i: sum(c[e] for e in experts) / max(sum(c), 1) for i, c in spread.items()}
        return [prompts[i] for i in sorted(share, key=lambda i: -share[i])[:3]]

    obj = tiny("m", model__numExperts=4, model__topK=1, experts__perServer=3,
               experts__minReplicas=1, experts__maxReplicas=1, experts__replicaBudget=4)
    obj["spec"]["autoscaling"] = {"prometheusUrl": prometheus.url, "target": 1e6,
                                  "intervalSeconds": INTERVAL, "stabilizationSeconds": 0}

    def autoscaling() -> dict[str, Any]:
        return dict(cluster.resource("m")["status"].get("autoscaling") or {})

    def deployments() -> list[dict[str, Any]]:
        return sorted((d for d in cluster.get("deployments", None)["items"]
                       if d["metadata"]["name"].startswith("m-a-experts-")),
                      key=lambda d: d["metadata"]["name"])

    def annotated() -> list[frozenset[int] | None]:
        """What the Deployments say each server holds: the moved placement's annotation,
        else (a placement back where the templates boot) the template."""
        return [live_experts(d) or server_experts(d) for d in deployments()]

    def held() -> list[frozenset[int]]:
        return [frozenset(control(x.server)) for x in plane.expert_servers]

    def settled() -> list[frozenset[int]] | None:
        """What the servers hold, when it is what the Deployments say and no move is under
        way."""
        now = held()
        return now if not autoscaling().get("rebalance") and annotated() == now \
            and held() == now else None

    env = {"AUTOGLM_SERVICE_ADDRESSES": str(addresses)}
    (tmp_path / "operator").mkdir()
    gateway = GatewayServer(Routing(Target("a", 1, f"http://{plane.router.http_url}",
                                           plane.router.grpc_url, model="tiny-moe")),
                            free_port()).start()
    moving: list[tuple[float, float]] = []  # when the status showed moves under way
    watching = threading.Event()

    def watch() -> None:
        while not watching.wait(0.3):
            with contextlib.suppress(Exception):
                t = time.monotonic()
                if autoscaling().get("rebalance"):
                    moving.append((t - 0.3, time.monotonic()))

    watcher = threading.Thread(target=watch, daemon=True)
    with contextlib.ExitStack() as stack:
        stack.callback(gateway.stop)
        kubelet = stack.enter_context(Kubelet(plane, deployments, addresses, prometheus, base))
        kubelet.publish()
        op = stack.enter_context(running_operator(control_plane, tmp_path / "operator", env))
        load = stack.enter_context(Load(plane, gateway, plane.repository, tokens_for({0, 2})))
        watcher.start()
        stack.callback(watching.set)
        cluster.apply(obj)
        cluster.wait_ready("m")
        ready = time.monotonic()
        templates = [d["spec"]["template"] for d in deployments()]
        assert [set(s) for s in START.servers] == [
            {int(e) for e in next(v["value"] for v in t["spec"]["containers"][0]["env"]
                                  if v["name"] == "AUTOGLM_SERVER_EXPERTS").split(",")}
            for t in templates], "the data plane here starts as the operator placed it"
        t0 = time.monotonic()
        eventually(lambda: autoscaling().get("moves", 0) >= 1 and not autoscaling().get(
            "rebalance"), "a first rebalance done live", 120)
        print(f"\nload on server 0 -> swapped live: {time.monotonic() - t0:.1f} s")
        # (the load keeps moving, so may the experts: compared when no move is under way)
        first = eventually(settled, "the placement served, kept on the Deployments", 60)
        assert first != list(START.servers), first
        assert [d["spec"]["template"] for d in deployments()] == templates, "no pod restarted"
        reasons = [e["reason"] for e in cluster.events("m")]
        assert "Rebalancing" in reasons and "Rebalanced" in reasons, reasons
        st = autoscaling()
        assert st["serverImbalance"] is not None and st["lastRebalance"], st

        # the experts of the fuller server turn hot; the operator dies mid-move
        pair = set(sorted(first, key=len)[-1])
        load.tokens = tokens_for(pair)
        print(f"first swap: {first}; now loading {pair}")
        try:
            eventually(lambda: autoscaling().get("rebalance"), "a second rebalance to start",
                       120)
        finally:
            print(json.dumps(autoscaling()))
        op.kill()
        was = autoscaling()
        print(f"operator killed with moves under way: {was.get('rebalance')}")
        op.start()
        eventually(lambda: not autoscaling().get("rebalance")
                   and autoscaling().get("moves", 0) > was.get("moves", 0),
                   "the rebalance resumed and done", 120)
        second = eventually(settled, "the placement served, kept on the Deployments", 60)
        assert second != first, (first, second)
        assert [d["spec"]["template"] for d in deployments()] == templates

        # a second replica for the hottest expert, on the server with room: loaded live
        hottest = max(autoscaling()["experts"], key=lambda e: e["load"] or 0)
        obj["spec"]["experts"].update(maxReplicas=2, replicaBudget=5)
        obj["spec"]["autoscaling"]["target"] = hottest["load"] * 0.8
        cluster.apply(obj)
        eventually(lambda: "Placing" in [e["reason"] for e in cluster.events("m")],
                   "a new replica placed live", 120)
        # (while a move is under way its expert is on both servers too: only now, after)
        third = eventually(settled, "the placement served, kept on the Deployments", 60)
        twice = [e for e in range(MODEL.num_experts) if sum(e in h for h in third) == 2]
        assert twice, third
        assert [d["spec"]["template"] for d in deployments()] == templates, "no pod restarted"
        e = twice[0]

        def served() -> list[float]:
            return [metric_value(urllib_get(x.server.metrics_url),
                                 "autoglm_expert_served_tokens_total", {"expert": str(e)})
                    or 0.0 for x in plane.expert_servers]

        was_served = served()
        eventually(lambda: all(a > b for a, b in zip(served(), was_served, strict=True)),
                   f"expert {e} served by both servers", 60)
        print(f"expert {e} replicated live on both servers: {held()}")

        # one replica each again, then the hot pair drifts: each shift loads two experts
        # that share a server, and a rebalance follows within seconds
        obj["spec"]["experts"].update(maxReplicas=1, replicaBudget=4)
        obj["spec"]["autoscaling"].update(target=1e6, rebalanceIntervalSeconds=3)
        cluster.apply(obj)
        eventually(lambda: (lambda h: h and sorted(e for x in h for e in x) == [0, 1, 2, 3])(
            settled()), "one replica of each expert again, removed live", 120)
        shifts = 0
        while autoscaling().get("moves", 0) < 20:
            now = eventually(settled, "the placement served, kept on the Deployments", 60)
            pair = set(sorted(now[max(range(len(now)), key=lambda s: len(now[s]))])[:2])
            done = autoscaling().get("moves", 0)
            load.tokens = tokens_for(pair)
            shifts += 1
            assert shifts <= 20, f"{done} moves after {shifts} shifts"
            eventually(lambda: autoscaling().get("moves", 0) > done  # noqa: B023
                       and not autoscaling().get("rebalance"),
                       f"a rebalance after shift {shifts} (hot {pair} on one server)", 90)
        print(f"{autoscaling()['moves']} live moves after {shifts} shifts of the hot pair")
        assert [d["spec"]["template"] for d in deployments()] == templates, "no pod restarted"

        # the hottest expert needs 3 replicas: a third server, booted with its new
        # replicas while the two there change live
        hottest = max(autoscaling()["experts"], key=lambda e: e["load"] or 0)
        obj["spec"]["experts"].update(maxReplicas=3, replicaBudget=7)
        obj["spec"]["autoscaling"]["target"] = hottest["load"] * 0.34
        cluster.apply(obj)
        grown = eventually(lambda: (lambda h: h if h and len(h) == 3 else None)(settled()),
                           "a third expert server added, serving what its Deployment says",
                           150)
        placing = [e["message"] for e in cluster.events("m") if e["reason"] == "Placing"]
        assert any("added" in m for m in placing), placing
        assert [d["spec"]["template"] for d in deployments()][:2] == templates, \
            "the two servers there were not restarted"
        added = plane.expert_servers[2].server
        count = metric_value(urllib_get(added.metrics_url), "autoglm_expert_served_tokens_total",
                             {"expert": str(min(grown[2]))}) or 0.0
        eventually(lambda: (metric_value(urllib_get(added.metrics_url),
                                         "autoglm_expert_served_tokens_total",
                                         {"expert": str(min(grown[2]))}) or 0.0) > count,
                   "the added server serving", 60)
        print(f"expert server added live: {grown}")

        # back to one replica each: the third server's experts move to the other two live,
        # it drains, and only then is it deleted
        obj["spec"]["experts"].update(maxReplicas=1, replicaBudget=4)
        obj["spec"]["autoscaling"]["target"] = 1e6
        cluster.apply(obj)
        shrunk = eventually(lambda: (lambda h: h if h and len(h) == 2 and kubelet.stopped
                                     else None)(settled()),
                            "back on two expert servers, the third deleted and stopped", 150)
        reasons = [e["reason"] for e in cluster.events("m")]
        assert "Deleted" in reasons and kubelet.stopped == 1, (reasons, kubelet.stopped)
        placing = [e["message"] for e in cluster.events("m") if e["reason"] == "Placing"]
        assert any("retiring" in m for m in placing), placing
        rolled = [e["message"] for e in cluster.events("m") if e["reason"] == "PlacingByRollout"]
        assert not rolled, f"every placement goes live: {rolled}"
        assert [d["spec"]["template"] for d in deployments()] == templates
        assert not kubelet.errors, kubelet.errors
        print(f"expert server removed live: {shrunk}")
    assert load.failed == 0, load.errors[:5]
    assert load.wrong == 0, f"{load.wrong} answers differ from the reference"
    assert moving, "moves under way were seen"
    print(f"{load.answered} answers (HTTP, gRPC, OpenAI streams) during "
          f"{autoscaling().get('moves')} live moves, 0 failed, 0 wrong")

    def during(t: float) -> bool:
        return any(a <= t <= b for a, b in moving)

    for kind in ("http", "grpc", "openai"):
        calm, n_calm = load.p99(kind, lambda t: t >= ready + 3 and not during(t))
        busy, n_busy = load.p99(kind, during)
        print(f"p99 {kind:6}: between moves {calm:7.1f} ms ({n_calm} requests), during moves "
              f"{busy:7.1f} ms ({n_busy}): {busy / calm:.2f}x")
