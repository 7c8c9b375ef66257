"""The real node: containers run, Services and cluster DNS work, nothing leaves the machine,
and teardown leaves nothing behind.

Pods here ask for the real node with ``nodeSelector: NODE_SELECTOR`` (kwok nodes, when a
cluster has them, lack the label), use the busybox image the node assets pack (imported,
never pulled: ``imagePullPolicy: Never``) and run in a namespace of their own.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from autoglm.testing import eventually
from autoglm.testing.controlplane import GUARDED_RANGE
from autoglm.testing.node import (
    NODE_IP,
    NODE_SELECTOR,
    NodeError,
    RealCluster,
    RealNode,
)

from .conftest import NodeClusterHolder

pytestmark = pytest.mark.node

WEB_LABELS = {"app": "web"}
# busybox httpd serves /www; the page names the pod, so tests see which one answered
WEB_SCRIPT = ('mkdir -p /www && hostname > /www/index.html && '
              'exec httpd -f -p 8080 -h /www')


def pod_spec(image: str, script: str, **extra: Any) -> dict[str, Any]:
    return {
        "nodeSelector": dict(NODE_SELECTOR),
        "terminationGracePeriodSeconds": 0,
        "enableServiceLinks": False,
        "containers": [{
            "name": "main", "image": image, "imagePullPolicy": "Never",
            "command": ["/bin/sh", "-c", script], **extra,
        }],
    }


@pytest.fixture
def ns(real_cluster: RealCluster) -> Iterator[str]:
    name = f"n-{uuid.uuid4().hex[:8]}"
    real_cluster.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        real_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def busybox(real_cluster: RealCluster) -> str:
    return real_cluster.node.import_busybox()


def apply(cluster: RealCluster, *objs: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-",
                    input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objs)}))


def pods(cluster: RealCluster, ns: str, selector: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "pods", "-n", ns, "-l", selector, "-o", "json").stdout
    return list(json.loads(out)["items"])


def ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in pod.get("status", {}).get("conditions", []))


def web(cluster: RealCluster, ns: str, image: str, replicas: int = 2) -> list[dict[str, Any]]:
    """A Deployment of busybox httpd pods with a ClusterIP, a headless and a NodePort
    Service in front; its pods once all are Ready."""
    apply(cluster, {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": ns},
        "spec": {
            "replicas": replicas, "selector": {"matchLabels": WEB_LABELS},
            "template": {"metadata": {"labels": WEB_LABELS}, "spec": pod_spec(
                image, WEB_SCRIPT, ports=[{"containerPort": 8080}],
                readinessProbe={"httpGet": {"path": "/", "port": 8080},
                                "periodSeconds": 1})},
        },
    }, *[{
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": WEB_LABELS, "ports": [{"port": 80, "targetPort": 8080}], **spec},
    } for name, spec in (("web", {}), ("web-headless", {"clusterIP": "None"}),
                         ("web-nodeport", {"type": "NodePort"}))])

    def all_ready() -> list[dict[str, Any]] | None:
        got = pods(cluster, ns, "app=web")
        return got if len(got) == replicas and all(ready(p) for p in got) else None

    return eventually(all_ready, "the web pods Ready on the real node", timeout=120)


def client_pod(cluster: RealCluster, ns: str, image: str) -> str:
    apply(cluster, {"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "client", "namespace": ns},
                    "spec": pod_spec(image, "exec sleep 3600")})
    eventually(lambda: [p for p in pods(cluster, ns, "!app") if ready(p)],
               "the client pod Ready", timeout=120)
    return "client"


def exec_in(cluster: RealCluster, ns: str, pod: str, *cmd: str) -> str:
    return cluster.kubectl("exec", "-n", ns, pod, "--", *cmd).stdout


def http_get_in(cluster: RealCluster, ns: str, pod: str, host: str, port: int,
                path: str = "/") -> str:
    """The raw HTTP/1.0 response to GET ``path`` from inside ``pod`` (busybox nc: Debian's
    static busybox wget crashes)."""
    return exec_in(cluster, ns, pod, "sh", "-c",
                   f'printf "GET {path} HTTP/1.0\\r\\nHost: {host}\\r\\n\\r\\n" | '
                   f"nc -w 5 {host} {port}")


# -- pods, Services, DNS ----------------------------------------------------------------------

def test_pods_run_on_the_real_node(real_cluster: RealCluster, ns: str, busybox: str) -> None:
    got = web(real_cluster, ns, busybox)
    for p in got:
        assert p["spec"]["nodeName"] == real_cluster.node.name
        assert p["status"]["phase"] == "Running"
        assert p["status"]["podIP"].startswith("198.18.0.")
    # the container really runs: its process answers on the pod's address from the host
    ip = got[0]["status"]["podIP"]
    with urllib.request.urlopen(f"http://{ip}:8080/", timeout=5) as r:
        assert r.read().decode().strip() == got[0]["metadata"]["name"]
    print(f"\nnode memory: {json.dumps(real_cluster.node.memory_rss())}", file=sys.stderr)


def test_dns_and_cluster_ip_from_a_pod(real_cluster: RealCluster, ns: str,
                                       busybox: str) -> None:
    got = web(real_cluster, ns, busybox)
    client = client_pod(real_cluster, ns, busybox)
    ips = {p["status"]["podIP"] for p in got}
    # a headless Service's name resolves (through CoreDNS) to its pods' addresses
    def resolved() -> set[str] | None:
        out = exec_in(real_cluster, ns, client, "nslookup",
                      f"web-headless.{ns}.svc.cluster.local")
        words = set(out.replace(":", " ").split())
        return words if ips <= words else None

    eventually(resolved, "the headless Service's pod addresses in DNS", timeout=30)
    # a ClusterIP Service, by its short name (the pod's search path), through kube-proxy
    names = {p["metadata"]["name"] for p in got}
    response = http_get_in(real_cluster, ns, client, "web", 80)
    assert response.startswith("HTTP/1.1 200"), response
    assert response.splitlines()[-1].strip() in names  # the body: the pod's name
    # the apiserver, through the `kubernetes` Service (what in-cluster clients use): it
    # answers plain HTTP with its TLS hint, which shows the connection went through
    response = http_get_in(real_cluster, ns, client, "kubernetes.default.svc", 443, "/readyz")
    assert "HTTPS server" in response, response


def test_node_port_and_port_forward_from_the_host(real_cluster: RealCluster, ns: str,
                                                  busybox: str) -> None:
    got = web(real_cluster, ns, busybox)
    names = {p["metadata"]["name"] for p in got}
    svc = json.loads(real_cluster.kubectl("get", "service", "web-nodeport", "-n", ns,
                                          "-o", "json").stdout)
    node_port = svc["spec"]["ports"][0]["nodePort"]

    def fetch(url: str) -> str:
        with urllib.request.urlopen(url, timeout=5) as r:
            return str(r.read().decode().strip())

    assert eventually(lambda: fetch(f"http://{NODE_IP}:{node_port}/"), "the NodePort",
                      timeout=30) in names
    # ... and a ClusterIP from the host
    assert fetch(f"http://{svc['spec']['clusterIP']}:80/") in names
    # kubectl port-forward (apiserver -> kubelet -> containerd streaming)
    with real_cluster.port_forward(ns, "service/web", 80) as port:
        assert fetch(f"http://127.0.0.1:{port}/") in names


# -- nothing leaves the machine ---------------------------------------------------------------

def test_images_are_never_pulled(real_cluster: RealCluster, ns: str) -> None:
    """An image that is not imported fails to pull, the pull having gone to a closed
    loopback port (a fully qualified name and a short one, which would mean the default
    registry)."""
    for name, image in (("qualified", "autoglm.local/not-imported:1"),
                        ("short", "not-imported:1")):
        spec = pod_spec(image, "true")
        spec["containers"][0]["imagePullPolicy"] = "IfNotPresent"
        apply(real_cluster, {"apiVersion": "v1", "kind": "Pod",
                             "metadata": {"name": name, "namespace": ns}, "spec": spec})

    def pull_errors() -> list[str] | None:
        out = real_cluster.kubectl("get", "events", "-n", ns, "-o", "json").stdout
        msgs = [e["message"] for e in json.loads(out)["items"]
                if e["reason"] == "Failed" and "pull" in e["message"]]
        pods_failed = {m.split('"')[1] for m in msgs}
        return msgs if len(pods_failed) == 2 else None

    for msg in eventually(pull_errors, "both pulls to fail", timeout=60):
        assert "127.0.0.1:9" in msg, msg


GUARD_TEST_NS = "autoglm-guardtest"
GUARD_TEST_IF = "autoglm-gt0"
GUARD_TEST_NET = "198.18.200.0/24"
GUARD_TEST_IP = "198.18.200.2"


@contextlib.contextmanager
def foreign_interface() -> Iterator[None]:
    """A veth into a namespace of its own, routed for GUARD_TEST_NET: an interface the guard
    does not allow, standing in for the machine's uplink (nothing real is reachable)."""
    def run(*cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True)

    run("ip", "netns", "add", GUARD_TEST_NS)
    try:
        run("ip", "link", "add", GUARD_TEST_IF, "type", "veth", "peer", "name", "gt-peer",
            "netns", GUARD_TEST_NS)
        run("ip", "-n", GUARD_TEST_NS, "addr", "add", f"{GUARD_TEST_IP}/24", "dev", "gt-peer")
        run("ip", "-n", GUARD_TEST_NS, "link", "set", "gt-peer", "up")
        run("ip", "link", "set", GUARD_TEST_IF, "up")
        run("ip", "route", "add", GUARD_TEST_NET, "dev", GUARD_TEST_IF)
        yield
    finally:
        subprocess.run(["ip", "link", "del", GUARD_TEST_IF], capture_output=True)
        subprocess.run(["ip", "netns", "del", GUARD_TEST_NS], capture_output=True)


