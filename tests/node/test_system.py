"""The whole system on the real node, the way a user runs it: ``kubectl apply -k manifests/``
with the project's own images, then an ``AutoGLMDeployment``.

One deployment for the module (tests run in order): the operator runs as a pod under its
ServiceAccount; the Triton pods run the CPU Triton image, with the model repository (versions
1 and 2 of the tiny model) on a read-only hostPath PersistentVolume; clients on the host reach
the gateway through its ClusterIP (kube-proxy), its NodePort and ``kubectl port-forward``.
Answers are compared with the in-process reference of the version that gave them.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from autoglm.k8s.rollout import server_experts
from autoglm.k8s.status import deployment_available, live_experts, retiring
from autoglm.local.prometheus_server import PrometheusServer
from autoglm.models.decoder import Model
from autoglm.models.tiny import PRESETS
from autoglm.procs import free_port
from autoglm.repository import build, load_reference
from autoglm.testing import eventually
from autoglm.testing.cluster import Cluster, tiny
from autoglm.testing.monitoring import PODMONITOR_CRD, targets
from autoglm.testing.node import NODE_IP, RealCluster
from autoglm.testing.operator import NAMESPACE, REPO_ROOT, install

from .conftest import NodeClusterHolder, unavailable

pytestmark = [pytest.mark.node, pytest.mark.e2e]
Array = np.ndarray[Any, Any]

NS = "serving"
NAME = "tiny"
MODEL = "tiny-moe"
BUILDER = REPO_ROOT / ".ci" / "images.py"
SMALL = {"requests": {"cpu": "50m", "memory": "256Mi"}}
VERSIONS = (1, 2, 3)
RETRIES = 5
STREAMS, STREAM_TOKENS = 4, 48
INPUTS = np.random.default_rng(13).integers(0, 256, (16, 1, 6)).astype(np.int64)


@dataclass
class System:
    cluster: RealCluster
    kube: Cluster  # kubectl in NS
    models: dict[int, Model]
    prometheus: PrometheusServer | None = None

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl(*args, check=check)

    def service_ip(self, name: str, namespace: str = NS) -> str:
        return str(self.kubectl("get", "service", name, "-n", namespace, "-o",
                                "jsonpath={.spec.clusterIP}").stdout)

    def gateway(self) -> str:
        return f"{self.service_ip(NAME)}:8000"

    def pods(self, **labels: str) -> list[dict[str, Any]]:
        sel = ",".join(f"{k}={v}" for k, v in labels.items())
        out = self.kube.kubectl("get", "pods", "-l", sel, "-o", "json")
        return list(json.loads(out.stdout)["items"])

    def reference(self, version: int, ids: Array) -> Array:
        with torch.no_grad():
            return self.models[version](torch.from_numpy(ids)).numpy()


def images() -> list[Path]:
    """The operator and CPU Triton images, built (or found cached) by ``make images``."""
    p = subprocess.run([sys.executable, str(BUILDER), "build", "--json", "operator",
                        "triton-cpu"], capture_output=True, text=True, check=False)
    if p.returncode != 0:
        unavailable(f"building the images failed:\n{p.stderr[-3000:]}")
    return [Path(r["archive"]) for r in json.loads(p.stdout)]


def ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in pod.get("status", {}).get("conditions", []))


@pytest.fixture(scope="module")
def system(node_holder: NodeClusterHolder) -> Iterator[System]:
    archives = images()
    cluster = node_holder.ensure()
    for a in archives:
        cluster.node.import_image(a)
    models_dir = Path(tempfile.mkdtemp(prefix="autoglm-node-models-"))
    models_dir.chmod(0o755)  # the pods read it as user 1000
    try:
        for v in VERSIONS:
            build(models_dir, MODEL, v, PRESETS["tiny"])
        kube = Cluster(cluster.control_plane, NS)
        sys_ = System(cluster, kube, {v: load_reference(models_dir, v) for v in VERSIONS})
        cluster.kubectl("create", "namespace", NS)
        cluster.kubectl("apply", "-f", "-", input=json.dumps(PODMONITOR_CRD))
        install(cluster.control_plane)
        cluster.kubectl("apply", "-f", "-", input=json.dumps(volume(models_dir)))
        yield sys_
        if sys_.prometheus is not None:
            prom, sys_.prometheus = sys_.prometheus, None
            prom.stop()
        cluster.kubectl("delete", "namespace", NS, "--wait=false", check=False)
        cluster.kubectl("delete", "-k", str(REPO_ROOT / "manifests"), "--wait=false",
                        check=False)
        # Pods go before the node does: nothing of them is left on the host.
        eventually(lambda: not cluster.node.ctr("-n", "k8s.io", "tasks", "ls", "-q",
                                                check=False).stdout.strip()
                   or None, "every container to stop", timeout=120)
    finally:
        shutil.rmtree(models_dir, ignore_errors=True)


def volume(path: Path) -> dict[str, Any]:
    """The model repository as a read-only hostPath PersistentVolume and its claim."""
    pv = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "models"},
          "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"],
                   "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                   "hostPath": {"path": str(path), "type": "Directory"},
                   "claimRef": {"namespace": NS, "name": "models"}}}
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
           "metadata": {"name": "models", "namespace": NS},
           "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "",
                    "volumeName": "models", "resources": {"requests": {"storage": "1Gi"}}}}
    return {"apiVersion": "v1", "kind": "List", "items": [pv, pvc]}


def deployment(version: int = 1) -> dict[str, Any]:
    obj = tiny(NAME, model__version=version,
               model__volume={"claimName": "models", "mountPath": "/models"},
               triton__resources={**SMALL, "limits": {"memory": "2Gi"}},
               experts__resources={**SMALL, "limits": {"memory": "1Gi"}},
               gateway__replicas=2, gateway__serviceType="NodePort",
               gateway__resources=SMALL)
    obj["metadata"]["namespace"] = NS
    return obj


# -- clients ----------------------------------------------------------------------------------

def http_infer(address: str, ids: Array, timeout: float = 30) -> tuple[int, Array]:
    body = json.dumps({"inputs": [{"name": "INPUT_IDS", "shape": list(ids.shape),
                                   "datatype": "INT64", "data": ids.ravel().tolist()}]})
    req = urllib.request.Request(f"http://{address}/v2/models/router/infer", body.encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        out = {o["name"]: o for o in json.loads(r.read())["outputs"]}
    logits = np.array(out["LOGITS"]["data"], dtype=np.float32).reshape(out["LOGITS"]["shape"])
    return int(out["MODEL_VERSION"]["data"][0]), logits


def grpc_infer(client: grpcclient.InferenceServerClient, ids: Array,
               ) -> tuple[int, Array]:
    inp = grpcclient.InferInput("INPUT_IDS", list(ids.shape), "INT64")
    inp.set_data_from_numpy(ids)
    r = client.infer("router", [inp], client_timeout=30)
    return int(r.as_numpy("MODEL_VERSION")[0]), r.as_numpy("LOGITS")


@dataclass
class Load:
    """Steady HTTP and gRPC clients on the gateway's ClusterIP. With ``retry`` a failed
    request is tried again on a fresh connection, up to RETRIES times 0.2 s apart (what a
    client of a killed replica does: until the Service stops sending it to the dead pod,
    about a second, a fresh connection may land there again)."""

    system: System
    address: str
    retry: bool = False
    answers: list[tuple[float, str, int]] = field(default_factory=list)  # (t, proto, version)
    failures: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    retries: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for proto in ("http", "http", "grpc"):
            t = threading.Thread(target=self._client, args=(proto,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def _client(self, proto: str) -> None:
        grpc_address = self.address.replace(":8000", ":8001")
        client = grpcclient.InferenceServerClient(grpc_address) if proto == "grpc" else None
        i = 0
        while not self._stop.is_set():
            ids = INPUTS[i % len(INPUTS)]
            i += 1
            for attempt in range(1, RETRIES + 2):
                try:
                    if client is not None:
                        version, logits = grpc_infer(client, ids)
                    else:
                        version, logits = http_infer(self.address, ids)
                except Exception as e:
                    if self.retry and attempt <= RETRIES:
                        self.retries += 1
                        time.sleep(0.2)
                        if client is not None:  # a fresh connection
                            client.close()
                            client = grpcclient.InferenceServerClient(grpc_address)
                        continue
                    self.failures.append(f"{proto}: {e}")
                    break
                self.answers.append((time.monotonic(), proto, version))
                if not np.allclose(logits, self.system.reference(version, ids), atol=1e-4):
                    self.wrong.append(f"{proto}: logits of v{version} differ")
                break
            time.sleep(0.05)
        if client is not None:
            client.close()

    def count(self) -> int:
        return len(self.answers)

    def more(self, n: int, what: str, timeout: float = 120) -> None:
        """Wait for ``n`` more answers."""
        seen = len(self.answers)
        eventually(lambda: len(self.answers) >= seen + n, what, timeout)


# -- tests ------------------------------------------------------------------------------------

def test_the_operator_runs_as_a_pod_under_its_service_account(system: System) -> None:
    def running() -> dict[str, Any] | None:
        out = system.kubectl("get", "pods", "-n", NAMESPACE, "-o", "json")
        pods = json.loads(out.stdout)["items"]
        return pods[0] if len(pods) == 1 and ready(pods[0]) else None

    pod = eventually(running, "the operator pod Ready", timeout=180)
    assert pod["spec"]["serviceAccountName"] == "autoglm-operator"
    assert pod["spec"]["nodeName"] == system.cluster.node.name
    assert pod["status"]["containerStatuses"][0]["image"].endswith("autoglm/operator:0.1.0")
    # it acts under its ServiceAccount: the resource it manages comes to life
    system.kube.apply(deployment())
    system.kube.wait_ready(NAME, timeout=600)


def test_every_pod_runs_tritonserver_or_the_gateway_on_the_real_node(system: System) -> None:
    pods = system.pods(**{"app.kubernetes.io/instance": NAME})
    kinds = sorted(p["metadata"]["labels"]["app.kubernetes.io/component"] for p in pods)
    # the tiny example's 4 experts on 2 expert servers (perServer: 2)
    assert kinds == ["expert"] * 2 + ["gateway"] * 2 + ["router"], kinds
    for p in pods:
        assert ready(p) and p["spec"]["nodeName"] == system.cluster.node.name
        name = p["metadata"]["name"]
        ps = system.kube.kubectl("exec", name, "--", "sh", "-c",
                                 "cat /proc/[0-9]*/cmdline | tr '\\0' ' '").stdout
        gateway = p["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"
        want = "autoglm gateway" if gateway else "tritonserver"
        assert want in ps, f"{name}: {ps[:300]}"


def test_requests_through_clusterip_nodeport_and_port_forward_equal_the_reference(
        system: System) -> None:
    svc = system.kube.get("services", NAME)
    node_port = next(p["nodePort"] for p in svc["spec"]["ports"] if p["name"] == "http")
    ids = INPUTS[0]
    want = system.reference(1, ids)
    with system.cluster.port_forward(NS, f"service/{NAME}", 8000) as local:
        for address in (system.gateway(), f"{NODE_IP}:{node_port}", f"127.0.0.1:{local}"):
            version, logits = http_infer(address, ids)
            assert version == 1
            np.testing.assert_allclose(logits, want, atol=1e-4, err_msg=address)
    with grpcclient.InferenceServerClient(f"{system.service_ip(NAME)}:8001") as c:
        version, logits = grpc_infer(c, ids)
    assert version == 1
    np.testing.assert_allclose(logits, want, atol=1e-4)
    # and generation, through the OpenAI-compatible API
    from openai import OpenAI

    client = OpenAI(base_url=f"http://{system.gateway()}/v1", api_key="none")
    chat = client.chat.completions.create(  # all 8 tokens: an unseeded sample may end early
        model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Hi"}],
        extra_body={"ignore_eos": True})
    assert chat.usage is not None and chat.usage.completion_tokens == 8


def test_the_router_finds_its_experts_through_headless_service_dns(system: System) -> None:
    """One headless Service lists the slot's expert servers; each tells the router what it
    holds (the router's replicas gauge counts the servers reporting each expert)."""
    router = system.pods(**{"app.kubernetes.io/instance": NAME,
                            "app.kubernetes.io/component": "router"})[0]
    env = {e["name"]: e.get("value") for e in router["spec"]["containers"][0]["env"]}
    endpoints = env["AUTOGLM_EXPERT_ENDPOINTS"].split(",")
    assert endpoints == [f"dns:///{NAME}-a-experts.{NS}.svc:8001"]
    experts = system.pods(**{"app.kubernetes.io/instance": NAME,
                             "app.kubernetes.io/component": "expert"})
    ips = {p["status"]["podIP"] for p in experts}
    resolved: set[str] = set()
    for e in endpoints:
        host = e.removeprefix("dns:///").rsplit(":", 1)[0]
        out = system.kube.kubectl("exec", router["metadata"]["name"], "--", "getent",
                                  "hosts", host).stdout
        resolved |= {line.split()[0] for line in out.splitlines()}
    assert resolved == ips
    metrics = system.kube.kubectl("exec", router["metadata"]["name"], "--", "python", "-c",
                                  "import urllib.request; print(urllib.request.urlopen("
                                  "'http://127.0.0.1:8002/metrics').read().decode())").stdout
    for e in range(4):
        assert f'autoglm_expert_replicas{{expert="{e}"}} 1' in metrics, metrics[-2000:]


def test_a_rollout_v1_v2_v1_under_load_fails_no_request(system: System) -> None:
    with Load(system, system.gateway()) as load:
        load.more(20, "answers before the rollout")
        for version in (2, 1):
            system.kube.apply(deployment(version))

            def serving(v: int = version) -> bool:
                st = system.kube.resource(NAME).get("status", {})
                return bool(st.get("activeVersion") == v
                            and (st.get("swap") or {}).get("phase") == "Idle")

            eventually(serving, f"version {version} served", timeout=600)
            load.more(20, "answers after the flip")
    versions = [v for _, _, v in load.answers]
    print(f"\n{len(load.answers)} answers during v1 -> v2 -> v1, "
          f"{versions.count(2)} from v2, {len(load.failures)} failed")
    assert not load.failures, load.failures[:5]
    assert not load.wrong, load.wrong[:5]
    assert 2 in versions and versions[-1] == 1
    reasons = [e["reason"] for e in system.kube.events(NAME)]
    assert "CanaryPassed" in reasons, reasons


def test_a_gateway_replica_killed_fails_no_client_that_retries(system: System) -> None:
    gateways = system.pods(**{"app.kubernetes.io/instance": NAME,
                              "app.kubernetes.io/component": "gateway"})
    assert len(gateways) == 2
    victim = gateways[0]["metadata"]["name"]
    container = gateways[0]["status"]["containerStatuses"][0]["containerID"]
    with Load(system, system.gateway(), retry=True) as load:
        load.more(20, "answers before the kill")
        # SIGKILL the gateway's process, as a crash would (from the host: a container's
        # init ignores SIGKILL sent from inside its own PID namespace)
        system.cluster.node.ctr("-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL",
                                container.split("://", 1)[1])
        t0 = time.monotonic()

        def restarted() -> bool:
            pod = system.kube.get("pods", victim)
            return bool(pod["status"]["containerStatuses"][0]["restartCount"] >= 1
                        and ready(pod))

        eventually(restarted, "the killed gateway to be back", timeout=180)
        load.more(20, "answers after the kill")
    print(f"\ngateway replica killed: {len(load.answers)} answers, {len(load.failures)} "
          f"failed, {load.retries} retries; back after {time.monotonic() - t0:.1f} s")
    assert not load.failures, load.failures[:5]


def test_prometheus_scrapes_what_the_podmonitor_selects_and_a_loaded_expert_scales_up(
        system: System, tmp_path_factory: pytest.TempPathFactory) -> None:
    prom = PrometheusServer(tmp_path_factory.mktemp("prometheus"), free_port(), "1s",
                            host=NODE_IP)
    system.prometheus = prom.start()

    def discover() -> None:  # what Kubernetes service discovery would do, every second
        while system.prometheus is not None:
            with contextlib.suppress(Exception):
                monitor = system.kube.get("podmonitors", NAME)
                prom.set_targets(targets(monitor, system.kube.get("pods")["items"]))
            time.sleep(1)

    threading.Thread(target=discover, daemon=True).start()

    def scraped() -> int | None:
        with urllib.request.urlopen(f"{prom.url}/api/v1/targets", timeout=5) as r:
            active = json.loads(r.read())["data"]["activeTargets"]
        up = [t for t in active if t["health"] == "up"]
        return len(up) if len(up) == len(active) >= 5 else None

    print(f"\nPrometheus scrapes {eventually(scraped, 'every pod scraped', 60)} targets")
    # a low target: the load below is enough to ask for a second replica of some expert;
    # room for 3 experts a server and one replica more in all: it is added live, on a
    # server already serving
    obj = deployment(1)
    obj["spec"]["experts"].update(perServer=3, maxReplicas=2, replicaBudget=5)
    obj["spec"]["autoscaling"] = {"prometheusUrl": prom.url, "signal": "tokens", "target": 5,
                                  "intervalSeconds": 5, "stabilizationSeconds": 0}
    system.kube.apply(obj)

    def settled() -> bool:
        r = system.kube.resource(NAME)
        return bool(r["status"].get("observedGeneration") == r["metadata"]["generation"]
                    and r["status"].get("phase") == "Ready")

    eventually(settled, "the new spec applied", 120)
    templates = {d["metadata"]["name"]: d["spec"]["template"]
                 for d in system.kube.get("deployments")["items"]}

    def scaled() -> tuple[int, list[str]] | None:
        """An expert held by two ready expert servers of the serving slot, and their
        Deployments."""
        slot = system.kube.resource(NAME)["status"]["activeSlot"]
        holders: dict[int, list[str]] = {}
        for d in system.kube.get("deployments")["items"]:
            held = live_experts(d) or server_experts(d)  # moved live, else its template
            labels = d["metadata"]["labels"]
            if held is None or labels.get("app.kubernetes.io/component") != "expert" \
                    or labels.get("autoglm.io/slot") != slot \
                    or not deployment_available(d) or retiring(d):
                continue
            for e in held:
                holders.setdefault(e, []).append(d["metadata"]["name"])
        twice = sorted(e for e, ds in holders.items() if len(ds) >= 2)
        return (twice[0], holders[twice[0]]) if twice else None

    with Load(system, system.gateway()):
        expert, servers = eventually(scaled, "an expert on two ready expert servers", 300)
        pods = [p for p in system.pods(**{"app.kubernetes.io/instance": NAME,
                                          "app.kubernetes.io/component": "expert"})
                if any(p["metadata"]["name"].startswith(n + "-") for n in servers)]

        def served_by_each() -> bool:
            q = urllib.parse.quote("sum by (pod) (autoglm_expert_served_tokens_total"
                                   f'{{namespace="{NS}",expert="{expert}"}})')
            with urllib.request.urlopen(f"{prom.url}/api/v1/query?query={q}", timeout=5) as r:
                res = json.loads(r.read())["data"]["result"]
            counts = {x["metric"].get("pod"): float(x["value"][1]) for x in res}
            seen.update(counts)
            return all(counts.get(p["metadata"]["name"], 0) > 0 for p in pods)

        seen: dict[str, float] = {}
        try:
            eventually(served_by_each, f"expert {expert} served by each of {servers}",
                       timeout=120)
        except AssertionError as e:
            said = [f"{x['reason']}: {x['message']}" for x in system.kube.events(NAME)]
            raise AssertionError(f"{e}; served tokens by pod {seen}; events {said[-15:]}; "
                                 f"status {system.kube.resource(NAME)['status']}") from None
        live = [d for d in system.kube.get("deployments")["items"]
                if d["metadata"]["name"] in servers]
        said = [f"{e['reason']}: {e['message']}" for e in system.kube.events(NAME)
                if e["reason"].startswith("Placing")]
        assert any(live_experts(d) is not None for d in live), f"not added live: {said}"
        assert all(d["spec"]["template"] == templates[d["metadata"]["name"]] for d in live), \
            "no expert server's pod restarted"
        assert any(x.startswith("Placing: live") for x in said), said
    grown = {"expert": expert, "servers": servers}
    print(f"scaled up: {grown}")


def prometheus_values(system: System, promql: str) -> dict[str, float]:
    """An instant query on the node test's Prometheus: value by the series' ``pod``."""
    assert system.prometheus is not None
    q = urllib.parse.quote(promql)
    with urllib.request.urlopen(f"{system.prometheus.url}/api/v1/query?query={q}",
                                timeout=5) as r:
        res = json.loads(r.read())["data"]["result"]
    return {x["metric"].get("pod", ""): float(x["value"][1]) for x in res}


@dataclass
class Streams:
    """OpenAI streaming clients (the stock client) on the gateway's ClusterIP, one
    completion after another until stopped; each must end with all its tokens."""

    address: str
    done: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Streams:
        for k in range(STREAMS):
            t = threading.Thread(target=self._client, args=(k,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def _client(self, k: int) -> None:
        import openai

        client = openai.OpenAI(base_url=f"http://{self.address}/v1", api_key="unused",
                               max_retries=0, timeout=60)
        while not self._stop.is_set():
            try:
                chunks = list(client.completions.create(
                    model=MODEL, prompt=f"Story {k}:", max_tokens=STREAM_TOKENS,
                    temperature=0, stream=True, stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True}))
                usage = chunks[-1].usage
                if usage is None or usage.completion_tokens != STREAM_TOKENS:
                    self.failures.append(f"stream {k} broke off: {usage}")
                self.done += 1
            except Exception as e:  # a failed request or a broken stream
                self.failures.append(f"stream {k}: {type(e).__name__}: {e}")


def test_router_replicas_follow_their_kv_cache_and_drain_without_a_broken_stream(
        system: System) -> None:
    """Router autoscaling on the real node: under streaming load the routers' KV cache is
    over a low target, a second router pod starts and the gateways (reading the router
    Service's EndpointSlices) send it generations; with the load gone, after the window,
    it terminates: out of the EndpointSlice first, then its preStop waits for its
    generations. 0 failed, 0 broken streams, KV cache in use back to 0."""
    assert system.prometheus is not None, "needs the Prometheus of the test before"
    obj = system.kube.resource(NAME)
    spec = obj["spec"]
    spec["router"] = {"replicas": 1, "drainSeconds": 60, "autoscaling": {
        "enabled": True, "minReplicas": 1, "maxReplicas": 2, "kvCacheUtilization": 0.005,
        "stabilizationSeconds": 15}}
    system.kube.apply({"apiVersion": obj["apiVersion"], "kind": obj["kind"],
                       "metadata": {"name": NAME, "namespace": NS}, "spec": spec})
    router = {"app.kubernetes.io/instance": NAME, "app.kubernetes.io/component": "router",
              "autoglm.io/slot": obj["status"]["activeSlot"]}  # (the other slot is warm)

    def ready_routers() -> list[str]:
        return [p["metadata"]["name"] for p in system.pods(**router)
                if p["metadata"].get("deletionTimestamp") is None
                and any(c["type"] == "Ready" and c["status"] == "True"
                        for c in p.get("status", {}).get("conditions", []))]

    first = ready_routers()
    assert len(first) == 1, first
    generated = f'sum by (pod) (autoglm_generated_tokens_total{{namespace="{NS}"}})'
    with Streams(system.gateway()) as load:
        two = eventually(lambda: r if len(r := ready_routers()) == 2 else None,
                         "a second router pod Ready", timeout=300)
        new = next(p for p in two if p not in first)
        t0 = time.monotonic()
        eventually(lambda: prometheus_values(system, generated).get(new, 0) > 0,
                   "the new router pod to generate", timeout=60)
        print(f"\nrouter pod {new} generated within {time.monotonic() - t0:.1f} s of Ready "
              "(Prometheus scrapes every second)")
        before = load.done
        eventually(lambda: load.done >= before + 2 * STREAMS, "more streams", timeout=120)
        assert not load.failures, load.failures[:5]
    served = load.done
    one = eventually(lambda: r if len(r := system.pods(**router)) == 1 else None,
                     "back to one router pod", timeout=300)
    assert not load.failures, load.failures[:5]
    said = [e["message"] for e in system.kube.events(NAME) if e["reason"] == "RouterScaled"]
    assert any("1 -> 2" in m for m in said) and any("2 -> 1" in m for m in said), said
    used = f'sum(autoglm_kv_cache_used_tokens{{namespace="{NS}"}})'
    eventually(lambda: prometheus_values(system, used).get("") == 0,
               "no KV cache in use", timeout=60)
    print(f"{served} streams of {STREAM_TOKENS} tokens, 0 failed; router pods 1 -> 2 -> 1 "
          f"({one[0]['metadata']['name']} left); events: {said}")


def test_the_operator_pod_deleted_mid_swap_resumes(system: System) -> None:
    # version 3: new pods to stage (2 is still warm on the standby slot: a flip, not a swap)
    system.kube.apply(deployment(3))

    def staging() -> bool:
        st = system.kube.resource(NAME).get("status", {})
        return (st.get("swap") or {}).get("phase") not in (None, "Idle")

    eventually(staging, "the swap to start", timeout=120)
    system.kubectl("delete", "pod", "-n", NAMESPACE, "-l",
                   "app.kubernetes.io/component=operator", "--wait=false")

    def done() -> bool:
        st = system.kube.resource(NAME).get("status", {})
        return bool(st.get("activeVersion") == 3
                    and (st.get("swap") or {}).get("phase") == "Idle")

    eventually(done, "the swap finished by the new operator pod", timeout=600)
    assert http_infer(system.gateway(), INPUTS[0])[0] == 3


def test_deleting_the_resource_removes_every_child(system: System) -> None:
    system.kube.kubectl("delete", "autoglmdeployment", NAME, "--wait=false")
    eventually(lambda: not system.kube.children(NAME), "every child object gone", 180)
    def no_pods() -> bool:
        return not system.pods(**{"app.kubernetes.io/instance": NAME})

    eventually(no_pods, "every pod gone", timeout=180)