def test_guard_drops_what_would_leave(real_cluster: RealCluster, ns: str,
                                      busybox: str) -> None:
    net = real_cluster.network
    # not routed anywhere more specific: the blackhole route refuses it at once
    with socket.socket() as s, pytest.raises(OSError):
        s.settimeout(2)
        s.connect(("198.18.201.1", 80))
    client = client_pod(real_cluster, ns, busybox)
    with foreign_interface():
        before = net.guard_drops()
        # from the host (OUTPUT) ...
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(2)
            s.connect((GUARD_TEST_IP, 80))
        after_host = net.guard_drops()
        assert after_host > before, "the guard did not drop the host's packet"
        # ... and from a pod (FORWARD)
        proc = real_cluster.kubectl("exec", "-n", ns, client, "--", "nc", "-w", "2",
                                    GUARD_TEST_IP, "80", check=False)
        assert proc.returncode != 0, proc.stdout
        assert net.guard_drops() > after_host, "the guard did not drop the pod's packet"
    assert GUARDED_RANGE == "198.18.0.0/15"


# -- teardown -------------------------------------------------------------------------------

def test_stop_leaves_nothing(node_holder: NodeClusterHolder, busybox: str, ns: str) -> None:
    """Stop the session's cluster with pods running (containers, netns, mounts, iptables
    rules) and compare the host with its state before the first start."""
    cluster = node_holder.ensure()
    web(cluster, ns, busybox, replicas=1)
    assert node_holder.before is not None
    # the snapshot sees what a running node makes (so an empty diff below means something)
    running = node_holder.before.diff(node_holder.snapshot())
    assert {"processes", "mounts", "netns", "links", "routes", "iptables",
            "cgroups"} <= set(running), running.keys()
    node_holder.stop()
    diff = node_holder.before.diff(node_holder.snapshot())
    assert not diff, f"left behind (before, after): {diff}"


def test_failed_start_leaves_nothing(node_holder: NodeClusterHolder,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A start that fails once kubelet and containerd run still removes everything."""
    node_holder.stop()
    before = node_holder.snapshot()

    def broken(self: RealNode, deadline: float) -> None:
        raise NodeError("injected failure")

    monkeypatch.setattr(RealNode, "_start_coredns", broken)
    cluster = RealCluster(node_holder.k8s_assets, node_holder.node_assets)
    with pytest.raises(NodeError, match="injected failure"):
        cluster.start()
    diff = before.diff(node_holder.snapshot())
    assert not diff, f"left behind (before, after): {diff}"


def test_warm_start_is_quick(node_holder: NodeClusterHolder) -> None:
    """Restart (the assets are built): print how long the node takes, and its memory."""
    node_holder.stop()
    cluster = node_holder.ensure()
    print(f"\nwarm start: cluster {node_holder.starts[-1]:.1f} s, node "
          f"{cluster.node.startup_seconds:.1f} s; node RSS "
          f"{json.dumps(cluster.node.memory_rss())}", file=sys.stderr)
    assert cluster.node.startup_seconds > 0
